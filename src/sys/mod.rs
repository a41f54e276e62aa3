//! The only module that talks to the operating system.
//!
//! Everything above this layer is portable Rust over atomics; everything that needs a
//! syscall (futex wait/wake, memfd/shm_open, mmap, fork/wait, thread identity) comes from
//! here. The platform switch lives in this one place: a port to macOS
//! (`os_sync_wait_on_address` with `OS_SYNC_WAIT_ON_ADDRESS_SHARED`) or FreeBSD
//! (`_umtx_op(UMTX_OP_WAIT_UINT)` without `_PRIVATE`) adds a sibling of `linux.rs` that
//! exports the same names.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub(crate) use linux::*;
#[cfg(target_os = "linux")]
mod process;
#[cfg(target_os = "linux")]
pub(crate) use process::*;
#[cfg(target_os = "linux")]
mod maps;
#[cfg(target_os = "linux")]
pub(crate) use maps::*;

// Sockets are POSIX, not Linux-specific: shared by every Unix back end.
mod socket;
pub(crate) use socket::*;

#[cfg(not(target_os = "linux"))]
compile_error!(
    "procshare currently supports Linux only: the macOS and FreeBSD back ends \
     (shared address waits and owner-liveness checks) are not written yet"
);
