//! [`ByteQueue`]: variable-length byte messages of any size in a shared byte ring, MPMC,
//! with a loan API for zero-copy sends and receives. [`Queue<T>`](crate::Queue) is built on
//! it.
//!
//! # Layout and protocol
//!
//! Messages are records in a byte ring (after Aeron/Agrona): a 16-byte record header, then
//! the payload, padded to 16 bytes. A record that would cross the end of the ring is
//! preceded by a padding record that fills the rest. Three positions only grow: `tail`
//! (bytes reserved by producers), `head` (bytes claimed by consumers) and `free` (bytes
//! consumed and reusable). Producers serialise *reserving* on one robust mutex, consumers
//! *claiming* on another; the payload copies happen outside both, so a producer and a
//! consumer, or several of each, copy in parallel.
//!
//! A record header is a state word and an owner word:
//!
//! * `WRITING` (owner = the producer's thread) → `READY` → `READING` (owner = the
//!   consumer's thread) → `DONE`; padding is written `READY` with kind `PAD`.
//! * The owner is written before the state that names it, and a reservation or claim is
//!   made under its lock, so whoever finds a `WRITING` or `READING` record also finds who
//!   holds it. If the kernel says that thread is gone, the record is finished for it
//!   (`DONE`): an unpublished message was never sent, and a half-read one is lost with its
//!   reader. Nobody else is blocked for good.
//!
//! # Large messages
//!
//! A message whose record would take more than a quarter of the ring is sent in chunks
//! (`FIRST`, `MIDDLE`..., `LAST`; the first carries the total length) while the producer
//! keeps the producer lock, so its chunks are consecutive. The consumer that claims a
//! `FIRST` keeps the consumer lock until the `LAST` and reassembles. If the producer dies
//! mid-message, the next record a consumer sees is not a continuation, and the partial
//! message is dropped; chunks without their `FIRST` are skipped. Nothing half-sent is ever
//! delivered. Messages above the queue's `max_message` are refused before anything is
//! written, with [`QueueError::MessageTooLarge`].
//!
//! Everything read from the ring (positions, lengths, states) is checked before use;
//! impossible values give [`QueueError::Corrupted`], never an out-of-bounds access.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::eventcount::{Attempt, EventCount, block_on};
use super::peers::{self, PeerTable};
use super::ring::{CachePadded, RingMem};
use crate::error::Result;
use crate::sync::RawMutex;
use crate::sys::{self, Deadline};

/// What went wrong in a [`Queue`](crate::Queue) or [`ByteQueue`] operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueError {
    /// `try_put`: no room right now.
    Full,
    /// `try_get`: nothing to receive right now.
    Empty,
    /// The timeout passed.
    Timeout,
    /// [`close`](ByteQueue::close) was called: no more puts; gets drain what is left.
    Closed,
    /// No other live handle to the queue exists in any process, so the wait could never
    /// end.
    Disconnected,
    /// The message is larger than the queue's maximum; nothing was sent.
    MessageTooLarge {
        /// Encoded size of the message.
        size: usize,
        /// The queue's `max_message`.
        max: usize,
    },
    /// The value could not be encoded; nothing was sent.
    Encode(String),
    /// A received message could not be decoded as the queue's type.
    Decode(String),
    /// The queue's shared memory holds impossible values.
    Corrupted(String),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Full => f.write_str("the queue is full: retry, or use a blocking put"),
            QueueError::Empty => f.write_str("the queue is empty: retry, or use a blocking get"),
            QueueError::Timeout => {
                f.write_str("the queue operation timed out: retry or wait longer")
            }
            QueueError::Closed => {
                f.write_str("the queue was closed: no more messages can be put, and none are left")
            }
            QueueError::Disconnected => f.write_str(
                "no other process or thread holds this queue any more, so this wait could never \
                 end",
            ),
            QueueError::MessageTooLarge { size, max } => write!(
                f,
                "message of {size} bytes is larger than this queue's maximum of {max}: raise it \
                 with `Queue::builder().max_message(..)`, or send smaller pieces; nothing was sent"
            ),
            QueueError::Encode(e) => {
                write!(f, "could not encode the message ({e}); nothing was sent")
            }
            QueueError::Decode(e) => write!(
                f,
                "could not decode a received message ({e}): every process must use the same \
                 message type and build"
            ),
            QueueError::Corrupted(what) => write!(
                f,
                "the queue's shared memory is corrupted ({what}): a peer wrote an impossible \
                 value; recreate the queue"
            ),
        }
    }
}

