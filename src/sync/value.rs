//! Python's `Value` and `Array`: shared cells that carry their own robust lock.
//!
//! Both have [`Mutex`]'s lock API (`lock`, `try_lock`, `lock_timeout`, `is_poisoned`,
//! `clear_poison`) and its crash guarantee: if a process dies (or a thread panics) while
//! holding the lock, the next locker gets the lock with `Err(PoisonError)` around the
//! guard, and every later locker does too until someone checks the data and calls
//! `clear_poison`. `?` turns that `PoisonError` into [`Error::Poisoned`], whose message
//! says so. The one-shot accessors (`get`, `set`, `update`, `Array::get`, `Array::set`,
//! `Array::to_vec`) take the lock but do not refuse a poisoned cell: they see whatever the
//! dead holder left, which for a value wider than one machine word can be half old and half
//! new. Use [`Value::get_checked`] (or `lock`) where that matters.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, LockResult, PoisonError, TryLockError, TryLockResult};
use std::time::Duration;

use super::mutex::{Mutex, MutexGuard, RawGuard};
use super::raw_mutex::RawMutex;
use crate::error::{Error, Result};
use crate::shm::header::{TypeTag, short_type_name};

/// How named segments call `T`: its `SHM_NAME`, or its name without module path.
fn shm_name<T: ShmSafe>() -> String {
    if T::SHM_NAME.is_empty() {
        short_type_name(std::any::type_name::<T>())
    } else {
        T::SHM_NAME.to_owned()
    }
}
use crate::shm::{Backing, DEFAULT_OPEN_TIMEOUT, Segment, Shared, ShmSafe};

/// A single shared value with its own lock: Python's `multiprocessing.Value`.
///
/// Handles are cheap to clone, and a forked child sees the same cell. [`get`](Value::get)
/// and [`set`](Value::set) each take the lock for one access, like Python's `.value`; for a
/// read-modify-write hold the lock across it with [`lock`](Value::lock) (Python's
/// `get_lock()`) or use [`update`](Value::update).
///
/// A panic or a process death while the lock is held poisons it: `lock`, `try_lock`,
/// `lock_timeout` and [`get_checked`](Value::get_checked) then return their result inside
/// `Err(PoisonError)` until [`clear_poison`](Value::clear_poison), while `get`/`set`/`update`
/// carry on regardless. A holder killed in the middle of writing the value can leave it
/// torn (half old, half new) if `T` is wider than one store: `get` returns exactly that, so
/// check [`is_poisoned`](Value::is_poisoned) or use `get_checked` when it matters.
///
/// ```
/// use procshare::Value;
///
/// let balance = Value::new(100i32)?;
/// balance.set(balance.get() + 1); // two separate locked accesses: racy across processes
/// *balance.lock().unwrap() -= 1; // one locked read-modify-write
/// balance.update(|b| *b += 10);
/// assert_eq!(balance.get(), 110);
/// # Ok::<(), procshare::Error>(())
/// ```
pub struct Value<T> {
    cell: Shared<Mutex<T>>,
}

impl<T: ShmSafe + Send> Value<T> {
    /// A cell over a segment received as a descriptor (a handle in a `Process` argument).
    pub(crate) fn adopt(segment: Segment) -> Result<Value<T>> {
        Ok(Value {
            cell: Shared::adopt(segment)?,
        })
    }

    /// A new anonymous shared cell holding `value`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created.
    pub fn new(value: T) -> Result<Value<T>> {
        Ok(Value {
            cell: Shared::new(Mutex::new(value))?,
        })
    }

    /// A new named cell that unrelated processes can [`open`](Value::open).
    ///
    /// # Errors
    ///
    /// As for [`Segment::create`].
    pub fn create(name: &str, value: T) -> Result<Value<T>> {
        Ok(Value {
            cell: Shared::create_in(Backing::Named(name), Mutex::new(value), &Self::tag())?,
        })
    }

    /// Named segments record a `Value<T>` as such, so errors name the user's type.
    fn tag() -> TypeTag {
        TypeTag::named(
            "value",
            &format!("Value<{}>", shm_name::<T>()),
            size_of::<Mutex<T>>(),
            align_of::<Mutex<T>>(),
        )
    }

    /// Opens a named cell, checking that it holds a `Value<T>`.
    ///
    /// # Errors
    ///
    /// As for [`Shared::open`].
    pub fn open(name: &str) -> Result<Value<T>> {
        Ok(Value {
            cell: Shared::open_tagged(name, &Self::tag())?,
        })
    }

