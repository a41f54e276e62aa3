//! The peer-process harness every two-process benchmark shares (`locks.rs`,
//! `queue_vs_pipe.rs`): a control block in shared memory, a peer process forked once per
//! benchmark id (with [`Process`], a daemon, so it dies with the bench process), and the
//! timed round that drives it.
//!
//! A round `r`: the bench process stores `iters` and `arm = r`; the peer (which may be
//! asleep between rounds) wakes, stores `armed = r` and spins until `go = r`, so that its
//! wake-up latency is not measured; the bench process starts the clock, stores `go = r`
//! and does its half; the peer does its half and stores `done = r`; the clock stops when
//! the bench process's half is done and the peer's `done` has been seen.
//!
//! The bench process must be single-threaded when it forks a peer (criterion runs without
//! its rayon feature); [`Peer::fork`] checks, through `Process::fork`.

#![allow(dead_code)] // each bench uses its own subset

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use procshare::{Child, Process, Segment};

/// How long a peer may take to wake up for a round or to finish one before the bench
/// gives up on it.
const PEER_LIMIT: Duration = Duration::from_secs(120);

/// Reports a failure without allocating and aborts: for hot paths that must stay free of
/// formatting code.
#[cold]
pub fn die(msg: &'static str) -> ! {
    // SAFETY: write(2) on stderr with a valid buffer and its exact length; a short or
    // failed write is harmless before an abort.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    std::process::abort()
}

/// Backs off while polling shared memory: spin briefly (fast response), then yield (the
/// other process may need this CPU), then, only if allowed, sleep in short naps (idle
/// between rounds while criterion analyses, without burning a CPU). Allocates nothing:
/// `spin_loop` is an instruction, `yield_now` is sched_yield, `sleep` is nanosleep.
pub struct Backoff {
    step: u32,
}

impl Backoff {
    const SPINS: u32 = 200;
    const YIELDS: u32 = 20_000;

    pub fn new() -> Backoff {
        Backoff { step: 0 }
    }

    /// Waits a little, longer each time; never sleeps unless `may_sleep`.
    pub fn snooze(&mut self, may_sleep: bool) {
        if self.step < Self::SPINS {
            for _ in 0..8 {
                spin_loop();
            }
        } else if !may_sleep || self.step < Self::SPINS + Self::YIELDS {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.step = self.step.saturating_add(1);
    }
}

/// How the bench process drives the peer (see the module docs for the protocol). Lives
/// at offset 0 of its own segment ([`Rounds`]), apart from anything being measured.
#[repr(C)]
pub struct Control {
    arm: AtomicU64,
    iters: AtomicU64,
    armed: AtomicU64,
    go: AtomicU64,
    done: AtomicU64,
    /// Non-zero: the peer exits.
    quit: AtomicU32,
}

/// The segment holding a [`Control`]: one per benchmark id.
pub struct Rounds {
    segment: Segment,
}

impl Rounds {
    pub fn new() -> Rounds {
        Rounds {
            segment: Segment::anonymous(4096).expect("creating the control segment"),
        }
    }

    pub fn control(&self) -> &Control {
        // SAFETY: the data area is 64-byte aligned and 4096 bytes, larger than a Control;
        // its bytes start zeroed (valid for atomics) and both processes only access them
        // through atomics; the reference lives no longer than `self`.
        unsafe { &*self.segment.as_ptr().cast::<Control>() }
    }
}

/// Tells the peer to exit when dropped, so a panicking bench process never leaves a peer
/// *thread* waiting for a round (a peer process is killed by its handle's drop anyway).
pub struct QuitOnDrop<'a>(pub &'a Control);

impl Drop for QuitOnDrop<'_> {
    fn drop(&mut self) {
        self.0.quit.store(1, Ordering::Release);
    }
}

/// The peer's half of one round of `iters`, over its state `S` (its end of the transport,
/// the lock under test, its preallocated buffers). Should not allocate in its loops, so
/// that it measures the transport and not the allocator.
pub type PeerFn<S> = fn(&mut S, u64) -> Result<(), &'static str>;

