//! What the Pod rings ([`spsc`](super::spsc) and [`channel`](super::mpmc)) share: where a
//! ring's header and slots live (a shared segment, or under loom and Miri the heap), the
//! header words both flavours have ([`RingHeader`]), how a ring's first two handles are
//! made, what dropping a handle does, the `Debug` and `Clone` impls of the handles, and
//! the helping compare-and-swap of the channel's positions.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use super::peers::{self, PeerTable};
use crate::error::{Error, Result};
use crate::loom_switch::{AtomicU64, Ordering};
use crate::shm::header::TypeTag;
use crate::shm::{Backing, Segment};
use crate::sync::eventcount::EventCount;

/// Pads and aligns a value to 128 bytes: two cache lines, because Intel's adjacent-line
/// prefetcher pulls lines in pairs, and a producer's and a consumer's hot words must never
/// share a pair.
#[repr(C, align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// A queue handle as `process::handles` hands it to a spawned child: the segment whose
/// descriptor travels, a reference keeping the mapping (and so `table`) alive until the
/// child's loan is bound, and the peer table the handle is counted in.
pub(crate) struct Exported<'a> {
    pub(crate) segment: &'a Segment,
    pub(crate) keep: Arc<dyn Any + Send + Sync>,
    pub(crate) table: &'a PeerTable,
}

/// The header of a Pod ring: the positions and eventcounts on cache lines of their own,
/// the flavour's own words `X`, and the peer tables of both ends with the corruption mark
/// between them.
///
/// | word | a SIGKILL can leave | repaired by |
/// |---|---|---|
/// | `tail` / `head` | see the flavour's table | see the flavour's table |
/// | eventcounts | a dead waiter's announcement | the next notify erases it (see `eventcount`) |
/// | peer tables | a dead process's handle count | `any_alive`, on every slow path |
/// | `corrupted` | — (set once, by a single compare-and-swap) | never: recreate the queue |
#[repr(C)]
pub(crate) struct RingHeader<X> {
    pub(crate) tail: CachePadded<AtomicU64>,
    pub(crate) head: CachePadded<AtomicU64>,
    pub(crate) not_empty: CachePadded<EventCount>,
    pub(crate) not_full: CachePadded<EventCount>,
    /// The flavour's own words.
    pub(crate) extra: X,
    pub(crate) senders: PeerTable,
    /// 0, or why the queue was found corrupted (a flavour's reason code); never cleared.
    /// Next to `receivers.total`, which every send reads anyway.
    pub(crate) corrupted: AtomicU64,
    pub(crate) receivers: PeerTable,
}

impl<X> RingHeader<X> {
    pub(crate) fn new(extra: X) -> RingHeader<X> {
        RingHeader {
            tail: CachePadded(AtomicU64::new(0)),
            head: CachePadded(AtomicU64::new(0)),
            not_empty: CachePadded(EventCount::new()),
            not_full: CachePadded(EventCount::new()),
            extra,
            // SAFETY: a peer table is plain atomics; all-zero is the empty table (the
            // creator's pid namespace is stamped once it is in place, by `endpoints`).
            senders: unsafe { std::mem::zeroed() },
            corrupted: AtomicU64::new(0),
            // SAFETY: as above.
            receivers: unsafe { std::mem::zeroed() },
        }
    }

    /// Marks the queue corrupted for `why` (non-zero; the first reason wins) and wakes
    /// every sleeper to see it.
    #[cold]
    pub(crate) fn mark_corrupted(&self, why: u64) {
        let _ = self
            .corrupted
            .compare_exchange(0, why, Ordering::SeqCst, Ordering::SeqCst);
        self.not_full.notify_all();
        self.not_empty.notify_all();
    }

    /// Counts one more sending handle of this process.
    ///
    /// # Errors
    ///
    /// As for `peers::attach`: the peer table is full.
    pub(crate) fn attach_sender(&self) -> Result<()> {
        peers::attach(&self.senders)
    }

    /// Counts one more receiving handle of this process.
    ///
    /// # Errors
    ///
    /// As for `peers::attach`.
    pub(crate) fn attach_receiver(&self) -> Result<()> {
        peers::attach(&self.receivers)
    }

    /// A sending handle is dropped: uncounted, and receivers asleep on an empty queue
    /// wake to see whether it is disconnected now.
    pub(crate) fn sender_dropped(&self) {
        peers::detach(&self.senders);
        self.not_empty.notify_all();
    }

