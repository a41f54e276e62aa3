//! Errors of the queue operations: the rings' (send errors give the message back), and
//! [`QueueError`] of [`ByteQueue`](crate::ByteQueue) and [`Queue`](crate::Queue).

use std::fmt;

/// Why a blocking send failed; carries the message that could not be sent.
#[derive(PartialEq, Eq, Clone, Copy)]
pub enum SendError<T> {
    /// The receiving side is gone: every receiver dropped its handle or its process died.
    Disconnected(T),
    /// The queue's shared state is impossible (a peer scribbled over it); the queue is
    /// unusable from now on, and every later operation on it says so.
    Corrupted(T),
}

/// Why [`try_send`](crate::channel::Sender::try_send) failed; carries the message.
#[derive(PartialEq, Eq, Clone, Copy)]
pub enum TrySendError<T> {
    /// The queue is full right now.
    Full(T),
    /// Every receiver is gone.
    Disconnected(T),
    /// See [`SendError::Corrupted`].
    Corrupted(T),
}

/// Why a timed send failed; carries the message.
#[derive(PartialEq, Eq, Clone, Copy)]
pub enum SendTimeoutError<T> {
    /// Still full when the timeout passed.
    Timeout(T),
    /// Every receiver is gone.
    Disconnected(T),
    /// See [`SendError::Corrupted`].
    Corrupted(T),
}

/// Why a blocking receive failed.
#[derive(PartialEq, Eq, Clone, Debug)]
pub enum RecvError {
    /// The queue is empty and every sender is gone (dropped, or its process died).
    Disconnected,
    /// The queue's shared state is impossible (a peer scribbled over it); the queue is
    /// unusable from now on.
    Corrupted(String),
}

/// Why [`try_recv`](crate::channel::Receiver::try_recv) failed.
#[derive(PartialEq, Eq, Clone, Debug)]
pub enum TryRecvError {
    /// Nothing to receive right now.
    Empty,
    /// Empty, and every sender is gone.
    Disconnected,
    /// See [`RecvError::Corrupted`].
    Corrupted(String),
}

/// Why a timed receive failed.
#[derive(PartialEq, Eq, Clone, Debug)]
pub enum RecvTimeoutError {
    /// Nothing arrived in time.
    Timeout,
    /// Empty, and every sender is gone.
    Disconnected,
    /// See [`RecvError::Corrupted`].
    Corrupted(String),
}

impl<T> SendError<T> {
    /// The message that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            SendError::Disconnected(v) | SendError::Corrupted(v) => v,
        }
    }

    /// Whether the queue was found corrupted (rather than disconnected).
    pub fn is_corrupted(&self) -> bool {
        matches!(self, SendError::Corrupted(_))
    }
}

impl<T> TrySendError<T> {
    /// The message that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            TrySendError::Full(v) | TrySendError::Disconnected(v) | TrySendError::Corrupted(v) => v,
        }
    }

    /// Whether the queue was full.
    pub fn is_full(&self) -> bool {
        matches!(self, TrySendError::Full(_))
    }
}

impl<T> SendTimeoutError<T> {
    /// The message that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            SendTimeoutError::Timeout(v)
            | SendTimeoutError::Disconnected(v)
            | SendTimeoutError::Corrupted(v) => v,
        }
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Disconnected(_) => f.write_str("Disconnected(..)"),
            SendError::Corrupted(_) => f.write_str("Corrupted(..)"),
        }
    }
}

impl<T> fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("Full(..)"),
            TrySendError::Disconnected(_) => f.write_str("Disconnected(..)"),
            TrySendError::Corrupted(_) => f.write_str("Corrupted(..)"),
        }
    }
}

impl<T> fmt::Debug for SendTimeoutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendTimeoutError::Timeout(_) => f.write_str("Timeout(..)"),
            SendTimeoutError::Disconnected(_) => f.write_str("Disconnected(..)"),
            SendTimeoutError::Corrupted(_) => f.write_str("Corrupted(..)"),
        }
    }
}

const GONE_RX: &str = "every receiver has dropped its end or its process has died; the \
                       message is returned in the error";
const GONE_TX: &str = "the queue is empty and every sender has dropped its end or its process \
                       has died: stop receiving";

const SEND_CORRUPTED: &str = "the message was not sent and is returned in the error";

fn corrupted(f: &mut fmt::Formatter<'_>, what: &str) -> fmt::Result {
    write!(
        f,
        "the queue's shared memory is corrupted ({what}): a peer process wrote an impossible \
         value; recreate the queue"
    )
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Disconnected(_) => write!(f, "sending on a disconnected queue: {GONE_RX}"),
            SendError::Corrupted(_) => corrupted(f, SEND_CORRUPTED),
        }
    }
}

impl<T> fmt::Display for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str(
                "the queue is full: retry later, use a blocking send, or make the queue larger",
            ),
            TrySendError::Disconnected(_) => {
                write!(f, "sending on a disconnected queue: {GONE_RX}")
            }
            TrySendError::Corrupted(_) => corrupted(f, SEND_CORRUPTED),
        }
    }
}

