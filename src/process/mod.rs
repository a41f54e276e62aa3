//! Processes: Python's `multiprocessing.Process`, with results, panics and exit statuses
//! coming back to the parent.
//!
//! ```
//! use procshare::{Process, ProcessError};
//!
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! # procshare::init();
//! let child = Process::spawn(square, 12)?;
//! assert_eq!(child.join(), Ok(144));
//!
//! let child = Process::spawn(|()| -> u32 { panic!("no luck") }, ())?;
//! assert!(matches!(child.join(), Err(ProcessError::Panicked { .. })));
//! # Ok::<(), procshare::Error>(())
//! ```
//!
//! [`Process::spawn(f, arg)`](Process::spawn) runs `f(arg)` in a new process under any start
//! method; `f` must be a `fn` item or a closure that captures nothing (checked at compile
//! time), `arg` and the return value travel with postcard. [`Process::fork`] runs a closure
//! that may capture anything, in a forked child. [`Process::builder`] sets a name, the start
//! method, daemon mode, a process group of the child's own and the bootstrap timeout. Each
//! returns a [`Child<R>`] whose [`join`](Child::join) gives the value or a
//! [`ProcessError`] saying why there is none.
//!
//! # Start methods
//!
//! | | [`Fork`](StartMethod::Fork) | [`Spawn`](StartMethod::Spawn) | [`ForkServer`](StartMethod::ForkServer) |
//! |---|---|---|---|
//! | How | `fork()` of the caller | exec of `/proc/self/exe`; `init()` in the child's `main` finds the function | a server (exec'd once, on first use, stopped in `init()`) forks the child |
//! | Start + join cost (BENCHMARKS.md) | lowest | highest: an exec and the program's start-up up to `init()` | between: one request round trip and a fork of a small process |
//! | Caller with other threads | refused ([`Error::MultiThreaded`]); `unsafe` unchecked variants exist | safe | safe |
//! | What the child sees | a copy of the parent: every mapping (`Value`, `Queue`, channels, `Segment`s) works as is | a fresh process: only `arg` | a fresh process (the server's state at `init()`): only `arg` |
//! | Functions | any closure ([`Process::fork`]) or a capture-free `Fn(A) -> R` | a capture-free `Fn(A) -> R` (a `fn` item or closure) | as Spawn |
//! | Needs `procshare::init()` | no | yes, first line of `main`; code before it runs again in every child | yes, first line of `main`; code before it runs once more, in the server |
//! | Extra process | none | none | the server, alive while this process is (it exits when this process does) |
//! | Handles in `arg` | all work (memory is inherited) | `Value`, `Array`, `Shared<T>` and `Shared<[T]>`, `Segment`, `Connection`, `Queue`/`QueueSender`/`QueueReceiver`, `ByteQueue`, `channel` and `spsc` ends: descriptors carried beside the bytes, queue ends counted as the child's from the moment `spawn` encodes them (an spsc end moves to the child) | as Spawn |
//!
//! **The default** (no `start_method` on the builder) never deadlocks: `Fork` while the
//! process is single-threaded; otherwise `ForkServer` if this process already runs a fork
//! server; otherwise `Spawn` if `init()` has run; otherwise the error
//! [`Error::MultiThreaded`], which names the ways out (fork before starting threads, or
//! call `init()` first in `main`).
//!
//! A handle serialized anywhere but in a `Process::spawn` argument (into a file, over a
//! `Queue`) fails to encode: descriptor numbers never travel without their descriptors.
//!
//! A queue end handed to a spawned child counts as a holder from the moment `spawn`
//! encodes it, so the parent may drop its own handle as soon as `spawn` returns: a
//! receiver whose only sender went to the child sees `Disconnected` only once that child
//! has dropped it or died, including a child killed before it ever ran (see
//! `process/handles.rs` for the protocol and its crash table). An `spsc` end moves to
//! the child: the parent's handle panics if used again.
//!
//! ```
//! use procshare::{Process, StartMethod};
//!
//! fn produce(tx: procshare::channel::Sender<u64>) {
//!     for i in 0..100 {
//!         tx.send(i).unwrap();
//!     }
//! }
//!
//! # procshare::init();
//! let (tx, rx) = procshare::channel::<u64>(16)?;
//! let child = Process::builder()
//!     .start_method(StartMethod::ForkServer)
//!     .spawn(produce, tx)?; // `tx` is the child's now
//! assert_eq!(rx.iter().sum::<u64>(), 4950); // ends when the child's sender is gone
//! child.join().unwrap();
//! # Ok::<(), procshare::Error>(())
//! ```
//!
//! # Guarantees
//!
//! * The value comes back over a socketpair; the parent waits for the child *process* to
//!   end (through its pidfd), reading as data arrives, so a large value cannot deadlock
//!   and a child that dies mid-write yields `Signaled`/`Exited`, never a hang. A
//!   grandchild holding the child's end of the socket cannot delay `join` either.
//! * A fork-server child is waited for through the server's status report and signalled
//!   through a pidfd the server opened before it could reap the child, so neither can hit
//!   a recycled pid; see `forkserver.rs` for what happens when the server dies.
//! * A spawned child must reach `init()` within the bootstrap timeout (10 s by default,
//!   [`Builder::bootstrap_timeout`]) or it is killed and reported as
//!   [`ProcessError::Bootstrap`]; one that exits first is reported as soon as it exits.
//! * Spawn and ForkServer check the child runs the same executable (device, inode, size, mtime) before
//!   forming any pointer, and the same function type (a hash of the type names) before
//!   calling it: a mismatch is `Bootstrap`, never undefined behaviour.
//! * Children leave with `_exit`, never unwinding into the parent's code; their panics
//!   are caught, printed, and sent back as [`ProcessError::Panicked`] with the location.
//! * Daemon children get `SIGKILL` when their parent dies (`PR_SET_PDEATHSIG`, re-checked
//!   with `getppid()` after it is set, so a parent that died in between is not missed).
//!   A child that is pid 1 of a new pid namespace (its parent called
//!   `unshare(CLONE_NEWPID)`) cannot see its parent (`getppid()` is 0 there), so it relies
//!   on the death signal alone: a parent that dies in the microseconds before the signal
//!   is armed leaves that one child running, as a non-daemon.
//!   The signal follows the *thread* that started the child: start daemons from a thread
//!   that lives as long as the process (e.g. the main thread).
//! * Dropping a [`Child`] never leaves a zombie; see its docs for wait-versus-kill.
//! * If the *parent* exits (e.g. `std::process::exit`) without dropping handles,
//!   non-daemon children carry on and are reaped by init; daemon children are killed.
//!
//! # In `#[test]`s
//!
//! libtest runs tests on threads, so `Fork` is refused there and `Spawn` needs `init()`,
//! which libtest's `main` does not call. Use a test target with `harness = false` and
//! your own `main` that calls `procshare::init()` first (as this crate's own
//! `tests/process.rs` does), or fork from a single-threaded helper process.

