//! Socket calls for `pipe()`: socketpair, send/recv, poll.
//!
//! Thin safe wrappers: each makes one system call (retrying it when a signal interrupts
//! it before anything was transferred) and reports failure as `io::Error`. Framing,
//! partial transfers and what an error means for the caller are `pipe.rs`'s business.
//!
//! Portability: `SOCK_CLOEXEC` and `MSG_NOSIGNAL` are Linux (and FreeBSD) flags; a macOS
//! port would set `FD_CLOEXEC` with `fcntl` and `SO_NOSIGPIPE` with `setsockopt` instead.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;
use std::time::Duration;

/// A connected pair of Unix sockets of `kind` (`SOCK_STREAM`, `SOCK_SEQPACKET`), both
/// close-on-exec (so an exec'd program does not inherit them by accident) but inherited by
/// `fork`.
pub(crate) fn socketpair(kind: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [libc::c_int; 2] = [-1, -1];
    // SAFETY: `fds` is a valid, writable array of two ints, which is what socketpair fills
    // in; the other arguments are plain integers.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both descriptors are open, fresh, and owned by
    // nothing else; each is wrapped exactly once.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A connected pair of Unix stream sockets; see [`socketpair`].
pub(crate) fn socketpair_stream() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(libc::SOCK_STREAM)
}

/// Sends as much of `bufs` (in order) as the socket accepts with one `sendmsg`, and
/// returns how many bytes that was. Writing to a socket whose peer has gone fails with
/// `EPIPE` instead of raising `SIGPIPE` (`MSG_NOSIGNAL`). Blocks while the socket buffer
/// is full.
pub(crate) fn send_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr (null name and control, zero lengths) is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // std guarantees `IoSlice` is ABI-compatible with `struct iovec` on Unix; sendmsg only
    // reads through `msg_iov`, so the `*mut` is never written through.
    msg.msg_iov = bufs.as_ptr().cast::<libc::iovec>().cast_mut();
    msg.msg_iovlen = bufs.len() as _;
    loop {
        // SAFETY: `msg` points at `bufs.len()` iovecs describing live, readable slices
        // borrowed for the whole call; it names no address and carries no control data.
        let rc = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `recv` into `buf`: returns how many bytes arrived, 0 meaning the peer closed its
/// end (or `buf` is empty). With `wait_all`, blocks until `buf` is full, the peer closes,
/// or a signal arrives after some data did (`MSG_WAITALL`); the caller still loops.
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], wait_all: bool) -> io::Result<usize> {
    let flags = if wait_all { libc::MSG_WAITALL } else { 0 };
    loop {
        // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes for the whole call,
        // and recv writes at most that many.
        let rc = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Like [`recv`] into up to `max` bytes of fresh space at the end of `buf` (reserving it
/// first if `buf`'s capacity is short), then extends `buf` by the bytes received. No byte
/// of the new space is zeroed or otherwise touched beforehand, so a reused buffer costs
/// nothing but the copy out of the kernel.
pub(crate) fn recv_append(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max: usize,
    wait_all: bool,
) -> io::Result<usize> {
    buf.reserve(max);
    let spare = &mut buf.spare_capacity_mut()[..max];
    let flags = if wait_all { libc::MSG_WAITALL } else { 0 };
    loop {
        // SAFETY: `spare` is `max` bytes of memory owned by `buf` and borrowed mutably for
        // the call; recv only writes (never reads) it, and at most `max` bytes.
        let rc = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                flags,
            )
        };
        if rc >= 0 {
            let n = rc as usize;
            debug_assert!(n <= max);
            // SAFETY: the kernel initialised the first `n` bytes of the spare capacity,
            // which directly follow the `len` initialised bytes, and `len + n` is within
            // the capacity reserved above.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until `fd` is readable (data, end of file, or a pending error), for at most
/// `timeout` (`None`: no limit; zero: just check). Returns whether it is readable.
///
/// A signal ends the wait early with an `Interrupted` error; the caller retries against
/// its own deadline.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // ppoll takes a timespec, so sub-millisecond timeouts are neither rounded to zero
    // (a busy loop) nor up (a late return).
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |ts| ts as *const libc::timespec);
    // SAFETY: `pfd` is one valid, writable pollfd; `ts_ptr` is null or points at `ts`,
    // which outlives the call; a null signal mask leaves the mask unchanged.
    let rc = unsafe { libc::ppoll(&mut pfd, 1, ts_ptr, ptr::null()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if pfd.revents & libc::POLLNVAL != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // POLLHUP (peer gone) and POLLERR also mean a read will not block: it returns end of
    // file or the error.
    Ok(rc > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
}

// Sockets are foreign calls Miri cannot run.
#[cfg(all(test, not(miri)))]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn pair_send_recv_poll() {
        let (a, b) = socketpair_stream().unwrap();
        assert!(!poll_readable(b.as_fd(), Some(Duration::ZERO)).unwrap());
        let n = send_vectored(a.as_fd(), &[IoSlice::new(b"ab"), IoSlice::new(b"cde")]).unwrap();
        assert_eq!(n, 5);
        assert!(poll_readable(b.as_fd(), None).unwrap());
        let mut two = [0u8; 2];
        assert_eq!(recv(b.as_fd(), &mut two, true).unwrap(), 2);
        assert_eq!(&two, b"ab");
        let mut v = b"x".to_vec();
        assert_eq!(recv_append(b.as_fd(), &mut v, 3, true).unwrap(), 3);
        assert_eq!(v, b"xcde");
        drop(a);
        assert!(poll_readable(b.as_fd(), Some(Duration::ZERO)).unwrap());
        assert_eq!(recv(b.as_fd(), &mut two, false).unwrap(), 0);
        let e = send_vectored(b.as_fd(), &[IoSlice::new(b"z")]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
    }
}
