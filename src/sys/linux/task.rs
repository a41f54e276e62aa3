//! Processes and threads as the kernel's tasks: fork, immediate exit, wait, signals, fork
//! handlers, and whether a task id exists at all.

use std::io;

use super::errno;

/// The calling process's id.
pub(crate) fn getpid() -> u32 {
    std::process::id()
}

/// Registers process-wide fork handlers (see `pthread_atfork(3)`): `prepare` runs in the
/// parent before the fork, `parent` after it in the parent, `child` in the new child.
pub(crate) fn register_fork_handlers(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) {
    if cfg!(miri) {
        return; // Miri cannot fork, so there is nothing to hand over
    }
    // SAFETY: the handlers are `extern "C" fn()` with static lifetime.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    assert_eq!(rc, 0, "pthread_atfork failed: out of memory");
}

/// Which side of a fork the caller is on.
pub(crate) enum Forked {
    Child,
    Parent(u32),
}

/// Forks the calling process.
///
/// # Safety
///
/// The child gets a copy of only the calling thread. If other threads exist, any lock they
/// held at the moment of the fork (allocator, stdio, user mutexes) stays locked forever in
/// the child, so in a multi-threaded process the child may only call async-signal-safe
/// functions before it exits with [`exit_immediately`].
pub(crate) unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller upholds the contract above.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as u32)),
    }
}

/// Ends the calling process at once with `code`, without running destructors, atexit
/// handlers or stdio flushes that belong to the parent's copy of the state.
pub(crate) fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}

/// Sends `signal` to process `pid`, or to process group `-pid` when `group` is set.
pub(crate) fn send_signal(pid: u32, signal: i32, group: bool) -> io::Result<()> {
    let target = if group {
        -(pid as libc::pid_t)
    } else {
        pid as libc::pid_t
    };
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(target, signal) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the calling process the leader of a new process group, so that it and every
/// process it starts can be signalled together.
pub(crate) fn become_group_leader() -> io::Result<()> {
    // SAFETY: setpgid(0, 0) acts on the calling process only.
    if unsafe { libc::setpgid(0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The signal numbers procshare uses, re-exported so no module above `sys` needs libc.
pub(crate) mod signal {
    /// SIGKILL.
    pub const KILL: i32 = libc::SIGKILL;
    /// SIGTERM.
    pub const TERM: i32 = libc::SIGTERM;
}

/// The largest thread id Linux can hand out (`PID_MAX_LIMIT`, 2^22 on 64-bit kernels).
pub(crate) const TID_LIMIT: u32 = 1 << 22;

/// Whether a task with id `tid` exists in the caller's pid namespace, asked with
/// `kill(tid, 0)`: `Some(false)` only on `ESRCH`. `EPERM` means it exists but belongs to
/// someone we may not signal, which is still "exists". `None` when the id cannot name a
/// task (0, or beyond `PID_MAX_LIMIT`: `kill` would read it as a process group or
/// "every process") or the kernel gives another answer.
///
/// `kill` resolves any thread id, not only process ids, and answers `0` for a zombie: a
/// caller that needs "zombie means dead" must ask `/proc` as well.
pub(crate) fn task_exists(tid: u32) -> Option<bool> {
    if tid == 0 || tid > TID_LIMIT || cfg!(miri) {
        return None;
    }
    // SAFETY: signal 0 only checks existence and permission; `tid` is a positive id.
    if unsafe { libc::kill(tid as libc::pid_t, 0) } == 0 {
        return Some(true);
    }
    match errno() {
        libc::ESRCH => Some(false),
        libc::EPERM => Some(true),
        _ => None,
    }
}