mod child;
mod error;
mod forkserver;
mod handles;
mod registry;
mod spawn;
mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use child::Child;
pub use error::ProcessError;
pub use registry::{ProcessInfo, active_children, current_process, parent_process};
// For the pool, which runs many functions per worker process.
pub(crate) use error::signal_name;
pub(crate) use spawn::type_hash;
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub use spawn::{Tamper, disable_pidfds, tamper_next_spawn};
pub(crate) use wire::catch_panic;

use crate::error::{Error, Result};
use crate::sys;
use child::ChildParts;

/// How a child process is started. See the [module docs](self) for the trade-offs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StartMethod {
    /// `fork()`: fastest, inherits everything; refused in a multi-threaded process.
    Fork,
    /// Re-execute the current binary, which must call [`init`](crate::init) first in
    /// `main`.
    Spawn,
    /// Ask a fork server (a single-threaded copy of this program stopped in `init()`,
    /// started on first use) to fork the child. Needs [`init`](crate::init) first in
    /// `main`.
    ForkServer,
}

static INIT_RAN: AtomicBool = AtomicBool::new(false);

const DEFAULT_BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(10);

/// See [`crate::init`].
pub(crate) fn init() {
    INIT_RAN.store(true, Ordering::SeqCst);
    if let Some(value) = std::env::var_os(spawn::ENV) {
        spawn::child_entry(value)
    }
    if let Some(value) = std::env::var_os(forkserver::ENV) {
        forkserver::serve(value)
    }
}

