//! [`Semaphore`]: a counting semaphore on a shared futex word.
//!
//! # Shared words
//!
//! ```text
//! count:   AtomicU32   permits available; the futex word waiters sleep on
//! waiters: AtomicU32   threads that may be asleep (a hint: only decides whether release
//!                      makes a wake syscall)
//! limit:   u32         bound + 1, wrapping: 0 = unbounded (so all-zero = Semaphore::new(0))
//! ```
//!
//! `acquire` is one compare-and-swap on `count`; `release` is one compare-and-swap plus,
//! when `waiters` is non-zero, a wake of one sleeper.
//!
//! # What a kill can leave
//!
//! | killed | left behind | repaired by |
//! |---|---|---|
//! | a waiter after `waiters += 1` | `waiters` one too high | nothing needed: releases make a spare wake syscall |
//! | a waiter woken by `release`, before it took the permit | a permit nobody was woken for | every sleeper re-checks `count` after at most [`RECHECK`](super::RECHECK); the free permit is taken by the next one to look |
//! | a holder (between acquire and release) | its permits | **not repaired**: see below |
//!
//! Permits are not owned, as in Python and POSIX: any process may release a permit another
//! acquired, so a permit has no holder the semaphore could check for liveness, and a
//! process killed while "holding" permits takes them with it. When permits guard a
//! resource a process may die holding, pair the semaphore with a [`Mutex`](crate::Mutex)
//! per resource (whose death is detected), or have whoever reaps the dead process
//! [`release`](Semaphore::release) on its behalf.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::RECHECK;
use crate::error::{Error, Result};
use crate::shm::ShmSafe;
use crate::sys::{self, Deadline};

/// A counting semaphore shared between processes: Python's `Semaphore` and, with
/// [`Semaphore::bounded`], `BoundedSemaphore`.
///
/// Twelve bytes, 4-byte aligned, `#[repr(C)]`; all-zero bytes are `Semaphore::new(0)`, so
/// it can be placed in zeroed shared memory without an init call.
///
/// A waiter that is woken and killed before it takes its permit does not strand the
/// others: they look again within [`RECHECK`](crate::sync::RECHECK). Permits taken by a process
/// that is then killed are *not* returned: permits are not owned (any process may
/// release one), so there is no holder to check for liveness. Release on behalf of a
/// process you reaped, or guard each resource with a [`Mutex`](crate::Mutex) too.
///
/// ```
/// use procshare::{Semaphore, Shared};
/// use std::time::Duration;
///
/// let slots = Shared::new(Semaphore::new(2))?;
/// slots.acquire();
/// assert!(slots.try_acquire());
/// assert!(!slots.acquire_timeout(Duration::from_millis(10)));
/// slots.release()?;
/// assert_eq!(slots.value(), 1);
/// # Ok::<(), procshare::Error>(())
/// ```
#[repr(C)]
pub struct Semaphore {
    count: AtomicU32,
    /// Threads that may be asleep. A killed waiter leaves this too high, which only costs a
    /// spare wake syscall.
    waiters: AtomicU32,
    /// Largest value `release` may reach, plus one, wrapping: 0 means unbounded.
    limit: u32,
}

// SAFETY: repr(C) atomics and a plain integer, no pointers or drop glue; every bit pattern
// is a valid semaphore (all-zero is `new(0)`). A count above the bound written by a
// scribbling peer is reported by `release`, not trusted.
unsafe impl ShmSafe for Semaphore {}

impl Semaphore {
    /// A semaphore with `value` permits and no upper bound.
    pub const fn new(value: u32) -> Semaphore {
        Semaphore {
            count: AtomicU32::new(value),
            waiters: AtomicU32::new(0),
            limit: 0,
        }
    }

    /// A semaphore with `value` permits whose [`release`](Semaphore::release) fails rather
    /// than exceed `value` (Python's `BoundedSemaphore`).
    pub const fn bounded(value: u32) -> Semaphore {
        Semaphore {
            count: AtomicU32::new(value),
            waiters: AtomicU32::new(0),
            limit: value.wrapping_add(1),
        }
    }

    fn max(&self) -> u32 {
        self.limit.wrapping_sub(1)
    }

    /// Takes a permit, waiting as long as needed.
    pub fn acquire(&self) {
        self.acquire_until(Deadline::NEVER);
    }

    /// Takes a permit if one is free now.
    pub fn try_acquire(&self) -> bool {
        let mut c = self.count.load(Ordering::Relaxed);
        while c > 0 {
            match self
                .count
                .compare_exchange_weak(c, c - 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => c = now,
            }
        }
        false
    }

    /// Takes a permit, giving up after `timeout`. Returns whether one was taken.
    pub fn acquire_timeout(&self, timeout: Duration) -> bool {
        self.acquire_until(Deadline::after(timeout))
    }

    fn acquire_until(&self, deadline: Deadline) -> bool {
        loop {
            if self.try_acquire() {
                return true;
            }
            if deadline.has_passed() {
                return false;
            }
            self.waiters.fetch_add(1, Ordering::SeqCst);
            // Re-check after announcing ourselves: a release that ran before the
            // announcement is seen here; one after it sees `waiters` and wakes us. The
            // sleep is cut at RECHECK: the one waiter a release wakes may be killed before
            // it takes the permit, and then nobody else would be woken for it.
            if self.count.load(Ordering::SeqCst) == 0 {
                sys::futex_wait(&self.count, 0, deadline.capped(RECHECK));
            }
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Returns a permit, waking one waiter.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if that would exceed the bound of a
    /// [`bounded`](Semaphore::bounded) semaphore (released more often than acquired); the
    /// count is left unchanged.
    pub fn release(&self) -> Result<()> {
        let max = self.max();
        let mut c = self.count.load(Ordering::Relaxed);
        loop {
            if c >= max {
                return Err(Error::InvalidArgument {
                    what: format!(
                        "semaphore released above its bound of {max}: release only permits you \
                         acquired"
                    ),
                });
            }
            match self
                .count
                .compare_exchange_weak(c, c + 1, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => c = now,
            }
        }
        if self.waiters.load(Ordering::SeqCst) != 0 {
            sys::futex_wake(&self.count, 1);
        }
        Ok(())
    }

    /// Permits available right now (may change immediately).
    pub fn value(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("value", &self.value())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn never_more_holders_than_permits() {
        let sem = Arc::new(Semaphore::new(2));
        let inside = Arc::new(AtomicU32::new(0));
        let rounds = if cfg!(miri) { 20 } else { 2_000 };
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (sem, inside) = (Arc::clone(&sem), Arc::clone(&inside));
                std::thread::spawn(move || {
                    for _ in 0..rounds {
                        sem.acquire();
                        assert!(inside.fetch_add(1, Ordering::SeqCst) < 2);
                        inside.fetch_sub(1, Ordering::SeqCst);
                        sem.release().unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(sem.value(), 2);
    }

    #[test]
    fn zeroed_is_new_zero() {
        // SAFETY: Semaphore is ShmSafe: every bit pattern, all-zero included, is valid.
        let sem: Semaphore = unsafe { std::mem::zeroed() };
        assert!(!sem.try_acquire());
        sem.release().unwrap();
        sem.release().unwrap();
        assert_eq!(sem.value(), 2);
        let b = Semaphore::bounded(1);
        assert!(b.try_acquire());
        b.release().unwrap();
        assert!(b.release().is_err());
        let full = Semaphore::bounded(u32::MAX);
        full.release().unwrap_err();
    }
}
