//! Checked placement of shared types in a mapping the user already has.
//!
//! procshare's synchronisation types are in-place types: a `#[repr(C)]` struct holding a
//! [`Mutex`](crate::Mutex), a [`Condvar`](crate::Condvar) and a [`Barrier`](crate::Barrier)
//! works in any shared mapping, not only in a [`Segment`](crate::Segment). [`init_in`]
//! writes such a value into a mapping at an offset; [`place`] gives every process that maps
//! the same bytes a reference to it. Both check the size and alignment of the spot and
//! that the type is [`ShmSafe`], so the usual `unsafe { &*(ptr as *const Board) }` and its
//! hand-written asserts are not needed.
//!
//! ```
//! use procshare::shm::{init_in, place};
//! use procshare::{Barrier, Mutex, ShmSafe};
//!
//! #[repr(C)]
//! struct Board {
//!     total: Mutex<u64>,
//!     start: Barrier,
//! }
//! // SAFETY: repr(C), only procshare sync types (ShmSafe) inside, no pointers, no Drop.
//! unsafe impl ShmSafe for Board {}
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("board");
//! let file = std::fs::OpenOptions::new()
//!     .read(true).write(true).create(true).truncate(true).open(&path)?;
//! file.set_len(4096)?;
//! // A raw mapping: it never hands out slices that could alias the placed values.
//! let mut map = memmap2::MmapOptions::new().map_raw(&file)?;
//!
//! // The creator writes the initial value once, before any other process uses it...
//! init_in(&mut map, 0, Board { total: Mutex::new(0), start: Barrier::new(1) })?;
//! // ...and every process (the creator too) then views it in place.
//! let board: &Board = place(&map, 0)?;
//! *board.total.lock().unwrap() += 1;
//! board.start.wait()?;
//! # Ok::<(), procshare::Error>(())
//! ```

use std::any::type_name;
use std::mem::{align_of, size_of};

use crate::error::{Error, Result};
use crate::shm::{Segment, ShmSafe};

/// Memory that procshare may place shared values in: a mapping that stays mapped at the
/// same address for as long as the value is borrowed from it.
///
/// Implemented for [`Segment`] and for `memmap2`'s `MmapRaw`. Not for `MmapMut`: it hands
/// out `&[u8]`/`&mut [u8]` over its bytes (`Deref`), and a slice alive while a placed value
/// changes those bytes is undefined behaviour; map with `MmapOptions::map_raw` instead.
///
/// ```compile_fail
/// let map = memmap2::MmapMut::map_anon(64).unwrap();
/// // error: `MmapMut` is not a `Mapping`
/// let _: &u64 = procshare::shm::place(&map, 0).unwrap();
/// ```
///
/// # Safety
///
/// `base()` must point at `len()` bytes that are readable and writable for the whole
/// lifetime of `self` (until it is dropped), that are not moved or unmapped while `self`
/// is alive, and that are only ever accessed through raw pointers by the implementation
/// itself (no `&[u8]` or `&mut [u8]` over them may be alive while a placed value is).
pub unsafe trait Mapping {
    /// The first byte of the mapping.
    fn base(&self) -> *mut u8;
    /// How many bytes are mapped at [`base`](Mapping::base).
    fn mapped_len(&self) -> usize;
}

// SAFETY: a Segment maps its whole length for its lifetime and hands out only raw pointers.
unsafe impl Mapping for Segment {
    fn base(&self) -> *mut u8 {
        self.as_ptr()
    }
    fn mapped_len(&self) -> usize {
        self.len()
    }
}

