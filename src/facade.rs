//! The small synchronisation facade the queue algorithms are written against.
//!
//! In normal builds these are std's atomics and cells plus the shared futex from `sys`. In
//! `--cfg loom` builds they are loom's, with futex wait/wake modelled by a loom mutex and
//! condition variable, so the same ring and eventcount code runs heap-backed under the
//! loom model checker (which explores every interleaving and weak-memory outcome) and
//! under Miri.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

pub(crate) use crate::sys::{Deadline, FutexWait};

/// An `UnsafeCell` with loom's closure-based access API, so accesses are tracked under loom.
#[cfg(not(loom))]
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(value: T) -> UnsafeCell<T> {
        UnsafeCell(std::cell::UnsafeCell::new(value))
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// Sleeps while `*word == expected` (or until `deadline`); may return spuriously.
#[cfg(not(loom))]
#[inline]
pub(crate) fn wait(word: &AtomicU32, expected: u32, deadline: Deadline) -> FutexWait {
    crate::sys::futex_wait(word, expected, deadline)
}

/// Wakes up to `count` sleepers on `word`.
#[cfg(not(loom))]
#[inline]
pub(crate) fn wake(word: &AtomicU32, count: u32) {
    crate::sys::futex_wake(word, count);
}

/// A pause inside a spin loop.
#[cfg(not(loom))]
#[inline]
pub(crate) fn spin_hint() {
    std::hint::spin_loop();
}

#[cfg(loom)]
mod model {
    use super::*;
    use loom::sync::{Condvar, Mutex};

    loom::lazy_static! {
        // One "kernel" for all futex words: waking everyone is a correct (if coarse)
        // model of futex_wake, because every waiter re-checks its word.
        static ref KERNEL: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
    }

    pub(crate) fn wait(word: &AtomicU32, expected: u32, deadline: Deadline) -> FutexWait {
        let (lock, cv) = &*KERNEL;
        let guard = lock.lock().unwrap();
        if word.load(Ordering::SeqCst) != expected {
            return FutexWait::Woken;
        }
        if deadline != Deadline::NEVER {
            // Loom has no clock: a bounded wait is modelled as one that may time out at
            // any moment, which is the behaviour callers must already tolerate.
            drop(guard);
            loom::thread::yield_now();
            return FutexWait::TimedOut;
        }
        drop(cv.wait(guard).unwrap());
        FutexWait::Woken
    }

    pub(crate) fn wake(_word: &AtomicU32, _count: u32) {
        let (lock, cv) = &*KERNEL;
        let _guard = lock.lock().unwrap();
        cv.notify_all();
    }
}

#[cfg(loom)]
pub(crate) use model::{wait, wake};

#[cfg(loom)]
pub(crate) fn spin_hint() {
    loom::thread::yield_now();
}
