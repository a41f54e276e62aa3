//! Cross-process behaviour of the shared-memory primitives, with real forked processes.
//!
//! Every test runs in its own forked process under a watchdog (see `common`), so a hang or
//! a lost wake-up fails in seconds rather than stalling CI.

mod common;

use std::hint::black_box;
use std::io::{Seek, SeekFrom, Write};
use std::sync::TryLockError;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use procshare::{
    Array, Barrier, Condvar, Error, Event, Mutex, RawMutex, Segment, Semaphore, Shared, ShmSafe,
    Value,
};

use common::{join, spawn, unique_name, wait_for};

const LIMIT: Duration = Duration::from_secs(20);

fn main() {
    common::run(
        tests![
            mutex_excludes_across_processes,
            killed_holder_poisons_and_lock_recovers,
            waiter_already_blocked_recovers_when_holder_dies,
            aborting_and_exiting_holders_poison,
            stopped_holder_is_not_robbed,
            semaphore_counts_across_processes,
            condvar_ping_pong_loses_no_wakeup,
            event_ping_pong_loses_no_wakeup,
            barrier_rounds_across_processes,
            timeouts_are_honoured,
            named_segment_errors_are_specific,
            named_segment_shared_with_unrelated_open,
            stale_named_segment_is_found_and_removed,
            mutex_embedded_in_shared_memory_crate_segment,
            mutex_embedded_in_memmap2_file_mapping,
            value_and_array_like_python,
        ],
        &[(
            "no_dev_shm_entries_left_behind",
            no_dev_shm_entries_left_behind,
        )],
    )
}

/// Increments with a deliberate window between load and store: without exclusion, lost
/// updates are certain on two cores.
fn slow_increment(x: &mut u64) {
    let v = black_box(*x);
    for _ in 0..black_box(10) {
        std::hint::spin_loop();
    }
    *x = v + 1;
}

fn mutex_excludes_across_processes() {
    const PROCS: u64 = 4;
    const EACH: u64 = 25_000;
    let counter = Shared::new(Mutex::new(0u64)).unwrap();
    let start = Shared::new(Barrier::new(PROCS as u32)).unwrap();
    let children: Vec<_> = (0..PROCS)
        .map(|_| {
            spawn(|| {
                start.wait().unwrap();
                for _ in 0..EACH {
                    slow_increment(&mut counter.lock().unwrap());
                }
            })
        })
        .collect();
    for c in children {
        join(c, LIMIT);
    }
    assert_eq!(*counter.lock().unwrap(), PROCS * EACH);
    assert!(!counter.is_poisoned());
}

#[repr(C)]
struct Handoff {
    data: Mutex<[u64; 4]>,
    locked: Event,
    release: Event,
}
// SAFETY: repr(C) of ShmSafe procshare types.
unsafe impl ShmSafe for Handoff {}

fn handoff() -> Shared<Handoff> {
    Shared::new(Handoff {
        data: Mutex::new([1, 2, 3, 4]),
        locked: Event::new(),
        release: Event::new(),
    })
    .unwrap()
}

/// Forks a child that locks `h.data`, writes to it, announces it, then waits for `release`
/// (or forever).
fn spawn_holder(h: &Shared<Handoff>) -> procshare::Child<()> {
    spawn(|| {
        let mut g = h.data.lock().unwrap();
        g[0] = 10;
        h.locked.set();
        h.release.wait();
        drop(g);
    })
}

fn killed_holder_poisons_and_lock_recovers() {
    let h = handoff();
    let holder = spawn_holder(&h);
    assert!(h.locked.wait_timeout(LIMIT));
    holder.kill().unwrap();
    let _ = holder.join();

    let t0 = Instant::now();
    let guard = match h.data.lock() {
        Err(poisoned) => poisoned.into_inner(),
        Ok(_) => panic!("the lock of a killed holder must come back poisoned"),
    };
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "recovery took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        *guard,
        [10, 2, 3, 4],
        "the dead holder's writes stay visible"
    );
    drop(guard);
    assert!(h.data.is_poisoned());
    h.data.clear_poison();

    // Fully usable again, from this process and from a new one.
    *h.data.lock().unwrap() = [0; 4];
    let c = spawn(|| h.data.lock().unwrap()[1] = 7);
    join(c, LIMIT);
    assert_eq!(*h.data.lock().unwrap(), [0, 7, 0, 0]);
}

