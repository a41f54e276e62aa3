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
//! consumed and reusable), always `free <= head <= tail <= free + capacity`. Producers
//! serialise *reserving* on one robust mutex, consumers *claiming* on another; the payload
//! copies happen outside both, so a producer and a consumer, or several of each, copy in
//! parallel.
//!
//! ```text
//!  record header (16 bytes)              shared header words besides the positions
//!  word:  [state 8][kind 8][0 16][len 32]   count   messages published, not yet claimed
//!  owner: [tid 24][thread start time 40]    stream  FIRST position + 1 of the chunked
//!                                                   message being sent, or 0
//!  state: WRITING 1, READY 2, READING 3,    keeper  process that keeps the start of a
//!         DONE 4                                    chunked message, or 0
//!  kind:  SINGLE 0, FIRST 1, MIDDLE 2, LAST 3, PAD 4
//! ```
//!
//! A record goes `WRITING` (owner = its producer thread) → `READY` → `READING` (owner =
//! its consumer thread) → `DONE`; padding is written `READY` with kind `PAD` and goes
//! straight to `DONE`. The owner is written before the state that names it.
//!
//! | step (lock held)            | stores, in order                                        |
//! |-----------------------------|---------------------------------------------------------|
//! | reserve (producer lock)     | [pad owner, pad `READY`/`PAD`], owner, `WRITING`, `tail` |
//! | publish (none)              | [`count` + 1 for `SINGLE`/`LAST`], `READY` (or `PAD` to discard) |
//! | skip padding (consumer lock) | `DONE`, `head`, then `free` moves                       |
//! | claim (consumer lock)       | owner, `READING`, `head`, [`count` − 1]                 |
//! | release (none)              | `DONE`, then `free` moves over `DONE` records (CAS)     |
//!
//! # What a SIGKILL between two stores leaves, and who repairs it
//!
//! | killed between                | left behind                          | repaired by |
//! |-------------------------------|--------------------------------------|-------------|
//! | reserve's stores, before `tail` | records beyond `tail`              | nothing to do: the next reservation writes over them |
//! | `tail` and publish            | `WRITING` record, dead owner         | the consumer waiting at it: the kernel says the owner is gone → `PAD` (never sent) |
//! | `count` + 1 and `READY`       | as above, `count` one too high       | as above; `count` is reset the next time a consumer finds the ring empty (below) |
//! | skip-padding `DONE` and `head` | `DONE` at `head`                    | the next holder of the consumer lock moves `head` on |
//! | claim's `READING` and `head`  | `READING` at `head`                  | the next holder of the consumer lock: back to `READY`, so the message (never handed to the dead reader) goes to the next receiver |
//! | claim's `head` and `count` − 1 | `READING` behind `head`, dead owner, `count` one too high | producers waiting for room: `DONE` once the kernel says the owner is gone (the message is lost with its reader); `count` as above |
//! | while the reader reads, or `DONE` and moving `free` | `READING` (as above) or a `DONE` not yet passed | as above; any later release moves `free` on |
//!
//! A `READING` or `DONE` record *at* `head` is repaired without asking about its owner:
//! only a holder of the consumer lock marks the record at `head`, and it moves `head` on
//! before it lets go, so if we hold the lock and find one, its marker died (the robust lock
//! passed to us only on the kernel's word). A `WRITING` or `READING` record elsewhere is
//! finished only on proof that its owner thread is gone (`crate::liveness`); a slow live
//! writer or reader is waited for, never robbed.
//!
//! `count` only feeds [`ByteQueue::len`]; nothing waits on it. A producer counts a message
//! *before* making it visible, so when a consumer, holding the consumer lock (no claim in
//! progress), finds `head == tail`, every counted message has been claimed: if `count` is
//! not 0 it was left too high by a kill, and is reset with a compare-and-swap against the
//! value loaded *before* the positions (a producer that counted after that load makes the
//! swap fail; one that counted before it had already moved `tail`, so the ring was not
//! empty).
//!
//! # Large messages
//!
//! A message whose record would take more than a quarter of the ring is sent in chunks
//! (`FIRST`, `MIDDLE`..., `LAST`; the first carries the total length) while the producer
//! keeps the producer lock, so its chunks are consecutive (padding aside). It writes
//! `stream` = the `FIRST` chunk's position + 1 before publishing that chunk, and clears it
//! after the last one, or when it gives up. The consumer that claims a `FIRST` keeps the
//! consumer lock while it reassembles. A message is dropped whole, never delivered in part,
//! when it is *abandoned*: the next record is not a continuation, or no continuation is
//! there and `stream` no longer names the message (its producer gave up, or died and the
//! next producer to take the lock cleared it), or the producer lock's holder is dead.
//! Chunks whose `FIRST` went with a dead receiver are skipped. Messages above the queue's
//! `max_message` are refused before anything is written, with
//! [`QueueError::MessageTooLarge`].
//!
//! | killed between                     | left behind                        | repaired by |
//! |------------------------------------|------------------------------------|-------------|
//! | `stream` set and `FIRST` published | `stream`, a `WRITING` chunk        | `PAD` as above; the next producer lock holder clears `stream` |
//! | chunks                             | some chunks, `stream`              | the receiver finds the lock holder dead, or `stream` cleared: drops the message |
//! | last chunk and clearing `stream`   | the whole message, `stream`        | nothing: the message is complete; `stream` cleared as above |
//! | setting `keeper` and unlocking     | `keeper` names a dead process      | the next receiver at those chunks: the kernel says it is gone → clears `keeper`, skips them |
//!
//! # Timeouts
//!
//! A `try_*` call makes one attempt: it takes a lock only if it is free (or its holder is
//! dead), and never waits for a chunk. A `*_timeout` call waits for locks, room and chunks
//! only until its deadline. Giving up loses nothing:
//!
//! * A send that gives up before its message (or its first chunk) is out sent nothing. A
//!   chunked send that gives up after some chunks are out *abandons* the message: it clears
//!   `stream`, receivers drop what they got of it, and the caller gets `Timeout` (`Full`
//!   from `try_send`, which starts a chunked message only if all of it fits now). So
//!   `Timeout` always means "not sent". A send without a deadline finishes what it starts.
//!   While another producer streams a large message, the producer lock is busy: `try_send`
//!   answers `Full` and a timed send waits for it within its deadline.
//! * A receive that gives up in the middle of a chunked message keeps the part it has, in
//!   this process (`Core::partial`), and writes this process into `keeper`. The next
//!   receive in this process, through any handle, resumes it. Receivers in other processes
//!   leave those chunks alone while the keeper process lives (they wait, as they would
//!   behind a slow reader); if it dies, they skip them. While it keeps one, this
//!   process's own sends drain the rest of it whenever they wait (for room or for the
//!   producer lock), since only this process can free the room its chunks take; a
//!   message completed that way waits for the next receive here.
//! * When the keeping process drops a handle to the queue (a worker that polled with a
//!   timeout and goes home; any handle, not only its last: a forked child never drops the
//!   copies it inherited, as it leaves with `_exit`), the drop finishes receiving the
//!   message, waiting for its producer for as long as that streams it (only the
//!   producer's proven death, or its abandoning the message, ends that wait early), and
//!   puts it back into the queue whole, as a new message (so after messages sent
//!   meanwhile: order is not kept). A message larger than the ring goes back chunk by
//!   chunk, so some other receiver must be receiving meanwhile; the drop waits for that at
//!   most 2 s (this process may be the only receiver). If nobody took it, nothing was put
//!   back and the message stays with this process for its next receive or handle drop;
//!   if that was the process's last handle, it is lost, with a line on stderr saying so.
//!   If every receiver is gone, there is nobody to lose it to.
//!
//! What still loses or delays a kept message:
//!
//! * The keeping process is killed (SIGKILL, a crash) or leaves without dropping its
//!   handles (`std::process::exit`, `mem::forget`, a handle in a `static`): the message
//!   is lost with it, as one a receiver took and then died with; receivers elsewhere see
//!   the keeper gone and skip the rest of it.
//! * The keeping process lives on, idle, holding its handle: the rest of the message
//!   waits for its next receive (or its drop), and every other receiver waits behind it
//!   as behind a slow reader; the producer streaming the message waits for room too.
//!   Receive again in that process, or drop its handles, to let the queue move on.
//!
//! # Panics in user code
//!
//! An unwinding `fill` (in [`ByteQueue::send_with`], or a panicking `Serialize` impl in
//! [`Queue::put`](crate::Queue::put)) publishes its record as padding: nothing is sent
//! and nobody waits for it. An unwinding `f` in [`ByteQueue::recv_with`] releases the
//! record: the message counts as consumed. Drop guards do both, so a thread pool or
//! `catch_unwind` that keeps the thread alive never leaves a record owned by it.
//!
//! # Pid namespaces
//!
//! Record owners and `keeper` are tids and pids of the queue's pid namespace, judged only
//! by processes of that namespace: a process of another one (or one that cannot tell) gets
//! [`QueueError::ForeignPidNamespace`] from every send and receive, before it touches
//! the ring, so it never claims a record nor frees one whose owner it would misjudge. See
//! [Pid namespaces](crate::queue#pid-namespaces).
//!
//! Everything read from the ring (positions, lengths, states) is checked before use;
//! impossible values give [`QueueError::Corrupted`], never an out-of-bounds access.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::eventcount::{Attempt, CheckClock, EventCount, block_on};
use super::peers::{self, PeerTable};
use super::ring::{CachePadded, RingMem};
use crate::error::Result;
use crate::sync::RawMutex;
use crate::sys::{self, Deadline};

