//! The crate's error type.
//!
//! Operations that can hand a value back on failure (a lock guard after a poisoning, a
//! message that could not be sent) use their own error types next to the operation; this
//! is the error for everything else. Every message says what happened and what to do.

use std::fmt;
use std::io;

/// What went wrong in a procshare operation.
///
/// `?` converts into it from every error the crate's API returns (queue and channel
/// errors, a poisoned lock, I/O), so a `fn main() -> procshare::Result<()>` can use them
/// all:
///
/// ```
/// fn main() -> procshare::Result<()> {
///     let (tx, rx) = procshare::channel::<u64>(8)?;
///     tx.send(1)?;
///     assert_eq!(rx.recv()?, 1);
///     let q = procshare::Queue::<String>::new()?;
///     q.put(&"job".to_string())?;
///     let balance = procshare::Value::new(100i64)?;
///     *balance.lock()? += 1;
///     let _file = std::fs::File::open("/dev/null")?;
///     let (a, b) = procshare::pipe()?;
///     a.send(&q.get()?)?;
///     assert_eq!(b.recv::<String>()?, "job");
///     Ok(())
/// }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    Io {
        /// What procshare was doing, e.g. `"creating shared memory segment"`.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// A segment name is not usable: names must be 1 to 200 bytes of anything but `/` and NUL.
    InvalidName {
        /// The name as given.
        name: String,
    },
    /// [`Segment::create`](crate::Segment::create) found a segment of that name already.
    SegmentExists {
        /// The name as given.
        name: String,
    },
    /// [`Segment::open`](crate::Segment::open) found no segment of that name.
    SegmentNotFound {
        /// The name as given.
        name: String,
    },
    /// The object is not a procshare segment (it was made by another program, or its
    /// header was overwritten).
    ForeignSegment {
        /// The name as given, or `"<fd>"` for a segment received as a descriptor.
        name: String,
        /// What did not look like procshare's header.
        reason: String,
    },
    /// The segment was made by an incompatible version of procshare.
    VersionMismatch {
        /// The name as given.
        name: String,
        /// The header format version in the segment.
        found: u32,
        /// The header format version this build understands.
        expected: u32,
    },
    /// The segment holds a different type (or the same type from a different build).
    TypeMismatch {
        /// The name as given.
        name: String,
        /// The type this process asked for, as `name (size N, align A, procshare V)`.
        expected: String,
        /// The type the creator stored.
        found: String,
    },
    /// The segment's size disagrees with its header or with what was asked for.
    SizeMismatch {
        /// The name as given.
        name: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// The creator never finished initialising the segment in time (it may have died).
    NotReady {
        /// The name as given.
        name: String,
    },
    /// A wait ran out of time.
    Timeout,
    /// Shared memory (or a pipe) holds a value no correct peer could have written.
    Corrupted {
        /// What was found to be inconsistent.
        what: String,
    },
    /// The calling process has more than one thread, so forking it is unsafe.
    MultiThreaded {
        /// How many threads were running.
        threads: u64,
    },
    /// An argument was out of range.
    InvalidArgument {
        /// What was wrong with it.
        what: String,
    },
    /// A [`Barrier`](crate::Barrier) was aborted or reset while this caller waited, or is
    /// broken until someone calls [`Barrier::reset`](crate::Barrier::reset).
    BarrierBroken,
    /// A lock's previous holder panicked or its process died while holding it, so the data
    /// it guards may be half-updated. Made from a [`PoisonError`](std::sync::PoisonError)
    /// (`lock()?` in a function returning `procshare::Result`); the guard is dropped.
    Poisoned {
        /// The kind of lock, e.g. `"Value"`.
        what: &'static str,
        /// The thread id of the holder whose death poisoned it (the pid, for a
        /// single-threaded process); `None` when a panicking holder poisoned it.
        dead_holder: Option<u32>,
    },
    /// The segment was created in another pid namespace (another container, or a process
    /// started with `unshare --pid`): the process and thread ids recorded inside it (lock
    /// owners, queue claims, peer tables, its creator) mean other processes here, so dead
    /// owners could neither be recognised nor safely recovered.
    ForeignPidNamespace {
        /// The name as given, or `"<descriptor>"`.
        name: String,
        /// The creator's pid namespace (inode of its `/proc/self/ns/pid`).
        segment_namespace: u64,
        /// This process's pid namespace.
        our_namespace: u64,
    },
    /// A queue or channel operation failed (made by `?` from the queues' own errors; a
    /// message that could not be sent is dropped with the error).
    Queue(crate::QueueError),
}

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Error {
        Error::Io { op, source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { op, source } => {
                write!(f, "{op} failed: {source}")?;
                match source.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE) => f.write_str(
                        " (too many open files: raise the limit with `ulimit -n` or drop unused \
                         segments)",
                    ),
                    Some(libc::ENOMEM) => f.write_str(
                        " (out of memory or mappings: free memory or raise vm.max_map_count)",
                    ),
                    Some(libc::ENOSPC) => f.write_str(
                        " (no space left in /dev/shm: remove stale segments with \
                         `Segment::remove_stale`)",
                    ),
                    Some(libc::EACCES | libc::EPERM) => f.write_str(
                        " (permission denied: named segments are private to the user who made them)",
                    ),
                    _ => Ok(()),
                }
            }
            Error::InvalidName { name } => write!(
                f,
                "invalid segment name {name:?}: use 1 to 200 bytes without '/' or NUL"
            ),
            Error::SegmentExists { name } => write!(
                f,
                "a shared memory segment named {name:?} already exists: open it with \
                 `Segment::open`, pick another name, or remove a stale one with \
                 `Segment::remove`"
            ),
            Error::SegmentNotFound { name } => write!(
                f,
                "no shared memory segment named {name:?}: check the name, and that the creating \
                 process has created it and not yet dropped it"
            ),
            Error::ForeignSegment { name, reason } => write!(
                f,
                "{name:?} is not a procshare segment ({reason}): it was made by another program \
                 or overwritten; check the name"
            ),
            Error::VersionMismatch {
                name,
                found,
                expected,
            } => write!(
                f,
                "segment {name:?} has header format {found} but this procshare understands \
                 {expected}: build every process against the same procshare version"
            ),
            Error::TypeMismatch {
                name,
                expected,
                found,
            } => write!(
                f,
                "segment {name:?} holds {found}, not {expected}: open it with the type its \
                 creator used. Types are matched by name (without module path), size and \
                 alignment: give the type the same name and layout in every program, or set the \
                 same `ShmSafe::SHM_NAME` in each; and build every program against the same \
                 procshare version"
            ),
            Error::SizeMismatch {
                name,
                expected,
                found,
            } => write!(
                f,
                "segment {name:?} is {found} bytes where {expected} were expected: it was \
                 truncated, or created with another length or type"
            ),
            Error::NotReady { name } => write!(
                f,
                "segment {name:?} was never marked ready: its creator is still initialising it \
                 or died doing so; retry, or remove it with `Segment::remove` if its creator is \
                 gone"
            ),
            Error::Timeout => write!(
                f,
                "the operation timed out: retry, or allow a longer timeout"
            ),
            Error::Corrupted { what } => write!(
                f,
                "corrupted data from a peer ({what}): another process wrote an impossible value \
                 or broke the protocol; stop using this object and recreate it"
            ),
            Error::MultiThreaded { threads } => write!(
                f,
                "refusing to fork a process with {threads} threads: the child could deadlock on \
                 locks held by the other threads; fork before starting threads, or use \
                 StartMethod::Spawn (call procshare::init() as the first line of main; \
                 Process::spawn then picks Spawn by itself)"
            ),
            Error::InvalidArgument { what } => write!(f, "invalid argument: {what}"),
            Error::BarrierBroken => write!(
                f,
                "the barrier is broken: it was aborted or reset (a participant timed out, \
                 died or called `abort`); agree with the other participants how to go on, then \
                 call `Barrier::reset` once all have returned, or use a new barrier"
            ),
            Error::Poisoned { what, dead_holder } => {
                match dead_holder {
                    Some(tid) => write!(
                        f,
                        "{what} is poisoned: thread {tid} died while holding its lock (its \
                         process was killed or exited mid-update)"
                    )?,
                    None => write!(
                        f,
                        "{what} is poisoned: a previous holder panicked while holding its lock"
                    )?,
                }
                f.write_str(
                    ", so the data may be half-updated; take the guard from the `PoisonError` \
                     (`into_inner`), check or repair the data, then call `clear_poison()`",
                )
            }
            Error::Queue(e) => fmt::Display::fmt(e, f),
            Error::ForeignPidNamespace {
                name,
                segment_namespace,
                our_namespace,
            } => write!(
                f,
                "segment {name:?} was created in pid namespace pid:[{segment_namespace}] but \
                 this process is in pid namespace pid:[{our_namespace}]: procshare recognises \
                 dead lock owners and peers by process ids, which only mean the same process \
                 inside one pid namespace, so it refuses to share the segment across them; run \
                 every process in the same pid namespace (e.g. `docker run --pid=host` or \
                 `--pid=container:<id>`, Kubernetes `shareProcessNamespace: true`), or create \
                 the segment inside this namespace"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Queue(e) => Some(e),
            _ => None,
        }
    }
}