impl std::error::Error for QueueError {}

const REC_HEADER: u64 = 16;
const ALIGN: u64 = 16;

const ST_WRITING: u64 = 1;
const ST_READY: u64 = 2;
const ST_READING: u64 = 3;
const ST_DONE: u64 = 4;

const K_SINGLE: u64 = 0;
const K_FIRST: u64 = 1;
const K_MIDDLE: u64 = 2;
const K_LAST: u64 = 3;
const K_PAD: u64 = 4;

fn word(state: u64, kind: u64, len: u64) -> u64 {
    (state << 56) | (kind << 48) | len
}

fn record_len(payload: u64) -> u64 {
    REC_HEADER + payload.next_multiple_of(ALIGN)
}

#[repr(C)]
pub(crate) struct Header {
    producer: CachePadded<RawMutex>,
    consumer: CachePadded<RawMutex>,
    tail: CachePadded<AtomicU64>,
    head: CachePadded<AtomicU64>,
    free: CachePadded<AtomicU64>,
    not_empty: CachePadded<EventCount>,
    not_full: CachePadded<EventCount>,
    /// Whole messages published and not yet claimed.
    count: AtomicU64,
    closed: AtomicU32,
    handles: PeerTable,
}

/// The shared part of a byte queue, plus the process-local settings.
pub(crate) struct Core {
    ring: RingMem<Header, u8>,
    max_message: usize,
}

/// A claimed or reserved record: its position and payload length.
#[derive(Clone, Copy)]
struct Rec {
    pos: u64,
    kind: u64,
    len: u64,
}

/// How reassembling a chunked message ended.
enum Assembly {
    Done(Vec<u8>),
    Abandoned(Option<Rec>),
}

/// How a receive attempt ended, before the payload is handed to the caller.
enum Got {
    /// A whole single-record message, claimed and ready to read in place.
    InPlace(Rec),
    /// A reassembled chunked message.
    Assembled(Vec<u8>),
}

impl Core {
    fn create(capacity: usize, max_message: usize) -> Result<Core> {
        let capacity = capacity.max(4096);
        let ring = RingMem::create("bytequeue", capacity, Header::new, |_| 0u8)?;
        Ok(Core { ring, max_message })
    }

    fn h(&self) -> &Header {
        self.ring.header()
    }

    fn cap(&self) -> u64 {
        self.ring.capacity()
    }

    /// Largest payload that goes in a single record.
    fn single_limit(&self) -> u64 {
        self.cap() / 4 - REC_HEADER
    }

    fn rec_header(&self, pos: u64) -> Result<&RecHeader, QueueError> {
        let off = pos & (self.cap() - 1);
        if off % ALIGN != 0 || off + REC_HEADER > self.cap() {
            return Err(QueueError::Corrupted(format!(
                "record at unaligned position {pos}"
            )));
        }
        // SAFETY: `off + 16 <= capacity` and `off` is 16-aligned in a 128-aligned data
        // area, so this is an aligned RecHeader inside the ring; its words are only ever
        // accessed atomically.
        Ok(unsafe { &*self.ring.slots_ptr().add(off as usize).cast::<RecHeader>() })
    }

