//! An eventcount on a shared futex word: lets a consumer sleep until a producer makes
//! progress, without a lock and without lost wake-ups (after folly's `EventCount`).
//!
//! The producer's fast path is a fence and a load: it only touches the futex when someone
//! announced that they are about to sleep. A waiter announces itself, re-checks its
//! condition, and only then sleeps, on the sequence value it read *before* re-checking, so
//! a notification between the re-check and the sleep makes the sleep return at once.
//!
//! A waiter killed while announced leaves `waiters` too high; that only makes notifiers
//! take their slow path (a futex wake) until the count is right again: nobody waits on it.

use crate::facade::{AtomicU32, Deadline, FutexWait, Ordering, fence, spin_hint, wait, wake};

#[repr(C)]
pub(crate) struct EventCount {
    seq: AtomicU32,
    waiters: AtomicU32,
}

impl EventCount {
    pub(crate) fn new() -> EventCount {
        EventCount {
            seq: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
        }
    }

    /// Wakes every waiter. Call after publishing the progress they wait for.
    #[inline]
    pub(crate) fn notify_all(&self) {
        // Pairs with the fence in `prepare_wait`: either the waiter's re-check sees what we
        // published, or we see its announcement here.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) != 0 {
            self.notify_slow();
        }
    }

    #[cold]
    fn notify_slow(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        wake(&self.seq, u32::MAX);
    }

    /// Announces a waiter; re-check the condition after this, then `wait` or `cancel_wait`.
    pub(crate) fn prepare_wait(&self) -> u32 {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let key = self.seq.load(Ordering::SeqCst);
        fence(Ordering::SeqCst);
        key
    }

    pub(crate) fn cancel_wait(&self) {
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sleeps unless notified since `prepare_wait` returned `key`.
    pub(crate) fn wait(&self, key: u32, deadline: Deadline) -> FutexWait {
        let r = wait(&self.seq, key, deadline);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

/// What a blocking operation's attempt found.
pub(crate) enum Attempt<R> {
    /// Done (successfully or with a final error).
    Ready(R),
    /// Not possible yet: wait for the other side.
    Blocked,
}

/// Spins briefly, then sleeps on `ec`, re-running `attempt` each time until it
/// is ready or `deadline` passes. `check` runs about every `CHECK_EVERY` while sleeping, to
/// notice dead peers (and repair what they left half done); it may end the wait.
///
/// Spinning is short and bounded, and there is no `sched_yield` phase: two processes
/// sharing one vCPU would otherwise keep each other off it for whole time slices (with a
/// busy third process on that CPU, four yields made a one-CPU round trip 1.4 ms; without
/// them it is 11 µs). The futex sleep gives the CPU to the peer directly.
pub(crate) fn block_on<R>(
    ec: &EventCount,
    deadline: Deadline,
    mut attempt: impl FnMut() -> Attempt<R>,
    mut check: impl FnMut() -> Option<R>,
) -> Option<R> {
    const SPIN_ROUNDS: u32 = 7; // 1 + 2 + ... + 64 pauses: a few microseconds
    const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(20);
    if deadline.has_passed() {
        // A `try_*` call: exactly one attempt, no spinning.
        return match attempt() {
            Attempt::Ready(r) => Some(r),
            Attempt::Blocked => None,
        };
    }
    for round in 0..SPIN_ROUNDS {
        if let Attempt::Ready(r) = attempt() {
            return Some(r);
        }
        for _ in 0..1u32 << round {
            spin_hint();
        }
    }
    let mut next_check = Deadline::after(CHECK_EVERY);
    loop {
        let key = ec.prepare_wait();
        if let Attempt::Ready(r) = attempt() {
            ec.cancel_wait();
            return Some(r);
        }
        let _ = ec.wait(key, deadline.capped(CHECK_EVERY));
        if let Attempt::Ready(r) = attempt() {
            return Some(r);
        }
        if deadline.has_passed() {
            return None;
        }
        // Checked on a clock, not only when a sleep times out: a stream of wake-ups from
        // other peers must not starve the check for a dead one.
        if next_check.has_passed() {
            if let Some(r) = check() {
                return Some(r);
            }
            next_check = Deadline::after(CHECK_EVERY);
        }
    }
}
