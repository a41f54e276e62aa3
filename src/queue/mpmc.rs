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
//!  stamp, claimed:
//!  63        62        61..40                 39..32             31..0
//! [CLAIMED][READING][thread id (22)][start time, low 8 bits][position (low 32 bits)]
//!
//!  claimant (a second word in the slot), written right after the claim, zeroed before
//!  the slot is published or freed:
//!  63..40              39..0
//! [thread id (24)][start time (40 bits, clock ticks after boot)]      0 = not written
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
//! skipped.
//!
//! # Who claimed a slot
//!
//! The claim word has room for the thread id and only 8 bits of its start time; the
//! claimant word holds the full 40-bit start time, as the mutex's owner record does. A
//! checker trusts a claimant word only if it names the claim's thread id and agrees with
//! its 8 bits, and then judges the claimant by all 40 bits: a dead claimant whose thread
//! id now belongs to a live stranger (whose start time can agree in 8 bits, 1 reuse in
//! 256) is still recognised as dead. The claimant word can never be a stale record of an
//! earlier claim: every claim zeroes it before it ends (the publishing or freeing store
//! releases that zero, and the next claim's compare-and-swap continues that release
//! sequence), so a checker that read the claim reads the word as zero, as written by
//! that claim, or as written by a later one (then the stamp has moved on, and `repair`,
//! which frees a slot only by a compare-and-swap from the claim it read, does nothing;
//! the loom model `channel_claimant_word_is_never_stale` checks this). While it is zero (the claimant is between its two stores, or died there)
//! the checker falls back to the 8 bits in the claim word, which can mistake a live
//! stranger for the claimant (never the reverse): only a claimant killed in that window
//! of one store, whose thread id is then reused with equal low bits, can hold a slot
//! longer than its life.
//!
//! # State table (one slot, position `p`, capacity `c`)
//!
//! | stamp | claimant | meaning | a SIGKILL here leaves | repaired by |
//! |---|---|---|---|---|
//! | `p` | 0 | free for a producer | — | — |
//! | claim(p, W) | 0 | producer claimed, record not yet written | the claim | `repair`, by the 8-bit check |
//! | claim(p, W) | id | producer writing the message | the claim (tail maybe not advanced: others help) | `repair`, by the 40-bit check: stamp → `p + c`, tail and head moved past `p` |
//! | `p + 1` | 0 | published | — | — |
//! | claim(p, R) | 0 / id | consumer copying out | the claim (message lost) | `repair` as above |
//! | `p + c` | 0 | free for the next lap | — | — |
//!
//! The header's words:
//!
//! | word | a SIGKILL can leave | repaired by |
//! |---|---|---|
//! | `tail` / `head` | not advanced past a claimed (consumed) position | any thread that finds the claim (the next stamp) helps them on |
//! | eventcounts | a dead waiter's announcement | the next notify erases it (see `eventcount`) |
//! | peer tables | a dead process's handle count | `any_alive`, on every slow path |
//! | `corrupted` | — (set once, by a single compare-and-swap) | never: recreate the queue |
//!
//! Every identity in a claim or claimant word was written by a process of the queue's
//! pid namespace, and only such processes judge them: a process of another namespace is
//! refused before it claims anything (see [Pid namespaces](crate::queue#pid-namespaces)),
//! so a live claimant is never "repaired" because its tid means another thread there.
//!
//! The in-place API (`send_with`, `recv_with`) runs the caller's closure between the
//! claim and the finishing store, so an unwinding closure is one more way to stop there;
//! drop guards finish the position as `repair` would, at once: a producer's `fill` that
//! panics leaves `p + c` (skipped, never delivered; `head` helped past it), a consumer's
//! reader that panics leaves `p + c` (received). No claim outlives its closure.
//!
//! A `try_*` call returns at once and a `*_timeout` call on time; when either gives up,
//! nothing was claimed, so the message stays whole in the queue (receive) or with the
//! caller (send).
//!
//! `repair` runs on the slow paths only: from a blocking wait every 20 ms, and from
//! `try_recv` (`try_send`) when it finds the queue empty (full), at most every 20 ms per
//! handle, so a polling user gets the same answers as a blocking one.
//!
//! # Corruption
//!
//! `head`, `tail` and the stamps are checked against the states above wherever they are
//! read; a value no correct run can produce (a stamp that fits no state at its position,
//! a position that `tail` says was claimed while its stamp says it never was, a message
//! still waiting behind `head`) marks the queue corrupted in its header, wakes every
//! sleeper, and from then on every operation on every handle returns `Corrupted` (the
//! message given back to senders). A scribbled index is never used beyond `& (capacity -
//! 1)`, so it can lose messages but never reach outside the ring.

use std::mem::MaybeUninit;
use std::sync::Arc;

use super::peers;
use super::ring::{self, RingHeader, RingMem, help_past, ring_handles};
use super::{
    RawReceiver, RawSender, RecvError, RecvTimeoutError, SendError, SendTimeoutError, TryRecvError,
    TrySendError, receiver_api, sender_api,
};
use crate::error::Result;
use crate::loom_switch::{AtomicU64, Ordering, UnsafeCell};
use crate::owner;
use crate::shm::ShmSafe;
use crate::sync::eventcount::{Attempt, EventCount, block_on};
use crate::sys;
use crate::sys::Deadline;

const CLAIMED: u64 = 1 << 63;
const READING: u64 = 1 << 62;
const TAG_SHIFT: u32 = 32;
const TAG_MASK: u64 = (1 << 30) - 1;
/// Bits of start time in the claim tag (see `crate::owner`); the claimant word is a full
/// thread record.
const HASH_BITS: u32 = 8;

/// Why a channel was marked corrupted (the header's `corrupted` word; 0 = sound).
const BAD_STAMP: u64 = 1;
const BAD_TAIL: u64 = 2;
const BAD_HEAD: u64 = 3;

