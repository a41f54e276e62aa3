//! A bounded multi-producer multi-consumer ring for plain-old-data (`channel`).
//!
//! Each slot carries a 64-bit stamp, as in Vyukov's bounded queue: a slot for position
//! `p` is free when its stamp is `p`, holds a message when it is `p + 1`, and is free for
//! the next lap when it is `p + capacity`. The twist is how a position is claimed. Instead
//! of claiming by compare-and-swap on the shared `tail` (or `head`) and only then touching
//! the slot, a producer (or consumer) claims **the slot's stamp itself**, replacing it with
//! a word that names the claimant:
//!
//! ```text
//!  63        62        61..32                         31..0
//! [CLAIMED][READING][thread id + start-time hash (30)][position (low 32 bits)]
//! ```
//!
//! and then advances `tail` (`head`) with a second compare-and-swap that any other thread
//! may also perform ("helping"). So at every instant a half-finished operation is visible
//! in the slot together with *who* is doing it. If that thread dies, the next thread that
//! waits on the slot can ask the kernel whether the claimant is gone and, if (and only if)
//! it is, release the slot:
//!
//! * a producer killed between claiming and publishing: its slot is skipped (the message
//!   was never sent), and the consumers move on;
//! * a consumer killed while copying a message out: that message is lost with it, and the
//!   slot is freed for the producers.
//!
//! A thread that is merely slow (descheduled, stopped) still exists, so it is never
//! skipped. Checks happen only on the slow path, after a waiter has slept.

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
use crate::error::Result;
use crate::facade::{AtomicU64, Ordering, UnsafeCell};
use crate::shm::ShmSafe;
use crate::sys;

const CLAIMED: u64 = 1 << 63;
const READING: u64 = 1 << 62;
const TAG_SHIFT: u32 = 32;
const TAG_MASK: u64 = (1 << 30) - 1;
const TID_BITS: u32 = 22;
const HASH_BITS: u32 = 8;

#[repr(C)]
pub(crate) struct Header {
    tail: CachePadded<AtomicU64>,
    head: CachePadded<AtomicU64>,
    not_empty: CachePadded<EventCount>,
    not_full: CachePadded<EventCount>,
    senders: PeerTable,
    receivers: PeerTable,
}

#[repr(C)]
pub(crate) struct Slot<T> {
    stamp: AtomicU64,
    value: UnsafeCell<MaybeUninit<T>>,
}

type Ring<T> = RingMem<Header, Slot<T>>;

/// Creates a bounded multi-producer multi-consumer queue of at least `capacity` messages
/// (rounded up to a power of two, and at least 2) in a new anonymous shared segment. Both ends can be
/// cloned and used from any number of threads and (forked) processes.
///
/// ```
/// let (tx, rx) = procshare::channel::<[u32; 4]>(256)?;
/// let producers: Vec<_> = (0..2u32)
///     .map(|p| {
///         let tx = tx.clone();
///         procshare::fork::fork(move || {
///             for i in 0..1000 {
///                 tx.send([p, i, 0, 0]).unwrap();
///             }
///             0
///         })
///     })
///     .collect::<Result<_, _>>()?;
/// drop(tx); // only the children send now
/// assert_eq!(rx.iter().count(), 2000); // ends when both children are done
/// for mut p in producers {
///     p.wait().unwrap();
/// }
/// # Ok::<(), procshare::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a zero or absurd
/// capacity; [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
pub fn channel<T: ShmSafe + Copy + Send>(capacity: usize) -> Result<(Sender<T>, Receiver<T>)> {
    let ring = RingMem::create("channel", min_capacity(capacity), Header::new, new_slot)?;
    endpoints(Arc::new(ring))
}

/// With one slot, "full at `p`" (`p + 1`) and "free for `p + 1`" (`p + capacity`) would be
/// the same stamp, so a channel has at least two. (Zero stays an error.)
fn min_capacity(capacity: usize) -> usize {
    if capacity == 1 { 2 } else { capacity }
}

fn new_slot<T>(i: u64) -> Slot<T> {
    Slot {
        stamp: AtomicU64::new(i),
        value: UnsafeCell::new(MaybeUninit::uninit()),
    }
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
    peers::attach(&ring.header().senders)?;
    let tx = Sender {
        ring: Arc::clone(&ring),
    };
    peers::attach(&ring.header().receivers)?;
    Ok((tx, Receiver { ring }))
}