/// The peer's loop: runs its half of each round until told to quit (`Ok`) or a round
/// fails (`Err`, with the round's reason). Touches only atomics in the control segment,
/// `Backoff`, and `round`. Call [`peer_start`] before starting the peer, for `seen`.
pub fn peer_main<S>(
    control: &Control,
    state: &mut S,
    round: PeerFn<S>,
    mut seen: u64,
) -> Result<(), &'static str> {
    loop {
        let mut backoff = Backoff::new();
        let current = loop {
            if control.quit.load(Ordering::Acquire) != 0 {
                return Ok(());
            }
            let arm = control.arm.load(Ordering::Acquire);
            if arm != seen {
                break arm;
            }
            backoff.snooze(true);
        };
        seen = current;
        let iters = control.iters.load(Ordering::Relaxed);
        control.armed.store(current, Ordering::Release);
        let mut backoff = Backoff::new();
        while control.go.load(Ordering::Acquire) != current {
            if control.quit.load(Ordering::Acquire) != 0 {
                return Ok(());
            }
            backoff.snooze(false);
        }
        round(state, iters)?;
        control.done.store(current, Ordering::Release);
    }
}

/// The last round the peer must not run again: read before the peer starts.
pub fn peer_start(control: &Control) -> u64 {
    control.arm.load(Ordering::Relaxed)
}

/// Waits (spinning, then yielding; never sleeping: a round is being set up or timed)
/// until `word` holds `round`, calling `check_peer` now and then.
fn wait_for(word: &AtomicU64, round: u64, what: &str, check_peer: &mut impl FnMut()) {
    let start = Instant::now();
    let mut backoff = Backoff::new();
    let mut polls = 0u64;
    while word.load(Ordering::Acquire) != round {
        polls += 1;
        if polls & 4095 == 0 {
            check_peer();
            assert!(
                start.elapsed() < PEER_LIMIT,
                "the peer did not {what} within {PEER_LIMIT:?}"
            );
        }
        backoff.snooze(false);
    }
}

/// One measured round of `iters`: arms the peer and waits until it is awake, then times
/// this process's half, `mine(iters)`, from the go signal until the peer has finished its
/// half too. Returns the time and what `mine` returned. `check_peer` panics if the peer
/// is gone (called while waiting for it).
pub fn timed_round<T>(
    control: &Control,
    iters: u64,
    mine: impl FnOnce(u64) -> T,
    check_peer: &mut impl FnMut(),
) -> (Duration, T) {
    let round = control.arm.load(Ordering::Relaxed) + 1;
    control.iters.store(iters, Ordering::Relaxed);
    control.arm.store(round, Ordering::Release);
    wait_for(&control.armed, round, "wake up", check_peer);

    let start = Instant::now();
    control.go.store(round, Ordering::Release);
    let out = std::hint::black_box(mine(iters));
    wait_for(&control.done, round, "finish its round", check_peer);
    (start.elapsed(), out)
}

/// A peer process: forked once per benchmark id, running [`peer_main`] over its state
/// until [`finish`](Peer::finish). A daemon child: it dies with the bench process, even
/// a killed one, and dropping the handle (a panicking bench) kills it.
pub struct Peer {
    child: Child<()>,
}

impl Peer {
    /// Forks the peer with `state` moved into it.
    ///
    /// # Panics
    ///
    /// If the bench process has other threads (`Process::fork` refuses) or fork fails.
    pub fn fork<S>(control: &Control, mut state: S, round: PeerFn<S>) -> Peer {
        let seen = peer_start(control);
        let child = Process::builder()
            .name("bench peer")
            .daemon(true)
            .fork(move || {
                if let Err(what) = peer_main(control, &mut state, round, seen) {
                    // Only the bench process going away mid-round gets here.
                    panic!("the peer's round failed: {what}");
                }
            })
            .expect("forking the peer (the bench process must be single-threaded)");
        Peer { child }
    }

    /// Panics, saying why, if the peer has ended (it never does before `finish`).
    pub fn check(&mut self, id: &str) {
        if let Some(outcome) = self.child.try_join() {
            panic!("{id}: the peer process exited mid-round: {outcome:?}");
        }
    }

    /// Tells the peer to quit and checks it ended cleanly.
    pub fn finish(mut self, control: &Control, id: &str) {
        control.quit.store(1, Ordering::Release);
        match self.child.join_timeout(PEER_LIMIT) {
            Ok(()) => {}
            Err(e) => panic!("{id}: the peer ended badly: {e}"),
        }
    }
}
