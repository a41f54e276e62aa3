//! Queue benchmarks across two real processes: procshare's shared-memory rings against
//! the kernel transports (socketpair, pipe) they replace, a hand-written spin ring (the
//! floor) and crossbeam between threads (the in-process reference).
//!
//! Every id forks one peer process (on its first measured batch) and keeps it alive
//! across all the batches of that id; the peer waits in shared memory for each round
//! (the harness in `benches/common`, shared with `locks.rs`). The bench process is
//! single-threaded, which is what makes the fork sound.
//!
//! * `queue_throughput/<transport>/<size>`: the peer sends `iters` messages of `size`
//!   bytes, the bench process receives them. Timed from the go signal to the last message
//!   received. Throughput is reported as bytes/s (`Throughput::Bytes(size)` per message);
//!   **messages/s = bytes/s ÷ size**. Sizes: `8B`, `64B`, `1KiB`, `64KiB`, `1MiB`.
//!   The receiver copies every message out of the transport (into a value or a buffer it
//!   owns) and touches its first and last byte, checking a running sum of them at the end
//!   of the round (each message is stamped with its number, so a lost or extra message
//!   fails the bench; it is not an ordering check). It does *not* read every byte: at
//!   64KiB and up that would measure the receiver's memory bandwidth rather than the
//!   transport.
//! * `queue_roundtrip/<transport>`: an 8-byte ping-pong; one iteration is one round trip
//!   (the bench process sends, the peer receives and echoes, the bench process receives).
//!
//! The transports (see [`TRANSPORTS`]):
//!
//! * `spsc`, `channel`: procshare's plain-old-data rings, `procshare::spsc::<[u8; N]>` and
//!   `procshare::channel::<[u8; N]>` with [`RING_SLOTS`] slots, blocking `send`/`recv`
//!   (a short spin, then a futex). Pod rings exist for sizes that fit a slot, so these
//!   ids run for 8B, 64B and 1KiB only. Round trips use two rings, one each way.
//! * `queue`: `procshare::Queue<Vec<u8>>`, `put(&vec)` / `get()` (a new `Vec` per
//!   message, as a user of Python's `Queue` would write it); `queue_into` the same
//!   received with `get_into` into one reused `Vec`; `queue_u64` a `Queue<u64>` (8B only).
//! * `bytes_loan`: `ByteQueue::send_with` / `recv_with`, in place in the ring.
//! * `spsc_inplace`: the same ring through its in-place batch API (`send_batch_with`,
//!   `recv_batch_with`, up to [`INPLACE_BATCH`] messages per index update): the producer
//!   writes each message into its slot, the consumer copies each out of its slot.
//! * `channel_inplace`: the MPMC ring through `send_with` / `recv_with`, one message per
//!   call, one copy each side.
//! * `pipe`: `procshare::pipe()` (a socketpair with 8-byte length frames),
//!   `send_bytes` / `recv_bytes_into` a reused buffer. Duplex for round trips.
//! * `unix_socket`: a raw `socketpair(AF_UNIX, SOCK_STREAM)`, `write`/`read` loops of
//!   exactly `size` bytes (the size is fixed per id, so no framing). Duplex.
//! * `os_pipe`: a raw `pipe(2)`, the same loops; two pipes for round trips. Default kernel
//!   buffer sizes throughout (64 KiB for a pipe).
//! * `bare_ring`: the floor. A minimal SPSC ring written below in a
//!   `procshare::Segment::anonymous`: `head` and `tail` `AtomicU64`s on separate 128-byte
//!   lines, slots of the message size ([`RING_SLOTS`] of them up to 1KiB, a
//!   [`BYTE_RING`]-byte ring of 64KiB or 1MiB slots above), and both sides busy-polling
//!   with `spin_loop`, no futex, no liveness checks: what a transport that may block
//!   should not expect to beat. With 8-byte slots, eight share a cache line, so the
//!   producer's next write contends with the consumer's read (8B can be slower than 64B).
//!   (After ~1000 fruitless polls it `sched_yield`s between polls, so that sharing one CPU
//!   with its peer costs a yield per hand-over instead of a scheduler time slice; see
//!   [`Stall`].)
//! * `crossbeam_inproc`: `crossbeam_channel::bounded` between two *threads* of the bench
//!   process, the in-process reference. `[u8; N]` messages up to 1KiB; at 64KiB and up a
//!   `Vec<u8>` from a recycled pool (the producer copies the message into it, ownership
//!   moves, no second copy: what a threaded program would do), with as many buffers in
//!   flight as `bare_ring` has slots.
//!
//! **Spin-based transports burn CPU.** `bare_ring` keeps both processes at 100% for the
//! whole measurement, so it needs two free CPUs; on a 2-vCPU machine it takes both. The
//! procshare rings, and crossbeam, spin briefly before sleeping.
//!
//! Run it with
//!
//! ```text
//! cargo bench --bench queue_vs_pipe
//! # smoke run (CI): one round of every id
//! cargo bench --bench queue_vs_pipe -- --test
//! # one group, one transport, one id:
//! cargo bench --bench queue_vs_pipe -- queue_roundtrip
//! cargo bench --bench queue_vs_pipe -- 'queue_throughput/spsc/'
//! cargo bench --bench queue_vs_pipe -- 'queue_throughput/os_pipe/64KiB'
//! # both processes on one CPU:
//! taskset -c 0 cargo bench --bench queue_vs_pipe -- queue_roundtrip/spsc
//! ```
//!
//! With `--features compare`, two competitors join both groups: `ipc_channel` (servo's
//! ipc-channel) and `iceoryx2` (its publish-subscribe, busy-polling; and, for round trips,
//! `iceoryx2_blocking`, sleeping on its event listeners); see [`compare`].
//!
//! ```text
//! cargo bench --features compare --bench queue_vs_pipe
//! ```
//!
//! A full run takes about 3 minutes. The numbers need two free CPUs to mean anything;
//! check that the machine is otherwise idle.

