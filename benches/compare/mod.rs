//! The competitors (`--features compare`): servo's `ipc-channel` and `iceoryx2`, as
//! transports of `queue_throughput` and `queue_roundtrip`, run by the same harness as
//! procshare's own (a forked peer, the same stamping and checking).
//!
//! * `ipc_channel`: `ipc_channel::ipc::bytes_channel()` (a Unix socket with its own
//!   framing; `send(&[u8])`, `recv() -> Vec<u8>`, a fresh `Vec` per message, as its API
//!   gives it). Round trips use two channels.
//! * `iceoryx2`: publish-subscribe over `[u8]` slices of the message size, the producer
//!   writing each message into a loaned sample (`loan_slice_uninit`, `write_from_slice`,
//!   `send`), the consumer busy-polling `receive()` and copying each sample out into a
//!   buffer it owns. Back-pressure `RetryUntilDelivered` (a full subscriber buffer makes
//!   the producer retry, so nothing is lost). This is iceoryx2's polling mode: both sides
//!   spin, like `bare_ring`, and need a CPU each. The subscriber buffer holds as many
//!   messages as the other rings ([`RING_SLOTS`] up to 1KiB, [`BYTE_RING`] bytes above).
//!
//! * `iceoryx2_blocking` (round trips only): the same, but a receiver with nothing to take
//!   sleeps on an iceoryx2 event listener (`blocking_wait`) and every send is followed by
//!   a `notify` on the matching event service: iceoryx2's way to wait without spinning.
//!
//! iceoryx2 endpoints belong to a node of the process that creates them, so the peer
//! creates its own (lazily, on its first round) and the bench process waits, before it
//! sends the first ping, until the peer's subscriber is connected.

use iceoryx2::port::backpressure_strategy::BackpressureStrategy;
use iceoryx2::prelude::*;

use super::*;

type IoxPublisher = iceoryx2::port::publisher::Publisher<ipc::Service, [u8], ()>;
type IoxSubscriber = iceoryx2::port::subscriber::Subscriber<ipc::Service, [u8], ()>;
type IoxService =
    iceoryx2::service::port_factory::publish_subscribe::PortFactory<ipc::Service, [u8], ()>;

pub(super) fn bench_ipc_channel(group: &mut Group<'_>, case: Case) {
    use ipc_channel::ipc::{IpcBytesReceiver, IpcBytesSender, bytes_channel};
    let (tx, rx) = bytes_channel().expect("creating an ipc-channel");
    match case.kind {
        Kind::Throughput(size) => run_forked(
            group,
            case,
            (tx, vec![0u8; size.bytes]),
            |(tx, msg), iters| {
                for i in 0..iters {
                    stamp(msg, i);
                    tx.send(msg).map_err(|_| "ipc-channel send failed")?;
                }
                Ok(())
            },
            move |iters| {
                let mut sum = 0;
                for _ in 0..iters {
                    let msg = rx.recv().expect("ipc-channel recv");
                    sum += touch(&msg);
                }
                sum
            },
        ),
        Kind::Roundtrip => {
            let (pong_tx, pong_rx) = bytes_channel().expect("creating an ipc-channel");
            let peer: (IpcBytesReceiver, IpcBytesSender) = (rx, pong_tx);
            run_forked(
                group,
                case,
                peer,
                |(from, to), iters| {
                    for _ in 0..iters {
                        let ping = from.recv().map_err(|_| "ipc-channel recv failed")?;
                        to.send(&ping).map_err(|_| "ipc-channel send failed")?;
                    }
                    Ok(())
                },
                move |iters| {
                    let mut sum = 0;
                    let mut ping = Ping::default();
                    for i in 0..iters {
                        stamp(&mut ping, i);
                        tx.send(&ping).expect("ipc-channel send");
                        let pong = pong_rx.recv().expect("ipc-channel recv");
                        sum += touch(&pong);
                    }
                    sum
                },
            );
        }
    }
}

/// A service name no other run of this bench (or other process) uses.
fn iox_name(what: &str) -> ServiceName {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    format!("procshare-bench/{pid}/{what}/{n}")
        .as_str()
        .try_into()
        .expect("a valid iceoryx2 service name")
}

fn iox_node() -> Node<ipc::Service> {
    iceoryx2::prelude::set_log_level(LogLevel::Error);
    NodeBuilder::new()
        .create::<ipc::Service>()
        .expect("creating an iceoryx2 node")
}

fn iox_service(node: &Node<ipc::Service>, name: &ServiceName, buffer: usize) -> IoxService {
    node.service_builder(name)
        .publish_subscribe::<[u8]>()
        .enable_safe_overflow(false)
        .subscriber_max_buffer_size(buffer)
        .history_size(0)
        .max_publishers(1)
        .max_subscribers(1)
        .open_or_create()
        .expect("creating an iceoryx2 publish-subscribe service")
}