    /// The payload bytes of `rec`.
    ///
    /// # Safety
    ///
    /// The caller must own the record (reserved it, or claimed it) for the returned
    /// slice's lifetime, so no other process touches these bytes meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn payload(&self, rec: Rec) -> &mut [u8] {
        let off = (rec.pos & (self.cap() - 1)) + REC_HEADER;
        // SAFETY: `read_record`/`reserve` checked off + len <= capacity; exclusivity is
        // the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ring.slots_ptr().add(off as usize),
                rec.len as usize,
            )
        }
    }

    /// Checks the positions, which only ever satisfy `free <= head <= tail <= free + cap`.
    fn positions(&self) -> Result<(u64, u64, u64), QueueError> {
        let h = self.h();
        let free = h.free.load(Ordering::Acquire);
        let head = h.head.load(Ordering::Acquire);
        let tail = h.tail.load(Ordering::Acquire);
        if head.wrapping_sub(free) > self.cap() || tail.wrapping_sub(head) > self.cap() {
            let what = format!("positions free {free}, head {head}, tail {tail}");
            return Err(QueueError::Corrupted(what));
        }
        Ok((free, head, tail))
    }

    /// Reads and checks the record at `pos`, which must lie before `limit`.
    fn read_record(&self, pos: u64, limit: u64) -> Result<(u64, Rec), QueueError> {
        let w = self.rec_header(pos)?.word.load(Ordering::Acquire);
        let (state, kind, len) = (w >> 56, (w >> 48) & 0xff, w & 0xffff_ffff);
        let off = pos & (self.cap() - 1);
        let span = record_len(len);
        if state == 0
            || state > ST_DONE
            || kind > K_PAD
            || off + span > self.cap()
            || span > limit - pos
        {
            return Err(QueueError::Corrupted(format!(
                "record at {pos}: state {state}, kind {kind}, length {len}"
            )));
        }
        Ok((state, Rec { pos, kind, len }))
    }

    // ---- producer side -------------------------------------------------------------

    /// Reserves a record with `len` payload bytes (plus padding if it would wrap). The
    /// caller holds the producer lock.
    fn reserve(&self, len: u64, kind: u64) -> Result<Option<Rec>, QueueError> {
        let h = self.h();
        let (free, _, tail) = self.positions()?;
        let span = record_len(len);
        let off = tail & (self.cap() - 1);
        let to_end = self.cap() - off;
        let pad = if span > to_end { to_end } else { 0 };
        if tail.wrapping_add(pad + span).wrapping_sub(free) > self.cap() {
            return Ok(None);
        }
        let me = owner_tag();
        if pad > 0 {
            let r = self.rec_header(tail)?;
            r.owner.store(me, Ordering::Relaxed);
            r.word
                .store(word(ST_READY, K_PAD, pad - REC_HEADER), Ordering::Release);
        }
        let pos = tail.wrapping_add(pad);
        let r = self.rec_header(pos)?;
        r.owner.store(me, Ordering::Relaxed);
        r.word.store(word(ST_WRITING, kind, len), Ordering::Release);
        h.tail.store(pos.wrapping_add(span), Ordering::Release);
        Ok(Some(Rec { pos, kind, len }))
    }

    /// Makes a reserved record visible (or, with `discard`, drops it unseen).
    fn publish(&self, rec: Rec, discard: bool) {
        let h = self.h();
        let (state, kind) = if discard {
            (ST_READY, K_PAD)
        } else {
            (ST_READY, rec.kind)
        };
        if let Ok(r) = self.rec_header(rec.pos) {
            r.word.store(word(state, kind, rec.len), Ordering::Release);
        }
        if !discard && matches!(rec.kind, K_SINGLE | K_LAST) {
            h.count.fetch_add(1, Ordering::Relaxed);
        }
        h.not_empty.notify_all();
    }

    fn lock_producer(&self) -> RawLockGuard<'_> {
        RawLockGuard::new(&self.h().producer)
    }

    fn lock_consumer(&self) -> RawLockGuard<'_> {
        RawLockGuard::new(&self.h().consumer)
    }

    /// Sends one message of `len` bytes written by `fill`, waiting for room until
    /// `deadline`.
    pub(crate) fn send(
        &self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        if len > self.max_message {
            return Err(QueueError::MessageTooLarge {
                size: len,
                max: self.max_message,
            });
        }
        if self.h().closed.load(Ordering::Acquire) != 0 {
            return Err(QueueError::Closed);
        }
        if len as u64 > self.single_limit() {
            return self.send_chunked(len, fill, deadline);
        }
        let rec = self.wait_for_room(deadline, || {
            let _g = self.lock_producer();
            self.reserve(len as u64, K_SINGLE)
        })?;
        // SAFETY: we reserved `rec`; no one reads a WRITING record's payload.
        let filled = fill(unsafe { self.payload(rec) });
        self.publish(rec, filled.is_err());
        filled
    }

    fn wait_for_room(
        &self,
        deadline: Deadline,
        try_reserve: impl Fn() -> Result<Option<Rec>, QueueError>,
    ) -> Result<Rec, QueueError> {
        let outcome = block_on(
            &self.h().not_full,
            deadline,
            || match try_reserve() {
                Ok(Some(rec)) => Attempt::Ready(Ok(rec)),
                Ok(None) => Attempt::Blocked,
                Err(e) => Attempt::Ready(Err(e)),
            },
            || {
                if self.free_dead_readers() || self.others_alive() {
                    return None;
                }
                Some(match try_reserve() {
                    Ok(Some(rec)) => Ok(rec),
                    Ok(None) => Err(QueueError::Disconnected),
                    Err(e) => Err(e),
                })
            },
        );
        outcome.unwrap_or(Err(QueueError::Timeout))
    }

    /// Streams a message too large for one record as consecutive chunks, holding the
    /// producer lock throughout so no other producer's record lands in between.
    fn send_chunked(
        &self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        let mut whole = vec![0u8; len];
        fill(&mut whole)?;
        let _g = self.lock_producer();
        let chunk = self.single_limit() as usize;
        let mut sent = 0usize;
        let mut first = true;
        while first || sent < len {
            let prefix = if first { 8 } else { 0 };
            let n = (len - sent).min(chunk - prefix);
            let kind = match (first, sent + n == len) {
                (true, true) => unreachable!("small messages are not chunked"),
                (true, false) => K_FIRST,
                (false, false) => K_MIDDLE,
                (false, true) => K_LAST,
            };
            // Once the first chunk is out, finish the message whatever the deadline: the
            // consumers already started on it.
            let chunk_deadline = if first { deadline } else { Deadline::NEVER };
            let rec =
                self.wait_for_room(chunk_deadline, || self.reserve((prefix + n) as u64, kind))?;
            // SAFETY: we reserved `rec`.
            let buf = unsafe { self.payload(rec) };
            if first {
                buf[..8].copy_from_slice(&(len as u64).to_le_bytes());
            }
            buf[prefix..].copy_from_slice(&whole[sent..sent + n]);
            self.publish(rec, false);
            sent += n;
            first = false;
        }
        Ok(())
    }

    // ---- consumer side -------------------------------------------------------------

    /// Claims the next record (skipping padding). `Ok(None)`: nothing ready at `head`.
    /// The caller holds the consumer lock.
    fn claim(&self) -> Result<Option<Rec>, QueueError> {
        let h = self.h();
        loop {
            let (_, head, tail) = self.positions()?;
            if head == tail {
                return Ok(None);
            }
            let (state, rec) = self.read_record(head, tail)?;
            let span = record_len(rec.len);
            match state {
                ST_READY if rec.kind == K_PAD => {
                    self.rec_header(head)?
                        .word
                        .store(word(ST_DONE, K_PAD, rec.len), Ordering::Release);
                    h.head.store(head.wrapping_add(span), Ordering::Release);
                    self.advance_free();
                }
                ST_READY => {
                    let r = self.rec_header(head)?;
                    r.owner.store(owner_tag(), Ordering::Relaxed);
                    r.word
                        .store(word(ST_READING, rec.kind, rec.len), Ordering::Release);
                    h.head.store(head.wrapping_add(span), Ordering::Release);
                    if matches!(rec.kind, K_SINGLE | K_LAST) {
                        let _ = h
                            .count
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                                Some(c.saturating_sub(1))
                            });
                    }
                    return Ok(Some(rec));
                }
                ST_WRITING => return Ok(None),
                _ => {
                    return Err(QueueError::Corrupted(format!(
                        "record at head {head} in state {state}"
                    )));
                }
            }
        }
    }

    /// Marks a claimed record consumed and moves `free` over finished records.
    fn release(&self, rec: Rec) {
        if let Ok(r) = self.rec_header(rec.pos) {
            r.word
                .store(word(ST_DONE, rec.kind, rec.len), Ordering::Release);
        }
        self.advance_free();
    }

    fn advance_free(&self) {
        let h = self.h();
        let mut freed = false;
        while let Ok((free, head, _)) = self.positions() {
            if free == head {
                break;
            }
            match self.read_record(free, head) {
                Ok((ST_DONE, rec)) => {
                    let next = free.wrapping_add(record_len(rec.len));
                    freed |= h
                        .free
                        .compare_exchange(free, next, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok();
                }
                _ => break,
            }
        }
        if freed {
            h.not_full.notify_all();
        }
    }

    /// Receives one message and hands its bytes to `f`, waiting until `deadline`.
    pub(crate) fn recv<R>(
        &self,
        deadline: Deadline,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, QueueError> {
        let outcome = block_on(
            &self.h().not_empty,
            deadline,
            || match self.try_take(deadline) {
                Ok(Some(got)) => Attempt::Ready(Ok(got)),
                Ok(None) => Attempt::Blocked,
                Err(e) => Attempt::Ready(Err(e)),
            },
            || {
                let repaired = self.finish_dead_writer();
                if repaired || self.others_alive() {
                    return None; // look again: the repair may have uncovered a message
                }
                // Nobody else can ever send; deliver what is left, then report it.
                Some(match self.try_take(Deadline::after(Duration::ZERO)) {
                    Ok(Some(got)) => Ok(got),
                    Ok(None) => Err(QueueError::Disconnected),
                    Err(e) => Err(e),
                })
            },
        );
        match outcome.unwrap_or(Err(QueueError::Timeout))? {
            Got::InPlace(rec) => {
                // SAFETY: we claimed `rec` (READING); producers do not reuse it before we
                // release it, and other consumers skip claimed records.
                let r = f(unsafe { self.payload(rec) });
                self.release(rec);
                Ok(r)
            }
            Got::Assembled(bytes) => Ok(f(&bytes)),
        }
    }

    fn try_take(&self, deadline: Deadline) -> Result<Option<Got>, QueueError> {
        let h = self.h();
        let g = self.lock_consumer();
        let mut next = self.claim()?;
        loop {
            let Some(rec) = next else {
                let (_, head, tail) = self.positions()?;
                if head == tail && h.closed.load(Ordering::Acquire) != 0 {
                    return Err(QueueError::Closed);
                }
                return Ok(None);
            };
            match rec.kind {
                K_SINGLE => {
                    drop(g);
                    return Ok(Some(Got::InPlace(rec)));
                }
                K_FIRST => match self.assemble(rec, deadline)? {
                    Assembly::Done(bytes) => return Ok(Some(Got::Assembled(bytes))),
                    // The producer abandoned it; `rec` starts the next message.
                    Assembly::Abandoned(rec) => next = rec,
                },
                _ => {
                    self.release(rec); // a chunk whose message start is gone: skip it
                    next = self.claim()?;
                }
            }
        }
    }

    /// Reassembles a chunked message starting at `first`. The caller holds the consumer
    /// lock. If the producer abandoned the message (died), returns the record that came
    /// next instead, already claimed, or `None` if nothing came.
    fn assemble(&self, first: Rec, deadline: Deadline) -> Result<Assembly, QueueError> {
        // SAFETY: we claimed `first`.
        let payload = unsafe { self.payload(first) };
        let total = match payload.get(..8) {
            Some(b) => u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize,
            None => usize::MAX,
        };
        if total > self.max_message || total < payload.len() - 8 {
            self.release(first);
            return Err(QueueError::Corrupted(format!(
                "chunked message claims {total} bytes (maximum {})",
                self.max_message
            )));
        }
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&payload[8..]);
        self.release(first);
        while bytes.len() < total {
            let next = block_on(
                &self.h().not_empty,
                deadline,
                || match self.claim() {
                    Ok(Some(r)) => Attempt::Ready(Ok(Some(r))),
                    Ok(None) => Attempt::Blocked,
                    Err(e) => Attempt::Ready(Err(e)),
                },
                // A dead producer leaves its lock held: the rest is never coming.
                || self.h().producer.holder_is_dead().then_some(Ok(None)),
            )
            .unwrap_or(Err(QueueError::Timeout))?;
            let rec = match next {
                Some(rec) if matches!(rec.kind, K_MIDDLE | K_LAST) => rec,
                other => return Ok(Assembly::Abandoned(other)),
            };
            // SAFETY: we claimed `rec`.
            let chunk = unsafe { self.payload(rec) };
            if bytes.len() + chunk.len() > total {
                self.release(rec);
                return Err(QueueError::Corrupted("chunks exceed their message".into()));
            }
            bytes.extend_from_slice(chunk);
            let last = rec.kind == K_LAST;
            self.release(rec);
            if last != (bytes.len() == total) {
                return Err(QueueError::Corrupted(
                    "chunk count disagrees with length".into(),
                ));
            }
        }
        Ok(Assembly::Done(bytes))
    }

    // ---- dead peers ----------------------------------------------------------------

    /// Finishes a record at `head` whose producer died before publishing it.
    fn finish_dead_writer(&self) -> bool {
        let _g = self.lock_consumer();
        let Ok((_, head, tail)) = self.positions() else {
            return false;
        };
        if head == tail {
            return false;
        }
        let Ok((ST_WRITING, rec)) = self.read_record(head, tail) else {
            return false;
        };
        let Ok(r) = self.rec_header(head) else {
            return false;
        };
        if !owner_is_dead(r.owner.load(Ordering::Relaxed)) {
            return false;
        }
        // Never published, so never sent: turn it into padding that consumers skip.
        r.word
            .store(word(ST_READY, K_PAD, rec.len), Ordering::Release);
        self.h().not_empty.notify_all();
        true
    }

    /// Finishes a record at `free` whose consumer died while reading it.
    fn free_dead_readers(&self) -> bool {
        let Ok((free, head, _)) = self.positions() else {
            return false;
        };
        if free == head {
            return false;
        }
        let Ok((ST_READING, rec)) = self.read_record(free, head) else {
            return false;
        };
        let Ok(r) = self.rec_header(free) else {
            return false;
        };
        if !owner_is_dead(r.owner.load(Ordering::Relaxed)) {
            return false;
        }
        let reading = word(ST_READING, rec.kind, rec.len);
        let done = word(ST_DONE, rec.kind, rec.len);
        let freed = r
            .word
            .compare_exchange(reading, done, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        self.advance_free();
        freed
    }

    /// Whether a handle other than the caller's exists in a live process.
    fn others_alive(&self) -> bool {
        let h = &self.h().handles;
        h.any_alive() && h.handles_beyond_one_of_mine()
    }
}

/// A record header: state word and owner word.
#[repr(C)]
struct RecHeader {
    word: AtomicU64,
    owner: AtomicU64,
}

fn owner_tag() -> u64 {
    let me = sys::current_thread();
    (u64::from(me.tid) << 40) | (me.start & ((1 << 40) - 1))
}

fn owner_is_dead(tag: u64) -> bool {
    crate::liveness::thread_is_dead((tag >> 40) as u32, tag, 40)
}

/// Holds one of the queue's robust locks. A holder that died left the protected state
/// consistent (every step it takes is a single published store), so poisoning is cleared.
struct RawLockGuard<'a>(&'a RawMutex);