mod common;
#[cfg(feature = "compare")]
mod compare;

use std::hint::{black_box, spin_loop};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Control, Peer, PeerFn, QuitOnDrop, Rounds, die};
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use procshare::{Connection, Segment, ShmSafe};

type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// The transports, in the order they run: an id name and the function that registers
/// its benchmarks (one call per size in `queue_throughput`, one in `queue_roundtrip`; a
/// function may skip a case it does not support by registering nothing).
///
/// A new transport is a function like [`bench_pipe`]: build both ends, then hand the
/// peer's end and its half of a round to [`run_forked`], and this process's half to it as
/// the `consumer` closure.
const TRANSPORTS: &[(&str, TransportFn)] = &[
    ("spsc", bench_pod_ring::<Spsc>),
    ("spsc_inplace", bench_spsc_inplace),
    ("channel", bench_pod_ring::<Channel>),
    ("channel_inplace", bench_channel_inplace),
    ("pipe", bench_pipe),
    ("unix_socket", bench_unix_socket),
    ("os_pipe", bench_os_pipe),
    ("bare_ring", bench_bare_ring),
    ("crossbeam_inproc", bench_crossbeam_inproc),
    ("queue", bench_queue),
    ("queue_into", bench_queue_into),
    ("queue_u64", bench_queue_u64),
    ("bytes_loan", bench_bytes_loan),
];

/// The competitors, with `--features compare` (see [`compare`]); none without it.
#[cfg(feature = "compare")]
const COMPETITORS: &[(&str, TransportFn)] = &[
    ("ipc_channel", compare::bench_ipc_channel),
    ("iceoryx2", compare::bench_iceoryx2),
    ("iceoryx2_blocking", compare::bench_iceoryx2_blocking),
];
#[cfg(not(feature = "compare"))]
const COMPETITORS: &[(&str, TransportFn)] = &[];

type TransportFn = fn(&mut Group<'_>, Case);

/// Message sizes of `queue_throughput`, with their id labels.
const SIZES: [Size; 5] = [
    Size::new(8, "8B"),
    Size::new(64, "64B"),
    Size::new(1024, "1KiB"),
    Size::new(64 * 1024, "64KiB"),
    Size::new(1024 * 1024, "1MiB"),
];

/// Slots in every ring (procshare's and `bare_ring`'s) and messages in every crossbeam
/// channel, for messages up to 1KiB.
const RING_SLOTS: usize = 1024;

/// Bytes of `bare_ring`'s ring (and of crossbeam's buffer pool) for 64KiB and 1MiB
/// messages: 64 or 4 messages in flight.
const BYTE_RING: usize = 4 * 1024 * 1024;

/// The round-trip message.
type Ping = [u8; 8];

#[derive(Clone, Copy)]
struct Size {
    bytes: usize,
    label: &'static str,
}

impl Size {
    const fn new(bytes: usize, label: &'static str) -> Size {
        Size { bytes, label }
    }
}

/// One benchmark id to register.
#[derive(Clone, Copy)]
struct Case {
    transport: &'static str,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    Throughput(Size),
    Roundtrip,
}

impl Case {
    /// Sets the group's throughput for this case and returns its id.
    fn start(self, group: &mut Group<'_>) -> BenchmarkId {
        match self.kind {
            Kind::Throughput(size) => {
                group.throughput(Throughput::Bytes(size.bytes as u64));
                BenchmarkId::new(self.transport, size.label)
            }
            Kind::Roundtrip => BenchmarkId::from_parameter(self.transport),
        }
    }
}

// ─── Messages: stamping and touching ──────────────────────────────────────────────────

/// Marks message `i` of a round: its first and last byte become `i as u8`.
#[inline(always)]
fn stamp(msg: &mut [u8], i: u64) {
    let last = msg.len() - 1;
    msg[0] = i as u8;
    msg[last] = i as u8;
}

/// What the receiver reads of each message: its first and last byte.
#[inline(always)]
fn touch(msg: &[u8]) -> u64 {
    u64::from(msg[0]) + u64::from(msg[msg.len() - 1])
}

/// The sum of `touch` over messages `0..iters` of a round, each stamped by `stamp`.
fn touch_sum(iters: u64) -> u64 {
    let (laps, rest) = (iters / 256, iters % 256);
    2 * (laps * (255 * 256 / 2) + rest * rest.saturating_sub(1) / 2)
}

// ─── The peer and the rounds ──────────────────────────────────────────────────────────

/// One measured round: times `consumer(iters)` against the peer's half (see
/// `common::timed_round`) and checks the sum it returns against [`touch_sum`].
fn timed_round(
    control: &Control,
    iters: u64,
    consumer: &mut impl FnMut(u64) -> u64,
    check_peer: &mut impl FnMut(),
) -> Duration {
    let (elapsed, sum) = common::timed_round(control, iters, consumer, check_peer);
    assert_eq!(
        sum,
        touch_sum(iters),
        "the messages received are not the {iters} sent"
    );
    elapsed
}

/// Registers `case`, whose peer runs in a forked process (forked on the first measured
/// batch, so an id filtered out forks nothing) with `peer_state` moved into it, and
/// whose other half is `consumer`, timed in this process.
fn run_forked<S>(
    group: &mut Group<'_>,
    case: Case,
    peer_state: S,
    peer_round: PeerFn<S>,
    mut consumer: impl FnMut(u64) -> u64,
) {
    let id = case.start(group);
    let rounds = Rounds::new();
    let mut peer_state = Some(peer_state);
    let mut peer: Option<Peer> = None;
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let peer = peer.get_or_insert_with(|| {
                let state = peer_state.take().expect("the peer is forked once");
                // The peer allocates nothing in its loops: its buffers are preallocated in
                // `state`, and the procshare rings allocate nothing on their success paths.
                Peer::fork(rounds.control(), state, peer_round)
            });
            timed_round(rounds.control(), iters, &mut consumer, &mut || {
                peer.check(case.transport)
            })
        });
    });
    if let Some(peer) = peer {
        peer.finish(rounds.control(), case.transport);
    }
}