/// The channel's header has no words of its own beyond the common ones; its `corrupted`
/// word holds a `BAD_*` reason.
pub(crate) type Header = RingHeader<()>;

#[repr(C)]
pub(crate) struct Slot<T> {
    stamp: AtomicU64,
    /// Who holds the claim in `stamp` (see the module docs), or 0.
    claimant: AtomicU64,
    value: UnsafeCell<MaybeUninit<T>>,
}

type Ring<T> = RingMem<Header, Slot<T>>;

#[cfg(loom)]
#[doc(hidden)]
pub use crate::sync::eventcount::LoomEventCount;

/// Creates a bounded multi-producer multi-consumer queue of at least `capacity` messages
/// (rounded up to a power of two, and at least 2) in a new anonymous shared segment. Both ends can be
/// cloned and used from any number of threads and (forked) processes.
///
/// A peer killed at any point never blocks the others: a producer killed mid-send loses
/// only its message, a consumer killed mid-receive only the message it was taking, and
/// both blocking and polling calls notice within about 20 ms. A queue whose shared memory
/// was scribbled over answers `Corrupted` to every later call. The
/// [module docs](mod@crate::channel) have the state table.
///
/// ```
/// let (tx, rx) = procshare::channel::<[u32; 4]>(256)?;
/// let producers: Vec<_> = (0..2u32)
///     .map(|p| {
///         let tx = tx.clone();
///         procshare::Process::fork(move || {
///             for i in 0..1000 {
///                 tx.send([p, i, 0, 0]).unwrap();
///             }
///         })
///     })
///     .collect::<Result<Vec<_>, _>>()?;
/// drop(tx); // only the children send now
/// assert_eq!(rx.iter().count(), 2000); // ends when both children are done
/// for p in producers {
///     p.join().expect("a producer ran to the end");
/// }
/// # Ok::<(), procshare::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a zero or absurd
/// capacity; [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
pub fn channel<T: ShmSafe + Copy + Send>(capacity: usize) -> Result<(Sender<T>, Receiver<T>)> {
    let ring = RingMem::create("channel", min_capacity(capacity), new_header, new_slot)?;
    ring::endpoints(ring, Sender::new, Receiver::new)
}

/// With one slot, "full at `p`" (`p + 1`) and "free for `p + 1`" (`p + capacity`) would be
/// the same stamp, so a channel has at least two. (Zero stays an error.)
fn min_capacity(capacity: usize) -> usize {
    if capacity == 1 { 2 } else { capacity }
}

fn new_slot<T>(i: u64) -> Slot<T> {
    Slot {
        stamp: AtomicU64::new(i),
        claimant: AtomicU64::new(0),
        // Zero is a valid `T` (ShmSafe), so a free slot can be lent as `&mut T` in place.
        value: UnsafeCell::new(MaybeUninit::zeroed()),
    }
}

fn new_header() -> Header {
    RingHeader::new(())
}

/// A heap-backed pair, for loom and Miri.
#[cfg(any(test, loom))]
#[doc(hidden)]
pub fn heap_channel<T: ShmSafe + Copy + Send + 'static>(
    capacity: usize,
) -> Result<(Sender<T>, Receiver<T>)> {
    let ring = RingMem::heap(min_capacity(capacity), new_header, new_slot);
    ring::endpoints(ring, Sender::new, Receiver::new)
}

/// A thread's identity as the ring records it: the claim tag (22 bits of thread id, 8 of
/// start time) and the claimant word (thread id above 40 bits of start time).
#[derive(Clone, Copy)]
struct Claimant {
    tag: u64,
    record: u64,
}

impl Claimant {
    fn of(tid: u32, start: u64) -> Claimant {
        Claimant {
            tag: u64::from(owner::thread_tag(tid, start, HASH_BITS)),
            record: owner::thread_record(tid, start),
        }
    }

    /// The calling thread.
    #[inline]
    fn me() -> Claimant {
        let me = sys::current_thread();
        Claimant::of(me.tid, me.start)
    }
}

#[inline]
fn claim(pos: u64, tag: u64, reading: bool) -> u64 {
    CLAIMED | if reading { READING } else { 0 } | (tag << TAG_SHIFT) | (pos & 0xffff_ffff)
}

#[inline]
fn claims(stamp: u64, pos: u64) -> bool {
    stamp & CLAIMED != 0 && stamp & 0xffff_ffff == pos & 0xffff_ffff
}

impl<T> Slot<T> {
    /// Claims this slot for position `pos` if its stamp is `expect`; on success the
    /// claimant word is written and the caller owns the slot until [`Slot::finish`].
    #[inline]
    fn try_claim(&self, expect: u64, pos: u64, me: Claimant, reading: bool) -> bool {
        let ok = self
            .stamp
            .compare_exchange_weak(
                expect,
                claim(pos, me.tag, reading),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_ok();
        if ok {
            self.claimant.store(me.record, Ordering::Relaxed);
        }
        ok
    }

    /// Ends our claim: zeroes the claimant word, then publishes `stamp`.
    #[inline]
    fn finish(&self, stamp: u64) {
        self.claimant.store(0, Ordering::Relaxed);
        // SYNC POINT: releases the message (or the freed slot) and the zeroed claimant.
        self.stamp.store(stamp, Ordering::Release);
    }

    /// Whether the thread holding `stamp` (a claim read from this slot) is provably gone;
    /// `Some(record)` with the claimant word to clear if so.
    fn claimant_is_dead(&self, stamp: u64) -> Option<u64> {
        let tag = ((stamp >> TAG_SHIFT) & TAG_MASK) as u32;
        // Read after the claim (acquire above): zero, or written by this very claim.
        let record = self.claimant.load(Ordering::Acquire);
        let dead = if owner::record_matches_tag(record, tag, HASH_BITS) {
            owner::record_is_dead(record)
        } else {
            // Not written yet (or, if the words disagree, not ours to trust): the
            // claim's own 8 bits can only err towards "alive".
            owner::tag_is_dead(tag, HASH_BITS)
        };
        dead.then_some(record)
    }
}

/// One slot's claim protocol as the loom model in `tests/loom.rs` drives it; not API.
#[cfg(loom)]
#[doc(hidden)]
pub struct LoomSlot(Slot<u64>);

#[cfg(loom)]
impl Default for LoomSlot {
    fn default() -> Self {
        LoomSlot(new_slot(0))
    }
}

#[cfg(loom)]
impl LoomSlot {
    /// The claimant word thread `tid` started at `start` writes.
    pub fn record_of(tid: u32, start: u64) -> u64 {
        Claimant::of(tid, start).record
    }