/// Lets `?` carry an I/O error (opening the file a mapping comes from, writing to a pipe)
/// out of a function that returns [`procshare::Result`](Result).
impl From<io::Error> for Error {
    fn from(source: io::Error) -> Error {
        Error::Io {
            op: "an I/O operation",
            source,
        }
    }
}

/// Describes the poisoning in words, naming the dead holder when a death caused it. The
/// guard inside is dropped, unlocking.
impl<T> From<std::sync::PoisonError<crate::MutexGuard<'_, T>>> for Error {
    fn from(e: std::sync::PoisonError<crate::MutexGuard<'_, T>>) -> Error {
        Error::Poisoned {
            what: "the lock",
            dead_holder: e.get_ref().lock.raw().dead_holder(),
        }
    }
}

/// As for a `MutexGuard`; the timeout result is dropped with the guard.
impl<T> From<std::sync::PoisonError<(crate::MutexGuard<'_, T>, crate::WaitTimeoutResult)>>
    for Error
{
    fn from(
        e: std::sync::PoisonError<(crate::MutexGuard<'_, T>, crate::WaitTimeoutResult)>,
    ) -> Error {
        Error::Poisoned {
            what: "the lock",
            dead_holder: e.get_ref().0.lock.raw().dead_holder(),
        }
    }
}

/// As for a `MutexGuard`, for an [`Array`](crate::Array).
impl<T> From<std::sync::PoisonError<crate::ArrayGuard<'_, T>>> for Error {
    fn from(e: std::sync::PoisonError<crate::ArrayGuard<'_, T>>) -> Error {
        Error::Poisoned {
            what: "the Array",
            dead_holder: e.get_ref().dead_holder(),
        }
    }
}

/// Lets `?` carry a queue error out of a function returning [`procshare::Result`](Result).
impl From<crate::QueueError> for Error {
    fn from(e: crate::QueueError) -> Error {
        Error::Queue(e)
    }
}

macro_rules! from_channel_errors {
    ($($ty:ident $(<$t:ident>)? { $($variant:ident $(($bind:tt))? => $to:expr),* $(,)? })*) => {$(
        /// Lets `?` carry a channel error out of a function returning
        /// [`procshare::Result`](Result), as the matching [`QueueError`](crate::QueueError)
        /// (a message that was not sent is dropped).
        impl$(<$t>)? From<crate::queue::$ty$(<$t>)?> for Error {
            fn from(e: crate::queue::$ty$(<$t>)?) -> Error {
                use crate::queue::$ty as E;
                Error::Queue(match e {
                    $(E::$variant $(($bind))? => $to,)*
                })
            }
        }
    )*};
}

from_channel_errors! {
    SendError<T> {
        Disconnected(_) => crate::QueueError::Disconnected,
        Corrupted(_) => crate::QueueError::Corrupted("the channel".into()),
    }
    TrySendError<T> {
        Full(_) => crate::QueueError::Full,
        Disconnected(_) => crate::QueueError::Disconnected,
        Corrupted(_) => crate::QueueError::Corrupted("the channel".into()),
    }
    SendTimeoutError<T> {
        Timeout(_) => crate::QueueError::Timeout,
        Disconnected(_) => crate::QueueError::Disconnected,
        Corrupted(_) => crate::QueueError::Corrupted("the channel".into()),
    }
    RecvError {
        Disconnected => crate::QueueError::Disconnected,
        Corrupted(what) => crate::QueueError::Corrupted(what),
    }
    TryRecvError {
        Empty => crate::QueueError::Empty,
        Disconnected => crate::QueueError::Disconnected,
        Corrupted(what) => crate::QueueError::Corrupted(what),
    }
    RecvTimeoutError {
        Timeout => crate::QueueError::Timeout,
        Disconnected => crate::QueueError::Disconnected,
        Corrupted(what) => crate::QueueError::Corrupted(what),
    }
}

/// `Result<T, procshare::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
