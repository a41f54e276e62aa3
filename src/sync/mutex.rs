//! A robust, process-shared futex mutex: [`RawMutex`] and the typed [`Mutex<T>`].
//!
//! # How a dead owner is noticed
//!
//! The lock word holds the owner's identity instead of a bare "locked" bit:
//!
//! ```text
//!  31       30..22              21..0
//! [WAITERS][start-time hash (9)][owner tid (22)]      0 = unlocked
//! ```
//!
//! Linux thread ids are below `PID_MAX_LIMIT` = 2^22, so a tid always fits. The 9 bits
//! are the owner thread's start time (clock ticks after boot) modulo 512. Right after
//! taking the lock the owner also publishes an *owner record*: its tid and full 40-bit
//! start time in one 64-bit word, and its pid namespace in a third word. An unlock
//! clears the record before it releases the word, so a record is only ever the current
//! owner's, a dead owner's that still names itself in the word, or zero.
//!
//! A waiter sleeps on the word with a deadline. Each time the deadline passes while the
//! same owner still holds the lock, the waiter asks the kernel whether that thread still
//! exists (see `crate::liveness`): with the full start time when the record agrees with
//! the word (same tid, same 9-bit hash), with the 9-bit hash alone when it does not (the
//! owner is between its compare-and-swap and its record store). The owner is judged dead
//! only on proof: no such thread (`ESRCH`), a zombie, or a thread with that tid but a
//! different start time (the tid was recycled). A thread that `/proc` hides (`hidepid`,
//! non-dumpable, no `/proc`) but the kernel still knows is alive, and an owner recorded in
//! another pid namespace is never judged at all. Then one waiter clears the dead owner's
//! record, swaps its own identity in with a compare-and-swap against the exact dead word,
//! and the lock is marked poisoned. A live owner is never robbed, however long it holds
//! the lock or if it is stopped (`SIGSTOP`): there is no timeout-based stealing. Checks
//! back off from 2 ms to 64 ms, so a lock whose owner died is recovered within about
//! 70 ms of the death being observable.
//!
//! # What a kill can leave
//!
//! | killed between                        | state left                    | repaired by |
//! |---------------------------------------|-------------------------------|-------------|
//! | lock CAS and record store             | word names it, record 0       | hash check: tid gone/recycled |
//! | record store and unlock               | word and record name it       | full check |
//! | unlock's record clear and word swap   | word names it, record 0       | hash check |
//! | unlock's swap and its futex wake      | word 0, waiters asleep        | waiters' periodic re-check (≤ 64 ms) |
//! | a taker's record clear and its CAS    | word names the dead owner, record 0 | hash check |
//! | a taker's CAS and its poison store    | word names the (dead) taker   | next taker poisons |
//!
//! With the record at zero only the 9-bit hash can be compared, so an owner that died in
//! one of those few-instruction windows, and whose tid was then recycled by a thread with
//! the same hash (1 in 512), keeps the lock until that unrelated thread exits: the check
//! errs towards "alive", never towards robbing. For the same reason an owner stopped in the
//! window between its CAS and its record store cannot be told from a namespace-foreign one;
//! processes in different pid namespaces must not share a lock (named segments refuse to
//! open across namespaces).
//!
//! Compared with a pthread robust mutex (the kernel's robust list), this keeps the whole
//! state in user-visible words, so the lock is valid when zeroed, can be `const`
//! initialised, never needs `pthread_mutex_consistent`, and costs one compare-and-swap and
//! two stores to lock, one store and one swap to unlock. The price is that recovery is
//! noticed by the waiter's periodic check rather than a wake-up from the dying kernel
//! task, and that all processes sharing a lock must share one pid namespace.

use std::cell::UnsafeCell;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{LockResult, PoisonError, TryLockError, TryLockResult};
use std::time::{Duration, Instant};

use crate::shm::ShmSafe;
use crate::sys::{self, Deadline, FutexWait, ThreadIdentity};