/// Like [`run_forked`], but the peer is a thread of this process (for the in-process
/// reference). The thread is joined before this returns, so the process is
/// single-threaded again when the next id forks.
fn run_threaded<S: Send>(
    group: &mut Group<'_>,
    case: Case,
    peer_state: S,
    peer_round: PeerFn<S>,
    mut consumer: impl FnMut(u64) -> u64,
) {
    let id = case.start(group);
    let rounds = Rounds::new();
    let control = rounds.control();
    let mut peer_state = Some(peer_state);
    // `move`: on a panic, the consumer (one end of the transport) and the quit guard drop
    // while unwinding out of this closure, which releases the peer thread before `scope`
    // joins it.
    std::thread::scope(move |scope| {
        let _quit = QuitOnDrop(control);
        let mut peer = None;
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let peer = peer.get_or_insert_with(|| {
                    let mut state = peer_state.take().expect("the peer is spawned once");
                    let seen = common::peer_start(control);
                    scope.spawn(move || common::peer_main(control, &mut state, peer_round, seen))
                });
                let mut check_peer = || {
                    assert!(
                        !peer.is_finished(),
                        "{}: the peer thread exited mid-round",
                        case.transport
                    );
                };
                timed_round(control, iters, &mut consumer, &mut check_peer)
            });
        });
        if let Some(peer) = peer {
            drop(_quit);
            let outcome = peer.join().expect("the peer thread panicked");
            assert_eq!(
                outcome,
                Ok(()),
                "{}: the peer thread failed",
                case.transport
            );
        }
    });
}

// ─── spsc and channel: procshare's Pod rings ──────────────────────────────────────────

/// One of procshare's Pod rings (`spsc`, `channel`): how to make one for any message
/// type, and its blocking send and receive, so that both are benchmarked by the same
/// code ([`bench_pod_ring`]).
trait PodRing {
    type Tx<T: ShmSafe + Copy + Send>;
    type Rx<T: ShmSafe + Copy + Send>;
    fn make<T: ShmSafe + Copy + Send>(slots: usize) -> (Self::Tx<T>, Self::Rx<T>);
    /// Blocking send; `false` when the receiver is gone.
    fn put<T: ShmSafe + Copy + Send>(tx: &Self::Tx<T>, msg: T) -> bool;
    /// Blocking receive.
    fn take<T: ShmSafe + Copy + Send>(rx: &Self::Rx<T>) -> T;
}

/// `procshare::spsc`.
struct Spsc;

impl PodRing for Spsc {
    type Tx<T: ShmSafe + Copy + Send> = procshare::spsc::Sender<T>;
    type Rx<T: ShmSafe + Copy + Send> = procshare::spsc::Receiver<T>;

    fn make<T: ShmSafe + Copy + Send>(slots: usize) -> (Self::Tx<T>, Self::Rx<T>) {
        procshare::spsc::<T>(slots).expect("creating the ring")
    }

    #[inline]
    fn put<T: ShmSafe + Copy + Send>(tx: &Self::Tx<T>, msg: T) -> bool {
        tx.send(msg).is_ok()
    }

    #[inline]
    fn take<T: ShmSafe + Copy + Send>(rx: &Self::Rx<T>) -> T {
        rx.recv().expect("spsc recv")
    }
}

/// `procshare::channel` (the MPMC ring).
struct Channel;

impl PodRing for Channel {
    type Tx<T: ShmSafe + Copy + Send> = procshare::channel::Sender<T>;
    type Rx<T: ShmSafe + Copy + Send> = procshare::channel::Receiver<T>;

    fn make<T: ShmSafe + Copy + Send>(slots: usize) -> (Self::Tx<T>, Self::Rx<T>) {
        procshare::channel::<T>(slots).expect("creating the ring")
    }

    #[inline]
    fn put<T: ShmSafe + Copy + Send>(tx: &Self::Tx<T>, msg: T) -> bool {
        tx.send(msg).is_ok()
    }

    #[inline]
    fn take<T: ShmSafe + Copy + Send>(rx: &Self::Rx<T>) -> T {
        rx.recv().expect("channel recv")
    }
}

/// `spsc` and `channel`: blocking `send`/`recv` of `[u8; N]` messages (and two rings of
/// [`Ping`]s for round trips).
fn bench_pod_ring<R: PodRing>(group: &mut Group<'_>, case: Case) {
    match case.kind {
        Kind::Throughput(Size { bytes: 8, .. }) => pod_throughput::<R, 8>(group, case),
        Kind::Throughput(Size { bytes: 64, .. }) => pod_throughput::<R, 64>(group, case),
        Kind::Throughput(Size { bytes: 1024, .. }) => pod_throughput::<R, 1024>(group, case),
        // Pod rings for the sizes that fit a slot: no 64KiB or 1MiB ids.
        Kind::Throughput(_) => {}
        Kind::Roundtrip => pod_roundtrip::<R>(group, case),
    }
}

fn pod_throughput<R: PodRing, const N: usize>(group: &mut Group<'_>, case: Case) {
    let (tx, rx) = R::make::<[u8; N]>(RING_SLOTS);
    run_forked(
        group,
        case,
        (tx, [0u8; N]),
        |(tx, msg), iters| {
            for i in 0..iters {
                stamp(msg, i);
                if !R::put(tx, *msg) {
                    return Err("ring send failed: the receiver is gone");
                }
            }
            Ok(())
        },
        move |iters| {
            let mut sum = 0;
            for _ in 0..iters {
                // black_box: the whole message is copied out, not just the bytes touched.
                let msg = black_box(R::take(&rx));
                sum += touch(&msg);
            }
            sum
        },
    );
}

