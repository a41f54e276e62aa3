//! Process-shared synchronisation: in-place `#[repr(C)]` types that work in any shared
//! mapping, plus Python's `Value` and `Array` cells.
//!
//! # What a crash or a timeout can do, type by type
//!
//! | type | all-zero bytes | align | a process killed inside it | a timed-out caller |
//! |---|---|---|---|---|
//! | [`Mutex`] | unlocked (if `T` is valid zeroed) | 8 | next locker gets it poisoned | gave up, nothing held |
//! | [`Semaphore`] | `Semaphore::new(0)` | 4 | a woken waiter's wake-up is re-taken by another within [`RECHECK`]; a *holder's* permits are lost (permits are not owned) | took nothing |
//! | [`Condvar`] | `Condvar::new()` | 4 | a woken-then-killed waiter delays the others by at most [`RECHECK`] | relocks, as std |
//! | [`Event`] | `Event::new()` (clear) | 4 | nothing to repair: a waiter's state is the generation it saw | returns the flag |
//! | [`Barrier`] | *uninitialised*: every wait fails with [`Error::Corrupted`](crate::Error::Corrupted) | 8 | a waiter stays counted (documented), one that never arrives stalls the others until they time out; [`Barrier::abort`] / [`Barrier::reset`] recover | withdraws its arrival |
//! | [`Value`], [`Array`] | (made by procshare only) | — | poisoned, as [`Mutex`] | as [`Mutex`] |
//!
//! Every wait sleeps on a process-shared futex word, and every sleep that could be owed a
//! wake-up by a process that may die is cut into slices of [`RECHECK`], after which the
//! waiter looks at the shared state again. A dead peer therefore costs the living at most
//! one slice of latency, never a hang.

mod barrier;
mod condvar;
mod event;
pub(crate) mod eventcount;
pub(crate) mod mutex;
mod raw_mutex;
mod semaphore;
mod value;

pub use barrier::{Barrier, BarrierWaitResult};
pub use condvar::{Condvar, WaitTimeoutResult};
pub use event::Event;
pub use mutex::{Mutex, MutexGuard};
pub use raw_mutex::RawMutex;
pub use semaphore::Semaphore;
pub use value::{Array, ArrayGuard, Value};

use std::time::Duration;

/// How long a waiter that may be owed a wake-up by a process that can die sleeps before it
/// looks at the shared state again. Only latency after a crash depends on it: a wait that
/// is woken normally ends at once.
pub const RECHECK: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_as_documented() {
        assert_eq!((size_of::<Semaphore>(), align_of::<Semaphore>()), (12, 4));
        assert_eq!((size_of::<Condvar>(), align_of::<Condvar>()), (8, 4));
        assert_eq!((size_of::<Event>(), align_of::<Event>()), (8, 4));
        assert_eq!((size_of::<Barrier>(), align_of::<Barrier>()), (24, 8));
    }
}
