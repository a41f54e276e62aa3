//! The only module that talks to the operating system.
//!
//! Everything above this layer is portable Rust over atomics; everything that needs a
//! syscall (futex wait/wake, memfd/shm_open, mmap, fork/wait, thread identity) comes from
//! here, and callers name it `crate::sys::x` whichever file provides it.
//!
//! # Layout
//!
//! | file | what | platforms |
//! |---|---|---|
//! | `time.rs` | [`monotonic_now`], [`Deadline`] | every Unix (`CLOCK_MONOTONIC` is POSIX) |
//! | `socket.rs` | socket pairs, vectored send, receive, poll | every Unix |
//! | `process_group.rs` | `setpgid` from the parent's side (`Builder::process_group`) | every Unix |
//! | `linux/futex.rs` | shared futex wait/wake | the Linux back end |
//! | `linux/identity.rs` | the calling thread's and process's identity | the Linux back end |
//! | `linux/procfs.rs` | `/proc` evidence: stat, thread lists, maps, pid namespace | the Linux back end |
//! | `linux/shm.rs` | memfd, named objects, aligned shared mappings | the Linux back end |
//! | `linux/task.rs` | fork, exit, wait, signals, task existence | the Linux back end |
//! | `process.rs` | pidfds, `waitid`, re-exec with inherited descriptors (the `Process` layer) | Linux only, for now |
//!
//! # The back-end contract
//!
//! A port to another system (macOS: `os_sync_wait_on_address` with
//! `OS_SYNC_WAIT_ON_ADDRESS_SHARED`; FreeBSD: `_umtx_op(UMTX_OP_WAIT_UINT)` without
//! `_PRIVATE`, `kinfo_proc` for liveness) adds a sibling directory of `linux/` that exports
//! the names below with the same signatures and meaning, and a `cfg` line here. The
//! unnamed constant at the end of this file names each function with its signature, so a
//! back end that lacks one or gets it wrong fails to compile right there.
//!
//! **Futex** (`linux/futex.rs`). Every procshare wait is built on these two; they must be
//! process-shared (keyed on the physical page, never a private flag).
//! * `enum FutexWait { Woken, TimedOut }`.
//! * `futex_wait(&AtomicU32, expected: u32, Deadline) -> FutexWait`: sleeps while the word
//!   holds `expected`, until woken or the deadline (on [`monotonic_now`]'s clock) passes; may
//!   return `Woken` spuriously; `Woken` at once if the word differs.
//! * `futex_wake(&AtomicU32, count: u32) -> usize`: wakes up to `count` sleepers on the word
//!   in any process; returns how many woke.
//!
//! **Identity** (`linux/identity.rs`). An id plus a start time names one thread or process
//! for the life of the machine, so a recycled id is told apart (see `crate::owner` for how
//! they are packed into shared words).
//! * `struct ThreadIdentity { tid: u32 (below TID_LIMIT), start: u64 (0 = unknown), ns: u32
//!   (pid namespace, 0 = unknown) }`.
//! * `current_thread() -> ThreadIdentity`: cheap (cached), recomputed in a fork child.
//! * `current_process_noalloc() -> (pid, start)`: allocation-free, callable in a fork
//!   child handler.
//!
//! **Liveness evidence** (`linux/procfs.rs`, `linux/task.rs`). Raw answers only;
//! `crate::liveness` turns them into verdicts, erring towards "alive".
//! * `TID_LIMIT: u32`: no task id is above it.
//! * `task_exists(tid) -> Option<bool>`: `Some(false)` only when the kernel says no such task.
//! * `struct ThreadStat { state: u8, num_threads: u64, start: u64 }` with `is_dead()`
//!   (zombie); `thread_stat(tid) -> io::Result<Option<ThreadStat>>` (`Ok(None)`: no such
//!   task); `thread_count()`; `thread_ids(pid)`; `children_of_current_thread()`.
//! * `proc_matches_own_namespace() -> bool`; `pid_namespace_id() -> Option<u64>`.
//! * `struct MappedFile`; `own_mappings()` (all at once, for the fork handler),
//!   `own_mapping_at(addr)`; `process_maps_file(pid, file)`: whether a live process still
//!   maps a file (a lock owner that `exec`'d something else).
//!
//! **Shared memory** (`linux/shm.rs`).
//! * `memfd_create(name, len) -> io::Result<File>`: anonymous, close-on-exec, sealed size.
//! * `shm_create`, `shm_open_existing`, `shm_unlink`, `shm_list`, `shm_name_id`,
//!   `shm_rename_noreplace`: named objects (0600, `O_EXCL`).
//! * `struct SharedMap` (unmaps on drop, `as_ptr()`), `map_shared_aligned(file, len, align)`,
//!   `page_size()`, `read_at(file, buf, offset)`, `file_id(file)`, `set_inheritable(fd)`.
//!
//! **Tasks** (`linux/task.rs`).
//! * `getpid()`, `unsafe fork() -> io::Result<Forked>`, `exit_immediately(code) -> !`,
//!   `send_signal(pid, signal, group)`, `become_group_leader()`,
//!   `mod signal { KILL, TERM }`, `register_fork_handlers(prepare, parent,
//!   child)`, `clear_errno()` / `errno_is_set()`.
//!
//! **The `Process` layer** (`process.rs`): everything that file exports. It is Linux code
//! (pidfds, `waitid`, `PR_SET_PDEATHSIG`) kept outside `linux/` for now; a port provides the
//! same names or leaves `Process` out.