    /// A receiving handle is dropped: uncounted, and senders asleep on a full queue wake.
    pub(crate) fn receiver_dropped(&self) {
        peers::detach(&self.receivers);
        self.not_full.notify_all();
    }
}

/// Moves `position` (a ring's `tail` or `head`) from `pos` to `pos + 1` unless someone
/// already did: the "helping" step any thread may take for a claim it sees finished or
/// under way at `pos`.
#[inline]
pub(crate) fn help_past(position: &AtomicU64, pos: u64) {
    let _ = position.compare_exchange(
        pos,
        pos.wrapping_add(1),
        Ordering::AcqRel,
        Ordering::Relaxed,
    );
}

/// The first two handles of a ring this process has just created: stamps its pid
/// namespace into both peer tables, counts one sender and one receiver, and builds them.
pub(crate) fn endpoints<X, S, Tx, Rx>(
    ring: RingMem<RingHeader<X>, S>,
    sender: impl FnOnce(Arc<RingMem<RingHeader<X>, S>>) -> Tx,
    receiver: impl FnOnce(Arc<RingMem<RingHeader<X>, S>>) -> Rx,
) -> Result<(Tx, Rx)> {
    let ring = Arc::new(ring);
    let h = ring.header();
    h.senders.stamp_creator();
    h.receivers.stamp_creator();
    h.attach_sender()?;
    let tx = sender(Arc::clone(&ring));
    // On an error here `tx` is dropped, which uncounts it again.
    ring.header().attach_receiver()?;
    Ok((tx, receiver(ring)))
}

/// The `Debug` impls of a flavour's `Sender` and `Receiver` (and, with `clone`, their
/// `Clone` impls, each counting the new handle in its peer table). Expects `ring:
/// Arc<Ring<T>>` fields and, for `clone`, `Sender::new`/`Receiver::new` taking the ring.
macro_rules! ring_handles {
    ($flavour:literal) => {
        impl<T: ShmSafe + Copy + Send> std::fmt::Debug for Sender<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(concat!($flavour, "::Sender"))
                    .field("capacity", &self.ring.capacity())
                    .finish_non_exhaustive()
            }
        }

        impl<T: ShmSafe + Copy + Send> std::fmt::Debug for Receiver<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(concat!($flavour, "::Receiver"))
                    .field("capacity", &self.ring.capacity())
                    .finish_non_exhaustive()
            }
        }
    };
    ($flavour:literal, clone) => {
        $crate::queue::ring::ring_handles!($flavour);

        impl<T: ShmSafe + Copy + Send> Clone for Sender<T> {
            /// Another producer handle.
            ///
            /// # Panics
            ///
            /// If 1024 other live processes already hold handles to this end (handles a
            /// process inherits by `fork` never fail: beyond 1024 processes they are
            /// counted without a slot, and this end then counts as connected for good:
            /// use timeouts).
            fn clone(&self) -> Self {
                self.ring.header().attach_sender().expect("attach a sender");
                Sender::new(std::sync::Arc::clone(&self.ring))
            }
        }

        impl<T: ShmSafe + Copy + Send> Clone for Receiver<T> {
            /// Another consumer handle.
            ///
            /// # Panics
            ///
            /// If 1024 other live processes already hold handles to this end (handles a
            /// process inherits by `fork` never fail: beyond 1024 processes they are
            /// counted without a slot, and this end then counts as connected for good:
            /// use timeouts).
            fn clone(&self) -> Self {
                self.ring
                    .header()
                    .attach_receiver()
                    .expect("attach a receiver");
                Receiver::new(std::sync::Arc::clone(&self.ring))
            }
        }
    };
}

pub(crate) use ring_handles;

/// A header `H` followed by `capacity` slots `S`, kept alive by `_owner`.
pub(crate) struct RingMem<H, S> {
    header: NonNull<H>,
    slots: NonNull<S>,
    /// Process-local and trusted: never re-read from shared memory.
    mask: u64,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: RingMem is crate-private and only used by the ring endpoints. It hands out `&H`
// and `&S`, whose cells those endpoints touch only under their ring protocol (a slot is
// written by one claimant at a time, published with release and read after acquire), and
// the endpoints require the message type to be `Send`.
unsafe impl<H, S> Send for RingMem<H, S> {}
// SAFETY: as above.
unsafe impl<H, S> Sync for RingMem<H, S> {}

fn slots_offset<H, S>() -> usize {
    size_of::<H>().next_multiple_of(align_of::<S>().max(128))
}

impl<H, S> RingMem<H, S> {
    /// A new anonymous shared ring. `capacity` is rounded up to a power of two.
    pub(crate) fn create(
        kind: &str,
        capacity: usize,
        header: impl FnOnce() -> H,
        slot: impl Fn(u64) -> S,
    ) -> Result<RingMem<H, S>> {
        Self::create_with_slots(kind, capacity, header, Some(slot))
    }

