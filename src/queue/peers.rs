//! Which processes hold handles to one end of a queue, so that the other end can tell
//! "every sender dropped or died" (disconnected) from "senders are just quiet".
//!
//! Each end of a ring has a [`PeerTable`] in shared memory: one slot per process, holding
//! the process's identity (pid and start time) and how many handles it holds. A process
//! that dies keeps its slot's count, but its identity no longer matches a live process, so
//! [`PeerTable::any_alive`] reclaims the slot.
//!
//! `fork` copies every handle into the child without running any constructor, so the
//! counts must follow: fork handlers registered once per process walk a process-local
//! registry of the tables this process holds handles in. Before the fork the parent lends
//! the child its counts (adds them to its own slot); the child then registers its own slot
//! and takes the loan back from the parent's. So there is no instant at which a handle the
//! child holds is counted nowhere, whichever process runs first. If `fork` fails, the loan
//! stays on the parent's slot until the parent exits: the other end then sees a live peer a
//! little longer than it should, never a dead one as alive forever.

use std::cell::UnsafeCell;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::liveness;
use crate::sys;

/// Processes that can hold handles to one end at the same time.
pub(crate) const PEER_SLOTS: usize = 64;

#[repr(C)]
struct PeerSlot {
    /// [`liveness::process_identity`] of the holder, 0 when free.
    owner: AtomicU64,
    handles: AtomicU64,
}

/// The holders of one end of a queue. All-zero is a valid empty table.
#[repr(C)]
pub(crate) struct PeerTable {
    /// Sum of all slots' handles, so "is anyone attached" is one load.
    total: AtomicU64,
    slots: [PeerSlot; PEER_SLOTS],
}

