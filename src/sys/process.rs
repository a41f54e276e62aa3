//! OS calls for the `Process` layer: pidfds, `waitid`, parent-death signals, re-executing
//! the current binary with inherited descriptors, and the few descriptor and poll helpers
//! the result channel needs.
//!
//! Every function makes one kind of system call (retrying on `EINTR` where that cannot
//! repeat a side effect) and reports failure as `io::Error`; what a failure means for a
//! child is `process`'s business.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::ptr;
use std::time::Duration;

/// "No such process", for callers that treat it as "already gone".
pub(crate) const ESRCH: i32 = libc::ESRCH;

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A pidfd for `pid` (`pidfd_open(2)`, Linux 5.3), close-on-exec. Callers only pass the pid
/// of their own unreaped child, which the kernel cannot recycle, so the descriptor is
/// certain to name that child. Fails with `ENOSYS` on older kernels and `EPERM`/`ENOSYS`
/// under some seccomp filters; the caller then falls back to the plain pid.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1;
    // no memory is passed.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the call returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// Sends `signal` to the process `pidfd` names (`pidfd_send_signal(2)`). Once that process
/// has been reaped this fails with `ESRCH` instead of hitting whoever got its pid.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: a null siginfo is allowed (the kernel fills in a SI_USER one); the other
    // arguments are integers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChildStatus {
    /// It called `exit`/`_exit` (or returned from `main`) with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
}

/// Which child to wait for.
#[derive(Clone, Copy)]
pub(crate) enum WaitTarget<'a> {
    /// By pidfd (`waitid(P_PIDFD)`, Linux 5.4): cannot name a recycled pid.
    Pidfd(BorrowedFd<'a>),
    /// By pid (`waitid(P_PID)`): safe only while the child is unreaped.
    Pid(u32),
}