impl<'a> RawLockGuard<'a> {
    fn new(lock: &'a RawMutex) -> RawLockGuard<'a> {
        lock.lock();
        if lock.is_poisoned() {
            lock.clear_poison();
        }
        RawLockGuard(lock)
    }
}

impl Drop for RawLockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: constructed by taking the lock on this thread.
        unsafe { self.0.unlock() }
    }
}

impl Header {
    fn new() -> Header {
        Header {
            producer: CachePadded(RawMutex::new()),
            consumer: CachePadded(RawMutex::new()),
            tail: CachePadded(AtomicU64::new(0)),
            head: CachePadded(AtomicU64::new(0)),
            free: CachePadded(AtomicU64::new(0)),
            not_empty: CachePadded(EventCount::new()),
            not_full: CachePadded(EventCount::new()),
            count: AtomicU64::new(0),
            closed: AtomicU32::new(0),
            // SAFETY: a peer table is plain atomics; all-zero is the empty table.
            handles: unsafe { std::mem::zeroed() },
        }
    }
}

/// Default ring size of [`ByteQueue::new`] and [`Queue::new`](crate::Queue::new).
pub const DEFAULT_CAPACITY: usize = 1 << 20;
/// Default largest message: larger ones get [`QueueError::MessageTooLarge`].
pub const DEFAULT_MAX_MESSAGE: usize = 64 << 20;

