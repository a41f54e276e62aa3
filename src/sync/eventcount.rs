//! An eventcount on a shared futex word: lets a consumer sleep until a producer makes
//! progress, without a lock and without lost wake-ups (after folly's `EventCount`).
//!
//! The producer's fast path is one read-modify-write of the `waiters` word: it only
//! touches the futex when someone announced that they are about to sleep. A waiter
//! announces itself, re-checks its condition, and only then sleeps, on the sequence value
//! it read *before* re-checking, so a notification between the re-check and the sleep
//! makes the sleep return at once.
//!
//! # The shared words
//!
//! ```text
//!  seq:      [sequence (32)]                         futex word; +1 per slow notify
//!  waiters:  [epoch (16)][announced waiters (16)]
//! ```
//!
//! An announcement lives for one sleep. A notifier that finds announced waiters does not
//! wait for them to take their announcements back: it **erases them all** (starts a new
//! epoch with a count of 0), then bumps `seq` and wakes every sleeper. A woken waiter
//! that still has to wait announces itself again (in the new epoch); a waiter that comes
//! back from an erased epoch does not decrement. So:
//!
//! * a waiter killed while announced (asleep, or between announcing and sleeping) leaves
//!   at most one stale count, and the next notify erases it: that notify pays one futex
//!   wake that finds nobody, and every later one takes the fast path again. The count
//!   never stays high for the life of the queue;
//! * while a woken sleeper is on its way back, notifies take the fast path (its
//!   announcement is already erased): one futex wake per sleep episode, not one per
//!   message (no wake convoy);
//! * no wake-up is lost. A waiter checks, after reading the key it will sleep on, that its
//!   epoch is still current. All operations on both words are sequentially consistent;
//!   if the erasing notify came before that check, the waiter sees the new epoch and
//!   announces again; if it came after, the notify's `seq` increment also comes after the
//!   key was read, so the waiter's futex wait returns at once (or is woken by the wake
//!   that follows the increment).
//!
//! | state a SIGKILL can leave | effect | repaired by |
//! |---|---|---|
//! | count includes a dead waiter | next notify takes the slow path once | that notify's erase |
//! | `seq` bumped, wake not issued | sleepers time out (every sleep is capped at 20 ms) | their next attempt |
//! | epoch erased, `seq` not bumped | a waiter that slept on the old key, uncounted, sleeps until its 20 ms cap | its cap |
//!
//! The last row is the only way a wake-up can be delayed, and only by a notifier's death
//! between two adjacent stores; every sleep is bounded, so nothing hangs.
//!
//! # Who waits on it
//!
//! The queues (`not_empty`/`not_full` of every ring and of the byte queue) through
//! [`block_on`]. [`Condvar`](crate::Condvar), [`Event`](crate::Event) and
//! [`Semaphore`](crate::Semaphore) keep their own waiter counts, for three reasons that
//! rebuilding them on this type would break a guarantee of theirs:
//!
//! * Erasing every announcement fits a notification that wakes *everyone*. A
//!   `Semaphore::release` or `Condvar::notify_one` wakes one sleeper: erasing the others'
//!   announcements would leave them uncounted, so the next release would skip its wake and
//!   they would sleep out their `RECHECK` slice (up to 50 ms per release under
//!   contention); decrementing by one instead lets the woken waiter's own `cancel_wait`
//!   take a second count off, with the same effect. Their own counts can only be too high
//!   (a dead waiter costs a spare wake syscall), never too low.
//! * `Event` and `Semaphore` sleep on their state word itself (flag and generation; the
//!   permit count), so changing the state *is* the notification; an eventcount sleeps on
//!   its own sequence word, which would make an `Event` 12 bytes and a `Semaphore` 16
//!   instead of the documented 8 and 12 (`sync::tests::layouts_are_as_documented`).
//! * This type's atomics go through the loom switch, while those three have `const fn`
//!   constructors (for statics and in-place initialisation), which loom's atomics have
//!   not.
//!
//! A shared primitive for all of them would be a waiter word with epochs over a futex
//! word the caller owns, erasing on wake-all and counting down on wake-one only for
//! waiters that prove they were the one woken; that is a new protocol, to be designed
//! with its loom model, not a refactor.