fn iox_publisher(service: &IoxService, size: usize) -> IoxPublisher {
    service
        .publisher_builder()
        .initial_max_slice_len(size)
        .backpressure_strategy(BackpressureStrategy::RetryUntilDelivered)
        .create()
        .expect("creating an iceoryx2 publisher")
}

fn iox_subscriber(service: &IoxService, buffer: usize) -> IoxSubscriber {
    service
        .subscriber_builder()
        .buffer_size(buffer)
        .create()
        .expect("creating an iceoryx2 subscriber")
}

/// Loans a sample, writes `msg` into it and sends it (retrying while the subscriber's
/// buffer is full, which `RetryUntilDelivered` does inside `send`, or while every sample
/// is still held by the subscriber).
fn iox_send(publisher: &IoxPublisher, msg: &[u8]) -> Result<(), &'static str> {
    loop {
        match publisher.loan_slice_uninit(msg.len()) {
            Ok(sample) => {
                let sample = sample.write_from_slice(msg);
                return sample.send().map(drop).map_err(|_| "iceoryx2 send failed");
            }
            Err(_) => spin_loop(),
        }
    }
}

/// Busy-polls for the next sample and copies it into `buf`.
fn iox_recv(subscriber: &IoxSubscriber, buf: &mut [u8]) -> Result<(), &'static str> {
    loop {
        match subscriber.receive() {
            Ok(Some(sample)) => {
                buf.copy_from_slice(sample.payload());
                return Ok(());
            }
            Ok(None) => spin_loop(),
            Err(_) => return Err("iceoryx2 receive failed"),
        }
    }
}

type IoxEvent = iceoryx2::service::port_factory::event::PortFactory<ipc::Service>;
type IoxListener = iceoryx2::port::listener::Listener<ipc::Service>;
type IoxNotifier = iceoryx2::port::notifier::Notifier<ipc::Service>;

fn iox_event(node: &Node<ipc::Service>, name: &ServiceName) -> IoxEvent {
    node.service_builder(name)
        .event()
        .max_notifiers(1)
        .max_listeners(1)
        .open_or_create()
        .expect("creating an iceoryx2 event service")
}

/// One direction of a blocking iceoryx2 link: samples, and an event per sample.
struct BlockingTx(IoxPublisher, IoxNotifier);
struct BlockingRx(IoxSubscriber, IoxListener);

impl BlockingTx {
    fn send(&self, msg: &[u8]) -> Result<(), &'static str> {
        iox_send(&self.0, msg)?;
        self.1
            .notify()
            .map(drop)
            .map_err(|_| "iceoryx2 notify failed")
    }
}

impl BlockingRx {
    /// Takes the next sample, sleeping on the listener while there is none (a notify
    /// that came first is kept by the listener, so the wait returns at once).
    fn recv(&self, buf: &mut [u8]) -> Result<(), &'static str> {
        loop {
            match self.0.receive() {
                Ok(Some(sample)) => {
                    buf.copy_from_slice(sample.payload());
                    return Ok(());
                }
                Ok(None) => {
                    self.1
                        .blocking_wait(|_| {})
                        .map_err(|_| "iceoryx2 wait failed")?;
                }
                Err(_) => return Err("iceoryx2 receive failed"),
            }
        }
    }
}

pub(super) fn bench_iceoryx2_blocking(group: &mut Group<'_>, case: Case) {
    if !matches!(case.kind, Kind::Roundtrip) {
        return;
    }
    let node = iox_node();
    let names = [
        iox_name("ping"),
        iox_name("pong"),
        iox_name("ping-event"),
        iox_name("pong-event"),
    ];
    let ping_service = iox_service(&node, &names[0], 1);
    let pong_service = iox_service(&node, &names[1], 1);
    let ping_event = iox_event(&node, &names[2]);
    let pong_event = iox_event(&node, &names[3]);
    let to_peer = BlockingTx(
        iox_publisher(&ping_service, size_of::<Ping>()),
        ping_event
            .notifier_builder()
            .create()
            .expect("creating an iceoryx2 notifier"),
    );
    let from_peer = BlockingRx(
        iox_subscriber(&pong_service, 1),
        pong_event
            .listener_builder()
            .create()
            .expect("creating an iceoryx2 listener"),
    );
    struct Peer {
        names: [ServiceName; 4],
        ports: Option<(Node<ipc::Service>, BlockingRx, BlockingTx)>,
    }
    let peer = Peer { names, ports: None };
    run_forked(
        group,
        case,
        peer,
        |peer, iters| {
            let names = &peer.names;
            let (_, from, to) = peer.ports.get_or_insert_with(|| {
                let node = iox_node();
                let ping = iox_service(&node, &names[0], 1);
                let pong = iox_service(&node, &names[1], 1);
                let ping_event = iox_event(&node, &names[2]);
                let pong_event = iox_event(&node, &names[3]);
                let from = BlockingRx(
                    iox_subscriber(&ping, 1),
                    ping_event.listener_builder().create().expect("listener"),
                );
                let to = BlockingTx(
                    iox_publisher(&pong, size_of::<Ping>()),
                    pong_event.notifier_builder().create().expect("notifier"),
                );
                (node, from, to)
            });
            let mut buf = Ping::default();
            for _ in 0..iters {
                from.recv(&mut buf)?;
                to.send(&buf)?;
            }
            Ok(())
        },
        move |iters| {
            let _keep = (&node, &pong_service);
            while ping_service.dynamic_config().number_of_subscribers() == 0
                || ping_event.dynamic_config().number_of_listeners() == 0
                || pong_event.dynamic_config().number_of_notifiers() == 0
            {
                spin_loop();
            }
            let mut sum = 0;
            let (mut ping, mut pong) = (Ping::default(), Ping::default());
            for i in 0..iters {
                stamp(&mut ping, i);
                to_peer.send(&ping).expect("iceoryx2 send");
                from_peer.recv(&mut pong).expect("iceoryx2 receive");
                sum += touch(&pong);
            }
            sum
        },
    );
}

