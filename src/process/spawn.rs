//! `StartMethod::Spawn`: re-executing the current binary and finding the function again.
//!
//! # Protocol
//!
//! 1. The parent writes a [`Bootstrap`] message into a sealed memfd (so a large argument
//!    can never block the parent), makes a socketpair for the result, and execs
//!    `/proc/self/exe` with both descriptors inherited and their numbers in
//!    `PROCSHARE_SPAWN=v1:<memfd>:<socket>`.
//! 2. The child's `main` calls [`init`](crate::init) first. `init` sees the variable,
//!    removes it (so the child's own children do not mistake themselves for bootstrap
//!    children), checks that both descriptors are open and of the right kind, and reads the
//!    message.
//! 3. **Same binary, checked before any pointer is formed**: the message carries the
//!    parent's device, inode, size and mtime of `/proc/self/exe`; the child compares its
//!    own. A mismatch is reported as [`ProcessError::Bootstrap`](super::ProcessError) and
//!    the child exits: nothing has been computed from the offset yet.
//! 4. Only then is the entry point formed as `anchor + offset`. The same file means the
//!    same code at the same distance from the anchor, whatever the load address (ASLR).
//! 5. **Same function type**: the entry point is a monomorphized trampoline for
//!    `(F, A, R)`; it first compares a hash of `type_name::<(F, A, R)>()` with the one in
//!    the message (a second line of defence, and what the tamper test exercises), then
//!    decodes the argument, sends STARTED, and runs the function under
//!    [`run_child`](super::wire::run_child).
//! 6. The parent requires STARTED within the bootstrap timeout (default 10 s): a child
//!    whose `main` never calls `init` is killed and reported, never waited on forever; one
//!    that exits first is reported at once.
//!
//! Code before `init()` in `main` runs again in the child, which is why `init` must be
//! the first line. A process that was started for a bootstrap but whose `main` did not
//! call `init` never spawns: `Spawn` requires `init` to have run, so a forgotten `init`
//! cannot turn into a fork bomb.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::child::{Child, ChildParts};
use super::registry::{self, ProcessInfo};
use super::{ChildFlags, StartMethod, handles, wire};
use crate::error::{Error, Result};
use crate::queue::peers;
use crate::sys;

pub(crate) const ENV: &str = "PROCSHARE_SPAWN";
const MAGIC: u64 = 0x7072_6f63_7368_7231; // "procshr1"
pub(crate) const MAX_MESSAGE: u64 = 1 << 32;

#[derive(Serialize, Deserialize)]
struct Bootstrap {
    magic: u64,
    executable: [u64; 5],
    type_hash: u64,
    entry_offset: u64,
    name: String,
    parent_pid: u32,
    parent_name: String,
    daemon: bool,
    process_group: bool,
    arg: Vec<u8>,
}

/// What the trampoline needs; passed by value through a Rust-ABI function pointer, which
/// is sound because both ends are the same compiled binary (checked in step 3).
pub(crate) struct SpawnContext {
    sock: OwnedFd,
    type_hash: u64,
    arg: Vec<u8>,
    handles: Vec<OwnedFd>,
}

type Entry = fn(SpawnContext);

/// The fixed point entry offsets are measured from. Never inlined, so it has one address.
#[inline(never)]
fn anchor(_: SpawnContext) {
    unreachable!("the spawn anchor is never called")
}

