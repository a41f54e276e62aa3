//! Queues in shared memory: zero-copy rings for plain-old-data ([`spsc`](fn@crate::spsc) and
//! [`channel`](fn@crate::channel)).
//!
//! Both rings live in an anonymous shared segment, are inherited by `fork`, and block with
//! an eventcount on a shared futex after a short bounded spin. Every wait is internally
//! bounded, so a peer that dies is noticed: a receiver whose senders are all gone (dropped
//! in every process, or their processes dead) gets `Disconnected` once the queue is empty,
//! and a sender whose receivers are all gone gets its message back in `Disconnected`.
//! Non-blocking calls run the same check (at most every 20 ms per handle) when they find
//! the queue empty or full, so polling sees the same answers as blocking.
//!
//! # Pid namespaces
//!
//! Crash recovery judges a peer by the pid or tid it recorded in the queue (peer tables,
//! claim words, record owners, spsc owners, the byte queue's keeper), and a pid names the
//! same process only inside one pid namespace. So every queue records the pid namespace
//! of the process that created it, and only processes of that namespace use it. A
//! process that inherited a queue by `fork` after `unshare(CLONE_NEWPID)` (a container
//! started from the process holding the queue) is *foreign*:
//!
//! | creator's namespace | this process's namespace | this process |
//! |---|---|---|
//! | N | N | uses the queue |
//! | N | M ≠ N | foreign |
//! | N | unknown | foreign (cannot tell) |
//! | unknown | known | foreign (cannot tell) |
//! | unknown | unknown | uses the queue (nobody can tell: the namespace is learnt from `/proc` or, on Linux 6.11 and later, a pidfd; without either, e.g. in a sandbox without `/proc` on an older kernel, every process is taken to be in one namespace, which holds unless one of them unshares its own) |
//!
//! A foreign process never records its identity in the queue and never judges one
//! recorded there: every operation is refused at once, before it touches the ring
//! ([`channel`](fn@crate::channel) and [`spsc`](fn@crate::spsc) methods panic with a
//! message saying so, as for spsc's one-process-per-end rule: their error enums have no
//! honest variant for it; [`ByteQueue`] and [`Queue`] return
//! [`QueueError::ForeignPidNamespace`]). Its handles still count as holders, without
//! naming it: the other end is never told `Disconnected` because of a holder it cannot
//! judge. They are uncounted when the foreign process drops them; if it dies holding
//! them, they are uncounted only where the parent that forked it could name it (its fork
//! loan, bound to the child's pid in the queue's namespace), and otherwise stay counted
//! for good (that end then never reads as disconnected: use timeouts).

pub mod bytes;
mod error;
pub mod mpmc;
pub(crate) mod peers;
pub(crate) mod ring;
pub mod spsc;
mod typed;

pub use bytes::{ByteQueue, QueueBuilder};
pub use error::{
    QueueError, RecvError, RecvTimeoutError, SendError, SendTimeoutError, TryRecvError,
    TrySendError,
};

pub use typed::{Queue, QueueReceiver, QueueSender};

use crate::sync::eventcount::{Attempt, EventCount, block_on_after_miss};

use crate::sys::Deadline;

/// The non-blocking core each ring flavour provides; the blocking API is built on it once.
pub(crate) trait RawSender<T> {
    fn try_send(&self, value: T) -> Result<(), TrySendError<T>>;
    /// [`try_send`](RawSender::try_send) of a copy of `*value`, written straight into its
    /// slot: a large message is not moved through the stack and back on every attempt.
    fn try_send_ref(&self, value: &T) -> Result<(), TrySendError<()>>;
    fn not_full(&self) -> &EventCount;
    /// Slow check after a sleep timed out: are the receivers alive (reclaiming dead ones),
    /// and can a slot held by a dead peer be freed?
    fn receivers_alive(&self) -> bool;
}