const WAITERS: u32 = 1 << 31;
const TID_BITS: u32 = 22;
const TID_MASK: u32 = (1 << TID_BITS) - 1;
const HASH_MASK: u32 = 0x1ff;
/// The poison word: 0 = clean, `POISON_PANIC` = a holder panicked, `tid << 1 | 1` = thread
/// `tid` died holding the lock.
const POISON_PANIC: u32 = 1;
/// The owner-record word packs the tid above a 40-bit start time (348 years at 100 Hz).
const RECORD_START_MASK: u64 = (1 << 40) - 1;

const FIRST_CHECK: Duration = Duration::from_millis(2);
const MAX_CHECK: Duration = Duration::from_millis(64);

#[inline]
fn owner_tag(id: ThreadIdentity) -> u32 {
    // Linux caps thread ids at PID_MAX_LIMIT = 2^22, so this holds on every kernel.
    debug_assert!(
        id.tid <= TID_MASK,
        "thread id {} exceeds PID_MAX_LIMIT",
        id.tid
    );
    id.tid | ((id.start as u32 & HASH_MASK) << TID_BITS)
}

/// The owner record published by a lock holder is trusted only when it names the thread
/// the lock word names: same tid and same start-time hash.
#[inline]
fn record_matches(record: u64, owner: u32) -> bool {
    record >> 40 == u64::from(owner & TID_MASK) && (record as u32 & HASH_MASK) == owner >> TID_BITS
}

#[inline]
fn owner_record(id: ThreadIdentity) -> u64 {
    (u64::from(id.tid) << 40) | (id.start & RECORD_START_MASK)
}

/// The process-shared robust lock under [`Mutex<T>`], usable on its own through
/// [`lock_api`] (`lock_api::Mutex<procshare::RawMutex, T>`).
///
/// Twenty-four bytes, 8-byte aligned, `#[repr(C)]`, valid when all-zero: it can be placed in any shared mapping
/// (a procshare [`Segment`](crate::Segment), a `memmap2` file mapping, a `shared_memory`
/// segment) at an 8-byte aligned offset, without an init call.
///
/// If a thread dies while holding it, the next locker takes it over and
/// [`is_poisoned`](RawMutex::is_poisoned) turns true. (A waiter that has slept past a short,
/// growing interval asks the kernel whether the owning thread still exists, with the start
/// time it had; only a thread the kernel reports gone is replaced, so a live or stopped
/// owner is never robbed.) [`lock_api::RawMutex::lock`] cannot report that, so check
/// `is_poisoned` after locking if you use the lock_api types.
#[repr(C)]
pub struct RawMutex {
    state: AtomicU32,
    poisoned: AtomicU32,
    /// The owner record: tid above the 40-bit start time, or 0 (see the module docs).
    owner: AtomicU64,
    /// The owner's pid namespace (nsfs inode), 0 when unknown. Read only together with a
    /// record that matches the lock word.
    owner_ns: AtomicU32,
    _reserved: AtomicU32,
}

// SAFETY: repr(C) atomics only, no pointers, no drop glue; all-zero is "unlocked, not
// poisoned, no owner", and every other pattern is a state the algorithm tolerates (an
// unknown owner is checked for liveness like any other).
unsafe impl ShmSafe for RawMutex {}

impl RawMutex {
    /// An unlocked, unpoisoned lock (all zero bytes).
    pub const fn new() -> RawMutex {
        RawMutex {
            state: AtomicU32::new(0),
            poisoned: AtomicU32::new(0),
            owner: AtomicU64::new(0),
            owner_ns: AtomicU32::new(0),
            _reserved: AtomicU32::new(0),
        }
    }

