//! The shared header of a byte queue, the process-local [`Core`] around it, and the two
//! robust locks.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::partial::Partial;
use crate::error::Result;
use crate::queue::peers::PeerTable;
use crate::queue::ring::{CachePadded, RingMem};
use crate::sync::RawMutex;
use crate::sync::eventcount::{CheckClock, EventCount};
use crate::sys::Deadline;

/// How often a sender waiting for the producer lock drains a partial message its process
/// keeps (see `Core::lock_producer`).
const PUMP_EVERY: Duration = Duration::from_millis(1);

#[repr(C)]
pub(crate) struct Header {
    pub(super) producer: CachePadded<RawMutex>,
    pub(super) consumer: CachePadded<RawMutex>,
    pub(super) tail: CachePadded<AtomicU64>,
    pub(super) head: CachePadded<AtomicU64>,
    pub(super) free: CachePadded<AtomicU64>,
    pub(super) not_empty: CachePadded<EventCount>,
    pub(super) not_full: CachePadded<EventCount>,
    /// Whole messages published, ever (for `len`; see the module docs). Producers only
    /// add to it, each on its own line, so a consumer's claim does not pull it away.
    pub(super) sent: CachePadded<AtomicU64>,
    /// Whole messages claimed, ever (for `len`). Written under the consumer lock only.
    pub(super) taken: CachePadded<AtomicU64>,
    pub(super) closed: AtomicU32,
    /// Position + 1 of the `FIRST` chunk of the message the producer-lock holder is
    /// streaming; 0 when none is. Written under the producer lock.
    pub(super) stream: AtomicU64,
    /// Process identity of a consumer that gave up mid-message and keeps its start, so
    /// the chunks at `head` are its to resume; 0 when none. Written under the consumer
    /// lock (or, by the keeper letting go, with a compare-and-swap).
    pub(super) keeper: AtomicU64,
    /// Processes holding two-way handles (`Queue`, `ByteQueue`).
    pub(super) handles: PeerTable,
    /// Processes holding send-only handles (`QueueSender`).
    pub(super) senders: PeerTable,
    /// Processes holding receive-only handles (`QueueReceiver`).
    pub(super) receivers: PeerTable,
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
            sent: CachePadded(AtomicU64::new(0)),
            taken: CachePadded(AtomicU64::new(0)),
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
    pub(super) ring: RingMem<Header, u8>,
    pub(super) max_message: usize,
    /// A chunked message this process started receiving and gave up on at a deadline
    /// (see "Timeouts"). Touched only with the consumer lock held.
    pub(super) partial: std::sync::Mutex<Option<Partial>>,
    /// Whether `partial` may hold something: the common path reads only this.
    pub(super) has_partial: AtomicBool,
    /// Rate-limits the dead-peer check of calls that give up (`try_*`, timeouts), which
    /// never sleep long enough for the blocking path's periodic check.
    pub(super) check: CheckClock,
    /// Positions this process last loaded, so that the common path need not load them
    /// again (each is a cache line the other side writes): `free` as a producer saw it,
    /// `tail` as a consumer saw it. Both only grow, so an old value only understates the
    /// room (or the records) there are, and the shared word is loaded again when the old
    /// value would say "full" ("empty"). Process-local; 0 (a fresh handle) is old.
    pub(super) seen: Seen,
}

/// See [`Core::seen`].
#[derive(Default)]
pub(super) struct Seen {
    pub(super) free: AtomicU64,
    pub(super) tail: AtomicU64,
}

impl Core {
    pub(super) fn create(capacity: usize, max_message: usize) -> Result<Core> {
        let capacity = capacity.max(4096);
        // SAFETY: the ring's bytes start as zeros (a record word of 0 is never read as a
        // record: nothing is read beyond `tail`).
        let ring = unsafe { RingMem::create_zeroed("bytequeue", capacity, Header::new)? };
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
            seen: Seen::default(),
        })
    }

    #[inline]
    pub(super) fn h(&self) -> &Header {
        self.ring.header()
    }

    #[inline]
    pub(super) fn cap(&self) -> u64 {
        self.ring.capacity()
    }

    /// Largest payload that goes in a single record.
    #[inline]
    pub(super) fn single_limit(&self) -> u64 {
        super::record::single_limit(self.cap())
    }

    /// Whether this process may not use the queue (see "Pid namespaces").
    #[inline]
    pub(super) fn foreign(&self) -> bool {
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

    /// Whether a live process holds a handle, other than the caller's (of role `me`), that
    /// can act as `side` (`Send` or `Recv`): a two-way handle, or one of that role.
    pub(super) fn counterpart_alive(&self, me: Role, side: Role) -> bool {
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

    /// Takes the producer lock by `deadline`. A holder that died may have left `stream`
    /// naming its unfinished message: cleared, so consumers drop that message.
    pub(super) fn lock_producer(&self, deadline: Deadline) -> Option<RawLockGuard<'_>> {
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

    /// The producer lock, if it is free right now and its last holder did not die
    /// holding it (no repair due): the uncontended fast path of a small send, which
    /// otherwise falls back to [`lock_producer`](Core::lock_producer). Taking and
    /// dropping it changes nothing shared (a poisoned lock stays poisoned for the next
    /// holder to repair).
    #[inline]
    pub(super) fn lock_producer_now(&self) -> Option<RawLockGuard<'_>> {
        RawLockGuard::take_now(&self.h().producer)
    }

    /// The consumer lock, if it is free right now and needs no repair (as
    /// [`lock_producer_now`](Core::lock_producer_now)).
    #[inline]
    pub(super) fn lock_consumer_now(&self) -> Option<RawLockGuard<'_>> {
        RawLockGuard::take_now(&self.h().consumer)
    }

    /// Takes the consumer lock by `deadline`. Whatever a holder that died left half done
    /// is finished by [`peek`](Core::peek) as it meets it.
    pub(super) fn lock_consumer(&self, deadline: Deadline) -> Option<RawLockGuard<'_>> {
        let g = RawLockGuard::acquire(&self.h().consumer, deadline)?;
        if g.recovered() {
            g.repaired();
        }
        Some(g)
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

/// Holds one of the queue's robust locks.
pub(super) struct RawLockGuard<'a>(&'a RawMutex);

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

    /// Takes `lock` if it is free now and not poisoned; a poisoned lock is let go
    /// untouched at once (the guard's drop), still poisoned.
    #[inline]
    fn take_now(lock: &'a RawMutex) -> Option<RawLockGuard<'a>> {
        if !lock.try_lock() {
            return None;
        }
        let g = RawLockGuard(lock);
        (!g.recovered()).then_some(g)
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