/// The start method a builder without [`Builder::start_method`] uses right now: `Fork`
/// while this process is single-threaded; else `ForkServer` if this process already runs
/// a fork server; else `Spawn` if `init()` has run.
///
/// # Errors
///
/// [`Error::MultiThreaded`] when neither is safe; [`Error::Io`] if the thread count
/// cannot be read.
pub fn default_start_method() -> Result<StartMethod> {
    // A pool's waker thread (alive while `.await`s wait) is stopped for the fork.
    crate::pool::pause_waiters();
    let threads = thread_count()?;
    if threads <= 1 {
        Ok(StartMethod::Fork)
    } else if INIT_RAN.load(Ordering::SeqCst) && forkserver::is_running() {
        Ok(StartMethod::ForkServer)
    } else if INIT_RAN.load(Ordering::SeqCst) {
        Ok(StartMethod::Spawn)
    } else {
        Err(Error::MultiThreaded { threads })
    }
}

fn thread_count() -> Result<u64> {
    sys::thread_count().map_err(|e| {
        Error::io(
            "counting this process's threads before a fork (read from /proc/self/stat; \
             without /proc, use StartMethod::Spawn, or Process::fork_unchecked if the process \
             is known to be single-threaded)",
            e,
        )
    })
}

fn refuse_if_threaded() -> Result<()> {
    // A pool's waker thread (alive while `.await`s wait) is stopped for the fork.
    crate::pool::pause_waiters();
    let threads = thread_count()?;
    if threads > 1 {
        return Err(Error::MultiThreaded { threads });
    }
    Ok(())
}

fn require_init(method: StartMethod) -> Result<()> {
    if INIT_RAN.load(Ordering::SeqCst) {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        what: format!(
            "StartMethod::{method:?} needs procshare::init() to have run: call it as the \
             first line of main (the re-executed process starts main from the top and init() \
             is where it takes over), or use StartMethod::Fork"
        ),
    })
}

/// Starting child processes. Not constructed: use [`Process::spawn`], [`Process::fork`]
/// or [`Process::builder`].
#[derive(Debug)]
pub struct Process {
    _no_instances: (),
}

/// Compile-time check that a function type carries no data, so a spawned child can make
/// its own copy from nothing.
struct ZeroSized<F>(std::marker::PhantomData<F>);

impl<F> ZeroSized<F> {
    const CHECK: () = assert!(
        std::mem::size_of::<F>() == 0,
        "Process::spawn needs a fn item or a closure that captures nothing (a fn pointer or \
         a capturing closure cannot be found again in a re-executed child); pass data through \
         the argument, or use Process::fork to capture"
    );
}

impl Process {
    /// A builder for a child with a name, a start method, daemon mode, its own process
    /// group or a bootstrap timeout.
    pub fn builder() -> Builder {
        Builder {
            name: None,
            method: None,
            daemon: false,
            process_group: false,
            bootstrap_timeout: DEFAULT_BOOTSTRAP_TIMEOUT,
        }
    }

    /// Runs `f(arg)` in a new process started by the [default](default_start_method)
    /// method and returns its handle; [`Child::join`] gives `f`'s return value.
    ///
    /// `f` must be a `fn` item or a closure that captures nothing; anything else is a
    /// compile-time error:
    ///
    /// ```compile_fail,E0080
    /// let n = 5u32;
    /// let child = procshare::Process::spawn(move |x: u32| x + n, 1)?; // captures `n`
    /// # Ok::<(), procshare::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::MultiThreaded`] if no start method is safe here (see
    /// [`default_start_method`]); [`Error::Io`] if the process cannot be created;
    /// [`Error::InvalidArgument`] if `arg` cannot be encoded (Spawn).
    pub fn spawn<F, A, R>(f: F, arg: A) -> Result<Child<R>>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        Process::builder().spawn(f, arg)
    }

    /// Runs `f` in a forked child. `f` may capture anything; the child gets a copy of
    /// the parent's memory, so shared handles (`Value`, `Queue`, channels) just work.
    ///
    /// # Errors
    ///
    /// [`Error::MultiThreaded`] if this process has other threads (the child could
    /// deadlock on a lock one of them held); use [`Process::spawn`] with `Spawn`, or
    /// [`Process::fork_unchecked`] if you can uphold its contract. [`Error::Io`] if fork
    /// fails.
    pub fn fork<F, R>(f: F) -> Result<Child<R>>
    where
        F: FnOnce() -> R,
        R: Serialize + DeserializeOwned,
    {
        Process::builder().fork(f)
    }

    /// [`Process::fork`] without the single-thread check.
    ///
    /// # Safety
    ///
    /// If other threads exist, none of them may hold, at the moment of the fork, a lock
    /// the child will take: the allocator's, stdio's, the panic hook's, or any of yours.
    /// The child allocates (it encodes the value), so in practice the other threads must
    /// be parked in a wait that holds no such lock.
    pub unsafe fn fork_unchecked<F, R>(f: F) -> Result<Child<R>>
    where
        F: FnOnce() -> R,
        R: Serialize + DeserializeOwned,
    {
        // SAFETY: forwarded to the caller.
        unsafe { Process::builder().fork_unchecked(f) }
    }
}

