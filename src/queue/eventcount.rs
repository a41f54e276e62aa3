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

    /// How many waiters are announced (for tests).
    pub(crate) fn waiters(&self) -> u32 {
        self.waiters.load(Ordering::SeqCst)
    }

    /// Wakes every waiter. Call after publishing the progress they wait for.
    #[inline]
    pub(crate) fn notify_all(&self) {
        // A read-modify-write, not a load: RMWs on `waiters` are totally ordered, so
        // either ours comes after a waiter's announcement (and sees it), or the waiter's
        // comes after ours and, acquiring from it, its re-check sees what we published
        // before it. On x86 this is one `lock xadd` on a line only we write while nobody
        // waits, cheaper than the `mfence` a fence-plus-load would cost on every message.
        if self.waiters.fetch_add(0, Ordering::SeqCst) != 0 {
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

/// How long a waiter polls before it sleeps, when it has a CPU of its own. A futex sleep
/// and wake-up costs ~14 µs on these VMs while a peer on another CPU answers in well under
/// a microsecond, so a few microseconds of polling usually saves the sleep.
#[cfg(not(loom))]
const SPIN_BUDGET: std::time::Duration = std::time::Duration::from_micros(8);

/// Polls `attempt` for up to [`SPIN_BUDGET`], unless this process may run on one CPU only
/// (`taskset -c 0`): then the peer it waits for needs this very CPU, every poll delays it,
/// and the futex sleep is the fastest way to hand the CPU over.
#[cfg(not(loom))]
fn spin<R>(attempt: &mut impl FnMut() -> Attempt<R>) -> Option<R> {
    use std::sync::atomic::AtomicUsize;
    static CPUS: AtomicUsize = AtomicUsize::new(0);
    let cpus = match CPUS.load(Ordering::Relaxed) {
        0 => {
            let n = crate::cpu_count();
            CPUS.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    };
    if let Attempt::Ready(r) = attempt() {
        return Some(r);
    }
    if cpus < 2 {
        return None;
    }
    let start = std::time::Instant::now();
    loop {
        for _ in 0..16 {
            spin_hint();
        }
        if let Attempt::Ready(r) = attempt() {
            return Some(r);
        }
        if start.elapsed() > SPIN_BUDGET {
            return None;
        }
    }
}

/// Under loom: a few polls, deterministically (loom replays each interleaving exactly).
#[cfg(loom)]
fn spin<R>(attempt: &mut impl FnMut() -> Attempt<R>) -> Option<R> {
    for _ in 0..2 {
        if let Attempt::Ready(r) = attempt() {
            return Some(r);
        }
        spin_hint();
    }
    None
}

/// What a blocking operation's attempt found.
pub(crate) enum Attempt<R> {
    /// Done (successfully or with a final error).
    Ready(R),
    /// Not possible yet: wait for the other side.
    Blocked,
}

/// Polls briefly (see [`spin`]), then sleeps on `ec`, re-running `attempt` each time until it
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
    const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(20);
    if deadline.has_passed() {
        // A `try_*` call: exactly one attempt, no spinning.
        return match attempt() {
            Attempt::Ready(r) => Some(r),
            Attempt::Blocked => None,
        };
    }
    if let Some(r) = spin(&mut attempt) {
        return Some(r);
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