/// `waitid` for one child that has ended: `Ok(None)` while it runs (`block == false`).
/// With `reap == false` the child is left a zombie (`WNOWAIT`), so its status can be read
/// again and its pid stays reserved.
pub(crate) fn wait_child(
    target: WaitTarget<'_>,
    block: bool,
    reap: bool,
) -> io::Result<Option<ChildStatus>> {
    let (idtype, id) = match target {
        WaitTarget::Pidfd(fd) => (libc::P_PIDFD, fd.as_raw_fd() as libc::id_t),
        WaitTarget::Pid(pid) => (libc::P_PID, pid as libc::id_t),
    };
    let mut flags = libc::WEXITED;
    if !block {
        flags |= libc::WNOHANG;
    }
    if !reap {
        flags |= libc::WNOWAIT;
    }
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value (and how WNOHANG reports "no
        // child ready": si_pid stays 0).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
        let rc = unsafe { libc::waitid(idtype, id, &mut info, flags) };
        if rc < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` for a SIGCHLD-style event (or left it zeroed), so
        // reading the pid and status members of its union is what the ABI prescribes.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(match info.si_code {
            libc::CLD_EXITED => ChildStatus::Exited(status),
            _ => ChildStatus::Signaled(status),
        }));
    }
}

/// Waits until `a` or `b` (either may be absent) is readable, for at most `timeout`
/// (`None`: no limit). Returns which of them are. A signal ends the wait early with
/// nothing readable; the caller re-checks its own deadline.
pub(crate) fn poll_two(
    a: Option<BorrowedFd<'_>>,
    b: Option<BorrowedFd<'_>>,
    timeout: Option<Duration>,
) -> io::Result<(bool, bool)> {
    let mk = |fd: Option<BorrowedFd<'_>>| libc::pollfd {
        fd: fd.map_or(-1, |f| f.as_raw_fd()), // poll ignores negative descriptors
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [mk(a), mk(b)];
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |ts| ts as *const libc::timespec);
    // SAFETY: `fds` is two valid, writable pollfds; `ts_ptr` is null or points at `ts`,
    // which outlives the call; a null signal mask leaves the mask unchanged.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, ts_ptr, ptr::null()) };
    if rc < 0 {
        if errno() == libc::EINTR {
            return Ok((false, false));
        }
        return Err(io::Error::last_os_error());
    }
    let ready = |p: &libc::pollfd| {
        p.fd >= 0
            && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    };
    Ok((ready(&fds[0]), ready(&fds[1])))
}

/// One non-blocking `recv` appending to `buf`: `Ok(Some(0))` at end of file, `Ok(None)`
/// when nothing is waiting.
pub(crate) fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    const CHUNK: usize = 64 * 1024;
    buf.reserve(CHUNK);
    let spare = &mut buf.spare_capacity_mut()[..CHUNK];
    loop {
        // SAFETY: `spare` is CHUNK bytes owned by `buf`, borrowed mutably for the call;
        // recv writes at most that many and reads none.
        let rc = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if rc >= 0 {
            // SAFETY: the kernel initialised the first `rc` bytes of the spare capacity,
            // which follow the initialised bytes and lie within the reserved capacity.
            unsafe { buf.set_len(buf.len() + rc as usize) };
            return Ok(Some(rc as usize));
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN => return Ok(None),
            _ => return Err(io::Error::last_os_error()),
        }
    }
}

/// Asks the kernel to send `signal` to the calling process when the thread that forked it
/// ends (`PR_SET_PDEATHSIG`). The setting survives `execve` of a non-setuid binary.
pub(crate) fn set_parent_death_signal(signal: i32) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The parent's pid (1, or a subreaper's, once the parent has died).
pub(crate) fn getppid() -> u32 {
    // SAFETY: getppid has no preconditions.
    unsafe { libc::getppid() as u32 }
}

/// Identity of the running executable: device, inode, size and modification time of
/// `/proc/self/exe`. Two processes with equal identities run the same file contents
/// unless someone rewrote the file in place and restored its mtime.
pub(crate) fn executable_identity() -> io::Result<[u64; 5]> {
    let m = std::fs::metadata("/proc/self/exe")?;
    Ok([
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
    ])
}

/// Takes ownership of an inherited descriptor of any kind after checking it is open.
pub(crate) fn adopt_inherited_any(fd: RawFd) -> io::Result<OwnedFd> {
    set_cloexec_raw(fd, true)?; // fails with EBADF if it is not open
    // SAFETY: the descriptor is open (fcntl succeeded) and was handed to this process for
    // the bootstrap alone, through the environment variable the caller just consumed.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets or clears close-on-exec on `fd`; async-signal-safe (only `fcntl`), for `pre_exec`.
fn set_cloexec_raw(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD take integers; an invalid fd gives EBADF.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let new = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, new) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Takes ownership of the inherited descriptor `fd` after checking that it is open and of
/// the expected kind (`socket == true`: a socket; else a regular file), so a stale or
/// forged number in the environment cannot make us adopt an unrelated descriptor.
pub(crate) fn adopt_inherited_fd(fd: RawFd, socket: bool) -> io::Result<OwnedFd> {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid and writable; an invalid fd gives EBADF.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let kind = st.st_mode & libc::S_IFMT;
    let want = if socket {
        libc::S_IFSOCK
    } else {
        libc::S_IFREG
    };
    if kind != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "inherited descriptor is not of the expected kind",
        ));
    }
    set_cloexec_raw(fd, true)?;
    // SAFETY: the descriptor is open (fstat succeeded) and was handed to this process for
    // the bootstrap alone, through the environment variable the caller just consumed.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An anonymous sealed memory file holding `bytes` (for the bootstrap message).
pub(crate) fn memfd_with(bytes: &[u8]) -> io::Result<File> {
    let file = super::memfd_create("procshare-bootstrap", bytes.len() as u64)?;
    file.write_all_at(bytes, 0)?;
    Ok(file)
}

/// The whole contents of `file`, read with `pread` (the offset is shared with nobody).
pub(crate) fn read_whole(file: &File, limit: u64) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    if len > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "file too large"));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// Starts `/proc/self/exe` (the very file this process runs, even if it was since
/// replaced on disk) with `argv[0]` copied, `env` added to the environment, and the
/// descriptors `keep` inherited (close-on-exec cleared in the child only). With
/// `death_signal`, the child asks for `SIGKILL` when its parent dies and exits at once if
/// the parent (`parent_pid`) is already gone. With `process_group`, the child leads a new
/// process group from before the exec. Returns the child's pid, unreaped.
pub(crate) fn spawn_self(
    env: (&str, &str),
    keep: &[RawFd],
    death_signal: bool,
    process_group: bool,
    parent_pid: u32,
) -> io::Result<u32> {
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Some(arg0) = std::env::args_os().next() {
        cmd.arg0(arg0);
    } else {
        cmd.arg0(OsString::from("procshare-child"));
    }
    cmd.env(env.0, env.1);
    if process_group {
        // std calls setpgid(0, 0) in the child before the exec.
        cmd.process_group(0);
    }
    let keep: Vec<RawFd> = keep.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (fcntl, prctl, getppid, _exit), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                set_cloexec_raw(fd, false)?;
            }
            if death_signal {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                // 0: the parent is outside a new pid namespace and cannot be checked (see
                // `process::parent_is_gone`).
                let ppid = libc::getppid() as u32;
                if ppid != 0 && ppid != parent_pid {
                    libc::_exit(1);
                }
            }
            Ok(())
        })
    };
    let child = cmd.spawn()?;
    // Dropping std's handle neither waits for nor kills the child; the caller owns the pid.
    Ok(child.id())
}

/// Writes `bytes` whole to a blocking socket (`MSG_NOSIGNAL`: a gone peer is `EPIPE`).
pub(crate) fn send_all(fd: BorrowedFd<'_>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = super::send_vectored(fd, &[io::IoSlice::new(bytes)])?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (message boundaries kept),
/// close-on-exec: the fork server's control channel.
pub(crate) fn socketpair_seqpacket() -> io::Result<(OwnedFd, OwnedFd)> {
    super::socketpair(libc::SOCK_SEQPACKET)
}

/// At most this many descriptors travel in one message (the kernel's limit is 253).
pub(crate) const MAX_FDS: usize = 96;

/// A control-message buffer, aligned for `cmsghdr`, with room for `fds` descriptors.
fn control_buffer(fds: usize) -> (Vec<u64>, usize) {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) } as usize;
    (vec![0u64; space.div_ceil(8)], space)
}

/// Sends one message of `bytes` with the descriptors `fds` attached (`SCM_RIGHTS`).
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS || bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let (mut control, space) = control_buffer(fds.len());
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` writable, cmsghdr-aligned bytes, so the
        // first header and its data (fds.len() ints) lie inside `control`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` describes one live iovec over `bytes` and the control buffer
        // above, both borrowed for the call; sendmsg only reads them.
        let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            if rc as usize != bytes.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short seqpacket send",
                ));
            }
            return Ok(());
        }
        if errno() != libc::EINTR {
            return Err(io::Error::last_os_error());
        }
    }
}

