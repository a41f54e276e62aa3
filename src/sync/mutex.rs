//! The typed [`Mutex<T>`] over [`RawMutex`], and the guards: [`MutexGuard`] and the
//! crate's `RawGuard`, which releases a raw lock on drop and poisons it on panic (also used
//! by `Value`, `Array` and `Condvar`). How the lock itself works, and what a crash can
//! leave, is in `raw_mutex.rs`.

use std::cell::UnsafeCell;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::{LockResult, PoisonError, TryLockError, TryLockResult};
use std::time::Duration;

use super::raw_mutex::RawMutex;
use crate::shm::ShmSafe;

/// A mutual-exclusion lock shared between processes, with std's API and poisoning.
///
/// Place it in shared memory (inside a [`Shared`](crate::Shared), or in-place in any
/// mapping with [`shm::init_in`](crate::shm::init_in) / [`shm::place`](crate::shm::place))
/// and lock it from any process. It is `#[repr(C)]`: a 24-byte [`RawMutex`] followed by
/// the `T`, aligned to 8 bytes or `T`'s alignment if larger; all-zero bytes are an
/// unlocked, unpoisoned `Mutex` around an all-zero `T`. If a process dies while holding the lock, the next locker gets it with
/// `Err(PoisonError)` carrying the guard, exactly as after a panic in std: inspect or
/// repair the data, then [`clear_poison`](Mutex::clear_poison).
///
/// ```
/// use procshare::{Mutex, Shared};
///
/// let counter = Shared::new(Mutex::new(0u64))?;
/// *counter.lock().unwrap() += 1;
/// assert_eq!(*counter.lock().unwrap(), 1);
/// # Ok::<(), procshare::Error>(())
/// ```
#[repr(C)]
pub struct Mutex<T> {
    raw: RawMutex,
    data: UnsafeCell<T>,
}

// SAFETY: the lock serialises all access to `data`; T: Send lets a value be handed from
// one thread to another through it, as for std's Mutex.
unsafe impl<T: Send> Sync for Mutex<T> {}
// SAFETY: moving the mutex moves the T.
unsafe impl<T: Send> Send for Mutex<T> {}
// SAFETY: repr(C) of a ShmSafe RawMutex and an UnsafeCell<T> with T: ShmSafe (UnsafeCell
// is repr(transparent)); no pointers, no drop glue, zero is valid when it is for T.
unsafe impl<T: ShmSafe + Send> ShmSafe for Mutex<T> {}

impl<T> Mutex<T> {
    /// A new unlocked mutex holding `value`.
    pub const fn new(value: T) -> Mutex<T> {
        Mutex {
            raw: RawMutex::new(),
            data: UnsafeCell::new(value),
        }
    }

    /// Locks, waiting as long as needed.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` (holding the guard; the lock *is* held) if a previous holder
    /// panicked or its process died while holding it.
    #[inline]
    pub fn lock(&self) -> LockResult<MutexGuard<'_, T>> {
        self.raw.lock();
        // SAFETY: we just took the lock.
        unsafe { self.guard() }
    }

    /// Locks only if the lock is free now.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if it is held, `Poisoned` as for [`lock`](Mutex::lock).
    pub fn try_lock(&self) -> TryLockResult<MutexGuard<'_, T>> {
        if !self.raw.try_lock() {
            return Err(TryLockError::WouldBlock);
        }
        // SAFETY: we just took the lock.
        Ok(unsafe { self.guard() }?)
    }

    /// Locks, giving up after `timeout`.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if the lock was still held by a live owner when `timeout` passed;
    /// `Poisoned` as for [`lock`](Mutex::lock).
    pub fn lock_timeout(&self, timeout: Duration) -> TryLockResult<MutexGuard<'_, T>> {
        if !self.raw.lock_timeout(timeout) {
            return Err(TryLockError::WouldBlock);
        }
        // SAFETY: we just took the lock.
        Ok(unsafe { self.guard() }?)
    }

    /// Whether the data may be inconsistent (a holder panicked or died).
    pub fn is_poisoned(&self) -> bool {
        self.raw.is_poisoned()
    }

    /// Declares the data consistent again.
    pub fn clear_poison(&self) {
        self.raw.clear_poison();
    }

    /// The thread id of the holder whose death poisoned the lock, if a death (rather than
    /// a panic) did; see [`RawMutex::dead_holder`].
    pub fn dead_holder(&self) -> Option<u32> {
        self.raw.dead_holder()
    }

    /// Mutable access without locking: `&mut self` proves no one else can use it.
    ///
    /// # Errors
    ///
    /// `Err` (holding the reference) if poisoned.
    pub fn get_mut(&mut self) -> LockResult<&mut T> {
        let data = self.data.get_mut();
        if self.raw.is_poisoned() {
            Err(PoisonError::new(data))
        } else {
            Ok(data)
        }
    }

    /// The underlying raw lock.
    pub fn raw(&self) -> &RawMutex {
        &self.raw
    }

    /// # Safety
    ///
    /// The calling thread must hold `self.raw`.
    #[inline]
    pub(crate) unsafe fn guard(&self) -> LockResult<MutexGuard<'_, T>> {
        let guard = MutexGuard {
            // SAFETY: forwarded contract: this thread holds the lock.
            lock: unsafe { RawGuard::new(&self.raw) },
            data: &self.data,
        };
        if self.raw.is_poisoned() {
            Err(PoisonError::new(guard))
        } else {
            Ok(guard)
        }
    }
}