fn pod_roundtrip<R: PodRing>(group: &mut Group<'_>, case: Case) {
    let (ping_tx, ping_rx) = R::make::<Ping>(RING_SLOTS);
    let (pong_tx, pong_rx) = R::make::<Ping>(RING_SLOTS);
    run_forked(
        group,
        case,
        (ping_rx, pong_tx),
        |(ping_rx, pong_tx), iters| {
            for _ in 0..iters {
                if !R::put(pong_tx, R::take(ping_rx)) {
                    return Err("ring send failed: the receiver is gone");
                }
            }
            Ok(())
        },
        move |iters| {
            let mut sum = 0;
            let mut ping = Ping::default();
            for i in 0..iters {
                stamp(&mut ping, i);
                assert!(R::put(&ping_tx, ping), "ring send failed");
                sum += touch(&R::take(&pong_rx));
            }
            sum
        },
    );
}

/// Messages per in-place batch (`spsc_inplace`): one index update and one wake check
/// per batch instead of per message.
const INPLACE_BATCH: u64 = 64;

fn bench_spsc_inplace(group: &mut Group<'_>, case: Case) {
    match case.kind {
        Kind::Throughput(Size { bytes: 8, .. }) => spsc_inplace_throughput::<8>(group, case),
        Kind::Throughput(Size { bytes: 64, .. }) => spsc_inplace_throughput::<64>(group, case),
        Kind::Throughput(Size { bytes: 1024, .. }) => {
            spsc_inplace_throughput::<1024>(group, case);
        }
        // In-place round trips are `spsc`'s: one message per batch.
        _ => {}
    }
}

/// `spsc_inplace`: the producer writes each message straight into its slot
/// (`send_batch_with`), the consumer copies each out of its slot into its own buffer
/// (`recv_batch_with`): one copy each side, as `bare_ring`.
fn spsc_inplace_throughput<const N: usize>(group: &mut Group<'_>, case: Case) {
    let (tx, rx) = procshare::spsc::<[u8; N]>(RING_SLOTS).expect("creating the ring");
    run_forked(
        group,
        case,
        (tx, [0u8; N]),
        |(tx, msg), iters| {
            let mut i = 0;
            while i < iters {
                let n = tx
                    .send_batch_with((iters - i).min(INPLACE_BATCH) as usize, |_, slot| {
                        stamp(msg, i);
                        *slot = *msg;
                        i += 1;
                    })
                    .map_err(|_| "ring send failed: the receiver is gone")?;
                debug_assert!(n > 0);
            }
            Ok(())
        },
        move |iters| {
            let (mut sum, mut got) = (0, 0);
            let mut buf = [0u8; N];
            while got < iters {
                got += rx
                    .recv_batch_with((iters - got) as usize, |m| {
                        buf = *m;
                        sum += touch(black_box(&buf));
                    })
                    .expect("spsc recv") as u64;
            }
            sum
        },
    );
}

fn bench_channel_inplace(group: &mut Group<'_>, case: Case) {
    match case.kind {
        Kind::Throughput(Size { bytes: 8, .. }) => channel_inplace_throughput::<8>(group, case),
        Kind::Throughput(Size { bytes: 64, .. }) => channel_inplace_throughput::<64>(group, case),
        Kind::Throughput(Size { bytes: 1024, .. }) => {
            channel_inplace_throughput::<1024>(group, case);
        }
        _ => {}
    }
}

/// `channel_inplace`: `channel`'s `send_with` / `recv_with`, one message per call: the
/// producer writes into the claimed slot, the consumer copies out of it into its buffer.
fn channel_inplace_throughput<const N: usize>(group: &mut Group<'_>, case: Case) {
    let (tx, rx) = procshare::channel::<[u8; N]>(RING_SLOTS).expect("creating the ring");
    run_forked(
        group,
        case,
        (tx, [0u8; N]),
        |(tx, msg), iters| {
            for i in 0..iters {
                stamp(msg, i);
                tx.send_with(|slot| *slot = *msg)
                    .map_err(|_| "ring send failed: the receiver is gone")?;
            }
            Ok(())
        },
        move |iters| {
            let mut sum = 0;
            let mut buf = [0u8; N];
            for _ in 0..iters {
                rx.recv_with(|m| buf = *m).expect("channel recv");
                sum += touch(black_box(&buf));
            }
            sum
        },
    );
}

// ─── pipe: procshare::pipe() ──────────────────────────────────────────────────────────

fn bench_pipe(group: &mut Group<'_>, case: Case) {
    let (mine, theirs) = procshare::pipe().expect("creating a pipe");
    match case.kind {
        Kind::Throughput(size) => {
            let mut buf = Vec::with_capacity(size.bytes);
            run_forked(
                group,
                case,
                (theirs, vec![0u8; size.bytes]),
                |(conn, msg), iters| {
                    for i in 0..iters {
                        stamp(msg, i);
                        conn.send_bytes(msg).map_err(|_| "pipe send_bytes failed")?;
                    }
                    Ok(())
                },
                move |iters| {
                    let mut sum = 0;
                    for _ in 0..iters {
                        let len = mine
                            .recv_bytes_into(&mut buf)
                            .expect("pipe recv_bytes_into");
                        assert_eq!(len, size.bytes, "pipe: a message of the wrong length");
                        sum += touch(&buf);
                    }
                    sum
                },
            );
        }
        Kind::Roundtrip => {
            let mut pong = Vec::with_capacity(size_of::<Ping>());
            run_forked(
                group,
                case,
                (theirs, Vec::with_capacity(size_of::<Ping>())),
                |(conn, buf), iters| {
                    for _ in 0..iters {
                        conn.recv_bytes_into(buf)
                            .map_err(|_| "pipe recv_bytes_into failed")?;
                        conn.send_bytes(buf).map_err(|_| "pipe send_bytes failed")?;
                    }
                    Ok(())
                },
                move |iters| round_trips_on_pipe(&mine, &mut pong, iters),
            );
        }
    }
}

