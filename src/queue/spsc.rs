//! A single-producer single-consumer ring for plain-old-data: the fastest path.
//!
//! Lamport's ring with positions that only grow: the producer owns `tail`, the consumer
//! owns `head`, each on its own pair of cache lines, and each side keeps a process-local
//! copy of the other's position so it touches the shared one only when the ring looks
//! full (producer) or empty (consumer). A message is the `T` itself, copied into its slot:
//! no encoding, no allocation.
//!
//! # Crash semantics
//!
//! * The producer writes a slot before publishing it with a release store of `tail`, so a
//!   producer killed mid-write leaves at most an unpublished slot: the consumer sees only
//!   complete messages. After the producer's process is gone, [`Receiver::new_sender`]
//!   hands out a new producer that resumes at the published `tail`.
//! * The consumer likewise publishes `head` only after copying a message out; a new
//!   consumer ([`Sender::new_receiver`]) resumes there.
//! * Positions read from shared memory are checked (`0 <= tail - head <= capacity`);
//!   anything else is reported as `Corrupted` to the consumer and as `Disconnected` to the
//!   producer, never used to index.

use std::cell::Cell;
use std::fmt;
use std::mem::MaybeUninit;
use std::sync::Arc;

use super::eventcount::EventCount;
use super::peers::{self, PeerTable};
use super::ring::{CachePadded, RingMem};
use super::{
    RawReceiver, RawSender, RecvError, RecvTimeoutError, SendError, SendTimeoutError, TryRecvError,
    TrySendError, receiver_api, sender_api,
};
use crate::error::{Error, Result};
use crate::facade::{AtomicU64, Ordering, UnsafeCell};
use crate::shm::ShmSafe;

#[repr(C)]
pub(crate) struct Header {
    tail: CachePadded<AtomicU64>,
    head: CachePadded<AtomicU64>,
    not_empty: CachePadded<EventCount>,
    not_full: CachePadded<EventCount>,
    senders: PeerTable,
    receivers: PeerTable,
}

type Slot<T> = UnsafeCell<MaybeUninit<T>>;
type Ring<T> = RingMem<Header, Slot<T>>;

/// Creates a single-producer single-consumer queue of at least `capacity` messages
/// (rounded up to a power of two) in a new anonymous shared segment.
///
/// ```
/// let (tx, rx) = procshare::spsc::<u64>(1024)?;
/// let mut child = procshare::fork::fork(move || {
///     for i in 0..10_000 {
///         tx.send(i).unwrap();
///     }
///     0
/// })?;
/// let sum: u64 = rx.iter().take(10_000).sum();
/// assert_eq!(sum, 10_000 * 9_999 / 2);
/// child.wait().unwrap();
/// # Ok::<(), procshare::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a zero or absurd capacity; [`Error::Io`] if the shared
/// memory cannot be created.
pub fn spsc<T: ShmSafe + Copy + Send>(capacity: usize) -> Result<(Sender<T>, Receiver<T>)> {
    let ring = RingMem::create("spsc", capacity, Header::new, |_| {
        UnsafeCell::new(MaybeUninit::uninit())
    })?;
    endpoints(Arc::new(ring))
}

impl Header {
    fn new() -> Header {
        Header {
            tail: CachePadded(AtomicU64::new(0)),
            head: CachePadded(AtomicU64::new(0)),
            not_empty: CachePadded(EventCount::new()),
            not_full: CachePadded(EventCount::new()),
            // SAFETY: a peer table is plain atomics; all-zero is the empty table.
            senders: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            receivers: unsafe { std::mem::zeroed() },
        }
    }
}

fn endpoints<T: ShmSafe + Copy + Send>(ring: Arc<Ring<T>>) -> Result<(Sender<T>, Receiver<T>)> {
    Ok((Sender::attach(Arc::clone(&ring))?, Receiver::attach(ring)?))
}