    /// As [`create`](RingMem::create), for slots whose initial value is all zero bytes:
    /// they are not written at all. The ring is always a fresh memfd, which reads as
    /// zeros, so writing zeros over it would only fault in every page of the ring up front
    /// (a page is otherwise first touched by the first message through it).
    ///
    /// # Safety
    ///
    /// All-zero bytes must be the value each slot is to start with (a valid `S`).
    pub(crate) unsafe fn create_zeroed(
        kind: &str,
        capacity: usize,
        header: impl FnOnce() -> H,
    ) -> Result<RingMem<H, S>> {
        Self::create_with_slots(kind, capacity, header, None::<fn(u64) -> S>)
    }

    /// [`create`](RingMem::create), writing each slot only if `slot` is given (else the
    /// fresh memfd's zeros stay, see [`create_zeroed`](RingMem::create_zeroed)).
    fn create_with_slots(
        kind: &str,
        capacity: usize,
        header: impl FnOnce() -> H,
        slot: Option<impl Fn(u64) -> S>,
    ) -> Result<RingMem<H, S>> {
        let capacity = checked_capacity(capacity)?;
        let bytes = capacity
            .checked_mul(size_of::<S>())
            .and_then(|n| n.checked_add(slots_offset::<H, S>()))
            .ok_or_else(|| Error::InvalidArgument {
                what: format!("a ring of {capacity} slots does not fit in memory"),
            })?;
        let tag = TypeTag::of::<(H, S)>(kind);
        let segment =
            Segment::create_with(Backing::Anonymous, &tag, capacity as u64, bytes, |data| {
                // SAFETY: the fresh data area is `bytes` long, aligned for H (and for S at
                // `slots_offset`, a multiple of S's alignment), and nobody else sees it yet.
                unsafe {
                    data.cast::<H>().as_ptr().write(header());
                    let slots = data.as_ptr().add(slots_offset::<H, S>()).cast::<S>();
                    if let Some(slot) = slot {
                        for i in 0..capacity {
                            slots.add(i).write(slot(i as u64));
                        }
                    }
                }
            })?;
        let data = segment.data_ptr();
        Ok(RingMem {
            header: data.cast(),
            // SAFETY: inside the segment, as laid out above.
            slots: unsafe { data.add(slots_offset::<H, S>()) }.cast(),
            mask: capacity as u64 - 1,
            _owner: Arc::new(segment),
        })
    }

    /// A ring received as a segment descriptor (a queue handle in a `Process::spawn`
    /// argument): the header must name the same ring type (`kind`, `H`, `S`) as
    /// [`create`](RingMem::create) wrote, and the recorded capacity must be a power of two
    /// of at least `min_capacity` whose slots fit in the segment. The ring's contents are
    /// as untrusted as ever; only the layout is fixed here, process-locally.
    pub(crate) fn adopt(
        kind: &str,
        min_capacity: u64,
        fd: std::os::fd::OwnedFd,
    ) -> Result<RingMem<H, S>> {
        let tag = TypeTag::of::<(H, S)>(kind);
        let segment = Segment::from_fd_tagged(fd, &tag)?;
        let capacity = segment.elements();
        let needed = usize::try_from(capacity)
            .ok()
            .and_then(|c| c.checked_mul(size_of::<S>()))
            .and_then(|n| n.checked_add(slots_offset::<H, S>()));
        if !capacity.is_power_of_two()
            || capacity < min_capacity
            || capacity > 1 << 40
            || needed != Some(segment.len())
        {
            return Err(Error::Corrupted {
                what: format!(
                    "a {kind} segment received as a descriptor records {capacity} slots in \
                     {} bytes, a layout this build never makes",
                    segment.len()
                ),
            });
        }
        let data = segment.data_ptr();
        Ok(RingMem {
            header: data.cast(),
            // SAFETY: `slots_offset + capacity * size_of::<S>()` is the data length
            // (checked above), so the slots lie inside the mapping, aligned as `create`
            // placed them (the header's alignment was checked by the tag).
            slots: unsafe { data.add(slots_offset::<H, S>()) }.cast(),
            mask: capacity - 1,
            _owner: Arc::new(segment),
        })
    }

