//! [`Condvar`]: a process-shared condition variable on its own futex sequence word.
//!
//! It deliberately does not use `pthread_cond_t`: glibc's process-shared condition
//! variable can hang `pthread_cond_broadcast` forever after a waiter is killed (sourceware
//! bug 21422). Here a waiter's whole state is "which sequence number I saw", so a dead
//! waiter leaves nothing that others must wait for.
//!
//! # Shared words
//!
//! ```text
//! seq:     AtomicU32   bumped by every notify; the futex word waiters sleep on
//! waiters: AtomicU32   threads between "about to wait" and "done waiting" (a hint)
//! ```
//!
//! All-zero bytes are `Condvar::new()`; 4-byte aligned, 8 bytes.
//!
//! # What a kill can leave
//!
//! | killed | left behind | repaired by |
//! |---|---|---|
//! | a waiter while asleep | `waiters` one too high | nothing needed: notifies make a spare wake syscall |
//! | a waiter woken by `notify_one`, before it relocked | a notification nobody acts on | every sleeper looks at `seq` after at most [`RECHECK`](super::RECHECK); seeing it moved, it returns (a spurious wake-up the caller's loop absorbs) |
//! | a waiter after relocking the mutex | the mutex held by a dead thread | the mutex's own recovery: the next locker gets it poisoned |
//! | a notifier between its bump and its wake | nobody woken | as for a killed woken waiter: the sleepers' next look |
//!
//! So `notify_one` can wake more than one waiter (at most one promptly, the others when
//! their slice ends, and only if they saw the bump), which the std contract allows: wake-ups
//! may be spurious, so always wait in a loop or with [`Condvar::wait_while`].

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{LockResult, PoisonError};
use std::time::Duration;

use super::RECHECK;
use super::mutex::{MutexGuard, RawGuard};
use crate::shm::ShmSafe;
use crate::sys::{self, Deadline};

/// A condition variable shared between processes, used with [`Mutex`](crate::Mutex).
///
/// Same contract as [`std::sync::Condvar`]: wake-ups may be spurious, so wait in a loop or
/// use [`wait_while`](Condvar::wait_while). A notification is never lost: a waiter that
/// has released the mutex before the notifier took it is always woken. If the waiter a
/// [`notify_one`](Condvar::notify_one) woke is killed before it acts, the other waiters
/// notice the notification within [`RECHECK`](crate::sync::RECHECK) and return (so
/// `notify_one` may occasionally wake more than one).
///
/// Eight bytes, 4-byte aligned, `#[repr(C)]`; all-zero bytes are `Condvar::new()`.
///
/// ```
/// use procshare::{Condvar, Mutex, Shared};
///
/// #[repr(C)]
/// struct Flag { ready: Mutex<bool>, changed: Condvar }
/// // SAFETY: repr(C) of ShmSafe procshare types.
/// unsafe impl procshare::ShmSafe for Flag {}
///
/// let flag = Shared::new(Flag { ready: Mutex::new(false), changed: Condvar::new() })?;
/// *flag.ready.lock().unwrap() = true;
/// flag.changed.notify_all();
/// let guard = flag.changed.wait_while(flag.ready.lock().unwrap(), |ready| !*ready).unwrap();
/// assert!(*guard);
/// # Ok::<(), procshare::Error>(())
/// ```
#[repr(C)]
pub struct Condvar {
    seq: AtomicU32,
    /// Threads between "about to wait" and "done waiting". A killed waiter leaves this too
    /// high, which only costs notifiers a spare wake syscall; it never blocks anyone.
    waiters: AtomicU32,
}

// SAFETY: repr(C) atomics, no pointers or drop glue; any values are valid states.
unsafe impl ShmSafe for Condvar {}

/// Whether a timed wait on a [`Condvar`] ran out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitTimeoutResult(bool);

impl WaitTimeoutResult {
    /// True if the wait ended because the timeout passed.
    pub fn timed_out(&self) -> bool {
        self.0
    }
}

impl Condvar {
    /// A new condition variable.
    pub const fn new() -> Condvar {
        Condvar {
            seq: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
        }
    }