/// A heap-backed pair, for loom and Miri.
#[cfg(any(test, loom))]
#[doc(hidden)]
pub fn heap_spsc<T: ShmSafe + Copy + Send + 'static>(
    capacity: usize,
) -> Result<(Sender<T>, Receiver<T>)> {
    let ring = RingMem::heap(capacity, Header::new, |_| {
        UnsafeCell::new(MaybeUninit::uninit())
    });
    endpoints(Arc::new(ring))
}

/// The producing end of an [`spsc`](fn@crate::spsc) queue. Not `Clone`: there is exactly one
/// producer. It may move to another thread or (by `fork`) another process; after a fork,
/// only one process may use it.
pub struct Sender<T: ShmSafe + Copy + Send> {
    ring: Arc<Ring<T>>,
    /// Next position to write (authoritative: only this handle writes `tail`).
    tail: Cell<u64>,
    /// Last `head` seen; the ring is certainly not full while `tail - head_seen < cap`.
    head_seen: Cell<u64>,
}

/// The consuming end of an [`spsc`](fn@crate::spsc) queue. Not `Clone`: there is exactly one
/// consumer.
pub struct Receiver<T: ShmSafe + Copy + Send> {
    ring: Arc<Ring<T>>,
    head: Cell<u64>,
    tail_seen: Cell<u64>,
}

impl<T: ShmSafe + Copy + Send> Sender<T> {
    fn attach(ring: Arc<Ring<T>>) -> Result<Sender<T>> {
        let h = ring.header();
        peers::attach(&h.senders)?;
        let tail = h.tail.load(Ordering::Acquire);
        let head = h.head.load(Ordering::Acquire);
        Ok(Sender {
            tail: Cell::new(tail),
            head_seen: Cell::new(head),
            ring,
        })
    }

    /// A new consumer for this queue, after the previous one is gone (its handle dropped
    /// or its process dead). Resumes after the last message the old consumer finished.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if a live process still holds the receiver.
    pub fn new_receiver(&self) -> Result<Receiver<T>> {
        if self.ring.header().receivers.any_alive() {
            return Err(Error::InvalidArgument {
                what: "this spsc queue still has a live receiver: there can only be one".into(),
            });
        }
        Receiver::attach(Arc::clone(&self.ring))
    }

    /// Sends as many of `values` as fit right now with one index update; returns how many.
    ///
    /// # Errors
    ///
    /// `Disconnected(())` if every receiver is gone.
    pub fn try_send_batch(&self, values: &[T]) -> Result<usize, TrySendError<()>> {
        let h = self.ring.header();
        if !h.receivers.any_handles() {
            return Err(TrySendError::Disconnected(()));
        }
        let cap = self.ring.capacity();
        let tail = self.tail.get();
        let mut room = cap - tail.wrapping_sub(self.head_seen.get()).min(cap);
        if room < values.len() as u64 {
            let head = h.head.load(Ordering::Acquire);
            let used = tail.wrapping_sub(head);
            if used > cap {
                return Err(TrySendError::Disconnected(())); // corrupted: see module docs
            }
            self.head_seen.set(head);
            room = cap - used;
        }
        let n = room.min(values.len() as u64);
        for (i, v) in values[..n as usize].iter().enumerate() {
            // SAFETY: positions tail..tail+n are free (head <= tail+n-cap) and only this
            // producer writes them until `tail` is published below.
            self.ring
                .slot(tail.wrapping_add(i as u64))
                .with_mut(|p| unsafe { (*p).write(*v) });
        }
        if n > 0 {
            self.tail.set(tail.wrapping_add(n));
            h.tail.store(tail.wrapping_add(n), Ordering::Release);
            h.not_empty.notify_all();
        }
        Ok(n as usize)
    }

    /// Test hook: how many waiters the receiver's eventcount has announced.
    #[doc(hidden)]
    pub fn __not_empty_waiters(&self) -> u32 {
        self.ring.header().not_empty.waiters()
    }

    sender_api!();
}