fn waiter_already_blocked_recovers_when_holder_dies() {
    let h = handoff();
    let waited = Shared::new(AtomicU64::new(0)).unwrap();
    let holder = spawn_holder(&h);
    assert!(h.locked.wait_timeout(LIMIT));
    let waiter = spawn(|| {
        let t0 = Instant::now();
        let r = h.data.lock();
        waited.store(t0.elapsed().as_micros() as u64, Ordering::SeqCst);
        assert!(r.is_err(), "waiter must see the poisoning");
    });
    // Let the waiter get into its futex sleep before the holder dies.
    std::thread::sleep(Duration::from_millis(100));
    let killed_at = Instant::now();
    holder.kill().unwrap();
    let _ = holder.join();
    join(waiter, LIMIT);
    assert!(
        killed_at.elapsed() < Duration::from_secs(1),
        "recovery took {:?}",
        killed_at.elapsed()
    );
    assert!(
        waited.load(Ordering::SeqCst) > 50_000,
        "the waiter did wait for the holder"
    );
}

fn aborting_and_exiting_holders_poison() {
    for how in ["abort", "exit", "panic"] {
        let h = handoff();
        let mut c = procshare::Process::fork(|| {
            let g = h.data.lock().unwrap();
            match how {
                "abort" => std::process::abort(),
                "exit" => std::mem::forget(g),
                _ => {
                    std::panic::set_hook(Box::new(|_| {})); // an expected panic: keep quiet
                    panic!("holder panics with the guard alive")
                }
            }
        })
        .unwrap();
        let outcome = c.join_timeout(LIMIT);
        assert_ne!(
            outcome,
            Err(procshare::ProcessError::Timeout),
            "{how}: the holder should exit"
        );
        assert!(outcome.is_err() || how == "exit", "{how}: {outcome:?}");
        let t0 = Instant::now();
        assert!(h.data.lock().is_err(), "{how}: not poisoned");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{how}: took {:?}",
            t0.elapsed()
        );
    }
}

fn stopped_holder_is_not_robbed() {
    let h = handoff();
    let holder = spawn_holder(&h);
    assert!(h.locked.wait_timeout(LIMIT));
    holder.signal(libc::SIGSTOP).unwrap();
    let t0 = Instant::now();
    match h.data.lock_timeout(Duration::from_millis(1500)) {
        Err(TryLockError::WouldBlock) => {}
        Err(TryLockError::Poisoned(_)) => panic!("a stopped holder's lock was taken as dead"),
        Ok(_) => panic!("a stopped holder's lock was stolen"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(1500));
    holder.signal(libc::SIGCONT).unwrap();
    h.release.set();
    join(holder, LIMIT);
    let g = h.data.lock().expect("released normally, so not poisoned");
    assert_eq!(*g, [10, 2, 3, 4]);
}

#[repr(C)]
struct Room {
    permits: Semaphore,
    inside: AtomicU32,
    most: AtomicU32,
}
// SAFETY: repr(C) of ShmSafe types.
unsafe impl ShmSafe for Room {}

fn semaphore_counts_across_processes() {
    let room = Shared::new(Room {
        permits: Semaphore::new(2),
        inside: AtomicU32::new(0),
        most: AtomicU32::new(0),
    })
    .unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            spawn(|| {
                for _ in 0..200 {
                    room.permits.acquire();
                    let now = room.inside.fetch_add(1, Ordering::SeqCst) + 1;
                    room.most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(200));
                    room.inside.fetch_sub(1, Ordering::SeqCst);
                    room.permits.release().unwrap();
                }
            })
        })
        .collect();
    for c in children {
        join(c, LIMIT);
    }
    assert_eq!(
        room.most.load(Ordering::SeqCst),
        2,
        "at most 2 inside, and 2 reached"
    );
    assert_eq!(room.permits.value(), 2);

    let bounded = Semaphore::bounded(1);
    assert!(
        bounded.release().is_err(),
        "bounded semaphore refuses an extra release"
    );
    assert_eq!(bounded.value(), 1);
}

#[repr(C)]
struct Turn {
    turn: Mutex<u64>,
    changed: Condvar,
}
// SAFETY: repr(C) of ShmSafe procshare types.
unsafe impl ShmSafe for Turn {}

