//! Python's `multiprocessing.Pool` and `ProcessPoolExecutor`, over shared-memory rings, as a
//! pool that a dead worker cannot break.
//!
//! ```
//! use procshare::Pool;
//!
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! let pool = Pool::new(2)?;
//! assert_eq!(pool.map(square, 0..10)?, (0..10).map(|x| x * x).collect::<Vec<_>>());
//! let r = pool.apply_async(|s: String| s.len(), "hello".to_string())?;
//! assert_eq!(r.get()?, 5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Tasks are `fn(A) -> R` items or closures that capture nothing (checked at compile
//! time, as for [`Process::spawn`](crate::Process::spawn)); arguments and results travel
//! with postcard. Workers start under any [`StartMethod`] (see [Start
//! methods](#start-methods)); the pool itself starts no thread that outlives a fork (only a
//! waiter while a [`Future`](#async) waits, stopped before every fork), so it can fork
//! replacements later.
//!
//! # Start methods
//!
//! [`PoolBuilder::start_method`] fixes the method for every worker, replacements
//! included. Without it (and with [`Pool::new`]) each worker's start, the first ones and
//! every replacement, follows [`Process`](crate::Process)'s default rule
//! ([`default_start_method`](crate::process::default_start_method)) at that moment:
//! `Fork` while this process is single-threaded, else `ForkServer` if this process
//! already runs a fork server, else `Spawn` if [`procshare::init()`](crate::init) ran,
//! else the error [`Error::MultiThreaded`]. So a pool built first thing in `main` forks,
//! and if the program starts threads later (a multi-threaded runtime), a dead or
//! recycled worker is replaced by a spawned one instead of stopping the pool.
//!
//! | | `Fork` | `Spawn` | `ForkServer` |
//! |---|---|---|---|
//! | a worker is | a fork of the pool's process | a re-executed copy of the program, whose `main` calls `init()` first | a fork of the fork server (a fresh image stopped in `init()`), the server's child |
//! | its body | a closure over its rings | a plain `fn`, found by `Process::spawn`'s handshake (same executable, same function type); its rings, doorbell sender and control socket cross in its argument, descriptors out of band | as Spawn |
//! | task functions | found at the same offset from an anchor as in the pool's process (the same code: a copy, or the same executable, checked by the handshake), then the type hash is checked | as Fork | as Fork |
//! | initializer argument | a clone, inherited | encoded into the worker's argument (handles in it cross as in any `Process::spawn` argument) | as Spawn |
//! | what a worker sees of the pool's process | everything (a copy) | nothing but what it is sent | the server's state at `init()` |
//! | arrays for chunk maps | descriptor sent over the control socket, mapped once per worker | same | same |
//! | starting a worker costs | a fork | an exec and the program's start-up to `init()` | a request to the server and a fork of a small process |
//! | this process has other threads | refused ([`Error::MultiThreaded`]): `build` fails, a later replacement stops the pool with [`TaskError::Start`] | safe | safe |
//! | the pool's waiter thread (alive while a future waits) | stopped and joined before each fork, restarted by the next poll | no pause needed | no pause needed |
//! | the pool's process dies | `PR_SET_PDEATHSIG` kills the workers | same | the server sees it, kills its daemon children (the workers) and exits; they also carry `PR_SET_PDEATHSIG` towards the server |
//!
//! A task's function must be the same compiled code in the pool's process and its worker,
//! so both must run the same executable: the handshake of Spawn and ForkServer checks
//! that, and a worker that fails it (or that never reaches `init()` within its 10 s
//! bootstrap timeout, or exits before) stops the pool with [`TaskError::Start`] saying
//! why, never a respawn loop. `Spawn` and `ForkServer` without `init()` make `build`
//! fail.
//!
//! # How work moves
//!
//! Each worker has two [`ByteQueue`](crate::ByteQueue)s of its own (tasks in, replies
//! out) and all share one [`channel`](fn@crate::channel) of `u32` "doorbells" (sized by the
//! number of workers) on which a worker rings its number after each reply (64 KiB rings;
//! larger messages stream through in pieces). Each worker also has a control socket that
//! carries only segment descriptors for the zero-copy chunk maps. The pool queues chunks
//! to a worker ahead of time while there is plenty of work: up to 128 while its chunks
//! come back quickly (under 100 µs each), so a worker runs through small tasks without
//! waiting for the pool to wake up, 2 (one running, one ready) while they take up to a
//! millisecond, and only the running one while they take longer or before its first one
//! came back, so long tasks are not split between workers in advance (a chunk waiting
//! behind a long one is one the other worker could have started). The k-th is queued only while at least k × processes chunks wait, so the tail
//! of a job goes to whichever worker is free first. A worker runs its chunks in order, so the pool
//! knows exactly which chunk each worker is running: the oldest it sent that has not come
//! back. No pipe or socket carries data; the pidfd of each worker (through
//! [`Child`](crate::Child)) tells of its death.
//!
//! There is no supervisor thread: the pool does its work while the caller waits in one of
//! its calls (`map`, `get`, iterating `imap`, `ready`, `join`, or a poll of an
//! [`AsyncResult`] future). Work already sent runs on meanwhile; results wait in the rings.
//!
//! # Async
//!
//! [`AsyncResult`] (what `apply_async`, `map_async` and `submit` return) implements
//! [`Future`], with the same output as [`get`](AsyncResult::get), so
//! a single-threaded executor (tokio's `current_thread` runtime with a `LocalSet`, smol's
//! `LocalExecutor`, any `block_on`) can `.await` pool work. The pool is `!Send`, so its
//! futures are too: they live on the pool's thread. No runtime is a dependency.
//!
//! A poll never waits: it moves the pool on (`ready`'s non-blocking step: send queued
//! chunks, take replies, check for deaths and timeouts) and, if the job is not done,
//! stores the task's waker in the pool's registry. Something must then wake the task when
//! a reply arrives, while the executor sleeps. The choices were:
//!
//! | design | verdict |
//! |---|---|
//! | wake itself at once (`wake_by_ref`) on every `Pending` | a busy loop: one CPU burnt per waiting executor |
//! | a timer | no timer without a runtime or a thread |
//! | a descriptor the user registers with their reactor (an eventfd the workers write) | runtime-specific glue in every caller, and an extra syscall per reply; not a `Future` |
//! | **a waiter thread, started on the first `Pending`, gone when no future waits** | chosen |
//!
//! The waiter sleeps on the doorbell ring's eventcount (a shared futex; it never takes a
//! doorbell, only looks) and, when a reply is waiting or a 20 ms slice has passed (a
//! worker may have died: someone must look), wakes **one** waiting task, the *driver*,
//! unless a pump happened meanwhile. The driver's poll takes every waiting reply and wakes
//! exactly the futures whose jobs completed, so a reply costs one wake-up however many
//! futures wait (a join of thousands does not stampede). The waiter exits 50 ms after the
//! last future stopped waiting.
//!
//! A thread makes `fork` unsafe while it runs, so **every fork this crate makes stops it
//! first**: [`Process::fork`](crate::Process::fork), the `Fork` start method, and the
//! pool's own respawn of a dead worker under `Fork` (or under the default rule, which
//! tries `Fork` first) join every waiter of the process (the waiter holds
//! no lock a child could need: it only waits on a futex and calls wakers), wake the
//! futures that were waiting, and fork in a process that is single-threaded again. The
//! woken futures poll again and start a new waiter after the fork. (The child of a fork
//! made without that step, `fork_unchecked` or a raw `fork`, inherits the waiter's handle
//! but not its thread: it recognises the handle as its parent's by the pid and forgets
//! it, never joins it.) So a program that
//! awaits pool work can still fork, and the pool still replaces dead workers while
//! futures wait. Under `Spawn` and `ForkServer` nothing is forked in this process (the
//! fork server forks itself, a fresh single-threaded image), so the waiter is not
//! stopped at all. (A process that has other threads of its own, such as a
//! multi-threaded runtime, cannot fork: a pool with the default start method then spawns
//! its workers, or uses the fork server, as `Process` does; a pool fixed to `Fork` must be
//! built before the runtime starts, and cannot replace a dead worker afterwards: see the
//! failure table.)
//!
//! A waker whose `wake` panics (a broken executor) is caught wherever the pool wakes it
//! (the waiter, a pump, the pause before a fork, the pool's drop): the panic goes no
//! further and the other futures are still woken; that waker's task just is not.
//!
//! What a poll may still wait for: a large reply (over 16 KiB) that a worker is already
//! streaming through its 64 KiB ring is read to its end (bounded by 1 s per poll), a big
//! task frame is written while its worker reads it, and a worker that used its
//! `max_tasks_per_child` is reaped as it exits. Latency: a future's result is seen one
//! thread wake-up after the worker rings (plus the executor's own wake-up); a worker's
//! death within about 20 ms.
//!
//! # Zero-copy chunk maps
//!
//! [`Pool::map_chunks`] (`f(&[T]) -> R` per chunk) and [`Pool::for_each_chunk_mut`]
//! (`f(&mut [T])` per chunk, in place) work on data already in shared memory, an
//! [`Array<T>`](crate::Array) (both) or a [`Shared<[T]>`](crate::Shared) (`map_chunks`
//! only: it gives out `&[T]` alone). No element crosses a ring: a `MAP` frame names the
//! segment by the pool's id for it, a byte offset and a count, and the reply carries
//! only `R` (nothing, for `for_each_chunk_mut`).
//!
//! Each worker maps each segment once and keeps the mapping until the pool's process
//! lets go of the segment. The descriptor reaches it over a per-worker control socket
//! (`SCM_RIGHTS`), sent by the pool just before the first frame that names the segment
//! for that worker, so the worker finds it waiting; a replacement worker is sent it
//! again. This is the same under every start method; even under `Fork`, where a worker
//! inherits the mappings of segments made before it, the pool cannot prove from the
//! worker which inherited address belongs to which segment, and a fresh mapping costs
//! one `mmap` per worker and segment (page faults are the same either way: `fork`
//! copies no page tables of shared mappings). Once the last handle in the pool's
//! process is dropped, the pool tells each worker to unmap it (a `FORGET` frame, sent at
//! the next chunk map or health check, i.e. while anyone waits on the pool), so workers
//! do not keep the memory or a descriptor of dropped arrays. (Workers forked while an
//! array existed also inherited its mapping, as any fork does; that one lives as long as
//! the worker.)
//!
//! **Aliasing contract**, enforced: chunks are disjoint ranges and each goes to one
//! worker; for an `Array` the pool holds the array's lock for the whole call, so no
//! process that locks it reads or writes meanwhile (`f` must not lock the same array: it
//! would wait for the call that waits for it). A chunk that failed in
//! `for_each_chunk_mut` may be half written: it is reported, never re-run (whatever
//! `retries` says), and the array is left poisoned. Offsets and counts are
//! bounds-checked against the worker's own mapping before a slice is made.
//!
//! # Chunks
//!
//! `map`, `imap`, `imap_unordered` and `starmap` cut their input into chunks (one ring
//! message each). `map` and `starmap` default to Python's heuristic,
//! `ceil(len / (4 × processes))`; `imap` and `imap_unordered` default to 1 as in Python.
//! The `*_chunked` variants take a chunk size (0 is refused). Inputs are consumed at once
//! (as Python's task handler does).
//!
//! # Failure semantics
//!
//! | what happens | outcome | the pool |
//! |---|---|---|
//! | a task panics | that item: [`TaskError::Panicked`] with message and location | carries on, same worker |
//! | a worker is SIGKILLed, OOM-killed, segfaults, or exits mid-task | the chunk it was running: [`TaskError::WorkerDied`] (or re-run, up to `retries` times); the chunks queued behind it go back to the queue unharmed | replaces the worker within ~20 ms of noticing (noticed while someone waits on the pool) |
//! | a chunk runs over `task_timeout` × its items (counted from when its worker could start it: the chunk ahead of it done and the worker past its bootstrap and initializer, so an exec under `Spawn` or a worker stopped while starting does not count; a worker stuck in its bootstrap meets the 10 s bootstrap timeout instead) | that chunk: [`TaskError::Timeout`] | kills only that worker and replaces it |
//! | an argument or result fails to encode or decode | that item (the whole chunk if the chunk cannot be decoded): [`TaskError::Encode`] / [`TaskError::Decode`] | carries on; never hangs (cpython gh-79492) |
//! | a user's `Serialize` of a result, or `Deserialize` of an argument, panics in the worker | that item (the whole chunk, for an argument): [`TaskError::Panicked`] | carries on, same worker |
//! | the initializer panics or its worker dies in it | [`Pool::builder`]`.build()` fails with [`PoolError::Initializer`]; later (on a respawn) every unfinished task fails with [`TaskError::Initializer`] | stops: no endless respawn loop (cpython gh-87472) |
//! | a replacement worker cannot be started (out of processes or memory; or, for a pool fixed to `Fork`, this process has started threads of its own since the pool was built, which makes fork unsafe: [`Error::MultiThreaded`]; the pool's own waiter thread is stopped for the fork and does not count; with the default start method the replacement is spawned instead, see [Start methods](#start-methods)) | every unfinished task: [`TaskError::Start`] | stops |
//! | a `Spawn` or `ForkServer` worker fails its bootstrap (another executable, a different function type, no `init()` within 10 s, an exit before it) | every unfinished task: [`TaskError::Start`] with the reason (`build` fails with [`PoolError::Start`] when it waits for an initializer) | stops: no respawn loop |
//! | the fork server dies or stops answering (`ForkServer` workers, or default ones that use it) | its workers die with it (`PR_SET_PDEATHSIG`): the chunks they were running fail with [`TaskError::WorkerDied`] (or are re-run), the rest go back to the queue | replacements are forked by a new server, started by the first request that finds the old one gone; a server that is alive but does not answer (stopped, hung) is waited for up to the 10 s bootstrap timeout inside the pool call that needs the replacement (overrunning that call's own bound, e.g. `get_timeout`), then killed (its workers with it) and replaced |
//! | the initializer's argument panics in its `Clone` or `Serialize` as a `Spawn` or `ForkServer` worker starts (in the pool's process) | `build` fails with [`PoolError::Start`]; on a replacement, every unfinished task: [`TaskError::Start`] with the panic's message (the panic does not reach the caller) | stops |
//! | `terminate()`, or the pool dropped | every unfinished task: [`TaskError::Closed`] | workers SIGKILLed and reaped at once (a `ForkServer` worker once its pidfd says it ended, without waiting for the server's report, so a stopped or busy server does not delay it) |
//! | the pool's process dies | workers get SIGKILL (`PR_SET_PDEATHSIG`; a `ForkServer` worker from the server, which sees the pool's process go) | — |
//! | Ctrl-C | the terminal's SIGINT reaches the workers too (same process group, the fork server's included); the ones that survive it get SIGKILL when the pool's process dies | — |
//! | a chunk's arguments or results exceed the 1 GiB message limit | that chunk: [`TaskError::Encode`] | carries on |
//! | a worker dies or `f` panics in a `for_each_chunk_mut` chunk | that chunk: [`TaskError::WorkerDied`] / [`TaskError::Panicked`], never retried; the array is poisoned (the chunk may be half written); every other chunk is done | replaces the worker |
//! | a segment's descriptor cannot be passed to, or mapped by, a worker (e.g. the worker at its descriptor limit) | that chunk: [`TaskError::Encode`] / [`TaskError::Decode`] | carries on; the descriptor is sent again with the next chunk naming it |
//! | the pool used from a child forked while it existed (a `Process::fork` closure borrowing it, `fork_unchecked`) | every call in that child: [`TaskError::OtherProcess`] (its copies of the owner's jobs too); the child's copy forgets the workers, never signals them | the owner's pool is untouched: the child takes none of its replies |
//! | a task never returns, or its worker is stopped (`SIGSTOP`) after its bootstrap, and no `task_timeout` is set | waited for, as in Python (`get_timeout`/`wait_timeout` bound the wait; `terminate` ends it) | — |
//! | the initializer never returns | `build` fails with [`PoolError::Initializer`] after 60 s; in a replacement worker it is waited for (no chunk is sent to that worker, so `task_timeout` does not apply): the other workers carry on, and if every worker is stuck there, calls wait as for a task that never returns | — |
//!
//! # What a worker's death between two steps leaves
//!
//! A worker loops: take a task frame, run it, send the reply frame, ring the doorbell.
//! The pool learns of a death from the worker's pidfd, then first takes every reply
//! already in the dead worker's ring, and only then judges what is left.
//!
//! | killed | left behind | what the pool does |
//! |---|---|---|
//! | before taking the frame, or after taking it and before replying | the chunk outstanding, no reply | the chunk fails with `WorkerDied` (or is retried); chunks queued behind it are sent elsewhere, not counted as attempts |
//! | while writing the reply | a `WRITING` record of a dead writer | the ring turns it into padding ([`ByteQueue`](crate::ByteQueue)'s repair); as the row above |
//! | after replying, before ringing | a complete reply, no doorbell | taken by the drain that follows the death (or the next 20 ms health check), so the chunk succeeds |
//! | after a doorbell for a big reply, before the reply | `big_expected` set | the drain stops waiting once the worker is seen dead |
//! | during its bootstrap (`Spawn`, `ForkServer`: before `init()` ran its body) | a worker process that never took a frame; the loans of its rings' peer counts bound to it (`process/handles.rs`) | killed by a signal: a death as in the first row (its replacement starts); failed the handshake or exited: the pool stops ([`TaskError::Start`]); the peer tables reclaim its loans once it is proven dead |
//! | during its initializer | no `READY` | a pool error (see the table above), never a respawn |
//! | holding a segment descriptor it received but had not mapped yet | nothing (the kernel closes it) | the chunk fails as above; the replacement is sent the descriptor again |
//! | in the middle of a `for_each_chunk_mut` chunk | that chunk's range partly written, the rest of the array untouched by it | that chunk fails (never retried), every other chunk runs, the array is poisoned |
//!
//! A task frame the pool could not finish writing (the pool's process is the writer; if
//! it dies, its workers die with it through `PR_SET_PDEATHSIG`) needs no repair. If the
//! pool's process dies in a chunk map, the array's lock it held is robust: the next
//! process to lock it gets it poisoned.
//!
//! `map` returns the values or the first failure; `imap`/`imap_unordered` give every
//! item's own `Result`. A chunk whose worker died counts as run once even if the worker
//! died before starting it (the pool cannot tell), so with `retries(0)` it fails.
//! A worker whose ring turns out corrupted is killed and handled as a death.

