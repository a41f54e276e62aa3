//! Time for deadlines: the monotonic clock and [`Deadline`], shared by every back end.
//!
//! `CLOCK_MONOTONIC` is POSIX (Linux, macOS, FreeBSD all have it), so this file is not
//! per-platform. A back end whose wait primitive takes another clock converts a
//! [`Deadline`] (an absolute point on this clock, see [`Deadline::at`]) to its own.

use std::time::Duration;

/// Time since an arbitrary fixed point on `CLOCK_MONOTONIC`, the clock futex deadlines use.
pub(crate) fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec, and CLOCK_MONOTONIC exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// An absolute point on the monotonic clock after which a wait gives up, or never.
///
/// Waits are expressed against an absolute deadline, not a relative timeout, so that a
/// wait interrupted by a signal or woken spuriously resumes against the same end point
/// instead of silently extending itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deadline {
    at: Option<Duration>,
}

impl Deadline {
    pub(crate) const NEVER: Deadline = Deadline { at: None };

    /// `timeout` from now; a timeout too large to represent means "never".
    ///
    /// A zero timeout (every `try_*` call) is the clock's origin, already passed, so
    /// neither making it nor asking it reads the clock.
    pub(crate) fn after(timeout: Duration) -> Deadline {
        if timeout.is_zero() {
            return Deadline {
                at: Some(Duration::ZERO),
            };
        }
        Deadline {
            at: monotonic_now().checked_add(timeout),
        }
    }

    /// Time left, `None` for a deadline that never expires.
    #[inline]
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.at.map(|at| {
            if at.is_zero() {
                Duration::ZERO
            } else {
                at.saturating_sub(monotonic_now())
            }
        })
    }

    #[inline]
    pub(crate) fn has_passed(&self) -> bool {
        self.remaining() == Some(Duration::ZERO)
    }

    /// The earlier of `self` and `timeout` from now.
    pub(crate) fn capped(&self, timeout: Duration) -> Deadline {
        let other = Deadline::after(timeout);
        match (self.at, other.at) {
            (Some(a), Some(b)) => Deadline { at: Some(a.min(b)) },
            (Some(a), None) => Deadline { at: Some(a) },
            (None, b) => Deadline { at: b },
        }
    }

    /// The point on [`monotonic_now`]'s clock at which the deadline passes, `None` for
    /// [`Deadline::NEVER`]: what a back end hands to an absolute-time wait.
    pub(crate) fn at(&self) -> Option<Duration> {
        self.at
    }
}