/// FNV-1a of the type names: stable across processes running the same binary.
pub(crate) fn type_hash<F, A, R>() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        std::any::type_name::<F>(),
        "|",
        std::any::type_name::<A>(),
        "|",
        std::any::type_name::<R>(),
    ] {
        for b in part.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn executable() -> Result<[u64; 5]> {
    static CACHE: OnceLock<[u64; 5]> = OnceLock::new();
    if let Some(id) = CACHE.get() {
        return Ok(*id);
    }
    let id = sys::executable_identity()
        .map_err(|e| Error::io("identifying the running executable (/proc/self/exe)", e))?;
    Ok(*CACHE.get_or_init(|| id))
}

/// The trampoline for one `(F, A, R)`: runs in the spawned child.
fn entry<F, A, R>(ctx: SpawnContext)
where
    F: Fn(A) -> R + Copy + 'static,
    A: DeserializeOwned,
    R: Serialize,
{
    if ctx.type_hash != type_hash::<F, A, R>() {
        wire::bootstrap_failed(
            &ctx.sock,
            &format!(
                "the child found a different function type at the entry point than the parent \
                 sent (expected {} -> {}); parent and child disagree about the binary, rebuild \
                 and restart the program",
                std::any::type_name::<A>(),
                std::any::type_name::<R>()
            ),
        );
    }
    let decoded = handles::providing(ctx.handles, || postcard::from_bytes::<A>(&ctx.arg));
    let arg: A = match decoded {
        Ok(a) => a,
        Err(e) => wire::bootstrap_failed(
            &ctx.sock,
            &format!(
                "the child could not decode its argument as {} ({}); make sure the type's \
                 Serialize and Deserialize agree (postcard is not self-describing)",
                std::any::type_name::<A>(),
                handles::take_last_error().unwrap_or_else(|| e.to_string())
            ),
        ),
    };
    wire::send_frame(&ctx.sock, wire::STARTED, &[]);
    // SAFETY: `F` is zero-sized (checked at compile time by `Process::spawn`) and `Copy`,
    // and the parent holds a value of it; a zero-sized value has no bytes, so this is a
    // copy of the parent's value, which `Copy` permits. Closures and fn items (the only
    // types that implement `Fn` on stable Rust) are inhabited and have no invalid values.
    let f: F = unsafe { std::mem::zeroed() };
    wire::run_child(ctx.sock, move || f(arg))
}

#[cfg(feature = "test-hooks")]
pub(crate) mod hooks {
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

    pub(crate) static TAMPER: AtomicU8 = AtomicU8::new(0);
    pub(crate) static NO_PIDFD: AtomicBool = AtomicBool::new(false);

    pub(crate) fn pidfds_disabled() -> bool {
        NO_PIDFD.load(Ordering::Relaxed)
    }

    pub(crate) fn take() -> u8 {
        TAMPER.swap(0, Ordering::Relaxed)
    }
}

/// Tampering with the next Spawn's handshake, for tests only (cargo feature `test-hooks`).
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum Tamper {
    /// Pretend the child runs a different executable (inode changed).
    Executable = 1,
    /// Pretend the function type differs (type hash changed).
    FunctionType = 2,
}

/// Makes new child handles in this process act as if the kernel refused pidfds.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn disable_pidfds(disabled: bool) {
    hooks::NO_PIDFD.store(disabled, std::sync::atomic::Ordering::Relaxed);
}

