//! [`Shared<T>`]: an `Arc`-like handle to a value that lives in shared memory.

use std::fmt;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

use super::header::TypeTag;
use super::{Backing, Segment, ShmSafe};
use crate::error::{Error, Result};

/// A handle to a `T` that lives in a shared memory [`Segment`], like an [`Arc<T>`] whose
/// value every process can see.
///
/// Clones are cheap (they share one mapping inside the process). The value is visible to
/// every process that forks after it is created, or that opens the same named segment.
/// Like `Arc`, `Shared<T>` only gives out `&T`: mutate through interior mutability
/// (atomics, [`Mutex`](crate::Mutex), [`Value`](crate::Value)).
///
/// `T` must be [`ShmSafe`]. The value is never dropped (shared memory has no owner to drop
/// it); it is freed with the last mapping. Any alignment is honoured in every process,
/// including `#[repr(align(N))]` above the page size.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use procshare::Shared;
///
/// let hits = Shared::new(AtomicU64::new(0))?;
/// let also = hits.clone();
/// also.fetch_add(2, Ordering::Relaxed);
/// assert_eq!(hits.load(Ordering::Relaxed), 2);
///
/// let table: Shared<[u32]> = Shared::from_slice(&[1, 2, 3])?;
/// assert_eq!(table.iter().sum::<u32>(), 6);
/// # Ok::<(), procshare::Error>(())
/// ```
pub struct Shared<T: ?Sized> {
    segment: Arc<Segment>,
    ptr: NonNull<T>,
}

// SAFETY: a Shared<T> only hands out `&T` and never drops or moves the value, so sending or
// sharing handles across threads is sound exactly when `&T` may be shared: `T: Sync`.
unsafe impl<T: ?Sized + Sync> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: ?Sized + Sync> Sync for Shared<T> {}

impl<T: ShmSafe> Shared<T> {
    /// Places `value` in a new anonymous segment.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the segment cannot be created.
    pub fn new(value: T) -> Result<Shared<T>> {
        Self::create_in(Backing::Anonymous, value, &TypeTag::of_shm::<T>("value"))
    }

    /// Places `value` in a new named segment that unrelated processes can
    /// [`open`](Shared::open).
    ///
    /// # Errors
    ///
    /// As for [`Segment::create`].
    pub fn create(name: &str, value: T) -> Result<Shared<T>> {
        Self::create_in(Backing::Named(name), value, &TypeTag::of_shm::<T>("value"))
    }

    /// Opens the named segment `name`, checking that it holds a `T` from a compatible build.
    ///
    /// # Errors
    ///
    /// As for [`Segment::open`], plus [`Error::TypeMismatch`] if it holds another type.
    pub fn open(name: &str) -> Result<Shared<T>> {
        Self::open_tagged(name, &TypeTag::of_shm::<T>("value"))
    }

    /// [`open`](Shared::open) checking against `tag` (a wrapper's own name for `T`).
    pub(crate) fn open_tagged(name: &str, tag: &TypeTag) -> Result<Shared<T>> {
        let segment = Segment::open_with(name, Some(tag), super::DEFAULT_OPEN_TIMEOUT)?;
        if segment.len() != size_of::<T>() || segment.elements() != 1 {
            return Err(Error::SizeMismatch {
                name: name.to_owned(),
                expected: size_of::<T>() as u64,
                found: segment.len() as u64,
            });
        }
        Ok(Self::from_segment(Arc::new(segment)))
    }

    /// A new segment holding `value`, recorded as `tag`.
    pub(crate) fn create_in(backing: Backing<'_>, value: T, tag: &TypeTag) -> Result<Shared<T>> {
        const {
            assert!(
                !std::mem::needs_drop::<T>(),
                "ShmSafe types must not need Drop"
            )
        };
        let mut value = Some(value);
        let segment = Segment::create_with(backing, tag, 1, size_of::<T>(), |data| {
            if let Some(value) = value.take() {
                // SAFETY: `data` is the start of a fresh, private, zeroed data area of
                // size_of::<T>() bytes aligned to align_of::<T>() (the tag's alignment).
                unsafe { data.cast::<T>().as_ptr().write(value) };
            }
        })?;
        Ok(Self::from_segment(Arc::new(segment)))
    }

    pub(crate) fn from_segment(segment: Arc<Segment>) -> Shared<T> {
        let ptr = segment.data_ptr().cast::<T>();
        Shared { segment, ptr }
    }

    /// Adopts a segment received as a descriptor (a handle in a `Process` argument),
    /// checking that its size fits a `T`.
    pub(crate) fn adopt(segment: Segment) -> Result<Shared<T>> {
        if segment.len() != size_of::<T>() || segment.elements() != 1 {
            return Err(Error::SizeMismatch {
                name: "<descriptor>".to_owned(),
                expected: size_of::<T>() as u64,
                found: segment.len() as u64,
            });
        }
        Ok(Self::from_segment(Arc::new(segment)))
    }
}