// SAFETY: an MmapRaw maps `len()` bytes at `as_mut_ptr()` until it is dropped and only
// exposes raw pointers.
unsafe impl Mapping for memmap2::MmapRaw {
    fn base(&self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn mapped_len(&self) -> usize {
        self.len()
    }
}

/// The address of a `T` at `offset` in `map`, after checking that it fits and is aligned.
fn spot<T: ShmSafe, M: Mapping + ?Sized>(map: &M, offset: usize) -> Result<*mut T> {
    let len = map.mapped_len();
    let size = size_of::<T>();
    let align = align_of::<T>();
    let misplaced = |why: String| Error::InvalidArgument {
        what: format!(
            "cannot place {} (size {size}, align {align}) at offset {offset} of a {len}-byte \
             mapping: {why}",
            type_name::<T>()
        ),
    };
    match offset.checked_add(size) {
        Some(end) if end <= len => {}
        _ => {
            return Err(misplaced(format!(
                "it would end past the mapping; map at least {} bytes or use a smaller offset",
                offset.saturating_add(size)
            )));
        }
    }
    // SAFETY: offset + size <= len, so the result stays inside the mapping.
    let ptr = unsafe { map.base().add(offset) };
    if (ptr as usize) % align != 0 {
        return Err(misplaced(format!(
            "the address {ptr:p} is not a multiple of {align}; use an offset that is (mappings \
             start page-aligned, so an offset that is a multiple of {align} works)"
        )));
    }
    Ok(ptr.cast())
}

/// Writes `value` into `map` at `offset`, after checking that a `T` fits there and is
/// aligned. Do this once, before other processes [`place`] the value (for example before
/// starting them); writing over a value that others are using resets it under their feet.
///
/// `map` is borrowed mutably so that no value placed from this process is alive while the
/// bytes are overwritten.
///
/// # Errors
///
/// [`Error::InvalidArgument`] saying what is wrong if the spot is too small or misaligned.
pub fn init_in<T: ShmSafe, M: Mapping + ?Sized>(
    map: &mut M,
    offset: usize,
    value: T,
) -> Result<()> {
    let ptr = spot::<T, M>(map, offset)?;
    // SAFETY: `spot` checked that `ptr` is aligned and the `T` lies inside the mapping,
    // which `Mapping` guarantees is writable; `&mut map` rules out placed references in
    // this process. `T: ShmSafe` has no drop glue, so overwriting the old bytes leaks
    // nothing.
    unsafe { ptr.write(value) };
    Ok(())
}

/// A reference to the `T` at `offset` in `map`, after checking that a `T` fits there and
/// is aligned. The value is whatever the bytes hold: every bit pattern of a [`ShmSafe`]
/// type is valid, and all-zero bytes are each type's documented zero state (an unlocked
/// `Mutex`, an unset `Event`, ...). Initialise it with [`init_in`] where zero is not what
/// you want (a `Barrier` needs its party count, a `Semaphore` its permits).
///
/// # Errors
///
/// [`Error::InvalidArgument`] saying what is wrong if the spot is too small or misaligned.
pub fn place<T: ShmSafe, M: Mapping + ?Sized>(map: &M, offset: usize) -> Result<&T> {
    let ptr = spot::<T, M>(map, offset)?;
    // SAFETY: aligned and inside a mapping that stays mapped while `map` is borrowed;
    // `ShmSafe` makes every bit pattern a valid `T` and all shared mutation go through
    // atomics or lock-guarded `UnsafeCell`s, so a shared reference is sound even while
    // other processes use the same bytes.
    Ok(unsafe { &*ptr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mutex, Segment};

    #[test]
    #[cfg_attr(miri, ignore = "memfd and mmap are foreign calls")]
    fn checks_bounds_and_alignment() {
        let mut seg = Segment::anonymous(64).unwrap();
        init_in(&mut seg, 8, Mutex::new(5u64)).unwrap();
        assert_eq!(*place::<Mutex<u64>, _>(&seg, 8).unwrap().lock().unwrap(), 5);
        let err = place::<Mutex<u64>, _>(&seg, 4).unwrap_err().to_string();
        assert!(err.contains("not a multiple of 8"), "{err}");
        let err = place::<Mutex<u64>, _>(&seg, 48).unwrap_err().to_string();
        assert!(err.contains("end past the mapping"), "{err}");
        assert!(place::<u8, _>(&seg, usize::MAX).is_err());
    }
}