/// Makes the next `Spawn` in this process send a tampered handshake.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn tamper_next_spawn(t: Tamper) {
    hooks::TAMPER.store(t as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The bootstrap message for running `F(arg)` in a child that re-finds `F` (Spawn and
/// ForkServer children).
///
/// Returns the message, the descriptors of the handles inside `arg`, which must reach
/// the child beside it, and the peer-table loans its queue handles made, to bind to the
/// child once its pid is known (see `handles`).
pub(crate) fn message<F, A, R>(
    arg: &A,
    name: &str,
    flags: ChildFlags,
) -> Result<(Vec<u8>, Vec<OwnedFd>, handles::Loans)>
where
    F: Fn(A) -> R + Copy + 'static,
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    #[allow(unused_mut)]
    let mut executable = executable()?;
    #[allow(unused_mut)]
    let mut type_hash = type_hash::<F, A, R>();
    #[cfg(feature = "test-hooks")]
    match hooks::take() {
        1 => executable[1] ^= 1,
        2 => type_hash ^= 1,
        _ => {}
    }
    let (arg, fds, loans) = handles::collecting(|| postcard::to_allocvec(arg));
    let arg = arg.map_err(|e| Error::InvalidArgument {
        what: format!(
            "the argument of type {} could not be encoded with postcard for a spawned child \
             ({}); use a type postcard supports",
            std::any::type_name::<A>(),
            handles::take_last_error().unwrap_or_else(|| e.to_string())
        ),
    })?;
    let entry_offset = (entry::<F, A, R> as Entry as usize).wrapping_sub(anchor as Entry as usize);
    let me = registry::current_process();
    let message = Bootstrap {
        magic: MAGIC,
        executable,
        type_hash,
        entry_offset: entry_offset as u64,
        name: name.to_owned(),
        parent_pid: me.pid(),
        parent_name: me.name().to_owned(),
        daemon: flags.daemon,
        process_group: flags.process_group,
        arg,
    };
    let bytes = postcard::to_allocvec(&message).map_err(|e| Error::InvalidArgument {
        what: format!("could not encode the bootstrap message ({e})"),
    })?;
    Ok((bytes, fds, loans))
}

/// What a bootstrap message asks of the child's process (`None`: not a bootstrap
/// message).
pub(crate) fn message_flags(bytes: &[u8]) -> Option<ChildFlags> {
    postcard::from_bytes::<Bootstrap>(bytes)
        .ok()
        .filter(|m| m.magic == MAGIC)
        .map(|m| ChildFlags {
            daemon: m.daemon,
            process_group: m.process_group,
        })
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
    let (bytes, handle_fds, loans) = message::<F, A, R>(arg, &name, flags)?;
    let me = sys::getpid();
    let memfd =
        sys::memfd_with(&bytes).map_err(|e| Error::io("writing the bootstrap message", e))?;
    let (ours, theirs) =
        sys::socketpair_stream().map_err(|e| Error::io("creating the result socket", e))?;
    let handle_list: Vec<String> = handle_fds
        .iter()
        .map(|f| f.as_raw_fd().to_string())
        .collect();
    let value = format!(
        "v1:{}:{}:{}",
        memfd.as_raw_fd(),
        theirs.as_raw_fd(),
        handle_list.join(",")
    );
    let mut keep = vec![memfd.as_raw_fd(), theirs.as_raw_fd()];
    keep.extend(handle_fds.iter().map(|f| f.as_raw_fd()));
    // The fork inside only execs: it must not be lent this process's queue handles.
    let pid = peers::forking_to_exec(|| {
        sys::spawn_self((ENV, &value), &keep, flags.daemon, flags.process_group, me)
    })
    .map_err(|e| Error::io("re-executing /proc/self/exe for a spawned child", e))?;
    // Our child, not reaped: its pid names it until we wait for it.
    loans.bind(pid, None);
    drop(theirs);
    drop(memfd);
    drop(handle_fds);
    Ok(Child::new(ChildParts {
        pid,
        name,
        daemon: flags.daemon,
        method: StartMethod::Spawn,
        sock: ours,
        bootstrap_timeout: Some(bootstrap_timeout),
        server: None,
    }))
}

/// The child side, entered from `init()` when `PROCSHARE_SPAWN` is set. Never returns.
pub(crate) fn child_entry(value: std::ffi::OsString) -> ! {
    // Forget the variable first, so nothing this child starts inherits it. Only safe while
    // no other thread can read the environment; `init` is documented as the first line of
    // `main`, and we check.
    if sys::thread_count().map(|n| n == 1).unwrap_or(false) {
        // SAFETY: the process has one thread (checked just above), so no other thread can
        // be reading or writing the environment concurrently.
        unsafe { std::env::remove_var(ENV) };
    }
    let fds = value
        .to_str()
        .and_then(|v| v.strip_prefix("v1:"))
        .and_then(|v| {
            let mut parts = v.splitn(3, ':');
            let memfd = parts.next()?.parse::<i32>().ok()?;
            let sock = parts.next()?.parse::<i32>().ok()?;
            let handles = parts
                .next()?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<i32>().ok())
                .collect::<Option<Vec<i32>>>()?;
            Some((memfd, sock, handles))
        });
    let Some((memfd, sock, handles)) = fds else {
        eprintln!("procshare: {ENV} is set to something procshare did not write; exiting");
        sys::exit_immediately(wire::BOOTSTRAP_EXIT)
    };
    let sock = match sys::adopt_inherited_fd(sock, true) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "procshare: the result socket named by {ENV} is not usable ({e}); was this \
                 program started by procshare's Spawn?"
            );
            sys::exit_immediately(wire::BOOTSTRAP_EXIT)
        }
    };
    let file = match sys::adopt_inherited_fd(memfd, false) {
        Ok(f) => std::fs::File::from(f),
        Err(e) => wire::bootstrap_failed(
            &sock,
            &format!("the bootstrap message descriptor is not usable in the child ({e})"),
        ),
    };
    let bytes = match sys::read_whole(&file, MAX_MESSAGE) {
        Ok(b) => b,
        Err(e) => wire::bootstrap_failed(
            &sock,
            &format!("the child could not read its bootstrap message ({e})"),
        ),
    };
    drop(file);
    let handles = match handles
        .into_iter()
        .map(sys::adopt_inherited_any)
        .collect::<std::io::Result<Vec<OwnedFd>>>()
    {
        Ok(h) => h,
        Err(e) => wire::bootstrap_failed(
            &sock,
            &format!("a descriptor of a handle in the argument did not reach the child ({e})"),
        ),
    };
    run_message(sock, &bytes, None, handles)
}