fn condvar_ping_pong_loses_no_wakeup() {
    const ROUNDS: u64 = 10_000;
    let t = Shared::new(Turn {
        turn: Mutex::new(0),
        changed: Condvar::new(),
    })
    .unwrap();
    // Each side waits for its parity, then passes the turn on: any lost wake-up stalls the
    // exchange and trips the 5 s wait below.
    let play = |parity: u64| {
        for _ in 0..ROUNDS {
            let g = t.turn.lock().unwrap();
            let (mut g, r) = t
                .changed
                .wait_timeout_while(g, Duration::from_secs(5), |turn| *turn % 2 != parity)
                .unwrap();
            assert!(!r.timed_out(), "lost wake-up at turn {}", *g);
            *g += 1;
            t.changed.notify_all();
        }
    };
    let child = spawn(|| play(1));
    play(0);
    join(child, LIMIT);
    assert_eq!(*t.turn.lock().unwrap(), 2 * ROUNDS);
}

fn event_ping_pong_loses_no_wakeup() {
    const ROUNDS: u32 = 10_000;
    let ev = Shared::new([Event::new(), Event::new()]).unwrap();
    let child = spawn(|| {
        for i in 0..ROUNDS {
            assert!(ev[0].wait_timeout(Duration::from_secs(5)), "lost ping {i}");
            ev[0].clear();
            ev[1].set();
        }
    });
    for i in 0..ROUNDS {
        ev[0].set();
        assert!(ev[1].wait_timeout(Duration::from_secs(5)), "lost pong {i}");
        ev[1].clear();
    }
    join(child, LIMIT);
}

#[repr(C)]
struct Rounds {
    barrier: Barrier,
    arrived: AtomicU64,
    leaders: AtomicU64,
}
// SAFETY: repr(C) of ShmSafe types.
unsafe impl ShmSafe for Rounds {}

fn barrier_rounds_across_processes() {
    const PROCS: u64 = 3;
    const ROUNDS: u64 = 3_000;
    let r = Shared::new(Rounds {
        barrier: Barrier::new(PROCS as u32),
        arrived: AtomicU64::new(0),
        leaders: AtomicU64::new(0),
    })
    .unwrap();
    let run = || {
        for round in 0..ROUNDS {
            r.arrived.fetch_add(1, Ordering::SeqCst);
            if r.barrier.wait().unwrap().is_leader() {
                r.leaders.fetch_add(1, Ordering::SeqCst);
            }
            let seen = r.arrived.load(Ordering::SeqCst);
            assert!(
                seen >= PROCS * (round + 1),
                "passed round {round} with {seen} arrivals"
            );
        }
    };
    let children: Vec<_> = (1..PROCS).map(|_| spawn(run)).collect();
    run();
    for c in children {
        join(c, LIMIT);
    }
    assert_eq!(r.leaders.load(Ordering::SeqCst), ROUNDS);
}

/// Asserts that `f` blocked for `want` (not early) and not much longer.
fn assert_waited(what: &str, want: Duration, f: impl FnOnce() -> bool) {
    let t0 = Instant::now();
    let succeeded = f();
    let took = t0.elapsed();
    assert!(!succeeded, "{what}: should have timed out");
    assert!(took >= want, "{what}: returned early after {took:?}");
    // Generous: these VMs deschedule for tens of milliseconds at times.
    assert!(
        took < want + Duration::from_millis(400),
        "{what}: returned late after {took:?}"
    );
}

fn timeouts_are_honoured() {
    let d = Duration::from_millis(200);
    let h = handoff();
    let holder = spawn_holder(&h);
    assert!(h.locked.wait_timeout(LIMIT));
    assert_waited("Mutex::lock_timeout", d, || h.data.lock_timeout(d).is_ok());
    h.release.set();
    join(holder, LIMIT);

    let sem = Shared::new(Semaphore::new(0)).unwrap();
    assert_waited("Semaphore::acquire_timeout", d, || sem.acquire_timeout(d));
    let ev = Shared::new(Event::new()).unwrap();
    assert_waited("Event::wait_timeout", d, || ev.wait_timeout(d));
    let t = Shared::new(Turn {
        turn: Mutex::new(0),
        changed: Condvar::new(),
    })
    .unwrap();
    assert_waited("Condvar::wait_timeout", d, || {
        let (_g, r) = t.changed.wait_timeout(t.turn.lock().unwrap(), d).unwrap();
        !r.timed_out()
    });
    let b = Shared::new(Barrier::new(2)).unwrap();
    assert_waited("Barrier::wait_timeout", d, || b.wait_timeout(d).is_ok());
    // The timed-out participant withdrew: the barrier still needs exactly two.
    let c = spawn(|| assert!(b.wait_timeout(LIMIT).is_ok()));
    assert!(b.wait_timeout(LIMIT).is_ok());
    join(c, LIMIT);
}