/// Sizes for a new [`ByteQueue`] or [`Queue`](crate::Queue).
#[derive(Clone, Debug)]
pub struct QueueBuilder {
    capacity: usize,
    max_message: usize,
}

impl QueueBuilder {
    /// Bytes of shared ring (rounded up to a power of two, at least 4 KiB). Messages up to
    /// a quarter of it travel in one record, larger ones in chunks.
    pub fn capacity(mut self, bytes: usize) -> Self {
        self.capacity = bytes;
        self
    }

    /// The largest message accepted.
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// Creates a byte queue.
    ///
    /// # Errors
    ///
    /// As for [`ByteQueue::new`].
    pub fn bytes(self) -> Result<ByteQueue> {
        ByteQueue::from_core(Core::create(self.capacity, self.max_message)?)
    }

    /// Creates a typed queue.
    ///
    /// # Errors
    ///
    /// As for [`ByteQueue::new`].
    pub fn build<T: serde::Serialize + serde::de::DeserializeOwned>(
        self,
    ) -> Result<crate::Queue<T>> {
        Ok(crate::Queue::from_bytes(self.bytes()?))
    }
}

/// A multi-producer multi-consumer queue of byte messages of any size, in shared memory.
///
/// Clone the handle for more producers or consumers, in this process or (by `fork`) in
/// others. [`send_with`](ByteQueue::send_with) and [`recv_with`](ByteQueue::recv_with)
/// lend the caller the message's bytes inside the ring, so a message crosses with one copy
/// (the caller's own) or none.
///
/// ```
/// use procshare::ByteQueue;
///
/// let q = ByteQueue::builder().capacity(4 << 20).bytes()?;
/// q.send_with(5, |buf| buf.copy_from_slice(b"hello"))?;
/// let len = q.recv_with(|bytes| bytes.len())?;
/// assert_eq!(len, 5);
/// // Larger than a record (a quarter of the ring): sent in chunks, received as one message.
/// // (With no other handle to drain it, a message must fit in the ring to be sent here.)
/// q.send(&[7; 1 << 20])?;
/// assert_eq!(q.recv()?.len(), 1 << 20);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ByteQueue {
    core: Arc<Core>,
}

