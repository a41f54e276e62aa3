//! Which processes hold handles to one end of a queue, so that the other end can tell
//! "every sender dropped or died" (disconnected) from "senders are just quiet".
//!
//! # The table
//!
//! Each end of a ring has a [`PeerTable`] in shared memory: a few counters and
//! [`PEER_SLOTS`] slots, each naming one holder and how many handles it holds. All-zero
//! is the empty table.
//!
//! ```text
//! PeerTable   total: u64      sum of every slot's handles + overflow (may over-count, never under)
//!             overflow: u64   handles of processes that got no slot (table full at a fork)
//!             used: u64       one past the highest slot ever claimed; scans stop there
//!             namespace: u64  the creator's pid namespace (nsfs inode, 0 = unknown), written
//!                             once at creation; see "Pid namespaces" below
//!             slots[1024]     16 bytes each:
//! PeerSlot    owner: u64      who the handles belong to, see below
//!             handles: u32    how many
//!             mapped_at: u32  CLOCK_MONOTONIC ms (wrapping, never 0) of the last proof that
//!                             the owner still maps this table; a cache, 0 = none
//!
//! owner       63 62  61..0
//!              0  0  0                 free
//!              0  0  identity          process `identity` (pid << 40 | start time) holds them
//!              1  0  lender identity   a fork loan: handles the lender's child got by fork,
//!                                      the child not known yet
//!              0  1  child identity    a fork loan bound to the child that got it, which has
//!                                      not yet taken it over (or died before it could)
//!              1  1  reclaimer         being reclaimed by process `reclaimer`
//! ```
//!
//! # Guarantees
//!
//! * **Counted somewhere, always.** A handle a live process holds is counted in `total`
//!   and in a slot (or in `overflow`) at every instant, whichever process runs first after
//!   a fork. Counts are added to `total` before the slot and removed from the slot before
//!   `total`, so `total` can over-count but never under-count: [`PeerTable::any_handles`]
//!   (one load, for fast paths) may say "yes" for a dead end, never "no" for a live one;
//!   [`PeerTable::any_alive`] (a scan) is the judge.
//! * **More processes than slots fail loudly or count conservatively, never silently.**
//!   The table has 1024 slots (16 KiB per end; scans only cover the slots ever used) and
//!   a process frees its slot when its last handle goes, so the limit is 1024 processes
//!   holding one end *at the same time*. Before lending a slot for a fork, the slots of
//!   dead holders are reclaimed. Creating a handle ([`attach`]) in a table that is still
//!   full fails with an error. A fork cannot fail, so a child that finds the table full is
//!   counted in `overflow` instead, a warning is printed, and while `overflow` is not zero
//!   the end counts as connected (conservative: a dead overflowed process is never
//!   noticed, so `recv` without a timeout can then wait forever; timeouts still hold).
//! * **Death needs proof.** A slot is reclaimed only when
//!   [`liveness::process_is_dead`] proves its holder gone, or when its (live) holder is
//!   shown by `/proc/<pid>/maps` not to map the table's file any more: a process that
//!   exec'd (`std::process::Command` forks and execs) or unmapped the segment holds no
//!   handle, whatever its slot says. Unreadable or empty maps count as still mapping.
//!   An exec'd image that maps the same segment again (a re-exec'd procshare program
//!   handed the memfd) keeps its pre-exec count until it dies: an over-count, never an
//!   under-count.
//! * **A child killed inside `fork`** (before the child handler below takes its loan
//!   over) leaves a loan that is reclaimed once the child is proven dead: the parent binds
//!   the loan to the child's identity right after the fork, finding the child as the one
//!   new entry in `/proc/thread-self/children` (procshare's own [`crate::fork`] helper also
//!   binds it by pid, for kernels without that file; a future Process layer must call
//!   [`bind_forked_child`] the same way). A loan that cannot be bound (no such file and a
//!   raw `libc::fork`, or a child reaped by another thread before the parent handler ran)
//!   stays counted for as long as it exists (conservative). A failed fork is recognised
//!   (no new child and `errno` set) and its loans are cancelled.
//! * **Cost.** A fork of a process holding handles reads its children list twice and the
//!   child's `stat` once; a process holding no handle pays nothing. A scan reads each
//!   other holder's `stat` (liveness) and, at most every 250 ms per holder, its `maps`.
//!
//! # Pid namespaces
//!
//! Identities are pids, which mean one process only inside one pid namespace. A process
//! whose namespace differs from the table's `namespace` (or cannot tell, see
//! [`my_namespace`]) is *foreign*: it never writes its identity into a slot and never
//! judges one. It counts the handles it creates in `overflow`; it lends the handles a fork
//! copies in `overflow`; a foreign child leaves its parent's loan as the parent lent and
//! binds it (the parent names the child by its pid in the table's namespace, where its
//! death is provable) and uncounts from that loan, without owning it, the handles it
//! drops; and its scans report every counted handle alive. So the other end never reads
//! as disconnected because of a holder it cannot judge.
//!
//! # Following fork
//!
//! `fork` copies every handle into the child without running any constructor, so the
//! counts must follow. Fork handlers, registered once per process, walk a process-local
//! registry of the tables this process holds handles in:
//!
//! 1. *prepare* (parent P, before the fork): per table where P holds `n` handles, claim a
//!    free slot as a loan `[lent by P]`, then count `n` handles in it (`total` first). If
//!    no slot is free even after reclaiming dead holders' slots, count `n` in `overflow`.
//!    Snapshot P's children.
//! 2. *child* (C, first thing after the fork, async-signal-safe: no allocation): per table,
//!    turn the loan's owner into C's own identity. The handles are already there.
//! 3. *parent* (P, after the fork): find C as the one new child and bind each loan still
//!    `[lent by P]` to `[bound to C]`. If the fork failed (no new child and `errno` set),
//!    cancel the loans.
//!
//! # Following `Process::spawn` (Spawn and ForkServer)
//!
//! A spawned child gets no copy of the parent's memory, only the handles encoded in its
//! argument, and each of those is lent the same way, but explicitly:
//! [`lend_to_spawn`] claims a slot `[lent by P]` and counts the handle while the argument
//! is encoded; the parent binds it to the child (`[bound to C]`, [`bind_spawn_loan`]) once
//! it knows the child's pid, or cancels it if the spawn failed or the child is proven to
//! have ended first ([`cancel_spawn_loan`]); the child takes it over while decoding
//! ([`take_spawn_loan`]). The states and their repairs are those of a fork loan (the
//! table below); `process/handles.rs` has the spawn-specific rows. The forks that only
//! `exec` (the one inside `std::process::Command::spawn`, which starts a Spawn child or
//! the fork server) run inside [`forking_to_exec`] and are lent nothing: the exec'd image
//! holds no handle, and a spawned child that maps the queue again would otherwise be
//! counted as holding its pre-exec copies until it died.
//!
//! # What a SIGKILL at each point leaves, and how it is repaired
//!
//! | killed                                   | state left                                  | repair |
//! |------------------------------------------|---------------------------------------------|--------|
//! | P, after claiming a loan slot, before counting | `[lent by P]`, 0 handles              | scan: lender dead and nothing lent (no fork happened yet) → free |
//! | P, between `total += n` and the slot's count | `total` over by n                     | **not repaired** (only mitigated): `any_alive` scans slots and is right, but `any_handles` stays "yes", so where a fast path trusts it (a `try_recv` on an empty ring) it answers Empty, not Disconnected; blocking and timed calls consult `any_alive` |
//! | P, after lending, before or during the fork | `[lent by P]`, n handles, maybe no child | **kept forever** (cannot prove no child got it): conservative |
//! | C, before its child handler (item 10)    | `[lent by P]`, then P binds `[bound to C]`  | scan: C dead → reclaim |
//! | P and C both, before P's parent handler  | `[lent by P]`, n handles                    | **kept forever**: conservative |
//! | C, after taking the loan over            | `C`, n handles                              | scan: C dead → reclaim |
//! | any holder, between `total` and slot in attach/detach | `total` over by 1              | as above (`total` cannot be resynchronised safely: a concurrent add could be lost) |
//! | holder, after its count reached 0, before freeing | `holder`, 0 handles                | scan: holder dead → free |
//! | reclaimer R, mid-reclaim                 | `[reclaiming by R]`, handles maybe left     | scan: R dead → another reclaimer takes over |
//! | C exec'd (never dies while we wait)      | `C`, n handles, C maps no procshare segment | scan: C does not map the table's file → reclaim |
//! | foreign C, holding a loan (any time)      | `[lent by P]` or `[bound to C]`, n or fewer handles | bound: scan, C dead → reclaim; unbound: **kept forever** (conservative) |
//! | foreign process, holding `overflow` counts | `overflow` over by its handles        | **not repaired**: that end counts as connected for good (conservative) |
//!
//! Reclaiming claims the slot first (owner → `[reclaiming by me]` by compare-exchange), so
//! two reclaimers cannot both subtract, and a slot freed and reused in between is not
//! touched.

