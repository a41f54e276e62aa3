//! Crash and timeout behaviour of the `sync` primitives other than `Mutex`: killed waiters,
//! killed participants, pulses, generation wrap, poisoned cells. Every test forks real
//! processes under the watchdogged runner in `common`.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use std::sync::TryLockError;

use procshare::{
    Array, Barrier, Child, Condvar, Error, Event, Mutex, ProcessError, Semaphore, Shared, ShmSafe,
    Value,
};

use common::{Test, join, spawn, wait_for};

const LIMIT: Duration = Duration::from_secs(20);

fn main() {
    let t = |name, body| Test {
        name,
        limit: Duration::from_secs(30),
        body,
    };
    common::run(
        &[
            t(
                "semaphore_wake_up_survives_a_killed_waiter",
                semaphore_wake_up_survives_a_killed_waiter,
            ),
            t(
                "condvar_notify_one_survives_a_killed_waiter",
                condvar_notify_one_survives_a_killed_waiter,
            ),
            t(
                "array_debug_while_locked_does_not_block",
                array_debug_while_locked_does_not_block,
            ),
            t(
                "event_pulse_wakes_every_sleeper",
                event_pulse_wakes_every_sleeper,
            ),
            t(
                "barrier_generation_does_not_wrap_under_a_stopped_participant",
                barrier_generation_does_not_wrap_under_a_stopped_participant,
            ),
            t(
                "barrier_abort_frees_waiters_when_a_participant_never_arrives",
                barrier_abort_frees_waiters_when_a_participant_never_arrives,
            ),
            t(
                "barrier_participant_killed_while_waiting_stays_counted_until_reset",
                barrier_participant_killed_while_waiting_stays_counted_until_reset,
            ),
            t(
                "semaphore_permit_of_a_killed_holder_is_not_returned",
                semaphore_permit_of_a_killed_holder_is_not_returned,
            ),
            t(
                "value_recovers_from_a_killed_holder_and_reports_the_torn_value",
                value_recovers_from_a_killed_holder_and_reports_the_torn_value,
            ),
            t(
                "array_recovers_from_a_killed_holder",
                array_recovers_from_a_killed_holder,
            ),
            t(
                "value_and_array_time_out_on_a_live_holder",
                value_and_array_time_out_on_a_live_holder,
            ),
        ],
        &[],
    )
}

/// Lets forked children reach their futex sleep.
fn settle() {
    std::thread::sleep(Duration::from_millis(100));
}

/// Waits up to `limit` for `child` to exit; true if it did (successfully).
fn exited_within(child: &mut Child<()>, limit: Duration) -> bool {
    match child.join_timeout(limit) {
        Ok(()) => true,
        Err(ProcessError::Timeout) => false,
        Err(e) => panic!("child {} failed: {e}", child.pid()),
    }
}

// ---------------------------------------------------------------------------------------
// Semaphore / Condvar: a woken waiter killed before it takes the wake-up (issue 6 item 12)
// ---------------------------------------------------------------------------------------

fn semaphore_wake_up_survives_a_killed_waiter() {
    let mut lost = 0;
    let mut went_to_the_victim = 0;
    for _ in 0..10 {
        let sem = Shared::new(Semaphore::new(0)).unwrap();
        // The victim queues first, so a wake-one goes to it (the kernel wakes in FIFO order).
        let victim = spawn(|| sem.acquire());
        settle();
        let mut survivor = spawn(|| sem.acquire());
        settle();
        sem.release().unwrap();
        victim.kill().unwrap();
        let _ = victim.join();
        if !exited_within(&mut survivor, Duration::from_secs(1)) {
            // Either the victim took the permit before dying (value 0: fine), or the
            // survivor sleeps next to a free permit: the wake-up was lost.
            if sem.value() == 1 {
                lost += 1;
            } else {
                went_to_the_victim += 1;
            }
            survivor.kill().unwrap();
            let _ = survivor.join();
        }
    }
    assert_eq!(
        lost, 0,
        "{lost} of 10 trials: survivor asleep with a free permit ({went_to_the_victim} \
         permits taken by the victim before it died)"
    );
}

#[repr(C)]
struct Turn {
    go: Mutex<u32>,
    changed: Condvar,
}
// SAFETY: repr(C) of ShmSafe procshare types.
unsafe impl ShmSafe for Turn {}

