//! The waker registry behind `impl Future for AsyncResult`, and the one thread the pool
//! may start: a *waiter* that sleeps on the doorbell ring and wakes an executor when a
//! reply arrives. See "Async" in the [module docs](super) for why a thread, and how it
//! stays out of the way of `fork`.
//!
//! # Protocol
//!
//! * A future that polls `Pending` stores its waker under its job id
//!   ([`Registry::register`]) and starts the waiter if it is not running.
//! * The pool's scheduler (on the pool's own thread, in any `pump`) wakes a job's waker
//!   when the job completes ([`Registry::wake_job`]), and counts every pump
//!   ([`Registry::progressed`]).
//! * The waiter sleeps until the doorbell ring is non-empty (a reply is waiting) or a
//!   20 ms slice passes (a worker may have died, or a task timed out: someone must look).
//!   If no pump happened meanwhile, it wakes **one** registered waker (the *driver*) and
//!   gives it a slice to pump before waking another. The driver's pump takes the replies
//!   and wakes the futures whose jobs they completed. So a reply costs one wake, however
//!   many futures wait.
//! * With no registered waker for [`LINGER`], the waiter exits.
//! * [`pause_all`] (called before every fork this crate makes) stops and joins every
//!   waiter of the process and wakes every registered waker; they poll again, and the
//!   first to find its job still pending starts a new waiter, after the fork.
//!
//! Everything here is process-local (a `std` mutex and condvar, never in shared memory);
//! the only shared-memory access is the waiter's read of the doorbell ring's head.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Waker;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::channel;

/// How long an idle waiter (no future pending) lives on before exiting.
pub(crate) const LINGER: Duration = Duration::from_millis(50);
/// The waiter's longest sleep: how soon a death or timeout is looked at while futures wait.
const SLICE: Duration = super::core::SLICE;

/// The waiters of this process, for [`pause_all`].
static WAITERS: Mutex<Vec<Weak<Registry>>> = Mutex::new(Vec::new());

pub(crate) struct Registry {
    inner: Mutex<Inner>,
    cv: Condvar,
    /// Set (with `inner.stop`) to end the waiter's sleep on the ring promptly.
    stop: AtomicBool,
    /// A receiving handle on the pool's doorbell ring: only looked at, never received from.
    bells: channel::Receiver<u32>,
}

#[derive(Default)]
struct Inner {
    wakers: HashMap<u64, Waker>,
    /// Pumps so far (the waiter wakes a driver only if none happened while it slept).
    progress: u64,
    stop: bool,
    /// The waiter's handle while it runs, or after it exited by itself (not yet joined),
    /// with the pid of the process that started it.
    thread: Option<(u32, JoinHandle<()>)>,
    running: bool,
}

impl Inner {
    /// Takes the waiter's handle if it belongs to this process. In the child of a fork
    /// made without [`pause_all`] (`fork_unchecked`, a raw `fork`) the thread does not
    /// exist: its handle is forgotten, never joined or detached.
    fn take_thread(&mut self) -> Option<JoinHandle<()>> {
        let (pid, h) = self.thread.take()?;
        if pid == std::process::id() {
            Some(h)
        } else {
            self.running = false;
            std::mem::forget(h);
            None
        }
    }
}

