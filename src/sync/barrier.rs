//! [`Barrier`]: rendezvous for a fixed number of participants.
//!
//! # Shared words
//!
//! ```text
//!  state: AtomicU64   [generation (47 bits)][broken (1)][arrived (16)]
//!  reset: AtomicU64   1 + the latest generation ended by `reset` (0: never reset)
//!  seq:   AtomicU32   bumped after every change of generation or of `broken`; futex word
//!  n:     u32         participants per round; 0 = never initialised
//! ```
//!
//! Arriving, completing a round (the `n`th arrival: next generation, count 0) and
//! withdrawing after a timeout are each one compare-and-swap on `state`, so they cannot
//! interleave badly. A waiter remembers its generation; it is released when the generation
//! moves, and fails when `broken` is set in its generation. The generation is 47 bits: at
//! the half a million rounds per second measured on this machine it would take 8 years to
//! wrap, so a participant stopped for any real length of time is never told that a later
//! round is its own. A withdrawal only ever subtracts from a non-zero count in the
//! waiter's own, unbroken generation, so the count cannot underflow.
//!
//! Futex waits need a 32-bit word, so waiters sleep on `seq`, which the completer (or
//! aborter) bumps after its compare-and-swap on `state`; the authoritative state is
//! always `state`.
//!
//! All-zero bytes are an *uninitialised* barrier (`n = 0`): every wait fails with
//! [`Error::Corrupted`] instead of passing. 8-byte aligned, 24 bytes.
//!
//! # What a kill or a timeout can leave
//!
//! | event | left behind | repaired by |
//! |---|---|---|
//! | the completer killed between its compare-and-swap and bumping `seq` | the round complete, waiters asleep | every waiter looks at `state` after at most [`RECHECK`](super::RECHECK) |
//! | `abort` killed between setting `broken` and bumping `seq` | as above | as above |
//! | `reset` killed between writing `reset` and its compare-and-swap | a round marked reset but not ended | its waiters, when it completes, report [`Error::BarrierBroken`] (a false alarm, never a false pass) |
//! | a participant killed **before arriving** | the others wait for it | they wait with [`wait_timeout`](Barrier::wait_timeout) and [`abort`](Barrier::abort) when they learn of the death |
//! | a participant killed **while waiting** | its arrival stays counted: the round would complete one short | **not detected** (an arrival carries no identity); whoever learns of the death calls [`abort`](Barrier::abort), then [`reset`](Barrier::reset) |
//! | a waiter timing out | nothing: it withdraws its arrival (unlike Python, whose timeout breaks the barrier) | — |

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::RECHECK;
use crate::error::{Error, Result};
use crate::shm::ShmSafe;
use crate::sys::{self, Deadline};

/// Blocks each caller of [`wait`](Barrier::wait) until `n` of them (across processes) have
/// arrived, then releases them all. Reusable: Python's `Barrier`.
///
/// A participant that times out withdraws (it leaves the barrier exactly as if it had never
/// arrived), so the others keep waiting for a full round. Any process can
/// [`abort`](Barrier::abort) the barrier, Python's way out when a participant died: every
/// waiter, present and future, then gets [`Error::BarrierBroken`] until
/// [`reset`](Barrier::reset). A participant killed while waiting stays counted (the
/// barrier cannot see who arrived); see [`procshare::sync`](crate::sync) for every crash case.
///
/// 24 bytes, 8-byte aligned, `#[repr(C)]`. All-zero bytes are not a barrier: waits on one
/// fail with [`Error::Corrupted`] (never pass silently); initialise with
/// [`Barrier::new`].
///
/// ```
/// use procshare::{Barrier, Shared};
///
/// let b = Shared::new(Barrier::new(1))?;
/// assert!(b.wait()?.is_leader()); // n = 1: the only participant leads every round
/// b.abort();
/// assert!(b.wait().is_err());
/// b.reset();
/// assert!(b.wait().is_ok());
/// # Ok::<(), procshare::Error>(())
/// ```
#[repr(C)]
pub struct Barrier {
    state: AtomicU64,
    reset: AtomicU64,
    seq: AtomicU32,
    n: u32,
}

// SAFETY: repr(C) atomics and an integer, no pointers or drop glue. Every bit pattern is
// handled: n = 0 or above 65535 is reported as uninitialised or corrupt, and a corrupt
// count can make a round complete early or late, never cause undefined behaviour.
unsafe impl ShmSafe for Barrier {}

const COUNT_MASK: u64 = 0xffff;
const BROKEN: u64 = 1 << 16;
const GENERATION_SHIFT: u32 = 17;
const GENERATION_MASK: u64 = (1 << (64 - GENERATION_SHIFT)) - 1;