impl<T: ShmSafe> Shared<[T]> {
    /// Copies `values` into a new anonymous segment.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the segment cannot be created.
    pub fn from_slice(values: &[T]) -> Result<Shared<[T]>>
    where
        T: Copy,
    {
        Self::slice_in(Backing::Anonymous, values.len(), |dst| {
            // SAFETY: `dst` has room for values.len() elements and does not overlap `values`.
            unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), dst, values.len()) }
        })
    }

    /// A new anonymous segment holding `len` zeroed elements (zero is a valid `T`, see
    /// [`ShmSafe`]).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the segment cannot be created.
    pub fn zeroed(len: usize) -> Result<Shared<[T]>> {
        Self::slice_in(Backing::Anonymous, len, |_| {})
    }

    /// Copies `values` into a new named segment.
    ///
    /// # Errors
    ///
    /// As for [`Segment::create`].
    pub fn create_slice(name: &str, values: &[T]) -> Result<Shared<[T]>>
    where
        T: Copy,
    {
        Self::slice_in(Backing::Named(name), values.len(), |dst| {
            // SAFETY: `dst` has room for values.len() elements and does not overlap `values`.
            unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), dst, values.len()) }
        })
    }

    /// Opens a named segment made by [`create_slice`](Shared::create_slice), checking the
    /// element type and that the length matches the element count.
    ///
    /// # Errors
    ///
    /// As for [`Shared::open`].
    pub fn open_slice(name: &str) -> Result<Shared<[T]>> {
        let tag = TypeTag::of_shm::<T>("slice");
        let segment = Segment::open_with(name, Some(&tag), super::DEFAULT_OPEN_TIMEOUT)?;
        let expected = segment.elements().checked_mul(size_of::<T>() as u64);
        if expected != Some(segment.len() as u64) {
            return Err(Error::SizeMismatch {
                name: name.to_owned(),
                expected: expected.unwrap_or(u64::MAX),
                found: segment.len() as u64,
            });
        }
        let len = segment.elements() as usize;
        Ok(Self::slice_from_segment(Arc::new(segment), len))
    }

    fn slice_in(
        backing: Backing<'_>,
        len: usize,
        fill: impl FnOnce(*mut T),
    ) -> Result<Shared<[T]>> {
        const {
            assert!(
                !std::mem::needs_drop::<T>(),
                "ShmSafe types must not need Drop"
            )
        };
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| Error::InvalidArgument {
                what: format!("{len} elements of {} bytes overflow", size_of::<T>()),
            })?;
        let tag = TypeTag::of_shm::<T>("slice");
        let segment = Segment::create_with(backing, &tag, len as u64, bytes, |data| {
            fill(data.cast::<T>().as_ptr())
        })?;
        Ok(Self::slice_from_segment(Arc::new(segment), len))
    }

    /// Adopts a segment received as a descriptor (a handle in a `Process` argument),
    /// checking the element type and that the length matches the element count, as
    /// [`open_slice`](Shared::open_slice) does.
    pub(crate) fn adopt_slice(fd: std::os::fd::OwnedFd) -> Result<Shared<[T]>> {
        let tag = TypeTag::of_shm::<T>("slice");
        let segment = Segment::from_fd_tagged(fd, &tag)?;
        let expected = segment.elements().checked_mul(size_of::<T>() as u64);
        if expected != Some(segment.len() as u64) {
            return Err(Error::SizeMismatch {
                name: "<descriptor>".to_owned(),
                expected: expected.unwrap_or(u64::MAX),
                found: segment.len() as u64,
            });
        }
        let len = segment.elements() as usize;
        Ok(Self::slice_from_segment(Arc::new(segment), len))
    }

    fn slice_from_segment(segment: Arc<Segment>, len: usize) -> Shared<[T]> {
        let ptr = NonNull::slice_from_raw_parts(segment.data_ptr().cast::<T>(), len);
        Shared { segment, ptr }
    }
}

impl<T: ?Sized> Shared<T> {
    /// The segment the value lives in (for its name, or to pass its descriptor on).
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// Whether two handles point at the same value.
    pub fn ptr_eq(this: &Shared<T>, other: &Shared<T>) -> bool {
        Arc::ptr_eq(&this.segment, &other.segment)
    }

    /// The segment handle and where the value starts in its data area (the pool's
    /// zero-copy chunk maps pass these instead of the data).
    pub(crate) fn segment_parts(&self) -> (&Arc<Segment>, usize) {
        let offset = (self.ptr.as_ptr().cast::<u8>() as usize)
            .wrapping_sub(self.segment.data_ptr().as_ptr() as usize);
        (&self.segment, offset)
    }
}

impl<T: ?Sized> Deref for Shared<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: `ptr` points into the mapping kept alive by `segment`, is aligned (the
        // data offset is a multiple of T's alignment, recorded in the header, and every
        // process maps the segment at a multiple of it, also above the page size; `open`
        // checked both against T's tag) and holds an initialised
        // T (written before the segment was marked ready, or checked by `open`). Other
        // processes only mutate it through T's own interior mutability, which `&T`
        // permits, as for `Arc<T>` across threads.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: ?Sized> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared {
            segment: Arc::clone(&self.segment),
            ptr: self.ptr,
        }
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