/// Configures a child before starting it; from [`Process::builder`].
#[derive(Clone, Debug)]
#[must_use = "a Builder does nothing until spawn() or fork()"]
pub struct Builder {
    name: Option<String>,
    method: Option<StartMethod>,
    daemon: bool,
    process_group: bool,
    bootstrap_timeout: Duration,
}

impl Builder {
    /// The child's name (default `Process-N`), seen by [`Child::name`] and by the child's
    /// [`current_process`].
    pub fn name(mut self, name: impl Into<String>) -> Builder {
        self.name = Some(name.into());
        self
    }

    /// The start method, instead of the [default](default_start_method).
    pub fn start_method(mut self, method: StartMethod) -> Builder {
        self.method = Some(method);
        self
    }

    /// A daemon child is killed when its parent dies, and when its handle is dropped.
    pub fn daemon(mut self, daemon: bool) -> Builder {
        self.daemon = daemon;
        self
    }

    /// With `true`, the child leads a new process group (its pgid is its pid), as std's
    /// `CommandExt::process_group(0)` does for a command: everything the child starts stays
    /// in that group unless it moves, so the whole tree can be signalled at once with
    /// `killpg(child.pid(), sig)` (a watchdog that must leave no grandchild behind), and a
    /// terminal's Ctrl-C, which goes to the foreground group, no longer reaches it.
    ///
    /// The group exists before the child's function starts, under every start method
    /// (Fork and ForkServer: `setpgid` on both sides of the fork; Spawn: before the exec).
    /// The default, `false`, leaves the child in its parent's group.
    pub fn process_group(mut self, process_group: bool) -> Builder {
        self.process_group = process_group;
        self
    }

    /// How long a spawned child may take to reach `procshare::init()` (default 10 s).
    pub fn bootstrap_timeout(mut self, timeout: Duration) -> Builder {
        self.bootstrap_timeout = timeout;
        self
    }

    fn take_name(&mut self) -> String {
        self.name.take().unwrap_or_else(registry::next_default_name)
    }

