//! A single-producer single-consumer ring for plain-old-data: the fastest path.
//!
//! Lamport's ring with positions that only grow: the producer owns `tail`, the consumer
//! owns `head`, each on its own pair of cache lines, and each side keeps a process-local
//! copy of the other's position so it touches the shared one only when the ring looks
//! full (producer) or empty (consumer). A message is the `T` itself, copied into its slot:
//! no encoding, no allocation.
//!
//! # One process per end
//!
//! Each end is used by one process at a time; the header records which (its process
//! identity, pid and 40-bit start time), and the handle caches "checked in this process
//! since its last fork" as one process-local generation number, so the fast path pays a
//! single comparison. A `fork` (our `pthread_atfork` prepare handler) releases the
//! parent's ownership of every end it holds and moves the generation on: after the fork,
//! whichever process uses an end first owns it. A use by any other live process panics
//! with a message saying so (two producers or two consumers on an spsc ring would
//! duplicate or lose messages silently; that is a bug in the program, not a condition to
//! handle at run time). Ownership passes on when the owner drops its handle, or when its
//! process is proven dead (`liveness::process_is_dead`); the new owner resumes at the
//! shared position. Forking from a thread while another thread is inside an operation
//! on the same end is not covered (procshare's `fork` refuses multi-threaded processes).
//!
//! An end given to a child in a `Process::spawn` argument (Spawn, ForkServer) *moves*
//! there: encoding it releases this process's ownership and marks the handle handed
//! over, so any later use of it here panics (its drop only uncounts it); the child owns
//! the end from its first use.
//!
//! # Crash semantics (the shared words)
//!
//! | word | written by | a SIGKILL between stores leaves | repaired by |
//! |---|---|---|---|
//! | slot | producer, before `tail` | an unpublished slot: invisible | the next producer overwrites it |
//! | `tail` | producer (release) | complete messages only | — |
//! | `head` | consumer (release), after copying out | messages copied but not released: delivered again to the next consumer | — |
//! | sender/receiver owner | the end's first user in a process | the dead process's identity | the next user, once the kernel proves that process dead |
//! | peer tables | attach/detach, fork handlers | a dead process's handle count | `any_alive`, on every slow path |
//!
//! * The in-place API (`send_with`, `send_batch_with`, `recv_with`, `recv_batch_with`)
//!   lends slots to the caller's closure; drop guards publish `tail` (release `head`) for
//!   exactly the slots finished when the closure returns or unwinds: a `fill` that
//!   panics sends the messages it completed and not the one it was writing; a reader that
//!   panics has received the message it was reading. A SIGKILL inside the closure is the
//!   first (last) row of the table above.
//! * After the producer's process is gone, [`Receiver::new_sender`] hands out a new
//!   producer (or an inherited handle takes over) that resumes at the published `tail`.
//! * The consumer likewise; a new consumer ([`Sender::new_receiver`]) resumes at `head`.
//! * A `try_recv` that finds the queue empty (a `try_send` that finds it full) checks, at
//!   most every 20 ms per handle, whether the other end's processes are alive, exactly as
//!   a blocking call does while it waits: a polling user sees `Disconnected` too.
//! * Positions read from shared memory are checked (`0 <= tail - head <= capacity`);
//!   anything else marks the queue corrupted in its header, and every later operation on
//!   either end returns `Corrupted` (senders get their message back). An index is never
//!   used beyond `& (capacity - 1)`.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::Arc;

use super::ring::{self, RingHeader, RingMem, ring_handles};
use super::{
    RawReceiver, RawSender, RecvError, RecvTimeoutError, SendError, SendTimeoutError, TryRecvError,
    TrySendError, receiver_api, sender_api,
};
use crate::error::{Error, Result};
use crate::loom_switch::{AtomicU64, Ordering, UnsafeCell};
use crate::shm::ShmSafe;
use crate::sync::eventcount::{Attempt, CheckClock, EventCount, block_on};
use crate::sys::Deadline;

/// The spsc flavour's own header words: which process uses each end.
#[repr(C)]
pub(crate) struct Owners {
    /// [`process_identity`](crate::owner::process_identity) of the process using the
    /// sender (receiver), 0 if none.
    sender: AtomicU64,
    receiver: AtomicU64,
}

/// The spsc header; its `corrupted` word is 0 or [`CORRUPTED`].
pub(crate) type Header = RingHeader<Owners>;

/// The spsc ring's one reason to be marked corrupted: a position out of range.
const CORRUPTED: u64 = 1;

fn new_header() -> Header {
    RingHeader::new(Owners {
        sender: AtomicU64::new(0),
        receiver: AtomicU64::new(0),
    })
}

/// A slot always holds a valid `T`: zero at creation (valid for every `ShmSafe` type),
/// then the last message written there. So the in-place API may lend `&mut T` to a free
/// slot and `&T` to a published one.
type Slot<T> = UnsafeCell<MaybeUninit<T>>;
type Ring<T> = RingMem<Header, Slot<T>>;