    /// Claims position 0 as a producer (thread `tid`, started at `start`) and publishes.
    pub fn write_as(&self, tid: u32, start: u64) {
        while !self.0.try_claim(0, 0, Claimant::of(tid, start), false) {
            loom::thread::yield_now();
        }
        self.0.finish(1);
    }

    /// Claims the message at position 0 as a consumer and frees the slot for lap `cap`.
    pub fn read_as(&self, tid: u32, start: u64, cap: u64) {
        while !self.0.try_claim(1, 0, Claimant::of(tid, start), true) {
            loom::thread::yield_now();
        }
        self.0.finish(cap);
    }

    /// What a checker reads: `Some((claim, claimant word))` if the stamp was a claim.
    /// (The word may belong to a *later* claim if the stamp moved on meanwhile; `repair`
    /// then acts on nothing, because its compare-and-swap from the claim it read fails.)
    pub fn check(&self) -> Option<(u64, u64)> {
        let stamp = self.0.stamp.load(Ordering::Acquire);
        if stamp & CLAIMED == 0 {
            return None;
        }
        Some((stamp, self.0.claimant.load(Ordering::Acquire)))
    }

    /// Whether a claim word is a consumer's.
    pub fn is_reading(stamp: u64) -> bool {
        stamp & READING != 0
    }
}

/// What a producer puts into the slot it claimed: a value, or an in-place write.
trait Fill<T> {
    fn fill(self, slot: &mut MaybeUninit<T>);
}

/// A message sent by value.
struct ByValue<T>(T);

impl<T> Fill<T> for ByValue<T> {
    #[inline]
    fn fill(self, slot: &mut MaybeUninit<T>) {
        slot.write(self.0);
    }
}

/// A message written in place by a closure.
struct InPlace<F>(F);

impl<T: ShmSafe, F: FnOnce(&mut T)> Fill<T> for InPlace<F> {
    #[inline]
    fn fill(self, slot: &mut MaybeUninit<T>) {
        // SAFETY: a slot always holds a valid T: zero at creation (valid for ShmSafe),
        // then whatever message was last written there.
        (self.0)(unsafe { slot.assume_init_mut() });
    }
}

impl<P> TrySendError<P> {
    fn map<Q>(self, f: impl FnOnce(P) -> Q) -> TrySendError<Q> {
        match self {
            TrySendError::Full(v) => TrySendError::Full(f(v)),
            TrySendError::Disconnected(v) => TrySendError::Disconnected(f(v)),
            TrySendError::Corrupted(v) => TrySendError::Corrupted(f(v)),
        }
    }
}

/// Armed while a producer's in-place `fill` runs: if it unwinds, the claimed position is
/// finished as a skipped message, exactly as `repair` finishes a dead producer's (free
/// for the next lap, `head` helped past it), and sleepers are woken.
struct Abandon<'a, T> {
    ring: &'a Ring<T>,
    pos: u64,
}

impl<T> Drop for Abandon<'_, T> {
    #[cold]
    fn drop(&mut self) {
        let (ring, pos) = (self.ring, self.pos);
        let h = ring.header();
        ring.slot(pos).finish(pos.wrapping_add(ring.capacity()));
        // `tail` is already past `pos` (advanced by us or a helper after our claim).
        help_past(&h.head, pos);
        h.not_full.notify_all();
        h.not_empty.notify_all();
    }
}

/// Frees a consumer's claimed slot for the next lap when its reader returns or unwinds.
struct Free<'a, T> {
    ring: &'a Ring<T>,
    pos: u64,
}

impl<T> Drop for Free<'_, T> {
    #[inline]
    fn drop(&mut self) {
        let (ring, pos) = (self.ring, self.pos);
        ring.slot(pos).finish(pos.wrapping_add(ring.capacity()));
        if std::thread::panicking() {
            // The caller's notify will not run: wake producers waiting for this slot.
            ring.header().not_full.notify_all();
        }
    }
}

/// How many times in a row a thread may find a stamp that fits no state before it calls
/// the ring corrupted. One confirmed odd stamp is already proof (see `push`), so this is
/// only a margin against a reasoning error; it costs nothing on a sound ring.
const CONFUSION_LIMIT: u32 = 1 << 12;

/// Whether position `a` is ahead of `b` (positions wrap at 2^64).
#[inline]
fn ahead(a: u64, b: u64) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 1 << 63
}