impl<T> fmt::Display for SendTimeoutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendTimeoutError::Timeout(_) => f.write_str(
                "the queue stayed full until the timeout: the receivers are slow or stuck; the \
                 message is returned in the error",
            ),
            SendTimeoutError::Disconnected(_) => {
                write!(f, "sending on a disconnected queue: {GONE_RX}")
            }
            SendTimeoutError::Corrupted(_) => corrupted(f, SEND_CORRUPTED),
        }
    }
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Disconnected => write!(f, "receiving on a disconnected queue: {GONE_TX}"),
            RecvError::Corrupted(what) => corrupted(f, what),
        }
    }
}

impl fmt::Display for TryRecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryRecvError::Empty => f.write_str("the queue is empty: retry later or block"),
            TryRecvError::Disconnected => write!(f, "receiving on a disconnected queue: {GONE_TX}"),
            TryRecvError::Corrupted(what) => corrupted(f, what),
        }
    }
}

impl fmt::Display for RecvTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvTimeoutError::Timeout => {
                f.write_str("nothing arrived before the timeout: retry or wait longer")
            }
            RecvTimeoutError::Disconnected => {
                write!(f, "receiving on a disconnected queue: {GONE_TX}")
            }
            RecvTimeoutError::Corrupted(what) => corrupted(f, what),
        }
    }
}

impl<T> std::error::Error for SendError<T> {}
impl<T> std::error::Error for TrySendError<T> {}
impl<T> std::error::Error for SendTimeoutError<T> {}
impl std::error::Error for RecvError {}
impl std::error::Error for TryRecvError {}
impl std::error::Error for RecvTimeoutError {}

/// What went wrong in a [`Queue`](crate::Queue) or [`ByteQueue`](crate::ByteQueue) operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueError {
    /// `try_put`/`try_send`: no room right now, or another producer is in the middle of
    /// a large (chunked) message. Nothing was sent.
    Full,
    /// `try_get`: nothing to receive right now.
    Empty,
    /// The timeout passed. A send that gets it sent nothing; a receive that gets it in
    /// the middle of a large message keeps the part received for this process's next
    /// receive.
    Timeout,
    /// [`close`](crate::ByteQueue::close) was called: no more puts; gets drain what is left.
    Closed,
    /// No other live handle to the queue exists in any process, so the wait could never
    /// end.
    Disconnected,
    /// The message is larger than the queue's maximum; nothing was sent.
    MessageTooLarge {
        /// Encoded size of the message.
        size: usize,
        /// The queue's `max_message`.
        max: usize,
    },
    /// The value could not be encoded; nothing was sent.
    Encode(String),
    /// A received message could not be decoded as the queue's type.
    Decode(String),
    /// The queue's shared memory holds impossible values.
    Corrupted(String),
    /// This process is in another pid namespace than the process that created the queue
    /// (or one of the two namespaces cannot be learnt), so it may not use the queue:
    /// crash recovery judges peers by their pids, which mean nothing across pid
    /// namespaces. Nothing was sent or received. See the module docs of
    /// [`bytes`](crate::queue::bytes), "Pid namespaces".
    ForeignPidNamespace,
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Full => f.write_str("the queue is full: retry, or use a blocking put"),
            QueueError::Empty => f.write_str("the queue is empty: retry, or use a blocking get"),
            QueueError::Timeout => {
                f.write_str("the queue operation timed out: retry or wait longer")
            }
            QueueError::Closed => {
                f.write_str("the queue was closed: no more messages can be put, and none are left")
            }
            QueueError::Disconnected => f.write_str(
                "no other process or thread holds this queue any more, so this wait could never \
                 end",
            ),
            QueueError::MessageTooLarge { size, max } => write!(
                f,
                "message of {size} bytes is larger than this queue's maximum of {max}: raise it \
                 with `Queue::builder().max_message(..)`, or send smaller pieces; nothing was sent"
            ),
            QueueError::Encode(e) => {
                write!(f, "could not encode the message ({e}); nothing was sent")
            }
            QueueError::Decode(e) => write!(
                f,
                "could not decode a received message ({e}): every process must use the same \
                 message type and build"
            ),
            QueueError::Corrupted(what) => write!(
                f,
                "the queue's shared memory is corrupted ({what}): a peer wrote an impossible \
                 value; recreate the queue"
            ),
            QueueError::ForeignPidNamespace => {
                f.write_str(&super::peers::foreign_message("queue"))?;
                f.write_str("; nothing was sent or received")
            }
        }
    }
}

impl std::error::Error for QueueError {}

impl From<RecvError> for TryRecvError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected => TryRecvError::Disconnected,
            RecvError::Corrupted(w) => TryRecvError::Corrupted(w),
        }
    }
}

impl From<RecvError> for RecvTimeoutError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected => RecvTimeoutError::Disconnected,
            RecvError::Corrupted(w) => RecvTimeoutError::Corrupted(w),
        }
    }
}
