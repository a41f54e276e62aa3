//! Why a child gave no value back.

use std::fmt;

/// Why [`Child::join`](super::Child::join) (or `join_timeout`/`try_join`) has no return
/// value for you. Every message says what happened and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProcessError {
    /// The child's function panicked. Captured by a panic hook in the child and sent back.
    Panicked {
        /// The panic message (`"Box<dyn Any>"` for a payload that is not a string).
        message: String,
        /// Where it panicked, as `file:line:column`, when the hook saw it.
        location: Option<String>,
    },
    /// The child exited with this code before returning a value (it called
    /// `std::process::exit`, or something it ran did). `-1` means the status was lost:
    /// someone else reaped the child (SIGCHLD ignored, or `waitpid(-1)` elsewhere), or the
    /// fork server that started it died first.
    Exited(i32),
    /// A signal ended the child before it returned a value (9 = SIGKILL, 15 = SIGTERM,
    /// 11 = SIGSEGV, 6 = SIGABRT...).
    Signaled(i32),
    /// The child never started running its function: a spawned child did not reach
    /// `procshare::init()` in time, ran a different executable, disagreed on the function
    /// type, or could not read its bootstrap message. The text says which.
    Bootstrap(String),
    /// The value did not make it across: the child could not encode its result, or the
    /// parent could not decode what arrived.
    Decode(String),
    /// `join_timeout` ran out of time; the child is still running and the handle still
    /// owns it.
    Timeout,
}

/// The conventional name of a signal number, for messages.
pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => "a signal",
    }
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::Panicked { message, location } => {
                write!(f, "the child process panicked")?;
                if let Some(loc) = location {
                    write!(f, " at {loc}")?;
                }
                write!(
                    f,
                    ": {message} (its stderr has the full report; fix the panic or catch it \
                     in the child's function)"
                )
            }
            ProcessError::Exited(-1) => f.write_str(
                "the child process ended but its exit status was lost: something else reaped it \
                 (SIGCHLD set to SIG_IGN, or a waitpid(-1) elsewhere in this program), or the \
                 fork server that started it was killed; leave SIGCHLD at its default and let \
                 the handle do the waiting",
            ),
            ProcessError::Exited(code) => write!(
                f,
                "the child process exited with code {code} before returning a value (its \
                 function, or something it called, ended the process); return from the \
                 function instead of calling exit"
            ),
            ProcessError::Signaled(sig) => {
                write!(
                    f,
                    "the child process was killed by signal {sig} ({}) before returning a value",
                    signal_name(*sig)
                )?;
                f.write_str(match *sig {
                    9 => "; something sent SIGKILL (kill(), the OOM killer, a watchdog)",
                    15 => "; something asked it to stop (terminate(), a shutdown)",
                    11 | 7 | 4 | 8 => {
                        "; it crashed: look for unsafe code, FFI or stack overflow in the child"
                    }
                    6 => "; it aborted: a panic under panic=abort, a failed allocation, or abort()",
                    _ => "; see signal(7)",
                })
            }
            ProcessError::Bootstrap(why) => {
                write!(f, "the child process could not start its function: {why}")
            }
            ProcessError::Decode(why) => {
                write!(f, "the child's return value did not arrive intact: {why}")
            }
            ProcessError::Timeout => f.write_str(
                "the child process is still running after the timeout; join again later, or \
                 terminate()/kill() it",
            ),
        }
    }
}

impl std::error::Error for ProcessError {}