impl<T> RingMem<Header, Slot<T>> {
    /// Frees slots that a dead thread claimed and left half done; returns whether it
    /// freed any. Two places can hold one: `head` (a producer died before publishing, or
    /// a consumer before advancing `head`) and `tail - capacity` (a consumer died after
    /// advancing `head` but before freeing the slot, which keeps producers out).
    fn repair(&self) -> bool {
        let h = self.header();
        if h.senders.foreign() {
            return false; // judges nobody (see `refuse_foreign`)
        }
        let head = h.head.load(Ordering::Acquire);
        let behind_tail = h.tail.load(Ordering::Acquire).wrapping_sub(self.capacity());
        let mut freed = false;
        for pos in [head, behind_tail] {
            let slot = self.slot(pos);
            let stamp = slot.stamp.load(Ordering::Acquire);
            if !claims(stamp, pos) {
                continue;
            }
            let Some(record) = slot.claimant_is_dead(stamp) else {
                continue;
            };
            // A dead writer's message was never sent; a dead reader's was lost with it.
            // Either way the position is finished: zero the dead claimant's word (unless
            // someone already did), free the slot for the next lap, and move `tail` and
            // then `head` past it in case the dead thread had not (in that order, so
            // `head` never passes `tail`).
            if record != 0 {
                let _ =
                    slot.claimant
                        .compare_exchange(record, 0, Ordering::Relaxed, Ordering::Relaxed);
            }
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
                help_past(&h.tail, pos);
                help_past(&h.head, pos);
                freed = true;
            }
        }
        if freed {
            h.not_full.notify_all();
            h.not_empty.notify_all();
        }
        freed
    }

    /// The corruption report, if the queue was marked corrupted.
    #[inline]
    fn corruption(&self) -> Option<String> {
        match self.header().corrupted.load(Ordering::Relaxed) {
            0 => None,
            why => Some(describe_corruption(why)),
        }
    }
}

#[cold]
fn describe_corruption(why: u64) -> String {
    match why {
        BAD_STAMP => "a slot's stamp fits no state of its position".into(),
        BAD_TAIL => "the shared tail is ahead of a position that was never claimed".into(),
        BAD_HEAD => "the shared head is ahead of a message that was never received".into(),
        other => format!("the corruption mark itself holds the impossible value {other:#x}"),
    }
}

/// A per-handle clock for the checks a non-blocking call runs when it finds the queue
/// empty (full): at most one every [`CHECK_EVERY`](crate::sync::eventcount::CHECK_EVERY).
type CheckClock = crate::sync::eventcount::CheckClock;

/// The sending end of a [`channel`](fn@crate::channel). Clone it for more producers.
///
/// # Panics
///
/// Every method that sends or receives panics in a process of another pid namespace than
/// the queue's creator (see [Pid namespaces](crate::queue#pid-namespaces)).
pub struct Sender<T: ShmSafe + Copy + Send> {
    ring: Arc<Ring<T>>,
    check: CheckClock,
}

/// The receiving end of a [`channel`](fn@crate::channel). Clone it for more consumers.
///
/// # Panics
///
/// Every method that sends or receives panics in a process of another pid namespace than
/// the queue's creator (see [Pid namespaces](crate::queue#pid-namespaces)).
pub struct Receiver<T: ShmSafe + Copy + Send> {
    ring: Arc<Ring<T>>,
    check: CheckClock,
}

impl<T: ShmSafe + Copy + Send> Sender<T> {
    fn new(ring: Arc<Ring<T>>) -> Sender<T> {
        Sender {
            ring,
            check: CheckClock::new(),
        }
    }

    /// Sends as many of `values` as fit right now; returns how many. Each message is
    /// claimed and published on its own (positions are shared with other producers), but
    /// consumers are notified once for the batch.
    ///
    /// # Errors
    ///
    /// `Disconnected(())` if every receiver is gone, `Corrupted(())` if the queue is
    /// corrupted (only when nothing was sent).
    pub fn try_send_batch(&self, values: &[T]) -> Result<usize, TrySendError<()>> {
        let mut sent = 0;
        for v in values {
            match self.push(ByValue(*v)) {
                Ok(()) => sent += 1,
                Err(TrySendError::Full(_)) => break,
                Err(TrySendError::Disconnected(_)) if sent == 0 => {
                    return Err(TrySendError::Disconnected(()));
                }
                Err(TrySendError::Corrupted(_)) if sent == 0 => {
                    return Err(TrySendError::Corrupted(()));
                }
                Err(_) => break,
            }
        }
        if sent > 0 {
            self.ring.header().not_empty.notify_all();
        }
        Ok(sent)
    }

    /// The check a blocking send runs while it waits, for a `try_send` that found the
    /// queue full (at most every 20 ms per handle): free slots held by dead claimants,
    /// notice dead receivers. Returns whether it ran.
    #[cold]
    #[inline(never)]
    fn check_when_full(&self) -> bool {
        if !self.check.due() {
            return false;
        }
        RawSender::receivers_alive(self);
        true
    }

    /// Claims the next free position and writes `value`, without notifying consumers.
    #[inline]
    fn push<P: Fill<T>>(&self, value: P) -> Result<(), TrySendError<P>> {
        let pos = match self.claim_for_send() {
            Ok(pos) => pos,
            Err(e) => return Err(e.map(|()| value)),
        };
        let ring = &*self.ring;
        let slot = ring.slot(pos);
        // A `fill` that unwinds must not leave the slot claimed: skip it.
        let abandon = Abandon { ring, pos };
        // SAFETY: our claim gives us this slot exclusively until we publish it.
        slot.value.with_mut(|p| value.fill(unsafe { &mut *p }));
        std::mem::forget(abandon);
        slot.finish(pos.wrapping_add(1));
        Ok(())
    }

