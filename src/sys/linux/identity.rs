//! Who the calling thread and process are, in a form another process can check for
//! liveness: kernel id plus start time (and pid namespace), cached per thread.

use std::cell::Cell;
#[cfg(not(miri))]
use std::sync::Once;
#[cfg(miri)]
use std::sync::atomic::AtomicU32;

use super::procfs::parse_stat;
#[cfg(not(miri))]
use super::procfs::pid_namespace_id;

/// Who the calling thread is, in a form that another process can check for liveness:
/// the kernel thread id plus the thread's start time in clock ticks since boot. Together
/// they name one thread for the lifetime of the machine, so a recycled tid is told apart
/// from the thread that used to own it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ThreadIdentity {
    pub(crate) tid: u32,
    /// Start time in clock ticks after boot; 0 when `/proc` could not tell.
    pub(crate) start: u64,
    /// The pid namespace `tid` is numbered in (its nsfs inode); 0 when unknown.
    pub(crate) ns: u32,
}

thread_local! {
    static IDENTITY: Cell<Option<ThreadIdentity>> = const { Cell::new(None) };
}

#[cfg(not(miri))]
static ATFORK: Once = Once::new();

#[cfg(not(miri))]
extern "C" fn forget_identity_in_child() {
    // The child of fork runs on a new thread with a new tid but a copy of the parent
    // thread's TLS: drop the cached identity so it is computed afresh.
    let _ = IDENTITY.try_with(|c| c.set(None));
}

/// The calling thread's identity, computed once per thread (and again after fork).
///
/// Under Miri, threads are interpreted rather than real, so they get distinct made-up
/// ids and no start time (liveness checks then always answer "cannot tell").
#[cfg(miri)]
pub(crate) fn current_thread() -> ThreadIdentity {
    use std::sync::atomic::Ordering;
    static NEXT: AtomicU32 = AtomicU32::new(1);
    IDENTITY.with(|cell| {
        let id = cell.get().unwrap_or_else(|| ThreadIdentity {
            tid: NEXT.fetch_add(1, Ordering::Relaxed),
            start: 0,
            ns: 0,
        });
        cell.set(Some(id));
        id
    })
}

/// The calling thread's identity, computed once per thread (and again after fork).
#[cfg(not(miri))]
#[inline]
pub(crate) fn current_thread() -> ThreadIdentity {
    match IDENTITY.with(Cell::get) {
        Some(id) => id,
        None => identify_current_thread(),
    }
}

#[cfg(not(miri))]
#[cold]
fn identify_current_thread() -> ThreadIdentity {
    ATFORK.call_once(|| {
        // SAFETY: registering a child handler that only touches this thread's TLS is
        // sound; the handler is an `extern "C" fn()` with static lifetime.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(forget_identity_in_child)) };
        assert_eq!(rc, 0, "pthread_atfork failed: out of memory");
    });
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() } as u32;
    // Without /proc we cannot learn our start time (0 records "unknown"); liveness checks
    // then only ask whether the tid still exists. `thread-self` names this thread whichever
    // pid namespace the mounted /proc belongs to, and start times are namespace-free.
    let start = std::fs::read("/proc/thread-self/stat")
        .ok()
        .and_then(|text| parse_stat(&text))
        .map_or(0, |stat| stat.start);
    // nsfs inode numbers are allocated below 2^32 (`proc_inum`); anything else is not one.
    let ns = pid_namespace_id()
        .and_then(|ino| u32::try_from(ino).ok())
        .unwrap_or(0);
    let id = ThreadIdentity { tid, start, ns };
    IDENTITY.with(|cell| cell.set(Some(id)));
    id
}

/// The calling process's `(pid, start time in ticks)`, read without allocating (raw
/// open/read on a stack buffer), so it may be called in a fork child handler.
pub(crate) fn current_process_noalloc() -> (u32, u64) {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    if cfg!(miri) {
        return (pid, 0); // no /proc under Miri: liveness checks answer "cannot tell"
    }
    let mut buf = [0u8; 1024];
    let path = c"/proc/self/stat";
    // SAFETY: `path` is NUL-terminated; flags are plain integers.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return (pid, 0);
    }
    let mut len = 0usize;
    while len < buf.len() {
        // SAFETY: reading into the unfilled tail of `buf`, which we own.
        let n = unsafe { libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    // SAFETY: closing the descriptor we opened above.
    unsafe { libc::close(fd) };
    (pid, parse_stat(&buf[..len]).map_or(0, |s| s.start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::thread_stat;

    #[test]
    #[cfg_attr(miri, ignore = "no /proc under Miri")]
    fn own_identity_is_alive_and_stable() {
        let me = current_thread();
        assert_eq!(me, current_thread());
        let stat = thread_stat(me.tid).unwrap().expect("we exist");
        assert_eq!(stat.start, me.start);
        assert!(!stat.is_dead());
    }
}