/// Creates a single-producer single-consumer queue of at least `capacity` messages
/// (rounded up to a power of two) in a new anonymous shared segment.
///
/// Each end may move between threads and, by `fork`, processes, but is used by one
/// process at a time: after a fork, the first process to use an end owns it, and a use
/// from another live process panics (see the [module docs](mod@crate::spsc), which also have
/// the crash table). For several producers or consumers, use [`channel`](fn@crate::channel).
///
/// ```
/// let (tx, rx) = procshare::spsc::<u64>(1024)?;
/// let child = procshare::Process::fork(move || {
///     for i in 0..10_000 {
///         tx.send(i).unwrap();
///     }
/// })?;
/// let sum: u64 = rx.iter().take(10_000).sum();
/// assert_eq!(sum, 10_000 * 9_999 / 2);
/// child.join().expect("the producer ran to the end");
/// # Ok::<(), procshare::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a zero or absurd capacity; [`Error::Io`] if the shared
/// memory cannot be created.
pub fn spsc<T: ShmSafe + Copy + Send>(capacity: usize) -> Result<(Sender<T>, Receiver<T>)> {
    // SAFETY: a slot starts as zeroed `MaybeUninit` (it is read only after a send wrote it).
    let ring = unsafe { RingMem::create_zeroed("spsc", capacity, new_header)? };
    ring::endpoints(ring, Sender::new, Receiver::new)
}

/// A heap-backed pair, for loom and Miri.
#[cfg(any(test, loom))]
#[doc(hidden)]
pub fn heap_spsc<T: ShmSafe + Copy + Send + 'static>(
    capacity: usize,
) -> Result<(Sender<T>, Receiver<T>)> {
    let ring = RingMem::heap(capacity, new_header, |_| {
        UnsafeCell::new(MaybeUninit::zeroed())
    });
    ring::endpoints(ring, Sender::new, Receiver::new)
}

/// The producing end of an [`spsc`](fn@crate::spsc) queue. Not `Clone`: there is exactly one
/// producer. It may move to another thread or (by `fork`) another process; after a fork,
/// the first process to use it owns it (see the [module docs](self)).
///
/// # Panics
///
/// Every sending method panics if another live process owns this end, if this handle was
/// handed to a spawned child (see the [module docs](self)), or if this process is in
/// another pid namespace than the queue's creator (see
/// [Pid namespaces](crate::queue#pid-namespaces)).
pub struct Sender<T: ShmSafe + Copy + Send> {
    ring: Arc<Ring<T>>,
    owned: Cell<u64>,
    check: CheckClock,
    /// Next position to write (authoritative: only this handle writes `tail`).
    tail: Cell<u64>,
    /// Last `head` seen; the ring is certainly not full while `tail - head_seen < cap`.
    head_seen: Cell<u64>,
}

/// The consuming end of an [`spsc`](fn@crate::spsc) queue. Not `Clone`: there is exactly one
/// consumer, in one process at a time, as for [`Sender`].
///
/// # Panics
///
/// Every receiving method panics if another live process owns this end, if this handle
/// was handed to a spawned child (see the [module docs](self)), or if this process is in
/// another pid namespace than the queue's creator (see
/// [Pid namespaces](crate::queue#pid-namespaces)).
pub struct Receiver<T: ShmSafe + Copy + Send> {
    ring: Arc<Ring<T>>,
    owned: Cell<u64>,
    check: CheckClock,
    head: Cell<u64>,
    tail_seen: Cell<u64>,
}

impl<T: ShmSafe + Copy + Send> Sender<T> {
    /// A handle on `ring`, already counted in its senders' table.
    fn new(ring: Arc<Ring<T>>) -> Sender<T> {
        let h = ring.header();
        let tail = h.tail.load(Ordering::Acquire);
        let head = h.head.load(Ordering::Acquire);
        Sender {
            owned: Cell::new(ownership::NEVER),
            check: CheckClock::new(),
            tail: Cell::new(tail),
            head_seen: Cell::new(head),
            ring,
        }
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
        self.ring.header().attach_receiver()?;
        Ok(Receiver::new(Arc::clone(&self.ring)))
    }

    /// Makes sure this process owns the sender (one comparison unless a fork happened or
    /// this handle was never used here), then whether the queue is usable.
    #[inline]
    fn enter(&self) -> Result<(), TrySendError<()>> {
        let h = self.ring.header();
        if self.owned.get() != ownership::generation() {
            self.take_ownership();
        }
        if h.corrupted.load(Ordering::Relaxed) != 0 {
            return Err(TrySendError::Corrupted(()));
        }
        if !h.receivers.any_handles() {
            return Err(TrySendError::Disconnected(()));
        }
        Ok(())
    }

    #[cold]
    fn take_ownership(&self) {
        ownership::refuse_moved(self.owned.get(), "spsc::Sender");
        let h = self.ring.header();
        self.owned.set(ownership::take(
            &h.extra.sender,
            &h.senders,
            "spsc::Sender",
            "send",
        ));
        // Another process may have sent since this handle last did: resume where it left.
        self.tail.set(h.tail.load(Ordering::Acquire));
        self.head_seen.set(h.head.load(Ordering::Acquire));
    }

