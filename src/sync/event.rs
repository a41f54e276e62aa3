//! [`Event`]: a settable flag processes can wait on.
//!
//! # Shared words
//!
//! ```text
//!  state: AtomicU32   [generation (31 bits)][flag (1 bit)]   the futex word
//!  waiters: AtomicU32 threads that may be asleep (a hint: decides whether `set` wakes)
//! ```
//!
//! `set` on a clear event adds one to the generation and sets the flag in one
//! compare-and-swap; `clear` only drops the flag. A waiter remembers the generation it saw
//! when it started and returns as soon as the flag is set *or* the generation has moved:
//! a `set(); clear();` pulse therefore releases everyone who was waiting, even if the flag
//! is clear again by the time they run (Python's `Event` gives the same guarantee).
//! All-zero bytes are `Event::new()` (clear, generation 0); 4-byte aligned, 8 bytes.
//!
//! # What a kill can leave
//!
//! | killed | left behind | repaired by |
//! |---|---|---|
//! | a waiter while asleep | `waiters` one too high | nothing needed: `set` makes a spare wake syscall |
//! | a setter between its compare-and-swap and its wake | the flag set, sleepers not woken | sleepers look at the word after at most [`RECHECK`](super::RECHECK) |
//!
//! The generation is 31 bits: a waiter could miss a pulse only if it stayed asleep (say,
//! stopped) through exactly a multiple of 2^31 set/clear cycles and was never woken in
//! between.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::RECHECK;
use crate::shm::ShmSafe;
use crate::sys::{self, Deadline};

const FLAG: u32 = 1;
const GENERATION_ONE: u32 = 2;

/// Python's `Event`: a flag that starts clear; [`wait`](Event::wait) blocks until some
/// process [`set`](Event::set)s it.
///
/// Every waiter present when the flag is set returns, even if the flag is cleared again
/// before it gets to run (a `set(); clear();` pulse releases them all).
///
/// Eight bytes, 4-byte aligned, `#[repr(C)]`; all-zero bytes are `Event::new()` (clear).
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
    state: AtomicU32,
    waiters: AtomicU32,
}

// SAFETY: repr(C) atomics, no pointers or drop glue; every bit pattern is a flag and a
// generation.
unsafe impl ShmSafe for Event {}

impl Event {
    /// A new, clear event.
    pub const fn new() -> Event {
        Event {
            state: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
        }
    }

    /// Sets the flag and wakes every waiter in every process.
    pub fn set(&self) {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & FLAG != 0 {
                // Already set: every waiter since the last clear has been released.
                break;
            }
            match self.state.compare_exchange_weak(
                s,
                s.wrapping_add(GENERATION_ONE) | FLAG,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        if self.waiters.load(Ordering::SeqCst) != 0 {
            sys::futex_wake(&self.state, u32::MAX);
        }
    }

    /// Clears the flag. Waiters already released by an earlier [`set`](Event::set) still
    /// return.
    pub fn clear(&self) {
        self.state.fetch_and(!FLAG, Ordering::SeqCst);
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.state.load(Ordering::Acquire) & FLAG != 0
    }

    /// Blocks until the flag is set (or has been set since this call began).
    pub fn wait(&self) {
        self.wait_until(Deadline::NEVER);
    }

    /// Blocks until the flag is set or `timeout` passes. Returns true if the flag was set
    /// at some point during the call (it may have been cleared again since), false if the
    /// timeout passed with the flag clear throughout.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Deadline::after(timeout))
    }

    fn wait_until(&self, deadline: Deadline) -> bool {
        let first = self.state.load(Ordering::Acquire);
        if first & FLAG != 0 {
            return true;
        }
        let set_since = |s: u32| s & FLAG != 0 || s & !FLAG != first & !FLAG;
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let released = loop {
            // `waiters` is announced before this load (both SeqCst): a `set` after it
            // sees the announcement and wakes us; one before it is seen here.
            let s = self.state.load(Ordering::SeqCst);
            if set_since(s) {
                break true;
            }
            if deadline.has_passed() {
                break false;
            }
            // The word is `first` exactly here (clear, same generation), so the kernel
            // puts us to sleep only if nothing was set in between. A `set` always changes
            // the word, so a pulse cannot slip past even if we were descheduled (or
            // stopped) across both the `set` and the `clear`.
            sys::futex_wait(&self.state, s, deadline.capped(RECHECK));
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        // Synchronise with the setter's write of whatever it published before `set`.
        self.state.load(Ordering::Acquire);
        released
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

    #[test]
    fn a_pulse_releases_waiters_that_see_the_flag_clear_again() {
        let ev = Event::new();
        let first = ev.state.load(Ordering::SeqCst);
        ev.set();
        ev.clear();
        assert!(!ev.is_set());
        assert_ne!(
            ev.state.load(Ordering::SeqCst),
            first,
            "the generation moved"
        );
        // A zeroed event is a clear one.
        // SAFETY: Event is ShmSafe: every bit pattern, all-zero included, is valid.
        let z: Event = unsafe { std::mem::zeroed() };
        assert!(!z.is_set());
        z.set();
        assert!(z.wait_timeout(Duration::from_millis(1)));
    }
}