fn round_trips_on_pipe(conn: &Connection, pong: &mut Vec<u8>, iters: u64) -> u64 {
    let mut sum = 0;
    let mut ping = Ping::default();
    for i in 0..iters {
        stamp(&mut ping, i);
        conn.send_bytes(&ping).expect("pipe send_bytes");
        let len = conn.recv_bytes_into(pong).expect("pipe recv_bytes_into");
        assert_eq!(len, ping.len(), "pipe: a pong of the wrong length");
        sum += touch(pong);
    }
    sum
}

// ─── queue and bytes_loan: procshare::Queue<Vec<u8>> and ByteQueue's loan API ─────────

/// Ring size for the byte queues: big enough that a 1 MiB message is one record (a record
/// may take a quarter of the ring) with several in flight.
const QUEUE_RING: usize = 2 * 1024 * 1024;

fn byte_queue() -> procshare::ByteQueue {
    procshare::ByteQueue::builder()
        .capacity(QUEUE_RING)
        .bytes()
        .expect("creating a byte queue")
}

/// `queue`: `Queue<Vec<u8>>`, postcard-encoded straight into the ring and decoded into a
/// fresh `Vec` by `get`, as a user of Python's `Queue` would use it.
fn bench_queue(group: &mut Group<'_>, case: Case) {
    let make = || -> procshare::Queue<Vec<u8>> {
        procshare::Queue::builder()
            .capacity(QUEUE_RING)
            .build()
            .expect("creating a queue")
    };
    match case.kind {
        Kind::Throughput(size) => {
            let q = make();
            run_forked(
                group,
                case,
                (q.clone(), vec![0u8; size.bytes]),
                |(q, msg), iters| {
                    for i in 0..iters {
                        stamp(msg, i);
                        q.put(msg).map_err(|_| "queue put failed")?;
                    }
                    Ok(())
                },
                move |iters| {
                    let mut sum = 0;
                    for _ in 0..iters {
                        let msg = q.get().expect("queue get");
                        assert_eq!(
                            msg.len(),
                            size.bytes,
                            "queue: a message of the wrong length"
                        );
                        sum += touch(&msg);
                    }
                    sum
                },
            );
        }
        Kind::Roundtrip => {
            let (ping, pong) = (make(), make());
            run_forked(
                group,
                case,
                (ping.clone(), pong.clone()),
                |(ping, pong), iters| {
                    for _ in 0..iters {
                        let msg = ping.get().map_err(|_| "queue get failed")?;
                        pong.put(&msg).map_err(|_| "queue put failed")?;
                    }
                    Ok(())
                },
                move |iters| {
                    let mut sum = 0;
                    let mut msg = Ping::default().to_vec();
                    for i in 0..iters {
                        stamp(&mut msg, i);
                        ping.put(&msg).expect("queue put");
                        sum += touch(&pong.get().expect("queue get"));
                    }
                    sum
                },
            );
        }
    }
}

/// `queue_into`: `Queue<Vec<u8>>` as `queue`, but received with `get_into` into one
/// reused `Vec` (no allocation per message).
fn bench_queue_into(group: &mut Group<'_>, case: Case) {
    let Kind::Throughput(size) = case.kind else {
        return; // the round trip is `queue`'s
    };
    let q: procshare::Queue<Vec<u8>> = procshare::Queue::builder()
        .capacity(QUEUE_RING)
        .build()
        .expect("creating a queue");
    run_forked(
        group,
        case,
        (q.clone(), vec![0u8; size.bytes]),
        |(q, msg), iters| {
            for i in 0..iters {
                stamp(msg, i);
                q.put(msg).map_err(|_| "queue put failed")?;
            }
            Ok(())
        },
        move |iters| {
            let mut sum = 0;
            let mut msg = Vec::new();
            for _ in 0..iters {
                q.get_into(&mut msg).expect("queue get_into");
                assert_eq!(msg.len(), size.bytes, "queue_into: wrong length");
                sum += touch(&msg);
            }
            sum
        },
    );
}

/// `queue_u64`: `Queue<u64>` (8B only): a serde scalar through the byte queue, against
/// the Pod rings' `[u8; 8]`.
fn bench_queue_u64(group: &mut Group<'_>, case: Case) {
    if !matches!(case.kind, Kind::Throughput(Size { bytes: 8, .. })) {
        return;
    }
    let q: procshare::Queue<u64> = procshare::Queue::builder()
        .capacity(QUEUE_RING)
        .build()
        .expect("creating a queue");
    run_forked(
        group,
        case,
        q.clone(),
        |q, iters| {
            for i in 0..iters {
                let mut msg = [0u8; 8];
                stamp(&mut msg, i);
                q.put(&u64::from_le_bytes(msg))
                    .map_err(|_| "queue put failed")?;
            }
            Ok(())
        },
        move |iters| {
            let mut sum = 0;
            for _ in 0..iters {
                sum += touch(&q.get().expect("queue get").to_le_bytes());
            }
            sum
        },
    );
}

/// Reads every byte of `bytes`, a word at a time (a byte-at-a-time sum runs at ~1 byte per
/// cycle and would measure the checksum, not the queue).
fn word_sum(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder().iter().map(|&b| u64::from(b)).sum::<u64>();
    words
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .fold(tail, u64::wrapping_add)
}