    /// Runs `f(arg)` in a new process; see [`Process::spawn`].
    ///
    /// # Errors
    ///
    /// As [`Process::spawn`]; also [`Error::MultiThreaded`] for an explicit `Fork` in a
    /// multi-threaded process, and [`Error::InvalidArgument`] for `Spawn` or `ForkServer`
    /// before `init()` ran.
    pub fn spawn<F, A, R>(mut self, f: F, arg: A) -> Result<Child<R>>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        #[allow(clippy::let_unit_value)]
        let () = ZeroSized::<F>::CHECK;
        let method = match self.method {
            Some(m) => m,
            None => default_start_method()?,
        };
        let name = self.take_name();
        match method {
            StartMethod::Fork => {
                refuse_if_threaded()?;
                // SAFETY: the process is single-threaded (checked just above).
                unsafe { fork_child(name, self.flags(), move || f(arg)) }
            }
            StartMethod::Spawn => {
                require_init(method)?;
                spawn::spawn::<F, A, R>(&arg, name, self.flags(), self.bootstrap_timeout)
            }
            StartMethod::ForkServer => {
                require_init(method)?;
                forkserver::spawn::<F, A, R>(&arg, name, self.flags(), self.bootstrap_timeout)
            }
        }
    }

    /// Runs `f` in a forked child; see [`Process::fork`].
    ///
    /// # Errors
    ///
    /// As [`Process::fork`]; [`Error::InvalidArgument`] if the builder asked for a start
    /// method other than `Fork` (only fork can carry a capturing closure).
    pub fn fork<F, R>(mut self, f: F) -> Result<Child<R>>
    where
        F: FnOnce() -> R,
        R: Serialize + DeserializeOwned,
    {
        self.check_fork()?;
        refuse_if_threaded()?;
        let name = self.take_name();
        // SAFETY: the process is single-threaded (checked just above).
        unsafe { fork_child(name, self.flags(), f) }
    }

    /// [`Builder::fork`] without the single-thread check.
    ///
    /// # Safety
    ///
    /// As [`Process::fork_unchecked`].
    ///
    /// # Errors
    ///
    /// As [`Builder::fork`], except that threads are not counted.
    pub unsafe fn fork_unchecked<F, R>(mut self, f: F) -> Result<Child<R>>
    where
        F: FnOnce() -> R,
        R: Serialize + DeserializeOwned,
    {
        self.check_fork()?;
        let name = self.take_name();
        // SAFETY: forwarded to the caller.
        unsafe { fork_child(name, self.flags(), f) }
    }

    fn flags(&self) -> ChildFlags {
        ChildFlags {
            daemon: self.daemon,
            process_group: self.process_group,
        }
    }

    fn check_fork(&self) -> Result<()> {
        match self.method {
            None | Some(StartMethod::Fork) => Ok(()),
            Some(other) => Err(Error::InvalidArgument {
                what: format!(
                    "fork() runs a closure that may capture, which only StartMethod::Fork can \
                     carry, but the builder asked for {other:?}; use spawn() with a fn item \
                     or a capture-free closure instead"
                ),
            }),
        }
    }
}

/// For a daemon child that has just armed its death signal: whether its parent, `parent`,
/// already died (it was reparented). A parent outside the child's pid namespace shows as
/// 0 and cannot be checked: `false` (the death signal still holds from now on).
pub(crate) fn parent_is_gone(parent: u32) -> bool {
    let ppid = sys::getppid();
    ppid != 0 && ppid != parent
}

/// What the builder asks of the child's process, whatever the start method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ChildFlags {
    /// Killed when the parent dies (and when its handle is dropped).
    pub(crate) daemon: bool,
    /// Leads a new process group.
    pub(crate) process_group: bool,
}

/// Forks a child that runs `body` and reports its value over a socketpair.
///
/// # Safety
///
/// As [`Process::fork_unchecked`]: no other thread may hold a lock the child needs.
unsafe fn fork_child<R, B>(name: String, flags: ChildFlags, body: B) -> Result<Child<R>>
where
    B: FnOnce() -> R,
    R: Serialize,
{
    let parent = registry::current_process();
    let (ours, theirs) =
        sys::socketpair_stream().map_err(|e| Error::io("creating the result socket", e))?;
    // Output still buffered now would be written twice: once by us, once by the child's
    // own flush on its way out.
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
    }
    // SAFETY: forwarded to the caller; the child never returns from this function (it
    // ends in `run_child`'s `_exit`).
    match unsafe { sys::fork() }.map_err(|e| Error::io("forking a child process", e))? {
        sys::Forked::Child => {
            drop(ours);
            if flags.process_group && sys::become_group_leader().is_err() {
                sys::exit_immediately(1); // cannot fail for a fresh child; never run ungrouped
            }
            if flags.daemon {
                let ok = sys::set_parent_death_signal(sys::signal::KILL).is_ok();
                // The parent may have died before the signal was armed.
                if !ok || parent_is_gone(parent.pid()) {
                    sys::exit_immediately(1);
                }
            }
            registry::enter_child(name.clone(), parent);
            forkserver::forget_in_child();
            wire::run_child(theirs, body)
        }
        sys::Forked::Parent(pid) => {
            drop(theirs);
            if flags.process_group {
                // Also from this side, so the group exists when fork returns (see
                // `make_group_leader`); a failure here leaves it to the child's own call.
                let _ = sys::make_group_leader(pid);
            }
            // Ties the queue-handle loans the fork handlers made to this child, where the
            // kernel has no `/proc/thread-self/children` to find it by.
            crate::queue::peers::bind_forked_child(pid);
            Ok(Child::new(ChildParts {
                pid,
                name,
                daemon: flags.daemon,
                method: StartMethod::Fork,
                sock: ours,
                bootstrap_timeout: None,
                server: None,
            }))
        }
    }
}