fn shm_path(name: &str) -> String {
    format!("/dev/shm/procshare.{name}")
}

fn named_segment_errors_are_specific() {
    let name = unique_name("errors");
    let _mine = Shared::create(&name, 42u64).unwrap();

    // Checked from another process, as a real user would.
    let child = spawn(|| {
        assert_eq!(*Shared::<u64>::open(&name).unwrap(), 42);
        match Shared::<u32>::open(&name) {
            Err(Error::TypeMismatch {
                expected, found, ..
            }) => {
                assert!(
                    expected.contains("u32") && found.contains("u64"),
                    "{expected} / {found}"
                );
            }
            other => panic!("expected TypeMismatch, got {other:?}"),
        }
        assert!(matches!(
            Shared::<u64>::open("no-such-segment-anywhere"),
            Err(Error::SegmentNotFound { .. })
        ));
        assert!(matches!(
            Shared::create(&name, 1u64),
            Err(Error::SegmentExists { .. })
        ));
        assert!(matches!(
            Segment::open("a/b"),
            Err(Error::InvalidName { .. })
        ));
    });
    join(child, LIMIT);

    // Damage copies of the segment on disk and check each error names the difference.
    let good = std::fs::read(shm_path(&name)).unwrap();
    let write_variant = |suffix: &str, bytes: &[u8]| {
        let n = unique_name(suffix);
        std::fs::write(shm_path(&n), bytes).unwrap();
        n
    };
    let foreign = write_variant("foreign", &vec![0xAB; 8192]);
    let truncated = write_variant("truncated", &good[..100]);
    let mut v = good.clone();
    v[8] = 99;
    let version = write_variant("version", &v);
    let mut v = good.clone();
    v.extend_from_slice(&[0; 4096]);
    let resized = write_variant("resized", &v);
    let mut v = good.clone();
    v[12..16].copy_from_slice(&0u32.to_ne_bytes());
    let unready = write_variant("unready", &v);

    let e = Shared::<u64>::open(&foreign).unwrap_err();
    assert!(matches!(e, Error::ForeignSegment { .. }), "{e}");
    let e = Segment::open_timeout(&truncated, Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, Error::SizeMismatch { found: 100, .. }), "{e}");
    let e = Shared::<u64>::open(&version).unwrap_err();
    assert!(matches!(e, Error::VersionMismatch { found: 99, .. }), "{e}");
    let e = Shared::<u64>::open(&resized).unwrap_err();
    assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");
    let t0 = Instant::now();
    let e = Segment::open_timeout(&unready, Duration::from_millis(100)).unwrap_err();
    assert!(matches!(e, Error::NotReady { .. }), "{e}");
    assert!(
        t0.elapsed() >= Duration::from_millis(100),
        "waited for readiness"
    );
    // Every message tells the reader what to do.
    assert!(e.to_string().contains("retry"), "{e}");

    for n in [foreign, truncated, version, resized, unready] {
        Segment::remove(&n).unwrap();
    }
}

fn named_segment_shared_with_unrelated_open() {
    let name = unique_name("unrelated");
    let ready = Shared::new(Event::new()).unwrap();
    let counter_name = name.clone();
    // The child creates; the parent opens by name only, as an unrelated process would.
    let child = spawn(|| {
        let c = Shared::create(&counter_name, Mutex::new(0u64)).unwrap();
        *c.lock().unwrap() = 5;
        ready.set();
        wait_for("parent's increment", LIMIT, || *c.lock().unwrap() == 6);
    });
    assert!(ready.wait_timeout(LIMIT));
    let c = Shared::<Mutex<u64>>::open(&name).unwrap();
    *c.lock().unwrap() += 1;
    join(child, LIMIT);
    // The creator has gone and removed the name; our mapping still works.
    assert!(matches!(
        Segment::open(&name),
        Err(Error::SegmentNotFound { .. })
    ));
    assert_eq!(*c.lock().unwrap(), 6);
}

