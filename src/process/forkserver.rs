//! `StartMethod::ForkServer`: a small single-threaded server process that forks children
//! on request.
//!
//! # Design
//!
//! The server is started on first use by re-executing `/proc/self/exe` with
//! `PROCSHARE_FORKSERVER=v1:<fd>`; its `main` calls `init()` first, which enters
//! [`serve`] instead of returning. So the server is always a *fresh* image stopped at
//! `init()`: single-threaded, holding no lock, no matter how many threads the requesting
//! process runs or when it asks. (Python's forkserver starts the same way, lazily, with a
//! fresh interpreter.) Starting it lazily instead of forking it inside every `init()`
//! costs nothing to programs that never use it.
//!
//! Requests travel over a `SOCK_SEQPACKET` pair, one message each way:
//!
//! ```text
//! parent -> server  "S" + SCM_RIGHTS [bootstrap memfd, result socket, status socket,
//!                                      the argument's handle descriptors...]
//! server -> parent  "P" pid:u32 + SCM_RIGHTS [pidfd]      (pidfd omitted if refused)
//!                 | "E" errno:i32                          (fork failed)
//! ```
//!
//! The server forks; the child closes everything of the server's, checks and runs the
//! bootstrap message exactly as a Spawn child does (same binary, same function type), and
//! reports on the result socket. The child is the *server's* child, so the parent cannot
//! `waitid` it: the server opens a pidfd for it before anyone could reap it and passes it
//! over (so the parent's `terminate`/`kill`/`is_alive` can never hit a recycled pid), and
//! when the child ends it writes the 5-byte status (`kind:u8 code:i32`) on the status
//! socket, closes it, and only then reaps the child (so a requester without a pidfd, which
//! signals by pid, can tell from the status socket whether the pid may be recycled yet:
//! see `Child::signal`).
//!
//! # Failure modes
//!
//! * The server dies (killed): the next request finds it gone (`EPIPE`, end of file),
//!   reaps it and starts a new one. A child whose status socket reaches end of file
//!   without a status is reported once its pidfd says it ended, with the status lost
//!   (`Exited(-1)`).
//! * The requesting process dies: the server sees end of file on the control socket,
//!   SIGKILLs its daemon children and exits; non-daemon children run on. Daemon children
//!   also carry `PR_SET_PDEATHSIG` towards the server.
//! * The requesting process is at its descriptor limit when the answer comes: the pidfd
//!   is lost (`MSG_CTRUNC`), not the child, which already runs the argument: it is
//!   handled as a child without a pidfd (as on kernels that refuse them), and the server
//!   is kept. A server at *its* limit refuses the request (`EMFILE`) and keeps serving.
//! * A forked child of the requester (`Process::fork`) drops its inherited copy of the
//!   control socket at once, so it neither shares the server nor keeps it alive; it
//!   starts its own on first use.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::child::{Child, ChildParts, ServerLink};
use super::{ChildFlags, StartMethod, spawn};
use crate::error::{Error, Result};
use crate::queue::peers;
use crate::sys::{self, ChildStatus, WaitTarget};

pub(crate) const ENV: &str = "PROCSHARE_FORKSERVER";

struct Server {
    /// The process that started it (a forked copy of this state is not the owner).
    owner: u32,
    pid: u32,
    control: OwnedFd,
}