impl<T: ShmSafe + Copy + Send> RawSender<T> for Sender<T> {
    #[inline]
    fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        let h = self.ring.header();
        if !h.receivers.any_handles() {
            return Err(TrySendError::Disconnected(value));
        }
        let tail = self.tail.get();
        if tail.wrapping_sub(self.head_seen.get()) >= self.ring.capacity() {
            let head = h.head.load(Ordering::Acquire);
            let used = tail.wrapping_sub(head);
            if used > self.ring.capacity() {
                return Err(TrySendError::Disconnected(value)); // corrupted: see module docs
            }
            self.head_seen.set(head);
            if used == self.ring.capacity() {
                return Err(TrySendError::Full(value));
            }
        }
        // SAFETY: the slot at `tail` is free (tail - head < capacity) and only this
        // producer writes it until `tail` is published.
        self.ring
            .slot(tail)
            .with_mut(|p| unsafe { (*p).write(value) });
        self.tail.set(tail.wrapping_add(1));
        h.tail.store(tail.wrapping_add(1), Ordering::Release);
        h.not_empty.notify_all();
        Ok(())
    }

    fn not_full(&self) -> &EventCount {
        &self.ring.header().not_full
    }

    fn receivers_alive(&self) -> bool {
        self.ring.header().receivers.any_alive()
    }
}

impl<T: ShmSafe + Copy + Send> Receiver<T> {
    fn attach(ring: Arc<Ring<T>>) -> Result<Receiver<T>> {
        let h = ring.header();
        peers::attach(&h.receivers)?;
        let head = h.head.load(Ordering::Acquire);
        Ok(Receiver {
            head: Cell::new(head),
            tail_seen: Cell::new(head),
            ring,
        })
    }

    /// A new producer for this queue, after the previous one is gone (its handle dropped
    /// or its process dead, even mid-write). Resumes after the last published message.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if a live process still holds the sender.
    pub fn new_sender(&self) -> Result<Sender<T>> {
        if self.ring.header().senders.any_alive() {
            return Err(Error::InvalidArgument {
                what: "this spsc queue still has a live sender: there can only be one".into(),
            });
        }
        Sender::attach(Arc::clone(&self.ring))
    }

    /// Checks and returns how many messages are ready, refreshing the cached tail.
    fn ready(&self) -> Result<u64, TryRecvError> {
        let head = self.head.get();
        let tail = self.ring.header().tail.load(Ordering::Acquire);
        let ready = tail.wrapping_sub(head);
        if ready > self.ring.capacity() {
            return Err(TryRecvError::Corrupted(format!(
                "spsc tail {tail} is not within capacity {} of head {head}",
                self.ring.capacity()
            )));
        }
        self.tail_seen.set(tail);
        Ok(ready)
    }

    fn empty_or_disconnected(&self) -> TryRecvError {
        if self.ring.header().senders.any_handles() {
            return TryRecvError::Empty;
        }
        // The last sender may have sent right before leaving: look once more.
        match self.ready() {
            Ok(0) => TryRecvError::Disconnected,
            Ok(_) => TryRecvError::Empty,
            Err(e) => e,
        }
    }

    /// Appends up to `max` ready messages to `out` with one index update; returns how many.
    ///
    /// # Errors
    ///
    /// `Empty`, `Disconnected` or `Corrupted` when nothing was received.
    pub fn try_recv_batch(&self, out: &mut Vec<T>, max: usize) -> Result<usize, TryRecvError> {
        if max == 0 {
            return Ok(0);
        }
        let head = self.head.get();
        let mut ready = self.tail_seen.get().wrapping_sub(head);
        if ready < max as u64 {
            // The cached tail may be stale: look at the shared one before settling for less.
            ready = self.ready()?;
            if ready == 0 {
                return Err(self.empty_or_disconnected());
            }
        }
        let n = ready.min(max as u64);
        out.reserve(n as usize);
        for pos in head..head.wrapping_add(n) {
            // SAFETY: positions below the published tail hold messages the producer wrote
            // (the acquire load of `tail` made them visible) and will not touch until we
            // publish `head`.
            out.push(
                self.ring
                    .slot(pos)
                    .with(|p| unsafe { (*p).assume_init_read() }),
            );
        }
        let h = self.ring.header();
        self.head.set(head.wrapping_add(n));
        h.head.store(head.wrapping_add(n), Ordering::Release);
        h.not_full.notify_all();
        Ok(n as usize)
    }

