//! Shared futex wait and wake: the one blocking primitive every procshare wait is built on.

use std::io;
use std::ptr;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use super::errno;
use crate::sys::time::{Deadline, monotonic_now};

/// `deadline` as the absolute `CLOCK_MONOTONIC` timespec `FUTEX_WAIT_BITSET` takes.
fn as_timespec(deadline: Deadline) -> Option<libc::timespec> {
    deadline.at().map(|at| libc::timespec {
        tv_sec: at.as_secs() as libc::time_t,
        tv_nsec: at.subsec_nanos() as libc::c_long,
    })
}

/// How a futex wait ended. Callers must re-check their condition either way: a wake-up
/// may be spurious, and a value change or signal looks the same as a wake-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FutexWait {
    /// Woken, interrupted, or the word no longer held `expected`.
    Woken,
    /// The deadline passed.
    TimedOut,
}

/// Sleeps while `*word == expected`, until woken or `deadline` passes.
///
/// The wait is process-shared: it omits `FUTEX_PRIVATE_FLAG`, so the kernel keys it on the
/// physical page and a waker in another process that maps the same page finds it.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, deadline: Deadline) -> FutexWait {
    let ts = as_timespec(deadline);
    if let Some(ts) = &ts {
        if monotonic_now() >= Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32) {
            return FutexWait::TimedOut;
        }
    }
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |ts| ts as *const libc::timespec);
    // FUTEX_WAIT_BITSET (unlike FUTEX_WAIT) takes an absolute CLOCK_MONOTONIC deadline,
    // which is what makes restarting after EINTR exact.
    // SAFETY: `word` is a live, aligned AtomicU32 for the whole call; the kernel only reads
    // it. `ts_ptr` is null or points at `ts`, which outlives the call. The remaining
    // arguments are plain integers that FUTEX_WAIT_BITSET ignores or checks.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT_BITSET,
            expected,
            ts_ptr,
            ptr::null::<u32>(),
            libc::FUTEX_BITSET_MATCH_ANY,
        )
    };
    if rc == 0 {
        return FutexWait::Woken;
    }
    match errno() {
        libc::ETIMEDOUT => FutexWait::TimedOut,
        libc::EAGAIN | libc::EINTR => FutexWait::Woken,
        e => panic!(
            "futex wait failed with {}: the word is not in mapped memory or the kernel lacks \
             futex support",
            io::Error::from_raw_os_error(e)
        ),
    }
}

/// Wakes up to `count` waiters sleeping on `word` in any process. Returns how many woke.
pub(crate) fn futex_wake(word: &AtomicU32, count: u32) -> usize {
    let count = count.min(i32::MAX as u32) as i32;
    // SAFETY: `word` is a live, aligned AtomicU32; FUTEX_WAKE never dereferences it beyond
    // hashing its address, and the remaining arguments are ignored.
    let rc = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, count) };
    rc.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn futex_wait_times_out_and_mismatch_returns() {
        let word = AtomicU32::new(7);
        assert_eq!(
            futex_wait(&word, 8, Deadline::after(Duration::from_secs(5))),
            FutexWait::Woken
        );
        let start = monotonic_now();
        let r = futex_wait(&word, 7, Deadline::after(Duration::from_millis(20)));
        assert_eq!(r, FutexWait::TimedOut);
        assert!(monotonic_now() - start >= Duration::from_millis(20));
    }
}