    /// Locks the cell (Python's `get_lock()`).
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` holding the guard (the lock *is* held) if a holder panicked or
    /// its process died while holding it; see [`clear_poison`](Value::clear_poison).
    pub fn lock(&self) -> LockResult<MutexGuard<'_, T>> {
        self.cell.lock()
    }

    /// Locks the cell only if it is free now.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if it is held, `Poisoned` as for [`lock`](Value::lock).
    pub fn try_lock(&self) -> TryLockResult<MutexGuard<'_, T>> {
        self.cell.try_lock()
    }

    /// Locks the cell, giving up after `timeout`.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if a live holder still held it when `timeout` passed; `Poisoned` as
    /// for [`lock`](Value::lock).
    pub fn lock_timeout(&self, timeout: Duration) -> TryLockResult<MutexGuard<'_, T>> {
        self.cell.lock_timeout(timeout)
    }

    /// Whether a holder panicked or died while holding the lock, since the last
    /// [`clear_poison`](Value::clear_poison).
    pub fn is_poisoned(&self) -> bool {
        self.cell.is_poisoned()
    }

    /// Declares the value consistent again, after checking or repairing it.
    pub fn clear_poison(&self) {
        self.cell.clear_poison();
    }

    /// The thread id (the pid, for a single-threaded process) of the holder whose death
    /// poisoned the value, if a death rather than a panic did.
    ///
    /// ```
    /// let v = procshare::Value::new(1u64)?;
    /// assert_eq!(v.dead_holder(), None);
    /// # Ok::<(), procshare::Error>(())
    /// ```
    pub fn dead_holder(&self) -> Option<u32> {
        self.cell.dead_holder()
    }

    /// Reads the value under the lock, whatever the poison state. After a holder died
    /// mid-write this is what it left, possibly torn; see [`get_checked`](Value::get_checked).
    pub fn get(&self) -> T
    where
        T: Copy,
    {
        *self.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the value under the lock, reporting poison.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` holding the value read if the cell is poisoned (a holder died or
    /// panicked while holding the lock, so the value may be torn).
    pub fn get_checked(&self) -> LockResult<T>
    where
        T: Copy,
    {
        match self.lock() {
            Ok(g) => Ok(*g),
            Err(p) => Err(PoisonError::new(*p.into_inner())),
        }
    }

    /// Replaces the value under the lock, whatever the poison state (the poison stays:
    /// only [`clear_poison`](Value::clear_poison) removes it).
    pub fn set(&self, value: T) {
        *self.lock().unwrap_or_else(PoisonError::into_inner) = value;
    }

    /// Runs `f` on the value with the lock held for the whole call, and returns its result,
    /// whatever the poison state (as for [`get`](Value::get)). A panic in `f` poisons the
    /// cell.
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The shared memory behind this cell.
    pub fn segment(&self) -> &Segment {
        self.cell.segment()
    }
}

impl<T> Clone for Value<T> {
    fn clone(&self) -> Self {
        Value {
            cell: self.cell.clone(),
        }
    }
}

/// Never blocks: a locked value (even one locked by the formatting thread) prints
/// `<locked>`.
impl<T: fmt::Debug> fmt::Debug for Value<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Value").field(&*self.cell).finish()
    }
}

/// The layout of an [`Array`] segment: the lock, then the elements at `size_of` of this.
#[repr(C)]
struct ArrayHead<T> {
    lock: RawMutex,
    elements: [T; 0],
}

/// A fixed-length shared array with its own lock: Python's `multiprocessing.Array`.
///
/// ```
/// use procshare::Array;
///
/// let squares = Array::<i64>::zeroed(4)?;
/// for (i, x) in squares.lock().unwrap().iter_mut().enumerate() {
///     *x = (i * i) as i64;
/// }
/// assert_eq!(squares.to_vec(), [0, 1, 4, 9]);
/// assert_eq!(squares.get(3), Some(9));
/// # Ok::<(), procshare::Error>(())
/// ```
pub struct Array<T> {
    segment: Arc<Segment>,
    len: usize,
    _elements: PhantomData<T>,
}

// SAFETY: every access to the elements goes through the array's lock, as for Mutex<[T]>.
unsafe impl<T: Send> Send for Array<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Array<T> {}

impl<T: ShmSafe + Send> Array<T> {
    /// A new anonymous array holding a copy of `values`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created.
    pub fn from_slice(values: &[T]) -> Result<Array<T>>
    where
        T: Copy,
    {
        Self::create_in(Backing::Anonymous, values)
    }

    /// A new anonymous array of `len` zeroed elements.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created.
    pub fn zeroed(len: usize) -> Result<Array<T>> {
        Self::allocate(Backing::Anonymous, len, |_| {})
    }

    /// A new named array holding a copy of `values`.
    ///
    /// # Errors
    ///
    /// As for [`Segment::create`].
    pub fn create(name: &str, values: &[T]) -> Result<Array<T>>
    where
        T: Copy,
    {
        Self::create_in(Backing::Named(name), values)
    }

    /// Opens a named array, checking its element type and length.
    ///
    /// # Errors
    ///
    /// As for [`Shared::open`].
    pub fn open(name: &str) -> Result<Array<T>> {
        let segment = Segment::open_with(name, Some(&Self::tag()), DEFAULT_OPEN_TIMEOUT)?;
        Self::adopt(segment, name)
    }

    /// An array over `segment` (opened by name, or received as a descriptor in a
    /// `Process` argument), checking its length against its element count.
    pub(crate) fn adopt(segment: Segment, name: &str) -> Result<Array<T>> {
        let len = usize::try_from(segment.elements()).unwrap_or(usize::MAX);
        let expected = len
            .checked_mul(size_of::<T>())
            .and_then(|n| n.checked_add(size_of::<ArrayHead<T>>()));
        if expected != Some(segment.len()) {
            return Err(Error::SizeMismatch {
                name: name.to_owned(),
                expected: expected.map_or(u64::MAX, |n| n as u64),
                found: segment.len() as u64,
            });
        }
        Ok(Array {
            segment: Arc::new(segment),
            len,
            _elements: PhantomData,
        })
    }

    fn tag() -> TypeTag {
        TypeTag::named(
            "array",
            &format!("Array<{}>", shm_name::<T>()),
            size_of::<ArrayHead<T>>(),
            align_of::<ArrayHead<T>>(),
        )
    }

    fn create_in(backing: Backing<'_>, values: &[T]) -> Result<Array<T>>
    where
        T: Copy,
    {
        Self::allocate(backing, values.len(), |dst| {
            // SAFETY: `dst` has room for values.len() elements and does not overlap `values`.
            unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), dst, values.len()) }
        })
    }