pub(super) fn bench_iceoryx2(group: &mut Group<'_>, case: Case) {
    let node = iox_node();
    match case.kind {
        Kind::Throughput(size) => {
            let buffer = if size.bytes <= 1024 {
                RING_SLOTS
            } else {
                BYTE_RING / size.bytes
            };
            let name = iox_name("throughput");
            let service = iox_service(&node, &name, buffer);
            let subscriber = iox_subscriber(&service, buffer);
            let mut buf = vec![0u8; size.bytes];
            // The peer: its own node and publisher, made on its first round.
            struct Peer {
                name: ServiceName,
                bytes: usize,
                buffer: usize,
                msg: Vec<u8>,
                ports: Option<(Node<ipc::Service>, IoxService, IoxPublisher)>,
            }
            let peer = Peer {
                name,
                bytes: size.bytes,
                buffer,
                msg: vec![0u8; size.bytes],
                ports: None,
            };
            run_forked(
                group,
                case,
                peer,
                |peer, iters| {
                    let (bytes, buffer) = (peer.bytes, peer.buffer);
                    let name = &peer.name;
                    let (_, _, publisher) = peer.ports.get_or_insert_with(|| {
                        let node = iox_node();
                        let service = iox_service(&node, name, buffer);
                        let publisher = iox_publisher(&service, bytes);
                        (node, service, publisher)
                    });
                    for i in 0..iters {
                        stamp(&mut peer.msg, i);
                        iox_send(publisher, &peer.msg)?;
                    }
                    Ok(())
                },
                move |iters| {
                    let _keep = (&node, &service);
                    let mut sum = 0;
                    for _ in 0..iters {
                        iox_recv(&subscriber, &mut buf).expect("iceoryx2 receive");
                        sum += touch(&buf);
                    }
                    sum
                },
            );
        }
        Kind::Roundtrip => {
            let (ping_name, pong_name) = (iox_name("ping"), iox_name("pong"));
            let ping_service = iox_service(&node, &ping_name, 1);
            let pong_service = iox_service(&node, &pong_name, 1);
            let ping_tx = iox_publisher(&ping_service, size_of::<Ping>());
            let pong_rx = iox_subscriber(&pong_service, 1);
            struct Peer {
                names: (ServiceName, ServiceName),
                ports: Option<(
                    Node<ipc::Service>,
                    [IoxService; 2],
                    IoxSubscriber,
                    IoxPublisher,
                )>,
            }
            let peer = Peer {
                names: (ping_name, pong_name),
                ports: None,
            };
            run_forked(
                group,
                case,
                peer,
                |peer, iters| {
                    let names = &peer.names;
                    let (_, _, from, to) = peer.ports.get_or_insert_with(|| {
                        let node = iox_node();
                        let ping = iox_service(&node, &names.0, 1);
                        let pong = iox_service(&node, &names.1, 1);
                        let from = iox_subscriber(&ping, 1);
                        let to = iox_publisher(&pong, size_of::<Ping>());
                        (node, [ping, pong], from, to)
                    });
                    let mut buf = Ping::default();
                    for _ in 0..iters {
                        iox_recv(from, &mut buf)?;
                        iox_send(to, &buf)?;
                    }
                    Ok(())
                },
                move |iters| {
                    let _keep = (&node, &pong_service);
                    // The peer makes its ports on its first round: a ping sent before
                    // its subscriber is connected would be lost.
                    while ping_service.dynamic_config().number_of_subscribers() == 0
                        || pong_service.dynamic_config().number_of_publishers() == 0
                    {
                        spin_loop();
                    }
                    let mut sum = 0;
                    let (mut ping, mut pong) = (Ping::default(), Ping::default());
                    for i in 0..iters {
                        stamp(&mut ping, i);
                        iox_send(&ping_tx, &ping).expect("iceoryx2 send");
                        iox_recv(&pong_rx, &mut pong).expect("iceoryx2 receive");
                        sum += touch(&pong);
                    }
                    sum
                },
            );
        }
    }
}