fn condvar_notify_one_survives_a_killed_waiter() {
    let mut lost = 0;
    for _ in 0..10 {
        let t = Shared::new(Turn {
            go: Mutex::new(0),
            changed: Condvar::new(),
        })
        .unwrap();
        let waiter = || {
            let g = t.go.lock().unwrap_or_else(|p| p.into_inner());
            let _g = t
                .changed
                .wait_while(g, |go| *go == 0)
                .unwrap_or_else(|p| p.into_inner());
        };
        let victim = spawn(waiter);
        settle();
        let mut survivor = spawn(waiter);
        settle();
        *t.go.lock().unwrap() = 1;
        t.changed.notify_one();
        victim.kill().unwrap();
        let _ = victim.join();
        if !exited_within(&mut survivor, Duration::from_secs(1)) {
            lost += 1;
            survivor.kill().unwrap();
            let _ = survivor.join();
        }
    }
    assert_eq!(
        lost, 0,
        "{lost} of 10 trials: the survivor slept on after the condition became true"
    );
}

// ---------------------------------------------------------------------------------------
// Debug never blocks (issue 6 item 14)
// ---------------------------------------------------------------------------------------

fn array_debug_while_locked_does_not_block() {
    let a = Array::from_slice(&[1u32, 2, 3]).unwrap();
    let v = Value::new(7u64).unwrap();
    let c = spawn(|| {
        let _ga = a.lock().unwrap();
        let _gv = v.lock().unwrap();
        let text = format!("{a:?} {v:?}");
        assert!(text.contains("locked"), "{text}");
    });
    join(c, Duration::from_secs(3));
    let text = format!("{a:?} {v:?}");
    assert!(text.contains("[1, 2, 3]") && text.contains('7'), "{text}");
}

// ---------------------------------------------------------------------------------------
// Event: set(); clear(); must release every sleeper (issue 11 item 7)
// ---------------------------------------------------------------------------------------

