//! `pipe()` between real forked processes: the Python seeds, dead peers, and signals.
//!
//! Every test runs in its own forked process under a watchdog (see `common`), so a receive
//! that never sees its peer's death fails in seconds instead of hanging CI.

mod common;

use std::io;
use std::time::{Duration, Instant};

use procshare::{Child, Connection, Error, pipe};
use serde::{Deserialize, Serialize};

use common::{join, spawn};

const LIMIT: Duration = Duration::from_secs(20);

fn main() {
    common::run(
        tests![
            seed_sender_and_receiver_until_end,
            seed_two_children_share_one_pipe,
            killed_child_unblocks_parent_blocked_in_recv,
            killed_child_unblocks_parent_blocked_in_send,
            child_sees_end_of_file_when_parent_drops_its_end,
            duplex_ping_pong_10k_round_trips,
            large_messages_both_ways,
            signals_do_not_break_transfers,
        ],
        &[],
    )
}

/// Asserts `e` is the "other end was closed" error of the given kind.
fn assert_peer_gone(e: &Error, kind: io::ErrorKind) {
    match e {
        Error::Io { source, .. } if source.kind() == kind => {
            assert!(
                e.to_string().contains("other end of the pipe was closed"),
                "{e}"
            );
        }
        other => panic!("expected a {kind:?} error, got {other:?}"),
    }
}

/// Seed 002: the parent sends `["hello", "hey", "hru?", "END"]`; the child receives until
/// "END" and answers with how many messages came before it.
fn seed_sender_and_receiver_until_end() {
    let msgs = ["hello", "hey", "hru?", "END"];
    let (parent_conn, child_conn) = pipe().unwrap();
    let child = spawn(move || {
        let mut received = Vec::new();
        loop {
            let msg: String = child_conn.recv().unwrap();
            if msg == "END" {
                break;
            }
            received.push(msg);
        }
        assert_eq!(received, ["hello", "hey", "hru?"]);
        child_conn.send(&received.len()).unwrap();
    });
    for msg in msgs {
        parent_conn.send(msg).unwrap();
    }
    assert_eq!(parent_conn.recv::<usize>().unwrap(), 3);
    join(child, LIMIT);
    // The child is gone and its end went with it (it was moved into the child's closure,
    // so the parent's copy closed when fork returned).
    assert_peer_gone(
        &parent_conn.recv::<usize>().unwrap_err(),
        io::ErrorKind::UnexpectedEof,
    );
}

/// Seed 003: one child sends on one end, a second child receives on the other; the parent
/// only wires them up.
fn seed_two_children_share_one_pipe() {
    let (parent_conn, child_conn) = pipe().unwrap();
    let report = pipe().unwrap();
    let (report_tx, report_rx) = report;
    let sender = spawn(move || {
        parent_conn.send("Hello from the sender process!").unwrap();
        parent_conn.close();
    });
    let receiver = spawn(move || {
        let message: String = child_conn.recv().unwrap();
        report_tx.send(&message).unwrap();
        child_conn.close();
    });
    join(sender, LIMIT);
    join(receiver, LIMIT);
    assert_eq!(
        report_rx.recv::<String>().unwrap(),
        "Hello from the sender process!"
    );
}

/// Runs `block` (which should block on `conn` waiting for the child) while a helper
/// thread SIGKILLs `child` after a moment; returns how long `block` kept going after the
/// kill.
fn kill_while_blocked(child: Child<()>, block: impl FnOnce() -> Error) -> (Error, Duration) {
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let at = Instant::now();
        child.kill().unwrap();
        let _ = child.join();
        at
    });
    let e = block();
    let returned = Instant::now();
    let killed_at = killer.join().unwrap();
    (e, returned.saturating_duration_since(killed_at))
}

fn spawn_sleeper(conn: Connection) -> Child<()> {
    spawn(move || {
        conn.send("ready").unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    })
}

fn killed_child_unblocks_parent_blocked_in_recv() {
    let (parent_end, child_end) = pipe().unwrap();
    let child = spawn_sleeper(child_end);
    assert_eq!(parent_end.recv::<String>().unwrap(), "ready");
    let (e, late) = kill_while_blocked(child, || parent_end.recv::<u64>().unwrap_err());
    assert_peer_gone(&e, io::ErrorKind::UnexpectedEof);
    assert!(
        late < Duration::from_secs(1),
        "noticed the death {late:?} late"
    );
    // poll agrees: end of file is "ready", and stays so.
    assert!(parent_end.poll(Some(Duration::ZERO)).unwrap());
}

fn killed_child_unblocks_parent_blocked_in_send() {
    let (parent_end, child_end) = pipe().unwrap();
    let child = spawn_sleeper(child_end);
    assert_eq!(parent_end.recv::<String>().unwrap(), "ready");
    // The child never reads, so the socket buffer fills and send blocks; the kill must
    // turn that into an error, not a hang and not a SIGPIPE that kills this process.
    let chunk = vec![7u8; 1 << 20];
    let (e, late) = kill_while_blocked(child, || {
        loop {
            if let Err(e) = parent_end.send_bytes(&chunk) {
                break e;
            }
        }
    });
    assert_peer_gone(&e, io::ErrorKind::BrokenPipe);
    assert!(
        late < Duration::from_secs(1),
        "noticed the death {late:?} late"
    );
}

