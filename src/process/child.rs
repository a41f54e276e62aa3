//! The parent's handle on a child: waiting (by pidfd), signalling, collecting the value.

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::error::{ProcessError, signal_name};
use super::{StartMethod, registry, wire};
use crate::error::{Error, Result};
use crate::sys::{self, ChildStatus, Deadline, WaitTarget};

/// How often a child without a pidfd (old kernel, seccomp) is polled with `waitpid`.
const PID_POLL: Duration = Duration::from_millis(5);

/// How long a fork-server child's status may lag behind its end before it counts as lost.
const STATUS_GRACE: Duration = Duration::from_secs(2);

/// A running (or finished, unjoined) child process started by [`Process`](super::Process),
/// whose function returns an `R`.
///
/// # Dropping
///
/// Dropping the handle of a **non-daemon** child that was not joined *waits* for it (as
/// Python joins non-daemon children at exit, and as `std::thread::scope` joins its
/// threads), so its work is never cut short silently; its value is discarded. If the
/// dropping thread is already panicking, or the child is a **daemon**, it is killed
/// (SIGKILL) instead. Either way it is reaped: no zombie is left behind. A spawned child
/// that never reaches `procshare::init()` is killed when its bootstrap timeout expires,
/// so the drop cannot hang on it. A fork-server child is the server's to reap: its drop
/// returns once the child's pidfd says it ended, without waiting for the server's report
/// of its status (a stopped or busy server delays only the reaping, done by the server).
///
/// Waiting and signalling go through a pidfd, so they can never reach another process
/// that was given a recycled pid; where the kernel refuses pidfds (before Linux 5.3, some
/// seccomp profiles) the plain pid is used, which is safe as long as nothing else in the
/// program reaps this child (SIGCHLD left at its default, no `waitpid(-1)`).
#[must_use = "dropping a Child waits for a non-daemon child (or kills a daemon); call join()"]
pub struct Child<R> {
    pid: u32,
    name: String,
    daemon: bool,
    method: StartMethod,
    pidfd: Option<OwnedFd>,
    sock: Option<OwnedFd>,
    buf: Vec<u8>,
    /// Spawned children must report STARTED before this deadline.
    bootstrap: Option<(Deadline, Duration)>,
    status: Option<ChildStatus>,
    forced: Option<ProcessError>,
    delivered: bool,
    /// For a fork-server child: the socket on which the server reports its status.
    status_sock: Option<OwnedFd>,
    status_buf: Vec<u8>,
    /// Set when a fork-server child's pidfd says it ended: the server's report is due.
    server_grace: Option<Deadline>,
    /// Set by `drop`: nobody will read the status, so a fork-server child counts as done
    /// as soon as its pidfd says it ended, without waiting for the server's report (which
    /// a stopped or busy server may hold back for [`STATUS_GRACE`]: a pool's `terminate`
    /// waited that long per worker).
    dropping: bool,
    via_server: bool,
    _value: PhantomData<fn() -> R>,
}

/// What the fork server hands over with a child it forked for us.
pub(crate) struct ServerLink {
    /// Opened by the server before it could reap the child (`None` if refused).
    pub(crate) pidfd: Option<OwnedFd>,
    /// Where the server writes the child's status (5 bytes) once it reaped it.
    pub(crate) status: OwnedFd,
}

pub(crate) struct ChildParts {
    pub(crate) pid: u32,
    pub(crate) name: String,
    pub(crate) daemon: bool,
    pub(crate) method: StartMethod,
    pub(crate) sock: OwnedFd,
    pub(crate) bootstrap_timeout: Option<Duration>,
    pub(crate) server: Option<ServerLink>,
}