/// Receives one message into `buf`, with any descriptors attached (close-on-exec).
/// Returns the byte count (0: the peer closed) and the descriptors.
///
/// # Errors
///
/// As `recvmsg`; also `InvalidData` if descriptors were lost (`MSG_CTRUNC`: this process
/// is at its descriptor limit, or more than [`MAX_FDS`] were sent). The message is
/// consumed either way: [`recv_with_fds_truncating`] gives its bytes too.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    match recv_with_fds_truncating(sock, buf)? {
        (_, _, true) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors truncated",
        )),
        (n, fds, false) => Ok((n, fds)),
    }
}

/// As [`recv_with_fds`], but a message whose descriptors were lost (`MSG_CTRUNC`: this
/// process is at its descriptor limit) is returned with the ones that arrived and `true`.
pub(crate) fn recv_with_fds_truncating(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let (mut control, space) = control_buffer(MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at a writable iovec over `buf` and a writable, aligned
        // control buffer, both live for the call.
        let rc = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if rc >= 0 {
            break rc as usize;
        }
        if errno() != libc::EINTR {
            return Err(io::Error::last_os_error());
        }
    };
    let mut fds = Vec::new();
    // SAFETY: recvmsg filled the control buffer and set msg_controllen; the CMSG macros
    // walk only within it, and every SCM_RIGHTS payload holds the descriptors the kernel
    // just installed in this process, each owned by nobody else yet.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, fds, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Waits until any of `fds` is readable, for at most `timeout` (`None`: no limit).
/// Returns one flag per descriptor; all false after a signal or the timeout.
pub(crate) fn poll_many(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |ts| ts as *const libc::timespec);
    // SAFETY: `pfds` is a valid, writable array of `pfds.len()` pollfds; `ts_ptr` is null
    // or points at `ts`, which outlives the call.
    let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as _, ts_ptr, ptr::null()) };
    if rc < 0 {
        if errno() == libc::EINTR {
            return Ok(vec![false; fds.len()]);
        }
        return Err(io::Error::last_os_error());
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
        .collect())
}

/// Starts `/proc/self/exe` as a helper (the fork server): like [`spawn_self`] without a
/// death signal.
pub(crate) fn spawn_helper(env: (&str, &str), keep: &[RawFd]) -> io::Result<u32> {
    spawn_self(env, keep, false, false, 0)
}

/// Closes `fd` without an owner's `Drop`.
///
/// # Safety
///
/// `fd` must be open and must never be used (or closed) again by anything in this
/// process, including the `OwnedFd` that may still hold it (which must never be dropped).
pub(crate) unsafe fn close_raw(fd: RawFd) {
    // SAFETY: the caller guarantees nothing uses `fd` afterwards.
    unsafe { libc::close(fd) };
}