fn generation(state: u64) -> u64 {
    state >> GENERATION_SHIFT
}

/// The state that opens the round after the one in `state`: next generation, nobody
/// arrived, not broken.
fn next_round(state: u64) -> u64 {
    ((generation(state) + 1) & GENERATION_MASK) << GENERATION_SHIFT
}

/// Returned by [`Barrier::wait`]; exactly one participant per round is the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarrierWaitResult(bool);

impl BarrierWaitResult {
    /// Whether this caller was the last to arrive.
    pub fn is_leader(&self) -> bool {
        self.0
    }
}

impl Barrier {
    /// A barrier for `n` participants.
    ///
    /// # Panics
    ///
    /// If `n` is 0 or above 65535.
    pub const fn new(n: u32) -> Barrier {
        assert!(
            n >= 1 && n as u64 <= COUNT_MASK,
            "a Barrier needs 1 to 65535 participants"
        );
        Barrier {
            state: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            seq: AtomicU32::new(0),
            n,
        }
    }

    /// Participants per round.
    pub fn parties(&self) -> u32 {
        self.n
    }

    /// Waits for the round to fill.
    ///
    /// # Errors
    ///
    /// [`Error::BarrierBroken`] if the barrier is broken or is aborted or reset while this
    /// caller waits; [`Error::Corrupted`] if the memory was never initialised as a
    /// barrier (all zero).
    pub fn wait(&self) -> Result<BarrierWaitResult> {
        self.wait_until(Deadline::NEVER)
    }