mod chunks;
mod core;
mod error;
mod handle;
mod task;
mod waker;
mod worker;

pub(crate) use waker::pause_all as pause_waiters;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use self::core::{Config, Core, State};
pub use chunks::SharedSlice;
pub use error::{PoolError, TaskError};
pub use handle::{AsCompleted, AsyncResult, IMap, as_completed};
use task::{Call, One, Star, ZeroSized, encode_run_frame, entry_of};

use crate::error::Error;
use crate::process::StartMethod;

/// How long `build` waits for workers to finish their initializer.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A pool of worker processes: Python's `multiprocessing.Pool`. See the
/// [module docs](self) for how it works and fails.
///
/// Not `Send`: it lives in the process (and thread) that started its workers. Dropping it
/// is [`terminate`](Pool::terminate): workers are killed and reaped, and unfinished
/// results fail with [`TaskError::Closed`]. Call [`close`](Pool::close) and
/// [`join`](Pool::join) first to let queued work finish.
pub struct Pool {
    core: Rc<RefCell<Core>>,
}

/// Settings for a [`Pool`]; from [`Pool::builder`].
#[must_use = "a PoolBuilder does nothing until build()"]
pub struct PoolBuilder {
    processes: Option<usize>,
    method: Option<StartMethod>,
    init: Option<worker::Init>,
    max_tasks: Option<usize>,
    task_timeout: Option<Duration>,
    retries: u32,
}