pub(crate) trait RawReceiver<T> {
    fn try_recv(&self) -> Result<T, TryRecvError>;
    /// [`try_recv`](RawReceiver::try_recv) into `out`, copied straight from the slot.
    fn try_recv_into(&self, out: &mut std::mem::MaybeUninit<T>) -> Result<(), TryRecvError>;
    fn not_empty(&self) -> &EventCount;
    /// See [`RawSender::receivers_alive`].
    fn senders_alive(&self) -> bool;
}

pub(crate) fn send_until<T: Copy, S: RawSender<T>>(
    s: &S,
    value: T,
    deadline: Deadline,
) -> Result<(), SendTimeoutError<T>> {
    // The common case first, without the waiting machinery around it (on any other
    // outcome the attempt is made again inside it, after a pause).
    if s.try_send_ref(&value).is_ok() {
        return Ok(());
    }
    let outcome = block_on_after_miss(
        s.not_full(),
        deadline,
        || match s.try_send_ref(&value) {
            Ok(()) => Attempt::Ready(Ok(())),
            Err(TrySendError::Full(())) => Attempt::Blocked,
            Err(TrySendError::Disconnected(())) => {
                Attempt::Ready(Err(SendTimeoutError::Disconnected(value)))
            }
            Err(TrySendError::Corrupted(())) => {
                Attempt::Ready(Err(SendTimeoutError::Corrupted(value)))
            }
        },
        || (!s.receivers_alive()).then_some(Err(SendTimeoutError::Disconnected(value))),
    );
    outcome.unwrap_or(Err(SendTimeoutError::Timeout(value)))
}

pub(crate) fn recv_until<T, R: RawReceiver<T>>(
    r: &R,
    deadline: Deadline,
) -> Result<T, RecvTimeoutError> {
    // The message is copied once, from its slot into `out`, and moved out at the end: a
    // large `T` is not carried through every layer of results by value.
    let mut first = std::mem::MaybeUninit::uninit();
    // The common case first, as in `send_until`.
    if r.try_recv_into(&mut first).is_ok() {
        // SAFETY: `try_recv_into` succeeded, so it wrote `first`.
        return Ok(unsafe { first.assume_init() });
    }
    let out = std::cell::RefCell::new(first);
    let outcome = block_on_after_miss(
        r.not_empty(),
        deadline,
        || match r.try_recv_into(&mut out.borrow_mut()) {
            Ok(()) => Attempt::Ready(Ok(())),
            Err(TryRecvError::Empty) => Attempt::Blocked,
            Err(TryRecvError::Disconnected) => Attempt::Ready(Err(RecvTimeoutError::Disconnected)),
            Err(TryRecvError::Corrupted(w)) => Attempt::Ready(Err(RecvTimeoutError::Corrupted(w))),
        },
        || {
            if r.senders_alive() {
                return None;
            }
            // Every sender is gone, but one may have sent just before going.
            Some(match r.try_recv_into(&mut out.borrow_mut()) {
                Ok(()) => Ok(()),
                Err(TryRecvError::Corrupted(w)) => Err(RecvTimeoutError::Corrupted(w)),
                Err(_) => Err(RecvTimeoutError::Disconnected),
            })
        },
    );
    outcome.unwrap_or(Err(RecvTimeoutError::Timeout))?;
    // SAFETY: `Ok(())` above means a `try_recv_into` succeeded, and it wrote `out`.
    Ok(unsafe { out.into_inner().assume_init() })
}