    /// What handing a handle on this ring to a spawned child needs (`None` for a heap
    /// ring): the segment, a reference that keeps it mapped, and the handle's peer table.
    pub(crate) fn exported<'a>(&'a self, table: &'a PeerTable) -> Option<Exported<'a>> {
        let segment = self._owner.downcast_ref::<Segment>()?;
        Some(Exported {
            segment,
            keep: Arc::clone(&self._owner),
            table,
        })
    }

    /// A heap-backed ring, for the loom model checker and Miri (which have no fork or
    /// memfd): the same algorithms on ordinary memory.
    #[cfg(any(test, loom))]
    pub(crate) fn heap(
        capacity: usize,
        header: impl FnOnce() -> H,
        slot: impl Fn(u64) -> S,
    ) -> RingMem<H, S>
    where
        H: 'static,
        S: 'static,
    {
        /// Owns the heap allocations as raw pointers: holding them as `Box`es and moving
        /// those would assert uniqueness and invalidate the pointers the ring uses (Miri's
        /// Stacked Borrows flags exactly that).
        struct HeapOwner<H, S> {
            header: *mut H,
            slots: *mut [S],
        }
        impl<H, S> Drop for HeapOwner<H, S> {
            fn drop(&mut self) {
                // SAFETY: both came from Box::into_raw below and are freed once, here,
                // when the last RingMem sharing this owner is gone.
                unsafe {
                    drop(Box::from_raw(self.header));
                    drop(Box::from_raw(self.slots));
                }
            }
        }
        // SAFETY: the owner only frees the memory; RingMem's own rules govern access to it.
        unsafe impl<H, S> Send for HeapOwner<H, S> {}
        // SAFETY: as above.
        unsafe impl<H, S> Sync for HeapOwner<H, S> {}

        let capacity = checked_capacity(capacity).expect("capacity");
        let header = Box::into_raw(Box::new(header()));
        let slots = Box::into_raw((0..capacity as u64).map(slot).collect::<Box<[S]>>());
        RingMem {
            // SAFETY: Box::into_raw never returns null.
            header: unsafe { NonNull::new_unchecked(header) },
            // SAFETY: as above; the slice has `capacity` >= 1 elements.
            slots: unsafe { NonNull::new_unchecked(slots.cast::<S>()) },
            mask: capacity as u64 - 1,
            _owner: Arc::new(HeapOwner { header, slots }),
        }
    }

    #[inline]
    pub(crate) fn header(&self) -> &H {
        // SAFETY: written at creation, alive as long as `_owner`.
        unsafe { self.header.as_ref() }
    }

    /// The slot for position `pos` (positions grow forever; the index wraps).
    #[inline]
    pub(crate) fn slot(&self, pos: u64) -> &S {
        // SAFETY: `pos & mask` < capacity, and all capacity slots were written at creation.
        unsafe { self.slots.add((pos & self.mask) as usize).as_ref() }
    }

    /// The first slot, for rings whose slots are bytes addressed as ranges.
    #[inline]
    pub(crate) fn slots_ptr(&self) -> *mut S {
        self.slots.as_ptr()
    }

    #[inline]
    pub(crate) fn capacity(&self) -> u64 {
        self.mask + 1
    }
}

fn checked_capacity(capacity: usize) -> Result<usize> {
    if capacity == 0 || capacity > 1 << 40 {
        return Err(Error::InvalidArgument {
            what: format!("queue capacity {capacity}: use 1 to 2^40 slots"),
        });
    }
    Ok(capacity.next_power_of_two())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `create_zeroed` writes the header and leaves the slots to the fresh memfd, which
    /// reads as zeros (the assumption it rests on).
    #[test]
    #[cfg_attr(miri, ignore = "shared memory (memfd)")]
    fn a_zeroed_ring_reads_as_zeros() {
        // SAFETY: 0 is a valid u64.
        let ring = unsafe { RingMem::<u64, u64>::create_zeroed("test", 1 << 16, || 7) }.unwrap();
        assert_eq!(*ring.header(), 7);
        for pos in 0..ring.capacity() {
            // SAFETY: within the ring's capacity; nobody writes it.
            let slot = unsafe { *ring.slots_ptr().add(pos as usize) };
            assert_eq!(slot, 0, "slot {pos}");
        }
    }
}