/// What went wrong in a [`Queue`](crate::Queue) or [`ByteQueue`] operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueError {
    /// `try_put`/`try_send`: no room right now, or another producer is in the middle of
    /// a large (chunked) message. Nothing was sent.
    Full,
    /// `try_get`: nothing to receive right now.
    Empty,
    /// The timeout passed. A send that gets it sent nothing; a receive that gets it in
    /// the middle of a large message keeps the part received for this process's next
    /// receive.
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
    /// This process is in another pid namespace than the process that created the queue
    /// (or one of the two namespaces cannot be learnt), so it may not use the queue:
    /// crash recovery judges peers by their pids, which mean nothing across pid
    /// namespaces. Nothing was sent or received. See the module docs of
    /// [`bytes`](crate::queue::bytes), "Pid namespaces".
    ForeignPidNamespace,
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
            QueueError::ForeignPidNamespace => {
                f.write_str(&peers::foreign_message("queue"))?;
                f.write_str("; nothing was sent or received")
            }
        }
    }
}

impl std::error::Error for QueueError {}

const REC_HEADER: u64 = 16;
/// How often a sender waiting for the producer lock drains a partial message its process
/// keeps (see `Core::lock_producer`).
const PUMP_EVERY: Duration = Duration::from_millis(1);
/// How long a handle's drop waits for room to put back a message its process kept (see
/// `Core::hand_back_partial`): the process may be its only receiver.
const HAND_BACK_PATIENCE: Duration = Duration::from_secs(2);
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
    /// Whole messages published and not yet claimed (for `len`; see the module docs).
    count: AtomicU64,
    closed: AtomicU32,
    /// Position + 1 of the `FIRST` chunk of the message the producer-lock holder is
    /// streaming; 0 when none is. Written under the producer lock.
    stream: AtomicU64,
    /// Process identity of a consumer that gave up mid-message and keeps its start, so
    /// the chunks at `head` are its to resume; 0 when none. Written under the consumer
    /// lock (or, by the keeper letting go, with a compare-and-swap).
    keeper: AtomicU64,
    /// Processes holding two-way handles (`Queue`, `ByteQueue`).
    handles: PeerTable,
    /// Processes holding send-only handles (`QueueSender`).
    senders: PeerTable,
    /// Processes holding receive-only handles (`QueueReceiver`).
    receivers: PeerTable,
}

/// What a handle may do, which decides the peer table it is counted in: a receiver is
/// told `Disconnected` once no live handle that could send exists, however many
/// receive-only handles are still about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Sends and receives (Python's `Queue`).
    Both,
    /// Sends only.
    Send,
    /// Receives only.
    Recv,
}

/// The shared part of a byte queue, plus the process-local settings and state.
pub(crate) struct Core {
    ring: RingMem<Header, u8>,
    max_message: usize,
    /// A chunked message this process started receiving and gave up on at a deadline
    /// (see "Timeouts"). Touched only with the consumer lock held.
    partial: std::sync::Mutex<Option<Partial>>,
    /// Whether `partial` may hold something: the common path reads only this.
    has_partial: AtomicBool,
    /// Rate-limits the dead-peer check of calls that give up (`try_*`, timeouts), which
    /// never sleep long enough for the blocking path's periodic check.
    check: CheckClock,
}

/// The received start of a chunked message.
struct Partial {
    /// The process that received it: a forked child inherits a copy and must drop it.
    owner: u64,
    /// Position of its `FIRST` record.
    first: u64,
    total: usize,
    /// Complete when `bytes.len() == total` (finished by a send's [`Core::pump_partial`]
    /// and waiting for this process's next receive).
    bytes: Vec<u8>,
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
    /// Its producer gave up on it (or died): dropped whole.
    Abandoned,
    /// The deadline passed first: the part received is kept in `Core::partial`.
    Kept,
}

/// How a receive attempt ended, before the payload is handed to the caller.
enum Got {
    /// A whole single-record message, claimed and ready to read in place.
    InPlace(Rec),
    /// A reassembled chunked message.
    Assembled(Vec<u8>),
}