fn event_pulse_wakes_every_sleeper() {
    #[repr(C)]
    struct Pulse {
        ev: Event,
        woke: AtomicU32,
    }
    // SAFETY: repr(C) of ShmSafe types.
    unsafe impl ShmSafe for Pulse {}
    let p = Shared::new(Pulse {
        ev: Event::new(),
        woke: AtomicU32::new(0),
    })
    .unwrap();
    let sleepers: Vec<_> = (0..20)
        .map(|_| {
            spawn(|| {
                if p.ev.wait_timeout(Duration::from_secs(3)) {
                    p.woke.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Stopped sleepers cannot run between the set and the clear, as on a busy machine: the
    // pulse must still release them when they continue.
    for s in &sleepers {
        s.signal(libc::SIGSTOP).unwrap();
    }
    p.ev.set();
    p.ev.clear();
    for s in &sleepers {
        s.signal(libc::SIGCONT).unwrap();
    }
    for s in sleepers {
        join(s, LIMIT);
    }
    assert_eq!(
        p.woke.load(Ordering::SeqCst),
        20,
        "sleepers that missed the pulse"
    );
}

// ---------------------------------------------------------------------------------------
// Barrier generation wrap (issue 11 item 8)
// ---------------------------------------------------------------------------------------

fn barrier_generation_does_not_wrap_under_a_stopped_participant() {
    #[repr(C)]
    struct Wrap {
        b: Barrier,
        stopped_saw: AtomicU32, // 1 = Ok, 2 = timed out
    }
    // SAFETY: repr(C) of ShmSafe types.
    unsafe impl ShmSafe for Wrap {}
    let w = Shared::new(Wrap {
        b: Barrier::new(2),
        stopped_saw: AtomicU32::new(0),
    })
    .unwrap();
    // P arrives first, then is stopped while waiting.
    let p = spawn(|| {
        let r = w.b.wait_timeout(Duration::from_millis(300));
        w.stopped_saw
            .store(if r.is_ok() { 1 } else { 2 }, Ordering::SeqCst);
    });
    settle();
    p.signal(libc::SIGSTOP).unwrap();
    // Q completes P's round, then Q and R pass exactly 65 535 more rounds: 65 536 in all.
    let mut q = spawn(|| {
        assert!(w.b.wait_timeout(LIMIT).is_ok(), "Q completes P's round");
        for _ in 0..65_535 {
            assert!(w.b.wait_timeout(LIMIT).is_ok());
        }
    });
    // R joins only after P's round completed.
    settle();
    let r = spawn(|| {
        for _ in 0..65_535 {
            assert!(w.b.wait_timeout(LIMIT).is_ok());
        }
    });
    assert!(exited_within(&mut q, LIMIT), "Q finished its rounds");
    join(r, LIMIT);
    // P wakes long after its timeout, into a barrier 65 536 rounds on.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(400) {
        std::thread::sleep(Duration::from_millis(10));
    }
    p.signal(libc::SIGCONT).unwrap();
    join(p, LIMIT);
    assert_eq!(
        w.stopped_saw.load(Ordering::SeqCst),
        1,
        "P completed its round, yet was told it timed out"
    );
    // And the barrier still needs two: a lone participant must time out.
    assert!(
        w.b.wait_timeout(Duration::from_millis(200)).is_err(),
        "a lone participant passed a barrier for two"
    );
}

// ---------------------------------------------------------------------------------------
// Dead participants (issue 11 item 9): what was chosen, as documented in sync::barrier
// and sync::semaphore
// ---------------------------------------------------------------------------------------

fn barrier_abort_frees_waiters_when_a_participant_never_arrives() {
    let b = Shared::new(Barrier::new(3)).unwrap();
    let broken_seen = Shared::new(AtomicU32::new(0)).unwrap();
    let never_arrives = spawn(|| {
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let waiter = spawn(|| {
        if matches!(b.wait(), Err(Error::BarrierBroken)) {
            broken_seen.store(1, Ordering::SeqCst);
        }
    });
    wait_for("the waiter to arrive", LIMIT, || b.n_waiting() == 1);
    never_arrives.kill().unwrap();
    let _ = never_arrives.join();
    // A timed-out participant withdraws and leaves the barrier unbroken...
    assert!(matches!(
        b.wait_timeout(Duration::from_millis(200)),
        Err(Error::Timeout)
    ));
    assert_eq!(b.n_waiting(), 1);
    assert!(!b.is_broken());
    // ...and, having learnt of the death, aborts: the blocked waiter is released.
    let t0 = Instant::now();
    b.abort();
    join(waiter, Duration::from_secs(2));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(
        broken_seen.load(Ordering::SeqCst),
        1,
        "waiter saw BarrierBroken"
    );
    assert!(matches!(b.wait(), Err(Error::BarrierBroken)));
    assert!(Error::BarrierBroken.to_string().contains("reset"));
    // Reset: three fresh participants complete a round.
    b.reset();
    let others: Vec<_> = (0..2)
        .map(|_| spawn(|| assert!(b.wait_timeout(LIMIT).is_ok())))
        .collect();
    assert!(b.wait_timeout(LIMIT).is_ok());
    for c in others {
        join(c, LIMIT);
    }
}

fn barrier_participant_killed_while_waiting_stays_counted_until_reset() {
    let b = Shared::new(Barrier::new(2)).unwrap();
    let victim = spawn(|| {
        let _ = b.wait();
    });
    wait_for("the victim to arrive", LIMIT, || b.n_waiting() == 1);
    victim.kill().unwrap();
    let _ = victim.join();
    // Documented: an arrival carries no identity, so the dead one still counts...
    assert_eq!(b.n_waiting(), 1);
    // ...until whoever learns of the death aborts and resets.
    b.abort();
    b.reset();
    assert_eq!(b.n_waiting(), 0);
    assert!(
        matches!(
            b.wait_timeout(Duration::from_millis(100)),
            Err(Error::Timeout)
        ),
        "a lone participant must not pass a barrier for two"
    );
    let other = spawn(|| assert!(b.wait_timeout(LIMIT).is_ok()));
    assert!(b.wait_timeout(LIMIT).is_ok());
    join(other, LIMIT);
}

fn semaphore_permit_of_a_killed_holder_is_not_returned() {
    // Documented choice: permits are not owned (any process may release), so a killed
    // holder's permit is gone until someone releases on its behalf.
    let sem = Shared::new(Semaphore::new(1)).unwrap();
    let holder = spawn(|| {
        sem.acquire();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    wait_for("the holder to acquire", LIMIT, || sem.value() == 0);
    holder.kill().unwrap();
    let _ = holder.join();
    assert!(!sem.acquire_timeout(Duration::from_millis(150)));
    // The reaper releases on the dead holder's behalf.
    sem.release().unwrap();
    assert!(sem.acquire_timeout(LIMIT));
}

// ---------------------------------------------------------------------------------------
// Value / Array: poison is reported and recoverable (issue 6 item 16, issue 10 item 1)
// ---------------------------------------------------------------------------------------

fn value_recovers_from_a_killed_holder_and_reports_the_torn_value() {
    let v = Value::new([0u64; 2]).unwrap();
    let mid_write = Shared::new(Event::new()).unwrap();
    let holder = spawn(|| {
        let mut g = v.lock().unwrap();
        g[0] = 1; // half of an update that would set both words
        mid_write.set();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    assert!(mid_write.wait_timeout(LIMIT));
    let dead_pid = holder.pid();
    holder.kill().unwrap();
    let _ = holder.join();

    // `get` reads what the dead holder left, as documented; `get_checked` says it is
    // suspect.
    assert_eq!(v.get(), [1, 0]);
    assert_eq!(v.dead_holder(), Some(dead_pid));
    assert!(v.is_poisoned());
    match v.get_checked() {
        Err(p) => assert_eq!(p.into_inner(), [1, 0]),
        Ok(x) => panic!("get_checked returned {x:?} from a poisoned cell"),
    }
    assert!(matches!(v.try_lock(), Err(TryLockError::Poisoned(_))));
    assert!(matches!(
        v.lock_timeout(Duration::from_millis(50)),
        Err(TryLockError::Poisoned(_))
    ));
    let message = Error::from(v.lock().unwrap_err()).to_string();
    assert!(
        message.contains(&format!("thread {dead_pid} died")) && message.contains("clear_poison"),
        "{message}"
    );
    // Repair, clear, and the cell is healthy again, here and in another process.
    *v.lock().unwrap_err().into_inner() = [1, 1];
    v.clear_poison();
    assert!(!v.is_poisoned());
    assert_eq!(v.get_checked().unwrap(), [1, 1]);
    let c = spawn(|| v.lock().unwrap()[1] = 2);
    join(c, LIMIT);
    assert_eq!(v.get_checked().unwrap(), [1, 2]);
}

fn array_recovers_from_a_killed_holder() {
    let a = Array::from_slice(&[0u32; 4]).unwrap();
    let mid_write = Shared::new(Event::new()).unwrap();
    let holder = spawn(|| {
        let mut g = a.lock().unwrap();
        g[0] = 9;
        mid_write.set();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    assert!(mid_write.wait_timeout(LIMIT));
    holder.kill().unwrap();
    let _ = holder.join();
    for _ in 0..5 {
        assert!(a.lock().is_err(), "poisoned until cleared");
    }
    assert!(a.is_poisoned());
    assert!(matches!(a.try_lock(), Err(TryLockError::Poisoned(_))));
    let text = format!("{a:?}");
    assert!(
        text.contains("poisoned: true") && text.contains('9'),
        "{text}"
    );
    a.lock().unwrap_err().into_inner()[0] = 0;
    a.clear_poison();
    assert_eq!(a.lock().unwrap().to_vec(), [0; 4]);
    assert!(a.lock_timeout(Duration::from_millis(50)).is_ok());
}

fn value_and_array_time_out_on_a_live_holder() {
    let v = Value::new(1u32).unwrap();
    let a = Array::from_slice(&[1u32]).unwrap();
    let locked = Shared::new(Event::new()).unwrap();
    let release = Shared::new(Event::new()).unwrap();
    let holder = spawn(|| {
        let _gv = v.lock().unwrap();
        let _ga = a.lock().unwrap();
        locked.set();
        assert!(release.wait_timeout(LIMIT));
    });
    assert!(locked.wait_timeout(LIMIT));
    assert!(matches!(v.try_lock(), Err(TryLockError::WouldBlock)));
    assert!(matches!(a.try_lock(), Err(TryLockError::WouldBlock)));
    let t0 = Instant::now();
    assert!(matches!(
        v.lock_timeout(Duration::from_millis(100)),
        Err(TryLockError::WouldBlock)
    ));
    assert!(matches!(
        a.lock_timeout(Duration::from_millis(100)),
        Err(TryLockError::WouldBlock)
    ));
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert!(format!("{v:?} {a:?}").contains("<locked>"));
    release.set();
    join(holder, LIMIT);
    assert!(!v.is_poisoned() && !a.is_poisoned());
    assert!(v.lock_timeout(LIMIT).is_ok() && a.lock_timeout(LIMIT).is_ok());
}