/// Wakes `w`; a panic in the executor's `wake` is caught and dropped. The waker is called
/// from places where an unwind would do harm: the waiter thread (its other futures would
/// never be woken again), the pump of any pool call (an unrelated `map` would panic), and
/// the pause before a fork or the pool's drop (the wakers after it would be lost, and a
/// panic in a drop during unwinding aborts). Such a waker's task is then not woken by this
/// wake: its executor is broken anyway.
fn wake_quietly(w: Waker) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.wake()));
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding the lock but a user's `Waker::clone`; the data
    // stays consistent anyway (a map insert either happened or not).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    pub(crate) fn new(bells: channel::Receiver<u32>) -> Arc<Registry> {
        Arc::new(Registry {
            inner: Mutex::new(Inner::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            bells,
        })
    }

    /// Stores `waker` for `job` and makes sure the waiter runs. Returns false if the
    /// waiter thread could not be started (then nothing will wake `waker`).
    pub(crate) fn register(self: &Arc<Self>, job: u64, waker: &Waker) -> bool {
        let mut g = lock(&self.inner);
        match g.wakers.get_mut(&job) {
            Some(w) if w.will_wake(waker) => {}
            Some(w) => w.clone_from(waker),
            None => {
                g.wakers.insert(job, waker.clone());
            }
        }
        self.cv.notify_all();
        if g.thread.as_ref().is_some_and(|t| t.0 != std::process::id()) {
            let _ = g.take_thread(); // inherited through a fork: no such thread here
        }
        if g.running {
            return true;
        }
        if let Some(old) = g.take_thread() {
            // It has exited (it clears `running` under this lock as its last step).
            let _ = old.join();
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("procshare-pool-waker".into())
            .stack_size(256 << 10)
            .spawn(move || me.run());
        match spawned {
            Ok(h) => {
                g.thread = Some((std::process::id(), h));
                g.running = true;
                drop(g);
                let mut all = lock(&WAITERS);
                all.retain(|w| w.strong_count() > 0);
                if !all
                    .iter()
                    .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(self)))
                {
                    all.push(Arc::downgrade(self));
                }
                true
            }
            Err(_) => {
                g.wakers.remove(&job);
                false
            }
        }
    }

    /// Forgets `job`'s waker (its future was dropped or resolved).
    pub(crate) fn unregister(&self, job: u64) {
        lock(&self.inner).wakers.remove(&job);
    }

    /// Wakes `job`'s future, if it waits.
    pub(crate) fn wake_job(&self, job: u64) {
        let w = lock(&self.inner).wakers.remove(&job);
        if let Some(w) = w {
            wake_quietly(w);
        }
    }

    /// Records that the pool pumped (took whatever replies were waiting).
    pub(crate) fn progressed(&self) {
        let mut g = lock(&self.inner);
        g.progress = g.progress.wrapping_add(1);
        if g.running {
            self.cv.notify_all();
        }
    }

    /// The waiter thread.
    fn run(&self) {
        let mut g = lock(&self.inner);
        let mut idle_since = Instant::now();
        loop {
            if g.stop {
                break;
            }
            if g.wakers.is_empty() {
                let left = LINGER.saturating_sub(idle_since.elapsed());
                if left.is_zero() {
                    break;
                }
                g = self
                    .cv
                    .wait_timeout(g, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            let seen = g.progress;
            drop(g);
            self.bells
                .wait_not_empty(SLICE, || self.stop.load(Ordering::Relaxed));
            g = lock(&self.inner);
            if g.stop {
                break;
            }
            if g.progress != seen {
                continue; // someone pumped meanwhile: look again
            }
            // Nobody pumped: a reply waits, or a slice passed. Wake one driver.
            let Some(&job) = g.wakers.keys().next() else {
                idle_since = Instant::now();
                continue;
            };
            let w = g.wakers.remove(&job).expect("key just read");
            drop(g);
            // An executor's waker that panics must not end the waiter (its futures
            // would never be woken again).
            wake_quietly(w);
            g = lock(&self.inner);
            let until = Instant::now() + SLICE;
            while g.progress == seen && !g.stop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                g = self
                    .cv
                    .wait_timeout(g, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if g.wakers.is_empty() {
                idle_since = Instant::now();
            }
        }
        g.running = false;
    }

    /// Stops and joins the waiter (if any), then wakes every registered waker, so that
    /// their futures poll again (and start a new waiter if they still wait). Returns
    /// whether a thread was joined.
    fn pause(&self) -> bool {
        let handle = {
            let mut g = lock(&self.inner);
            g.stop = true;
            self.stop.store(true, Ordering::Relaxed);
            self.cv.notify_all();
            g.take_thread()
        };
        self.bells.wake_receivers();
        let joined = handle.is_some();
        if let Some(h) = handle {
            let _ = h.join();
        }
        let wakers: Vec<Waker> = {
            let mut g = lock(&self.inner);
            g.stop = false;
            g.running = false;
            self.stop.store(false, Ordering::Relaxed);
            g.wakers.drain().map(|(_, w)| w).collect()
        };
        // One panicking waker must neither make the fork (or the pool's drop) panic nor
        // leave the wakers after it unwoken for good.
        wakers.into_iter().for_each(wake_quietly);
        joined
    }

    /// Stops and joins the waiter for good (the pool is going away).
    pub(crate) fn shutdown(&self) {
        self.pause();
    }
}

/// Stops and joins every pool waiter thread of this process, so that a fork right after
/// sees the process single-threaded again (if it was before the waiters started). The
/// futures that were waiting are woken and start a new waiter when next polled `Pending`.
pub(crate) fn pause_all() {
    let all: Vec<Arc<Registry>> = {
        let mut all = lock(&WAITERS);
        all.retain(|w| w.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    let mut joined = false;
    for r in all {
        joined |= r.pause();
    }
    if joined {
        // A joined thread is gone from the process's thread count a moment after `join`
        // returns (the kernel wakes the joiner before it unlinks the thread): wait for
        // the count to drop, briefly.
        let until = Instant::now() + Duration::from_millis(20);
        while Instant::now() < until && crate::sys::thread_count().is_ok_and(|n| n > 1) {
            std::thread::yield_now();
        }
    }
}