impl<R> Child<R> {
    pub(crate) fn new(p: ChildParts) -> Child<R> {
        let via_server = p.server.is_some();
        let (pidfd, status_sock) = match p.server {
            Some(link) => (link.pidfd, Some(link.status)),
            // The child is ours and unreaped, so its pid cannot have been recycled yet:
            // the pidfd certainly names it.
            None => (sys::pidfd_open(p.pid).ok(), None),
        };
        #[cfg(feature = "test-hooks")]
        let pidfd = pidfd.filter(|_| !super::spawn::hooks::pidfds_disabled());
        registry::add(p.pid, &p.name, via_server);
        Child {
            pid: p.pid,
            name: p.name,
            daemon: p.daemon,
            method: p.method,
            pidfd,
            sock: Some(p.sock),
            buf: Vec::new(),
            bootstrap: p.bootstrap_timeout.map(|t| (Deadline::after(t), t)),
            status: None,
            forced: None,
            delivered: false,
            status_sock,
            status_buf: Vec::new(),
            server_grace: None,
            dropping: false,
            via_server,
            _value: PhantomData,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child's name (`Process-N` unless the builder set one).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the child was started as a daemon.
    pub fn daemon(&self) -> bool {
        self.daemon
    }

    /// How the child was started.
    pub fn start_method(&self) -> StartMethod {
        self.method
    }

    fn target(&self) -> WaitTarget<'_> {
        match &self.pidfd {
            Some(fd) => WaitTarget::Pidfd(fd.as_fd()),
            None => WaitTarget::Pid(self.pid),
        }
    }

    /// Whether a spawned (or fork-server) child has not yet proven that it reached
    /// `init()` and passed the handshake, as far as the last wait or `try_join` read.
    /// Always false for a forked child.
    pub(crate) fn is_bootstrapping(&self) -> bool {
        self.bootstrap.is_some()
    }

    /// Whether the child is still running. Does not reap it.
    pub fn is_alive(&self) -> bool {
        if self.status.is_some() {
            return false;
        }
        if self.via_server {
            // Not our child: its pidfd turns readable when it ends.
            return match &self.pidfd {
                Some(fd) => !sys::poll_readable(fd.as_fd(), Some(Duration::ZERO)).unwrap_or(true),
                // Until the server reports its status (or is gone: then, as `pump` does,
                // the child counts as ended, its status lost).
                None => !self.server_reported(),
            };
        }
        matches!(sys::wait_child(self.target(), false, false), Ok(None))
    }

    /// For a fork-server child: whether the server's report (a status, or its end of
    /// file) is waiting on the status socket, i.e. the child has ended.
    fn server_reported(&self) -> bool {
        self.status_sock
            .as_ref()
            .is_none_or(|s| sys::poll_readable(s.as_fd(), Some(Duration::ZERO)).unwrap_or(true))
    }

    /// Python's `exitcode`: `None` while the child runs, its exit code once it exited, or
    /// `-signal` if a signal ended it.
    pub fn exitcode(&mut self) -> Option<i32> {
        self.pump(Deadline::after(Duration::ZERO));
        if self.status.is_none() && self.via_server && !self.is_alive() {
            // It ended (its pidfd says so), and the fork server, which reaps it, reports
            // its status right after: wait for that report, boundedly, so `exitcode` never
            // says "still running" once `is_alive` has said it is not.
            self.pump(Deadline::after(Duration::from_secs(2)));
        }
        self.status.map(|s| match s {
            ChildStatus::Exited(c) => c,
            ChildStatus::Signaled(s) => -s,
        })
    }

    /// Asks the child to stop (SIGTERM). Does nothing if it has already been reaped.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the signal could not be sent (e.g. a child that changed its
    /// credentials: `EPERM`).
    pub fn terminate(&self) -> Result<()> {
        self.signal(sys::signal::TERM)
    }

    /// Kills the child (SIGKILL). Does nothing if it has already been reaped.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the signal could not be sent.
    pub fn kill(&self) -> Result<()> {
        self.signal(sys::signal::KILL)
    }

    /// Sends the signal `sig` (a number such as `libc::SIGSTOP`, `libc::SIGCONT` or
    /// `libc::SIGUSR1`) to the child, as Python's `os.kill(p.pid, sig)` would, but through
    /// its pidfd, so it can never reach another process that was given a recycled pid. Does
    /// nothing if the child has already been reaped or has already exited.
    ///
    /// The signal reaches the child alone; to reach everything it started too, start it
    /// with [`Builder::process_group`](super::Builder::process_group) and signal the group
    /// (`libc::killpg(child.pid() as i32, sig)`).
    ///
    /// Without a pidfd (a kernel that refuses them) the signal goes by pid: for a child of
    /// ours only while it is unreaped; for a `ForkServer` child only while the server has
    /// not reported its end (the server reports before it reaps). What is left is a race
    /// of microseconds (the child ending, being reaped and its pid reused between that
    /// check and the signal), which pidfds close.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the signal could not be sent: `EINVAL` for a number that is not a
    /// signal, `EPERM` for a child that changed its credentials.
    pub fn signal(&self, sig: i32) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        if self.via_server && self.pidfd.is_none() {
            // Not our child and no pidfd (refused by the kernel, or lost to the descriptor
            // limit): the server reports a child's status *before* it reaps it, so while
            // nothing has arrived on the status socket the pid is still the child's (a
            // zombie at worst). Once a status (or the server's end of file) is there, it
            // may be anyone's: do nothing. (Left open: the child ending, the server
            // reporting and reaping it and the pid being reused, all between this look
            // and the signal below.)
            if self.server_reported() {
                return Ok(());
            }
        }
        let r = match &self.pidfd {
            Some(fd) => sys::pidfd_send_signal(fd.as_fd(), sig),
            // Unreaped (ours), or not yet reported by the server, which reaps only after
            // reporting (checked above): the pid is still this child's.
            None => sys::send_signal(self.pid, sig, false),
        };
        match r {
            Err(e) if e.raw_os_error() == Some(sys::ESRCH) => Ok(()),
            r => r.map_err(|e| Error::io("signalling a child process", e)),
        }
    }