/// `bytes_loan`: `ByteQueue::send_with` writes each message in place in the ring, and
/// `recv_with` lends it in place to the consumer, which reads every byte (a checksum): one
/// copy in all, the producer's.
fn bench_bytes_loan(group: &mut Group<'_>, case: Case) {
    match case.kind {
        Kind::Throughput(size) => {
            let q = byte_queue();
            run_forked(
                group,
                case,
                (q.clone(), size.bytes),
                |(q, len), iters| {
                    for i in 0..iters {
                        q.send_with(*len, |buf| {
                            buf.fill(0);
                            stamp(buf, i);
                        })
                        .map_err(|_| "bytes_loan send_with failed")?;
                    }
                    Ok(())
                },
                move |iters| {
                    let mut sum = 0;
                    let mut checksum = 0u64;
                    for _ in 0..iters {
                        sum += q
                            .recv_with(|bytes| {
                                assert_eq!(bytes.len(), size.bytes, "bytes_loan: wrong length");
                                checksum = checksum.wrapping_add(word_sum(bytes));
                                touch(bytes)
                            })
                            .expect("bytes_loan recv_with");
                    }
                    black_box(checksum);
                    sum
                },
            );
        }
        Kind::Roundtrip => {
            let (ping, pong) = (byte_queue(), byte_queue());
            run_forked(
                group,
                case,
                (ping.clone(), pong.clone()),
                |(ping, pong), iters| {
                    for _ in 0..iters {
                        let mut msg = Ping::default();
                        ping.recv_with(|b| msg.copy_from_slice(b))
                            .map_err(|_| "bytes_loan recv_with failed")?;
                        pong.send_with(msg.len(), |b| b.copy_from_slice(&msg))
                            .map_err(|_| "bytes_loan send_with failed")?;
                    }
                    Ok(())
                },
                move |iters| {
                    let mut sum = 0;
                    for i in 0..iters {
                        ping.send_with(size_of::<Ping>(), |b| stamp(b, i))
                            .expect("bytes_loan send_with");
                        sum += pong.recv_with(touch).expect("bytes_loan recv_with");
                    }
                    sum
                },
            );
        }
    }
}

// ─── unix_socket and os_pipe: raw descriptors ─────────────────────────────────────────

/// Writes all of `buf` to `fd`, riding out EINTR. Allocates nothing.
fn write_all(fd: &OwnedFd, mut buf: &[u8]) -> Result<(), &'static str> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes and `fd` is open.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n > 0 {
            buf = &buf[n as usize..];
        } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err("write failed: the reader is gone");
        }
    }
    Ok(())
}

/// Fills all of `buf` from `fd`, riding out EINTR. Allocates nothing.
fn read_exact(fd: &OwnedFd, mut buf: &mut [u8]) -> Result<(), &'static str> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes and `fd` is open.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            buf = &mut buf[n as usize..];
        } else if n == 0 {
            return Err("read hit end of file: the writer is gone");
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err("read failed");
        }
    }
    Ok(())
}

/// A connected `AF_UNIX` stream socket pair.
fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for the new descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: on success both are fresh descriptors that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A pipe: `(read end, write end)`.
fn os_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for the new descriptors.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: on success both are fresh descriptors that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn bench_unix_socket(group: &mut Group<'_>, case: Case) {
    let (mine, theirs) = socketpair();
    match case.kind {
        Kind::Throughput(size) => fd_throughput(group, case, size, mine, theirs),
        Kind::Roundtrip => fd_roundtrip(group, case, [mine.try_clone().unwrap(), mine], theirs),
    }
}

fn bench_os_pipe(group: &mut Group<'_>, case: Case) {
    let (read_end, write_end) = os_pipe();
    match case.kind {
        Kind::Throughput(size) => fd_throughput(group, case, size, read_end, write_end),
        Kind::Roundtrip => {
            let (pong_read, pong_write) = os_pipe();
            // The peer reads pings from `read_end` and writes pongs to `pong_write`.
            let (peer_read, peer_write) = (read_end, pong_write);
            fd_roundtrip_split(group, case, [write_end, pong_read], [peer_read, peer_write]);
        }
    }
}

/// The peer writes `size`-byte messages to `theirs`; this process reads them from `mine`.
fn fd_throughput(group: &mut Group<'_>, case: Case, size: Size, mine: OwnedFd, theirs: OwnedFd) {
    let mut buf = vec![0u8; size.bytes];
    run_forked(
        group,
        case,
        (theirs, vec![0u8; size.bytes]),
        |(fd, msg), iters| {
            for i in 0..iters {
                stamp(msg, i);
                write_all(fd, msg)?;
            }
            Ok(())
        },
        move |iters| {
            let mut sum = 0;
            for _ in 0..iters {
                read_exact(&mine, &mut buf).expect("read_exact");
                sum += touch(&buf);
            }
            sum
        },
    );
}

/// Round trips over one duplex descriptor per side (`mine` holds two copies of it: the
/// one this process writes pings to and the one it reads pongs from).
fn fd_roundtrip(group: &mut Group<'_>, case: Case, mine: [OwnedFd; 2], theirs: OwnedFd) {
    let peer = [theirs.try_clone().expect("dup"), theirs];
    fd_roundtrip_split(group, case, mine, peer);
}

/// Round trips: this process writes pings to `mine[0]` and reads pongs from `mine[1]`;
/// the peer reads pings from `theirs[0]` and writes them back to `theirs[1]`.
fn fd_roundtrip_split(group: &mut Group<'_>, case: Case, mine: [OwnedFd; 2], theirs: [OwnedFd; 2]) {
    run_forked(
        group,
        case,
        theirs,
        |[from, to], iters| {
            let mut buf = Ping::default();
            for _ in 0..iters {
                read_exact(from, &mut buf)?;
                write_all(to, &buf)?;
            }
            Ok(())
        },
        move |iters| {
            let [to, from] = &mine;
            let mut sum = 0;
            let (mut ping, mut pong) = (Ping::default(), Ping::default());
            for i in 0..iters {
                stamp(&mut ping, i);
                write_all(to, &ping).expect("write_all");
                read_exact(from, &mut pong).expect("read_exact");
                sum += touch(&pong);
            }
            sum
        },
    );
}

// ─── bare_ring: the floor ─────────────────────────────────────────────────────────────

/// One 128-byte line pair (Intel's adjacent-line prefetcher pulls lines in pairs).
#[repr(C, align(128))]
struct Line(AtomicU64);

#[repr(C)]
struct SpinHeader {
    /// Messages published by the producer.
    tail: Line,
    /// Messages consumed by the consumer.
    head: Line,
}

