//! What a pool task or a pool can fail with.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::process::signal_name;

/// Why one task (one item of a `map`, one `apply`) has no value. Every item carries its
/// own outcome (see [`Pool::imap`](super::Pool::imap)); `map` returns the first failure.
/// Whatever the variant, the pool itself carries on (except after
/// [`Initializer`](TaskError::Initializer), which breaks it on purpose).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TaskError {
    /// The task's function panicked in the worker. The worker lives on.
    Panicked {
        /// The panic message (`"Box<dyn Any>"` for a payload that is not a string).
        message: String,
        /// Where it panicked, as `file:line:column`, when known.
        location: Option<String>,
    },
    /// The worker running this task ended before returning its result (SIGKILL, the OOM
    /// killer, a segfault, `std::process::exit` in the task). The worker was replaced.
    WorkerDied {
        /// The worker's pid.
        pid: u32,
        /// The signal that ended it, if a signal did.
        signal: Option<i32>,
        /// Its exit code, if it exited.
        exit_code: Option<i32>,
    },
    /// The task ran longer than the pool's `task_timeout` (times the number of items in
    /// its chunk); its worker was killed and replaced.
    Timeout {
        /// The limit that was exceeded.
        limit: Duration,
    },
    /// The argument or the result could not be encoded with postcard (or a result was
    /// larger than the pool's message limit).
    Encode(String),
    /// The argument or the result could not be decoded with postcard.
    Decode(String),
    /// The pool's initializer failed in a worker, so the pool stopped (it does not
    /// respawn workers whose initializer fails); this task never ran.
    Initializer {
        /// What happened to the initializer.
        message: String,
        /// Where it panicked, when known.
        location: Option<String>,
    },
    /// The pool was closed, terminated or dropped before this task produced a result.
    Closed,
    /// A worker could not be started (a replacement could not be created, or a spawned
    /// worker failed its bootstrap); the pool stopped.
    Start(String),
    /// The pool was used from a process other than the one that built it (a child
    /// forked while it existed): that process holds only a copy, which takes no work and
    /// leaves the owner's workers and results alone.
    OtherProcess {
        /// The pid of the process that owns the pool.
        owner: u32,
    },
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Panicked { message, location } => {
                write!(f, "the task panicked in its worker")?;
                if let Some(loc) = location {
                    write!(f, " at {loc}")?;
                }
                write!(
                    f,
                    ": {message} (the worker's stderr has the report; the pool carries on)"
                )
            }
            TaskError::WorkerDied {
                pid,
                signal,
                exit_code,
            } => {
                write!(f, "the worker (pid {pid}) running this task ended")?;
                if let Some(s) = signal {
                    write!(f, " by signal {s} ({})", signal_name(*s))?;
                }
                if let Some(c) = exit_code {
                    write!(f, " with exit code {c}")?;
                }
                f.write_str(
                    " before returning its result; the worker was replaced. Check for the OOM \
                     killer, crashes in unsafe code, or exit() in the task; or build the pool \
                     with retries(n) to re-run such tasks",
                )
            }
            TaskError::Timeout { limit } => write!(
                f,
                "the task ran longer than the pool's task_timeout ({limit:?} per item of its \
                 chunk); its worker was killed and replaced. Raise task_timeout or split the work"
            ),
            TaskError::Encode(why) => write!(
                f,
                "the task's argument or result could not be encoded: {why}; use types whose \
                 Serialize impl postcard supports"
            ),
            TaskError::Decode(why) => write!(
                f,
                "the task's argument or result could not be decoded: {why}; make sure the \
                 type's Serialize and Deserialize agree (postcard is not self-describing)"
            ),
            TaskError::Initializer { message, location } => {
                write!(f, "the pool's initializer failed in a worker")?;
                if let Some(loc) = location {
                    write!(f, " at {loc}")?;
                }
                write!(
                    f,
                    ": {message}; the pool stopped instead of respawning workers forever. Fix \
                     the initializer and build a new pool"
                )
            }
            TaskError::Closed => f.write_str(
                "the pool was closed, terminated or dropped before this task produced a result; \
                 submit work before close(), and keep the pool alive until its results are in",
            ),
            TaskError::Start(why) => write!(
                f,
                "the pool could not start a worker ({why}), so it stopped; act on that reason \
                 (process and memory limits, threads started since the pool was built, \
                 procshare::init() first in main for Spawn and ForkServer) and build a new pool"
            ),
            TaskError::OtherProcess { owner } => write!(
                f,
                "this pool belongs to another process (pid {owner}, which built it); a child \
                 forked from it holds only a copy, which cannot send work or take results \
                 without stealing them from the owner: build a new pool in the child, or \
                 send the work back to the owner"
            ),
        }
    }
}

impl std::error::Error for TaskError {}

/// Why a [`Pool`](super::Pool) could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum PoolError {
    /// Starting the workers failed (see the inner error: a multi-threaded caller with no
    /// safe start method, `Spawn`/`ForkServer` without `procshare::init()`, `processes(0)`,
    /// a worker that failed its bootstrap, or an OS error).
    Start(Error),
    /// The initializer panicked (or its worker died) in a worker.
    Initializer {
        /// What happened.
        message: String,
        /// Where it panicked, when known.
        location: Option<String>,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Start(e) => write!(f, "the pool could not start its workers: {e}"),
            PoolError::Initializer { message, location } => TaskError::Initializer {
                message: message.clone(),
                location: location.clone(),
            }
            .fmt(f),
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PoolError::Start(e) => Some(e),
            PoolError::Initializer { .. } => None,
        }
    }
}

impl From<Error> for PoolError {
    fn from(e: Error) -> PoolError {
        PoolError::Start(e)
    }
}