    /// How much room there is, reading the shared `head` if the cached one says less
    /// than `want`.
    #[inline]
    fn room(&self, want: u64) -> Result<u64, TrySendError<()>> {
        let cap = self.ring.capacity();
        let tail = self.tail.get();
        let room = cap - tail.wrapping_sub(self.head_seen.get()).min(cap);
        if room >= want {
            return Ok(room);
        }
        let head = self.ring.header().head.load(Ordering::Acquire);
        let used = tail.wrapping_sub(head);
        if used > cap {
            self.ring.header().mark_corrupted(CORRUPTED);
            return Err(TrySendError::Corrupted(()));
        }
        self.head_seen.set(head);
        Ok(cap - used)
    }

    /// Sends as many of `values` as fit right now with one index update; returns how many.
    ///
    /// # Errors
    ///
    /// `Disconnected(())` if every receiver is gone, `Corrupted(())` if the queue is
    /// corrupted.
    pub fn try_send_batch(&self, values: &[T]) -> Result<usize, TrySendError<()>> {
        self.enter()?;
        let mut room = self.room(values.len() as u64)?;
        if room == 0 && !values.is_empty() && self.check.due() {
            if !RawSender::receivers_alive(self) {
                return Err(TrySendError::Disconnected(()));
            }
            room = self.room(1)?;
        }
        let tail = self.tail.get();
        let n = room.min(values.len() as u64);
        for (i, v) in values[..n as usize].iter().enumerate() {
            // SAFETY: positions tail..tail+n are free (head <= tail+n-cap) and only this
            // producer writes them until `tail` is published below.
            self.ring
                .slot(tail.wrapping_add(i as u64))
                .with_mut(|p| unsafe { (*p).write(*v) });
        }
        if n > 0 {
            let h = self.ring.header();
            self.tail.set(tail.wrapping_add(n));
            h.tail.store(tail.wrapping_add(n), Ordering::Release);
            h.not_empty.notify_all();
        }
        Ok(n as usize)
    }

    /// Writes the next message in place: `fill` gets the free slot (holding an old
    /// message or zeros) as `&mut T` and the message is published when it returns. No
    /// copy through the stack, however large `T` is. Waits while the queue is full.
    ///
    /// If `fill` panics, nothing is sent (the slot stays free) and the panic goes on.
    ///
    /// ```
    /// let (tx, rx) = procshare::spsc::<[u64; 16]>(64)?;
    /// tx.send_with(|slot| {
    ///     slot.fill(0);
    ///     slot[0] = 42;
    /// })?;
    /// assert_eq!(rx.recv_with(|msg| msg[0])?, 42);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `Disconnected(())` if every receiver is gone, `Corrupted(())` if the queue is
    /// corrupted; `fill` was not called.
    pub fn send_with(&self, fill: impl FnOnce(&mut T)) -> Result<(), SendError<()>> {
        let mut fill = Some(fill);
        self.write_until(
            1,
            &mut |_, slot| (fill.take().expect("called once"))(slot),
            Deadline::NEVER,
        )
        .map(|_| ())
        .map_err(send_error)
    }

    /// [`send_with`](Sender::send_with) if there is room now; otherwise `fill` is not
    /// called.
    ///
    /// # Errors
    ///
    /// `Full(())`, `Disconnected(())` or `Corrupted(())`.
    pub fn try_send_with(&self, fill: impl FnOnce(&mut T)) -> Result<(), TrySendError<()>> {
        let mut fill = Some(fill);
        self.try_write(1, &mut |_, slot| (fill.take().expect("called once"))(slot))
            .map(|_| ())
    }

    /// Writes up to `max` messages in place with one index update: waits for room for
    /// one, then calls `fill(i, slot)` for `i` in `0..n`, where `n` is how many slots are
    /// free now (at most `max`), and publishes them together. Returns `n`.
    ///
    /// If `fill` panics, the messages it finished before are sent, the one it was writing
    /// is not, and the panic goes on.
    ///
    /// ```
    /// let (tx, rx) = procshare::spsc::<[u8; 64]>(1024)?;
    /// let mut next = 0u8;
    /// while next < 100 {
    ///     let n = tx.send_batch_with(usize::from(100 - next), |_, slot| {
    ///         slot.fill(next);
    ///         next += 1;
    ///     })?;
    ///     assert!(n > 0);
    /// }
    /// let mut firsts = Vec::new();
    /// while firsts.len() < 100 {
    ///     rx.recv_batch_with(100, |msg| firsts.push(msg[0]))?;
    /// }
    /// assert_eq!(firsts, (0..100).collect::<Vec<u8>>());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`send_with`](Sender::send_with); nothing was written.
    pub fn send_batch_with(
        &self,
        max: usize,
        mut fill: impl FnMut(usize, &mut T),
    ) -> Result<usize, SendError<()>> {
        if max == 0 {
            return Ok(0);
        }
        self.write_until(max, &mut fill, Deadline::NEVER)
            .map_err(send_error)
    }