use std::cell::UnsafeCell;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::liveness;
use crate::sys::{self, MappedFile};

/// Processes that can hold handles to one end at the same time (see the module docs).
pub(crate) const PEER_SLOTS: usize = 1024;

/// Owner tag: a fork loan whose child is not known yet; the low bits name the lender.
const LENT: u64 = 1 << 63;
/// Owner tag: a fork loan bound to the child (low bits) that has not taken it over.
const BOUND: u64 = 1 << 62;
/// Owner tag: the slot is being reclaimed by the process in the low bits.
const RECLAIMING: u64 = LENT | BOUND;
/// The identity bits of an owner word
/// ([`process_identity`](crate::owner::process_identity) fits in 62 bits: pids are below
/// 2^22).
const IDENTITY: u64 = BOUND - 1;
/// How long a proof that a holder still maps the table spares it the next look.
const MAPS_PROOF_MS: u32 = 250;

#[repr(C)]
struct PeerSlot {
    owner: AtomicU64,
    handles: AtomicU32,
    mapped_at: AtomicU32,
}

/// The holders of one end of a queue. All-zero is a valid empty table.
#[repr(C)]
pub(crate) struct PeerTable {
    /// Sum of all slots' handles and `overflow`, so "is anyone attached" is one load.
    total: AtomicU64,
    /// Handles of processes that got no slot.
    overflow: AtomicU64,
    /// One past the highest slot ever claimed.
    used: AtomicU64,
    /// The pid namespace of the process that created the queue (see [`my_namespace`]; 0 =
    /// unknown). Written once, at creation; the same in every table of one queue.
    namespace: AtomicU64,
    slots: [PeerSlot; PEER_SLOTS],
}

/// Where a fork's loan on one table went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loan {
    None,
    /// In this slot, owner `[lent by parent]`.
    Slot(usize),
    /// Into `overflow`.
    Overflow,
}

