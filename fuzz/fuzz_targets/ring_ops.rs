//! Drives an `spsc` or `channel` ring with a sequence of non-blocking operations decoded
//! from the input, checking every answer against a `VecDeque` of the same capacity (the
//! requested capacity rounded up to a power of two, as the rings do): `Full` exactly when
//! the model is full, `Empty` exactly when it is empty, batches as long as the room (or
//! the backlog) allows, and every value in model order.
//!
//! Input: the first byte picks the flavour (bit 0) and the capacity (1 to 16, from the
//! other bits); each following byte is an operation, some taking the next byte as their
//! argument. The queue is created once per input, in real shared memory (memfd).
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use procshare::{TryRecvError, TrySendError, channel, spsc};

/// The operations both flavours offer, so one interpreter checks both.
trait Ring {
    fn try_send(&self, value: u32) -> Result<(), TrySendError<u32>>;
    fn try_recv(&self) -> Result<u32, TryRecvError>;
    fn try_send_batch(&self, values: &[u32]) -> Result<usize, TrySendError<()>>;
    fn try_recv_batch(&self, out: &mut Vec<u32>, max: usize) -> Result<usize, TryRecvError>;
    /// Whether a receive batch takes every ready message up to its maximum. The spsc
    /// receiver only reloads the shared tail when its cached copy shows nothing ready, so
    /// its batches may stop at the messages it last saw (never fewer than one).
    fn full_receive_batches(&self) -> bool;
    /// Replaces the sending handle; the queue's contents must be unaffected.
    fn replace_sender(&mut self, model: &mut VecDeque<u32>);
    /// Replaces the receiving handle; the queue's contents must be unaffected.
    fn replace_receiver(&mut self, next_value: u32);
}

struct Spsc {
    tx: Option<spsc::Sender<u32>>,
    rx: Option<spsc::Receiver<u32>>,
}

struct Channel {
    tx: channel::Sender<u32>,
    rx: channel::Receiver<u32>,
}

impl Ring for Spsc {
    fn full_receive_batches(&self) -> bool {
        false
    }

    fn try_send(&self, value: u32) -> Result<(), TrySendError<u32>> {
        self.tx.as_ref().unwrap().try_send(value)
    }

    fn try_recv(&self) -> Result<u32, TryRecvError> {
        self.rx.as_ref().unwrap().try_recv()
    }

    fn try_send_batch(&self, values: &[u32]) -> Result<usize, TrySendError<()>> {
        self.tx.as_ref().unwrap().try_send_batch(values)
    }

    fn try_recv_batch(&self, out: &mut Vec<u32>, max: usize) -> Result<usize, TryRecvError> {
        self.rx.as_ref().unwrap().try_recv_batch(out, max)
    }

    /// Drops the sender (the receiver then drains what was sent, and sees `Disconnected`
    /// once empty), then makes a new one with `new_sender`.
    fn replace_sender(&mut self, model: &mut VecDeque<u32>) {
        drop(self.tx.take());
        let rx = self.rx.as_ref().unwrap();
        match model.pop_front() {
            Some(want) => assert_eq!(rx.try_recv(), Ok(want), "draining after the sender left"),
            None => assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected)),
        }
        self.tx = Some(
            rx.new_sender()
                .expect("new_sender after the sender was dropped"),
        );
    }

    /// Drops the receiver (sends then fail with `Disconnected` and give the value back),
    /// then makes a new one with `new_receiver`.
    fn replace_receiver(&mut self, next_value: u32) {
        drop(self.rx.take());
        let tx = self.tx.as_ref().unwrap();
        match tx.try_send(next_value) {
            Err(TrySendError::Disconnected(v)) => assert_eq!(v, next_value),
            other => panic!("send without a receiver: {other:?}"),
        }
        assert!(matches!(
            tx.try_send_batch(&[1, 2]),
            Err(TrySendError::Disconnected(()))
        ));
        self.rx = Some(
            tx.new_receiver()
                .expect("new_receiver after the receiver was dropped"),
        );
    }
}

impl Ring for Channel {
    fn full_receive_batches(&self) -> bool {
        true
    }

    fn try_send(&self, value: u32) -> Result<(), TrySendError<u32>> {
        self.tx.try_send(value)
    }

    fn try_recv(&self) -> Result<u32, TryRecvError> {
        self.rx.try_recv()
    }

    fn try_send_batch(&self, values: &[u32]) -> Result<usize, TrySendError<()>> {
        self.tx.try_send_batch(values)
    }

    fn try_recv_batch(&self, out: &mut Vec<u32>, max: usize) -> Result<usize, TryRecvError> {
        self.rx.try_recv_batch(out, max)
    }