    /// Claims the next free position for the calling thread and moves `tail` past it;
    /// returns the position, whose slot the caller must fill and publish (or abandon).
    /// When the queue is full, runs [`check_when_full`](Self::check_when_full) and looks
    /// once more.
    #[inline]
    fn claim_for_send(&self) -> Result<u64, TrySendError<()>> {
        let ring = &*self.ring;
        let h = ring.header();
        if h.senders.foreign() {
            peers::refuse_foreign("channel");
        }
        if h.corrupted.load(Ordering::Relaxed) != 0 {
            return Err(TrySendError::Corrupted(()));
        }
        if !h.receivers.any_handles() {
            return Err(TrySendError::Disconnected(()));
        }
        let cap = ring.capacity();
        let me = Claimant::me();
        let mut confused = 0;
        let mut checked = false;
        loop {
            let pos = h.tail.load(Ordering::Acquire);
            let slot = ring.slot(pos);
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp == pos {
                if slot.try_claim(pos, pos, me, false) {
                    help_past(&h.tail, pos);
                    return Ok(pos);
                }
                continue;
            }
            if stamp == pos.wrapping_add(1) || stamp == pos.wrapping_add(cap) || claims(stamp, pos)
            {
                // Someone claimed (and maybe filled, or even consumed, or a repair freed)
                // `pos` but `tail` was not advanced yet: help.
                help_past(&h.tail, pos);
                continue;
            }
            let prev = pos.wrapping_sub(cap);
            if stamp == prev.wrapping_add(1) || claims(stamp, prev) {
                // Last lap's message is still there (or being read).
                if h.tail.load(Ordering::Acquire) != pos {
                    continue;
                }
                if stamp == prev.wrapping_add(1)
                    && ahead(h.head.load(Ordering::Acquire), prev)
                    && slot.stamp.load(Ordering::Acquire) == stamp
                {
                    // `head` passed `prev` only after a consumer claimed it, yet its
                    // message is still waiting: `head` was scribbled over.
                    h.mark_corrupted(BAD_HEAD);
                    return Err(TrySendError::Corrupted(()));
                }
                if !checked && self.check_when_full() {
                    checked = true;
                    if !h.receivers.any_handles() {
                        return Err(TrySendError::Disconnected(()));
                    }
                    continue;
                }
                return Err(TrySendError::Full(()));
            }
            // With `tail` at `pos` before and after (it only grows), the stamp we read lies
            // between the two, and every state a sound ring can show there is handled
            // above: this one is impossible.
            if h.tail.load(Ordering::Acquire) == pos {
                confused += 1;
                if confused > CONFUSION_LIMIT {
                    h.mark_corrupted(BAD_STAMP);
                    return Err(TrySendError::Corrupted(()));
                }
                crate::loom_switch::spin_hint();
            }
        }
    }

    /// Crash-test hook: claims the next position (waiting while the queue is full), then
    /// calls `stall` before writing and publishing `value`, so a test can kill (or stop)
    /// a producer at exactly that point. The claim is `push`'s own.
    ///
    /// # Panics
    ///
    /// If the queue is disconnected or corrupted.
    #[cfg(any(test, feature = "test-hooks"))]
    #[doc(hidden)]
    pub fn __send_stalled_after_claim(&self, value: T, stall: impl FnOnce()) {
        let pos = loop {
            match self.claim_for_send() {
                Ok(pos) => break pos,
                Err(TrySendError::Full(())) => std::thread::yield_now(),
                Err(e) => panic!("__send_stalled_after_claim: {e}"),
            }
        };
        stall();
        let slot = self.ring.slot(pos);
        // SAFETY: claimed above, as in `push`.
        slot.value.with_mut(|p| unsafe { (*p).write(value) });
        slot.finish(pos.wrapping_add(1));
        self.ring.header().not_empty.notify_all();
    }

    /// Test hook: claims the next position for thread `tid` with start time `start`,
    /// exactly as that thread's own claim would look (both words), and moves `tail` past
    /// it, as if that thread had claimed the slot and stalled.
    #[cfg(any(test, feature = "test-hooks"))]
    #[doc(hidden)]
    pub fn __plant_claim(&self, tid: u32, start: u64) {
        let h = self.ring.header();
        let pos = h.tail.load(Ordering::Acquire);
        assert!(
            self.ring
                .slot(pos)
                .try_claim(pos, pos, Claimant::of(tid, start), false),
            "the next slot is free"
        );
        h.tail.store(pos.wrapping_add(1), Ordering::Release);
    }

    /// Test hook: overwrites the shared `tail` with `f(tail)`, as a scribbling peer would.
    #[cfg(any(test, feature = "test-hooks"))]
    #[doc(hidden)]
    pub fn __scribble_tail(&self, f: impl FnOnce(u64) -> u64) {
        let tail = &self.ring.header().tail;
        tail.store(f(tail.load(Ordering::Acquire)), Ordering::Release);
    }

    /// Test hook: how many waiters the receivers' eventcount has announced.
    #[cfg(any(test, feature = "test-hooks"))]
    #[doc(hidden)]
    pub fn __not_empty_waiters(&self) -> u32 {
        self.ring.header().not_empty.waiters()
    }

    /// Sends a message written in place: `fill` gets the claimed slot (holding an old
    /// message or zeros) as `&mut T`, and the message is published when it returns. No
    /// copy through the stack, however large `T` is. Waits while the queue is full.
    ///
    /// If `fill` panics, the position is skipped (consumers never see it, exactly as
    /// for a producer killed mid-write) and the panic goes on.
    ///
    /// ```
    /// let (tx, rx) = procshare::channel::<[u64; 32]>(64)?;
    /// tx.send_with(|slot| {
    ///     slot.fill(1);
    ///     slot[31] = 7;
    /// })?;
    /// assert_eq!(rx.recv_with(|msg| msg.iter().sum::<u64>())?, 38);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `Disconnected(())` if every receiver is gone, `Corrupted(())` if the queue is
    /// corrupted; `fill` was not called.
    pub fn send_with(&self, fill: impl FnOnce(&mut T)) -> Result<(), SendError<()>> {
        let mut fill = Some(InPlace(fill));
        let h = self.ring.header();
        block_on(
            &h.not_full,
            Deadline::NEVER,
            || match self.try_fill(&mut fill) {
                Err(TrySendError::Full(())) => Attempt::Blocked,
                r => Attempt::Ready(r),
            },
            || (!RawSender::receivers_alive(self)).then_some(Err(TrySendError::Disconnected(()))),
        )
        .unwrap_or(Err(TrySendError::Full(())))
        .map_err(|e| match e {
            TrySendError::Corrupted(()) => SendError::Corrupted(()),
            _ => SendError::Disconnected(()),
        })
    }