/// A reserved record not yet published: if the caller's `fill` unwinds, the record is
/// published as padding, so nothing waits for it and nothing is sent.
struct Unpublished<'a> {
    core: &'a Core,
    rec: Rec,
}

impl Drop for Unpublished<'_> {
    fn drop(&mut self) {
        self.core.publish(self.rec, true);
    }
}

/// A claimed record lent to the caller's `f`: released when `f` returns or unwinds (a
/// message whose reader panicked is consumed).
struct Claimed<'a> {
    core: &'a Core,
    rec: Rec,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.core.release(self.rec);
    }
}

impl Core {
    fn create(capacity: usize, max_message: usize) -> Result<Core> {
        let capacity = capacity.max(4096);
        let ring = RingMem::create("bytequeue", capacity, Header::new, |_| 0u8)?;
        let h = ring.header();
        for table in [&h.handles, &h.senders, &h.receivers] {
            table.stamp_creator();
        }
        Ok(Core {
            ring,
            max_message,
            partial: std::sync::Mutex::new(None),
            has_partial: AtomicBool::new(false),
            check: CheckClock::new(),
        })
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
        // A word must be exactly what `word` encodes: stray bits (between the length and
        // the kind) would make every compare-and-swap against the decoded value fail, and
        // a consumer repairing a READING record at `head` would retry for ever.
        if w != word(state, kind, len)
            || state == 0
            || state > ST_DONE
            || kind > K_PAD
            || off + span > self.cap()
            || span > limit.wrapping_sub(pos)
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
            fail_point(FP_RESERVE_PAD);
        }
        let pos = tail.wrapping_add(pad);
        let r = self.rec_header(pos)?;
        r.owner.store(me, Ordering::Relaxed);
        r.word.store(word(ST_WRITING, kind, len), Ordering::Release);
        fail_point(FP_RESERVE_WRITING);
        // SYNC POINT: consumers acquire `tail` and then read the records before it.
        h.tail.store(pos.wrapping_add(span), Ordering::Release);
        Ok(Some(Rec { pos, kind, len }))
    }

    /// Makes a reserved record visible (or, with `discard`, turns it into padding that
    /// consumers skip unseen).
    fn publish(&self, rec: Rec, discard: bool) {
        let h = self.h();
        let kind = if discard { K_PAD } else { rec.kind };
        if !discard && matches!(rec.kind, K_SINGLE | K_LAST) {
            // Counted before it is visible, so the count never misses a claimable
            // message (see `resync_count`).
            h.count.fetch_add(1, Ordering::SeqCst);
            fail_point(FP_PUBLISH_COUNTED);
        }
        if let Ok(r) = self.rec_header(rec.pos) {
            // SYNC POINT: the payload written before this store is read after a consumer
            // acquires READY.
            r.word
                .store(word(ST_READY, kind, rec.len), Ordering::Release);
        }
        h.not_empty.notify_all();
    }

    /// Takes the producer lock by `deadline`. A holder that died may have left `stream`
    /// naming its unfinished message: cleared, so consumers drop that message.
    fn lock_producer(&self, deadline: Deadline) -> Option<RawLockGuard<'_>> {
        let lock = &self.h().producer;
        let g = loop {
            if !self.has_partial.load(Ordering::Relaxed) {
                break RawLockGuard::acquire(lock, deadline)?;
            }
            // This process keeps the start of a message whose rest only it may take: the
            // producer holding this lock may be waiting for room only that frees. Drain
            // it while waiting.
            self.pump_partial();
            if let Some(g) = RawLockGuard::acquire(lock, deadline.capped(PUMP_EVERY)) {
                break g;
            }
            if deadline.has_passed() {
                return None;
            }
        };
        if g.recovered() {
            self.h().stream.store(0, Ordering::Release);
            g.repaired();
        }
        Some(g)
    }

    /// Takes the consumer lock by `deadline`. Whatever a holder that died left half done
    /// is finished by [`peek`](Core::peek) as it meets it.
    fn lock_consumer(&self, deadline: Deadline) -> Option<RawLockGuard<'_>> {
        let g = RawLockGuard::acquire(&self.h().consumer, deadline)?;
        if g.recovered() {
            g.repaired();
        }
        Some(g)
    }

    /// Sends one message of `len` bytes written by `fill`, waiting for room until
    /// `deadline`.
    pub(crate) fn send(
        &self,
        role: Role,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        self.may_send(len)?;
        self.send_open(role, len, fill, deadline)
    }

    /// The checks every send makes before it touches the ring, in one place so that no
    /// send path can skip one: this process's pid namespace, the size, `close`.
    fn may_send(&self, len: usize) -> Result<(), QueueError> {
        if self.foreign() {
            return Err(QueueError::ForeignPidNamespace);
        }
        if len > self.max_message {
            return Err(QueueError::MessageTooLarge {
                size: len,
                max: self.max_message,
            });
        }
        if self.h().closed.load(Ordering::Acquire) != 0 {
            return Err(QueueError::Closed);
        }
        Ok(())
    }

    /// [`send`](Self::send) after its checks (also used to hand a kept message back
    /// after `close`: it was in the queue before).
    fn send_open(
        &self,
        role: Role,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        if len as u64 > self.single_limit() {
            let mut whole = vec![0u8; len];
            fill(&mut whole)?; // a panic here leaves nothing behind in shared memory
            return self.send_chunked(role, &[&whole], deadline);
        }
        self.send_single(role, len, fill, deadline)
    }

    /// Sends one message made of `parts` back to back, copying each part straight into
    /// the ring (no intermediate buffer even when the message is chunked).
    pub(crate) fn send_parts(
        &self,
        role: Role,
        parts: &[&[u8]],
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        self.may_send(len)?;
        if len as u64 > self.single_limit() {
            return self.send_chunked(role, parts, deadline);
        }
        self.send_single(
            role,
            len,
            |buf| {
                copy_parts(parts, 0, buf);
                Ok(())
            },
            deadline,
        )
    }

    fn send_single(
        &self,
        role: Role,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        let rec = self.wait_for_room(role, deadline, || {
            let Some(_g) = self.lock_producer(deadline) else {
                return Ok(None); // another producer holds it past our deadline
            };
            self.reserve(len as u64, K_SINGLE)
        })?;
        let pending = Unpublished { core: self, rec };
        // SAFETY: we reserved `rec`; no one reads a WRITING record's payload.
        let filled = fill(unsafe { self.payload(rec) });
        std::mem::forget(pending);
        self.publish(rec, filled.is_err());
        filled
    }

    fn wait_for_room(
        &self,
        role: Role,
        deadline: Deadline,
        try_reserve: impl Fn() -> Result<Option<Rec>, QueueError>,
    ) -> Result<Rec, QueueError> {
        let outcome = block_on(
            &self.h().not_full,
            deadline,
            || {
                if self.has_partial.load(Ordering::Relaxed) {
                    self.pump_partial(); // see `lock_producer`
                }
                match try_reserve() {
                    Ok(Some(rec)) => Attempt::Ready(Ok(rec)),
                    Ok(None) => Attempt::Blocked,
                    Err(e) => Attempt::Ready(Err(e)),
                }
            },
            || {
                if self.free_dead_readers() || self.counterpart_alive(role, Role::Recv) {
                    return None;
                }
                Some(match try_reserve() {
                    Ok(Some(rec)) => Ok(rec),
                    Ok(None) => Err(QueueError::Disconnected),
                    Err(e) => Err(e),
                })
            },
        );
        match outcome {
            Some(r) => r,
            // Giving up. A `try_*` call never ran the periodic check above, so run it here
            // (the liveness part at most every `CHECK_EVERY`): a dead reader may have held
            // the room, or every receiver may be gone. Then one more attempt.
            None => {
                let repaired = self.free_dead_readers();
                let orphaned =
                    !repaired && self.check.due() && !self.counterpart_alive(role, Role::Recv);
                if !(repaired || orphaned) {
                    return Err(QueueError::Timeout);
                }
                match try_reserve()? {
                    Some(rec) => Ok(rec),
                    None if orphaned => Err(QueueError::Disconnected),
                    None => Err(QueueError::Timeout),
                }
            }
        }
    }

    /// Streams a message too large for one record as consecutive chunks, holding the
    /// producer lock throughout so no other producer's record lands in between. If the
    /// deadline passes (or the receivers go away) after some chunks are out, the message
    /// is abandoned: `stream` is cleared and consumers drop what they got of it.
    fn send_chunked(
        &self,
        role: Role,
        parts: &[&[u8]],
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        let h = self.h();
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        let Some(_g) = self.lock_producer(deadline) else {
            return Err(QueueError::Timeout);
        };
        if deadline.has_passed() {
            // A `try_send`: start only if the whole message fits now.
            let (free, _, tail) = self.positions()?;
            let room = self.cap() - tail.wrapping_sub(free);
            let chunks = (len as u64).div_ceil(self.single_limit() - 8);
            if len as u64 + chunks * (REC_HEADER + ALIGN) + self.cap() / 4 > room {
                return Err(QueueError::Timeout);
            }
        }
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
            let rec = match self
                .wait_for_room(role, deadline, || self.reserve((prefix + n) as u64, kind))
            {
                Ok(rec) => rec,
                Err(e) => {
                    if !first {
                        // Abandon: consumers drop the chunks already out.
                        h.stream.store(0, Ordering::Release);
                        h.not_empty.notify_all();
                    }
                    return Err(e);
                }
            };
            if first {
                h.stream.store(rec.pos.wrapping_add(1), Ordering::Release);
                fail_point(FP_STREAM_MARKED);
            }
            // SAFETY: we reserved `rec`.
            let buf = unsafe { self.payload(rec) };
            if first {
                buf[..8].copy_from_slice(&(len as u64).to_le_bytes());
            }
            copy_parts(parts, sent, &mut buf[prefix..]);
            self.publish(rec, false);
            if first {
                fail_point(FP_FIRST_PUBLISHED);
            }
            sent += n;
            first = false;
        }
        h.stream.store(0, Ordering::Release);
        fail_point(FP_STREAM_CLEARED);
        Ok(())
    }

    // ---- consumer side -------------------------------------------------------------

    /// The READY message record at `head`, not yet claimed: skips padding and finishes
    /// what a consumer that died holding the consumer lock left half done (see the state
    /// table). `Ok(None)`: nothing ready at `head`. The caller holds the consumer lock.
    fn peek(&self) -> Result<Option<Rec>, QueueError> {
        let h = self.h();
        loop {
            let (_, head, tail) = self.positions()?;
            if head == tail {
                return Ok(None);
            }
            let (state, rec) = self.read_record(head, tail)?;
            let span = record_len(rec.len);
            let r = self.rec_header(head)?;
            match state {
                ST_READY if rec.kind == K_PAD => {
                    r.word
                        .store(word(ST_DONE, K_PAD, rec.len), Ordering::Release);
                    fail_point(FP_CLAIM_PAD_DONE);
                    h.head.store(head.wrapping_add(span), Ordering::Release);
                    self.advance_free();
                }
                ST_READY => return Ok(Some(rec)),
                ST_WRITING => return Ok(None),
                // Only a holder of the consumer lock marks the record at `head`, and it
                // moves `head` on before letting go. We hold the lock, so the one that
                // marked this record died between its two stores (the robust lock passed
                // to us only on the kernel's word that it is gone). Finish its step:
                // skipped padding is passed, and a message claimed but never handed to
                // its reader goes to the next one, us.
                ST_DONE => {
                    h.head.store(head.wrapping_add(span), Ordering::Release);
                    self.advance_free();
                }
                ST_READING => {
                    let reading = word(ST_READING, rec.kind, rec.len);
                    let ready = word(ST_READY, rec.kind, rec.len);
                    let _ = r.word.compare_exchange(
                        reading,
                        ready,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                }
                _ => {
                    return Err(QueueError::Corrupted(format!(
                        "record at head {head} in state {state}"
                    )));
                }
            }
        }
    }

    /// Claims the record `peek` returned. The caller holds the consumer lock.
    fn take(&self, rec: Rec) -> Result<(), QueueError> {
        let h = self.h();
        let r = self.rec_header(rec.pos)?;
        r.owner.store(owner_tag(), Ordering::Relaxed);
        r.word
            .store(word(ST_READING, rec.kind, rec.len), Ordering::Release);
        fail_point(FP_CLAIM_READING);
        h.head
            .store(rec.pos.wrapping_add(record_len(rec.len)), Ordering::Release);
        fail_point(FP_CLAIM_HEAD);
        if matches!(rec.kind, K_SINGLE | K_LAST) {
            let _ = h
                .count
                .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |c| {
                    Some(c.saturating_sub(1))
                });
        }
        Ok(())
    }

    /// Marks a claimed record consumed and moves `free` over finished records.
    fn release(&self, rec: Rec) {
        if let Ok(r) = self.rec_header(rec.pos) {
            r.word
                .store(word(ST_DONE, rec.kind, rec.len), Ordering::Release);
        }
        fail_point(FP_RELEASE_DONE);
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

    /// Called with the consumer lock held when `head == tail` was seen: every message
    /// counted has been claimed, so a count left too high by a peer killed between a
    /// record store and the count update is reset. The count is loaded *before* the
    /// positions: a producer counts after reserving, so if its increment is in `c`, its
    /// reservation is in `tail` and `head != tail`; an increment after the load makes the
    /// compare-and-swap fail. Claims (the only decrements) need the lock we hold.
    fn resync_count(&self) {
        let h = self.h();
        let c = h.count.load(Ordering::SeqCst);
        if c == 0 {
            return;
        }
        if let Ok((_, head, tail)) = self.positions() {
            if head == tail {
                let _ = h
                    .count
                    .compare_exchange(c, 0, Ordering::SeqCst, Ordering::Relaxed);
            }
        }
    }

    /// Receives one message and hands its bytes to `f`, waiting until `deadline`.
    pub(crate) fn recv<R>(
        &self,
        role: Role,
        deadline: Deadline,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, QueueError> {
        if self.foreign() {
            return Err(QueueError::ForeignPidNamespace);
        }
        let outcome = block_on(
            &self.h().not_empty,
            deadline,
            || match self.try_take(deadline) {
                Ok(Some(got)) => Attempt::Ready(Ok(got)),
                Ok(None) => Attempt::Blocked,
                Err(e) => Attempt::Ready(Err(e)),
            },
            || {
                let repaired = self.finish_dead_writer(deadline);
                if repaired || self.counterpart_alive(role, Role::Send) {
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
        let got = match outcome {
            Some(got) => got?,
            // Giving up. A `try_*` call never ran the periodic check above, so run it here
            // (the liveness part at most every `CHECK_EVERY`): a dead writer may block
            // `head`, or every sender may be gone. Then one more attempt.
            None => {
                let repaired = self.finish_dead_writer(deadline);
                let orphaned =
                    !repaired && self.check.due() && !self.counterpart_alive(role, Role::Send);
                if !(repaired || orphaned) {
                    return Err(QueueError::Timeout);
                }
                match self.try_take(Deadline::after(Duration::ZERO))? {
                    Some(got) => got,
                    None if orphaned => return Err(QueueError::Disconnected),
                    None => return Err(QueueError::Timeout),
                }
            }
        };
        match got {
            Got::InPlace(rec) => {
                let claimed = Claimed { core: self, rec };
                // SAFETY: we claimed `rec` (READING); producers do not reuse it before we
                // release it, and other consumers skip claimed records.
                let r = f(unsafe { self.payload(rec) });
                drop(claimed);
                Ok(r)
            }
            Got::Assembled(bytes) => Ok(f(&bytes)),
        }
    }

    fn try_take(&self, deadline: Deadline) -> Result<Option<Got>, QueueError> {
        let h = self.h();
        let Some(g) = self.lock_consumer(deadline) else {
            return Ok(None); // another consumer holds it past our deadline
        };
        if self.has_partial.load(Ordering::Relaxed) {
            if let Some(p) = self.take_partial() {
                let me = peers::current_process();
                if p.owner == me && p.bytes.len() == p.total {
                    return Ok(Some(Got::Assembled(p.bytes)));
                }
                if p.owner == me && h.keeper.load(Ordering::Acquire) == me {
                    match self.assemble(p, deadline)? {
                        Assembly::Done(bytes) => return Ok(Some(Got::Assembled(bytes))),
                        Assembly::Kept => return Ok(None),
                        Assembly::Abandoned => {}
                    }
                }
                // Otherwise the message was abandoned (or this is a forked copy of
                // another process's partial): drop it.
            }
        }
        loop {
            let Some(rec) = self.peek()? else {
                let (_, head, tail) = self.positions()?;
                if head == tail {
                    self.resync_count();
                    if h.closed.load(Ordering::Acquire) != 0 {
                        return Err(QueueError::Closed);
                    }
                }
                return Ok(None);
            };
            match rec.kind {
                K_SINGLE | K_FIRST => {
                    // A message starts here, so whatever a keeper kept was abandoned by
                    // its producer (chunks are consecutive).
                    if h.keeper.load(Ordering::Relaxed) != 0 {
                        self.set_keeper(0);
                    }
                    self.take(rec)?;
                    if rec.kind == K_SINGLE {
                        drop(g);
                        return Ok(Some(Got::InPlace(rec)));
                    }
                    let p = self.start_partial(rec)?;
                    match self.assemble(p, deadline)? {
                        Assembly::Done(bytes) => return Ok(Some(Got::Assembled(bytes))),
                        Assembly::Kept => return Ok(None),
                        Assembly::Abandoned => {} // look at what came instead
                    }
                }
                _ => {
                    let keeper = h.keeper.load(Ordering::Acquire);
                    if keeper != 0
                        && keeper != peers::current_process()
                        && !crate::liveness::process_is_dead(keeper)
                    {
                        // The rest of a message another live process started receiving:
                        // its to resume. Wait for it.
                        return Ok(None);
                    }
                    if keeper != 0 {
                        self.set_keeper(0);
                    }
                    // A chunk whose message start is gone (with its dead receiver).
                    self.take(rec)?;
                    self.release(rec);
                }
            }
        }
    }

    fn set_keeper(&self, keeper: u64) {
        self.h().keeper.store(keeper, Ordering::Release);
        if keeper == 0 {
            self.h().not_empty.notify_all();
        }
    }

    /// Takes in whatever chunks of the kept partial message are there, without waiting,
    /// if the consumer lock is free. A message completed this way stays in `partial` for
    /// this process's next receive; `keeper` is cleared as the last chunk is taken.
    fn pump_partial(&self) {
        let Some(_g) = self.lock_consumer(Deadline::after(Duration::ZERO)) else {
            return;
        };
        let Some(p) = self.take_partial() else {
            return;
        };
        let me = peers::current_process();
        if p.owner != me {
            return;
        }
        if p.bytes.len() == p.total {
            self.keep_partial(p);
            return;
        }
        if self.h().keeper.load(Ordering::Acquire) != me {
            return; // abandoned meanwhile
        }
        let (first, owner) = (p.first, p.owner);
        // `Kept` stored it back; `Abandoned` dropped it; an error is met again (and
        // reported) by the next receive.
        if let Ok(Assembly::Done(bytes)) = self.assemble(p, Deadline::after(Duration::ZERO)) {
            self.keep_partial(Partial {
                owner,
                first,
                total: bytes.len(),
                bytes,
            });
        }
    }

    fn keep_partial(&self, p: Partial) {
        *self.partial.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        self.has_partial.store(true, Ordering::Relaxed);
    }

    fn take_partial(&self) -> Option<Partial> {
        let p = self
            .partial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.has_partial.store(false, Ordering::Relaxed);
        p
    }

    /// Reads the `FIRST` chunk `first` (claimed) into a new partial message and releases it.
    fn start_partial(&self, first: Rec) -> Result<Partial, QueueError> {
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
        Ok(Partial {
            owner: peers::current_process(),
            first: first.pos,
            total,
            bytes,
        })
    }

    /// Receives the rest of the chunked message `p`. The caller holds the consumer lock.
    /// If `deadline` passes first, `p` is kept for the next receive in this process and
    /// this process is marked as its keeper, so no other consumer takes its chunks.
    fn assemble(&self, mut p: Partial, deadline: Deadline) -> Result<Assembly, QueueError> {
        let h = self.h();
        let mine = p.first.wrapping_add(1);
        while p.bytes.len() < p.total {
            let next = block_on(
                &h.not_empty,
                deadline,
                || {
                    // Loaded before looking at `head`: the producer clears it only after
                    // publishing every chunk it will publish.
                    let streaming = h.stream.load(Ordering::Acquire);
                    match self.peek() {
                        Err(e) => Attempt::Ready(Err(e)),
                        Ok(Some(rec)) if matches!(rec.kind, K_MIDDLE | K_LAST) => {
                            Attempt::Ready(Ok(Some(rec)))
                        }
                        // Another message starts: this one was abandoned.
                        Ok(Some(_)) => Attempt::Ready(Ok(None)),
                        // Its producer gave up on it (or finished with a chunk we lost).
                        Ok(None) if streaming != mine => Attempt::Ready(Ok(None)),
                        Ok(None) => Attempt::Blocked,
                    }
                },
                // A dead producer leaves its lock held: the rest is never coming.
                || h.producer.holder_is_dead().then_some(Ok(None)),
            );
            let rec = match next {
                None => {
                    self.keep_partial(p);
                    self.set_keeper(peers::current_process());
                    fail_point(FP_STASHED);
                    return Ok(Assembly::Kept);
                }
                Some(Ok(Some(rec))) => rec,
                Some(Ok(None)) => {
                    self.drop_keeper();
                    return Ok(Assembly::Abandoned);
                }
                Some(Err(e)) => {
                    self.drop_keeper();
                    return Err(e);
                }
            };
            self.take(rec)?;
            // SAFETY: we claimed `rec`.
            let chunk = unsafe { self.payload(rec) };
            if p.bytes.len() + chunk.len() > p.total {
                self.release(rec);
                self.drop_keeper();
                return Err(QueueError::Corrupted("chunks exceed their message".into()));
            }
            p.bytes.extend_from_slice(chunk);
            let last = rec.kind == K_LAST;
            self.release(rec);
            if last != (p.bytes.len() == p.total) {
                self.drop_keeper();
                return Err(QueueError::Corrupted(
                    "chunk count disagrees with length".into(),
                ));
            }
        }
        self.drop_keeper();
        Ok(Assembly::Done(p.bytes))
    }

    /// Clears `keeper` if this process is it.
    fn drop_keeper(&self) {
        let me = peers::current_process();
        if self
            .h()
            .keeper
            .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.h().not_empty.notify_all();
        }
    }

    // ---- dead peers ----------------------------------------------------------------

    /// Finishes a record at `head` whose producer died before publishing it.
    fn finish_dead_writer(&self, deadline: Deadline) -> bool {
        let Ok((_, head, tail)) = self.positions() else {
            return false;
        };
        if head == tail {
            return false;
        }
        let Some(_g) = self.lock_consumer(deadline) else {
            return false;
        };
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

    /// Whether a live process holds a handle, other than the caller's (of role `me`), that
    /// can act as `side` (`Send` or `Recv`): a two-way handle, or one of that role.
    fn counterpart_alive(&self, me: Role, side: Role) -> bool {
        let h = self.h();
        if h.handles.any_alive() && (me != Role::Both || h.handles.handles_beyond_one_of_mine()) {
            return true;
        }
        // A sender asks about receivers and vice versa, so the caller is not counted in
        // the table it asks about, except when a receive-only handle hands a kept message
        // back (`hand_back_partial`): then it asks about the other receivers.
        match side {
            Role::Send => h.senders.any_alive(),
            Role::Recv => {
                h.receivers.any_alive()
                    && (me != Role::Recv || h.receivers.handles_beyond_one_of_mine())
            }
            Role::Both => false,
        }
    }

    /// Whether this process may not use the queue (see "Pid namespaces").
    #[inline]
    fn foreign(&self) -> bool {
        self.h().handles.foreign()
    }

    /// The peer table that counts handles of `role`.
    pub(crate) fn table(&self, role: Role) -> &PeerTable {
        let h = self.h();
        match role {
            Role::Both => &h.handles,
            Role::Send => &h.senders,
            Role::Recv => &h.receivers,
        }
    }
}

impl Core {
    /// A handle of this process is dropped while the process keeps a chunked message
    /// (see "Timeouts"): receives the rest of it (waiting for its producer for as long as
    /// that streams it: only its death or abandoning the message ends the wait early),
    /// then puts the whole message back into the queue as a new message, waiting for
    /// room at most [`HAND_BACK_PATIENCE`] (a message larger than the ring needs a
    /// receiver taking its chunks meanwhile). If that runs out, nothing was put back: the
    /// whole message stays with this process for its next receive (or its next handle
    /// drop), unless `last` (this was the process's last handle), when it is lost, with a
    /// line on stderr saying so. Lost also if every receiver is gone, or if its producer
    /// abandoned it.
    fn hand_back_partial(&self, role: Role, last: bool) {
        let me = peers::current_process();
        let mine = self
            .partial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|p| p.owner == me);
        if !mine {
            return; // nothing, or a copy a fork left here: another process keeps it
        }
        let bytes = {
            let Some(_g) = self.lock_consumer(Deadline::NEVER) else {
                return;
            };
            let Some(p) = self.take_partial() else {
                return;
            };
            if p.bytes.len() == p.total {
                p.bytes
            } else if self.h().keeper.load(Ordering::Acquire) != me {
                return; // abandoned meanwhile, and already skipped by another receiver
            } else {
                match self.assemble(p, Deadline::NEVER) {
                    Ok(Assembly::Done(bytes)) => bytes,
                    // Abandoned by its producer, or corrupted: `assemble` let go of it.
                    Ok(Assembly::Abandoned) | Err(_) => return,
                    // (Not with this deadline; if it were, let other receivers on.)
                    Ok(Assembly::Kept) => {
                        let _ = self.take_partial();
                        self.drop_keeper();
                        return;
                    }
                }
            }
        };
        let put = self.send_open(
            role,
            bytes.len(),
            |buf| {
                buf.copy_from_slice(&bytes);
                Ok(())
            },
            Deadline::after(HAND_BACK_PATIENCE),
        );
        if put != Err(QueueError::Timeout) {
            return; // put back; or lost with every receiver, or to corruption
        }
        if last {
            eprintln!(
                "procshare: a {}-byte queue message this process had started receiving (a \
                 receive timed out in the middle of it) was lost as the process dropped its \
                 last handle to the queue: no receiver took it back within {:?}. Receive \
                 again before dropping the queue, or keep a receiver receiving meanwhile",
                bytes.len(),
                HAND_BACK_PATIENCE
            );
            return;
        }
        let total = bytes.len();
        self.keep_partial(Partial {
            owner: me,
            first: 0,
            total,
            bytes,
        });
    }
}

impl Drop for Core {
    /// The last handle in this process has let go (and handed back a kept message, see
    /// [`Core::hand_back_partial`]); if a kept message is still here (it could not be
    /// finished), consumers elsewhere must stop waiting for this process to resume it.
    fn drop(&mut self) {
        if self.has_partial.load(Ordering::Relaxed) && !self.foreign() {
            self.drop_keeper();
        }
    }
}

// ---- crash-test hooks --------------------------------------------------------------

/// Points between two stores of the protocol where a crash test can stall a process (and
/// then kill it). Test-only: see [`ByteQueue::__stall_at`].
#[doc(hidden)]
pub const __FAIL_POINTS: &[&str] = &[
    "reserve: padding READY, record not yet written",
    "reserve: record WRITING, tail not advanced",
    "publish: counted, record not yet READY",
    "claim: padding DONE, head not advanced",
    "claim: record READING, head not advanced",
    "claim: head advanced, count not decremented",
    "release: record DONE, free not advanced",
    "chunked: stream marked, first chunk not published",
    "chunked: first chunk published",
    "chunked: stream cleared, producer lock not released",
    "assemble: partial message kept, consumer lock not released",
];
const FP_RESERVE_PAD: u32 = 1;
const FP_RESERVE_WRITING: u32 = 2;
const FP_PUBLISH_COUNTED: u32 = 3;
const FP_CLAIM_PAD_DONE: u32 = 4;
const FP_CLAIM_READING: u32 = 5;
const FP_CLAIM_HEAD: u32 = 6;
const FP_RELEASE_DONE: u32 = 7;
const FP_STREAM_MARKED: u32 = 8;
const FP_FIRST_PUBLISHED: u32 = 9;
const FP_STREAM_CLEARED: u32 = 10;
const FP_STASHED: u32 = 11;

/// The armed fail point (an index into `__FAIL_POINTS` plus one), 0 when none is. Only
/// crash tests arm one; on the common path a fail point is one relaxed load of this
/// process-local word.
static FAIL_POINT: AtomicU32 = AtomicU32::new(0);
static STALL: std::sync::Mutex<Option<fn()>> = std::sync::Mutex::new(None);

#[inline(always)]
fn fail_point(id: u32) {
    if FAIL_POINT.load(Ordering::Relaxed) == id {
        stall_here();
    }
}

#[cold]
#[inline(never)]
fn stall_here() {
    let stall = *STALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(stall) = stall {
        stall();
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

/// Holds one of the queue's robust locks.
struct RawLockGuard<'a>(&'a RawMutex);

impl<'a> RawLockGuard<'a> {
    /// Takes `lock` by `deadline`. A deadline already past (a `try_*` call) takes it only
    /// if it is free, or held by a thread the kernel says is gone (asked only then).
    fn acquire(lock: &'a RawMutex, deadline: Deadline) -> Option<RawLockGuard<'a>> {
        let taken = if deadline.has_passed() {
            lock.try_lock() || (lock.holder_is_dead() && lock.lock_until(deadline))
        } else {
            lock.lock_until(deadline)
        };
        // Not `then_some`: that would build (and drop, unlocking) a guard for a lock
        // someone else holds.
        taken.then(|| RawLockGuard(lock))
    }

    /// Whether the previous holder died holding the lock.
    fn recovered(&self) -> bool {
        self.0.is_poisoned()
    }

    /// Marks what a dead holder left as repaired. Call after repairing: a kill before
    /// this leaves the lock poisoned, so the next holder repairs again.
    fn repaired(&self) {
        self.0.clear_poison();
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
            stream: AtomicU64::new(0),
            keeper: AtomicU64::new(0),
            // SAFETY: a peer table is plain atomics; all-zero is the empty table (the creator's
            // pid namespace is stamped once it is in place).
            handles: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            senders: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            receivers: unsafe { std::mem::zeroed() },
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
    pub fn build<T: serde::Serialize + serde::de::DeserializeOwned + 'static>(
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
    role: Role,
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
            role: Role::Both,
        })
    }

    /// Another handle to the same queue, counted as `role` (see [`Role`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if the peer table is full.
    pub(crate) fn with_role(&self, role: Role) -> Result<ByteQueue> {
        peers::attach(self.core.table(role))?;
        Ok(ByteQueue {
            core: Arc::clone(&self.core),
            role,
        })
    }

    /// Sends a copy of `bytes`, waiting for room.
    ///
    /// # Errors
    ///
    /// `MessageTooLarge`, `Closed`, `Disconnected` or `Corrupted`.
    pub fn send(&self, bytes: &[u8]) -> Result<(), QueueError> {
        self.core.send_parts(self.role, &[bytes], Deadline::NEVER)
    }

    /// Sends a copy of `bytes` if there is room now. Returns at once.
    ///
    /// # Errors
    ///
    /// As for [`send`](ByteQueue::send), plus `Full`: no room now, or another producer is
    /// in the middle of a large (chunked) message. Nothing was sent.
    pub fn try_send(&self, bytes: &[u8]) -> Result<(), QueueError> {
        self.core
            .send_parts(self.role, &[bytes], Deadline::after(Duration::ZERO))
            .map_err(full_not_timeout)
    }

    /// Sends a copy of `bytes`, waiting at most `timeout` for room.
    ///
    /// # Errors
    ///
    /// As for [`send`](ByteQueue::send), plus `Timeout`: nothing was sent. (A large
    /// message whose first chunks were already out is abandoned: no receiver gets any of
    /// it.)
    pub fn send_timeout(&self, bytes: &[u8], timeout: Duration) -> Result<(), QueueError> {
        self.core
            .send_parts(self.role, &[bytes], Deadline::after(timeout))
    }

    /// Sends a message of `len` bytes written in place by `fill` (zero-copy: `fill` writes
    /// straight into the shared ring). Waits for room.
    ///
    /// If `fill` panics, nothing is sent, the queue stays usable, and the panic goes on.
    ///
    /// # Errors
    ///
    /// As for [`send`](ByteQueue::send).
    pub fn send_with(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<(), QueueError> {
        self.core.send(
            self.role,
            len,
            |buf| {
                fill(buf);
                Ok(())
            },
            Deadline::NEVER,
        )
    }

    /// Sends the concatenation of `parts` as one message (see `Core::send_parts`).
    pub(crate) fn send_parts(&self, parts: &[&[u8]], deadline: Deadline) -> Result<(), QueueError> {
        self.core.send_parts(self.role, parts, deadline)
    }

    pub(crate) fn send_encoded(
        &self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        self.core.send(self.role, len, fill, deadline)
    }

    /// Receives a message into a new `Vec`, waiting for one.
    ///
    /// # Errors
    ///
    /// `Closed` (closed and drained), `Disconnected` or `Corrupted`.
    pub fn recv(&self) -> Result<Vec<u8>, QueueError> {
        self.core.recv(self.role, Deadline::NEVER, <[u8]>::to_vec)
    }

    /// Receives a message into `buf` (replacing its contents, reusing its allocation);
    /// returns the length.
    ///
    /// # Errors
    ///
    /// As for [`recv`](ByteQueue::recv).
    pub fn recv_into(&self, buf: &mut Vec<u8>) -> Result<usize, QueueError> {
        self.core.recv(self.role, Deadline::NEVER, |bytes| {
            buf.clear();
            buf.extend_from_slice(bytes);
            bytes.len()
        })
    }

    /// Receives a message and lends its bytes, in place in the shared ring, to `f`; the
    /// space is released when `f` returns.
    ///
    /// If `f` panics, the message counts as consumed (nobody else receives it), its space
    /// is released, and the panic goes on.
    ///
    /// # Errors
    ///
    /// As for [`recv`](ByteQueue::recv).
    pub fn recv_with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, QueueError> {
        self.core.recv(self.role, Deadline::NEVER, f)
    }

    /// Like [`recv_with`](ByteQueue::recv_with), waiting at most `timeout`.
    ///
    /// If time runs out in the middle of a large (chunked) message, the part received is
    /// kept by this process, and the next receive here, through any handle, resumes it.
    /// Until then the rest of that message is this process's: receivers in other
    /// processes wait behind it as behind a slow reader (and its producer for room), so
    /// receive again soon, or drop this process's handles. Dropping the last one
    /// finishes the message and puts it back into the queue whole; only a process killed
    /// (or leaving without dropping its handles) loses it (see the
    /// [module docs](self#timeouts)).
    ///
    /// # Errors
    ///
    /// As for [`recv`](ByteQueue::recv), plus `Timeout`.
    pub fn recv_with_timeout<R>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, QueueError> {
        self.core.recv(self.role, Deadline::after(timeout), f)
    }

    /// Like [`recv_with`](ByteQueue::recv_with) if a message is ready now. Returns at
    /// once; a large message only partly there is kept as for
    /// [`recv_with_timeout`](ByteQueue::recv_with_timeout).
    ///
    /// # Errors
    ///
    /// As for [`recv`](ByteQueue::recv), plus `Empty`.
    pub fn try_recv_with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, QueueError> {
        self.core
            .recv(self.role, Deadline::after(Duration::ZERO), f)
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

    /// Fuzzing hook: overwrites the chunked-message marks `stream` and `keeper` (see the
    /// module docs), as a peer scribbling over shared memory would.
    #[doc(hidden)]
    pub fn __scribble_marks(&self, stream: u64, keeper: u64) {
        let h = self.core.h();
        h.stream.store(stream, Ordering::SeqCst);
        h.keeper.store(keeper, Ordering::SeqCst);
    }

    /// Crash-test hook: from now on, this process calls `stall` whenever any handle of any
    /// byte queue reaches the fail point named `point` (one of `__FAIL_POINTS`), so a test
    /// can stop or kill a process between two stores of the protocol. `None` disarms.
    ///
    /// # Panics
    ///
    /// If `point` is not a known fail point.
    #[doc(hidden)]
    pub fn __stall_at(point: Option<&str>, stall: fn()) {
        let id = match point {
            None => 0,
            Some(p) => {
                let i = __FAIL_POINTS
                    .iter()
                    .position(|q| *q == p)
                    .unwrap_or_else(|| panic!("unknown fail point {p:?}"));
                i as u32 + 1
            }
        };
        *STALL.lock().unwrap_or_else(|e| e.into_inner()) = Some(stall);
        FAIL_POINT.store(id, Ordering::SeqCst);
    }

    /// The largest message this queue accepts.
    pub fn max_message(&self) -> usize {
        self.core.max_message
    }
}

/// Copies bytes `offset..offset + dst.len()` of the concatenation of `parts` into `dst`.
fn copy_parts(parts: &[&[u8]], mut offset: usize, mut dst: &mut [u8]) {
    for part in parts {
        if dst.is_empty() {
            return;
        }
        if offset >= part.len() {
            offset -= part.len();
            continue;
        }
        let n = (part.len() - offset).min(dst.len());
        dst[..n].copy_from_slice(&part[offset..offset + n]);
        dst = &mut dst[n..];
        offset = 0;
    }
    assert!(
        dst.is_empty(),
        "copy_parts: the parts are shorter than the message"
    );
}

pub(crate) fn full_not_timeout(e: QueueError) -> QueueError {
    if e == QueueError::Timeout {
        QueueError::Full
    } else {
        e
    }
}

// ---- Handing a handle to a spawned child (`process::handles`) ------------------------

impl ByteQueue {
    /// See [`RingMem::exported`]; also the handle's role and the queue's message limit
    /// (process-local settings the child needs).
    pub(crate) fn exported(&self) -> Option<(super::ring::Exported<'_>, Role, usize)> {
        let e = self.core.ring.exported(self.core.table(self.role))?;
        Some((e, self.role, self.core.max_message))
    }

    /// A handle of `role` on the queue whose segment arrived as `fd`, counted by `count`
    /// (which takes over the loan the parent made) instead of [`peers::attach`].
    pub(crate) fn adopt(
        fd: std::os::fd::OwnedFd,
        role: Role,
        max_message: usize,
        count: impl FnOnce(&PeerTable) -> Result<()>,
    ) -> Result<ByteQueue> {
        let ring = RingMem::adopt("bytequeue", 4096, fd)?;
        let core = Core {
            ring,
            max_message,
            partial: std::sync::Mutex::new(None),
            has_partial: AtomicBool::new(false),
            check: CheckClock::new(),
        };
        count(core.table(role))?;
        Ok(ByteQueue {
            core: Arc::new(core),
            role,
        })
    }
}

impl Clone for ByteQueue {
    /// Another handle to the same queue.
    ///
    /// # Panics
    ///
    /// If 1024 other live processes already hold handles to this queue (handles a
    /// process inherits by `fork` never fail: beyond 1024 processes they are counted
    /// without a slot, and the queue then counts as connected for good: use timeouts).
    fn clone(&self) -> Self {
        peers::attach(self.core.table(self.role)).expect("attach a queue handle");
        ByteQueue {
            core: Arc::clone(&self.core),
            role: self.role,
        }
    }
}

impl Drop for ByteQueue {
    fn drop(&mut self) {
        let h = self.core.h();
        // A chunked message this process keeps goes back into the queue when any of its
        // handles is dropped, not only its last: a forked child also holds (and never
        // drops: it leaves with `_exit`) the handles it inherited, so its last drop is
        // usually of a clone. Done first, while this handle still counts, so receivers
        // elsewhere do not see the queue disconnected meanwhile. (`core` is shared by
        // every handle of this process: a count of 1 means this is its last one.)
        if self.core.has_partial.load(Ordering::Relaxed) && !self.core.foreign() {
            let last = Arc::strong_count(&self.core) == 1;
            self.core.hand_back_partial(self.role, last);
        }
        peers::detach(self.core.table(self.role));
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