impl ByteQueue {
    /// A queue with a 1 MiB ring and a 64 MiB message limit.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    pub fn new() -> Result<ByteQueue> {
        ByteQueue::builder().bytes()
    }

    /// Settings for a new queue.
    pub fn builder() -> QueueBuilder {
        QueueBuilder {
            capacity: DEFAULT_CAPACITY,
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }

    fn from_core(core: Core) -> Result<ByteQueue> {
        peers::attach(&core.h().handles)?;
        Ok(ByteQueue {
            core: Arc::new(core),
        })
    }

    /// Sends a copy of `bytes`, waiting for room.
    ///
    /// # Errors
    ///
    /// `MessageTooLarge`, `Closed`, `Disconnected` or `Corrupted`.
    pub fn send(&self, bytes: &[u8]) -> Result<(), QueueError> {
        self.core.send(bytes.len(), copy_in(bytes), Deadline::NEVER)
    }

    /// Sends a copy of `bytes` if there is room now.
    ///
    /// # Errors
    ///
    /// As for [`send`](ByteQueue::send), plus `Full`.
    pub fn try_send(&self, bytes: &[u8]) -> Result<(), QueueError> {
        self.core
            .send(bytes.len(), copy_in(bytes), Deadline::after(Duration::ZERO))
            .map_err(full_not_timeout)
    }

    /// Sends a copy of `bytes`, waiting at most `timeout` for room.
    ///
    /// # Errors
    ///
    /// As for [`send`](ByteQueue::send), plus `Timeout`.
    pub fn send_timeout(&self, bytes: &[u8], timeout: Duration) -> Result<(), QueueError> {
        self.core
            .send(bytes.len(), copy_in(bytes), Deadline::after(timeout))
    }

    /// Sends a message of `len` bytes written in place by `fill` (zero-copy: `fill` writes
    /// straight into the shared ring). Waits for room.
    ///
    /// # Errors
    ///
    /// As for [`send`](ByteQueue::send).
    pub fn send_with(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<(), QueueError> {
        self.core.send(
            len,
            |buf| {
                fill(buf);
                Ok(())
            },
            Deadline::NEVER,
        )
    }

    pub(crate) fn send_encoded(
        &self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        self.core.send(len, fill, deadline)
    }

    /// Receives a message into a new `Vec`, waiting for one.
    ///
    /// # Errors
    ///
    /// `Closed` (closed and drained), `Disconnected` or `Corrupted`.
    pub fn recv(&self) -> Result<Vec<u8>, QueueError> {
        self.core.recv(Deadline::NEVER, <[u8]>::to_vec)
    }

    /// Receives a message into `buf` (replacing its contents, reusing its allocation);
    /// returns the length.
    ///
    /// # Errors
    ///
    /// As for [`recv`](ByteQueue::recv).
    pub fn recv_into(&self, buf: &mut Vec<u8>) -> Result<usize, QueueError> {
        self.core.recv(Deadline::NEVER, |bytes| {
            buf.clear();
            buf.extend_from_slice(bytes);
            bytes.len()
        })
    }

    /// Receives a message and lends its bytes, in place in the shared ring, to `f`; the
    /// space is released when `f` returns.
    ///
    /// # Errors
    ///
    /// As for [`recv`](ByteQueue::recv).
    pub fn recv_with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, QueueError> {
        self.core.recv(Deadline::NEVER, f)
    }

    /// Like [`recv_with`](ByteQueue::recv_with), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As for [`recv`](ByteQueue::recv), plus `Timeout`.
    pub fn recv_with_timeout<R>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, QueueError> {
        self.core.recv(Deadline::after(timeout), f)
    }

    /// Like [`recv_with`](ByteQueue::recv_with) if a message is ready now.
    ///
    /// # Errors
    ///
    /// As for [`recv`](ByteQueue::recv), plus `Empty`.
    pub fn try_recv_with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, QueueError> {
        self.core
            .recv(Deadline::after(Duration::ZERO), f)
            .map_err(|e| {
                if e == QueueError::Timeout {
                    QueueError::Empty
                } else {
                    e
                }
            })
    }

    /// Closes the queue for sending (in every process). Receivers drain what is left and
    /// then get `Closed`.
    pub fn close(&self) {
        self.core.h().closed.store(1, Ordering::Release);
        self.core.h().not_empty.notify_all();
        self.core.h().not_full.notify_all();
    }

    /// Whether [`close`](ByteQueue::close) was called.
    pub fn is_closed(&self) -> bool {
        self.core.h().closed.load(Ordering::Acquire) != 0
    }

    /// Messages waiting (a snapshot: other processes change it at any moment).
    pub fn len(&self) -> usize {
        self.core.h().count.load(Ordering::Relaxed) as usize
    }

    /// Whether no message is waiting (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fuzzing hook: overwrites the shared positions and the start of the ring's data, as a
    /// peer scribbling over shared memory would.
    #[doc(hidden)]
    pub fn __scribble(&self, free: u64, head: u64, tail: u64, data: &[u8]) {
        let h = self.core.h();
        h.free.store(free, Ordering::SeqCst);
        h.head.store(head, Ordering::SeqCst);
        h.tail.store(tail, Ordering::SeqCst);
        let n = data.len().min(self.core.cap() as usize);
        // SAFETY: at most `capacity` bytes into the ring's data area, which this handle
        // keeps mapped; the fuzzer uses the queue from one thread only.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.core.ring.slots_ptr(), n) };
    }

    /// The largest message this queue accepts.
    pub fn max_message(&self) -> usize {
        self.core.max_message
    }
}

fn copy_in(bytes: &[u8]) -> impl FnOnce(&mut [u8]) -> Result<(), QueueError> + '_ {
    move |buf| {
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

pub(crate) fn full_not_timeout(e: QueueError) -> QueueError {
    if e == QueueError::Timeout {
        QueueError::Full
    } else {
        e
    }
}

impl Clone for ByteQueue {
    /// Another handle to the same queue.
    ///
    /// # Panics
    ///
    /// If more than 64 processes already hold handles to this queue.
    fn clone(&self) -> Self {
        peers::attach(&self.core.h().handles).expect("attach a queue handle");
        ByteQueue {
            core: Arc::clone(&self.core),
        }
    }
}

impl Drop for ByteQueue {
    fn drop(&mut self) {
        let h = self.core.h();
        peers::detach(&h.handles);
        h.not_empty.notify_all();
        h.not_full.notify_all();
    }
}

impl fmt::Debug for ByteQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByteQueue")
            .field("capacity", &self.core.cap())
            .field("len", &self.len())
            .field("closed", &self.is_closed())
            .finish()
    }
}