    /// Whether a holder died while holding the lock, or panicked (through [`Mutex`]),
    /// since the last [`clear_poison`](RawMutex::clear_poison).
    #[inline]
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Relaxed) != 0
    }

    /// The thread id of the holder whose death poisoned the lock, if that is what
    /// poisoned it (rather than a panic). For a single-threaded process it is the pid.
    ///
    /// ```
    /// let m = procshare::RawMutex::new();
    /// assert_eq!(m.dead_holder(), None);
    /// ```
    pub fn dead_holder(&self) -> Option<u32> {
        match self.poisoned.load(Ordering::Relaxed) {
            0 | POISON_PANIC => None,
            word => Some(word >> 1),
        }
    }

    /// Marks the protected data as consistent again.
    pub fn clear_poison(&self) {
        self.poisoned.store(0, Ordering::Relaxed);
    }

    /// Poisons after a panic; keeps the record of a dead holder if there is one.
    pub(crate) fn poison(&self) {
        let _ =
            self.poisoned
                .compare_exchange(0, POISON_PANIC, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Poisons after taking over from dead thread `tid`.
    fn poison_by_death(&self, tid: u32) {
        self.poisoned.store((tid << 1) | 1, Ordering::Relaxed);
    }

    /// Whether the lock is held by a thread that no longer exists (slow: asks the kernel).
    pub(crate) fn holder_is_dead(&self) -> bool {
        match self.state.load(Ordering::Relaxed) & !WAITERS {
            0 => false,
            owner => self.dead_owner_record(owner, false).is_some(),
        }
    }

    /// Whether some thread (in any process) holds the lock right now.
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != 0
    }

    /// Takes the lock, waiting as long as it takes (a dead owner is detected).
    #[inline]
    pub fn lock(&self) {
        let me = sys::current_thread();
        if self
            .state
            .compare_exchange(0, owner_tag(me), Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended(me, Deadline::NEVER);
        }
        self.publish_owner(me);
    }

    /// Takes the lock if it is free right now.
    #[inline]
    pub fn try_lock(&self) -> bool {
        let me = sys::current_thread();
        let taken = self
            .state
            .compare_exchange(0, owner_tag(me), Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
        if taken {
            self.publish_owner(me);
        }
        taken
    }

    /// Takes the lock, giving up after `timeout`. Returns whether it was taken.
    pub fn lock_timeout(&self, timeout: Duration) -> bool {
        self.lock_until(Deadline::after(timeout))
    }

    pub(crate) fn lock_until(&self, deadline: Deadline) -> bool {
        let me = sys::current_thread();
        let taken = self
            .state
            .compare_exchange(0, owner_tag(me), Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            || self.lock_contended(me, deadline);
        if taken {
            self.publish_owner(me);
        }
        taken
    }

    /// Crash-test hook: takes the free lock like [`try_lock`](Self::try_lock) (spinning
    /// until it is free) but runs `stall` between the compare-and-swap and the owner
    /// record store, where a kill or `SIGSTOP` leaves the word naming an owner whose
    /// record is not yet written.
    #[cfg(any(test, feature = "test-hooks"))]
    #[doc(hidden)]
    pub fn __lock_stalled_before_record(&self, stall: impl FnOnce()) {
        let me = sys::current_thread();
        while self
            .state
            .compare_exchange(0, owner_tag(me), Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        stall();
        self.publish_owner(me);
    }

    /// Publishes the full identity of the thread that has just taken the lock.
    #[inline]
    fn publish_owner(&self, me: ThreadIdentity) {
        self.owner_ns.store(me.ns, Ordering::Relaxed);
        // SYNC POINT: a checker that reads this record with Acquire sees the namespace.
        self.owner.store(owner_record(me), Ordering::Release);
    }

    /// Releases the lock.
    ///
    /// The word is released only if it names the calling thread: a copy of a guard that
    /// crossed a `fork` (the child is another thread, with another identity) leaves the
    /// lock, which may meanwhile belong to someone else, alone.
    ///
    /// # Safety
    ///
    /// The calling thread must hold the lock.
    #[inline]
    pub unsafe fn unlock(&self) {
        let me = owner_tag(sys::current_thread());
        let mut s = self.state.load(Ordering::Relaxed);
        if s & !WAITERS != me {
            return;
        }
        // Clear the record first: once the word is free, the next owner may have our tid
        // (recycled) but must never be judged by our start time.
        self.owner.store(0, Ordering::Relaxed);
        // SYNC POINT: releases the data and the cleared record to the next locker (and,
        // through its compare-and-swap, to anyone who reads its word with Acquire). Only
        // a waiter setting WAITERS can change the word under us, so this loops at most
        // once more.
        while let Err(now) =
            self.state
                .compare_exchange_weak(s, 0, Ordering::Release, Ordering::Relaxed)
        {
            if now & !WAITERS != me {
                return;
            }
            s = now;
        }
        if s & WAITERS != 0 {
            sys::futex_wake(&self.state, 1);
        }
    }

    /// Whether the calling thread holds the lock.
    pub(crate) fn held_by_current_thread(&self) -> bool {
        self.state.load(Ordering::Relaxed) & !WAITERS == owner_tag(sys::current_thread())
    }

    #[cold]
    fn lock_contended(&self, me: ThreadIdentity, deadline: Deadline) -> bool {
        // No spinning before sleeping, as in glibc's robust mutex. Across processes a
        // spinning waiter keeps pulling the lock's cache line away from the holder, and
        // the holder's own next lock/unlock pays for it: in `benches/locks.rs` two
        // processes hammering one lock did 21 M increments/s without a spin, 15.6 M with
        // 20 polls and 10.8 M with 400 (pthread robust: 12.4 M). Handing the lock over
        // through the futex also lets the holder run on while the waiter wakes.
        let tag = owner_tag(me);
        let mut watched = 0;
        let mut check_every = FIRST_CHECK;
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s == 0 {
                // Take it marked contended: other sleepers may remain, and our unlock
                // must wake them.
                if self
                    .state
                    .compare_exchange(0, tag | WAITERS, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            if s & WAITERS == 0
                && self
                    .state
                    .compare_exchange(s, s | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let held = s | WAITERS;
            if held != watched {
                watched = held;
                check_every = FIRST_CHECK;
            }
            match sys::futex_wait(&self.state, held, deadline.capped(check_every)) {
                FutexWait::Woken => continue,
                FutexWait::TimedOut => {}
            }
            if self.state.load(Ordering::Acquire) != held {
                continue;
            }
            // Past the first checks, also ask whether a living owner has exec'd another
            // program (and so left the mapping, and the lock, behind).
            let deep = check_every >= MAX_CHECK;
            if let Some(record) = self.dead_owner_record(held & !WAITERS, deep) {
                // Clear the dead owner's record (only that one: a faster taker may already
                // have published its own) so that, between our compare-and-swap and our own
                // record store, nobody judges us by the dead owner's start time.
                if record != 0 {
                    let _ = self.owner.compare_exchange(
                        record,
                        0,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                // SYNC POINT: AcqRel publishes the cleared record with our word.
                if self
                    .state
                    .compare_exchange(held, tag | WAITERS, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    self.poison_by_death(held & TID_MASK);
                    return true;
                }
                continue;
            }
            if deadline.has_passed() {
                return false;
            }
            check_every = (check_every * 2).min(MAX_CHECK);
        }
    }

    /// If the thread named by `owner` (a lock word without the waiters bit) is provably
    /// gone, the owner record the verdict was based on (0 when only the hash was usable).
    /// Errs on the side of "alive": when the kernel cannot tell, nobody is robbed.
    ///
    /// With `deep`, an owner that still runs but no longer maps the lock (its process
    /// `exec`'d another program, which keeps the thread's id and start time) counts as gone
    /// too: nothing in that program can unlock it.
    fn dead_owner_record(&self, owner: u32, deep: bool) -> Option<u64> {
        let tid = owner & TID_MASK;
        let hash = u64::from(owner >> TID_BITS);
        // The word was loaded with Acquire, so this sees at least the record as it was
        // when the word was written: cleared by the previous unlock or taker, or ours.
        let record = self.owner.load(Ordering::Acquire);
        let dead = if record_matches(record, owner) {
            let ns = self.owner_ns.load(Ordering::Relaxed);
            crate::liveness::thread_in_namespace_is_dead(tid, record, 40, ns)
                || (deep && ns == sys::current_thread().ns && self.owner_left_mapping(tid))
        } else {
            // The owner has not published its record yet (or died before it could):
            // only the hash in the word itself can be compared.
            crate::liveness::thread_is_dead(tid, hash, HASH_MASK.count_ones())
        };
        dead.then_some(if record_matches(record, owner) {
            record
        } else {
            0
        })
    }
}

impl RawMutex {
    /// Whether the process of live thread `tid` provably no longer maps the memory this
    /// lock lives in (its `/proc/<tid>/maps` is readable and lacks our file). Locks outside
    /// file-backed shared mappings (a thread-shared heap lock) are never judged this way.
    #[cold]
    fn owner_left_mapping(&self, tid: u32) -> bool {
        let Ok(Some((_, _, Some(file)))) = sys::own_mapping_at(self as *const Self as usize) else {
            return false;
        };
        matches!(sys::process_maps_file(tid, file), Ok(Some(false)))
    }
}

impl Default for RawMutex {
    fn default() -> Self {
        RawMutex::new()
    }
}

impl fmt::Debug for RawMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state.load(Ordering::Relaxed);
        f.debug_struct("RawMutex")
            .field("locked", &(s != 0))
            .field("owner_tid", &(s & TID_MASK))
            .field("poisoned", &self.is_poisoned())
            .finish()
    }
}

// SAFETY: `lock`/`try_lock` give mutual exclusion (a single CAS from 0 or from a dead
// owner's exact word admits one thread); `unlock` requires the lock to be held. Guards are
// not Send because the owner's identity is the locking thread's: if another thread held
// the guard after the locking thread exited, the lock would be judged abandoned.
unsafe impl lock_api::RawMutex for RawMutex {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: RawMutex = RawMutex::new();
    type GuardMarker = lock_api::GuardNoSend;

    fn lock(&self) {
        RawMutex::lock(self)
    }

    fn try_lock(&self) -> bool {
        RawMutex::try_lock(self)
    }

    unsafe fn unlock(&self) {
        // SAFETY: forwarded contract: the caller holds the lock.
        unsafe { RawMutex::unlock(self) }
    }

    fn is_locked(&self) -> bool {
        RawMutex::is_locked(self)
    }
}

// SAFETY: the timed variants are the same lock with a deadline.
unsafe impl lock_api::RawMutexTimed for RawMutex {
    type Duration = Duration;
    type Instant = Instant;

    fn try_lock_for(&self, timeout: Duration) -> bool {
        self.lock_timeout(timeout)
    }

    fn try_lock_until(&self, deadline: Instant) -> bool {
        self.lock_timeout(deadline.saturating_duration_since(Instant::now()))
    }
}

/// A mutual-exclusion lock shared between processes, with std's API and poisoning.
///
/// Place it in shared memory (inside a [`Shared`](crate::Shared), or in-place in any
/// mapping with [`shm::init_in`](crate::shm::init_in) / [`shm::place`](crate::shm::place))
/// and lock it from any process. It is `#[repr(C)]`: a 24-byte [`RawMutex`] followed by
/// the `T`, aligned to 8 bytes or `T`'s alignment if larger; all-zero bytes are an
/// unlocked, unpoisoned `Mutex` around an all-zero `T`. If a process dies while holding the lock, the next locker gets it with
/// `Err(PoisonError)` carrying the guard, exactly as after a panic in std: inspect or
/// repair the data, then [`clear_poison`](Mutex::clear_poison).
///
/// ```
/// use procshare::{Mutex, Shared};
///
/// let counter = Shared::new(Mutex::new(0u64))?;
/// *counter.lock().unwrap() += 1;
/// assert_eq!(*counter.lock().unwrap(), 1);
/// # Ok::<(), procshare::Error>(())
/// ```
#[repr(C)]
pub struct Mutex<T> {
    raw: RawMutex,
    data: UnsafeCell<T>,
}

// SAFETY: the lock serialises all access to `data`; T: Send lets a value be handed from
// one thread to another through it, as for std's Mutex.
unsafe impl<T: Send> Sync for Mutex<T> {}
// SAFETY: moving the mutex moves the T.
unsafe impl<T: Send> Send for Mutex<T> {}
// SAFETY: repr(C) of a ShmSafe RawMutex and an UnsafeCell<T> with T: ShmSafe (UnsafeCell
// is repr(transparent)); no pointers, no drop glue, zero is valid when it is for T.
unsafe impl<T: ShmSafe + Send> ShmSafe for Mutex<T> {}

impl<T> Mutex<T> {
    /// A new unlocked mutex holding `value`.
    pub const fn new(value: T) -> Mutex<T> {
        Mutex {
            raw: RawMutex::new(),
            data: UnsafeCell::new(value),
        }
    }

    /// Locks, waiting as long as needed.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` (holding the guard; the lock *is* held) if a previous holder
    /// panicked or its process died while holding it.
    #[inline]
    pub fn lock(&self) -> LockResult<MutexGuard<'_, T>> {
        self.raw.lock();
        // SAFETY: we just took the lock.
        unsafe { self.guard() }
    }

    /// Locks only if the lock is free now.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if it is held, `Poisoned` as for [`lock`](Mutex::lock).
    pub fn try_lock(&self) -> TryLockResult<MutexGuard<'_, T>> {
        if !self.raw.try_lock() {
            return Err(TryLockError::WouldBlock);
        }
        // SAFETY: we just took the lock.
        Ok(unsafe { self.guard() }?)
    }

    /// Locks, giving up after `timeout`.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if the lock was still held by a live owner when `timeout` passed;
    /// `Poisoned` as for [`lock`](Mutex::lock).
    pub fn lock_timeout(&self, timeout: Duration) -> TryLockResult<MutexGuard<'_, T>> {
        if !self.raw.lock_timeout(timeout) {
            return Err(TryLockError::WouldBlock);
        }
        // SAFETY: we just took the lock.
        Ok(unsafe { self.guard() }?)
    }

    /// Whether the data may be inconsistent (a holder panicked or died).
    pub fn is_poisoned(&self) -> bool {
        self.raw.is_poisoned()
    }

    /// Declares the data consistent again.
    pub fn clear_poison(&self) {
        self.raw.clear_poison();
    }

    /// The thread id of the holder whose death poisoned the lock, if a death (rather than
    /// a panic) did; see [`RawMutex::dead_holder`].
    pub fn dead_holder(&self) -> Option<u32> {
        self.raw.dead_holder()
    }

    /// Mutable access without locking: `&mut self` proves no one else can use it.
    ///
    /// # Errors
    ///
    /// `Err` (holding the reference) if poisoned.
    pub fn get_mut(&mut self) -> LockResult<&mut T> {
        let data = self.data.get_mut();
        if self.raw.is_poisoned() {
            Err(PoisonError::new(data))
        } else {
            Ok(data)
        }
    }

    /// The underlying raw lock.
    pub fn raw(&self) -> &RawMutex {
        &self.raw
    }

    /// # Safety
    ///
    /// The calling thread must hold `self.raw`.
    #[inline]
    pub(crate) unsafe fn guard(&self) -> LockResult<MutexGuard<'_, T>> {
        let guard = MutexGuard {
            // SAFETY: forwarded contract: this thread holds the lock.
            lock: unsafe { RawGuard::new(&self.raw) },
            data: &self.data,
        };
        if self.raw.is_poisoned() {
            Err(PoisonError::new(guard))
        } else {
            Ok(guard)
        }
    }
}

impl<T: Default> Default for Mutex<T> {
    fn default() -> Self {
        Mutex::new(T::default())
    }
}

impl<T: fmt::Debug> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Mutex");
        match self.try_lock() {
            Ok(guard) => d.field("data", &&*guard),
            Err(TryLockError::Poisoned(p)) => d.field("data", &&*p.into_inner()),
            Err(TryLockError::WouldBlock) => d.field("data", &format_args!("<locked>")),
        };
        d.field("poisoned", &self.is_poisoned()).finish()
    }
}