    fn allocate(backing: Backing<'_>, len: usize, fill: impl FnOnce(*mut T)) -> Result<Array<T>> {
        const {
            assert!(
                !std::mem::needs_drop::<T>(),
                "ShmSafe types must not need Drop"
            )
        };
        let bytes = len
            .checked_mul(size_of::<T>())
            .and_then(|n| n.checked_add(size_of::<ArrayHead<T>>()))
            .ok_or_else(|| Error::InvalidArgument {
                what: format!("an array of {len} elements overflows the address space"),
            })?;
        let segment = Segment::create_with(backing, &Self::tag(), len as u64, bytes, |data| {
            // SAFETY: the data area starts zeroed (an unlocked RawMutex) and is aligned for
            // ArrayHead<T>; the elements start size_of::<ArrayHead<T>>() bytes in.
            fill(unsafe { data.as_ptr().add(size_of::<ArrayHead<T>>()) }.cast::<T>())
        })?;
        Ok(Array {
            segment: Arc::new(segment),
            len,
            _elements: PhantomData,
        })
    }
}

impl<T> Array<T> {
    fn raw(&self) -> &RawMutex {
        // SAFETY: the data area starts with an ArrayHead<T>, whose first field is the
        // RawMutex; the segment (and so the mapping) lives as long as `self`.
        unsafe { &*self.segment.data_ptr().as_ptr().cast::<RawMutex>() }
    }