    /// [`send_with`](Sender::send_with) if there is room now; otherwise `fill` is not
    /// called.
    ///
    /// # Errors
    ///
    /// `Full(())`, `Disconnected(())` or `Corrupted(())`.
    pub fn try_send_with(&self, fill: impl FnOnce(&mut T)) -> Result<(), TrySendError<()>> {
        self.try_fill(&mut Some(InPlace(fill)))
    }

    /// One attempt to send `*fill` (taken only if a slot was claimed).
    fn try_fill<F: FnOnce(&mut T)>(
        &self,
        fill: &mut Option<InPlace<F>>,
    ) -> Result<(), TrySendError<()>> {
        let f = fill.take().expect("not sent yet");
        match self.push(f) {
            Ok(()) => {
                self.ring.header().not_empty.notify_all();
                Ok(())
            }
            Err(e) => Err(e.map(|f| *fill = Some(f))),
        }
    }

    sender_api!();
}

impl<T: ShmSafe + Copy + Send> RawSender<T> for Sender<T> {
    #[inline]
    fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        self.push(ByValue(value))
            .map_err(|e| e.map(|ByValue(v)| v))?;
        self.ring.header().not_empty.notify_all();
        Ok(())
    }

    #[inline]
    fn try_send_ref(&self, value: &T) -> Result<(), TrySendError<()>> {
        self.push(InPlace(|slot: &mut T| *slot = *value))
            .map_err(|e| e.map(|_| ()))?;
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
    fn new(ring: Arc<Ring<T>>) -> Receiver<T> {
        Receiver {
            ring,
            check: CheckClock::new(),
        }
    }

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

    /// The check a blocking receive runs while it waits, for a `try_recv` that found the
    /// queue empty (at most every 20 ms per handle): skip slots held by dead claimants,
    /// notice dead senders. Returns whether it ran.
    #[cold]
    #[inline(never)]
    fn check_when_empty(&self) -> bool {
        if !self.check.due() {
            return false;
        }
        RawReceiver::senders_alive(self);
        true
    }

    /// Claims the next published position and copies its message out, without notifying.
    /// When the queue is empty, runs [`check_when_empty`](Self::check_when_empty) and
    /// looks once more.
    #[inline]
    fn pop(&self) -> Result<T, TryRecvError> {
        self.pop_with(|v| *v)
    }

    /// [`pop`](Self::pop), lending the message in place to `read` (which runs once, on
    /// success only).
    #[inline]
    fn pop_with<R>(&self, read: impl FnOnce(&T) -> R) -> Result<R, TryRecvError> {
        let pos = self.claim_for_recv()?;
        let ring = &*self.ring;
        // Frees the slot when `read` returns or unwinds (the message then counts as
        // received).
        let _free = Free { ring, pos };
        // SAFETY: the stamp said a producer published a T here (its release store is what
        // our acquire CAS read), and our claim keeps producers away until we free the slot.
        Ok(ring
            .slot(pos)
            .value
            .with(|p| read(unsafe { (*p).assume_init_ref() })))
    }

    /// Claims the next published position for the calling thread and moves `head` past
    /// it; returns the position, whose message the caller must read and free. When the
    /// queue is empty, runs [`check_when_empty`](Self::check_when_empty) and looks once
    /// more.
    #[inline]
    fn claim_for_recv(&self) -> Result<u64, TryRecvError> {
        let ring = &*self.ring;
        let h = ring.header();
        if h.senders.foreign() {
            peers::refuse_foreign("channel");
        }
        if let Some(why) = ring.corruption() {
            return Err(TryRecvError::Corrupted(why));
        }
        let cap = ring.capacity();
        let me = Claimant::me();
        let mut confused = 0;
        let mut checked = false;
        loop {
            let pos = h.head.load(Ordering::Acquire);
            let slot = ring.slot(pos);
            let stamp = slot.stamp.load(Ordering::Acquire);
            if stamp == pos.wrapping_add(1) {
                if slot.try_claim(stamp, pos, me, true) {
                    help_past(&h.head, pos);
                    return Ok(pos);
                }
                continue;
            }
            if stamp == pos.wrapping_add(cap) || (claims(stamp, pos) && stamp & READING != 0) {
                // Someone consumed or is consuming `pos` but has not advanced `head`: help.
                help_past(&h.head, pos);
                continue;
            }
            if claims(stamp, pos) {
                // A producer is still writing `pos`.
                if h.head.load(Ordering::Acquire) == pos {
                    if !checked && self.check_when_empty() {
                        checked = true;
                        continue;
                    }
                    return Err(self.empty_or_disconnected());
                }
                continue;
            }
            if stamp == pos || claims(stamp, pos.wrapping_sub(cap)) {
                // Nothing claimed at `pos` yet (a slow consumer may still be copying out the
                // previous lap's message from its slot).
                if h.head.load(Ordering::Acquire) != pos {
                    continue;
                }
                if ahead(h.tail.load(Ordering::Acquire), pos)
                    && slot.stamp.load(Ordering::Acquire) == stamp
                {
                    // `tail` passed `pos` only after someone claimed it, and a claimed
                    // stamp never returns to these states: `tail` was scribbled over.
                    h.mark_corrupted(BAD_TAIL);
                    return Err(TryRecvError::Corrupted(describe_corruption(BAD_TAIL)));
                }
                if !checked && self.check_when_empty() {
                    checked = true;
                    continue;
                }
                return Err(self.empty_or_disconnected());
            }
            if h.head.load(Ordering::Acquire) == pos {
                confused += 1;
                if confused > CONFUSION_LIMIT {
                    h.mark_corrupted(BAD_STAMP);
                    return Err(TryRecvError::Corrupted(format!(
                        "slot stamp {stamp:#x} fits no state of position {pos}"
                    )));
                }
                crate::loom_switch::spin_hint();
            }
        }
    }

    /// Crash-test hook: claims the next published message (waiting while the queue is
    /// empty) and advances `head`, then calls `stall` before copying it out and freeing
    /// the slot. The claim is `pop`'s own.
    ///
    /// # Panics
    ///
    /// If the queue is disconnected or corrupted.
    #[cfg(any(test, feature = "test-hooks"))]
    #[doc(hidden)]
    pub fn __recv_stalled_after_claim(&self, stall: impl FnOnce()) -> T {
        let pos = loop {
            match self.claim_for_recv() {
                Ok(pos) => break pos,
                Err(TryRecvError::Empty) => std::thread::yield_now(),
                Err(e) => panic!("__recv_stalled_after_claim: {e}"),
            }
        };
        stall();
        let slot = self.ring.slot(pos);
        // SAFETY: claimed a published slot above, as in `pop_with`.
        let value = slot.value.with(|p| unsafe { (*p).assume_init_read() });
        slot.finish(pos.wrapping_add(self.ring.capacity()));
        self.ring.header().not_full.notify_all();
        value
    }

    /// Receives the next message in place: `f` reads it where it lies in the ring (no
    /// copy through the stack), and its slot is freed when `f` returns. Waits while the
    /// queue is empty.
    ///
    /// If `f` panics, the message counts as received and the panic goes on.
    ///
    /// # Errors
    ///
    /// `Disconnected` once the queue is empty and every sender is gone, `Corrupted`.
    pub fn recv_with<R, F: FnOnce(&T) -> R>(&self, f: F) -> Result<R, RecvError> {
        let mut f = Some(f);
        let h = self.ring.header();
        let attempt = |f: &mut Option<F>| {
            let r = self.pop_with(|v| (f.take().expect("called once"))(v));
            if r.is_ok() {
                h.not_full.notify_all();
            }
            r
        };
        let f = std::cell::RefCell::new(&mut f);
        block_on(
            &h.not_empty,
            Deadline::NEVER,
            || match attempt(&mut f.borrow_mut()) {
                Err(TryRecvError::Empty) => Attempt::Blocked,
                r => Attempt::Ready(r),
            },
            || {
                if RawReceiver::senders_alive(self) {
                    return None;
                }
                // Every sender is gone, but one may have sent just before going.
                Some(attempt(&mut f.borrow_mut()))
            },
        )
        .unwrap_or(Err(TryRecvError::Empty))
        .map_err(|e| match e {
            TryRecvError::Corrupted(w) => RecvError::Corrupted(w),
            _ => RecvError::Disconnected,
        })
    }

    /// [`recv_with`](Receiver::recv_with) if a message is ready now; otherwise `f` is not
    /// called.
    ///
    /// # Errors
    ///
    /// `Empty`, `Disconnected` or `Corrupted`.
    pub fn try_recv_with<R>(&self, f: impl FnOnce(&T) -> R) -> Result<R, TryRecvError> {
        let r = self.pop_with(f)?;
        self.ring.header().not_full.notify_all();
        Ok(r)
    }

    /// Waits, without taking anything, until a message looks ready at the head, `give_up`
    /// returns true, or `timeout` passes; returns whether a message looked ready. For a
    /// watcher thread that only tells the real consumer to come (the pool's waker
    /// thread). Runs no dead-peer check; a claim by a dead producer reads as "not ready".
    pub(crate) fn wait_not_empty(
        &self,
        timeout: std::time::Duration,
        give_up: impl Fn() -> bool,
    ) -> bool {
        let h = self.ring.header();
        let ready = || {
            let pos = h.head.load(Ordering::Acquire);
            self.ring.slot(pos).stamp.load(Ordering::Acquire) == pos.wrapping_add(1)
        };
        block_on(
            &h.not_empty,
            Deadline::after(timeout),
            || {
                if ready() {
                    Attempt::Ready(true)
                } else if give_up() {
                    Attempt::Ready(false)
                } else {
                    Attempt::Blocked
                }
            },
            || None,
        )
        .unwrap_or(false)
    }

    /// Wakes every thread sleeping in a receive or [`wait_not_empty`](Self::wait_not_empty)
    /// on this queue (they re-check their condition), e.g. after setting a `give_up` flag.
    pub(crate) fn wake_receivers(&self) {
        self.ring.header().not_empty.notify_all();
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

    #[inline]
    fn try_recv_into(&self, out: &mut MaybeUninit<T>) -> Result<(), TryRecvError> {
        self.pop_with(|m| {
            out.write(*m);
        })?;
        self.ring.header().not_full.notify_all();
        Ok(())
    }

    fn not_empty(&self) -> &EventCount {
        &self.ring.header().not_empty
    }

    fn senders_alive(&self) -> bool {
        self.ring.repair();
        self.ring.header().senders.any_alive()
    }
}

// ---- Handing an end to a spawned child (`process::handles`) ---------------------------

impl<T: ShmSafe + Copy + Send> Sender<T> {
    /// See [`RingMem::exported`].
    pub(crate) fn exported(&self) -> Option<super::ring::Exported<'_>> {
        self.ring.exported(&self.ring.header().senders)
    }

    /// A sender on the channel whose segment arrived as `fd`, counted by `count` (which
    /// takes over the loan the parent made) instead of [`peers::attach`].
    pub(crate) fn adopt(
        fd: std::os::fd::OwnedFd,
        count: impl FnOnce(&super::peers::PeerTable) -> Result<()>,
    ) -> Result<Sender<T>> {
        let ring = Arc::new(Ring::<T>::adopt("channel", 2, fd)?);
        count(&ring.header().senders)?;
        Ok(Sender::new(ring))
    }
}