impl PoolBuilder {
    /// Number of workers (default [`cpu_count`](crate::cpu_count)).
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = Some(n);
        self
    }

    /// The start method for every worker, replacements included. Without it, each
    /// worker's start follows the [default rule](crate::process::default_start_method)
    /// at that moment (see [Start methods](self#start-methods)). `Spawn` and `ForkServer`
    /// need [`procshare::init()`](crate::init) first in `main`.
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.method = Some(method);
        self
    }

    /// Runs `f(arg)` once in each worker before its first task (Python's `initializer`
    /// and `initargs`). A panic in it is a pool error, see the [module docs](self).
    ///
    /// As for tasks, `f` is a `fn` item or a closure that captures nothing (checked at
    /// compile time), and `arg` travels with postcard to a spawned worker; handles in it
    /// (a `Queue`, a channel end, an `Array`...) cross with their descriptors as in a
    /// [`Process::spawn`](crate::Process::spawn) argument. A forked worker gets a clone.
    ///
    /// ```compile_fail,E0080
    /// let n = 5u32;
    /// // Captures `n`: refused when the program is built (a spawned worker could not
    /// // make the closure from nothing).
    /// let pool = procshare::Pool::builder().initializer(move |x: u32| drop(x + n), 1).build();
    /// ```
    pub fn initializer<F, A>(mut self, f: F, arg: A) -> Self
    where
        F: Fn(A) + Copy + 'static,
        A: Serialize + DeserializeOwned + Clone + 'static,
    {
        #[allow(clippy::let_unit_value)]
        let () = ZeroSized::<F>::CHECK;
        let spawner = worker::spawner::<worker::UserInit<F, A>>(arg.clone());
        self.init = Some(worker::Init {
            run: Rc::new(move || f(arg.clone())),
            spawner,
        });
        self
    }

    /// Replace each worker after it ran this many chunks (Python's `maxtasksperchild`).
    pub fn max_tasks_per_child(mut self, n: usize) -> Self {
        self.max_tasks = Some(n);
        self
    }

    /// A task (chunk) running longer than this per item fails with
    /// [`TaskError::Timeout`]; its worker is killed and replaced.
    pub fn task_timeout(mut self, limit: Duration) -> Self {
        self.task_timeout = Some(limit);
        self
    }

    /// How many times a chunk whose worker died is re-run before it fails with
    /// [`TaskError::WorkerDied`] (default 0).
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// Starts the workers (and, with an initializer, waits for each to finish it).
    ///
    /// # Errors
    ///
    /// [`PoolError::Start`] for `processes(0)`, `max_tasks_per_child(0)`, an explicit
    /// `Fork` (or the default rule) in a multi-threaded caller with no safe way to start
    /// ([`Error::MultiThreaded`]), `Spawn` or `ForkServer` without
    /// [`procshare::init()`](crate::init), a worker whose bootstrap failed (noticed here
    /// only while waiting for an initializer), or an OS error;
    /// [`PoolError::Initializer`] if the initializer failed in a worker.
    pub fn build(self) -> Result<Pool, PoolError> {
        let processes = self.processes.unwrap_or_else(crate::cpu_count);
        if processes == 0 || self.max_tasks == Some(0) {
            return Err(PoolError::Start(Error::InvalidArgument {
                what: "a Pool needs processes >= 1 and max_tasks_per_child >= 1".into(),
            }));
        }
        let has_init = self.init.is_some();
        let core = Core::new(Config {
            processes,
            method: self.method,
            init: self.init,
            max_tasks: self.max_tasks,
            task_timeout: self.task_timeout,
            retries: self.retries,
        })?;
        let pool = Pool {
            core: Rc::new(RefCell::new(core)),
        };
        if has_init {
            let until = Instant::now() + INIT_TIMEOUT;
            loop {
                let mut core = pool.core.borrow_mut();
                match &core.state {
                    State::Stopped(TaskError::Initializer { message, location }) => {
                        return Err(PoolError::Initializer {
                            message: message.clone(),
                            location: location.clone(),
                        });
                    }
                    State::Stopped(e) => {
                        return Err(PoolError::Start(Error::Io {
                            op: "starting the pool's workers",
                            source: std::io::Error::other(e.to_string()),
                        }));
                    }
                    _ => {}
                }
                if core.all_ready() {
                    break;
                }
                if Instant::now() >= until {
                    core.stop(TaskError::Closed);
                    return Err(PoolError::Initializer {
                        message: format!(
                            "the workers did not finish the initializer within {INIT_TIMEOUT:?}"
                        ),
                        location: None,
                    });
                }
                core.pump(Some(until));
            }
        }
        Ok(pool)
    }
}

