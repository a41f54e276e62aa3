//! Process-shared lock benchmarks: procshare's robust [`procshare::Mutex`] against the
//! locks people use today for the same job.
//!
//! Every lock guards a `u64` counter that lives in shared memory (a procshare segment,
//! inherited by `fork`), and one iteration is "lock, increment the counter, unlock".
//!
//! * `lock_uncontended/*`: one process, one thread, lock+increment+unlock in a loop. This
//!   is the fast path every user pays on every call. One element per iteration.
//! * `lock_contended_2proc/*`: two real processes (this one and a peer forked once per
//!   benchmark id, see `benches/common`) both hammer the same lock and counter. Each
//!   measured batch of `iters` is `2 * iters` increments (`iters` in each process), timed
//!   from the moment the (already awake) peer is told to start until both have finished,
//!   then checked: the counter must have advanced by exactly `2 * iters`, or mutual
//!   exclusion is broken and the bench panics. Two elements per iteration.
//!
//! The ids, in both groups:
//!
//! * `procshare_mutex`: `procshare::Mutex<u64>` (inside a `procshare::Shared` when
//!   uncontended; initialised in place in the segment that also holds the control block
//!   when contended).
//! * `pthread_robust`: a glibc `pthread_mutex_t` initialised in place in shared memory with
//!   `PTHREAD_PROCESS_SHARED` and `PTHREAD_MUTEX_ROBUST`, the lock procshare's must beat
//!   or match (both survive a dead owner).
//! * `pthread_pshared`: the same without the robust attribute (a dead owner hangs it).
//! * `raw_sync`: `raw_sync::locks::Mutex` (a process-shared pthread mutex behind a boxed
//!   trait object, not robust).
//! * `atomic_fetch_add`: `AtomicU64::fetch_add` on the shared counter, with no lock at all:
//!   the floor no lock can go under.
//!
//! Run it with
//!
//! ```text
//! cargo bench --bench locks
//! # short run (CI):
//! cargo bench --bench locks -- --warm-up-time 1 --measurement-time 2
//! # one group or one id:
//! cargo bench --bench locks -- lock_contended_2proc/pthread_robust
//! ```
//!
//! The contended numbers need two free CPUs to mean anything; on a busy or 2-vCPU machine
//! run it twice and compare.

mod common;

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Peer, Rounds, die};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use procshare::{Mutex, Segment, Shared};
use raw_sync::locks::{LockImpl, LockInit, Mutex as RawSyncMutex};

/// The benchmark ids, in both groups.
const IDS: [&str; 5] = [
    "procshare_mutex",
    "pthread_robust",
    "pthread_pshared",
    "raw_sync",
    "atomic_fetch_add",
];

/// Bytes in each benchmark's shared segment.
const SEGMENT_LEN: usize = 4096;
/// Where the lock and its counter start in the segment (the peer's control block lives
/// in a segment of its own, `common::Rounds`).
const LOCK_OFFSET: usize = 128;
/// Where a pthread (or raw_sync) lock's counter lives, relative to the lock: right after
/// the 40-byte `pthread_mutex_t`, in the same cache line, as a `Mutex<u64>` would lay out.
const PTHREAD_COUNTER_OFFSET: usize = 48;

const _: () = {
    assert!(size_of::<libc::pthread_mutex_t>() <= PTHREAD_COUNTER_OFFSET);
    assert!(PTHREAD_COUNTER_OFFSET + size_of::<u64>() <= 64);
    assert!(size_of::<Mutex<u64>>() <= 64);
};

/// A lock under test, together with the `u64` counter in shared memory it guards.
trait CounterLock {
    /// Lock, increment the counter by one, unlock. The forked peer calls it in its loop,
    /// which should not allocate.
    fn increment(&self);
    /// The counter, read under the lock.
    fn get(&self) -> u64;
}

struct ProcshareLock<'a>(&'a Mutex<u64>);

