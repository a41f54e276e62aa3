//! The loom/std switch: the atomics, cells and futex calls the lock-free queue algorithms
//! are written against, std's in a normal build and loom's under `--cfg loom`.
//!
//! The same ring and eventcount code thus runs on shared memory in normal builds, under
//! Miri, and heap-backed under the loom model checker (`bash .ci/loom`, `tests/loom.rs`),
//! which explores every interleaving and weak-memory outcome of small scenarios. Each
//! build gets one whole module `imp`, and both export exactly the names re-exported at the
//! top of this file:
//!
//! | name | normal build | `--cfg loom` |
//! |---|---|---|
//! | `AtomicU32`, `AtomicU64`, `Ordering`, `fence` | `std::sync::atomic` | `loom::sync::atomic` |
//! | `UnsafeCell` (closure access: `with`, `with_mut`) | a `repr(transparent)` std cell | `loom::cell::UnsafeCell` (accesses tracked) |
//! | `wait(word, expected, deadline)` | `sys::futex_wait` | one model "kernel" (loom mutex and condvar); a finite deadline may time out at once |
//! | `wake(word, count)` | `sys::futex_wake` | wakes every model waiter (each re-checks its word) |
//! | `spin_hint()` | `std::hint::spin_loop` | `loom::thread::yield_now` (a spin must let loom schedule the other thread) |
//! | `Deadline`, `FutexWait` | `sys`'s | `sys`'s |
//!
//! # Who uses it, and who bypasses it
//!
//! Users: `queue/spsc.rs` and `queue/mpmc.rs` (the rings' indices, stamps and slots) and
//! `queue/eventcount.rs` (the sleep/wake protocol).
//!
//! These use std atomics and `crate::sys` directly, and so are *not* loom-modelled:
//!
//! * `sync/` (`Mutex`, `Condvar`, `Event`, `Semaphore`, `Barrier`): their waits are
//!   deadline-sliced futex sleeps that judge owners through `/proc` (`crate::liveness`),
//!   which loom has no model for; they are covered by thread tests under Miri and by
//!   forked-process crash tests (`tests/sync_crash.rs`).
//! * `queue/peers.rs` (handle counts and owner words) and the spsc end-ownership words in
//!   `queue/spsc.rs`: process-level bookkeeping judged by liveness. Loom does not see
//!   their happens-before edges, which is why the loom models hand senders back through
//!   `join` instead of dropping them (see `tests/loom.rs`).
//! * `queue/eventcount.rs`'s `CheckClock`: a std clock pacing liveness checks, compiled
//!   out of the loom path (checks never run under loom).
//! * `queue/bytes.rs` (`ByteQueue`, `Queue<T>`): covered by Miri, forked-process tests and
//!   the fuzz targets instead.
//! * `shm/`, `process/`, `pool/`, `pipe.rs`: no lock-free protocol of their own.

pub(crate) use imp::{
    AtomicU32, AtomicU64, Deadline, FutexWait, Ordering, UnsafeCell, fence, spin_hint, wait, wake,
};

#[cfg(not(loom))]
mod imp {
    pub(crate) use crate::sys::{Deadline, FutexWait};
    pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

    /// An `UnsafeCell` with loom's closure-based access API, so accesses are tracked under
    /// loom.
    #[derive(Debug)]
    #[repr(transparent)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

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

    /// Sleeps while `*word == expected` (or until `deadline`); may return spuriously.
    #[inline]
    pub(crate) fn wait(word: &AtomicU32, expected: u32, deadline: Deadline) -> FutexWait {
        crate::sys::futex_wait(word, expected, deadline)
    }

    /// Wakes up to `count` sleepers on `word`.
    #[inline]
    pub(crate) fn wake(word: &AtomicU32, count: u32) {
        crate::sys::futex_wake(word, count);
    }

    /// A pause inside a spin loop.
    #[inline]
    pub(crate) fn spin_hint() {
        std::hint::spin_loop();
    }
}

#[cfg(loom)]
mod imp {
    pub(crate) use crate::sys::{Deadline, FutexWait};
    pub(crate) use loom::cell::UnsafeCell;
    pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

    use loom::sync::{Condvar, Mutex};

    loom::lazy_static! {
        // One "kernel" for all futex words: waking everyone is a correct (if coarse)
        // model of futex_wake, because every waiter re-checks its word.
        static ref KERNEL: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
    }

    /// Sleeps while `*word == expected`; a bounded wait may time out at any moment.
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

    /// Wakes every model sleeper (each re-checks its own word).
    pub(crate) fn wake(_word: &AtomicU32, _count: u32) {
        let (lock, cv) = &*KERNEL;
        let _guard = lock.lock().unwrap();
        cv.notify_all();
    }

    /// A pause inside a spin loop: lets loom schedule another thread.
    pub(crate) fn spin_hint() {
        loom::thread::yield_now();
    }
}