static SERVER: Mutex<Option<Server>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Server>> {
    SERVER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether this process has a fork server running (started by it, not inherited).
pub(crate) fn is_running() -> bool {
    matches!(&*lock(), Some(s) if s.owner == sys::getpid())
}

/// In a freshly forked child: close the inherited control socket (it belongs to the
/// parent's server). `try_lock`, so the child of a `fork_unchecked` cannot deadlock.
pub(crate) fn forget_in_child() {
    if let Ok(mut g) = SERVER.try_lock() {
        drop(g.take());
    }
}

fn start() -> Result<Server> {
    let (ours, theirs) = sys::socketpair_seqpacket()
        .map_err(|e| Error::io("creating the fork server's control socket", e))?;
    let value = format!("v1:{}", theirs.as_raw_fd());
    // The fork inside only execs: it must not be lent this process's queue handles.
    let pid = peers::forking_to_exec(|| sys::spawn_helper((ENV, &value), &[theirs.as_raw_fd()]))
        .map_err(|e| Error::io("starting the fork server (re-executing /proc/self/exe)", e))?;
    Ok(Server {
        owner: sys::getpid(),
        pid,
        control: ours,
    })
}

/// Kills and reaps a server that stopped answering (it is our child).
fn bury(server: Server) {
    let _ = sys::send_signal(server.pid, sys::signal::KILL, false);
    let _ = sys::wait_child(WaitTarget::Pid(server.pid), true, true);
}

enum Failure {
    /// The server is gone or broken: start another and retry once.
    ServerGone(String),
    Fatal(Error),
}

fn request(
    server: &Server,
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> std::result::Result<(u32, Option<OwnedFd>), Failure> {
    let ctl = server.control.as_fd();
    if let Err(e) = sys::send_with_fds(ctl, b"S", fds) {
        return Err(Failure::ServerGone(format!(
            "sending the request failed: {e}"
        )));
    }
    let deadline = sys::Deadline::after(timeout);
    loop {
        match sys::poll_readable(ctl, deadline.remaining()) {
            Ok(true) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && !deadline.has_passed() => {
                continue;
            }
            _ => {
                return Err(Failure::ServerGone(format!(
                    "it did not answer within {timeout:?}"
                )));
            }
        }
    }
    let mut buf = [0u8; 16];
    // A pidfd lost because this process is at its descriptor limit is not a broken
    // server: the child exists (it runs the argument already), so it is taken as a child
    // without a pidfd, as on kernels that refuse them (see the module docs).
    let (n, mut got, _truncated) = match sys::recv_with_fds_truncating(ctl, &mut buf) {
        Ok(r) => r,
        Err(e) => {
            return Err(Failure::ServerGone(format!(
                "reading its answer failed: {e}"
            )));
        }
    };
    match (n, buf[0]) {
        (5, b'P') => {
            let pid = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
            Ok((pid, got.pop()))
        }
        (5, b'E') => {
            let errno = i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
            Err(Failure::Fatal(Error::io(
                "the fork server forking a child",
                std::io::Error::from_raw_os_error(errno),
            )))
        }
        (0, _) => Err(Failure::ServerGone("it closed its control socket".into())),
        _ => Err(Failure::ServerGone("it sent a malformed answer".into())),
    }
}

pub(crate) fn spawn<F, A, R>(
    arg: &A,
    name: String,
    flags: ChildFlags,
    bootstrap_timeout: Duration,
) -> Result<Child<R>>
where
    F: Fn(A) -> R + Copy + 'static,
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    let (bytes, handle_fds, loans) = spawn::message::<F, A, R>(arg, &name, flags)?;
    if handle_fds.len() + 3 > sys::MAX_FDS {
        return Err(Error::InvalidArgument {
            what: format!(
                "the argument holds {} handles with descriptors; a fork server child can take \
                 at most {}: use StartMethod::Spawn, or fewer handles",
                handle_fds.len(),
                sys::MAX_FDS - 3
            ),
        });
    }
    let memfd =
        sys::memfd_with(&bytes).map_err(|e| Error::io("writing the bootstrap message", e))?;
    let memfd = OwnedFd::from(memfd);
    let (result_ours, result_theirs) =
        sys::socketpair_stream().map_err(|e| Error::io("creating the result socket", e))?;
    let (status_ours, status_theirs) =
        sys::socketpair_stream().map_err(|e| Error::io("creating the status socket", e))?;
    let mut guard = lock();
    let me = sys::getpid();
    let mut last_failure = String::new();
    for _attempt in 0..2 {
        if !matches!(&*guard, Some(s) if s.owner == me) {
            // An inherited server belongs to our parent: leave it alone, start our own.
            *guard = Some(start()?);
        }
        let server = guard.as_ref().expect("just ensured");
        let mut fds = vec![memfd.as_fd(), result_theirs.as_fd(), status_theirs.as_fd()];
        fds.extend(handle_fds.iter().map(|f| f.as_fd()));
        match request(server, &fds, bootstrap_timeout) {
            Ok((pid, pidfd)) => {
                drop(guard);
                // Not our child: the server may reap it at any time, which its pidfd tells.
                loans.bind(pid, pidfd.as_ref().map(|p| p.as_fd()));
                return Ok(Child::new(ChildParts {
                    pid,
                    name,
                    daemon: flags.daemon,
                    method: StartMethod::ForkServer,
                    sock: result_ours,
                    bootstrap_timeout: Some(bootstrap_timeout),
                    server: Some(ServerLink {
                        pidfd,
                        status: status_ours,
                    }),
                }));
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::ServerGone(why)) => {
                last_failure = why;
                if let Some(dead) = guard.take() {
                    bury(dead);
                }
            }
        }
    }
    Err(Error::Io {
        op: "asking the fork server for a child",
        source: std::io::Error::other(format!(
            "the fork server failed twice ({last_failure}); does main call \
             procshare::init() as its first line? Use StartMethod::Spawn meanwhile"
        )),
    })
}

/// A child the server forked and has not reaped yet.
struct Kid {
    pid: u32,
    pidfd: Option<OwnedFd>,
    status: OwnedFd,
    daemon: bool,
}

/// The server's main loop, entered from `init()`; never returns.
pub(crate) fn serve(value: OsString) -> ! {
    if sys::thread_count().map(|n| n == 1).unwrap_or(false) {
        // SAFETY: the process has one thread (checked just above), so nothing reads or
        // writes the environment concurrently.
        unsafe { std::env::remove_var(ENV) };
    }
    let fd = value
        .to_str()
        .and_then(|v| v.strip_prefix("v1:"))
        .and_then(|v| v.parse::<i32>().ok());
    let Some(control) = fd.and_then(|fd| sys::adopt_inherited_fd(fd, true).ok()) else {
        eprintln!("procshare: {ENV} does not name a usable control socket; exiting");
        sys::exit_immediately(1)
    };
    let me = sys::getpid();
    let mut kids: Vec<Kid> = Vec::new();
    loop {
        let mut fds = vec![control.as_fd()];
        fds.extend(
            kids.iter()
                .filter_map(|k| k.pidfd.as_ref().map(|p| p.as_fd())),
        );
        let all_pidfds = kids.iter().all(|k| k.pidfd.is_some());
        let timeout = if all_pidfds {
            None
        } else {
            Some(Duration::from_millis(5))
        };
        let ready = sys::poll_many(&fds, timeout).unwrap_or_else(|_| vec![false; fds.len()]);
        drop(fds);
        if ready[0] && !handle_request(&control, &mut kids, me) {
            // The requester is gone: its daemon children go with it.
            for k in kids.iter().filter(|k| k.daemon) {
                match &k.pidfd {
                    Some(p) => drop(sys::pidfd_send_signal(p.as_fd(), sys::signal::KILL)),
                    None => drop(sys::send_signal(k.pid, sys::signal::KILL, false)),
                }
            }
            sys::exit_immediately(0);
        }
        kids.retain(|k| {
            let target = match &k.pidfd {
                Some(p) => WaitTarget::Pidfd(p.as_fd()),
                None => WaitTarget::Pid(k.pid),
            };
            // Report first, reap after: until the requester can read the status, the
            // child's pid stays a zombie, never another process's (a requester without
            // a pidfd signals by pid only while no status has arrived).
            let status = match sys::wait_child(target, false, false) {
                Ok(None) => return true,
                Ok(Some(s)) => s,
                Err(_) => ChildStatus::Exited(-1),
            };
            let (kind, code) = match status {
                ChildStatus::Exited(c) => (0u8, c),
                ChildStatus::Signaled(s) => (1u8, s),
            };
            let mut msg = [kind, 0, 0, 0, 0];
            msg[1..].copy_from_slice(&code.to_le_bytes());
            let _ = sys::send_all(k.status.as_fd(), &msg);
            let _ = sys::wait_child(target, false, true);
            false
        });
    }
}

/// Serves one request; `false` when the requester has closed the control socket.
fn handle_request(control: &OwnedFd, kids: &mut Vec<Kid>, me: u32) -> bool {
    let mut buf = [0u8; 16];
    let (n, fds, truncated) = match sys::recv_with_fds_truncating(control.as_fd(), &mut buf) {
        Ok(r) => r,
        Err(_) => return false,
    };
    if n == 0 {
        return false;
    }
    let reply_error = |errno: i32| {
        let mut msg = [b'E', 0, 0, 0, 0];
        msg[1..].copy_from_slice(&errno.to_le_bytes());
        let _ = sys::send_with_fds(control.as_fd(), &msg, &[]);
    };
    if truncated {
        // The server is at its descriptor limit (inherited from the requester when it
        // started): refuse this request, keep serving.
        reply_error(24); // EMFILE
        return true;
    }
    if fds.len() < 3 {
        reply_error(22); // EINVAL
        return true;
    }
    let mut fds = fds.into_iter();
    let (Some(memfd), Some(result), Some(status)) = (fds.next(), fds.next(), fds.next()) else {
        reply_error(22);
        return true;
    };
    let handles: Vec<OwnedFd> = fds.collect();
    let file = std::fs::File::from(memfd);
    let Ok(bytes) = sys::read_whole(&file, spawn::MAX_MESSAGE) else {
        reply_error(5); // EIO
        return true;
    };
    drop(file);
    let flags = spawn::message_flags(&bytes).unwrap_or_default();
    let daemon = flags.daemon;
    // SAFETY: the server is single-threaded (it is a fresh image that stopped in init()
    // and never starts threads), so the child may run anything.
    match unsafe { sys::fork() } {
        Ok(sys::Forked::Child) => {
            // Nothing of the server's may stay open in the child: siblings' status
            // sockets and pidfds, the control socket.
            drop(std::mem::take(kids));
            drop(status);
            // SAFETY: `control` is never used again in this process, which does not
            // return from `run_message` (it ends in `_exit`, so the `OwnedFd` is never
            // dropped and the descriptor never closed twice).
            unsafe { sys::close_raw(control.as_raw_fd()) };
            if flags.process_group && sys::become_group_leader().is_err() {
                sys::exit_immediately(1); // cannot fail for a fresh child; never run ungrouped
            }
            if daemon {
                let ok = sys::set_parent_death_signal(sys::signal::KILL).is_ok();
                if !ok || sys::getppid() != me {
                    sys::exit_immediately(1);
                }
            }
            spawn::run_message(result, &bytes, Some(me), handles)
        }
        Ok(sys::Forked::Parent(pid)) => {
            drop(result);
            if flags.process_group {
                // Also from this side, so the group exists before the requester hears of
                // the child (see `make_group_leader`).
                let _ = sys::make_group_leader(pid);
            }
            drop(handles);
            // Unreaped, so the pidfd certainly names this child.
            let pidfd = sys::pidfd_open(pid).ok();
            let mut msg = [b'P', 0, 0, 0, 0];
            msg[1..].copy_from_slice(&pid.to_le_bytes());
            let fds: Vec<_> = pidfd.iter().map(|p| p.as_fd()).collect();
            let _ = sys::send_with_fds(control.as_fd(), &msg, &fds);
            kids.push(Kid {
                pid,
                pidfd,
                status,
                daemon,
            });
            true
        }
        Err(e) => {
            reply_error(e.raw_os_error().unwrap_or(12));
            true
        }
    }
}