/// Checks a bootstrap message and runs the function it names; never returns. A daemon
/// child exits at once unless its parent is `parent` (default: the message's sender).
/// `handles` are the descriptors of the handles inside the argument, in order.
pub(crate) fn run_message(
    sock: OwnedFd,
    bytes: &[u8],
    parent: Option<u32>,
    handles: Vec<OwnedFd>,
) -> ! {
    let msg = match postcard::from_bytes::<Bootstrap>(bytes) {
        Ok(m) if m.magic == MAGIC => m,
        _ => wire::bootstrap_failed(
            &sock,
            "the bootstrap message is not from this version of procshare; parent and child \
             must be the same build",
        ),
    };
    // Step 3: the same file, before anything is derived from the offset.
    match sys::executable_identity() {
        Ok(ours) if ours == msg.executable => {}
        Ok(ours) => wire::bootstrap_failed(
            &sock,
            &format!(
                "the child runs a different executable than its parent (device/inode/size/mtime \
                 {ours:?} here, {:?} in the parent): the binary was replaced or the spawn went \
                 through another program; restart the parent from the current build",
                msg.executable
            ),
        ),
        Err(e) => wire::bootstrap_failed(
            &sock,
            &format!("the child could not identify its executable ({e})"),
        ),
    }
    if msg.daemon && super::parent_is_gone(parent.unwrap_or(msg.parent_pid)) {
        sys::exit_immediately(1); // the parent died before we got here: follow it
    }
    registry::enter_child(msg.name, ProcessInfo::new(msg.parent_pid, msg.parent_name));
    let ctx = SpawnContext {
        sock,
        type_hash: msg.type_hash,
        arg: msg.arg,
        handles,
    };
    let address = (anchor as Entry as usize).wrapping_add(msg.entry_offset as usize);
    // SAFETY: the executable is the parent's own file (checked above), so the code at
    // `anchor + offset` here is the code at `anchor + offset` there: the parent's
    // `entry::<F, A, R>`, a function of type `Entry`. A function pointer and a usize
    // have the same size on every Linux target.
    let entry: Entry = unsafe { std::mem::transmute::<usize, Entry>(address) };
    entry(ctx);
    // `entry` always ends the process; this is only reached if it somehow returns.
    sys::exit_immediately(wire::BOOTSTRAP_EXIT)
}