impl CounterLock for ProcshareLock<'_> {
    #[inline]
    fn increment(&self) {
        // Poison cannot happen here (nobody panics or dies holding it); ignore it rather
        // than add a panic path to the peer.
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn get(&self) -> u64 {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A glibc process-shared mutex initialised in place in a segment.
struct PthreadLock<'a> {
    mutex: *mut libc::pthread_mutex_t,
    counter: *mut u64,
    _arena: PhantomData<&'a Arena>,
}

impl<'a> PthreadLock<'a> {
    /// Initialises a process-shared (and, if `robust`, robust) mutex at the arena's lock
    /// offset. The mutex is never moved afterwards: it is only ever used through the
    /// pointer into the mapping.
    fn init_in_place(arena: &'a Arena, robust: bool) -> Self {
        let mutex = arena.lock_area().cast::<libc::pthread_mutex_t>();
        // SAFETY: the counter offset is inside the segment (checked by the const asserts
        // and SEGMENT_LEN), 8-byte aligned, and the segment outlives `'a`.
        let counter = unsafe { arena.lock_area().add(PTHREAD_COUNTER_OFFSET) }.cast::<u64>();
        let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: `attr` is initialised by pthread_mutexattr_init before any other use and
        // destroyed after the mutex is initialised. `mutex` points to
        // size_of::<pthread_mutex_t>() zeroed bytes in a MAP_SHARED mapping, 128-byte
        // aligned, that nothing else uses and that stays mapped at this address for `'a`;
        // no other process has a copy yet (the peer is forked later).
        unsafe {
            check(
                libc::pthread_mutexattr_init(attr.as_mut_ptr()),
                "pthread_mutexattr_init",
            );
            check(
                libc::pthread_mutexattr_setpshared(attr.as_mut_ptr(), libc::PTHREAD_PROCESS_SHARED),
                "pthread_mutexattr_setpshared",
            );
            if robust {
                check(
                    libc::pthread_mutexattr_setrobust(
                        attr.as_mut_ptr(),
                        libc::PTHREAD_MUTEX_ROBUST,
                    ),
                    "pthread_mutexattr_setrobust",
                );
            }
            check(
                libc::pthread_mutex_init(mutex, attr.as_ptr()),
                "pthread_mutex_init",
            );
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
        }
        PthreadLock {
            mutex,
            counter,
            _arena: PhantomData,
        }
    }
}

fn check(rc: libc::c_int, what: &str) {
    assert_eq!(rc, 0, "{what} failed with error {rc}");
}

impl CounterLock for PthreadLock<'_> {
    #[inline]
    fn increment(&self) {
        // SAFETY: `mutex` was initialised in place by `init_in_place` and stays mapped for
        // the lifetime of `self`; lock and unlock pair up on this thread, and the counter
        // is only touched while the lock is held.
        unsafe {
            if libc::pthread_mutex_lock(self.mutex) != 0 {
                die("pthread_mutex_lock failed\n");
            }
            *self.counter += 1;
            libc::pthread_mutex_unlock(self.mutex);
        }
    }

    fn get(&self) -> u64 {
        // SAFETY: as for `increment`.
        unsafe {
            if libc::pthread_mutex_lock(self.mutex) != 0 {
                die("pthread_mutex_lock failed\n");
            }
            let value = *self.counter;
            libc::pthread_mutex_unlock(self.mutex);
            value
        }
    }
}

impl Drop for PthreadLock<'_> {
    fn drop(&mut self) {
        // SAFETY: the mutex is initialised, unlocked (every increment unlocks) and no
        // process uses it any more: the peer has been reaped before the lock is dropped.
        unsafe { libc::pthread_mutex_destroy(self.mutex) };
    }
}

/// raw_sync's mutex, created in the segment with its data pointer at the counter.
struct RawSyncLock<'a> {
    lock: Box<dyn LockImpl>,
    _arena: PhantomData<&'a Arena>,
}

impl<'a> RawSyncLock<'a> {
    fn init_in_place(arena: &'a Arena) -> Self {
        let mem = arena.lock_area();
        // SAFETY: the counter offset is inside the segment (see the const asserts).
        let data = unsafe { mem.add(PTHREAD_COUNTER_OFFSET) };
        // SAFETY: `mem` points to zeroed shared memory, 128-byte aligned, with room for the
        // lock before `data`, unused by anything else and mapped for `'a`; `data` points to
        // the 8-byte aligned counter right after it.
        let (lock, used) = unsafe { RawSyncMutex::new(mem, data) }.expect("raw_sync Mutex::new");
        assert!(
            used <= PTHREAD_COUNTER_OFFSET,
            "raw_sync lock overlaps its data"
        );
        RawSyncLock {
            lock,
            _arena: PhantomData,
        }
    }
}

impl CounterLock for RawSyncLock<'_> {
    #[inline]
    fn increment(&self) {
        match self.lock.lock() {
            // SAFETY: the guard's pointer is the 8-byte aligned counter in the mapping,
            // accessed only while the lock is held.
            Ok(guard) => unsafe { *(*guard).cast::<u64>() += 1 },
            Err(_) => die("raw_sync lock failed\n"),
        }
    }

    fn get(&self) -> u64 {
        let guard = self.lock.lock().expect("raw_sync lock");
        // SAFETY: as for `increment`.
        unsafe { *(*guard).cast::<u64>() }
    }
}

/// No lock: the counter is an atomic in shared memory.
struct AtomicCounter<'a>(&'a AtomicU64);

