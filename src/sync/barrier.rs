//! [`Barrier`]: rendezvous for a fixed number of participants.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::shm::ShmSafe;
use crate::sys::{self, Deadline, FutexWait};

/// Blocks each caller of [`wait`](Barrier::wait) until `n` of them (across processes) have
/// arrived, then releases them all. Reusable.
///
/// The generation and arrival count share one futex word, so arriving, completing a round
/// and withdrawing after a timeout are each a single compare-and-swap: a participant that
/// times out leaves the barrier exactly as if it had never arrived.
///
/// ```
/// use procshare::{Barrier, Shared};
///
/// let b = Shared::new(Barrier::new(1))?;
/// assert!(b.wait().is_leader()); // n = 1: the only participant leads every round
/// # Ok::<(), procshare::Error>(())
/// ```
#[repr(C)]
pub struct Barrier {
    /// Generation in the high 16 bits, arrivals in the low 16 bits.
    word: AtomicU32,
    n: u32,
}

// SAFETY: repr(C) atomic and integer, no pointers or drop glue. A corrupt count can make
// a round complete early or late, never cause undefined behaviour.
unsafe impl ShmSafe for Barrier {}

const COUNT_MASK: u32 = 0xffff;
const GENERATION_ONE: u32 = 1 << 16;

/// Returned by [`Barrier::wait`]; exactly one participant per round is the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarrierWaitResult(bool);

impl BarrierWaitResult {
    /// Whether this caller was the last to arrive.
    pub fn is_leader(&self) -> bool {
        self.0
    }
}

impl Barrier {
    /// A barrier for `n` participants.
    ///
    /// # Panics
    ///
    /// If `n` is 0 or above 65535.
    pub const fn new(n: u32) -> Barrier {
        assert!(
            n >= 1 && n <= COUNT_MASK,
            "a Barrier needs 1 to 65535 participants"
        );
        Barrier {
            word: AtomicU32::new(0),
            n,
        }
    }

    /// Waits for the round to fill.
    pub fn wait(&self) -> BarrierWaitResult {
        match self.wait_until(Deadline::NEVER) {
            Ok(r) => r,
            Err(_) => unreachable!("a wait without deadline cannot time out"),
        }
    }

    /// Waits for the round to fill, withdrawing after `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the round did not fill in time; this caller is then no longer
    /// counted as arrived.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<BarrierWaitResult> {
        self.wait_until(Deadline::after(timeout))
    }

    fn wait_until(&self, deadline: Deadline) -> Result<BarrierWaitResult> {
        let mut w = self.word.load(Ordering::Relaxed);
        let generation = loop {
            let count = w & COUNT_MASK;
            let (next, leader) = if count + 1 >= self.n {
                ((w & !COUNT_MASK).wrapping_add(GENERATION_ONE), true)
            } else {
                (w + 1, false)
            };
            match self
                .word
                .compare_exchange_weak(w, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) if leader => {
                    sys::futex_wake(&self.word, u32::MAX);
                    return Ok(BarrierWaitResult(true));
                }
                Ok(_) => break w & !COUNT_MASK,
                Err(now) => w = now,
            }
        };
        loop {
            let w = self.word.load(Ordering::Acquire);
            if w & !COUNT_MASK != generation {
                return Ok(BarrierWaitResult(false));
            }
            if sys::futex_wait(&self.word, w, deadline) == FutexWait::TimedOut {
                // Withdraw, unless the round completed meanwhile.
                let mut w = self.word.load(Ordering::Acquire);
                while w & !COUNT_MASK == generation {
                    match self.word.compare_exchange_weak(
                        w,
                        w - 1,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return Err(Error::Timeout),
                        Err(now) => w = now,
                    }
                }
                return Ok(BarrierWaitResult(false));
            }
        }
    }
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier").field("n", &self.n).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn one_leader_per_round_and_no_overtaking() {
        let rounds = if cfg!(miri) { 10 } else { 1_000 };
        let b = Arc::new(Barrier::new(3));
        let arrived = Arc::new(AtomicU64::new(0));
        let leaders = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (b, arrived, leaders) = (b.clone(), arrived.clone(), leaders.clone());
                std::thread::spawn(move || {
                    for round in 0..rounds {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        if b.wait().is_leader() {
                            leaders.fetch_add(1, Ordering::SeqCst);
                        }
                        assert!(arrived.load(Ordering::SeqCst) >= 3 * (round + 1));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(leaders.load(Ordering::SeqCst), rounds);
    }

    #[test]
    fn timed_out_participant_withdraws() {
        let b = Barrier::new(2);
        assert!(matches!(
            b.wait_timeout(Duration::from_millis(5)),
            Err(Error::Timeout)
        ));
        assert_eq!(b.word.load(Ordering::SeqCst) & COUNT_MASK, 0);
    }
}