/// A minimal SPSC ring in a shared segment: positions that only grow, slots of a fixed
/// size, busy-polling on both sides, no futex, no liveness tracking, no checks beyond
/// what the benchmark's own correctness needs.
struct SpinRing {
    header: *const SpinHeader,
    slots: *mut u8,
    slot_len: usize,
    /// A power of two.
    capacity: u64,
    _segment: Segment,
}

impl SpinRing {
    fn new(slot_len: usize, capacity: usize) -> Rc<SpinRing> {
        assert!(capacity.is_power_of_two());
        let bytes = 128 + size_of::<SpinHeader>() + slot_len * capacity;
        let segment = Segment::anonymous(bytes).expect("creating the spin ring's segment");
        let base = segment.as_ptr();
        let pad = base.align_offset(128);
        assert!(pad < 128);
        // SAFETY: `pad < 128`, and the segment has 128 spare bytes for it.
        let header = unsafe { base.add(pad) };
        // SAFETY: the slots follow the header; header and slots end within `bytes`.
        let slots = unsafe { header.add(size_of::<SpinHeader>()) };
        Rc::new(SpinRing {
            header: header.cast(),
            slots,
            slot_len,
            capacity: capacity as u64,
            _segment: segment,
        })
    }

    fn header(&self) -> &SpinHeader {
        // SAFETY: `header` is 128-byte aligned inside the segment, which `self` keeps
        // mapped; its bytes start zeroed (valid atomics) and are only accessed atomically.
        unsafe { &*self.header }
    }

    fn slot(&self, pos: u64) -> *mut u8 {
        let index = (pos & (self.capacity - 1)) as usize;
        // SAFETY: `index < capacity`, so the slot lies within the segment.
        unsafe { self.slots.add(index * self.slot_len) }
    }

    fn split(self: Rc<Self>) -> (SpinProducer, SpinConsumer) {
        let producer = SpinProducer {
            ring: Rc::clone(&self),
            tail: 0,
            head_seen: 0,
        };
        (
            producer,
            SpinConsumer {
                ring: self,
                head: 0,
                tail_seen: 0,
            },
        )
    }
}

/// How `bare_ring` waits: `spin_loop` only, for [`Stall::YIELD_AFTER`] polls (some 20 µs,
/// far longer than a hand-over takes on two free CPUs), then `sched_yield` between polls
/// (which returns at once when nothing else wants the CPU), so that when both sides share
/// one CPU (pinned, or a busy machine) a hand-over costs ~20 µs rather than a scheduler
/// time slice. Still no futex: nobody ever sleeps. A 60 s clock then catches a peer that
/// died mid-round.
struct Stall {
    spins: u64,
    since: Option<Instant>,
}

impl Stall {
    const YIELD_AFTER: u64 = 1 << 10;

    #[inline(always)]
    fn new() -> Stall {
        Stall {
            spins: 0,
            since: None,
        }
    }

    #[inline(always)]
    fn spin(&mut self) {
        self.spins += 1;
        if self.spins < Self::YIELD_AFTER {
            spin_loop();
        } else {
            self.slow();
        }
    }

    #[cold]
    fn slow(&mut self) {
        std::thread::yield_now();
        if self.spins % 1024 == 0 {
            self.check();
        }
    }

    #[cold]
    fn check(&mut self) {
        let now = Instant::now();
        match self.since {
            None => self.since = Some(now),
            Some(since) if now - since > Duration::from_secs(60) => {
                die("bare_ring: the other side made no progress for 60 s\n")
            }
            Some(_) => {}
        }
    }
}

struct SpinProducer {
    ring: Rc<SpinRing>,
    tail: u64,
    head_seen: u64,
}

impl SpinProducer {
    #[inline]
    fn send(&mut self, msg: &[u8]) {
        let ring = &*self.ring;
        assert_eq!(msg.len(), ring.slot_len);
        if self.tail - self.head_seen >= ring.capacity {
            let mut stall = Stall::new();
            loop {
                self.head_seen = ring.header().head.0.load(Ordering::Acquire);
                if self.tail - self.head_seen < ring.capacity {
                    break;
                }
                stall.spin();
            }
        }
        // SAFETY: the slot at `tail` is free (the consumer has moved past it: tail - head <
        // capacity) and only this producer writes it until `tail` is published below; `msg`
        // is `slot_len` bytes and cannot overlap the shared mapping's slot.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), ring.slot(self.tail), msg.len()) };
        self.tail += 1;
        ring.header().tail.0.store(self.tail, Ordering::Release);
    }
}

struct SpinConsumer {
    ring: Rc<SpinRing>,
    head: u64,
    tail_seen: u64,
}

impl SpinConsumer {
    #[inline]
    fn recv(&mut self, out: &mut [u8]) {
        let ring = &*self.ring;
        assert_eq!(out.len(), ring.slot_len);
        if self.head == self.tail_seen {
            let mut stall = Stall::new();
            loop {
                self.tail_seen = ring.header().tail.0.load(Ordering::Acquire);
                if self.head != self.tail_seen {
                    break;
                }
                stall.spin();
            }
        }
        // SAFETY: the slot at `head` is published (head < tail, and the acquire load of
        // `tail` made the producer's writes visible) and the producer does not touch it
        // until `head` is published below; `out` is `slot_len` bytes of local memory.
        unsafe { std::ptr::copy_nonoverlapping(ring.slot(self.head), out.as_mut_ptr(), out.len()) };
        self.head += 1;
        ring.header().head.0.store(self.head, Ordering::Release);
    }
}