fn child_sees_end_of_file_when_parent_drops_its_end() {
    let (parent_end, child_end) = pipe().unwrap();
    // The child inherits a copy of the parent's end too; it must close that copy, or it
    // would keep the pipe open itself and wait forever. Taking it out of an Option in the
    // child does so without affecting the parent's copy.
    let mut parent_end = Some(parent_end);
    let parents_copy = &mut parent_end;
    let child = spawn(move || {
        drop(parents_copy.take());
        let mut echoed = 0u32;
        let e = loop {
            match child_end.recv::<u32>() {
                Ok(n) => {
                    child_end.send(&n).unwrap();
                    echoed += 1;
                }
                Err(e) => break e,
            }
        };
        assert_eq!(echoed, 5);
        assert_peer_gone(&e, io::ErrorKind::UnexpectedEof);
    });
    let conn = parent_end.take().expect("the parent keeps its end");
    for n in 0..5 {
        conn.send(&n).unwrap();
        assert_eq!(conn.recv::<u32>().unwrap(), n);
    }
    conn.close();
    join(child, LIMIT);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Msg {
    Ping { seq: u64, note: String },
    Pong { seq: u64 },
    Stop,
}

fn duplex_ping_pong_10k_round_trips() {
    const ROUNDS: u64 = 10_000;
    let (parent_end, child_end) = pipe().unwrap();
    let child = spawn(move || {
        loop {
            match child_end.recv::<Msg>().unwrap() {
                Msg::Ping { seq, note } => {
                    assert_eq!(note, format!("ping {seq}"));
                    child_end.send(&Msg::Pong { seq }).unwrap();
                }
                Msg::Stop => break,
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    let t0 = Instant::now();
    for seq in 0..ROUNDS {
        let note = format!("ping {seq}");
        parent_end.send(&Msg::Ping { seq, note }).unwrap();
        assert_eq!(parent_end.recv::<Msg>().unwrap(), Msg::Pong { seq });
    }
    let took = t0.elapsed();
    parent_end.send(&Msg::Stop).unwrap();
    join(child, LIMIT);
    println!(
        "    {ROUNDS} round trips in {took:.2?} ({:.1?} each)",
        took / ROUNDS as u32
    );
}

fn large_messages_both_ways() {
    let (parent_end, child_end) = pipe().unwrap();
    // The child echoes every message back until told to stop with an empty one, reusing
    // one buffer throughout.
    let child = spawn(move || {
        let mut buf = Vec::new();
        while child_end.recv_bytes_into(&mut buf).unwrap() > 0 {
            child_end.send_bytes(&buf).unwrap();
        }
    });
    let mut back = Vec::new();
    for size in [1usize, 200_000, 8 << 20, 3, 8 << 20, 65_536] {
        let msg: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        parent_end.send_bytes(&msg).unwrap();
        assert_eq!(parent_end.recv_bytes_into(&mut back).unwrap(), size);
        assert!(back == msg, "echo of {size} bytes differs");
    }
    parent_end.send_bytes(&[]).unwrap();
    join(child, LIMIT);
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Delivers SIGALRM to this process every `period`, with a handler installed without
/// `SA_RESTART`, so that every blocking call in the pipe gets interrupted with EINTR.
fn interrupt_every(period: Duration) {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = 0; // no SA_RESTART: interrupted calls fail with EINTR
    // SAFETY: `action` is a valid sigaction whose handler is async-signal-safe (it does
    // nothing); the old action is not requested. This test process is ours alone.
    let rc = unsafe { libc::sigaction(libc::SIGALRM, &action, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: period.as_micros() as libc::suseconds_t,
    };
    let timer = libc::itimerval {
        it_interval: tv,
        it_value: tv,
    };
    // SAFETY: `timer` is a valid itimerval; the old value is not requested.
    let rc = unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
}

fn signals_do_not_break_transfers() {
    let (parent_end, child_end) = pipe().unwrap();
    let child = spawn(move || {
        // The child is interrupted too (timers are not inherited across fork).
        interrupt_every(Duration::from_micros(500));
        let mut buf = Vec::new();
        loop {
            // Slow down so that the parent blocks in recv, poll and recv_timeout.
            std::thread::sleep(Duration::from_millis(2));
            if child_end.recv_bytes_into(&mut buf).unwrap() == 0 {
                break;
            }
            child_end.send_bytes(&buf).unwrap();
        }
    });
    interrupt_every(Duration::from_micros(300));
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 253) as u8).collect();
    for round in 0..20 {
        let msg = if round % 4 == 0 {
            &big[..]
        } else {
            &big[..round * 1000 + 1]
        };
        let back = match round % 3 {
            0 => {
                parent_end.send_bytes(msg).unwrap();
                parent_end.recv_bytes().unwrap()
            }
            1 => {
                parent_end.send_bytes(msg).unwrap();
                assert!(parent_end.poll(None).unwrap());
                parent_end.recv_bytes().unwrap()
            }
            // Sent encoded; the child echoes the encoding, which decodes back.
            _ => {
                parent_end.send(msg).unwrap();
                parent_end.recv_timeout::<Vec<u8>>(LIMIT).unwrap()
            }
        };
        assert!(back == msg, "round {round}: echo differs");
    }
    // A timed poll that nothing satisfies still lasts its full time despite the signals.
    let t0 = Instant::now();
    assert!(!parent_end.poll(Some(Duration::from_millis(50))).unwrap());
    assert!(t0.elapsed() >= Duration::from_millis(50));
    parent_end.send_bytes(&[]).unwrap();
    join(child, LIMIT);
}
