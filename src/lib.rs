//! # procshare
//!
//! Python's `multiprocessing`, for Rust on Linux: child processes that hand back their
//! return value or their panic, a process pool, process-shared robust locks, semaphores
//! and typed cells living in shared memory (built on shared futexes), and lock-free
//! shared-memory queues. A process that dies never hangs the others.
//!
//! * [`Process`]: child processes by fork, spawn or fork server, whose return value,
//!   panic, exit code or signal comes back to [`Child::join`] (see [`process`] for the
//!   start methods and their trade-offs). Call [`init`] first in `main` to enable Spawn
//!   and ForkServer.
//! * [`Pool`]: Python's `Pool` / `ProcessPoolExecutor` (`map`, `imap`, `starmap`,
//!   `apply_async`, `submit`, [`as_completed`]); a worker that dies fails or retries only
//!   its own task and is replaced (see [`pool`]).
//! * [`Queue<T>`] (any serde type), [`ByteQueue`] (byte messages, zero-copy loans),
//!   [`spsc()`] and [`channel()`] (plain-old-data rings, no encoding): shared-memory
//!   queues that report [`Disconnected`](RecvError::Disconnected) once no live sender is left and
//!   repair what a killed peer left half done (see [`queue`]). [`pipe()`] gives Python's
//!   `Pipe` over a socketpair.
//! * [`Mutex<T>`] (robust: a holder's death poisons it, never hangs it), [`Semaphore`],
//!   [`Condvar`], [`Event`], [`Barrier`]: `#[repr(C)]`, usable in place in any mapping
//!   (see [`sync`]).
//! * [`Value<T>`] and [`Array<T>`]: Python's cells, each with its own lock.
//! * [`Segment`] and [`Shared<T>`]: memory mapped into several processes (memfd by
//!   default, named POSIX objects on request), with a checked header (see [`shm`]).
//!
//! Anything placed in shared memory must be [`ShmSafe`].
//!
//! ```
//! use procshare::{Mutex, Process, Shared};
//!
//! let counter = Shared::new(Mutex::new(0u64))?;
//! // A forked child sees the same counter.
//! let child = Process::fork(|| *counter.lock().unwrap() += 1)?;
//! child.join()?;
//! assert_eq!(*counter.lock().unwrap(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod error;
mod liveness;
mod loom_switch;
mod owner;
mod pipe;
pub mod queue;
pub mod shm;
pub mod sync;
mod sys;

pub use error::{Error, Result};
pub use pipe::{Connection, pipe};
pub use queue::mpmc::{self as channel, channel};
pub use queue::spsc::{self, spsc};
pub use queue::{
    ByteQueue, Queue, QueueError, QueueReceiver, QueueSender, RecvError, RecvTimeoutError,
    SendError, SendTimeoutError, TryRecvError, TrySendError,
};
pub use shm::{Segment, SegmentInfo, Shared, ShmSafe};
pub use sync::{
    Array, ArrayGuard, Barrier, BarrierWaitResult, Condvar, Event, Mutex, MutexGuard, RawMutex,
    Semaphore, Value, WaitTimeoutResult,
};

/// The number of CPUs this process may run on (its affinity mask and cgroup quota
/// respected), at least 1: what Python's `cpu_count` is used for, sizing a pool.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(any(test, feature = "test-hooks"))]
#[doc(hidden)]
pub mod __fuzz {
    pub use crate::shm::header::fuzz_parse as segment_header;
}

// --- process ---
pub mod process;
/// Python's `Process`: see [`process`].
pub use process::Process;
pub use process::{
    Child, ProcessError, ProcessInfo, StartMethod, active_children, current_process, parent_process,
};

/// Call as the first line of `main` to enable [`StartMethod::Spawn`].
///
/// In a process started by `Spawn`, `init()` does not return: it runs the function the
/// parent asked for and exits. Code before it in `main` runs again in every spawned child,
/// so put nothing before it. In any other process it records that `Spawn` is usable and
/// returns at once.
pub fn init() {
    process::init()
}
// --- end process ---

// --- pool ---
pub mod pool;
pub use pool::{AsyncResult, Pool, PoolBuilder, PoolError, TaskError, as_completed};
// --- end pool ---

/// Compiles and runs the README's examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