    fn write_until(
        &self,
        max: usize,
        fill: &mut impl FnMut(usize, &mut T),
        deadline: Deadline,
    ) -> Result<usize, SendTimeoutError<()>> {
        let h = self.ring.header();
        block_on(
            &h.not_full,
            deadline,
            || match self.try_write(max, fill) {
                Ok(n) => Attempt::Ready(Ok(n)),
                Err(TrySendError::Full(())) => Attempt::Blocked,
                Err(TrySendError::Disconnected(())) => {
                    Attempt::Ready(Err(SendTimeoutError::Disconnected(())))
                }
                Err(TrySendError::Corrupted(())) => {
                    Attempt::Ready(Err(SendTimeoutError::Corrupted(())))
                }
            },
            || {
                (!RawSender::receivers_alive(self))
                    .then_some(Err(SendTimeoutError::Disconnected(())))
            },
        )
        .unwrap_or(Err(SendTimeoutError::Timeout(())))
    }

    /// Fills and publishes up to `max` free slots; `Full` if there are none.
    #[inline]
    fn try_write(
        &self,
        max: usize,
        fill: &mut impl FnMut(usize, &mut T),
    ) -> Result<usize, TrySendError<()>> {
        self.enter()?;
        let mut room = self.room(max as u64)?;
        if room == 0 && self.check.due() {
            if !RawSender::receivers_alive(self) {
                return Err(TrySendError::Disconnected(()));
            }
            room = self.room(1)?;
        }
        if room == 0 {
            return Err(TrySendError::Full(()));
        }
        let n = room.min(max as u64);
        let mut publish = Publish {
            sender: self,
            start: self.tail.get(),
            done: 0,
        };
        while publish.done < n {
            let pos = publish.start.wrapping_add(publish.done);
            // SAFETY: the slot at `pos` is free (pos - head < capacity) and only this
            // producer touches it until `tail` is published; it holds a valid T (see
            // `Slot`), so lending it as `&mut T` is sound.
            self.ring
                .slot(pos)
                .with_mut(|p| fill(publish.done as usize, unsafe { (*p).assume_init_mut() }));
            publish.done += 1;
        }
        Ok(n as usize)
    }

    /// Test hook: how many waiters the receiver's eventcount has announced.
    #[cfg(any(test, feature = "test-hooks"))]
    #[doc(hidden)]
    pub fn __not_empty_waiters(&self) -> u32 {
        self.ring.header().not_empty.waiters()
    }

    sender_api!();
}

/// Publishes the slots an in-place write finished, when it ends or unwinds: a `fill`
/// that panics leaves the slot it was writing unpublished (free), never half-sent.
struct Publish<'a, T: ShmSafe + Copy + Send> {
    sender: &'a Sender<T>,
    start: u64,
    done: u64,
}

impl<T: ShmSafe + Copy + Send> Drop for Publish<'_, T> {
    fn drop(&mut self) {
        if self.done == 0 {
            return;
        }
        let tail = self.start.wrapping_add(self.done);
        let h = self.sender.ring.header();
        self.sender.tail.set(tail);
        // SYNC POINT: releases the slots written above to the consumer's acquire of `tail`.
        h.tail.store(tail, Ordering::Release);
        h.not_empty.notify_all();
    }
}

/// Releases the slots an in-place read lent out, when it ends or unwinds: a message
/// whose reader panicked counts as received.
struct Release<'a, T: ShmSafe + Copy + Send> {
    receiver: &'a Receiver<T>,
    start: u64,
    done: u64,
}

impl<T: ShmSafe + Copy + Send> Drop for Release<'_, T> {
    fn drop(&mut self) {
        if self.done == 0 {
            return;
        }
        let head = self.start.wrapping_add(self.done);
        let h = self.receiver.ring.header();
        self.receiver.head.set(head);
        // SYNC POINT: the reads above happen before the producer reuses these slots.
        h.head.store(head, Ordering::Release);
        h.not_full.notify_all();
    }
}

fn send_error(e: SendTimeoutError<()>) -> SendError<()> {
    match e {
        SendTimeoutError::Corrupted(()) => SendError::Corrupted(()),
        _ => SendError::Disconnected(()),
    }
}

fn recv_error(e: RecvTimeoutError) -> RecvError {
    match e {
        RecvTimeoutError::Corrupted(w) => RecvError::Corrupted(w),
        _ => RecvError::Disconnected,
    }
}

fn with_value<T>(e: TrySendError<()>, value: T) -> TrySendError<T> {
    match e {
        TrySendError::Full(()) => TrySendError::Full(value),
        TrySendError::Disconnected(()) => TrySendError::Disconnected(value),
        TrySendError::Corrupted(()) => TrySendError::Corrupted(value),
    }
}