use crate::loom_switch::{AtomicU32, Deadline, FutexWait, Ordering, fence, spin_hint, wait, wake};

const COUNT_MASK: u32 = 0xffff;
const EPOCH_ONE: u32 = 1 << 16;

#[repr(C)]
pub(crate) struct EventCount {
    seq: AtomicU32,
    waiters: AtomicU32,
}

/// What `prepare_wait` hands the waiter: the key to sleep on and the epoch it announced in.
#[derive(Clone, Copy)]
pub(crate) struct Ticket {
    key: u32,
    epoch: u32,
}

impl EventCount {
    pub(crate) fn new() -> EventCount {
        EventCount {
            seq: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
        }
    }

    /// How many waiters are announced in the current epoch (for tests).
    #[cfg(any(test, loom, feature = "test-hooks"))]
    pub(crate) fn waiters(&self) -> u32 {
        self.waiters.load(Ordering::SeqCst) & COUNT_MASK
    }

    /// Wakes every waiter. Call after publishing the progress they wait for.
    #[inline]
    pub(crate) fn notify_all(&self) {
        // A read-modify-write, not a load: RMWs on `waiters` are totally ordered, so
        // either ours comes after a waiter's announcement (and sees it), or the waiter's
        // comes after ours and, acquiring from it, its re-check sees what we published
        // before it. On x86 this is one `lock xadd` on a line only we write while nobody
        // waits, cheaper than the `mfence` a fence-plus-load would cost on every message.
        let w = self.waiters.fetch_add(0, Ordering::SeqCst);
        if w & COUNT_MASK != 0 {
            self.notify_slow(w);
        }
    }

    /// Whether a waiter is announced, read with the same read-modify-write as
    /// [`notify_all`](EventCount::notify_all), so the same argument holds: a caller that
    /// published progress before this and gets `false` needs no wake-up, as every waiter
    /// announced after it sees that progress when it re-checks. For a notifier that only
    /// does the work a wake-up needs when someone waits (and otherwise leaves it to the
    /// waiters' own attempts).
    #[inline]
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiters.fetch_add(0, Ordering::SeqCst) & COUNT_MASK != 0
    }

    #[cold]
    fn notify_slow(&self, mut w: u32) {
        // SYNC POINT: erase every announcement (a new epoch, count 0), then bump the key
        // and wake. See the module docs for why no wake-up is lost.
        loop {
            if w & COUNT_MASK == 0 {
                return; // someone else erased (and will wake), or the waiters left
            }
            let erased = (w & !COUNT_MASK).wrapping_add(EPOCH_ONE);
            match self
                .waiters
                .compare_exchange(w, erased, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        self.seq.fetch_add(1, Ordering::SeqCst);
        wake(&self.seq, u32::MAX);
    }

    /// Announces a waiter; re-check the condition after this, then `wait` or `cancel_wait`.
    pub(crate) fn prepare_wait(&self) -> Ticket {
        loop {
            let w = self.waiters.fetch_add(1, Ordering::SeqCst);
            let key = self.seq.load(Ordering::SeqCst);
            // SYNC POINT: still announced? If a notify erased our epoch before this load,
            // announce again; if after, its `seq` bump comes after our key.
            let now = self.waiters.load(Ordering::SeqCst);
            if now & !COUNT_MASK == w & !COUNT_MASK {
                fence(Ordering::SeqCst);
                return Ticket {
                    key,
                    epoch: w & !COUNT_MASK,
                };
            }
        }
    }

    /// Takes the announcement back, unless a notify already erased it.
    pub(crate) fn cancel_wait(&self, ticket: Ticket) {
        let _ = self
            .waiters
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w & !COUNT_MASK == ticket.epoch && w & COUNT_MASK != 0).then(|| w - 1)
            });
    }

    /// Sleeps unless notified since `prepare_wait` returned `ticket`.
    pub(crate) fn wait(&self, ticket: Ticket, deadline: Deadline) -> FutexWait {
        let r = wait(&self.seq, ticket.key, deadline);
        self.cancel_wait(ticket);
        r
    }
}

/// The eventcount protocol as the loom models in `tests/loom.rs` drive it; not API.
#[cfg(loom)]
#[doc(hidden)]
pub struct LoomEventCount(EventCount);