fn stale_named_segment_is_found_and_removed() {
    let name = unique_name("stale");
    let ready = Shared::new(Event::new()).unwrap();
    let creator = spawn(|| {
        let _seg = Segment::create(&name, 64).unwrap();
        ready.set();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    assert!(ready.wait_timeout(LIMIT));
    let info = Segment::list()
        .unwrap()
        .into_iter()
        .find(|i| i.name == name)
        .unwrap();
    assert_eq!(info.creator_alive, Some(true));
    assert!(!info.is_stale());
    creator.kill().unwrap();
    let _ = creator.join();
    let info = Segment::list()
        .unwrap()
        .into_iter()
        .find(|i| i.name == name)
        .unwrap();
    assert_eq!(info.creator_alive, Some(false));
    assert!(info.is_stale());
    let removed = Segment::remove_stale().unwrap();
    assert!(removed.contains(&name), "{removed:?}");
    assert!(matches!(
        Segment::open(&name),
        Err(Error::SegmentNotFound { .. })
    ));
}

/// Hammers a `Mutex<u64>` living at `ptr` (inside someone else's mapping) from several
/// processes, then checks the count and that a killed holder poisons it.
fn exercise_embedded_mutex(ptr: *mut u8) {
    assert_eq!(ptr as usize % align_of::<Mutex<u64>>(), 0);
    // SAFETY: `ptr` is aligned, points at zeroed shared memory that outlives this function,
    // and all-zero is a valid unlocked Mutex<u64> holding 0.
    let m: &Mutex<u64> = unsafe { &*ptr.cast::<Mutex<u64>>() };
    let children: Vec<_> = (0..3)
        .map(|_| {
            spawn(|| {
                for _ in 0..20_000 {
                    slow_increment(&mut m.lock().unwrap());
                }
            })
        })
        .collect();
    for c in children {
        join(c, LIMIT);
    }
    assert_eq!(*m.lock().unwrap(), 60_000);
    let holder = spawn(|| {
        std::mem::forget(m.lock().unwrap());
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    wait_for("the holder to lock", LIMIT, || m.raw().is_locked());
    holder.kill().unwrap();
    let _ = holder.join();
    assert!(m.lock().is_err(), "killed holder poisons the embedded lock");
}

fn mutex_embedded_in_shared_memory_crate_segment() {
    let shmem = shared_memory::ShmemConf::new().size(4096).create().unwrap();
    exercise_embedded_mutex(shmem.as_ptr());
}

fn mutex_embedded_in_memmap2_file_mapping() {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&[0; 4096]).unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    // SAFETY: a private temporary file nobody else truncates while it is mapped.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    exercise_embedded_mutex(map.as_mut_ptr());
}

/// Seed 002's `square_list`: a child fills an `Array` and a `Value`, the parent reads them.
fn value_and_array_like_python() {
    let mylist = [1, 2, 3, 4];
    let result = Array::<i32>::zeroed(4).unwrap();
    let square_sum = Value::new(0i32).unwrap();
    let child = spawn(|| {
        for (slot, n) in result.lock().unwrap().iter_mut().zip(mylist) {
            *slot = n * n;
        }
        square_sum.set(result.to_vec().iter().sum());
    });
    join(child, LIMIT);
    assert_eq!(result.to_vec(), [1, 4, 9, 16]);
    assert_eq!(square_sum.get(), 30);

    let name = unique_name("array");
    let _a = Array::create(&name, &[1.5f64, 2.5]).unwrap();
    assert_eq!(Array::<f64>::open(&name).unwrap().to_vec(), [1.5, 2.5]);
    assert!(matches!(
        Array::<f32>::open(&name),
        Err(Error::TypeMismatch { .. })
    ));
    assert!(matches!(
        Value::<f64>::open(&name),
        Err(Error::TypeMismatch { .. })
    ));

    // Poisoning through Value: a child dies holding the lock.
    let v = Value::new(1u8).unwrap();
    let holder = spawn(|| {
        std::mem::forget(v.lock().unwrap());
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    wait_for("the holder to lock", LIMIT, || is_locked(&v));
    holder.kill().unwrap();
    let _ = holder.join();
    assert!(v.lock().is_err());
    assert_eq!(v.get(), 1, "get carries on past the poison");
}

fn is_locked(v: &Value<u8>) -> bool {
    // SAFETY: a Value's segment holds a Mutex<u8>, whose first field is its RawMutex.
    unsafe { &*v.segment().as_ptr().cast::<RawMutex>() }.is_locked()
}

fn no_dev_shm_entries_left_behind() {
    let prefix = common::run_prefix();
    let left: Vec<_> = Segment::list()
        .unwrap()
        .into_iter()
        .filter(|i| i.name.starts_with(&prefix))
        .map(|i| i.name)
        .collect();
    assert!(left.is_empty(), "segments left in /dev/shm: {left:?}");
}
