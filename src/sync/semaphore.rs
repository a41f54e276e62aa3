//! [`Semaphore`]: a counting semaphore on a shared futex word.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::shm::ShmSafe;
use crate::sys::{self, Deadline, FutexWait};

/// A counting semaphore shared between processes: Python's `Semaphore` and, with
/// [`Semaphore::bounded`], `BoundedSemaphore`.
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
    /// Largest value `release` may reach; `u32::MAX` when unbounded.
    max: u32,
}

// SAFETY: repr(C) atomics and a plain integer, no pointers or drop glue. A count above
// `max` written by a scribbling peer is reported by `release`, not trusted.
unsafe impl ShmSafe for Semaphore {}

impl Semaphore {
    /// A semaphore with `value` permits and no upper bound.
    pub const fn new(value: u32) -> Semaphore {
        Semaphore {
            count: AtomicU32::new(value),
            waiters: AtomicU32::new(0),
            max: u32::MAX,
        }
    }

    /// A semaphore with `value` permits whose [`release`](Semaphore::release) fails rather
    /// than exceed `value` (Python's `BoundedSemaphore`).
    pub const fn bounded(value: u32) -> Semaphore {
        Semaphore {
            count: AtomicU32::new(value),
            waiters: AtomicU32::new(0),
            max: value,
        }
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
            self.waiters.fetch_add(1, Ordering::SeqCst);
            // Re-check after announcing ourselves: a release that ran before the
            // announcement is seen here; one after it sees `waiters` and wakes us.
            let r = if self.count.load(Ordering::SeqCst) == 0 {
                sys::futex_wait(&self.count, 0, deadline)
            } else {
                FutexWait::Woken
            };
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            if r == FutexWait::TimedOut {
                return self.try_acquire();
            }
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
        let mut c = self.count.load(Ordering::Relaxed);
        loop {
            if c >= self.max {
                return Err(Error::InvalidArgument {
                    what: format!(
                        "semaphore released above its bound of {}: release only permits you \
                         acquired",
                        self.max
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
}