#[cfg(loom)]
impl Default for LoomEventCount {
    fn default() -> Self {
        LoomEventCount(EventCount::new())
    }
}

#[cfg(loom)]
impl LoomEventCount {
    /// See [`EventCount::notify_all`].
    pub fn notify_all(&self) {
        self.0.notify_all();
    }

    /// Sleeps (without a deadline, so a lost wake-up is a deadlock loom reports) until
    /// `ready()`, announcing and re-checking as `block_on` does.
    pub fn wait_until(&self, ready: impl Fn() -> bool) {
        loop {
            if ready() {
                return;
            }
            let ticket = self.0.prepare_wait();
            if ready() {
                self.0.cancel_wait(ticket);
                return;
            }
            let _ = self.0.wait(ticket, Deadline::NEVER);
        }
    }

    /// See [`EventCount::has_waiters`].
    pub fn has_waiters(&self) -> bool {
        self.0.has_waiters()
    }

    /// A waiter killed after announcing itself: its announcement is never taken back.
    pub fn announce_and_die(&self) {
        let _ = self.0.prepare_wait();
    }

    /// Announced waiters in the current epoch.
    pub fn waiters(&self) -> u32 {
        self.0.waiters()
    }
}

/// How long a waiter polls before it sleeps, when it has a CPU of its own. A futex sleep
/// and wake-up costs tens of times what a peer running on another CPU takes to answer
/// (figures in BENCHMARKS.md), so a few microseconds of polling usually saves the sleep.
#[cfg(not(loom))]
const SPIN_BUDGET: std::time::Duration = std::time::Duration::from_micros(8);

/// Polls `attempt` for up to [`SPIN_BUDGET`], unless this process may run on one CPU only
/// (`taskset -c 0`): then the peer it waits for needs this very CPU, every poll delays it,
/// and the futex sleep is the fastest way to hand the CPU over.
///
/// `polled`: the caller's own attempt has just missed, so the first poll here comes after
/// a pause (two polls back to back would only pull the peer's cache line away twice).
#[cfg(not(loom))]
fn spin<R>(attempt: &mut impl FnMut() -> Attempt<R>, polled: bool) -> Option<R> {
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
    if !polled {
        if let Attempt::Ready(r) = attempt() {
            return Some(r);
        }
    }
    if cpus < 2 {
        return None;
    }
    let start = std::time::Instant::now();
    let mut polls = 0u32;
    loop {
        // Backing off: 4, 4, 8, 8, then 16 pauses between polls. A reply a peer on
        // another CPU sends at once is seen within a few pauses, so a round trip pays
        // little poll granularity; a longer wait polls the line the peer writes less and
        // less often, so its stores do not each pull the line back. A fixed 16 made round
        // trips several times slower; starting at 1 pause made them faster still but
        // cost a streaming consumer (one that keeps catching up) much of its batching.
        // The compromise is measured in BENCHMARKS.md ("Polling").
        for _ in 0..4u32 << (polls / 2).min(2) {
            spin_hint();
        }
        if let Attempt::Ready(r) = attempt() {
            return Some(r);
        }
        polls = polls.wrapping_add(1);
        if polls % 16 == 0 && start.elapsed() > SPIN_BUDGET {
            return None;
        }
    }
}

/// Under loom: a few polls, deterministically (loom replays each interleaving exactly).
#[cfg(loom)]
fn spin<R>(attempt: &mut impl FnMut() -> Attempt<R>, _polled: bool) -> Option<R> {
    for _ in 0..2 {
        if let Attempt::Ready(r) = attempt() {
            return Some(r);
        }
        spin_hint();
    }
    None
}

