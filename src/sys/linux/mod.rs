//! Linux back end, by concern: shared futexes ([`futex`]), thread and process identity
//! ([`identity`]), `/proc` evidence ([`procfs`]), shared memory objects and mappings
//! ([`shm`]), and tasks: fork, wait, signals ([`task`]). What each file must export is the
//! back-end contract in `src/sys/mod.rs`.

use std::io;

mod futex;
mod identity;
mod procfs;
mod shm;
mod task;

pub(crate) use futex::*;
pub(crate) use identity::*;
pub(crate) use procfs::*;
pub(crate) use shm::*;
pub(crate) use task::*;

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn invalid_input(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Sets `errno` to 0, so that a later [`errno_is_set`] tells whether a call failed since.
pub(crate) fn clear_errno() {
    if cfg!(miri) {
        return;
    }
    // SAFETY: __errno_location returns the calling thread's errno, valid for writes.
    unsafe { *libc::__errno_location() = 0 };
}

/// Whether `errno` is non-zero (see [`clear_errno`]).
pub(crate) fn errno_is_set() -> bool {
    !cfg!(miri) && errno() != 0
}