/// Holds a [`RawMutex`] and releases it on drop, poisoning it if the thread is panicking
/// (and was not already panicking when it locked, as in std).
pub(crate) struct RawGuard<'a> {
    raw: &'a RawMutex,
    panicking: bool,
    // The lock is owned by this thread: the guard must stay on it.
    _not_send: PhantomData<*const ()>,
}

impl<'a> RawGuard<'a> {
    /// # Safety
    ///
    /// The calling thread must hold `raw`; the guard takes over releasing it.
    #[inline]
    pub(crate) unsafe fn new(raw: &'a RawMutex) -> RawGuard<'a> {
        RawGuard {
            raw,
            panicking: std::thread::panicking(),
            _not_send: PhantomData,
        }
    }

    pub(crate) fn raw(&self) -> &'a RawMutex {
        self.raw
    }
}

impl Drop for RawGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // A copy of a guard that crossed a fork neither poisons nor releases the lock: the
        // child is not its holder (see `RawMutex::unlock`).
        if !self.panicking && std::thread::panicking() && self.raw.held_by_current_thread() {
            self.raw.poison();
        }
        // SAFETY: a RawGuard exists only while its thread holds the lock.
        unsafe { self.raw.unlock() }
    }
}

/// Access to the data of a locked [`Mutex`]; unlocks when dropped.
#[must_use = "the mutex unlocks as soon as the guard is dropped"]
pub struct MutexGuard<'a, T> {
    pub(crate) lock: RawGuard<'a>,
    data: &'a UnsafeCell<T>,
}