fn bench_bare_ring(group: &mut Group<'_>, case: Case) {
    match case.kind {
        Kind::Throughput(size) => {
            let slots = if size.bytes <= 1024 {
                RING_SLOTS
            } else {
                BYTE_RING / size.bytes
            };
            let (producer, mut consumer) = SpinRing::new(size.bytes, slots).split();
            let mut buf = vec![0u8; size.bytes];
            run_forked(
                group,
                case,
                (producer, vec![0u8; size.bytes]),
                |(producer, msg), iters| {
                    for i in 0..iters {
                        stamp(msg, i);
                        producer.send(msg);
                    }
                    Ok(())
                },
                move |iters| {
                    let mut sum = 0;
                    for _ in 0..iters {
                        consumer.recv(&mut buf);
                        sum += touch(black_box(&buf));
                    }
                    sum
                },
            );
        }
        Kind::Roundtrip => {
            let (mut ping_tx, ping_rx) = SpinRing::new(size_of::<Ping>(), RING_SLOTS).split();
            let (pong_tx, mut pong_rx) = SpinRing::new(size_of::<Ping>(), RING_SLOTS).split();
            run_forked(
                group,
                case,
                (ping_rx, pong_tx),
                |(ping_rx, pong_tx), iters| {
                    let mut buf = Ping::default();
                    for _ in 0..iters {
                        ping_rx.recv(&mut buf);
                        pong_tx.send(&buf);
                    }
                    Ok(())
                },
                move |iters| {
                    let mut sum = 0;
                    let (mut ping, mut pong) = (Ping::default(), Ping::default());
                    for i in 0..iters {
                        stamp(&mut ping, i);
                        ping_tx.send(&ping);
                        pong_rx.recv(&mut pong);
                        sum += touch(&pong);
                    }
                    sum
                },
            );
        }
    }
}

// ─── crossbeam_inproc: the in-process reference ───────────────────────────────────────

fn bench_crossbeam_inproc(group: &mut Group<'_>, case: Case) {
    match case.kind {
        Kind::Throughput(Size { bytes: 8, .. }) => crossbeam_array_throughput::<8>(group, case),
        Kind::Throughput(Size { bytes: 64, .. }) => crossbeam_array_throughput::<64>(group, case),
        Kind::Throughput(Size { bytes: 1024, .. }) => {
            crossbeam_array_throughput::<1024>(group, case);
        }
        Kind::Throughput(size) => crossbeam_vec_throughput(group, case, size),
        Kind::Roundtrip => {
            let (ping_tx, ping_rx) = crossbeam_channel::bounded::<Ping>(RING_SLOTS);
            let (pong_tx, pong_rx) = crossbeam_channel::bounded::<Ping>(RING_SLOTS);
            run_threaded(
                group,
                case,
                (ping_rx, pong_tx),
                |(ping_rx, pong_tx), iters| {
                    for _ in 0..iters {
                        let ping = ping_rx.recv().map_err(|_| "crossbeam recv failed")?;
                        pong_tx.send(ping).map_err(|_| "crossbeam send failed")?;
                    }
                    Ok(())
                },
                move |iters| {
                    let mut sum = 0;
                    let mut ping = Ping::default();
                    for i in 0..iters {
                        stamp(&mut ping, i);
                        ping_tx.send(ping).expect("crossbeam send");
                        sum += touch(&pong_rx.recv().expect("crossbeam recv"));
                    }
                    sum
                },
            );
        }
    }
}

fn crossbeam_array_throughput<const N: usize>(group: &mut Group<'_>, case: Case) {
    let (tx, rx) = crossbeam_channel::bounded::<[u8; N]>(RING_SLOTS);
    run_threaded(
        group,
        case,
        tx,
        |tx, iters| {
            let mut msg = [0u8; N];
            for i in 0..iters {
                stamp(&mut msg, i);
                tx.send(msg).map_err(|_| "crossbeam send failed")?;
            }
            Ok(())
        },
        move |iters| {
            let mut sum = 0;
            for _ in 0..iters {
                let msg = black_box(rx.recv().expect("crossbeam recv"));
                sum += touch(&msg);
            }
            sum
        },
    );
}

/// Large messages between threads: `Vec<u8>`s from a pool, sent back after use.
fn crossbeam_vec_throughput(group: &mut Group<'_>, case: Case, size: Size) {
    let in_flight = BYTE_RING / size.bytes;
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(in_flight);
    let (free_tx, free_rx) = crossbeam_channel::bounded::<Vec<u8>>(in_flight);
    for _ in 0..in_flight {
        free_tx
            .send(vec![0u8; size.bytes])
            .expect("filling the pool");
    }
    run_threaded(
        group,
        case,
        (tx, free_rx, vec![0u8; size.bytes]),
        |(tx, free_rx, source), iters| {
            for i in 0..iters {
                let mut msg = free_rx.recv().map_err(|_| "crossbeam recv failed")?;
                stamp(source, i);
                msg.copy_from_slice(source);
                tx.send(msg).map_err(|_| "crossbeam send failed")?;
            }
            Ok(())
        },
        move |iters| {
            let mut sum = 0;
            for _ in 0..iters {
                let msg = rx.recv().expect("crossbeam recv");
                sum += touch(black_box(&msg));
                free_tx.send(msg).expect("returning a buffer to the pool");
            }
            sum
        },
    );
}

// ─── Groups ───────────────────────────────────────────────────────────────────────────

fn queue_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue_throughput");
    for &(transport, bench) in TRANSPORTS.iter().chain(COMPETITORS) {
        for size in SIZES {
            let kind = Kind::Throughput(size);
            bench(&mut group, Case { transport, kind });
        }
    }
    group.finish();
}

fn queue_roundtrip(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue_roundtrip");
    for &(transport, bench) in TRANSPORTS.iter().chain(COMPETITORS) {
        let kind = Kind::Roundtrip;
        bench(&mut group, Case { transport, kind });
    }
    group.finish();
}

fn config() -> Criterion {
    // Command-line options (--warm-up-time, --measurement-time, --sample-size) override
    // these: criterion_group! applies `configure_from_args` after this.
    Criterion::default()
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = queue_throughput, queue_roundtrip
}
criterion_main!(benches);