    receiver_api!();
}

impl<T: ShmSafe + Copy + Send> RawReceiver<T> for Receiver<T> {
    #[inline]
    fn try_recv(&self) -> Result<T, TryRecvError> {
        let head = self.head.get();
        if head == self.tail_seen.get() && self.ready()? == 0 {
            return Err(self.empty_or_disconnected());
        }
        // SAFETY: as in `try_recv_batch`.
        let value = self
            .ring
            .slot(head)
            .with(|p| unsafe { (*p).assume_init_read() });
        let h = self.ring.header();
        self.head.set(head.wrapping_add(1));
        h.head.store(head.wrapping_add(1), Ordering::Release);
        h.not_full.notify_all();
        Ok(value)
    }

    fn not_empty(&self) -> &EventCount {
        &self.ring.header().not_empty
    }

    fn senders_alive(&self) -> bool {
        self.ring.header().senders.any_alive()
    }
}

impl<T: ShmSafe + Copy + Send> Drop for Sender<T> {
    fn drop(&mut self) {
        let h = self.ring.header();
        peers::detach(&h.senders);
        // A receiver asleep on an empty queue must wake to see it is disconnected.
        h.not_empty.notify_all();
    }
}

impl<T: ShmSafe + Copy + Send> Drop for Receiver<T> {
    fn drop(&mut self) {
        let h = self.ring.header();
        peers::detach(&h.receivers);
        h.not_full.notify_all();
    }
}

impl<T: ShmSafe + Copy + Send> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("spsc::Sender")
            .field("capacity", &self.ring.capacity())
            .finish_non_exhaustive()
    }
}

impl<T: ShmSafe + Copy + Send> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("spsc::Receiver")
            .field("capacity", &self.ring.capacity())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fifo_full_empty_and_wrap() {
        let (tx, rx) = heap_spsc::<u64>(3).unwrap(); // rounds up to 4
        for i in 0..4 {
            tx.try_send(i).unwrap();
        }
        assert!(matches!(tx.try_send(4), Err(TrySendError::Full(4))));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(5)),
            Err(RecvTimeoutError::Timeout)
        );
        for i in 0..1000 {
            tx.send(i).unwrap();
            assert_eq!(rx.recv().unwrap(), i);
        }
    }

    #[test]
    fn threads_in_order_with_batches() {
        let n = if cfg!(miri) { 200 } else { 100_000 };
        let (tx, rx) = heap_spsc::<u64>(64).unwrap();
        let t = std::thread::spawn(move || {
            let mut i = 0;
            while i < n {
                let chunk: Vec<u64> = (i..(i + 7).min(n)).collect();
                tx.send_batch(&chunk).unwrap();
                i += chunk.len() as u64;
            }
        });
        let mut expect = 0;
        let mut buf = Vec::new();
        while expect < n {
            buf.clear();
            rx.recv_batch(&mut buf, 16).unwrap();
            for &v in &buf {
                assert_eq!(v, expect);
                expect += 1;
            }
        }
        t.join().unwrap();
        assert_eq!(rx.recv(), Err(RecvError::Disconnected));
    }

    #[test]
    fn replacement_endpoints_only_when_the_old_one_is_gone() {
        let (tx, rx) = heap_spsc::<u8>(4).unwrap();
        tx.send(1).unwrap();
        assert!(rx.new_sender().is_err(), "one live sender already");
        drop(tx);
        let tx = rx.new_sender().unwrap();
        tx.send(2).unwrap();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1, 2]);
        drop(rx);
        assert!(matches!(tx.try_send(3), Err(TrySendError::Disconnected(3))));
        let rx = tx.new_receiver().unwrap();
        tx.send(4).unwrap();
        assert_eq!(rx.recv(), Ok(4));
    }
}