    fn elements(&self) -> NonNull<[T]> {
        // SAFETY: the elements follow the head inside the mapping (checked at creation or
        // by `open`), aligned for T.
        let first = unsafe { self.segment.data_ptr().add(size_of::<ArrayHead<T>>()) };
        NonNull::slice_from_raw_parts(first.cast::<T>(), self.len)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Locks the array for reading and writing its elements.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` holding the guard (the lock *is* held) if a holder panicked or
    /// its process died while holding it; see [`clear_poison`](Array::clear_poison).
    pub fn lock(&self) -> LockResult<ArrayGuard<'_, T>> {
        self.raw().lock();
        // SAFETY: we just took the lock.
        unsafe { self.guard() }
    }

    /// Locks the array only if it is free now.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if it is held, `Poisoned` as for [`lock`](Array::lock).
    pub fn try_lock(&self) -> TryLockResult<ArrayGuard<'_, T>> {
        if !self.raw().try_lock() {
            return Err(TryLockError::WouldBlock);
        }
        // SAFETY: we just took the lock.
        Ok(unsafe { self.guard() }?)
    }

    /// Locks the array, giving up after `timeout`.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if a live holder still held it when `timeout` passed; `Poisoned` as
    /// for [`lock`](Array::lock).
    pub fn lock_timeout(&self, timeout: Duration) -> TryLockResult<ArrayGuard<'_, T>> {
        if !self.raw().lock_timeout(timeout) {
            return Err(TryLockError::WouldBlock);
        }
        // SAFETY: we just took the lock.
        Ok(unsafe { self.guard() }?)
    }

    /// Whether a holder panicked or died while holding the lock, since the last
    /// [`clear_poison`](Array::clear_poison).
    pub fn is_poisoned(&self) -> bool {
        self.raw().is_poisoned()
    }

    /// Declares the elements consistent again, after checking or repairing them.
    pub fn clear_poison(&self) {
        self.raw().clear_poison();
    }

    /// The thread id (the pid, for a single-threaded process) of the holder whose death
    /// poisoned the array, if a death rather than a panic did.
    pub fn dead_holder(&self) -> Option<u32> {
        self.raw().dead_holder()
    }

    /// # Safety
    ///
    /// The calling thread must hold the array's lock; the guard takes over releasing it.
    unsafe fn guard(&self) -> LockResult<ArrayGuard<'_, T>> {
        let raw = self.raw();
        let guard = ArrayGuard {
            // SAFETY: forwarded contract: this thread holds the lock.
            _lock: unsafe { RawGuard::new(raw) },
            elements: self.elements(),
            _array: PhantomData,
        };
        if raw.is_poisoned() {
            Err(PoisonError::new(guard))
        } else {
            Ok(guard)
        }
    }

    fn locked(&self) -> ArrayGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Element `index` read under the lock, or `None` if out of range. Like
    /// [`Value::get`], this does not refuse a poisoned array.
    pub fn get(&self, index: usize) -> Option<T>
    where
        T: Copy,
    {
        self.locked().get(index).copied()
    }

    /// Writes element `index` under the lock.
    ///
    /// # Panics
    ///
    /// If `index >= len()`, like slice indexing.
    pub fn set(&self, index: usize, value: T) {
        self.locked()[index] = value;
    }

    /// A copy of all elements, taken under the lock.
    pub fn to_vec(&self) -> Vec<T>
    where
        T: Copy,
    {
        self.locked().to_vec()
    }

    /// The shared memory behind this array.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// The segment handle and where the elements start in its data area, for the pool's
    /// zero-copy chunk maps.
    pub(crate) fn segment_parts(&self) -> (&Arc<Segment>, usize) {
        (&self.segment, size_of::<ArrayHead<T>>())
    }
}

impl<T> Clone for Array<T> {
    fn clone(&self) -> Self {
        Array {
            segment: Arc::clone(&self.segment),
            len: self.len,
            _elements: PhantomData,
        }
    }
}

/// Never blocks: a locked array (even one locked by the formatting thread) prints
/// `<locked>`.
impl<T: fmt::Debug> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Array");
        match self.try_lock() {
            Ok(guard) => d.field("data", &&*guard),
            Err(TryLockError::Poisoned(p)) => d.field("data", &&*p.into_inner()),
            Err(TryLockError::WouldBlock) => d.field("data", &format_args!("<locked>")),
        };
        d.field("poisoned", &self.is_poisoned()).finish()
    }
}

/// The locked elements of an [`Array`]; unlocks when dropped.
#[must_use = "the array unlocks as soon as the guard is dropped"]
pub struct ArrayGuard<'a, T> {
    _lock: RawGuard<'a>,
    elements: NonNull<[T]>,
    _array: PhantomData<&'a mut [T]>,
}

impl<T> ArrayGuard<'_, T> {
    pub(crate) fn dead_holder(&self) -> Option<u32> {
        self._lock.raw().dead_holder()
    }

    /// Marks the array poisoned, as a panic while holding the guard would (the pool does
    /// when a chunk it was transforming in place failed half-way).
    pub(crate) fn poison(&self) {
        self._lock.raw().poison();
    }
}

impl<T> Deref for ArrayGuard<'_, T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: the guard holds the array's lock, so no one else accesses the elements.
        unsafe { self.elements.as_ref() }
    }
}

impl<T> DerefMut for ArrayGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for deref, and `&mut self` makes this the only live reference.
        unsafe { self.elements.as_mut() }
    }
}

impl<T: fmt::Debug> fmt::Debug for ArrayGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