impl CounterLock for AtomicCounter<'_> {
    #[inline]
    fn increment(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// One shared segment: the lock under test at `LOCK_OFFSET`.
struct Arena {
    segment: Segment,
}

impl Arena {
    fn new() -> Arena {
        Arena {
            segment: Segment::anonymous(SEGMENT_LEN).expect("creating a shared segment"),
        }
    }

    fn lock_area(&self) -> *mut u8 {
        // SAFETY: LOCK_OFFSET + 64 <= SEGMENT_LEN, so the result is inside the mapping.
        unsafe { self.segment.as_ptr().add(LOCK_OFFSET) }
    }

    /// The lock area as a zeroed (hence unlocked, count 0) `procshare::Mutex<u64>`.
    fn procshare_mutex(&self) -> &Mutex<u64> {
        // SAFETY: the lock area is 128-byte aligned, large enough, zeroed and used by
        // nothing else; all-zero is a valid unlocked `Mutex<u64>` (it is ShmSafe), and the
        // mutex is designed to be shared by reference across processes.
        unsafe { &*self.lock_area().cast::<Mutex<u64>>() }
    }

    /// The lock area as a zeroed `AtomicU64`.
    fn atomic(&self) -> &AtomicU64 {
        // SAFETY: aligned, in bounds, zeroed, only ever accessed atomically.
        unsafe { &*self.lock_area().cast::<AtomicU64>() }
    }
}

/// Something to do with each lock under test; generic so every lock is monomorphised.
trait LockVisitor {
    fn visit<L: CounterLock>(&mut self, id: &str, arena: &Arena, lock: &L);
}

/// Builds the lock `id` in a fresh arena and hands it to `visitor`.
fn with_lock<V: LockVisitor>(id: &str, visitor: &mut V) {
    let arena = Arena::new();
    match id {
        "procshare_mutex" => visitor.visit(id, &arena, &ProcshareLock(arena.procshare_mutex())),
        "pthread_robust" => visitor.visit(id, &arena, &PthreadLock::init_in_place(&arena, true)),
        "pthread_pshared" => {
            visitor.visit(id, &arena, &PthreadLock::init_in_place(&arena, false));
        }
        "raw_sync" => visitor.visit(id, &arena, &RawSyncLock::init_in_place(&arena)),
        "atomic_fetch_add" => visitor.visit(id, &arena, &AtomicCounter(arena.atomic())),
        _ => unreachable!("unknown lock id {id}"),
    }
}

struct Uncontended<'g, 'c> {
    group: &'g mut BenchmarkGroup<'c, WallTime>,
}

impl LockVisitor for Uncontended<'_, '_> {
    fn visit<L: CounterLock>(&mut self, id: &str, _arena: &Arena, lock: &L) {
        bench_uncontended(self.group, id, lock);
    }
}

fn bench_uncontended<L: CounterLock>(group: &mut BenchmarkGroup<'_, WallTime>, id: &str, lock: &L) {
    group.bench_function(id, |b| b.iter(|| lock.increment()));
}

fn lock_uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("lock_uncontended");
    group.throughput(Throughput::Elements(1));

    // procshare's mutex the way users hold one: in a `Shared`.
    let shared = Shared::new(Mutex::new(0u64)).expect("creating a Shared<Mutex<u64>>");
    bench_uncontended(&mut group, IDS[0], &ProcshareLock(&shared));

    let mut visitor = Uncontended { group: &mut group };
    for id in &IDS[1..] {
        with_lock(id, &mut visitor);
    }
    group.finish();
}

/// The peer's half of a round: its `iters` increments.
fn peer_round<L: CounterLock>(lock: &mut &L, iters: u64) -> Result<(), &'static str> {
    for _ in 0..iters {
        lock.increment();
    }
    Ok(())
}

/// One measured round: the parent and the peer each make `iters` increments.
fn contended_round<L: CounterLock>(
    id: &str,
    rounds: &Rounds,
    lock: &L,
    peer: &mut Peer,
    iters: u64,
) -> Duration {
    let before = lock.get();
    let (elapsed, ()) = common::timed_round(
        rounds.control(),
        iters,
        |iters| {
            for _ in 0..iters {
                lock.increment();
            }
        },
        &mut || peer.check(id),
    );
    let after = lock.get();
    assert_eq!(
        after.wrapping_sub(before),
        2 * iters,
        "{id}: lost or extra increments: mutual exclusion is broken"
    );
    elapsed
}

struct Contended<'g, 'c> {
    group: &'g mut BenchmarkGroup<'c, WallTime>,
}

impl LockVisitor for Contended<'_, '_> {
    fn visit<L: CounterLock>(&mut self, id: &str, _arena: &Arena, lock: &L) {
        let rounds = Rounds::new();
        // Forked on first use, so an id filtered out on the command line forks nothing.
        // The first lock in a new process reads /proc once (procshare's mutex learns the
        // thread's start time): fine, the peer is a plain forked process.
        let mut peer: Option<Peer> = None;
        self.group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let peer =
                    peer.get_or_insert_with(|| Peer::fork(rounds.control(), lock, peer_round::<L>));
                contended_round(id, &rounds, lock, peer, iters)
            });
        });
        if let Some(peer) = peer {
            peer.finish(rounds.control(), id);
        }
    }
}

fn lock_contended_2proc(c: &mut Criterion) {
    let mut group = c.benchmark_group("lock_contended_2proc");
    group.throughput(Throughput::Elements(2));
    let mut visitor = Contended { group: &mut group };
    for id in IDS {
        with_lock(id, &mut visitor);
    }
    group.finish();
}

fn config() -> Criterion {
    // Command-line options (--warm-up-time, --measurement-time, --sample-size) override
    // these: criterion_group! applies `configure_from_args` after this.
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = lock_uncontended, lock_contended_2proc
}
criterion_main!(benches);
