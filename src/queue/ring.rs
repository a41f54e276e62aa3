//! Where a ring's header and slots live: a shared segment, or (under loom) the heap.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use super::peers::PeerTable;
use crate::error::{Error, Result};
use crate::shm::header::TypeTag;
use crate::shm::{Backing, Segment};

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
                    for i in 0..capacity {
                        slots.add(i).write(slot(i as u64));
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