mod time;
pub(crate) use time::*;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub(crate) use linux::*;
#[cfg(target_os = "linux")]
mod process;
#[cfg(target_os = "linux")]
pub(crate) use process::*;
// POSIX too; only the `Process` layer (Linux, for now) calls it.
mod process_group;
pub(crate) use process_group::*;

// Sockets are POSIX, not Linux-specific: shared by every Unix back end.
mod socket;
pub(crate) use socket::*;

#[cfg(not(target_os = "linux"))]
compile_error!(
    "procshare currently supports Linux only: the macOS and FreeBSD back ends \
     (shared address waits and owner-liveness checks) are not written yet"
);

/// The back-end contract, checked by the compiler: each line names a function a back end
/// must export, with the signature it must have (see the module docs for the meaning).
#[allow(clippy::type_complexity)]
const _: () = {
    use std::fs::File;
    use std::io;
    use std::os::fd::BorrowedFd;
    use std::sync::atomic::AtomicU32;

    // Futex.
    let _: fn(&AtomicU32, u32, Deadline) -> FutexWait = futex_wait;
    let _: fn(&AtomicU32, u32) -> usize = futex_wake;
    // Identity.
    let _: fn() -> ThreadIdentity = current_thread;
    let _: fn() -> (u32, u64) = current_process_noalloc;
    // Liveness evidence.
    let _: u32 = TID_LIMIT;
    let _: fn(u32) -> Option<bool> = task_exists;
    let _: fn(u32) -> io::Result<Option<ThreadStat>> = thread_stat;
    let _: fn(&ThreadStat) -> bool = ThreadStat::is_dead;
    let _: fn() -> io::Result<u64> = thread_count;
    let _: fn(u32) -> io::Result<Vec<u32>> = thread_ids;
    let _: fn() -> io::Result<Vec<u32>> = children_of_current_thread;
    let _: fn() -> bool = proc_matches_own_namespace;
    let _: fn() -> Option<u64> = pid_namespace_id;
    let _: fn() -> io::Result<Vec<(usize, usize, Option<MappedFile>)>> = own_mappings;
    let _: fn(usize) -> io::Result<Option<(usize, usize, Option<MappedFile>)>> = own_mapping_at;
    let _: fn(u32, MappedFile) -> io::Result<Option<bool>> = process_maps_file;
    // Shared memory.
    let _: fn(&str, u64) -> io::Result<File> = memfd_create;
    let _: fn(&str, u64) -> io::Result<File> = shm_create;
    let _: fn(&str) -> io::Result<File> = shm_open_existing;
    let _: fn(&str) -> io::Result<()> = shm_unlink;
    let _: fn(&str) -> io::Result<Vec<String>> = shm_list;
    let _: fn(&str) -> io::Result<Option<(u64, u64)>> = shm_name_id;
    let _: fn(&str, &str) -> io::Result<()> = shm_rename_noreplace;
    let _: fn(&File, usize, usize) -> io::Result<SharedMap> = map_shared_aligned;
    let _: fn(&SharedMap) -> *mut u8 = SharedMap::as_ptr;
    let _: fn() -> usize = page_size;
    let _: fn(&File, &mut [u8], u64) -> io::Result<usize> = read_at;
    let _: fn(&File) -> io::Result<(u64, u64)> = file_id;
    let _: for<'a> fn(BorrowedFd<'a>) -> io::Result<()> = set_inheritable;
    // Tasks.
    let _: fn() -> u32 = getpid;
    let _: unsafe fn() -> io::Result<Forked> = fork;
    let _: fn(i32) -> ! = exit_immediately;
    let _: fn(u32, i32, bool) -> io::Result<()> = send_signal;
    let _: fn() -> io::Result<()> = become_group_leader;
    let _: [i32; 2] = [signal::KILL, signal::TERM];
    let _: fn(extern "C" fn(), extern "C" fn(), extern "C" fn()) = register_fork_handlers;
    let _: fn() = clear_errno;
    let _: fn() -> bool = errno_is_set;
};