impl<T: ShmSafe + Copy + Send> Receiver<T> {
    /// See [`RingMem::exported`].
    pub(crate) fn exported(&self) -> Option<super::ring::Exported<'_>> {
        self.ring.exported(&self.ring.header().receivers)
    }

    /// As [`Sender::adopt`].
    pub(crate) fn adopt(
        fd: std::os::fd::OwnedFd,
        count: impl FnOnce(&super::peers::PeerTable) -> Result<()>,
    ) -> Result<Receiver<T>> {
        let ring = Arc::new(Ring::<T>::adopt("channel", 2, fd)?);
        count(&ring.header().receivers)?;
        Ok(Receiver::new(ring))
    }
}

ring_handles!("channel", clone);

impl<T: ShmSafe + Copy + Send> Drop for Sender<T> {
    fn drop(&mut self) {
        self.ring.header().sender_dropped();
    }
}

impl<T: ShmSafe + Copy + Send> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.ring.header().receiver_dropped();
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
        for i in 0..if cfg!(miri) { 40 } else { 1000 } {
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
        assert!(matches!(tx.send(5), Err(SendError::Disconnected(5))));
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
    fn in_place_send_and_receive() {
        let (tx, rx) = heap_channel::<[u32; 4]>(2).unwrap();
        tx.send_with(|slot| {
            assert_eq!(*slot, [0; 4], "a fresh slot holds zeros");
            slot[1] = 5;
        })
        .unwrap();
        tx.try_send_with(|slot| *slot = [6; 4]).unwrap();
        assert!(matches!(
            tx.try_send_with(|_| unreachable!("full: not called")),
            Err(TrySendError::Full(()))
        ));
        assert_eq!(rx.recv_with(|m| m[1]), Ok(5));
        assert_eq!(rx.try_recv_with(|m| m[3]), Ok(6));
        assert!(matches!(
            rx.try_recv_with(|m| m[0]),
            Err(TryRecvError::Empty)
        ));
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "unwinding through the ring's closures is slow under Miri"
    )]
    fn a_panicking_fill_is_skipped_and_a_panicking_reader_consumes() {
        use std::panic::{AssertUnwindSafe, catch_unwind};
        let (tx, rx) = heap_channel::<u64>(4).unwrap();
        tx.send(1).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            tx.send_with(|slot| {
                *slot = 99;
                panic!("fill fails");
            })
        }));
        assert!(r.is_err());
        tx.send(2).unwrap();
        // The abandoned position is skipped: consumers see 1 then 2, never 99.
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1, 2]);
        // Every slot is usable again, over several laps.
        for lap in 0..3 {
            for i in 0..4 {
                tx.try_send(lap * 10 + i).unwrap();
            }
            let r = catch_unwind(AssertUnwindSafe(|| {
                rx.recv_with(|_| panic!("reader fails"))
            }));
            assert!(r.is_err());
            assert_eq!(
                rx.try_iter().collect::<Vec<_>>(),
                [lap * 10 + 1, lap * 10 + 2, lap * 10 + 3],
                "the message whose reader panicked counts as received"
            );
        }
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

    #[test]
    fn a_scribbled_tail_is_corruption_for_everyone_from_then_on() {
        for scribble in [|_| 1000u64, |t: u64| t + 5] {
            let (tx, rx) = heap_channel::<u32>(8).unwrap();
            tx.send(1).unwrap();
            tx.send(2).unwrap();
            tx.__scribble_tail(scribble);
            // A sender may or may not notice on its own (a position a few ahead looks free);
            // the receiver notices at the latest where `tail` claims messages that never were.
            let _ = tx.try_send(3);
            let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            assert!([&[][..], &[1], &[1, 2]].contains(&&got[..]), "{got:?}");
            assert!(matches!(rx.try_recv(), Err(TryRecvError::Corrupted(_))));
            assert!(matches!(tx.try_send(4), Err(TrySendError::Corrupted(4))));
            assert!(matches!(tx.send(5), Err(SendError::Corrupted(5))));
            assert!(matches!(
                rx.recv_timeout(std::time::Duration::from_secs(5)),
                Err(RecvTimeoutError::Corrupted(_))
            ));
            let other = rx.clone();
            assert!(matches!(other.try_recv(), Err(TryRecvError::Corrupted(_))));
        }
    }

    #[test]
    fn claimant_words_encode_what_the_checker_reads() {
        let c = Claimant::of(0x3f_ffff, (0xab_cdef_1234 << 8) | 0x5a);
        let stamp = claim(7, c.tag, true);
        assert!(claims(stamp, 7) && stamp & READING != 0);
        assert_eq!(
            (stamp >> TAG_SHIFT) & ((1 << owner::TID_BITS) - 1),
            0x3f_ffff
        );
        assert_eq!((stamp >> TAG_SHIFT) >> owner::TID_BITS & 0xff, 0x5a);
        assert_eq!(c.record >> owner::START_BITS, 0x3f_ffff);
        assert_eq!(c.record & 0xff, 0x5a);
    }

    #[test]
    #[cfg_attr(miri, ignore = "liveness reads /proc")]
    fn a_live_claimant_is_never_judged_dead() {
        let slot = new_slot::<u32>(0);
        let me = Claimant::me();
        assert!(slot.try_claim(0, 0, me, false));
        let stamp = slot.stamp.load(Ordering::SeqCst);
        assert_eq!(slot.claimant_is_dead(stamp), None, "with its full record");
        slot.claimant.store(0, Ordering::SeqCst);
        assert_eq!(
            slot.claimant_is_dead(stamp),
            None,
            "before its record is written"
        );
        let me_id = sys::current_thread();
        // The same thread id with a start time that agrees in 8 bits only: dead.
        slot.claimant.store(
            Claimant::of(me_id.tid, me_id.start ^ (1 << 9)).record,
            Ordering::SeqCst,
        );
        assert!(slot.claimant_is_dead(stamp).is_some());
    }
}
