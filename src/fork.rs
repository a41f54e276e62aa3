//! A minimal fork-and-wait helper for the examples, tests and benchmarks until the
//! `Process` layer lands. Not part of the stable API.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitStatus;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys;

/// Signal numbers for [`ForkedChild::signal`] and [`kill_group`].
pub mod signal {
    pub use crate::sys::signal::{CONT, KILL, STOP, TERM};
}

/// A forked child process. Dropping it without [`wait`](ForkedChild::wait)ing kills and
/// reaps it, so a failing test leaves no orphans behind.
#[derive(Debug)]
pub struct ForkedChild {
    pid: u32,
    status: Option<ExitStatus>,
}

/// Forks and runs `f` in the child, which then exits with `f`'s return value (101 if it
/// panicked) without returning into the caller's code.
///
/// # Errors
///
/// [`Error::MultiThreaded`] if the calling process has more than one thread (the child
/// could deadlock on a lock another thread held); [`Error::Io`] if fork fails.
pub fn fork<F: FnOnce() -> i32>(f: F) -> Result<ForkedChild> {
    crate::pool::pause_waiters();
    let threads = sys::thread_count().map_err(|e| {
        Error::io(
            "counting this process's threads before a fork (read from /proc/self/stat; \
             without /proc, use fork_unchecked if the process is known to be single-threaded)",
            e,
        )
    })?;
    if threads > 1 {
        return Err(Error::MultiThreaded { threads });
    }
    // SAFETY: the process has a single thread, so the child inherits no lock held by
    // another thread and may run arbitrary code.
    unsafe { fork_unchecked(f) }
}

/// Like [`fork`] without the single-thread check.
///
/// # Safety
///
/// If the process has other threads, `f` may only call async-signal-safe functions (no
/// allocation, no stdio, no locks another thread could have held at the fork).
pub unsafe fn fork_unchecked<F: FnOnce() -> i32>(f: F) -> Result<ForkedChild> {
    // SAFETY: forwarded to the caller; the child never returns from this function.
    match unsafe { sys::fork() }.map_err(|e| Error::io("fork", e))? {
        sys::Forked::Child => {
            let code = catch_unwind(AssertUnwindSafe(f)).unwrap_or(101);
            use std::io::Write;
            let _ = std::io::stdout().flush();
            sys::exit_immediately(code)
        }
        sys::Forked::Parent(pid) => {
            // Bind queue handles lent to the child to its pid, in case the fork handler
            // could not find it (see `queue::peers`).
            crate::queue::peers::bind_forked_child(pid);
            Ok(ForkedChild { pid, status: None })
        }
    }
}

impl ForkedChild {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to exit.
    ///
    /// # Errors
    ///
    /// If waitpid fails.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = sys::wait_pid(self.pid, true)?.expect("blocking waitpid returns a status");
        self.status = Some(s);
        Ok(s)
    }

    /// Waits up to `timeout` for the child to exit.
    ///
    /// # Errors
    ///
    /// If waitpid fails.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = sys::Deadline::after(timeout);
        let mut nap = Duration::from_micros(100);
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if deadline.has_passed() {
                return Ok(None);
            }
            std::thread::sleep(nap.min(deadline.remaining().unwrap_or(nap)));
            nap = (nap * 2).min(Duration::from_millis(20));
        }
    }

    /// Reaps the child if it has exited.
    ///
    /// # Errors
    ///
    /// If waitpid fails.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = sys::wait_pid(self.pid, false)?;
        }
        Ok(self.status)
    }

    /// Sends `signal` (see [`signal`]) to the child.
    ///
    /// # Errors
    ///
    /// If the child has already been reaped, or kill fails.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        if self.status.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "child already reaped",
            ));
        }
        sys::send_signal(self.pid, signal, false)
    }
}

impl Drop for ForkedChild {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = sys::send_signal(self.pid, signal::KILL, false);
            let _ = sys::wait_pid(self.pid, true);
        }
    }
}

/// Makes the calling process a new process group leader (see `setpgid(2)`), so a
/// watchdog can kill it and everything it forked at once with [`kill_group`].
///
/// # Errors
///
/// If setpgid fails.
pub fn become_group_leader() -> io::Result<()> {
    sys::become_group_leader()
}

/// Sends `signal` to every process in the group led by `leader`.
///
/// # Errors
///
/// If kill fails.
pub fn kill_group(leader: u32, signal: i32) -> io::Result<()> {
    sys::send_signal(leader, signal, true)
}