impl<T: Default> Default for Mutex<T> {
    fn default() -> Self {
        Mutex::new(T::default())
    }
}

impl<T: fmt::Debug> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Mutex");
        match self.try_lock() {
            Ok(guard) => d.field("data", &&*guard),
            Err(TryLockError::Poisoned(p)) => d.field("data", &&*p.into_inner()),
            Err(TryLockError::WouldBlock) => d.field("data", &format_args!("<locked>")),
        };
        d.field("poisoned", &self.is_poisoned()).finish()
    }
}

/// Holds a [`RawMutex`] and releases it on drop, poisoning it if the thread is panicking
/// (and was not already panicking when it locked, as in std).
pub(crate) struct RawGuard<'a> {
    raw: &'a RawMutex,
    panicking: bool,
    // The lock is owned by this thread: the guard must stay on it.
    _not_send: PhantomData<*const ()>,
}

impl<'a> RawGuard<'a> {
    /// # Safety
    ///
    /// The calling thread must hold `raw`; the guard takes over releasing it.
    #[inline]
    pub(crate) unsafe fn new(raw: &'a RawMutex) -> RawGuard<'a> {
        RawGuard {
            raw,
            panicking: std::thread::panicking(),
            _not_send: PhantomData,
        }
    }

    pub(crate) fn raw(&self) -> &'a RawMutex {
        self.raw
    }
}

impl Drop for RawGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // A copy of a guard that crossed a fork neither poisons nor releases the lock: the
        // child is not its holder (see `RawMutex::unlock`).
        if !self.panicking && std::thread::panicking() && self.raw.held_by_current_thread() {
            self.raw.poison();
        }
        // SAFETY: a RawGuard exists only while its thread holds the lock.
        unsafe { self.raw.unlock() }
    }
}

/// Access to the data of a locked [`Mutex`]; unlocks when dropped.
#[must_use = "the mutex unlocks as soon as the guard is dropped"]
pub struct MutexGuard<'a, T> {
    pub(crate) lock: RawGuard<'a>,
    data: &'a UnsafeCell<T>,
}

// SAFETY: sharing a guard shares `&T`, which is fine when T: Sync.
unsafe impl<T: Sync> Sync for MutexGuard<'_, T> {}

impl<'a, T> MutexGuard<'a, T> {
    /// Splits the guard for [`Condvar`](crate::Condvar): returns the raw lock and the
    /// data cell, releasing nothing.
    pub(crate) fn into_parts(self) -> (RawGuard<'a>, &'a UnsafeCell<T>) {
        (self.lock, self.data)
    }

    /// # Safety
    ///
    /// `lock` must guard `data`.
    pub(crate) unsafe fn from_parts(lock: RawGuard<'a>, data: &'a UnsafeCell<T>) -> Self {
        MutexGuard { lock, data }
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard proves this thread holds the lock, so no one else accesses data.
        unsafe { &*self.data.get() }
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for deref; `&mut self` makes this the only reference from this guard.
        unsafe { &mut *self.data.get() }
    }
}

impl<T: fmt::Debug> fmt::Debug for MutexGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn threads_exclude_each_other() {
        let each = if cfg!(miri) { 60 } else { 20_000 };
        let m = Arc::new(Mutex::new(0u64));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for _ in 0..each {
                        *m.lock().unwrap() += 1;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(*m.lock().unwrap(), 4 * each);
    }

    #[test]
    fn panic_poisons_and_clear_restores() {
        let m = Arc::new(Mutex::new(1));
        let m2 = Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("boom");
        })
        .join();
        assert!(m.is_poisoned());
        let g = m.lock().unwrap_err().into_inner();
        assert_eq!(*g, 1);
        drop(g);
        m.clear_poison();
        assert!(m.lock().is_ok());
    }

    #[test]
    #[cfg_attr(miri, ignore = "liveness comes from /proc, which Miri cannot see")]
    fn exited_thread_holding_the_lock_is_detected() {
        let m = Arc::new(Mutex::new(5));
        let m2 = Arc::clone(&m);
        std::thread::spawn(move || std::mem::forget(m2.lock().unwrap()))
            .join()
            .unwrap();
        let start = Instant::now();
        let g = m.lock().unwrap_err().into_inner();
        assert_eq!(*g, 5);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn timeout_gives_up_on_a_live_owner() {
        let m = Arc::new(Mutex::new(()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let m2 = Arc::clone(&m);
        let t = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            tx.send(()).unwrap();
            done_rx.recv().unwrap();
        });
        rx.recv().unwrap();
        let start = Instant::now();
        assert!(matches!(
            m.lock_timeout(Duration::from_millis(150)),
            Err(TryLockError::WouldBlock)
        ));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(m.lock_timeout(Duration::from_millis(150)).is_ok());
    }
}