impl<T: ShmSafe + Copy + Send> RawSender<T> for Sender<T> {
    #[inline]
    fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        if let Err(e) = self.enter() {
            return Err(with_value(e, value));
        }
        let mut room = self.room(1).map_err(|e| with_value(e, value))?;
        if room == 0 && self.check.due() {
            if !self.receivers_alive() {
                return Err(TrySendError::Disconnected(value));
            }
            room = self.room(1).map_err(|e| with_value(e, value))?;
        }
        if room == 0 {
            return Err(TrySendError::Full(value));
        }
        let tail = self.tail.get();
        // SAFETY: the slot at `tail` is free (tail - head < capacity) and only this
        // producer writes it until `tail` is published.
        self.ring
            .slot(tail)
            .with_mut(|p| unsafe { (*p).write(value) });
        let h = self.ring.header();
        self.tail.set(tail.wrapping_add(1));
        h.tail.store(tail.wrapping_add(1), Ordering::Release);
        h.not_empty.notify_all();
        Ok(())
    }

    #[inline]
    fn try_send_ref(&self, value: &T) -> Result<(), TrySendError<()>> {
        self.try_write(1, &mut |_, slot| *slot = *value).map(|_| ())
    }

    fn not_full(&self) -> &EventCount {
        &self.ring.header().not_full
    }

    fn receivers_alive(&self) -> bool {
        self.ring.header().receivers.any_alive()
    }
}

impl<T: ShmSafe + Copy + Send> Receiver<T> {
    /// A handle on `ring`, already counted in its receivers' table.
    fn new(ring: Arc<Ring<T>>) -> Receiver<T> {
        let h = ring.header();
        let head = h.head.load(Ordering::Acquire);
        Receiver {
            owned: Cell::new(ownership::NEVER),
            check: CheckClock::new(),
            head: Cell::new(head),
            tail_seen: Cell::new(head),
            ring,
        }
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
        self.ring.header().attach_sender()?;
        Ok(Sender::new(Arc::clone(&self.ring)))
    }