/// A heap-backed pair, for loom and Miri.
#[cfg(any(test, loom))]
#[doc(hidden)]
pub fn heap_channel<T: ShmSafe + Copy + Send + 'static>(
    capacity: usize,
) -> Result<(Sender<T>, Receiver<T>)> {
    endpoints(Arc::new(RingMem::heap(
        min_capacity(capacity),
        Header::new,
        new_slot,
    )))
}

/// This thread's claim tag: 22 bits of thread id and 8 bits of its start time.
#[inline]
fn claim_tag() -> u64 {
    let me = sys::current_thread();
    (u64::from(me.tid) | ((me.start & ((1 << HASH_BITS) - 1)) << TID_BITS)) & TAG_MASK
}

#[inline]
fn claim(pos: u64, tag: u64, reading: bool) -> u64 {
    CLAIMED | if reading { READING } else { 0 } | (tag << TAG_SHIFT) | (pos & 0xffff_ffff)
}

#[inline]
fn claims(stamp: u64, pos: u64) -> bool {
    stamp & CLAIMED != 0 && stamp & 0xffff_ffff == pos & 0xffff_ffff
}

fn claimant_is_dead(stamp: u64) -> bool {
    let tag = (stamp >> TAG_SHIFT) & TAG_MASK;
    let tid = (tag & ((1 << TID_BITS) - 1)) as u32;
    crate::liveness::thread_is_dead(tid, tag >> TID_BITS, HASH_BITS)
}

/// How many times in a row a thread may find a stamp that fits no state before it calls
/// the ring corrupted. Positions move under a reader, so one odd stamp proves nothing.
const CONFUSION_LIMIT: u32 = 1 << 12;

