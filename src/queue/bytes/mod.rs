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
//!  record header (16 bytes; the exact bit layout, and the one encoder and decoder of it,
//!  are in src/queue/bytes/record.rs)
//!  word:  [state 8][kind 8][zero 16][payload length 32]
//!  owner: [thread id 24][thread start time, low 40 bits]
//!  state: WRITING 1, READY 2, READING 3, DONE 4
//!  kind:  SINGLE 0, FIRST 1, MIDDLE 2, LAST 3, PAD 4
//!
//!  shared header words besides the positions
//!  sent    whole messages published, ever  (producers add; a line of its own)
//!  taken   whole messages claimed, ever    (the consumer lock's holder; a line of its own)
//!  stream  FIRST position + 1 of the chunked message being sent, or 0
//!  keeper  process that keeps the start of a chunked message, or 0
//! ```
//!
//! A word with any other value (an unknown state or kind, a bit in the zero field) is
//! corruption.
//!
//! A record goes `WRITING` (owner = its producer thread) → `READY` → `READING` (owner =
//! its consumer thread) → `DONE`; padding is written `READY` with kind `PAD` and goes
//! straight to `DONE`. The owner is written before the state that names it.
//!
//! | step (lock held)            | stores, in order                                        |
//! |-----------------------------|---------------------------------------------------------|
//! | reserve (producer lock)     | [pad owner, pad `READY`/`PAD`], owner, `WRITING`, `tail` |
//! | publish (none)              | [`sent` + 1 for `SINGLE`/`LAST`], `READY` (or `PAD` to discard) |
//! | skip padding (consumer lock) | `DONE`, `head`, then `free` moves                       |
//! | claim (consumer lock)       | owner, `READING`, `head`, [`taken` + 1]                 |
//! | release (none)              | `DONE`, then (a batch done, or a producer waiting) `free` moves over `DONE` records (CAS) |
//!
//! A send of a single record and a receive of one first try the common case: the lock
//! free (and not left by a dead holder), room (a message) there now. That attempt makes
//! the same stores in the same order as the general path, which it falls back to having
//! written nothing (at most skipped padding, as any claim does); the tables below hold
//! for both. A producer compares against the `free` it last saw, and a consumer against
//! the `tail`, loading the shared word again only when the old value says "full"
//! ("empty"): both only grow, so an old value only understates what is there.
//!
//! A release moves `free` itself only once an eighth of the ring is done behind it, or
//! when a producer waits for room (asked with `not_full`'s notify read-modify-write,
//! after the `DONE` store, so a producer announced after it sees the `DONE`); a producer
//! short of room moves `free` over the `DONE` records before it decides the ring is full,
//! as does the check for dead readers. `DONE` records not yet passed are a state every
//! release could always leave behind (see the first table), so nothing new is left to
//! repair. The loom model `eventcount_lazy_notifier_and_a_waiter_that_helps_itself`
//! checks that no producer sleeps behind a release.
//!
//! # What a SIGKILL between two stores leaves, and who repairs it
//!
//! | killed between                | left behind                          | repaired by |
//! |-------------------------------|--------------------------------------|-------------|
//! | reserve's stores, before `tail` | records beyond `tail`              | nothing to do: the next reservation writes over them |
//! | `tail` and publish            | `WRITING` record, dead owner         | the consumer waiting at it: the kernel says the owner is gone → `PAD` (never sent) |
//! | `sent` + 1 and `READY`        | as above, `sent` one too high        | as above; `taken` catches up the next time a consumer finds the ring empty (below) |
//! | skip-padding `DONE` and `head` | `DONE` at `head`                    | the next holder of the consumer lock moves `head` on |
//! | claim's `READING` and `head`  | `READING` at `head`                  | the next holder of the consumer lock: back to `READY`, so the message (never handed to the dead reader) goes to the next receiver |
//! | claim's `head` and `taken` + 1 | `READING` behind `head`, dead owner, `taken` one too low | producers waiting for room: `DONE` once the kernel says the owner is gone (the message is lost with its reader); `taken` as above |
//! | while the reader reads, or `DONE` and moving `free` | `READING` (as above) or a `DONE` not yet passed | as above; a later release or the next producer short of room moves `free` on |
//!
//! A `READING` or `DONE` record *at* `head` is repaired without asking about its owner:
//! only a holder of the consumer lock marks the record at `head`, and it moves `head` on
//! before it lets go, so if we hold the lock and find one, its marker died (the robust lock
//! passed to us only on the kernel's word). A `WRITING` or `READING` record elsewhere is
//! finished only on proof that its owner thread is gone (`crate::liveness`); a slow live
//! writer or reader is waited for, never robbed.
//!
//! `sent` and `taken` only feed [`ByteQueue::len`] (`sent - taken`); nothing waits on
//! them. A producer counts a message *before* making it visible, so when a consumer,
//! holding the consumer lock (no claim in progress), finds `head == tail`, every message
//! counted has been claimed: if `taken` is behind `sent`, a kill left them apart, and
//! `taken` is set to the value of `sent` loaded *before* the positions (a producer that
//! counted after that load has a message still to claim, and stays counted; one that
//! counted before it had already moved `tail`, so the ring was not empty). Only the
//! consumer lock's holder writes `taken`, so a claim counts with a plain store, and the
//! producers' counter is on a cache line of its own that no claim touches.
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