    /// Releases the guard's mutex, sleeps until notified, and locks it again.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` holding the relocked guard if the mutex was poisoned meanwhile.
    pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> LockResult<MutexGuard<'a, T>> {
        let (guard, _) = self.wait_until(guard, Deadline::NEVER);
        guard
    }

    /// Like [`wait`](Condvar::wait), giving up after `timeout`.
    ///
    /// # Errors
    ///
    /// As for [`wait`](Condvar::wait).
    pub fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> LockResult<(MutexGuard<'a, T>, WaitTimeoutResult)> {
        let (guard, timed_out) = self.wait_until(guard, Deadline::after(timeout));
        match guard {
            Ok(g) => Ok((g, WaitTimeoutResult(timed_out))),
            Err(p) => Err(PoisonError::new((
                p.into_inner(),
                WaitTimeoutResult(timed_out),
            ))),
        }
    }

    /// Waits until `condition` returns false, re-checking it after every wake-up.
    ///
    /// # Errors
    ///
    /// As for [`wait`](Condvar::wait).
    pub fn wait_while<'a, T>(
        &self,
        mut guard: MutexGuard<'a, T>,
        mut condition: impl FnMut(&mut T) -> bool,
    ) -> LockResult<MutexGuard<'a, T>> {
        while condition(&mut *guard) {
            guard = self.wait(guard)?;
        }
        Ok(guard)
    }

    /// Waits until `condition` returns false or `timeout` passes.
    ///
    /// # Errors
    ///
    /// As for [`wait`](Condvar::wait).
    pub fn wait_timeout_while<'a, T>(
        &self,
        mut guard: MutexGuard<'a, T>,
        timeout: Duration,
        mut condition: impl FnMut(&mut T) -> bool,
    ) -> LockResult<(MutexGuard<'a, T>, WaitTimeoutResult)> {
        let deadline = Deadline::after(timeout);
        loop {
            if !condition(&mut *guard) {
                return Ok((guard, WaitTimeoutResult(false)));
            }
            if deadline.has_passed() {
                return Ok((guard, WaitTimeoutResult(true)));
            }
            match self.wait_until(guard, deadline) {
                (Ok(g), _) => guard = g,
                (Err(p), timed_out) => {
                    return Err(PoisonError::new((
                        p.into_inner(),
                        WaitTimeoutResult(timed_out),
                    )));
                }
            }
        }
    }

    fn wait_until<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        deadline: Deadline,
    ) -> (LockResult<MutexGuard<'a, T>>, bool) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        // Read the sequence while still holding the mutex: a notifier that changes the
        // condition under the mutex after we release it must bump it past this value.
        let seen = self.seq.load(Ordering::SeqCst);
        let (lock, data) = guard.into_parts();
        let raw = lock.raw();
        drop(lock);
        // Sleep in slices: the one waiter a notify_one wakes may be killed before it acts,
        // so each slice ends with a look at `seq`, and a moved sequence ends the wait.
        let mut timed_out = false;
        while self.seq.load(Ordering::SeqCst) == seen {
            if deadline.has_passed() {
                timed_out = true;
                break;
            }
            sys::futex_wait(&self.seq, seen, deadline.capped(RECHECK));
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        raw.lock();
        // SAFETY: we hold `raw` again, and `data` is the cell it guards.
        let guard = unsafe { MutexGuard::from_parts(RawGuard::new(raw), data) };
        if raw.is_poisoned() {
            (Err(PoisonError::new(guard)), timed_out)
        } else {
            (Ok(guard), timed_out)
        }
    }

    /// Wakes one waiting thread (in any process), if any.
    pub fn notify_one(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            sys::futex_wake(&self.seq, 1);
        }
    }

    /// Wakes every waiting thread (in every process).
    pub fn notify_all(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            sys::futex_wake(&self.seq, u32::MAX);
        }
    }
}

impl Default for Condvar {
    fn default() -> Self {
        Condvar::new()
    }
}

impl fmt::Debug for Condvar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condvar").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mutex;
    use std::sync::Arc;

    #[test]
    fn ping_pong_between_threads() {
        let rounds = if cfg!(miri) { 20 } else { 2_000 };
        let pair = Arc::new((Mutex::new(0u32), Condvar::new()));
        let other = Arc::clone(&pair);
        let t = std::thread::spawn(move || {
            let (m, cv) = &*other;
            for _ in 0..rounds {
                let mut g = cv.wait_while(m.lock().unwrap(), |n| *n % 2 == 0).unwrap();
                *g += 1;
                cv.notify_one();
            }
        });
        let (m, cv) = &*pair;
        for _ in 0..rounds {
            let mut g = cv.wait_while(m.lock().unwrap(), |n| *n % 2 == 1).unwrap();
            *g += 1;
            cv.notify_one();
        }
        t.join().unwrap();
        let g = cv
            .wait_while(m.lock().unwrap(), |n| *n < 2 * rounds)
            .unwrap();
        assert_eq!(*g, 2 * rounds);
        let (_g, r) = cv.wait_timeout(g, Duration::from_millis(1)).unwrap();
        assert!(r.timed_out());
    }
}