    /// Checks and returns how many messages are ready, refreshing the cached tail.
    fn ready(&self) -> Result<u64, TryRecvError> {
        let head = self.head.get();
        let h = self.ring.header();
        let tail = h.tail.load(Ordering::Acquire);
        let ready = tail.wrapping_sub(head);
        if ready > self.ring.capacity() {
            h.mark_corrupted(CORRUPTED);
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

    /// How many messages are ready (at least one), looking at the shared `tail` only if
    /// the cached one shows fewer than `want`; ownership and corruption checked first.
    /// When there are none, at most every 20 ms, the check a blocking receive runs: are
    /// the senders alive?
    #[inline]
    fn available(&self, want: u64) -> Result<u64, TryRecvError> {
        let h = self.ring.header();
        if self.owned.get() != ownership::generation() {
            self.take_ownership();
        }
        if h.corrupted.load(Ordering::Relaxed) != 0 {
            return Err(TryRecvError::Corrupted(
                "this spsc queue was marked corrupted: a peer found an impossible position".into(),
            ));
        }
        let cached = self.tail_seen.get().wrapping_sub(self.head.get());
        if cached >= want {
            return Ok(cached);
        }
        // The cached tail may be stale: look at the shared one before settling for less.
        match self.ready()? {
            0 if self.check.due() => {
                self.senders_alive();
                match self.ready()? {
                    0 => Err(self.empty_or_disconnected()),
                    n => Ok(n),
                }
            }
            0 => Err(self.empty_or_disconnected()),
            n => Ok(n),
        }
    }

    #[cold]
    fn take_ownership(&self) {
        ownership::refuse_moved(self.owned.get(), "spsc::Receiver");
        let h = self.ring.header();
        self.owned.set(ownership::take(
            &h.extra.receiver,
            &h.senders,
            "spsc::Receiver",
            "receive",
        ));
        // Another process may have received since this handle last did: resume there.
        let head = h.head.load(Ordering::Acquire);
        self.head.set(head);
        self.tail_seen.set(head);
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
        let ready = self.available(max as u64)?;
        let head = self.head.get();
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

    /// Receives the next message in place: `f` reads it where it lies in the ring (no
    /// copy through the stack), and its slot is released when `f` returns. Waits while
    /// the queue is empty.
    ///
    /// If `f` panics, the message counts as received and the panic goes on.
    ///
    /// ```
    /// let (tx, rx) = procshare::spsc::<[f64; 128]>(16)?;
    /// tx.send_with(|slot| slot.fill(0.5))?;
    /// let sum: f64 = rx.recv_with(|msg| msg.iter().sum())?;
    /// assert_eq!(sum, 64.0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `Disconnected` once the queue is empty and every sender is gone, `Corrupted`.
    pub fn recv_with<R>(&self, f: impl FnOnce(&T) -> R) -> Result<R, RecvError> {
        let (mut f, mut out) = (Some(f), None);
        self.read_until(
            1,
            &mut |msg| out = Some((f.take().expect("called once"))(msg)),
            Deadline::NEVER,
        )
        .map_err(recv_error)?;
        Ok(out.expect("one message was read"))
    }

    /// [`recv_with`](Receiver::recv_with) if a message is ready now; otherwise `f` is
    /// not called.
    ///
    /// # Errors
    ///
    /// `Empty`, `Disconnected` or `Corrupted`.
    pub fn try_recv_with<R>(&self, f: impl FnOnce(&T) -> R) -> Result<R, TryRecvError> {
        let (mut f, mut out) = (Some(f), None);
        self.try_read(1, &mut |msg| {
            out = Some((f.take().expect("called once"))(msg))
        })?;
        Ok(out.expect("one message was read"))
    }

    /// Reads up to `max` messages in place with one index update: waits for one, then
    /// calls `f` on each message ready now (at most `max`), in order, and releases their
    /// slots together. Returns how many. See [`Sender::send_batch_with`] for an example.
    ///
    /// If `f` panics, the messages before and the one it was reading count as received.
    ///
    /// # Errors
    ///
    /// As for [`recv_with`](Receiver::recv_with).
    pub fn recv_batch_with(&self, max: usize, mut f: impl FnMut(&T)) -> Result<usize, RecvError> {
        if max == 0 {
            return Ok(0);
        }
        self.read_until(max, &mut f, Deadline::NEVER)
            .map_err(recv_error)
    }

    fn read_until(
        &self,
        max: usize,
        f: &mut impl FnMut(&T),
        deadline: Deadline,
    ) -> Result<usize, RecvTimeoutError> {
        let h = self.ring.header();
        // Both the attempt and the final look after the senders left may read.
        let f = std::cell::RefCell::new(f);
        block_on(
            &h.not_empty,
            deadline,
            || match self.try_read(max, *f.borrow_mut()) {
                Ok(n) => Attempt::Ready(Ok(n)),
                Err(TryRecvError::Empty) => Attempt::Blocked,
                Err(TryRecvError::Disconnected) => {
                    Attempt::Ready(Err(RecvTimeoutError::Disconnected))
                }
                Err(TryRecvError::Corrupted(w)) => {
                    Attempt::Ready(Err(RecvTimeoutError::Corrupted(w)))
                }
            },
            || {
                if RawReceiver::senders_alive(self) {
                    return None;
                }
                // Every sender is gone, but one may have sent just before going.
                Some(match self.try_read(max, *f.borrow_mut()) {
                    Ok(n) => Ok(n),
                    Err(TryRecvError::Corrupted(w)) => Err(RecvTimeoutError::Corrupted(w)),
                    Err(_) => Err(RecvTimeoutError::Disconnected),
                })
            },
        )
        .unwrap_or(Err(RecvTimeoutError::Timeout))
    }

    /// Lends up to `max` ready messages to `f` and releases them; `Empty` if none.
    #[inline]
    fn try_read(&self, max: usize, f: &mut impl FnMut(&T)) -> Result<usize, TryRecvError> {
        let n = self.available(max as u64)?.min(max as u64);
        let mut release = Release {
            receiver: self,
            start: self.head.get(),
            done: 0,
        };
        while release.done < n {
            let pos = release.start.wrapping_add(release.done);
            // Counted before `f` runs: a message whose reader panics is received.
            release.done += 1;
            // SAFETY: positions below the published tail hold messages the producer wrote
            // (the acquire load of `tail` made them visible) and will not touch until we
            // publish `head`.
            self.ring
                .slot(pos)
                .with(|p| f(unsafe { (*p).assume_init_ref() }));
        }
        Ok(n as usize)
    }

    receiver_api!();
}

impl<T: ShmSafe + Copy + Send> RawReceiver<T> for Receiver<T> {
    #[inline]
    fn try_recv(&self) -> Result<T, TryRecvError> {
        self.available(1)?;
        let head = self.head.get();
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

    #[inline]
    fn try_recv_into(&self, out: &mut MaybeUninit<T>) -> Result<(), TryRecvError> {
        self.try_read(1, &mut |m| {
            out.write(*m);
        })
        .map(|_| ())
    }

    fn not_empty(&self) -> &EventCount {
        &self.ring.header().not_empty
    }

    fn senders_alive(&self) -> bool {
        self.ring.header().senders.any_alive()
    }
}

// ---- Handing an end to a spawned child (`process::handles`) ---------------------------

impl<T: ShmSafe + Copy + Send> Sender<T> {
    /// See [`RingMem::exported`].
    pub(crate) fn exported(&self) -> Option<super::ring::Exported<'_>> {
        self.ring.exported(&self.ring.header().senders)
    }

    /// This end now belongs to the child it was encoded for: gives up this process's
    /// ownership, and makes every later use of this handle panic (see
    /// [`ownership::MOVED`]). Dropping it still only uncounts it.
    pub(crate) fn hand_over(&self) {
        ownership::release(&self.ring.header().extra.sender, self.owned.get());
        self.owned.set(ownership::MOVED);
    }

    /// Whether [`hand_over`](Self::hand_over) ran: the end belongs to a spawned child.
    pub(crate) fn handed_over(&self) -> bool {
        self.owned.get() == ownership::MOVED
    }

    /// A sender on the ring whose segment arrived as `fd`, counted by `count` (which
    /// takes over the loan the parent made) instead of [`peers::attach`]. It owns the
    /// end from its first use, as after a fork.
    pub(crate) fn adopt(
        fd: std::os::fd::OwnedFd,
        count: impl FnOnce(&super::peers::PeerTable) -> Result<()>,
    ) -> Result<Sender<T>> {
        let ring = Arc::new(Ring::<T>::adopt("spsc", 1, fd)?);
        count(&ring.header().senders)?;
        let h = ring.header();
        let (tail, head) = (
            h.tail.load(Ordering::Acquire),
            h.head.load(Ordering::Acquire),
        );
        Ok(Sender {
            owned: Cell::new(ownership::NEVER),
            check: CheckClock::new(),
            tail: Cell::new(tail),
            head_seen: Cell::new(head),
            ring,
        })
    }
}

impl<T: ShmSafe + Copy + Send> Receiver<T> {
    /// See [`RingMem::exported`].
    pub(crate) fn exported(&self) -> Option<super::ring::Exported<'_>> {
        self.ring.exported(&self.ring.header().receivers)
    }

    /// As [`Sender::hand_over`].
    pub(crate) fn hand_over(&self) {
        ownership::release(&self.ring.header().extra.receiver, self.owned.get());
        self.owned.set(ownership::MOVED);
    }

    /// As [`Sender::handed_over`].
    pub(crate) fn handed_over(&self) -> bool {
        self.owned.get() == ownership::MOVED
    }

    /// As [`Sender::adopt`].
    pub(crate) fn adopt(
        fd: std::os::fd::OwnedFd,
        count: impl FnOnce(&super::peers::PeerTable) -> Result<()>,
    ) -> Result<Receiver<T>> {
        let ring = Arc::new(Ring::<T>::adopt("spsc", 1, fd)?);
        count(&ring.header().receivers)?;
        let head = ring.header().head.load(Ordering::Acquire);
        Ok(Receiver {
            owned: Cell::new(ownership::NEVER),
            check: CheckClock::new(),
            head: Cell::new(head),
            tail_seen: Cell::new(head),
            ring,
        })
    }
}

impl<T: ShmSafe + Copy + Send> Drop for Sender<T> {
    fn drop(&mut self) {
        let h = self.ring.header();
        ownership::release(&h.extra.sender, self.owned.get());
        h.sender_dropped();
    }
}

impl<T: ShmSafe + Copy + Send> Drop for Receiver<T> {
    fn drop(&mut self) {
        let h = self.ring.header();
        ownership::release(&h.extra.receiver, self.owned.get());
        h.receiver_dropped();
    }
}

ring_handles!("spsc");

/// Which process uses each spsc end (see "One process per end" in the module docs).
mod ownership {
    use std::cell::UnsafeCell;
    use std::sync::Once;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use crate::liveness;
    use crate::loom_switch;
    use crate::queue::peers::{self, PeerTable};
    use crate::sys;

    /// A generation no handle has checked in.
    pub(super) const NEVER: u64 = 0;

    /// Not a generation: the handle was encoded into a `Process::spawn` argument, and
    /// the end belongs to that child now. Never equal to [`generation`], so every use
    /// goes to the cold path, which panics ([`refuse_moved`]), and the drop releases
    /// nothing (the child may own the end by then).
    pub(super) const MOVED: u64 = u64::MAX;

    /// Panics if the handle was handed to a spawned child (see [`MOVED`]).
    #[track_caller]
    pub(super) fn refuse_moved(owned: u64, end: &str) {
        if owned == MOVED {
            panic!(
                "this {end} was handed to a spawned child (it was encoded into a \
                 Process::spawn argument), which owns the end now: an spsc end has one user. \
                 Drop this handle here, or hand the child a `procshare::channel` end to \
                 share one"
            );
        }
    }

    /// Moves on at every fork (in the parent's prepare handler, so parent and child both
    /// see the new value): a handle that checked ownership in an older generation checks
    /// again before its next operation.
    static GENERATION: AtomicU64 = AtomicU64::new(1);

    #[inline]
    pub(super) fn generation() -> u64 {
        GENERATION.load(Ordering::Relaxed)
    }

    /// The owner words this process holds (addresses of `AtomicU64`s in mapped rings
    /// kept alive by the owning handles), for the prepare handler to release. A spin
    /// lock, not a std Mutex, as in `peers`: the handlers hold it across the fork.
    struct Owned {
        locked: AtomicBool,
        words: UnsafeCell<Vec<usize>>,
    }

    // SAFETY: `words` is only touched with `locked` held.
    unsafe impl Sync for Owned {}

    static OWNED: Owned = Owned {
        locked: AtomicBool::new(false),
        words: UnsafeCell::new(Vec::new()),
    };
    static HANDLERS: Once = Once::new();

    impl Owned {
        fn lock(&self) {
            while self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                std::hint::spin_loop();
            }
        }

        fn unlock(&self) {
            self.locked.store(false, Ordering::Release);
        }

        fn with<R>(&self, f: impl FnOnce(&mut Vec<usize>) -> R) -> R {
            self.lock();
            // SAFETY: we hold the lock, so no other reference to `words` exists.
            let r = f(unsafe { &mut *self.words.get() });
            self.unlock();
            r
        }
    }

    extern "C" fn prepare_fork() {
        OWNED.lock();
        let me = peers::current_process();
        // SAFETY: the lock is held until `after_fork` releases it.
        let words = unsafe { &mut *OWNED.words.get() };
        for &word in words.iter() {
            // SAFETY: a word is listed only while a handle of this process owns it, which
            // keeps its mapping alive, and the list cannot change while we hold the lock.
            let word = unsafe { &*(word as *const loom_switch::AtomicU64) };
            let _ = word.compare_exchange(me, 0, Ordering::SeqCst, Ordering::Relaxed);
        }
        words.clear(); // no allocation: clear keeps the buffer
        GENERATION.fetch_add(1, Ordering::SeqCst);
    }

    extern "C" fn after_fork() {
        OWNED.unlock();
    }

    /// Makes this process the owner of the end whose owner word is `word`, and returns
    /// the generation the handle may cache.
    ///
    /// # Panics
    ///
    /// If another live process owns the end.
    pub(super) fn take(
        word: &loom_switch::AtomicU64,
        ns_table: &PeerTable,
        end: &str,
        verb: &str,
    ) -> u64 {
        HANDLERS.call_once(|| sys::register_fork_handlers(prepare_fork, after_fork, after_fork));
        let generation = generation();
        if ns_table.foreign() {
            // Never record (or judge) an identity of another pid namespace.
            peers::refuse_foreign(&format!("{end} (spsc queue)"));
        }
        let me = peers::current_process();
        loop {
            let owner = word.load(Ordering::Acquire);
            if owner == me {
                break;
            }
            if owner != 0 && !liveness::process_is_dead(owner) {
                panic!(
                    "this {end} is already used by another live process (pid {}): an spsc \
                     queue has one sender and one receiver, and two processes using the same \
                     end would duplicate or lose messages. Use the end in one process only \
                     (drop it in the others), or use `procshare::channel` to {verb} from \
                     several processes",
                    crate::owner::identity_parts(owner).0
                );
            }
            if word
                .compare_exchange(owner, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break;
            }
        }
        let addr = word as *const loom_switch::AtomicU64 as usize;
        OWNED.with(|words| {
            if !words.contains(&addr) {
                words.push(addr);
            }
        });
        generation
    }

    /// Gives up ownership held since `generation`, when the handle is dropped.
    pub(super) fn release(word: &loom_switch::AtomicU64, generation: u64) {
        if generation != self::generation() {
            return; // not ours in this process (or not since the last fork)
        }
        let addr = word as *const loom_switch::AtomicU64 as usize;
        OWNED.with(|words| words.retain(|&w| w != addr));
        let _ = word.compare_exchange(
            peers::current_process(),
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
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
        for i in 0..if cfg!(miri) { 40 } else { 1000 } {
            tx.send(i).unwrap();
            assert_eq!(rx.recv().unwrap(), i);
        }
    }

    #[test]
    fn in_place_writes_and_reads_in_order() {
        let (tx, rx) = heap_spsc::<[u32; 4]>(4).unwrap();
        // A fresh slot holds zeros (a valid T), so `fill` may read it.
        tx.send_with(|slot| {
            assert_eq!(*slot, [0; 4]);
            slot[0] = 1;
        })
        .unwrap();
        assert_eq!(rx.try_recv_with(|m| m[0]), Ok(1));
        assert!(matches!(
            rx.try_recv_with(|m| m[0]),
            Err(TryRecvError::Empty)
        ));
        // A batch takes only the free slots (4), with one index update.
        let n = tx
            .send_batch_with(10, |i, slot| *slot = [i as u32; 4])
            .unwrap();
        assert_eq!(n, 4);
        assert!(matches!(
            tx.try_send_with(|_| unreachable!("no room: not called")),
            Err(TrySendError::Full(()))
        ));
        let mut got = Vec::new();
        assert_eq!(rx.recv_batch_with(3, |m| got.push(m[0])).unwrap(), 3);
        assert_eq!(rx.recv_batch_with(3, |m| got.push(m[3])).unwrap(), 1);
        assert_eq!(got, [0, 1, 2, 3]);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "unwinding through the ring's closures is slow under Miri"
    )]
    fn a_panicking_fill_sends_nothing_and_a_panicking_reader_consumes() {
        use std::panic::{AssertUnwindSafe, catch_unwind};
        let (tx, rx) = heap_spsc::<u64>(8).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            tx.send_batch_with(5, |i, slot| {
                assert!(i < 2, "fill fails on the third message");
                *slot = 10 + i as u64;
            })
        }));
        assert!(r.is_err());
        // The two finished messages went out; the third did not.
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [10, 11]);
        tx.send(12).unwrap();
        tx.send(13).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            rx.recv_with(|_| panic!("the reader fails"))
        }));
        assert!(r.is_err());
        assert_eq!(rx.try_recv(), Ok(13), "12 counts as received");
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
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

    #[test]
    fn an_impossible_tail_is_corruption_for_both_ends_from_then_on() {
        let (tx, rx) = heap_spsc::<u8>(4).unwrap();
        tx.send(1).unwrap();
        rx.ring.header().tail.store(1000, Ordering::SeqCst);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Corrupted(_))));
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Corrupted(_))));
        assert!(matches!(tx.try_send(2), Err(TrySendError::Corrupted(2))));
        assert!(matches!(tx.send(3), Err(SendError::Corrupted(3))));
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(RecvTimeoutError::Corrupted(_))
        ));
    }
}