impl<T> RingMem<Header, Slot<T>> {
    /// Frees slots that a dead thread claimed and left half done; returns whether it
    /// freed any. Two places can hold one: `head` (a producer died before publishing, or
    /// a consumer before advancing `head`) and `tail - capacity` (a consumer died after
    /// advancing `head` but before freeing the slot, which keeps producers out).
    fn repair(&self) -> bool {
        let h = self.header();
        let head = h.head.load(Ordering::Acquire);
        let behind_tail = h.tail.load(Ordering::Acquire).wrapping_sub(self.capacity());
        let mut freed = false;
        for pos in [head, behind_tail] {
            let slot = self.slot(pos);
            let stamp = slot.stamp.load(Ordering::Acquire);
            if !claims(stamp, pos) || !claimant_is_dead(stamp) {
                continue;
            }
            // A dead writer's message was never sent; a dead reader's was lost with it.
            // Either way the position is finished: free the slot for the next lap, and
            // move `head` and `tail` past it in case the dead thread had not.
            if slot
                .stamp
                .compare_exchange(
                    stamp,
                    pos.wrapping_add(self.capacity()),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                let _ = h.head.compare_exchange(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                let _ = h.tail.compare_exchange(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                freed = true;
            }
        }
        if freed {
            h.not_full.notify_all();
            h.not_empty.notify_all();
        }
        freed
    }
}

/// The sending end of a [`channel`](fn@crate::channel). Clone it for more producers.
pub struct Sender<T: ShmSafe + Copy + Send> {
    ring: Arc<Ring<T>>,
}

/// The receiving end of a [`channel`](fn@crate::channel). Clone it for more consumers.
pub struct Receiver<T: ShmSafe + Copy + Send> {
    ring: Arc<Ring<T>>,
}

impl<T: ShmSafe + Copy + Send> Sender<T> {
    /// Sends as many of `values` as fit right now; returns how many. Each message is
    /// claimed and published on its own (positions are shared with other producers), but
    /// consumers are notified once for the batch.
    ///
    /// # Errors
    ///
    /// `Disconnected(())` if every receiver is gone.
    pub fn try_send_batch(&self, values: &[T]) -> Result<usize, TrySendError<()>> {
        let mut sent = 0;
        for v in values {
            match self.push(*v) {
                Ok(()) => sent += 1,
                Err(TrySendError::Full(_)) => break,
                Err(TrySendError::Disconnected(_)) if sent == 0 => {
                    return Err(TrySendError::Disconnected(()));
                }
                Err(TrySendError::Disconnected(_)) => break,
            }
        }
        if sent > 0 {
            self.ring.header().not_empty.notify_all();
        }
        Ok(sent)
    }

    /// Claims the next free position and writes `value`, without notifying consumers.
    fn push(&self, value: T) -> Result<(), TrySendError<T>> {
        let ring = &*self.ring;
        let h = ring.header();
        if !h.receivers.any_handles() {
            return Err(TrySendError::Disconnected(value));
        }
        let cap = ring.capacity();
        let tag = claim_tag();
        let mut confused = 0;
        loop {
            let pos = h.tail.load(Ordering::Acquire);
            let slot = ring.slot(pos);
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp == pos {
                if slot
                    .stamp
                    .compare_exchange_weak(
                        pos,
                        claim(pos, tag, false),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    let _ = h.tail.compare_exchange(
                        pos,
                        pos.wrapping_add(1),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                    // SAFETY: our claim gives us this slot exclusively until we publish it.
                    slot.value.with_mut(|p| unsafe { (*p).write(value) });
                    slot.stamp.store(pos.wrapping_add(1), Ordering::Release);
                    return Ok(());
                }
                continue;
            }
            if stamp == pos.wrapping_add(1) || (claims(stamp, pos) && stamp & READING == 0) {
                // Someone claimed or filled `pos` but has not advanced `tail`: help.
                let _ = h.tail.compare_exchange(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                continue;
            }
            let prev = pos.wrapping_sub(cap);
            if stamp == prev.wrapping_add(1) || claims(stamp, prev) {
                // Last lap's message is still there (or being read).
                if h.tail.load(Ordering::Acquire) == pos {
                    return Err(TrySendError::Full(value));
                }
                continue;
            }
            if h.tail.load(Ordering::Acquire) == pos {
                confused += 1;
                if confused > CONFUSION_LIMIT {
                    return Err(TrySendError::Disconnected(value)); // corrupted
                }
                crate::facade::spin_hint();
            }
        }
    }

    /// Crash-test hook: claims the next position, then calls `stall` before writing and
    /// publishing `value`, so a test can kill (or stop) a producer at exactly that point.
    #[doc(hidden)]
    pub fn __send_stalled_after_claim(&self, value: T, stall: impl FnOnce()) {
        let h = self.ring.header();
        loop {
            let pos = h.tail.load(Ordering::Acquire);
            let slot = self.ring.slot(pos);
            if slot
                .stamp
                .compare_exchange(
                    pos,
                    claim(pos, claim_tag(), false),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                let _ = h.tail.compare_exchange(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                stall();
                // SAFETY: claimed above, as in `push`.
                slot.value.with_mut(|p| unsafe { (*p).write(value) });
                slot.stamp.store(pos.wrapping_add(1), Ordering::Release);
                h.not_empty.notify_all();
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Test hook: publishes, at the next position, a writer's claim naming thread `tid`
    /// with start time `start`, exactly as that thread's own claim would look, and moves
    /// `tail` past it, as if that thread had claimed the slot and stalled.
    #[doc(hidden)]
    pub fn __plant_claim(&self, tid: u32, start: u64) {
        let h = self.ring.header();
        let pos = h.tail.load(Ordering::Acquire);
        let tag = (u64::from(tid) | ((start & ((1 << HASH_BITS) - 1)) << TID_BITS)) & TAG_MASK;
        self.ring
            .slot(pos)
            .stamp
            .store(claim(pos, tag, false), Ordering::Release);
        h.tail.store(pos.wrapping_add(1), Ordering::Release);
    }

    /// Test hook: overwrites the shared `tail` with `f(tail)`, as a scribbling peer would.
    #[doc(hidden)]
    pub fn __scribble_tail(&self, f: impl FnOnce(u64) -> u64) {
        let tail = &self.ring.header().tail;
        tail.store(f(tail.load(Ordering::Acquire)), Ordering::Release);
    }

    /// Test hook: how many waiters the receivers' eventcount has announced.
    #[doc(hidden)]
    pub fn __not_empty_waiters(&self) -> u32 {
        self.ring.header().not_empty.waiters()
    }

    sender_api!();
}

impl<T: ShmSafe + Copy + Send> RawSender<T> for Sender<T> {
    #[inline]
    fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        self.push(value)?;
        self.ring.header().not_empty.notify_all();
        Ok(())
    }

    fn not_full(&self) -> &EventCount {
        &self.ring.header().not_full
    }

    fn receivers_alive(&self) -> bool {
        self.ring.repair();
        self.ring.header().receivers.any_alive()
    }
}

impl<T: ShmSafe + Copy + Send> Receiver<T> {
    /// Appends up to `max` ready messages to `out`; returns how many.
    ///
    /// # Errors
    ///
    /// `Empty`, `Disconnected` or `Corrupted` when nothing was received.
    pub fn try_recv_batch(&self, out: &mut Vec<T>, max: usize) -> Result<usize, TryRecvError> {
        let mut n = 0;
        while n < max {
            match self.pop() {
                Ok(v) => {
                    out.push(v);
                    n += 1;
                }
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        if n > 0 {
            self.ring.header().not_full.notify_all();
        }
        Ok(n)
    }

    fn empty_or_disconnected(&self) -> TryRecvError {
        let h = self.ring.header();
        if h.senders.any_handles() {
            return TryRecvError::Empty;
        }
        // The last sender may have published right before leaving: look once more.
        let pos = h.head.load(Ordering::Acquire);
        if self.ring.slot(pos).stamp.load(Ordering::Acquire) == pos.wrapping_add(1) {
            TryRecvError::Empty
        } else {
            TryRecvError::Disconnected
        }
    }

    /// Claims the next published position and copies its message out, without notifying.
    fn pop(&self) -> Result<T, TryRecvError> {
        let ring = &*self.ring;
        let h = ring.header();
        let cap = ring.capacity();
        let tag = claim_tag();
        let mut confused = 0;
        loop {
            let pos = h.head.load(Ordering::Acquire);
            let slot = ring.slot(pos);
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp == pos.wrapping_add(1) {
                if slot
                    .stamp
                    .compare_exchange_weak(
                        stamp,
                        claim(pos, tag, true),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    let _ = h.head.compare_exchange(
                        pos,
                        pos.wrapping_add(1),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                    // SAFETY: the stamp said a producer published a T here (its release
                    // store is what our acquire CAS read), and our claim keeps producers
                    // away until we free the slot.
                    let value = slot.value.with(|p| unsafe { (*p).assume_init_read() });
                    slot.stamp.store(pos.wrapping_add(cap), Ordering::Release);
                    return Ok(value);
                }
                continue;
            }
            if stamp == pos.wrapping_add(cap) || (claims(stamp, pos) && stamp & READING != 0) {
                // Someone consumed or is consuming `pos` but has not advanced `head`: help.
                let _ = h.head.compare_exchange(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                continue;
            }
            if stamp == pos || claims(stamp, pos) || claims(stamp, pos.wrapping_sub(cap)) {
                // Nothing published at `pos` yet: a producer is still writing it, or a slow
                // consumer is still copying out the previous lap's message from its slot.
                if h.head.load(Ordering::Acquire) == pos {
                    return Err(self.empty_or_disconnected());
                }
                continue;
            }
            if h.head.load(Ordering::Acquire) == pos {
                confused += 1;
                if confused > CONFUSION_LIMIT {
                    return Err(TryRecvError::Corrupted(format!(
                        "slot stamp {stamp:#x} fits no state of position {pos}"
                    )));
                }
                crate::facade::spin_hint();
            }
        }
    }

    /// Crash-test hook: claims the next published message and advances `head`, then calls
    /// `stall` before copying it out and freeing the slot.
    #[doc(hidden)]
    pub fn __recv_stalled_after_claim(&self, stall: impl FnOnce()) -> T {
        let h = self.ring.header();
        loop {
            let pos = h.head.load(Ordering::Acquire);
            let slot = self.ring.slot(pos);
            if slot
                .stamp
                .compare_exchange(
                    pos.wrapping_add(1),
                    claim(pos, claim_tag(), true),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                let _ = h.head.compare_exchange(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                stall();
                // SAFETY: claimed a published slot above, as in `pop`.
                let value = slot.value.with(|p| unsafe { (*p).assume_init_read() });
                slot.stamp
                    .store(pos.wrapping_add(self.ring.capacity()), Ordering::Release);
                h.not_full.notify_all();
                return value;
            }
            std::thread::yield_now();
        }
    }

    receiver_api!();
}

impl<T: ShmSafe + Copy + Send> RawReceiver<T> for Receiver<T> {
    #[inline]
    fn try_recv(&self) -> Result<T, TryRecvError> {
        let v = self.pop()?;
        self.ring.header().not_full.notify_all();
        Ok(v)
    }

    fn not_empty(&self) -> &EventCount {
        &self.ring.header().not_empty
    }

    fn senders_alive(&self) -> bool {
        self.ring.repair();
        self.ring.header().senders.any_alive()
    }
}

impl<T: ShmSafe + Copy + Send> Clone for Sender<T> {
    /// Another producer handle.
    ///
    /// # Panics
    ///
    /// If more than 64 processes already hold handles to this end.
    fn clone(&self) -> Self {
        peers::attach(&self.ring.header().senders).expect("attach a sender");
        Sender {
            ring: Arc::clone(&self.ring),
        }
    }
}

impl<T: ShmSafe + Copy + Send> Clone for Receiver<T> {
    /// Another consumer handle.
    ///
    /// # Panics
    ///
    /// If more than 64 processes already hold handles to this end.
    fn clone(&self) -> Self {
        peers::attach(&self.ring.header().receivers).expect("attach a receiver");
        Receiver {
            ring: Arc::clone(&self.ring),
        }
    }
}

impl<T: ShmSafe + Copy + Send> Drop for Sender<T> {
    fn drop(&mut self) {
        let h = self.ring.header();
        peers::detach(&h.senders);
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
        f.debug_struct("channel::Sender")
            .field("capacity", &self.ring.capacity())
            .finish_non_exhaustive()
    }
}

impl<T: ShmSafe + Copy + Send> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("channel::Receiver")
            .field("capacity", &self.ring.capacity())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn fifo_full_and_empty() {
        let (tx, rx) = heap_channel::<u32>(4).unwrap();
        for i in 0..4 {
            tx.try_send(i).unwrap();
        }
        assert!(matches!(tx.try_send(9), Err(TrySendError::Full(9))));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        // Wrap around many laps.
        for i in 0..1000 {
            tx.send(i).unwrap();
            assert_eq!(rx.recv().unwrap(), i);
        }
    }

    #[test]
    fn disconnect_both_ways() {
        let (tx, rx) = heap_channel::<u8>(2).unwrap();
        tx.send(1).unwrap();
        drop(tx);
        assert_eq!(rx.recv(), Ok(1), "queued messages survive the last sender");
        assert_eq!(rx.recv(), Err(RecvError::Disconnected));
        let (tx, rx) = heap_channel::<u8>(2).unwrap();
        drop(rx);
        assert!(matches!(tx.send(5), Err(SendError(5))));
    }

    #[test]
    fn mpmc_threads_exactly_once_in_producer_order() {
        let per = if cfg!(miri) { 50 } else { 20_000 };
        let (tx, rx) = heap_channel::<[u32; 2]>(64).unwrap();
        let producers: Vec<_> = (0..2u32)
            .map(|p| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        tx.send([p, i]).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    let mut last = [None::<u32>; 2];
                    let mut got = Vec::new();
                    for [p, i] in rx.iter() {
                        assert!(
                            last[p as usize].is_none_or(|l| l < i),
                            "order within producer"
                        );
                        last[p as usize] = Some(i);
                        got.push((p, i));
                    }
                    got
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        let mut all = HashSet::new();
        for c in consumers {
            for m in c.join().unwrap() {
                assert!(all.insert(m), "duplicate {m:?}");
            }
        }
        assert_eq!(all.len(), 2 * per as usize);
    }

    #[test]
    fn batches() {
        let (tx, rx) = heap_channel::<u16>(8).unwrap();
        assert_eq!(tx.try_send_batch(&[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap(), 8);
        let mut out = Vec::new();
        assert_eq!(rx.try_recv_batch(&mut out, 5).unwrap(), 5);
        assert_eq!(rx.recv_batch(&mut out, 10).unwrap(), 3);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