    /// Clones the sender, then drops the original.
    fn replace_sender(&mut self, _model: &mut VecDeque<u32>) {
        self.tx = self.tx.clone();
    }

    /// Clones the receiver, then drops the original.
    fn replace_receiver(&mut self, _next_value: u32) {
        self.rx = self.rx.clone();
    }
}

fn run(ring: &mut dyn Ring, cap: usize, ops: &[u8]) {
    let mut model = VecDeque::with_capacity(cap);
    // Values are a running count, so every message is distinct and order is checkable.
    let mut next = 0u32;
    let mut ops = ops.iter().copied();
    let mut out = Vec::new();
    while let Some(op) = ops.next() {
        // Batch sizes go up to twice the capacity, to cover "more than fits".
        let mut arg = || ops.next().unwrap_or(0) as usize % (2 * cap + 2);
        match op % 6 {
            0 => {
                let r = ring.try_send(next);
                if model.len() == cap {
                    match r {
                        Err(TrySendError::Full(v)) => assert_eq!(v, next, "Full gave back"),
                        other => panic!("send to a full ring ({cap}): {other:?}"),
                    }
                } else {
                    assert!(r.is_ok(), "send with {} of {cap} used: {r:?}", model.len());
                    model.push_back(next);
                }
                next = next.wrapping_add(1);
            }
            1 => match (ring.try_recv(), model.pop_front()) {
                (Ok(v), Some(want)) => assert_eq!(v, want, "received out of order"),
                (Err(TryRecvError::Empty), None) => {}
                (r, want) => panic!("receive: got {r:?}, model has {want:?}"),
            },
            2 => {
                let k = arg();
                let values: Vec<u32> = (0..k as u32).map(|i| next.wrapping_add(i)).collect();
                let want = k.min(cap - model.len());
                let sent = ring.try_send_batch(&values);
                assert_eq!(
                    sent,
                    Ok(want),
                    "batch of {k} with {} of {cap} used",
                    model.len()
                );
                model.extend(&values[..want]);
                next = next.wrapping_add(want as u32);
            }
            3 => {
                let k = arg();
                // Start with something in `out`: a batch appends, never overwrites.
                out.clear();
                out.push(u32::MAX);
                let r = ring.try_recv_batch(&mut out, k);
                let want = k.min(model.len());
                if model.is_empty() {
                    // Asking an empty ring for zero may say Ok(0) or Empty (the flavours
                    // differ); asking it for more must say Empty.
                    assert!(
                        r == Err(TryRecvError::Empty) || (k == 0 && r == Ok(0)),
                        "batch of {k} from an empty ring: {r:?}"
                    );
                    assert_eq!(out.len(), 1, "an empty batch appended");
                } else if k > 0 && !ring.full_receive_batches() {
                    let n = r.unwrap_or_else(|e| panic!("batch with messages queued: {e}"));
                    assert!((1..=want).contains(&n), "batch of {n}, want 1 to {want}");
                    assert_eq!(out.len(), 1 + n, "returned count vs appended");
                } else {
                    assert_eq!(r, Ok(want), "batch of {k} with {} queued", model.len());
                    assert_eq!(out.len(), 1 + want, "returned count vs appended");
                }
                assert_eq!(out[0], u32::MAX, "batch overwrote what was in `out`");
                let expect: Vec<u32> = model.drain(..out.len() - 1).collect();
                assert_eq!(out[1..], expect[..], "batch out of order");
            }
            4 => ring.replace_sender(&mut model),
            _ => {
                ring.replace_receiver(next);
                next = next.wrapping_add(1);
            }
        }
    }
    // Whatever is left comes out in order, then nothing.
    while let Some(want) = model.pop_front() {
        assert_eq!(ring.try_recv(), Ok(want), "draining at the end");
    }
    assert_eq!(ring.try_recv(), Err(TryRecvError::Empty));
}

fuzz_target!(|input: &[u8]| {
    let Some((&first, ops)) = input.split_first() else {
        return;
    };
    let asked = usize::from(first >> 1) % 16 + 1;
    if first & 1 == 0 {
        let cap = asked.next_power_of_two();
        let (tx, rx) = procshare::spsc::<u32>(asked).unwrap();
        let mut ring = Spsc {
            tx: Some(tx),
            rx: Some(rx),
        };
        run(&mut ring, cap, ops);
    } else {
        // A channel has at least two slots (one cannot tell "full" from "free").
        let cap = asked.max(2).next_power_of_two();
        let (tx, rx) = procshare::channel::<u32>(asked).unwrap();
        run(&mut Channel { tx, rx }, cap, ops);
    }
});