    /// Reads what the child sends and reaps it once it has exited, until `deadline`.
    /// Returns whether the child has been reaped. Never blocks past `deadline` except to
    /// reap a child it has just killed for missing its bootstrap deadline.
    fn pump(&mut self, deadline: Deadline) -> bool {
        loop {
            if self.status.is_some() {
                return true;
            }
            // A spawned child must prove it reached init() in time.
            let mut wait = deadline;
            if let Some((boot, limit)) = self.bootstrap {
                if boot.has_passed() {
                    // Judge on everything the child has sent so far, not only on what an
                    // earlier call happened to read: a join long after the deadline must
                    // not mistake a started child for a stuck one.
                    self.read_available();
                }
                if wire::parse(&self.buf).started {
                    self.bootstrap = None;
                } else if boot.has_passed() && !self.via_server && self.reap(false) {
                    // It already exited without starting: its exit status says more
                    // than "timed out" (see take_outcome).
                    self.bootstrap = None;
                    continue;
                } else if boot.has_passed() {
                    self.bootstrap = None;
                    let _ = self.kill();
                    self.forced = Some(ProcessError::Bootstrap(format!(
                        "the spawned child (pid {}) did not reach procshare::init() within \
                         {limit:?}, so it was killed; call procshare::init() as the first line \
                         of main, before anything slow, or raise Builder::bootstrap_timeout",
                        self.pid
                    )));
                    if !self.via_server {
                        self.reap(true);
                    }
                    continue;
                } else if let Some(r) = boot.remaining() {
                    wait = wait.capped(r);
                }
            }
            if self.via_server {
                if self.pump_server(wait) {
                    return true;
                }
                if deadline.has_passed() {
                    return false;
                }
                continue;
            }
            if self.pidfd.is_none() {
                wait = wait.capped(PID_POLL);
            }
            let (sock_ready, child_ready) = sys::poll_two(
                self.sock.as_ref().map(|s| s.as_fd()),
                self.pidfd.as_ref().map(|s| s.as_fd()),
                wait.remaining(),
            )
            .unwrap_or((false, true));
            if sock_ready {
                self.read_available();
            }
            if (child_ready || self.pidfd.is_none()) && self.reap(false) {
                return true;
            }
            if deadline.has_passed() {
                return false;
            }
        }
    }