impl PeerTable {
    /// Counts `n` more handles for process `me`.
    fn add(&self, me: u64, n: u64) -> bool {
        for slot in &self.slots {
            if slot.owner.load(Ordering::Acquire) == me {
                self.total.fetch_add(n, Ordering::SeqCst);
                slot.handles.fetch_add(n, Ordering::SeqCst);
                return true;
            }
        }
        for slot in &self.slots {
            if slot
                .owner
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.total.fetch_add(n, Ordering::SeqCst);
                slot.handles.fetch_add(n, Ordering::SeqCst);
                return true;
            }
        }
        false
    }

    /// Uncounts `n` handles of process `me`.
    fn remove(&self, me: u64, n: u64) {
        for slot in &self.slots {
            if slot.owner.load(Ordering::Acquire) == me {
                // Saturate: a corrupted count must not wrap to "many handles".
                let before = slot
                    .handles
                    .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |h| {
                        Some(h.saturating_sub(n))
                    })
                    .unwrap_or(0);
                self.uncount(before.min(n));
                return;
            }
        }
    }

    fn uncount(&self, n: u64) {
        let _ = self
            .total
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(n))
            });
    }

    /// Whether any process (this one included) holds a handle, without asking whether the
    /// holders are alive. One load: cheap enough for every failed receive.
    #[inline]
    pub(crate) fn any_handles(&self) -> bool {
        self.total.load(Ordering::SeqCst) != 0
    }

    /// Whether handles exist beyond a single one in this process: in another process, or
    /// several here. Call after [`any_alive`](Self::any_alive) has reclaimed dead slots.
    pub(crate) fn handles_beyond_one_of_mine(&self) -> bool {
        let me = current_process();
        let mine: u64 = self
            .slots
            .iter()
            .filter(|s| s.owner.load(Ordering::Acquire) == me)
            .map(|s| s.handles.load(Ordering::SeqCst))
            .sum();
        mine > 1 || self.total.load(Ordering::SeqCst) > mine
    }

    /// Whether any live process holds a handle; frees the slots of dead holders.
    pub(crate) fn any_alive(&self) -> bool {
        let me = current_process();
        let mut alive = false;
        for slot in &self.slots {
            let owner = slot.owner.load(Ordering::Acquire);
            if owner == 0 || slot.handles.load(Ordering::SeqCst) == 0 {
                continue;
            }
            if owner == me || !liveness::process_is_dead(owner) {
                alive = true;
                continue;
            }
            // A dead process cannot touch its slot any more: zero the count, then free it.
            let dead = slot.handles.swap(0, Ordering::SeqCst);
            self.uncount(dead);
            let _ = slot
                .owner
                .compare_exchange(owner, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
        alive
    }
}

/// This process's identity, cached; the fork child handler replaces it.
static PROCESS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn current_process() -> u64 {
    match PROCESS.load(Ordering::Relaxed) {
        0 => {
            let (pid, start) = sys::current_process_noalloc();
            let id = liveness::process_identity(pid, start);
            PROCESS.store(id, Ordering::Relaxed);
            id
        }
        id => id,
    }
}

/// Tables this process holds handles in, with how many. Guarded by a spin lock (not a
/// std Mutex) because the fork handlers take it in `prepare` and release it in `parent`
/// and `child`, across the fork, which a guard object cannot express.
struct Registry {
    locked: AtomicBool,
    entries: UnsafeCell<Vec<(usize, u64)>>,
}

// SAFETY: `entries` is only touched with `locked` held (see `with`).
unsafe impl Sync for Registry {}

static REGISTRY: Registry = Registry {
    locked: AtomicBool::new(false),
    entries: UnsafeCell::new(Vec::new()),
};
/// The parent's identity at `prepare` time, for the child to repay the loan.
static FORKING_PARENT: AtomicU64 = AtomicU64::new(0);
static HANDLERS: Once = Once::new();

impl Registry {
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

    fn with<R>(&self, f: impl FnOnce(&mut Vec<(usize, u64)>) -> R) -> R {
        self.lock();
        // SAFETY: we hold the registry lock, so no other reference to `entries` exists.
        let r = f(unsafe { &mut *self.entries.get() });
        self.unlock();
        r
    }
}

extern "C" fn prepare_fork() {
    REGISTRY.lock();
    let me = current_process();
    FORKING_PARENT.store(me, Ordering::Relaxed);
    // SAFETY: the registry lock is held until `after_fork_*` releases it.
    for &(table, n) in unsafe { &*REGISTRY.entries.get() } {
        // SAFETY: an entry exists only while this process holds a handle keeping the
        // table's mapping alive, and entries cannot change while we hold the lock.
        let table = unsafe { &*(table as *const PeerTable) };
        table.add(me, n);
    }
}

extern "C" fn after_fork_parent() {
    REGISTRY.unlock();
}

extern "C" fn after_fork_child() {
    let (pid, start) = sys::current_process_noalloc();
    let me = liveness::process_identity(pid, start);
    PROCESS.store(me, Ordering::Relaxed);
    let parent = FORKING_PARENT.load(Ordering::Relaxed);
    // SAFETY: the child is single-threaded and inherited the held registry lock.
    for &(table, n) in unsafe { &*REGISTRY.entries.get() } {
        // SAFETY: as in `prepare_fork`; the mappings are inherited by the child.
        let table = unsafe { &*(table as *const PeerTable) };
        table.add(me, n);
        table.remove(parent, n);
    }
    REGISTRY.unlock();
}

/// Counts one more handle of this process on `table`.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if [`PEER_SLOTS`] other processes already hold handles.
pub(crate) fn attach(table: &PeerTable) -> Result<()> {
    HANDLERS.call_once(|| {
        sys::register_fork_handlers(prepare_fork, after_fork_parent, after_fork_child)
    });
    let me = current_process();
    let key = table as *const PeerTable as usize;
    REGISTRY.with(|entries| {
        if !table.add(me, 1) {
            // Full: free the slots of dead processes and try once more.
            table.any_alive();
            if !table.add(me, 1) {
                return Err(Error::InvalidArgument {
                    what: format!(
                        "more than {PEER_SLOTS} live processes hold handles to one end of this \
                         queue: share fewer handles, or use more queues"
                    ),
                });
            }
        }
        match entries.iter_mut().find(|(t, _)| *t == key) {
            Some((_, n)) => *n += 1,
            None => entries.push((key, 1)),
        }
        Ok(())
    })
}

/// Uncounts one handle of this process on `table`.
pub(crate) fn detach(table: &PeerTable) {
    let me = current_process();
    let key = table as *const PeerTable as usize;
    REGISTRY.with(|entries| {
        table.remove(me, 1);
        if let Some(i) = entries.iter().position(|(t, _)| *t == key) {
            entries[i].1 -= 1;
            if entries[i].1 == 0 {
                entries.swap_remove(i);
            }
        }
    });
}
