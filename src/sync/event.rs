//! [`Event`]: a settable flag processes can wait on.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::shm::ShmSafe;
use crate::sys::{self, Deadline, FutexWait};

/// Python's `Event`: a flag that starts clear; [`wait`](Event::wait) blocks until some
/// process [`set`](Event::set)s it.
///
/// ```
/// use procshare::{Event, Shared};
/// use std::time::Duration;
///
/// let go = Shared::new(Event::new())?;
/// assert!(!go.wait_timeout(Duration::from_millis(5)));
/// go.set();
/// go.wait();
/// assert!(go.is_set());
/// # Ok::<(), procshare::Error>(())
/// ```
#[repr(C)]
pub struct Event {
    flag: AtomicU32,
    waiters: AtomicU32,
}

// SAFETY: repr(C) atomics, no pointers or drop glue; any non-zero flag reads as "set".
unsafe impl ShmSafe for Event {}

impl Event {
    /// A new, clear event.
    pub const fn new() -> Event {
        Event {
            flag: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
        }
    }

    /// Sets the flag and wakes every waiter in every process.
    pub fn set(&self) {
        self.flag.store(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            sys::futex_wake(&self.flag, u32::MAX);
        }
    }

    /// Clears the flag.
    pub fn clear(&self) {
        self.flag.store(0, Ordering::SeqCst);
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire) != 0
    }

    /// Blocks until the flag is set.
    pub fn wait(&self) {
        self.wait_until(Deadline::NEVER);
    }

    /// Blocks until the flag is set or `timeout` passes; returns whether it is set.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Deadline::after(timeout))
    }

    fn wait_until(&self, deadline: Deadline) -> bool {
        loop {
            if self.is_set() {
                return true;
            }
            self.waiters.fetch_add(1, Ordering::SeqCst);
            let r = match self.flag.load(Ordering::SeqCst) {
                0 => sys::futex_wait(&self.flag, 0, deadline),
                _ => FutexWait::Woken,
            };
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            if r == FutexWait::TimedOut {
                return self.is_set();
            }
        }
    }
}

impl Default for Event {
    fn default() -> Self {
        Event::new()
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("set", &self.is_set())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn set_wakes_every_waiter() {
        let ev = Arc::new(Event::new());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let ev = Arc::clone(&ev);
                std::thread::spawn(move || ev.wait())
            })
            .collect();
        ev.set();
        for w in waiters {
            w.join().unwrap();
        }
        ev.clear();
        assert!(!ev.wait_timeout(Duration::from_millis(1)));
    }
}