// The parts, along the protocol's seams: `record` (the record header's format), `shared`
// (the shared header, `Core`, the two robust locks), `produce` (reserve, publish, single
// and chunked sends), `consume` (claim, read, release), `partial` (reassembling chunked
// messages, and the one a timed-out receive keeps), `repair` (records of dead peers),
// `hooks` (crash-test and fuzzing hooks, cargo feature `test-hooks`).
mod consume;
mod hooks;
mod partial;
mod produce;
mod record;
mod repair;
mod shared;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[cfg(any(test, feature = "test-hooks"))]
pub use hooks::__FAIL_POINTS;
use shared::Core;
pub(crate) use shared::Role;

pub use super::error::QueueError;
use super::peers;
use crate::error::Result;
use crate::sys::Deadline;

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
        let h = self.core.h();
        // `taken` first: a claim between the two loads can then only make this larger
        // than it was, never wrap it below 0 (a corrupted pair reads as empty).
        let taken = h.taken.load(Ordering::Relaxed);
        h.sent.load(Ordering::Relaxed).saturating_sub(taken) as usize
    }

    /// Whether no message is waiting (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The largest message this queue accepts.
    pub fn max_message(&self) -> usize {
        self.core.max_message
    }
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
    /// See [`RingMem::exported`](super::ring::RingMem::exported); also the handle's role
    /// and the queue's message limit (process-local settings the child needs).
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
        count: impl FnOnce(&super::peers::PeerTable) -> Result<()>,
    ) -> Result<ByteQueue> {
        let ring = super::ring::RingMem::adopt("bytequeue", 4096, fd)?;
        let core = Core {
            ring,
            max_message,
            partial: std::sync::Mutex::new(None),
            has_partial: std::sync::atomic::AtomicBool::new(false),
            check: crate::sync::eventcount::CheckClock::new(),
            seen: shared::Seen::default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Releases leave `free` behind for a batch (see `Core::release`): a producer that
    /// then needs that room moves `free` itself, at once, with nobody waiting and nothing
    /// else to wake it; and `len` counts through both laps.
    #[test]
    #[cfg_attr(miri, ignore = "shared memory (memfd)")]
    fn released_room_is_found_by_the_next_producer() {
        let q = ByteQueue::builder().capacity(4096).bytes().unwrap();
        let _peer = q.clone(); // not disconnected
        // 100 bytes take a 128-byte record: 32 fill the ring exactly, twice.
        for lap in 0..3u8 {
            for i in 0..32u8 {
                q.try_send(&[lap ^ i; 100])
                    .unwrap_or_else(|e| panic!("lap {lap}, message {i}: {e}"));
            }
            assert_eq!(q.try_send(&[0; 100]), Err(QueueError::Full), "lap {lap}");
            assert_eq!(q.len(), 32);
            for i in 0..32u8 {
                assert_eq!(q.try_recv_with(<[u8]>::to_vec).unwrap(), vec![lap ^ i; 100]);
            }
            assert_eq!(q.len(), 0);
            assert_eq!(q.try_recv_with(<[u8]>::to_vec), Err(QueueError::Empty));
        }
        // Two taken from a full ring: their releases left `free` behind (less than a
        // batch), and the room the next 2 sends need is exactly theirs.
        for i in 0..32u8 {
            q.try_send(&[i; 100]).unwrap();
        }
        for i in 0..2u8 {
            assert_eq!(q.try_recv_with(<[u8]>::to_vec).unwrap(), vec![i; 100]);
        }
        for i in 32..34u8 {
            q.try_send(&[i; 100])
                .unwrap_or_else(|e| panic!("room released but not passed: {e}"));
        }
        assert_eq!(q.len(), 32);
        for i in 2..34u8 {
            assert_eq!(q.try_recv_with(<[u8]>::to_vec).unwrap(), vec![i; 100]);
        }
        // One at a time too: never more than one record's worth behind.
        for i in 0..200u8 {
            q.try_send(&[i; 100]).unwrap();
            assert_eq!(q.try_recv_with(<[u8]>::to_vec).unwrap(), vec![i; 100]);
        }
        assert_eq!(q.len(), 0);
    }
}