fn to_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl PeerTable {
    /// Records this process's pid namespace as the queue's (see [`my_namespace`]), in a
    /// table of a queue this process is creating.
    pub(crate) fn stamp_creator(&self) {
        self.namespace.store(my_namespace(), Ordering::Relaxed);
    }

    /// Whether this process is in another pid namespace than the queue's creator (or
    /// cannot tell: see [`my_namespace`]), so it must neither record its identity in the
    /// queue nor judge identities recorded there. One relaxed load of a process-local
    /// word and one of the table.
    #[inline]
    pub(crate) fn foreign(&self) -> bool {
        self.namespace.load(Ordering::Relaxed) != my_namespace()
    }

    /// The slots ever used (the shared bound is untrusted: clamped).
    fn used_slots(&self) -> &[PeerSlot] {
        let used = usize::try_from(self.used.load(Ordering::SeqCst)).unwrap_or(PEER_SLOTS);
        &self.slots[..used.min(PEER_SLOTS)]
    }

    fn find(&self, owner: u64) -> Option<&PeerSlot> {
        self.used_slots()
            .iter()
            .find(|s| s.owner.load(Ordering::SeqCst) == owner)
    }

    /// Claims a free slot for `owner`; its index.
    fn claim_free(&self, owner: u64) -> Option<usize> {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.owner.load(Ordering::SeqCst) != 0 {
                continue;
            }
            // Publish the bound first: a scan must never miss a claimed slot.
            self.used.fetch_max(i as u64 + 1, Ordering::SeqCst);
            if slot
                .owner
                .compare_exchange(0, owner, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                slot.mapped_at.store(0, Ordering::Relaxed);
                return Some(i);
            }
        }
        None
    }

    /// Counts `n` more handles in `slot`: `total` first, so it never under-counts.
    fn count(&self, slot: &PeerSlot, n: u64) {
        self.total.fetch_add(n, Ordering::SeqCst);
        slot.handles.fetch_add(to_u32(n), Ordering::SeqCst);
    }

    fn uncount(&self, n: u64) {
        let _ = self
            .total
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_sub(n))
            });
    }

    /// Counts `n` more handles for process `me`. Allocation-free (fork child handler).
    fn add(&self, me: u64, n: u64) -> bool {
        let slot = match self.find(me) {
            Some(slot) => slot,
            None => match self.claim_free(me) {
                Some(i) => &self.slots[i],
                None => return false,
            },
        };
        self.count(slot, n);
        true
    }

    /// Counts `n` handles in `overflow`.
    fn add_overflow(&self, n: u64) {
        self.total.fetch_add(n, Ordering::SeqCst);
        self.overflow.fetch_add(n, Ordering::SeqCst);
    }

    fn remove_overflow(&self, n: u64) {
        let before = self
            .overflow
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| {
                Some(o.saturating_sub(n))
            })
            .unwrap_or(0);
        self.uncount(before.min(n));
    }

    /// Uncounts `n` handles of process `me`, freeing its slot when none are left.
    fn remove(&self, me: u64, n: u64) {
        let Some(slot) = self.find(me) else { return };
        // Saturate: a corrupted count must not wrap to "many handles".
        let before = slot
            .handles
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                Some(h.saturating_sub(to_u32(n)))
            })
            .unwrap_or(0);
        self.uncount(u64::from(before).min(n));
        if before <= to_u32(n) {
            // Only this process changes its own slot's count (under the registry lock),
            // and reclaimers leave a live owner's slot alone.
            let _ = slot
                .owner
                .compare_exchange(me, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// Prepare handler: lends `n` handles of `lender` to the child about to be forked.
    fn lend(&self, lender: u64, n: u64, file: Option<MappedFile>) -> Loan {
        if self.foreign() {
            // Our identity means nothing to the queue's processes: count conservatively.
            self.add_overflow(n);
            return Loan::Overflow;
        }
        let tag = LENT | lender;
        let index = self.claim_free(tag).or_else(|| {
            self.scan(lender, file);
            self.claim_free(tag)
        });
        match index {
            Some(i) => {
                self.count(&self.slots[i], n);
                Loan::Slot(i)
            }
            None => {
                self.add_overflow(n);
                Loan::Overflow
            }
        }
    }

    /// Child handler: the child `me` of `lender` takes over the loan in slot `i`. False if
    /// the slot no longer holds the loan. Allocation-free.
    fn take_loan(&self, i: usize, lender: u64, me: u64) -> bool {
        let slot = &self.slots[i];
        loop {
            let owner = slot.owner.load(Ordering::SeqCst);
            if owner == me {
                return true;
            }
            // (If the parent read our identity differently from us, the loan stays bound
            // to that identity, counted until it is seen dead, and we count ourselves
            // afresh: an over-count, never an under-count.)
            if owner != LENT | lender && owner != BOUND | (me & IDENTITY) {
                return false;
            }
            if slot
                .owner
                .compare_exchange(owner, me, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// A foreign child (see [`my_namespace`]) drops one of the handles counted in the fork
    /// loan in slot `i`, which it does not own: uncounts it, and leaves the slot (with 0
    /// handles) to be freed when its named owner is proven dead. Nobody else changes a
    /// loan's count while it can have a live holder.
    fn uncount_loaned(&self, i: usize) {
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        let before = slot
            .handles
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                Some(h.saturating_sub(1))
            })
            .unwrap_or(0);
        self.uncount(u64::from(before.min(1)));
    }

    /// Parent handler: binds the loan in slot `i` to the forked child.
    fn bind_loan(&self, i: usize, lender: u64, child: u64) {
        let _ = self.slots[i].owner.compare_exchange(
            LENT | lender,
            BOUND | (child & IDENTITY),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Parent handler: the fork failed, so nobody got the loan in slot `i`.
    fn cancel_loan(&self, i: usize, lender: u64) {
        let slot = &self.slots[i];
        if slot.owner.load(Ordering::SeqCst) == LENT | lender {
            let lent = slot.handles.swap(0, Ordering::SeqCst);
            self.uncount(u64::from(lent));
            let _ =
                slot.owner
                    .compare_exchange(LENT | lender, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// Zeroes and frees `slot`, whose owner was seen as `owner` and proven to hold nothing
    /// any more. Claims the slot first, so concurrent reclaimers subtract once, and a slot
    /// freed and reused meanwhile is left alone.
    fn reclaim(&self, slot: &PeerSlot, owner: u64, me: u64) {
        let mine = RECLAIMING | (me & IDENTITY);
        if slot
            .owner
            .compare_exchange(owner, mine, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let dead = slot.handles.swap(0, Ordering::SeqCst);
        self.uncount(u64::from(dead));
        slot.owner.store(0, Ordering::SeqCst);
    }

    /// Whether `holder` (alive) still maps the file this table lives in. Yes unless
    /// `/proc/<pid>/maps` is readable, not empty, and lacks the file.
    fn still_maps(slot: &PeerSlot, holder: u64, file: Option<MappedFile>) -> bool {
        let Some(file) = file else { return true };
        let now = (sys::monotonic_now().as_millis() as u32) | 1;
        let proof = slot.mapped_at.load(Ordering::Relaxed);
        if proof != 0 && now.wrapping_sub(proof) < MAPS_PROOF_MS {
            return true;
        }
        match sys::process_maps_file(crate::owner::identity_parts(holder).0, file) {
            Ok(Some(false)) => false,
            Ok(Some(true)) => {
                slot.mapped_at.store(now, Ordering::Relaxed);
                true
            }
            Ok(None) | Err(_) => true,
        }
    }

    /// Whether any live process holds a handle; reclaims the slots of holders proven dead
    /// or proven not to map the table (`file`: the table's file, `None` if unknown).
    fn scan(&self, me: u64, file: Option<MappedFile>) -> bool {
        let mut alive = self.overflow.load(Ordering::SeqCst) != 0;
        for slot in self.used_slots() {
            let owner = slot.owner.load(Ordering::SeqCst);
            if owner == 0 {
                continue;
            }
            let handles = slot.handles.load(Ordering::SeqCst);
            let who = owner & IDENTITY;
            match owner & RECLAIMING {
                RECLAIMING => {
                    // Whatever is left here belongs to a dead holder.
                    if who != me & IDENTITY && liveness::process_is_dead(who) {
                        self.reclaim(slot, owner, me);
                    }
                }
                LENT => {
                    if handles != 0 {
                        // A child may hold these and cannot be named: count it alive.
                        alive = true;
                    } else if liveness::process_is_dead(who) {
                        // The lender died before lending anything, so before forking.
                        self.reclaim(slot, owner, me);
                    }
                }
                BOUND => {
                    if liveness::process_is_dead(who) {
                        self.reclaim(slot, owner, me);
                    } else {
                        // The child is between fork and its handler; it cannot have
                        // exec'd yet.
                        alive |= handles != 0;
                    }
                }
                _ if owner == me => alive |= handles != 0,
                _ => {
                    if liveness::process_is_dead(who) {
                        self.reclaim(slot, owner, me);
                    } else if handles == 0 {
                        // Mid-attach or mid-detach: nothing to count.
                    } else if !Self::still_maps(slot, who, file) {
                        // Exec'd (or unmapped): its handles are gone with its old image.
                        self.reclaim(slot, owner, me);
                    } else {
                        alive = true;
                    }
                }
            }
        }
        alive
    }

    /// Whether any process (this one included) holds a handle, without asking whether the
    /// holders are alive. One load: cheap enough for every failed receive. May say yes
    /// for a dead end (see the module docs), never no for a live one.
    #[inline]
    pub(crate) fn any_handles(&self) -> bool {
        self.total.load(Ordering::SeqCst) != 0
    }

    /// Whether handles exist beyond a single one in this process: in another process, or
    /// several here. Call after [`any_alive`](Self::any_alive) has reclaimed dead slots.
    pub(crate) fn handles_beyond_one_of_mine(&self) -> bool {
        let me = current_process();
        let in_slot = self
            .find(me)
            .map_or(0, |s| u64::from(s.handles.load(Ordering::SeqCst)));
        let key = self as *const PeerTable as usize;
        let overflowed = REGISTRY.with(|st| {
            st.entries
                .iter()
                .find(|e| e.table == key)
                .map_or(0, |e| e.overflow)
        });
        let mine = in_slot + overflowed;
        mine > 1 || self.total.load(Ordering::SeqCst) > mine
    }

    /// Whether any live process holds a handle; frees the slots of holders proven dead,
    /// and of holders proven not to map this table any more (exec'd).
    pub(crate) fn any_alive(&self) -> bool {
        if self.foreign() {
            // We cannot judge the holders: every one counted is taken to be alive.
            return self.any_handles();
        }
        let me = current_process();
        let file = file_of(self as *const PeerTable as usize);
        self.scan(me, file)
    }
}

/// This process's identity, cached; the fork child handler replaces it.
static PROCESS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn current_process() -> u64 {
    match PROCESS.load(Ordering::Relaxed) {
        0 => {
            let (pid, start) = sys::current_process_noalloc();
            let id = crate::owner::process_identity(pid, start);
            PROCESS.store(id, Ordering::Relaxed);
            id
        }
        id => id,
    }
}

/// This process's pid namespace as the queues record it (`sys::pid_namespace_id`, 0 if
/// unknown), tagged with bit 63 once computed; 0 = not computed yet. The fork child
/// handler recomputes it (a child may be in a new pid namespace: `unshare(CLONE_NEWPID)`
/// in the parent moves its *future children*).
static NAMESPACE: AtomicU64 = AtomicU64::new(0);
const NS_KNOWN: u64 = 1 << 63;

/// The pid namespace this process records in the queues it creates and compares with
/// theirs: the nsfs inode of its pid namespace, 0 if it cannot be learnt.
///
/// # Namespaces: who may use a queue
///
/// Identities recorded in a queue (peer slots, claim words, record owners, the spsc
/// owners, the byte queue's `keeper`) are pids and tids, which mean something only in one
/// pid namespace. So each queue records its creator's namespace in its peer tables, and
/// a process uses the queue only if its own namespace is the same:
///
/// | queue's namespace | this process's | verdict |
/// |---|---|---|
/// | N | N | local: uses the queue, records and judges identities |
/// | N | M ≠ N | foreign |
/// | N | unknown (no `/proc`, kernel too old for the pidfd fallback) | foreign (cannot tell) |
/// | unknown | known | foreign (cannot tell) |
/// | unknown | unknown | local: nobody can tell (a sandbox without `/proc` on an old kernel, or Miri); identities are judged as if in one namespace, which is what every process in such a sandbox is unless it unshares one (see the queue docs) |
///
/// A foreign process never records its identity in the queue and never judges one
/// recorded there: every queue operation refuses at once (the `channel`/`spsc` methods
/// panic, `ByteQueue`/`Queue` return `QueueError::ForeignPidNamespace`), and its handles
/// (inherited by `fork`, or cloned) are counted without naming it: in the fork loan's slot
/// as the parent bound it (the parent names the child by its pid in the queue's
/// namespace, so its death is provable there) or in `overflow`. Either way the other end
/// counts it as connected while it may live, and its handles are uncounted when it drops
/// them; a foreign process that dies without dropping them leaves an `overflow` count
/// for good (conservative: that end then never reads as disconnected).
#[inline]
pub(crate) fn my_namespace() -> u64 {
    match NAMESPACE.load(Ordering::Relaxed) {
        0 => first_namespace(),
        ns => ns & !NS_KNOWN,
    }
}

/// The slow path of [`my_namespace`] (once per process), out of line so every queue
/// operation inlines only the cached load.
#[cold]
#[inline(never)]
fn first_namespace() -> u64 {
    // The cache is only as good as the fork child handler that renews it.
    register_fork_handlers();
    compute_namespace()
}

fn register_fork_handlers() {
    HANDLERS.call_once(|| {
        sys::register_fork_handlers(prepare_fork, after_fork_parent, after_fork_child)
    });
}

/// Computes and caches [`my_namespace`]. No allocation (called by the fork child handler):
/// `sys::pid_namespace_id` is a `statx` of a short literal path (or pidfd syscalls).
fn compute_namespace() -> u64 {
    let ns = sys::pid_namespace_id().unwrap_or(0);
    NAMESPACE.store(ns | NS_KNOWN, Ordering::Relaxed);
    ns
}

/// What a foreign process is told when it uses a queue (see [`my_namespace`]).
pub(crate) fn foreign_message(what: &str) -> String {
    format!(
        "this {what} was created in another pid namespace than this process's (or one of \
         the two namespaces cannot be learnt here: no /proc and no pidfd namespace ioctl): \
         procshare queues judge a crashed peer by its pid, which means nothing across pid \
         namespaces, so only processes of the creator's pid namespace may use a queue. \
         Create the queue inside this namespace (after the `unshare`/`clone` that made \
         it), or carry the data across with `procshare::pipe()`"
    )
}

/// Refuses a queue operation in a foreign process (see [`my_namespace`]).
#[cold]
#[inline(never)]
#[track_caller]
pub(crate) fn refuse_foreign(what: &str) -> ! {
    panic!("{}", foreign_message(what))
}

/// A table this process holds handles in.
struct Entry {
    /// The table's address.
    table: usize,
    /// How many handles this process holds.
    handles: u64,
    /// How many of them are counted in the table's `overflow`, not in a slot.
    overflow: u64,
    /// In a process foreign to the table (see [`my_namespace`]): the slot of the fork loan
    /// that counts the rest of its handles, which it does not own and only uncounts from.
    foreign_slot: Option<usize>,
    /// The mapping holding the table, once looked up: its range and file. Valid while
    /// the entry exists (the handles keep the mapping).
    mapping: Option<(usize, usize, MappedFile)>,
    /// The loan made for the fork in progress (or one not bound yet).
    loan: Loan,
}

/// Process-local state of the peer tables.
struct State {
    entries: Vec<Entry>,
    /// The forking thread's children before the fork in progress.
    children_before: Option<Vec<u32>>,
    /// This process's identity at `prepare` time, for the child to find its loans.
    lender: u64,
}

/// Guarded by a spin lock (not a std Mutex) because the fork handlers take it in
/// `prepare` and release it in `parent` and `child`, across the fork, which a guard
/// object cannot express.
struct Registry {
    locked: AtomicBool,
    state: UnsafeCell<State>,
}

// SAFETY: `state` is only touched with `locked` held (see `with`).
unsafe impl Sync for Registry {}

static REGISTRY: Registry = Registry {
    locked: AtomicBool::new(false),
    state: UnsafeCell::new(State {
        entries: Vec::new(),
        children_before: None,
        lender: 0,
    }),
};
static HANDLERS: Once = Once::new();
static WARNED_FULL: AtomicBool = AtomicBool::new(false);

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

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        self.lock();
        // SAFETY: we hold the registry lock, so no other reference to `state` exists.
        let r = f(unsafe { &mut *self.state.get() });
        self.unlock();
        r
    }
}

/// The file holding the table at `addr`, from a cached lookup if any entry's mapping
/// covers it (that entry's handles keep the mapping alive, so the cache is current).
fn file_of(addr: usize) -> Option<MappedFile> {
    let cached = REGISTRY.with(|st| {
        st.entries
            .iter()
            .filter_map(|e| e.mapping)
            .find(|&(start, end, _)| start <= addr && addr < end)
            .map(|(_, _, f)| f)
    });
    if cached.is_some() {
        return cached;
    }
    let (start, end, file) = match sys::own_mapping_at(addr) {
        Ok(Some((start, end, Some(file)))) => (start, end, file),
        _ => return None,
    };
    REGISTRY.with(|st| {
        if let Some(e) = st.entries.iter_mut().find(|e| e.table == addr) {
            e.mapping = Some((start, end, file));
        }
    });
    Some(file)
}

/// # Safety
///
/// The caller holds the registry lock, and the table's entry exists (so the mapping is
/// alive) for as long as the returned reference is used.
unsafe fn table_at<'a>(addr: usize) -> &'a PeerTable {
    // SAFETY: forwarded to the caller.
    unsafe { &*(addr as *const PeerTable) }
}

extern "C" fn prepare_fork() {
    REGISTRY.lock();
    // SAFETY: the registry lock is held until `after_fork_*` releases it.
    let st = unsafe { &mut *REGISTRY.state.get() };
    if st.entries.is_empty() || FORK_TO_EXEC.get() {
        // Nothing to lend: keep forks of handle-less processes cheap. A fork that only
        // execs (see `forking_to_exec`) lends nothing either.
        return;
    }
    let me = current_process();
    st.lender = me;
    st.children_before = sys::children_of_current_thread().ok();
    // One read of the map for every entry not looked up yet (a pool creating rings
    // before each fork would otherwise read it once per ring).
    let mut maps = None;
    for e in &mut st.entries {
        if e.mapping.is_none() {
            let maps = maps.get_or_insert_with(|| sys::own_mappings().unwrap_or_default());
            if let Some(&(start, end, Some(file))) = maps
                .iter()
                .find(|&&(start, end, _)| start <= e.table && e.table < end)
            {
                e.mapping = Some((start, end, file));
            }
        }
        // SAFETY: the entry exists and the lock is held.
        let table = unsafe { table_at(e.table) };
        e.loan = table.lend(me, e.handles, e.mapping.map(|m| m.2));
        if e.loan == Loan::Overflow && !WARNED_FULL.swap(true, Ordering::Relaxed) {
            eprintln!(
                "procshare: more than {PEER_SLOTS} live processes hold one end of a queue; \
                 a forked child is counted without a slot, so that end now counts as \
                 connected for good (use timeouts, or fewer processes per queue end)"
            );
        }
    }
    // Last: a failed fork sets errno, which the parent handler reads.
    sys::clear_errno();
}

extern "C" fn after_fork_parent() {
    let fork_failed = sys::errno_is_set();
    // SAFETY: the lock taken in `prepare_fork` is still held.
    let st = unsafe { &mut *REGISTRY.state.get() };
    if st.entries.is_empty() || FORK_TO_EXEC.get() {
        REGISTRY.unlock();
        return;
    }
    // The new children of this thread: exactly one if the fork succeeded (this thread was
    // busy forking, so it started no other), none if it failed. `None`: cannot tell.
    let new_children: Option<Vec<u32>> = st.children_before.take().and_then(|before| {
        let after = sys::children_of_current_thread().ok()?;
        Some(
            after
                .into_iter()
                .filter(|pid| !before.contains(pid))
                .collect(),
        )
    });
    let child = match new_children.as_deref() {
        Some(&[pid]) => Some(pid),
        _ => None,
    };
    // Cancelling a loan a live child holds would under-count it: only on both signs.
    let failed = fork_failed && new_children.as_ref().is_some_and(Vec::is_empty);
    let child = child.and_then(child_identity);
    for e in &mut st.entries {
        // SAFETY: the entry exists and the lock is held.
        let table = unsafe { table_at(e.table) };
        match (e.loan, child) {
            (Loan::Slot(i), Some(child)) => {
                table.bind_loan(i, st.lender, child);
                e.loan = Loan::None;
            }
            (Loan::Slot(i), None) if failed => {
                table.cancel_loan(i, st.lender);
                e.loan = Loan::None;
            }
            (Loan::Overflow, _) if failed => {
                table.remove_overflow(e.handles);
                e.loan = Loan::None;
            }
            // Unbound: `bind_forked_child` may still bind it.
            (Loan::Slot(_), None) => {}
            _ => e.loan = Loan::None,
        }
    }
    REGISTRY.unlock();
}

extern "C" fn after_fork_child() {
    if FORK_TO_EXEC.get() {
        // This image only execs (or `_exit`s): it never uses, drops nor counts a handle.
        REGISTRY.unlock();
        return;
    }
    let (pid, start) = sys::current_process_noalloc();
    let me = crate::owner::process_identity(pid, start);
    PROCESS.store(me, Ordering::Relaxed);
    compute_namespace();
    // SAFETY: the child is single-threaded and inherited the held registry lock.
    let st = unsafe { &mut *REGISTRY.state.get() };
    for e in &mut st.entries {
        // SAFETY: the entry exists (the mappings are inherited) and the lock is held.
        let table = unsafe { table_at(e.table) };
        e.overflow = 0;
        e.foreign_slot = None;
        if table.foreign() {
            // Our identity means nothing in the queue's namespace: never write it. The
            // loan stays as the parent lent (and binds) it, counting our handles.
            match e.loan {
                Loan::Slot(i) => e.foreign_slot = Some(i),
                Loan::Overflow => e.overflow = e.handles,
                Loan::None => {
                    table.add_overflow(e.handles);
                    e.overflow = e.handles;
                }
            }
            e.loan = Loan::None;
            continue;
        }
        match e.loan {
            Loan::Slot(i) if table.take_loan(i, st.lender, me) => {}
            Loan::Overflow => e.overflow = e.handles,
            // The loan is gone (only a corrupted table does that): count ourselves.
            _ => {
                if !table.add(me, e.handles) {
                    table.add_overflow(e.handles);
                    e.overflow = e.handles;
                }
            }
        }
        e.loan = Loan::None;
        // Same file, same range: `mapping` stays valid.
    }
    REGISTRY.unlock();
}

/// The identity of our child `pid` (not reaped yet, so the pid is still its own).
fn child_identity(pid: u32) -> Option<u64> {
    match sys::thread_stat(pid) {
        Ok(Some(stat)) => Some(crate::owner::process_identity(pid, stat.start)),
        _ => None,
    }
}

/// Called by [`crate::fork`] in the parent right after a fork with the child's pid:
/// binds loans the parent handler could not (no `/proc/thread-self/children`).
pub(crate) fn bind_forked_child(pid: u32) {
    let Some(child) = child_identity(pid) else {
        return;
    };
    REGISTRY.with(|st| {
        for e in &mut st.entries {
            if let Loan::Slot(i) = e.loan {
                // SAFETY: the entry exists and the lock is held.
                unsafe { table_at(e.table) }.bind_loan(i, st.lender, child);
                e.loan = Loan::None;
            }
        }
    });
}

thread_local! {
    /// Set while this thread forks a child that will only `exec` (see [`forking_to_exec`]).
    /// A `const` `Cell`: no lazy initialisation and no destructor, so the fork handlers may
    /// read it.
    static FORK_TO_EXEC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, which forks a child that does nothing but `exec` (or `_exit` if that fails),
/// such as `std::process::Command::spawn`: the fork handlers lend that child nothing.
/// Its image never uses nor drops the handles it was copied, and the image it execs
/// holds none (a Spawn child gets its handles through its argument, each with its own
/// loan: see [`lend_to_spawn`]). Without this, the copied counts would stay with the
/// child's identity, and a spawned child that maps the queue again would be counted as
/// holding them until it died.
pub(crate) fn forking_to_exec<T>(f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            FORK_TO_EXEC.set(false);
        }
    }
    FORK_TO_EXEC.set(true);
    let _reset = Reset;
    f()
}

/// Where handles lent to a spawned child are counted: a slot of `table`, owned
/// `[lent by lender]` until the parent binds it to the child or the child takes it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SpawnLoan {
    pub(crate) slot: usize,
    pub(crate) lender: u64,
    /// Which of the lender's loans this is, process-locally (0 in the child).
    pub(crate) ticket: u64,
}

/// The spawn loans this process made and has not bound or cancelled yet: table address,
/// slot, ticket. The owner word `[lent by P]` does not tell two loans of one process
/// apart, so before binding or cancelling, the parent checks here that the slot still
/// holds *its* loan: if the child took it over and was reclaimed, and another spawn of
/// this process (another thread) claimed the same slot meanwhile, the old loan's entry
/// is gone and its bind (which would tie the new loan to the dead child) is skipped.
static SPAWN_LOANS: std::sync::Mutex<Vec<(usize, usize, u64)>> = std::sync::Mutex::new(Vec::new());
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

fn spawn_loans() -> std::sync::MutexGuard<'static, Vec<(usize, usize, u64)>> {
    SPAWN_LOANS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `settle` (a bind or a cancel) if `loan` on `table` is still this process's
/// pending loan, and forgets it.
fn settle_spawn_loan(table: &PeerTable, loan: SpawnLoan, settle: impl FnOnce()) {
    let key = (table as *const PeerTable as usize, loan.slot, loan.ticket);
    let mut pending = spawn_loans();
    if let Some(i) = pending.iter().position(|&e| e == key) {
        pending.swap_remove(i);
        settle();
    }
}

/// Reserves a loan of one handle on `table` for a child that `Process::spawn` is about to
/// start with Spawn or ForkServer (the handle travels in its argument), so the handle is
/// counted from now until the child takes the loan over ([`take_spawn_loan`]) or is
/// proven dead: the parent may drop its own handle the moment `spawn` returns.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if the table has no free slot even after reclaiming dead
/// holders', or if this process is foreign to the queue (see [`my_namespace`]).
pub(crate) fn lend_to_spawn(table: &PeerTable) -> Result<SpawnLoan> {
    if table.foreign() {
        return Err(Error::InvalidArgument {
            what: foreign_message("queue handle"),
        });
    }
    let me = current_process();
    let tag = LENT | me;
    let key = table as *const PeerTable as usize;
    let file = file_of(key);
    // Claimed and recorded under one lock hold: see `SPAWN_LOANS`.
    let mut pending = spawn_loans();
    let slot = table
        .claim_free(tag)
        .or_else(|| {
            table.scan(me, file);
            table.claim_free(tag)
        })
        .ok_or_else(|| Error::InvalidArgument {
            what: format!(
                "more than {PEER_SLOTS} live processes hold handles to one end of this \
                 queue, so none can be lent to a spawned child: share fewer handles, or use \
                 more queues"
            ),
        })?;
    table.count(&table.slots[slot], 1);
    // An older loan recorded in this slot was taken over and its slot freed (only then
    // could we claim it): it must not be settled any more.
    pending.retain(|&(t, s, _)| (t, s) != (key, slot));
    let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
    pending.push((key, slot, ticket));
    Ok(SpawnLoan {
        slot,
        lender: me,
        ticket,
    })
}

/// Counts one more handle in a loan made by [`lend_to_spawn`] (another handle of the
/// same end in the same argument).
pub(crate) fn lend_one_more(table: &PeerTable, loan: SpawnLoan) {
    if let Some(slot) = table.slots.get(loan.slot) {
        table.count(slot, 1);
    }
}

/// Binds a spawn loan to the child that got it (its pid, read while it cannot have been
/// reaped and recycled), so it is reclaimed once that child is proven dead. A loan the
/// child already took over is left alone.
pub(crate) fn bind_spawn_loan(table: &PeerTable, loan: SpawnLoan, child: u64) {
    settle_spawn_loan(table, loan, || {
        table.bind_loan(loan.slot, loan.lender, child);
    });
}

/// The identity of process `pid` as the peer tables record it, `None` if it cannot be
/// read (no such process).
pub(crate) fn identity_of(pid: u32) -> Option<u64> {
    child_identity(pid)
}

/// Cancels a spawn loan nobody took over: the spawn failed, or the child is proven to
/// have ended. A loan the child took over (its slot now names it) is left alone.
pub(crate) fn cancel_spawn_loan(table: &PeerTable, loan: SpawnLoan) {
    settle_spawn_loan(table, loan, || table.cancel_loan(loan.slot, loan.lender));
}

/// Forgets a spawn loan without binding it (the child cannot be named): it stays
/// counted for as long as it exists.
pub(crate) fn abandon_spawn_loan(table: &PeerTable, loan: SpawnLoan) {
    settle_spawn_loan(table, loan, || {});
}

/// In a spawned child, decoding its argument: takes over the loan its parent made for a
/// handle on `table` ([`lend_to_spawn`]) and counts that handle as this process's, as
/// [`attach`] would have. A loan already gone (a corrupted table, or a failed spawn the
/// parent cancelled and retried) is replaced by counting afresh.
///
/// # Errors
///
/// [`Error::Corrupted`] for a slot index past the table; [`Error::InvalidArgument`] if
/// the loan is gone and the table is full.
pub(crate) fn take_spawn_loan(table: &PeerTable, loan: SpawnLoan) -> Result<()> {
    if loan.slot >= PEER_SLOTS {
        return Err(Error::Corrupted {
            what: format!(
                "a queue handle's loan names peer slot {}, past the table's {PEER_SLOTS}",
                loan.slot
            ),
        });
    }
    register_fork_handlers();
    let me = current_process();
    let key = table as *const PeerTable as usize;
    let foreign = table.foreign();
    let counted = REGISTRY.with(|st| {
        let (overflow, foreign_slot) = if foreign {
            // Never write our identity: the loan keeps counting the handle, under the
            // name the parent gave it (see `my_namespace`).
            (0, Some(loan.slot))
        } else if table.take_loan(loan.slot, loan.lender, me) || table.add(me, 1) {
            (0, None)
        } else {
            return false;
        };
        match st.entries.iter_mut().find(|e| e.table == key) {
            Some(e) => {
                e.handles += 1;
                e.overflow += overflow;
                e.foreign_slot = e.foreign_slot.or(foreign_slot);
            }
            None => st.entries.push(Entry {
                table: key,
                handles: 1,
                overflow,
                foreign_slot,
                mapping: None,
                loan: Loan::None,
            }),
        }
        true
    });
    if counted {
        return Ok(());
    }
    // The loan is gone and the table full: count as `attach` does.
    attach(table)
}

/// Counts one more handle of this process on `table`.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if [`PEER_SLOTS`] other live processes already hold
/// handles.
pub(crate) fn attach(table: &PeerTable) -> Result<()> {
    register_fork_handlers();
    let me = current_process();
    let key = table as *const PeerTable as usize;
    // Count in the table and in the registry under one lock hold, so a fork in between
    // cannot lend the child a different number than the table shows.
    let foreign = table.foreign();
    let try_add = || {
        REGISTRY.with(|st| {
            if foreign {
                // See `my_namespace`: counted without naming us.
                table.add_overflow(1);
            } else if !table.add(me, 1) {
                return false;
            }
            let overflow = u64::from(foreign);
            match st.entries.iter_mut().find(|e| e.table == key) {
                Some(e) => {
                    e.handles += 1;
                    e.overflow += overflow;
                }
                None => st.entries.push(Entry {
                    table: key,
                    handles: 1,
                    overflow,
                    foreign_slot: None,
                    mapping: None,
                    loan: Loan::None,
                }),
            }
            true
        })
    };
    if try_add() {
        return Ok(());
    }
    // Full: free the slots of dead processes (outside the lock: this reads /proc and looks
    // up the table's file through the registry) and try once more.
    table.any_alive();
    if try_add() {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        what: format!(
            "more than {PEER_SLOTS} live processes hold handles to one end of this queue: \
             share fewer handles, or use more queues"
        ),
    })
}

/// Uncounts one handle of this process on `table`.
pub(crate) fn detach(table: &PeerTable) {
    let me = current_process();
    let key = table as *const PeerTable as usize;
    REGISTRY.with(|st| {
        let i = st.entries.iter().position(|e| e.table == key);
        match i {
            Some(i) if st.entries[i].overflow > 0 => {
                st.entries[i].overflow -= 1;
                table.remove_overflow(1);
            }
            Some(i) if st.entries[i].foreign_slot.is_some() => {
                let slot = st.entries[i].foreign_slot.unwrap_or(0);
                table.uncount_loaned(slot);
            }
            _ => table.remove(me, 1),
        }
        if let Some(i) = i {
            st.entries[i].handles -= 1;
            if st.entries[i].handles == 0 {
                st.entries.swap_remove(i);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Box<PeerTable> {
        // SAFETY: all-zero is the empty table (plain atomics).
        let t = unsafe { Box::<PeerTable>::new_zeroed().assume_init() };
        t.namespace.store(my_namespace(), Ordering::Relaxed);
        t
    }

    #[test]
    fn a_table_of_another_pid_namespace_is_foreign_and_counts_its_loans_in_overflow() {
        let t = table();
        assert!(!t.foreign());
        t.namespace
            .store(my_namespace() ^ 0x5a5a, Ordering::Relaxed);
        assert!(t.foreign());
        // A foreign lender names nobody: its loan goes to `overflow`.
        assert_eq!(t.lend(fake(1), 2, None), Loan::Overflow);
        assert_eq!(t.used_slots().len(), 0);
        // And it judges nobody: every counted handle is taken to be alive.
        assert!(t.any_alive());
        t.remove_overflow(2);
        assert!(!t.any_alive());
    }

    #[test]
    fn a_foreign_child_uncounts_its_handles_from_the_loan_it_does_not_own() {
        let t = table();
        let parent = fake(1);
        let Loan::Slot(i) = t.lend(parent, 2, None) else {
            panic!("no slot lent")
        };
        t.bind_loan(i, parent, fake(2));
        t.uncount_loaned(i);
        t.uncount_loaned(i);
        t.uncount_loaned(i); // one too many saturates
        assert_eq!(t.slots[i].owner.load(Ordering::SeqCst), BOUND | fake(2));
        assert_eq!(t.total.load(Ordering::SeqCst), 0);
        assert_eq!(slot_sum(&t), 0);
    }

    /// Made-up identities that no liveness check can judge under Miri; natively the scan
    /// may find them dead, so tests that rely on them staying use loans instead.
    fn fake(i: u64) -> u64 {
        crate::owner::process_identity(1000 + i as u32, 77)
    }

    fn slot_sum(t: &PeerTable) -> u64 {
        t.used_slots()
            .iter()
            .map(|s| u64::from(s.handles.load(Ordering::SeqCst)))
            .sum::<u64>()
            + t.overflow.load(Ordering::SeqCst)
    }

    #[test]
    fn counts_and_frees_a_slot_when_its_last_handle_goes() {
        let t = table();
        assert!(!t.any_handles());
        assert!(t.add(fake(1), 2));
        assert!(t.add(fake(2), 1));
        assert!(t.add(fake(1), 1));
        assert_eq!(t.total.load(Ordering::SeqCst), 4);
        assert_eq!(t.used_slots().len(), 2);
        t.remove(fake(1), 3);
        assert_eq!(t.slots[0].owner.load(Ordering::SeqCst), 0, "slot freed");
        assert!(t.any_handles());
        // A freed slot is reused before the table grows.
        assert!(t.add(fake(3), 1));
        assert_eq!(t.slots[0].owner.load(Ordering::SeqCst), fake(3));
        assert_eq!(t.used_slots().len(), 2);
        t.remove(fake(2), 1);
        t.remove(fake(3), 1);
        assert!(!t.any_handles());
        // Removing more than was counted saturates instead of wrapping.
        assert!(t.add(fake(4), 1));
        t.remove(fake(4), 5);
        assert_eq!(t.total.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn holds_far_more_than_64_processes() {
        let t = table();
        // Well past 64 (the old limit); fewer under Miri, where each scan is slow.
        let n = if cfg!(miri) { 80 } else { 300 };
        for i in 0..n {
            assert!(t.add(fake(i), 1), "process {i}");
        }
        assert_eq!(t.total.load(Ordering::SeqCst), n);
        assert_eq!(t.used_slots().len() as u64, n);
        assert_eq!(slot_sum(&t), n);
    }

    #[test]
    fn a_corrupted_used_bound_is_clamped() {
        let t = table();
        t.used.store(u64::MAX, Ordering::SeqCst);
        assert_eq!(t.used_slots().len(), PEER_SLOTS);
        assert!(t.find(fake(1)).is_none());
    }

    #[test]
    fn a_fork_loan_is_taken_over_by_the_child() {
        let t = table();
        let (parent, child) = (fake(1), fake(2));
        assert!(t.add(parent, 3));
        let Loan::Slot(i) = t.lend(parent, 3, None) else {
            panic!("no slot lent")
        };
        assert_eq!(t.total.load(Ordering::SeqCst), 6);
        assert!(t.take_loan(i, parent, child));
        assert_eq!(t.slots[i].owner.load(Ordering::SeqCst), child);
        // The parent binding after the child took over changes nothing.
        t.bind_loan(i, parent, child);
        assert_eq!(t.slots[i].owner.load(Ordering::SeqCst), child);
        assert_eq!(slot_sum(&t), 6);
    }

    #[test]
    fn a_bound_loan_is_taken_over_by_that_child_only() {
        let t = table();
        let (parent, child) = (fake(1), fake(2));
        let Loan::Slot(i) = t.lend(parent, 1, None) else {
            panic!("no slot lent")
        };
        t.bind_loan(i, parent, child);
        assert_eq!(t.slots[i].owner.load(Ordering::SeqCst), BOUND | child);
        assert!(!t.take_loan(i, parent, fake(3)), "someone else's loan");
        assert!(t.take_loan(i, parent, child));
        assert_eq!(t.slots[i].owner.load(Ordering::SeqCst), child);
    }

    #[test]
    fn a_failed_fork_cancels_its_loan() {
        let t = table();
        let parent = fake(1);
        assert!(t.add(parent, 2));
        let Loan::Slot(i) = t.lend(parent, 2, None) else {
            panic!("no slot lent")
        };
        t.cancel_loan(i, parent);
        assert_eq!(t.slots[i].owner.load(Ordering::SeqCst), 0);
        assert_eq!(t.total.load(Ordering::SeqCst), 2);
        assert_eq!(slot_sum(&t), 2);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "fills all 1024 slots: minutes under Miri; the native run covers it"
    )]
    fn a_full_table_overflows_loudly_and_conservatively() {
        let t = table();
        let parent = fake(1);
        // Unbound loans with handles are never reclaimed: the table stays full.
        for _ in 0..PEER_SLOTS {
            assert!(matches!(t.lend(parent, 1, None), Loan::Slot(_)));
        }
        assert!(!t.add(fake(2), 1), "attach must fail on a full table");
        assert_eq!(t.lend(parent, 5, None), Loan::Overflow);
        assert_eq!(t.total.load(Ordering::SeqCst), PEER_SLOTS as u64 + 5);
        assert_eq!(slot_sum(&t), PEER_SLOTS as u64 + 5);
        // While anything is in overflow, the end counts as connected.
        for s in &t.slots {
            s.handles.store(0, Ordering::SeqCst);
            s.owner.store(0, Ordering::SeqCst);
        }
        t.total.store(5, Ordering::SeqCst);
        assert!(t.scan(fake(3), None));
        t.remove_overflow(5);
        assert!(!t.scan(fake(3), None));
        assert!(!t.any_handles());
    }

    #[test]
    #[cfg_attr(miri, ignore = "looks up the table's mapping in /proc/self/maps")]
    fn a_spawn_loan_whose_slot_was_reused_is_not_bound_any_more() {
        let t = table();
        let me = current_process();
        let old = lend_to_spawn(&t).unwrap();
        assert_eq!(t.slots[old.slot].owner.load(Ordering::SeqCst), LENT | me);
        assert!(t.any_alive(), "a pending loan counts");
        // Its child took it over, then dropped the handle: the slot is free again...
        assert!(t.take_loan(old.slot, old.lender, fake(2)));
        t.remove(fake(2), 1);
        // ... and another spawn of this process claims it.
        let new = lend_to_spawn(&t).unwrap();
        assert_eq!(new.slot, old.slot);
        bind_spawn_loan(&t, old, fake(3)); // stale: must not touch the new loan
        cancel_spawn_loan(&t, old);
        assert_eq!(t.slots[new.slot].owner.load(Ordering::SeqCst), LENT | me);
        assert_eq!(t.total.load(Ordering::SeqCst), 1);
        bind_spawn_loan(&t, new, fake(4));
        assert_eq!(
            t.slots[new.slot].owner.load(Ordering::SeqCst),
            BOUND | fake(4)
        );
        // Settled once: a later cancel changes nothing.
        cancel_spawn_loan(&t, new);
        assert_eq!(
            t.slots[new.slot].owner.load(Ordering::SeqCst),
            BOUND | fake(4)
        );
        assert_eq!(slot_sum(&t), 1);
    }

    #[test]
    fn a_loan_in_progress_counts_as_alive() {
        let t = table();
        let Loan::Slot(_) = t.lend(fake(1), 1, None) else {
            panic!("no slot lent")
        };
        assert!(t.scan(fake(9), None));
    }

    /// An identity of this very process with the wrong start time: "recycled", so dead.
    fn dead(i: u64) -> u64 {
        let (pid, start) = sys::current_process_noalloc();
        crate::owner::process_identity(pid, start.wrapping_add(1 + i))
    }

    #[test]
    #[cfg_attr(miri, ignore = "no /proc under Miri: nothing can be proven dead")]
    fn dead_holders_bound_loans_and_abandoned_reservations_are_reclaimed() {
        let t = table();
        let me = current_process();
        assert!(t.add(me, 1));
        assert!(t.add(dead(1), 4));
        // A loan bound to a child that died in fork.
        let Loan::Slot(i) = t.lend(me, 2, None) else {
            panic!("no slot lent")
        };
        t.bind_loan(i, me, dead(2));
        // A reservation whose lender died before lending anything.
        let j = t.claim_free(LENT | dead(3)).unwrap();
        // A reclaim whose reclaimer died half-way.
        let k = t.claim_free(RECLAIMING | dead(4)).unwrap();
        t.slots[k].handles.store(7, Ordering::SeqCst);
        t.total.fetch_add(7, Ordering::SeqCst);
        assert!(t.scan(me, None), "we are alive");
        for s in [1, i, j, k] {
            assert_eq!(t.slots[s].owner.load(Ordering::SeqCst), 0, "slot {s}");
        }
        assert_eq!(t.total.load(Ordering::SeqCst), 1);
        t.remove(me, 1);
        assert!(!t.scan(me, None));
        assert!(!t.any_handles());
    }

    #[test]
    #[cfg_attr(miri, ignore = "no /proc under Miri: nothing can be proven dead")]
    fn concurrent_reclaimers_subtract_once() {
        for _ in 0..20 {
            let t = table();
            let me = current_process();
            assert!(t.add(me, 1));
            for i in 0..16 {
                assert!(t.add(dead(i), 3));
            }
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| t.scan(me, None));
                }
                // Meanwhile slots are freed and reused by a live holder.
                s.spawn(|| {
                    for _ in 0..50 {
                        if t.add(me, 1) {
                            t.remove(me, 1);
                        }
                    }
                });
            });
            assert_eq!(t.total.load(Ordering::SeqCst), 1);
            assert_eq!(slot_sum(&t), 1);
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "no /proc under Miri")]
    fn a_live_holder_that_maps_the_table_is_kept_one_that_does_not_is_reclaimed() {
        let file = sys::memfd_create("peers-test", 4096).unwrap();
        let map = sys::map_shared_aligned(&file, 4096, 4096).unwrap();
        let (_, _, f) = sys::own_mapping_at(map.as_ptr() as usize).unwrap().unwrap();
        let f = f.unwrap();
        let t = table();
        // This process, judged by another scanner: it maps `f`, so it is kept...
        let me = current_process();
        let scanner = fake(1);
        assert!(t.add(me, 1));
        assert!(t.scan(scanner, Some(f)));
        assert_eq!(t.slots[0].owner.load(Ordering::SeqCst), me);
        assert_ne!(
            t.slots[0].mapped_at.load(Ordering::SeqCst),
            0,
            "proof cached"
        );
        // ... and in a table living in a file it does not map (as after exec), reclaimed.
        let t = table();
        assert!(t.add(me, 1));
        let other = MappedFile {
            inode: f.inode ^ 0x5555,
            ..f
        };
        assert!(!t.scan(scanner, Some(other)));
        assert_eq!(t.slots[0].owner.load(Ordering::SeqCst), 0);
        assert!(!t.any_handles());
        // Unknown file: kept.
        let t = table();
        assert!(t.add(me, 1));
        assert!(t.scan(scanner, None));
    }
}