    /// One wait of [`pump`](Child::pump) for a fork-server child: the status comes from
    /// the server's status socket, not from `waitid`. Returns whether the child is done.
    ///
    /// Once the child's pidfd says it ended, the server's report is due within moments; if
    /// none comes within [`STATUS_GRACE`] (the server died and a forked sibling still holds
    /// a copy of the status socket, so no end of file arrives either), or the status
    /// socket reaches end of file, the status is reported as lost.
    fn pump_server(&mut self, wait: Deadline) -> bool {
        if self.server_grace.is_some_and(|g| g.has_passed()) {
            self.finish(ChildStatus::Exited(-1));
            return true;
        }
        let watch_pidfd = self.server_grace.is_none();
        let mut fds = Vec::with_capacity(3);
        let mut slots = [usize::MAX; 3];
        for (i, fd) in [
            self.sock.as_ref(),
            self.status_sock.as_ref(),
            self.pidfd.as_ref().filter(|_| watch_pidfd),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(fd) = fd {
                slots[i] = fds.len();
                fds.push(fd.as_fd());
            }
        }
        let mut wait = wait;
        if let Some(grace) = self.server_grace {
            wait = wait.capped(grace.remaining().unwrap_or_default());
        }
        let ready =
            sys::poll_many(&fds, wait.remaining()).unwrap_or_else(|_| vec![false; fds.len()]);
        drop(fds);
        let is_ready = |slot: usize| ready.get(slot).copied().unwrap_or(false);
        if is_ready(slots[0]) {
            self.read_available();
        }
        if is_ready(slots[1]) {
            if let Some(status_sock) = &self.status_sock {
                loop {
                    match sys::recv_nonblocking(status_sock.as_fd(), &mut self.status_buf) {
                        Ok(Some(0)) | Err(_) => {
                            self.status_sock = None; // the server is gone
                            break;
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                    }
                }
            }
            if let [kind, a, b, c, d, ..] = self.status_buf[..] {
                let code = i32::from_le_bytes([a, b, c, d]);
                self.finish(if kind == 0 {
                    ChildStatus::Exited(code)
                } else {
                    ChildStatus::Signaled(code)
                });
                return true;
            }
        }
        if is_ready(slots[2]) {
            if self.dropping {
                self.finish(ChildStatus::Exited(-1));
                return true;
            }
            self.server_grace = Some(Deadline::after(STATUS_GRACE));
        }
        let ended = self.server_grace.is_some() || self.pidfd.is_none();
        if self.status_sock.is_none() && ended {
            self.finish(ChildStatus::Exited(-1));
            return true;
        }
        false
    }

    /// Records the final status of a child that has been reaped (by us or the server),
    /// unregisters it and collects everything it sent.
    fn finish(&mut self, status: ChildStatus) {
        lock_and_unregister(self.pid);
        self.status = Some(status);
        self.read_available();
        self.sock = None;
        self.pidfd = None;
        self.status_sock = None;
    }

    fn read_available(&mut self) {
        let Some(sock) = &self.sock else { return };
        loop {
            match sys::recv_nonblocking(sock.as_fd(), &mut self.buf) {
                Ok(Some(0)) | Err(_) => {
                    self.sock = None;
                    return;
                }
                Ok(Some(_)) => continue,
                Ok(None) => return,
            }
        }
    }

    /// Reaps the child if it has exited (waiting for it with `block`); then collects all
    /// it sent. The socket is only drained *after* the exit, without blocking: a
    /// grandchild holding a copy of the child's end cannot keep us waiting.
    fn reap(&mut self, block: bool) -> bool {
        if self.status.is_some() {
            return true; // never wait twice: the pid may belong to someone else by now
        }
        // Reap and unregister under the registry lock, so `active_children` never asks
        // about a pid that is no longer ours.
        let mut children = registry::lock();
        let status = match sys::wait_child(self.target(), block, true) {
            Ok(None) => return false,
            Ok(Some(s)) => s,
            Err(_) => ChildStatus::Exited(-1), // reaped by someone else: status lost
        };
        children.retain(|c| c.info.pid() != self.pid);
        drop(children);
        self.status = Some(status);
        self.read_available();
        self.sock = None;
        self.pidfd = None;
        true
    }

    fn take_outcome(&mut self) -> Result<R, ProcessError>
    where
        R: DeserializeOwned,
    {
        assert!(
            !self.delivered,
            "this child's result was already returned by an earlier join_timeout/try_join; \
             keep that result instead of joining again"
        );
        self.delivered = true;
        if let Some(e) = self.forced.take() {
            return Err(e);
        }
        let status = self
            .status
            .expect("outcome is only taken after the child was reaped");
        let received = wire::parse(&self.buf);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if let Some(why) = received.malformed {
            return Err(ProcessError::Decode(format!(
                "the result channel held malformed data ({why}); something other than \
                 procshare wrote to the child's result socket"
            )));
        }
        match received.last {
            Some((wire::VALUE, bytes)) => postcard::from_bytes::<R>(bytes).map_err(|e| {
                ProcessError::Decode(format!(
                    "could not decode the child's {}-byte value as {} ({e}); make sure the \
                     type's Serialize and Deserialize agree (postcard is not \
                     self-describing: no skip_serializing_if, no untagged enums)",
                    bytes.len(),
                    std::any::type_name::<R>()
                ))
            }),
            Some((wire::PANIC, bytes)) => {
                let (message, location) = postcard::from_bytes::<(String, Option<String>)>(bytes)
                    .unwrap_or_else(|_| ("<panic message could not be decoded>".to_owned(), None));
                Err(ProcessError::Panicked { message, location })
            }
            Some((wire::BOOTSTRAP, bytes)) => Err(ProcessError::Bootstrap(text(bytes))),
            Some((_, bytes)) => Err(ProcessError::Decode(text(bytes))),
            None => Err(match status {
                ChildStatus::Signaled(sig) => ProcessError::Signaled(sig),
                ChildStatus::Exited(code)
                    if self.method == StartMethod::Spawn && !received.started =>
                {
                    ProcessError::Bootstrap(if self.method == StartMethod::Spawn {
                        format!(
                            "the spawned child (pid {}) exited with code {code} before \
                             procshare::init() took over; call procshare::init() as the first \
                             line of main, before anything that can exit or fail",
                            self.pid
                        )
                    } else {
                        format!(
                            "the fork server's child (pid {}) exited with code {code} before \
                             it started its function (its stderr may say why)",
                            self.pid
                        )
                    })
                }
                ChildStatus::Exited(code) => ProcessError::Exited(code),
            }),
        }
    }

    /// Waits for the child to end and returns its function's value, or why there is none.
    ///
    /// # Panics
    ///
    /// If an earlier [`join_timeout`](Child::join_timeout) or
    /// [`try_join`](Child::try_join) already returned the outcome.
    pub fn join(mut self) -> Result<R, ProcessError>
    where
        R: DeserializeOwned,
    {
        self.pump(Deadline::NEVER);
        self.take_outcome()
    }

    /// Like [`join`](Child::join), but gives up after `timeout` with
    /// [`ProcessError::Timeout`], leaving the child running and the handle usable.
    ///
    /// # Panics
    ///
    /// If called again after it (or [`try_join`](Child::try_join)) returned the outcome.
    pub fn join_timeout(&mut self, timeout: Duration) -> Result<R, ProcessError>
    where
        R: DeserializeOwned,
    {
        if self.pump(Deadline::after(timeout)) {
            self.take_outcome()
        } else {
            Err(ProcessError::Timeout)
        }
    }

    /// The outcome if the child has ended, `None` (at once) while it runs.
    ///
    /// # Panics
    ///
    /// If called again after it (or [`join_timeout`](Child::join_timeout)) returned the
    /// outcome.
    pub fn try_join(&mut self) -> Option<Result<R, ProcessError>>
    where
        R: DeserializeOwned,
    {
        if self.pump(Deadline::after(Duration::ZERO)) {
            Some(self.take_outcome())
        } else {
            None
        }
    }
}

fn lock_and_unregister(pid: u32) {
    registry::lock().retain(|c| c.info.pid() != pid);
}

impl<R> Drop for Child<R> {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        if self.daemon || std::thread::panicking() {
            let _ = self.kill();
        }
        self.dropping = true;
        self.pump(Deadline::NEVER);
    }
}

impl<R> fmt::Debug for Child<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.status {
            None => "running or unreaped".to_owned(),
            Some(ChildStatus::Exited(c)) => format!("exited with {c}"),
            Some(ChildStatus::Signaled(s)) => format!("killed by {}", signal_name(s)),
        };
        f.debug_struct("Child")
            .field("pid", &self.pid)
            .field("name", &self.name)
            .field("daemon", &self.daemon)
            .field("start_method", &self.method)
            .field("state", &state)
            .finish()
    }
}
