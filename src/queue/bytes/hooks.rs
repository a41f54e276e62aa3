//! Crash-test and fuzzing hooks (cargo feature `test-hooks`), and the fail points they
//! arm. Without the feature a fail point is nothing at all.

/// Points between two stores of the protocol where a crash test can stall a process (and
/// then kill it); each is named in `__FAIL_POINTS` at index `FailPoint as usize - 1`.
#[repr(u32)]
#[derive(Clone, Copy)]
#[cfg_attr(not(any(test, feature = "test-hooks")), allow(dead_code))]
pub(super) enum FailPoint {
    ReservePad = 1,
    ReserveWriting,
    PublishCounted,
    ClaimPadDone,
    ClaimReading,
    ClaimHead,
    ReleaseDone,
    StreamMarked,
    FirstPublished,
    StreamCleared,
    Stashed,
}

/// Stalls here if a crash test armed `point` in this process.
#[cfg(not(any(test, feature = "test-hooks")))]
#[inline(always)]
pub(super) fn fail_point(_point: FailPoint) {}

#[cfg(any(test, feature = "test-hooks"))]
pub(super) use armed::fail_point;

#[cfg(any(test, feature = "test-hooks"))]
pub use armed::__FAIL_POINTS;

#[cfg(any(test, feature = "test-hooks"))]
mod armed {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::FailPoint;
    use crate::queue::bytes::ByteQueue;

    /// The names of [`FailPoint`]s, in order, for [`ByteQueue::__stall_at`].
    #[doc(hidden)]
    pub const __FAIL_POINTS: &[&str] = &[
        "reserve: padding READY, record not yet written",
        "reserve: record WRITING, tail not advanced",
        "publish: counted, record not yet READY",
        "claim: padding DONE, head not advanced",
        "claim: record READING, head not advanced",
        "claim: head advanced, count not decremented",
        "release: record DONE, free not advanced",
        "chunked: stream marked, first chunk not published",
        "chunked: first chunk published",
        "chunked: stream cleared, producer lock not released",
        "assemble: partial message kept, consumer lock not released",
    ];

    /// The armed fail point (a `FailPoint` value), 0 when none is. Only crash tests arm
    /// one; on the common path a fail point is one relaxed load of this process-local
    /// word.
    static FAIL_POINT: AtomicU32 = AtomicU32::new(0);
    static STALL: std::sync::Mutex<Option<fn()>> = std::sync::Mutex::new(None);

    #[inline(always)]
    pub(in crate::queue::bytes) fn fail_point(point: FailPoint) {
        if FAIL_POINT.load(Ordering::Relaxed) == point as u32 {
            stall_here();
        }
    }

    #[cold]
    #[inline(never)]
    fn stall_here() {
        let stall = *STALL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stall) = stall {
            stall();
        }
    }

    impl ByteQueue {
        /// Fuzzing hook: overwrites the shared positions and the start of the ring's
        /// data, as a peer scribbling over shared memory would.
        #[doc(hidden)]
        pub fn __scribble(&self, free: u64, head: u64, tail: u64, data: &[u8]) {
            let h = self.core.h();
            h.free.store(free, Ordering::SeqCst);
            h.head.store(head, Ordering::SeqCst);
            h.tail.store(tail, Ordering::SeqCst);
            let n = data.len().min(self.core.cap() as usize);
            // SAFETY: at most `capacity` bytes into the ring's data area, which this
            // handle keeps mapped; the fuzzer uses the queue from one thread only.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.core.ring.slots_ptr(), n) };
        }

        /// Fuzzing hook: overwrites the chunked-message marks `stream` and `keeper` (see
        /// the module docs), as a peer scribbling over shared memory would.
        #[doc(hidden)]
        pub fn __scribble_marks(&self, stream: u64, keeper: u64) {
            let h = self.core.h();
            h.stream.store(stream, Ordering::SeqCst);
            h.keeper.store(keeper, Ordering::SeqCst);
        }

        /// Crash-test hook: from now on, this process calls `stall` whenever any handle
        /// of any byte queue reaches the fail point named `point` (one of
        /// `__FAIL_POINTS`), so a test can stop or kill a process between two stores of
        /// the protocol. `None` disarms.
        ///
        /// # Panics
        ///
        /// If `point` is not a known fail point.
        #[doc(hidden)]
        pub fn __stall_at(point: Option<&str>, stall: fn()) {
            let id = match point {
                None => 0,
                Some(p) => {
                    let i = __FAIL_POINTS
                        .iter()
                        .position(|q| *q == p)
                        .unwrap_or_else(|| panic!("unknown fail point {p:?}"));
                    i as u32 + 1
                }
            };
            *STALL.lock().unwrap_or_else(|e| e.into_inner()) = Some(stall);
            FAIL_POINT.store(id, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_fail_point_has_its_name() {
        assert_eq!(FailPoint::Stashed as usize, __FAIL_POINTS.len());
    }
}