    /// Waits for the round to fill, withdrawing after `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the round did not fill in time; this caller is then no longer
    /// counted as arrived, and the barrier is not broken. Otherwise as for
    /// [`wait`](Barrier::wait).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<BarrierWaitResult> {
        self.wait_until(Deadline::after(timeout))
    }

    /// Breaks the barrier: every participant waiting now, and every later caller, gets
    /// [`Error::BarrierBroken`] until [`reset`](Barrier::reset). Python's `abort()`: call
    /// it when a participant is known to have died or given up, so the others stop waiting.
    pub fn abort(&self) {
        self.state.fetch_or(BROKEN, Ordering::SeqCst);
        self.announce();
    }

    /// Returns the barrier to an empty, unbroken round. Participants waiting in the round
    /// that this ends get [`Error::BarrierBroken`], as in Python.
    ///
    /// Call it once every surviving participant has returned from the broken round (as
    /// Python advises), e.g. after [`abort`](Barrier::abort): arrivals of participants
    /// killed while waiting are forgotten here. A participant that was asleep (say,
    /// stopped) through both a completed round of its own and a later reset, or whose round
    /// completed while `reset` ran, may report `BarrierBroken` for the completed round: a
    /// false alarm, never a false pass.
    pub fn reset(&self) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s & (BROKEN | COUNT_MASK) == 0 {
                return; // already empty and whole: nobody to release
            }
            // Published before the round ends: a waiter that sees the new generation
            // also sees that its round was reset.
            self.reset.fetch_max(generation(s) + 1, Ordering::SeqCst);
            match self.state.compare_exchange_weak(
                s,
                next_round(s),
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        self.announce();
    }

    /// Whether the barrier is broken (aborted and not yet reset).
    pub fn is_broken(&self) -> bool {
        self.state.load(Ordering::Acquire) & BROKEN != 0
    }

    /// Participants currently waiting in this round (a snapshot; includes any that were
    /// killed while waiting).
    pub fn n_waiting(&self) -> u32 {
        (self.state.load(Ordering::Acquire) & COUNT_MASK) as u32
    }

    fn announce(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        sys::futex_wake(&self.seq, u32::MAX);
    }

    /// How the round of generation `mine` ended, once the generation has moved on.
    fn outcome(&self, mine: u64) -> Result<BarrierWaitResult> {
        if self.reset.load(Ordering::Acquire) > mine {
            Err(Error::BarrierBroken)
        } else {
            Ok(BarrierWaitResult(false))
        }
    }

    fn wait_until(&self, deadline: Deadline) -> Result<BarrierWaitResult> {
        let n = u64::from(self.n);
        if n == 0 || n > COUNT_MASK {
            return Err(Error::Corrupted {
                what: format!(
                    "a Barrier for {n} participants: the memory was never initialised with \
                     `Barrier::new` (all zero) or was overwritten"
                ),
            });
        }
        let mut s = self.state.load(Ordering::Acquire);
        let mine = loop {
            if s & BROKEN != 0 {
                return Err(Error::BarrierBroken);
            }
            // A corrupt count at or above n just completes the round.
            let leader = (s & COUNT_MASK) + 1 >= n;
            let next = if leader { next_round(s) } else { s + 1 };
            match self
                .state
                .compare_exchange_weak(s, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if leader => {
                    self.announce();
                    return Ok(BarrierWaitResult(true));
                }
                Ok(_) => break generation(s),
                Err(now) => s = now,
            }
        };
        loop {
            // Read `seq` before `state`: a change after this read bumps `seq` and so stops
            // the futex wait from sleeping.
            let seen = self.seq.load(Ordering::SeqCst);
            let s = self.state.load(Ordering::SeqCst);
            if generation(s) != mine {
                return self.outcome(mine);
            }
            if s & BROKEN != 0 {
                return Err(Error::BarrierBroken);
            }
            if deadline.has_passed() {
                return self.withdraw(mine);
            }
            // Sliced: a completer killed before its bump of `seq` must not strand us.
            sys::futex_wait(&self.seq, seen, deadline.capped(RECHECK));
        }
    }

    /// Takes back this caller's arrival in round `mine` after a timeout, unless the round
    /// ended meanwhile.
    fn withdraw(&self, mine: u64) -> Result<BarrierWaitResult> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if generation(s) != mine {
                return self.outcome(mine);
            }
            if s & BROKEN != 0 {
                return Err(Error::BarrierBroken);
            }
            if s & COUNT_MASK == 0 {
                // Our arrival is not there to take back (only a scribbling peer gets here).
                return Err(Error::Timeout);
            }
            match self
                .state
                .compare_exchange_weak(s, s - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Err(Error::Timeout),
                Err(now) => s = now,
            }
        }
    }
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state.load(Ordering::Relaxed);
        f.debug_struct("Barrier")
            .field("n", &self.n)
            .field("waiting", &(s & COUNT_MASK))
            .field("broken", &(s & BROKEN != 0))
            .field("generation", &generation(s))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn one_leader_per_round_and_no_overtaking() {
        let rounds = if cfg!(miri) { 10 } else { 1_000 };
        let b = Arc::new(Barrier::new(3));
        let arrived = Arc::new(AtomicU64::new(0));
        let leaders = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (b, arrived, leaders) = (b.clone(), arrived.clone(), leaders.clone());
                std::thread::spawn(move || {
                    for round in 0..rounds {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        if b.wait().unwrap().is_leader() {
                            leaders.fetch_add(1, Ordering::SeqCst);
                        }
                        assert!(arrived.load(Ordering::SeqCst) >= 3 * (round + 1));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(leaders.load(Ordering::SeqCst), rounds);
    }

    #[test]
    fn timed_out_participant_withdraws() {
        let b = Barrier::new(2);
        assert!(matches!(
            b.wait_timeout(Duration::from_millis(5)),
            Err(Error::Timeout)
        ));
        assert_eq!(b.n_waiting(), 0);
    }

    #[test]
    fn zeroed_is_uninitialised_not_open() {
        // SAFETY: Barrier is ShmSafe: every bit pattern, all-zero included, is handled.
        let b: Barrier = unsafe { std::mem::zeroed() };
        assert!(matches!(b.wait(), Err(Error::Corrupted { .. })));
        assert!(matches!(
            b.wait_timeout(Duration::from_millis(1)),
            Err(Error::Corrupted { .. })
        ));
    }

    #[test]
    fn abort_breaks_waiters_and_reset_restores() {
        let b = Arc::new(Barrier::new(2));
        let b2 = Arc::clone(&b);
        let waiter = std::thread::spawn(move || b2.wait());
        while b.n_waiting() == 0 {
            std::thread::yield_now();
        }
        b.abort();
        assert!(matches!(waiter.join().unwrap(), Err(Error::BarrierBroken)));
        assert!(b.is_broken());
        assert!(matches!(b.wait(), Err(Error::BarrierBroken)));
        b.reset();
        assert!(!b.is_broken());
        assert_eq!(b.n_waiting(), 0);
        let b2 = Arc::clone(&b);
        let other = std::thread::spawn(move || b2.wait().unwrap());
        let mine = b.wait().unwrap();
        assert_ne!(mine.is_leader(), other.join().unwrap().is_leader());
    }

    #[test]
    fn reset_releases_a_waiter_with_broken() {
        let b = Arc::new(Barrier::new(2));
        let b2 = Arc::clone(&b);
        let waiter = std::thread::spawn(move || b2.wait());
        while b.n_waiting() == 0 {
            std::thread::yield_now();
        }
        b.reset();
        assert!(matches!(waiter.join().unwrap(), Err(Error::BarrierBroken)));
        assert!(!b.is_broken());
    }
}