/// How often a waiter (or a non-blocking call that found nothing to do) runs its slow
/// check for dead peers.
pub(crate) const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// Rate-limits the dead-peer check of non-blocking calls to one per [`CHECK_EVERY`] per
/// handle: one monotonic clock read (vDSO, ~20 ns) on the empty (full) path, nothing on
/// the success path. Process-local; a fresh clock is due at once.
pub(crate) struct CheckClock(#[cfg_attr(loom, allow(dead_code))] std::sync::atomic::AtomicU64);

impl CheckClock {
    pub(crate) fn new() -> CheckClock {
        CheckClock(std::sync::atomic::AtomicU64::new(0))
    }

    /// Whether a check is due; if so, the next one is due [`CHECK_EVERY`] from now.
    #[cfg(not(loom))]
    #[inline]
    pub(crate) fn due(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = crate::sys::monotonic_now().as_nanos() as u64;
        if now < self.0.load(Relaxed) {
            return false;
        }
        self.0.store(now + CHECK_EVERY.as_nanos() as u64, Relaxed);
        true
    }

    /// Under loom: never (a clock would make executions non-deterministic, and the checks
    /// read /proc, which loom does not model).
    #[cfg(loom)]
    pub(crate) fn due(&self) -> bool {
        false
    }
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
/// busy third process on that CPU, a few yields made a one-CPU round trip two orders of
/// magnitude slower). The futex sleep gives the CPU to the peer directly.
pub(crate) fn block_on<R>(
    ec: &EventCount,
    deadline: Deadline,
    attempt: impl FnMut() -> Attempt<R>,
    check: impl FnMut() -> Option<R>,
) -> Option<R> {
    block_on_inner(ec, deadline, attempt, check, false)
}

/// [`block_on`] for a caller whose own quick attempt (a narrower fast path, or the same
/// one) has just missed: a `try_*` call (deadline passed) still gets its one `attempt`,
/// anything else starts polling after a pause rather than at once.
pub(crate) fn block_on_after_miss<R>(
    ec: &EventCount,
    deadline: Deadline,
    attempt: impl FnMut() -> Attempt<R>,
    check: impl FnMut() -> Option<R>,
) -> Option<R> {
    block_on_inner(ec, deadline, attempt, check, true)
}

fn block_on_inner<R>(
    ec: &EventCount,
    deadline: Deadline,
    mut attempt: impl FnMut() -> Attempt<R>,
    mut check: impl FnMut() -> Option<R>,
    polled: bool,
) -> Option<R> {
    if deadline.has_passed() {
        // A `try_*` call: exactly one attempt, no spinning.
        return match attempt() {
            Attempt::Ready(r) => Some(r),
            Attempt::Blocked => None,
        };
    }
    if let Some(r) = spin(&mut attempt, polled) {
        return Some(r);
    }
    let mut next_check = Deadline::after(CHECK_EVERY);
    loop {
        let ticket = ec.prepare_wait();
        if let Attempt::Ready(r) = attempt() {
            ec.cancel_wait(ticket);
            return Some(r);
        }
        let _ = ec.wait(ticket, deadline.capped(CHECK_EVERY));
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_stale_announcement_is_erased_by_the_next_notify() {
        let ec = EventCount::new();
        let _dead = ec.prepare_wait(); // a waiter that never comes back
        assert_eq!(ec.waiters(), 1);
        ec.notify_all();
        assert_eq!(ec.waiters(), 0, "erased");
        ec.notify_all();
        assert_eq!(ec.waiters(), 0);
    }

    #[test]
    fn an_erased_waiter_does_not_decrement_the_new_epoch() {
        let ec = EventCount::new();
        let old = ec.prepare_wait();
        ec.notify_all(); // erases `old`
        let new = ec.prepare_wait();
        assert_eq!(ec.waiters(), 1);
        // `old`'s key is stale, so its wait returns at once, without touching `new`'s count.
        assert_eq!(
            ec.wait(old, Deadline::after(std::time::Duration::from_secs(5))),
            FutexWait::Woken
        );
        assert_eq!(ec.waiters(), 1);
        ec.cancel_wait(new);
        assert_eq!(ec.waiters(), 0);
    }

    #[test]
    fn a_notify_wakes_a_sleeper() {
        let ec = std::sync::Arc::new(EventCount::new());
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = {
            let (ec, flag) = (ec.clone(), flag.clone());
            std::thread::spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    let ticket = ec.prepare_wait();
                    if flag.load(Ordering::SeqCst) {
                        ec.cancel_wait(ticket);
                        break;
                    }
                    let _ = ec.wait(ticket, Deadline::after(std::time::Duration::from_secs(5)));
                }
            })
        };
        flag.store(true, Ordering::SeqCst);
        ec.notify_all();
        t.join().unwrap();
        assert_eq!(ec.waiters(), 0);
    }
}