fn check_chunksize(chunksize: usize) -> Result<usize, TaskError> {
    if chunksize == 0 {
        return Err(TaskError::Encode(
            "chunksize 0 is not a chunk size; pass at least 1".into(),
        ));
    }
    Ok(chunksize)
}

impl Pool {
    /// A pool of `processes` workers, started by the default rule (forked while this
    /// process is single-threaded; see [Start methods](self#start-methods)).
    ///
    /// # Errors
    ///
    /// As [`PoolBuilder::build`].
    pub fn new(processes: usize) -> Result<Pool, PoolError> {
        Pool::builder().processes(processes).build()
    }

    /// Settings: processes, initializer, max tasks per child, task timeout, retries.
    pub fn builder() -> PoolBuilder {
        PoolBuilder {
            processes: None,
            method: None,
            init: None,
            max_tasks: None,
            task_timeout: None,
            retries: 0,
        }
    }

    /// The number of workers.
    pub fn processes(&self) -> usize {
        self.core.borrow().cfg.processes
    }

    /// The pids of the current workers (they change as workers are replaced).
    pub fn pids(&self) -> Vec<u32> {
        self.core.borrow().pids()
    }

    /// Queues a job of `items` in chunks of `chunksize`; returns its id.
    fn submit_job<C, A, R>(&self, items: &[A], chunksize: usize) -> Result<u64, TaskError>
    where
        C: Call<A, R>,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        #[allow(clippy::let_unit_value)]
        let () = ZeroSized::<C>::CHECK;
        let mut core = self.core.borrow_mut();
        core.disown();
        match &core.state {
            State::Running => {}
            State::Closed => return Err(TaskError::Closed),
            State::Stopped(e) => return Err(e.clone()),
        }
        let (entry, hash) = entry_of::<C, A, R>();
        let mut chunks = items.chunks(chunksize);
        let job = core.add_job_with(items.len().div_ceil(chunksize), |cid, _| {
            let chunk = chunks.next().expect("one chunk per index");
            let frame = encode_run_frame(cid, entry, hash, chunk).map_err(|e| {
                TaskError::Encode(format!(
                    "the pool could not encode an argument of type {} ({e})",
                    std::any::type_name::<A>()
                ))
            });
            (chunk.len(), frame)
        });
        Ok(job)
    }

    fn default_chunksize(&self, len: usize) -> usize {
        len.div_ceil(4 * self.processes()).max(1)
    }

    /// `[f(x) for x in items]` in parallel, in order, with Python's default chunk size.
    ///
    /// # Errors
    ///
    /// The first item's failure (in input order); the pool stays usable.
    pub fn map<F, A, R, I>(&self, f: F, items: I) -> Result<Vec<R>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.map_async(f, items)?.get()
    }

    /// [`map`](Pool::map) with an explicit chunk size.
    ///
    /// # Errors
    ///
    /// As [`map`](Pool::map); [`TaskError::Encode`] for `chunksize` 0.
    pub fn map_chunked<F, A, R, I>(
        &self,
        f: F,
        items: I,
        chunksize: usize,
    ) -> Result<Vec<R>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.map_async_chunked(f, items, chunksize)?.get()
    }

    /// [`map`](Pool::map) without waiting.
    ///
    /// # Errors
    ///
    /// [`TaskError::Closed`] (or why it stopped) if the pool takes no more work.
    pub fn map_async<F, A, R, I>(&self, _f: F, items: I) -> Result<AsyncResult<Vec<R>>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let items: Vec<A> = items.into_iter().collect();
        let chunksize = self.default_chunksize(items.len());
        self.map_async_items::<One<F>, A, R>(items, chunksize)
    }

    /// [`map_async`](Pool::map_async) with an explicit chunk size.
    ///
    /// # Errors
    ///
    /// As [`map_async`](Pool::map_async); [`TaskError::Encode`] for `chunksize` 0.
    pub fn map_async_chunked<F, A, R, I>(
        &self,
        _f: F,
        items: I,
        chunksize: usize,
    ) -> Result<AsyncResult<Vec<R>>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let chunksize = check_chunksize(chunksize)?;
        self.map_async_items::<One<F>, A, R>(items.into_iter().collect(), chunksize)
    }

    fn map_async_items<C, A, R>(
        &self,
        items: Vec<A>,
        chunksize: usize,
    ) -> Result<AsyncResult<Vec<R>>, TaskError>
    where
        C: Call<A, R>,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let job = self.submit_job::<C, A, R>(&items, chunksize)?;
        Ok(AsyncResult::new(
            Rc::clone(&self.core),
            job,
            handle::finish_all::<R>,
        ))
    }

    /// `[f(a, b) for (a, b) in items]` (Python's `starmap`), in order.
    ///
    /// # Errors
    ///
    /// As [`map`](Pool::map).
    pub fn starmap<F, A, B, R, I>(&self, _f: F, items: I) -> Result<Vec<R>, TaskError>
    where
        F: Fn(A, B) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        B: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = (A, B)>,
    {
        let items: Vec<(A, B)> = items.into_iter().collect();
        let chunksize = self.default_chunksize(items.len());
        self.map_async_items::<Star<F>, (A, B), R>(items, chunksize)?
            .get()
    }

    /// Each item's own outcome, in input order, as results come in (chunk size 1).
    ///
    /// # Errors
    ///
    /// [`TaskError::Closed`] (or why it stopped) if the pool takes no more work.
    pub fn imap<F, A, R, I>(&self, f: F, items: I) -> Result<IMap<R>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.imap_chunked(f, items, 1)
    }

    /// [`imap`](Pool::imap) with an explicit chunk size.
    ///
    /// # Errors
    ///
    /// As [`imap`](Pool::imap); [`TaskError::Encode`] for `chunksize` 0.
    pub fn imap_chunked<F, A, R, I>(
        &self,
        _f: F,
        items: I,
        chunksize: usize,
    ) -> Result<IMap<R>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let chunksize = check_chunksize(chunksize)?;
        let items: Vec<A> = items.into_iter().collect();
        let job = self.submit_job::<One<F>, A, R>(&items, chunksize)?;
        Ok(IMap::new(Rc::clone(&self.core), job, true))
    }

    /// Each item's own outcome, in completion order (chunk size 1).
    ///
    /// # Errors
    ///
    /// As [`imap`](Pool::imap).
    pub fn imap_unordered<F, A, R, I>(&self, f: F, items: I) -> Result<IMap<R>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.imap_unordered_chunked(f, items, 1)
    }

    /// [`imap_unordered`](Pool::imap_unordered) with an explicit chunk size.
    ///
    /// # Errors
    ///
    /// As [`imap`](Pool::imap); [`TaskError::Encode`] for `chunksize` 0.
    pub fn imap_unordered_chunked<F, A, R, I>(
        &self,
        _f: F,
        items: I,
        chunksize: usize,
    ) -> Result<IMap<R>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let chunksize = check_chunksize(chunksize)?;
        let items: Vec<A> = items.into_iter().collect();
        let job = self.submit_job::<One<F>, A, R>(&items, chunksize)?;
        Ok(IMap::new(Rc::clone(&self.core), job, false))
    }

    /// `f(arg)` in a worker, waiting for the result.
    ///
    /// # Errors
    ///
    /// The task's failure; [`TaskError::Closed`] if the pool takes no more work.
    pub fn apply<F, A, R>(&self, f: F, arg: A) -> Result<R, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.apply_async(f, arg)?.get()
    }

    /// `f(arg)` in a worker; the handle gives the result.
    ///
    /// # Errors
    ///
    /// [`TaskError::Closed`] (or why it stopped) if the pool takes no more work.
    pub fn apply_async<F, A, R>(&self, _f: F, arg: A) -> Result<AsyncResult<R>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let job = self.submit_job::<One<F>, A, R>(std::slice::from_ref(&arg), 1)?;
        Ok(AsyncResult::new(
            Rc::clone(&self.core),
            job,
            handle::finish_one::<R>,
        ))
    }

    /// `ProcessPoolExecutor.submit`: as [`apply_async`](Pool::apply_async); use
    /// [`as_completed`] on the handles.
    ///
    /// # Errors
    ///
    /// As [`apply_async`](Pool::apply_async).
    pub fn submit<F, A, R>(&self, f: F, arg: A) -> Result<AsyncResult<R>, TaskError>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.apply_async(f, arg)
    }

    /// Takes no more work; what is queued still runs (see [`join`](Pool::join)).
    pub fn close(&self) {
        let mut core = self.core.borrow_mut();
        if core.state == State::Running {
            core.state = State::Closed;
        }
    }

    /// Waits for all queued work, then lets the workers exit and reaps them. Call
    /// [`close`](Pool::close) (or [`terminate`](Pool::terminate)) first.
    ///
    /// # Panics
    ///
    /// If the pool is still taking work (as Python raises `ValueError`).
    pub fn join(&self) {
        let mut core = self.core.borrow_mut();
        assert!(
            core.state != State::Running,
            "Pool::join needs close() or terminate() first (otherwise it could wait forever)"
        );
        core.join();
    }

    /// Kills every worker at once (SIGKILL, reaped before returning); unfinished results
    /// fail with [`TaskError::Closed`].
    pub fn terminate(&self) {
        self.core.borrow_mut().stop(TaskError::Closed);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(mut core) = self.core.try_borrow_mut() {
            core.stop(TaskError::Closed);
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("processes", &self.processes())
            .field("pids", &self.pids())
            .finish()
    }
}
