//! Shared memory: [`Segment`], [`Shared<T>`] and the [`ShmSafe`] marker.

pub(crate) mod header;
mod place;
mod segment;
mod shared;

pub use place::{Mapping, init_in, place};
pub(crate) use segment::Backing;
pub use segment::{DEFAULT_OPEN_TIMEOUT, Segment, SegmentInfo};
pub use shared::Shared;

/// Types whose values may live in memory shared between processes.
///
/// A value in shared memory is seen by processes with separate address spaces, may be
/// read after the process that wrote it has died, and is never dropped. That rules out
/// most types. Implemented for the integers, floats, the integer atomics, arrays of
/// `ShmSafe` types, `()`, and procshare's own synchronisation types.
///
/// # Safety
///
/// Implement this for your own type only if **all** of these hold:
///
/// 1. **No addresses.** It contains no pointers, references, `Box`/`Vec`/`String`, function
///    pointers or anything else that names memory: an address means nothing in another
///    process. (This is why `bytemuck::Pod` alone is not enough: it admits raw pointers.)
///    No process-local handles either (file descriptors, thread ids of this process).
/// 2. **No drop glue.** `std::mem::needs_drop::<T>()` is false: nobody runs destructors for
///    shared memory.
/// 3. **A fixed layout.** The type is `#[repr(C)]`, `#[repr(transparent)]` or a primitive,
///    and every field is `ShmSafe`, so every process built from the same source lays it
///    out the same way.
/// 4. **Every bit pattern a peer can store is valid**, and the all-zero pattern is valid
///    (fresh segments start zeroed). Types with forbidden patterns (`bool`, `AtomicBool`,
///    enums, `char`, references) must not be implemented: any process of the same user can
///    write any byte into a named segment, and a `bool` holding 2 is undefined behaviour in
///    the reader, not an error. Use `u8` / `AtomicU8` for flags.
/// 5. **It is `Sync`** and shared access from several processes is as sound as from several
///    threads: all mutation goes through atomics or `UnsafeCell` guarded by a procshare
///    lock.
///
/// Alignment is not a condition: procshare records a type's alignment in the segment header
/// and maps the segment at a multiple of it in every process, so `#[repr(align(8192))]`
/// types are as welcome as `u8`.
///
/// ```
/// use std::sync::atomic::AtomicU64;
/// use procshare::ShmSafe;
///
/// #[repr(C)]
/// struct Stats {
///     hits: AtomicU64,
///     misses: AtomicU64,
/// }
///
/// // SAFETY: repr(C), only ShmSafe fields (atomics), no pointers, no Drop, zero is valid.
/// unsafe impl ShmSafe for Stats {}
/// ```
pub unsafe trait ShmSafe: Sync + Sized {
    /// The name a named segment records for this type, which every process opening the
    /// segment must agree on along with the type's size and alignment. Empty (the default)
    /// means the type's name without its module path (`Stats` for `my_app::Stats`), so two
    /// programs that each define an identical `Stats` can share one. Set it when two
    /// programs name the type differently, or to tell same-named types apart.
    ///
    /// ```
    /// # use std::sync::atomic::AtomicU64;
    /// #[repr(C)]
    /// struct Counters { hits: AtomicU64 }
    /// // SAFETY: repr(C), one atomic, no pointers, no Drop, zero is valid.
    /// unsafe impl procshare::ShmSafe for Counters {
    ///     const SHM_NAME: &'static str = "acme.Counters.v1";
    /// }
    /// ```
    const SHM_NAME: &'static str = "";
}

macro_rules! impl_shm_safe {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: a primitive or atomic with a fixed layout, no pointers, no drop glue;
            // every bit pattern procshare can store is valid.
            unsafe impl ShmSafe for $t {}
        )*
    };
}

impl_shm_safe!(
    (),
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    std::sync::atomic::AtomicU8,
    std::sync::atomic::AtomicU16,
    std::sync::atomic::AtomicU32,
    std::sync::atomic::AtomicU64,
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicI8,
    std::sync::atomic::AtomicI16,
    std::sync::atomic::AtomicI32,
    std::sync::atomic::AtomicI64,
    std::sync::atomic::AtomicIsize,
);

// SAFETY: an array of ShmSafe elements has the elements' properties and no padding of its own.
unsafe impl<T: ShmSafe, const N: usize> ShmSafe for [T; N] {}