// SAFETY: sharing a guard shares `&T`, which is fine when T: Sync.
unsafe impl<T: Sync> Sync for MutexGuard<'_, T> {}

impl<'a, T> MutexGuard<'a, T> {
    /// Splits the guard for [`Condvar`](crate::Condvar): returns the raw lock and the
    /// data cell, releasing nothing.
    pub(crate) fn into_parts(self) -> (RawGuard<'a>, &'a UnsafeCell<T>) {
        (self.lock, self.data)
    }

    /// # Safety
    ///
    /// `lock` must guard `data`.
    pub(crate) unsafe fn from_parts(lock: RawGuard<'a>, data: &'a UnsafeCell<T>) -> Self {
        MutexGuard { lock, data }
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard proves this thread holds the lock, so no one else accesses data.
        unsafe { &*self.data.get() }
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for deref; `&mut self` makes this the only reference from this guard.
        unsafe { &mut *self.data.get() }
    }
}

impl<T: fmt::Debug> fmt::Debug for MutexGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn zeroed_is_unlocked() {
        // SAFETY: RawMutex is ShmSafe, whose contract makes all-zero valid.
        let raw: RawMutex = unsafe { std::mem::zeroed() };
        assert!(raw.try_lock());
        assert!(!raw.try_lock());
        // SAFETY: held by this thread.
        unsafe { raw.unlock() };
        assert!(!raw.is_locked());
    }

    #[test]
    fn threads_exclude_each_other() {
        let each = if cfg!(miri) { 60 } else { 20_000 };
        let m = Arc::new(Mutex::new(0u64));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for _ in 0..each {
                        *m.lock().unwrap() += 1;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(*m.lock().unwrap(), 4 * each);
    }

    #[test]
    fn panic_poisons_and_clear_restores() {
        let m = Arc::new(Mutex::new(1));
        let m2 = Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("boom");
        })
        .join();
        assert!(m.is_poisoned());
        let g = m.lock().unwrap_err().into_inner();
        assert_eq!(*g, 1);
        drop(g);
        m.clear_poison();
        assert!(m.lock().is_ok());
    }

    #[test]
    #[cfg_attr(miri, ignore = "liveness comes from /proc, which Miri cannot see")]
    fn exited_thread_holding_the_lock_is_detected() {
        let m = Arc::new(Mutex::new(5));
        let m2 = Arc::clone(&m);
        std::thread::spawn(move || std::mem::forget(m2.lock().unwrap()))
            .join()
            .unwrap();
        let start = Instant::now();
        let g = m.lock().unwrap_err().into_inner();
        assert_eq!(*g, 5);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn timeout_gives_up_on_a_live_owner() {
        let m = Arc::new(Mutex::new(()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let m2 = Arc::clone(&m);
        let t = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            tx.send(()).unwrap();
            done_rx.recv().unwrap();
        });
        rx.recv().unwrap();
        let start = Instant::now();
        assert!(matches!(
            m.lock_timeout(Duration::from_millis(150)),
            Err(TryLockError::WouldBlock)
        ));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(m.lock_timeout(Duration::from_millis(150)).is_ok());
    }

    #[test]
    fn lock_api_wrapper_works() {
        let m: lock_api::Mutex<RawMutex, i32> = lock_api::Mutex::new(3);
        *m.lock() += 1;
        assert_eq!(*m.try_lock_for(Duration::from_millis(10)).unwrap(), 4);
    }
}