/// The blocking and batch API shared by every flavour's `Sender`.
macro_rules! sender_api {
    () => {
        /// Sends `value`, waiting while the queue is full.
        ///
        /// # Errors
        ///
        /// [`SendError`] with the value: `Disconnected` if every receiver is gone,
        /// `Corrupted` if the queue's shared memory was found scribbled over.
        pub fn send(&self, value: T) -> Result<(), SendError<T>> {
            $crate::queue::send_until(self, value, $crate::sys::Deadline::NEVER).map_err(
                |e| match e {
                    SendTimeoutError::Corrupted(v) => SendError::Corrupted(v),
                    e => SendError::Disconnected(e.into_inner()),
                },
            )
        }

        /// Sends `value` if there is room right now.
        ///
        /// # Errors
        ///
        /// `Full`, `Disconnected` or `Corrupted`, with the value.
        pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
            $crate::queue::RawSender::try_send(self, value)
        }

        /// Sends `value`, waiting at most `timeout` for room.
        ///
        /// # Errors
        ///
        /// `Timeout`, `Disconnected` or `Corrupted`, with the value.
        pub fn send_timeout(
            &self,
            value: T,
            timeout: std::time::Duration,
        ) -> Result<(), SendTimeoutError<T>> {
            $crate::queue::send_until(self, value, $crate::sys::Deadline::after(timeout))
        }

        /// Sends every element of `values` in order, waiting for room as needed; each
        /// index update publishes as many messages as fit at once.
        ///
        /// # Errors
        ///
        /// [`SendError`] carrying how many were sent, if every receiver went away or the
        /// queue was found corrupted.
        pub fn send_batch(&self, values: &[T]) -> Result<(), SendError<usize>> {
            let mut sent = 0;
            while sent < values.len() {
                match self.try_send_batch(&values[sent..]) {
                    Ok(n) if n > 0 => sent += n,
                    Ok(_) | Err(TrySendError::Full(())) => {
                        // Wait for room for one, then go back to batching.
                        self.send(values[sent]).map_err(|e| match e {
                            SendError::Corrupted(_) => SendError::Corrupted(sent),
                            SendError::Disconnected(_) => SendError::Disconnected(sent),
                        })?;
                        sent += 1;
                    }
                    Err(TrySendError::Disconnected(())) => {
                        return Err(SendError::Disconnected(sent));
                    }
                    Err(TrySendError::Corrupted(())) => return Err(SendError::Corrupted(sent)),
                }
            }
            Ok(())
        }
    };
}

/// The blocking and batch API shared by every flavour's `Receiver`.
macro_rules! receiver_api {
    () => {
        /// Receives a message, waiting while the queue is empty.
        ///
        /// # Errors
        ///
        /// `Disconnected` once the queue is empty and every sender is gone.
        pub fn recv(&self) -> Result<T, RecvError> {
            $crate::queue::recv_until(self, $crate::sys::Deadline::NEVER).map_err(|e| match e {
                RecvTimeoutError::Corrupted(w) => RecvError::Corrupted(w),
                _ => RecvError::Disconnected,
            })
        }

        /// Receives a message if one is ready.
        ///
        /// # Errors
        ///
        /// `Empty`, `Disconnected` (empty and no senders left), or `Corrupted`.
        pub fn try_recv(&self) -> Result<T, TryRecvError> {
            $crate::queue::RawReceiver::try_recv(self)
        }

        /// Receives a message, waiting at most `timeout`.
        ///
        /// # Errors
        ///
        /// `Timeout`, `Disconnected` or `Corrupted`.
        pub fn recv_timeout(&self, timeout: std::time::Duration) -> Result<T, RecvTimeoutError> {
            $crate::queue::recv_until(self, $crate::sys::Deadline::after(timeout))
        }

        /// A blocking iterator that ends when the queue is disconnected.
        pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
            std::iter::from_fn(move || self.recv().ok())
        }

        /// An iterator over the messages ready now.
        pub fn try_iter(&self) -> impl Iterator<Item = T> + '_ {
            std::iter::from_fn(move || self.try_recv().ok())
        }

        /// Receives up to `max` messages, waiting for at least one, and appends them to
        /// `out`. Returns how many were received.
        ///
        /// # Errors
        ///
        /// As for [`recv`](Self::recv).
        pub fn recv_batch(&self, out: &mut Vec<T>, max: usize) -> Result<usize, RecvError> {
            if max == 0 {
                return Ok(0);
            }
            match self.try_recv_batch(out, max) {
                Ok(n) if n > 0 => return Ok(n),
                Err(TryRecvError::Corrupted(w)) => return Err(RecvError::Corrupted(w)),
                _ => {}
            }
            out.push(self.recv()?);
            let more = self.try_recv_batch(out, max - 1).unwrap_or(0);
            Ok(1 + more)
        }
    };
}

pub(crate) use {receiver_api, sender_api};
