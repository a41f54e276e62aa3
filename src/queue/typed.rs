//! [`Queue<T>`]: Python's `multiprocessing.Queue` for any serde type.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::bytes::{ByteQueue, QueueBuilder, QueueError, Role, full_not_timeout};
use crate::error::Result;
use crate::sys::Deadline;

mod flat;
mod prim;

/// Values of at most this many bytes in memory are first encoded on the stack.
const SMALL: usize = 64;

/// A multi-producer multi-consumer queue of any `Serialize + DeserializeOwned` values, of
/// any size, shared between processes: Python's `multiprocessing.Queue`.
///
/// Values are encoded with postcard straight into the shared ring (no intermediate buffer
/// for messages up to a quarter of the ring; larger ones are chunked) and decoded straight
/// out of it. `Vec<u8>`, `String`, `Box<[u8]>`, `Box<str>`, `Vec<i8>`, `Vec<f32>` and
/// `Vec<f64>` take a fast path: their postcard bytes (a length, then the elements' memory)
/// are copied as whole slices instead of element by element, so `Queue<Vec<u8>>` moves
/// large messages faster than a socket. (Inside other types, e.g. a struct field, serde
/// still goes element by element; wrap such a field in `serde_bytes` if it is large.)
/// `u64`, `usize`, `u32`, `i64` and `i32` are written as postcard's varint straight into
/// the ring and read back without serde.
/// [`get_into`](Queue::get_into) reuses the receiver's buffer. A message must be read as
/// the type it was sent as; a reader of another type gets `Decode` (or, where postcard's
/// bytes happen to fit both types, that type's reading of them).
///
/// Clone the handle for more producers and consumers; a forked child shares it, and a
/// child started by [`Process::spawn`](crate::Process::spawn) gets it in its argument.
///
/// # When a queue is disconnected
///
/// A `get` on an empty queue returns [`QueueError::Disconnected`] once no *other* live
/// handle that could send exists, and a `put` on a full one once no other live handle that
/// could receive exists. A handle held by a process that died (even by `SIGKILL`) stops
/// counting within about 20 ms; a process that `exec`s another program holds none.
///
/// A `Queue` handle can do both, exactly like Python's, so **every `Queue` handle counts as
/// a possible sender and a possible receiver**. A parent that keeps its own `q` after
/// forking producers and consumers keeps the queue connected: consumers wait for it
/// rather than learning that the producers died. When that matters, give each process a
/// handle with a role: [`Queue::sender`] / [`Queue::receiver`] (or [`Queue::split`]).
/// Receivers count only handles that can send, so a consumer learns that every producer is
/// gone even while other processes, this one included, keep receive-only handles.
///
/// ```
/// use procshare::{Queue, QueueError};
///
/// let (tx, rx) = Queue::<String>::new()?.split()?;
/// let producer = procshare::Process::fork(move || {
///     tx.put(&"hello".to_string()).unwrap();
///     // returns, and exits: its sender is gone
/// })?;
/// assert_eq!(rx.get()?, "hello");
/// producer.join()?;
/// // This process holds only a receiver (the `tx` moved into the child's closure was
/// // dropped here when `fork` returned), so no sender is left anywhere:
/// assert_eq!(rx.get(), Err(QueueError::Disconnected));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// ```
/// use procshare::Queue;
///
/// let q: Queue<(String, Vec<u32>)> = Queue::new()?;
/// let child = procshare::Process::fork({
///     let q = q.clone();
///     move || {
///         for i in 0..3 {
///             q.put(&(format!("job {i}"), vec![i; 3])).unwrap();
///         }
///     }
/// })?;
/// for i in 0..3 {
///     assert_eq!(q.get()?, (format!("job {i}"), vec![i; 3]));
/// }
/// child.join()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Queue<T> {
    bytes: ByteQueue,
    _type: PhantomData<fn(T) -> T>,
}

impl Queue<()> {
    /// Settings for a new queue (ring size, message limit); finish with
    /// [`build`](QueueBuilder::build), which picks the message type.
    ///
    /// ```
    /// let q: procshare::Queue<String> = procshare::Queue::builder().capacity(1 << 16).build()?;
    /// # Ok::<(), procshare::Error>(())
    /// ```
    pub fn builder() -> QueueBuilder {
        ByteQueue::builder()
    }
}

impl<T: Serialize + DeserializeOwned + 'static> Queue<T> {
    /// A queue with a 1 MiB ring and a 64 MiB message limit.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    pub fn new() -> Result<Queue<T>> {
        ByteQueue::builder().build()
    }

    pub(crate) fn from_bytes(bytes: ByteQueue) -> Queue<T> {
        Queue {
            bytes,
            _type: PhantomData,
        }
    }

    fn put_until(&self, value: &T, deadline: Deadline) -> Result<(), QueueError> {
        if let Some(n) = prim::view(value) {
            // Integers: postcard's varint, written straight into the ring.
            return self.bytes.send_encoded(
                prim::len(n),
                |buf| {
                    prim::write(n, buf);
                    Ok(())
                },
                deadline,
            );
        }
        if let Some(flat) = flat::view(value) {
            // Byte vectors, strings, float vectors: postcard's bytes, copied as slices.
            return self
                .bytes
                .send_parts(&[&flat.prefix(), flat.payload()], deadline);
        }
        if size_of::<T>() <= SMALL {
            // Small values (numbers, tuples of them, short enums) encode once, onto the
            // stack, instead of a sizing pass and a writing pass; a value that turns out
            // larger (it owns heap data) takes the general path below.
            let mut small = [0u8; SMALL];
            match postcard::to_slice(value, &mut small) {
                Ok(encoded) => return self.bytes.send_parts(&[encoded], deadline),
                Err(postcard::Error::SerializeBufferFull) => {}
                Err(e) => return Err(QueueError::Encode(e.to_string())),
            }
        }
        let size = postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
            .map_err(|e| QueueError::Encode(e.to_string()))?;
        self.bytes.send_encoded(
            size,
            |buf| {
                postcard::to_slice(value, buf)
                    .map(|_| ())
                    .map_err(|e| QueueError::Encode(e.to_string()))
            },
            deadline,
        )
    }

    /// Puts a value, waiting for room.
    ///
    /// # Errors
    ///
    /// `MessageTooLarge`, `Encode`, `Closed`, `Disconnected` or `Corrupted`; the value is
    /// untouched (it is only borrowed) and nothing partial is ever delivered. If the
    /// value's `Serialize` impl panics, nothing is sent and the queue stays usable.
    pub fn put(&self, value: &T) -> Result<(), QueueError> {
        self.put_until(value, Deadline::NEVER)
    }

    /// Puts a value, waiting at most `timeout` for room.
    ///
    /// # Errors
    ///
    /// As for [`put`](Queue::put), plus `Timeout`: nothing was sent (see
    /// [`ByteQueue::send_timeout`]).
    pub fn put_timeout(&self, value: &T, timeout: Duration) -> Result<(), QueueError> {
        self.put_until(value, Deadline::after(timeout))
    }

    /// Puts a value if there is room now. Returns at once.
    ///
    /// # Errors
    ///
    /// As for [`put`](Queue::put), plus `Full` (see [`ByteQueue::try_send`]).
    pub fn try_put(&self, value: &T) -> Result<(), QueueError> {
        self.put_until(value, Deadline::after(Duration::ZERO))
            .map_err(full_not_timeout)
    }

    fn decode(bytes: &[u8]) -> Result<T, QueueError> {
        if let Some(value) = prim::decode(bytes) {
            return Ok(value);
        }
        if flat::is_flat::<T>() {
            return flat::decode(bytes).map_err(decode_error);
        }
        match postcard::take_from_bytes(bytes) {
            Ok((value, [])) => Ok(value),
            Ok((_, rest)) => Err(leftover(rest.len())),
            Err(e) => Err(decode_error(e)),
        }
    }

    /// Decodes into `place`, reusing what it owns (a `Vec`'s or `String`'s buffer).
    fn decode_into(bytes: &[u8], place: &mut T) -> Result<(), QueueError> {
        if let Some(value) = prim::decode(bytes) {
            *place = value;
            return Ok(());
        }
        if flat::is_flat::<T>() {
            return flat::decode_into(bytes, place).map_err(decode_error);
        }
        let mut de = postcard::Deserializer::from_bytes(bytes);
        // `deserialize_in_place` is serde's (hidden, stable) hook for exactly this: a
        // `Vec` or `String` field refills its buffer instead of allocating a new one.
        T::deserialize_in_place(&mut de, place).map_err(decode_error)?;
        match de.finalize() {
            Ok([]) => Ok(()),
            Ok(rest) => Err(leftover(rest.len())),
            Err(e) => Err(decode_error(e)),
        }
    }

    /// Takes the next value, waiting for one.
    ///
    /// # Errors
    ///
    /// `Closed` (closed and drained), `Disconnected`, `Decode` or `Corrupted`.
    pub fn get(&self) -> Result<T, QueueError> {
        self.bytes.recv_with(Self::decode)?
    }

    /// Takes the next value into `place`, reusing the memory it owns: a `Vec<u8>`,
    /// `String`, `Vec<f64>` (any `Vec`, through serde's in-place deserialization) is
    /// refilled in its own buffer, so a loop of `get_into` allocates nothing once the
    /// buffer is large enough. (A `#[derive(Deserialize)]` struct reuses its fields'
    /// buffers only when serde's `deserialize_in_place` feature is enabled; otherwise it
    /// is decoded as by `get` and assigned.)
    ///
    /// ```
    /// let q = procshare::Queue::<Vec<u8>>::new()?;
    /// let _peer = q.clone();
    /// q.put(&vec![1; 1000])?;
    /// q.put(&vec![2; 10])?;
    /// let mut buf = Vec::new();
    /// q.get_into(&mut buf)?;
    /// assert_eq!(buf, vec![1; 1000]);
    /// q.get_into(&mut buf)?; // the same allocation, refilled
    /// assert_eq!(buf, vec![2; 10]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`get`](Queue::get). After a `Decode` error the message is consumed and
    /// `place` holds some valid value of `T` (its old value, or partly overwritten).
    pub fn get_into(&self, place: &mut T) -> Result<(), QueueError> {
        self.bytes.recv_with(|b| Self::decode_into(b, place))?
    }

    /// [`get_into`](Queue::get_into), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As for [`get_timeout`](Queue::get_timeout).
    pub fn get_into_timeout(&self, place: &mut T, timeout: Duration) -> Result<(), QueueError> {
        self.bytes
            .recv_with_timeout(timeout, |b| Self::decode_into(b, place))?
    }

    /// [`get_into`](Queue::get_into) if a value is ready now. Returns at once.
    ///
    /// # Errors
    ///
    /// As for [`try_get`](Queue::try_get).
    pub fn try_get_into(&self, place: &mut T) -> Result<(), QueueError> {
        self.bytes.try_recv_with(|b| Self::decode_into(b, place))?
    }

    /// Takes the next value, waiting at most `timeout`. A large value half received when
    /// time runs out is kept by this process for its next `get`; meanwhile the other
    /// receivers wait behind it as behind a slow reader, and when this process drops its
    /// last handle the value is finished and put back into the queue (lost only if the
    /// process is killed or exits without dropping its handles; see
    /// [`ByteQueue::recv_with_timeout`]).
    ///
    /// # Errors
    ///
    /// As for [`get`](Queue::get), plus `Timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, QueueError> {
        self.bytes.recv_with_timeout(timeout, Self::decode)?
    }

    /// Takes the next value if one is ready. Returns at once.
    ///
    /// # Errors
    ///
    /// As for [`get`](Queue::get), plus `Empty`.
    pub fn try_get(&self) -> Result<T, QueueError> {
        self.bytes.try_recv_with(Self::decode)?
    }

    /// Closes the queue for putting, in every process; getters drain it, then get `Closed`.
    pub fn close(&self) {
        self.bytes.close();
    }

    /// Whether the queue was closed.
    pub fn is_closed(&self) -> bool {
        self.bytes.is_closed()
    }

    /// Values waiting (a snapshot).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether no value is waiting (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The byte queue underneath, for the zero-copy loan API.
    pub fn as_bytes(&self) -> &ByteQueue {
        &self.bytes
    }

    fn with_role(&self, role: Role) -> Result<Queue<T>> {
        Ok(Queue::from_bytes(self.bytes.with_role(role)?))
    }

    /// A send-only handle to this queue. Receivers count it, and only handles that can
    /// send, when deciding whether the queue is disconnected (see [`Queue`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) if more processes hold
    /// send-only handles than the queue can count.
    pub fn sender(&self) -> Result<QueueSender<T>> {
        Ok(QueueSender {
            queue: self.with_role(Role::Send)?,
        })
    }

    /// A receive-only handle to this queue. Senders count it, and only handles that can
    /// receive, when deciding whether the queue is disconnected (see [`Queue`]).
    ///
    /// # Errors
    ///
    /// As for [`sender`](Queue::sender).
    pub fn receiver(&self) -> Result<QueueReceiver<T>> {
        Ok(QueueReceiver {
            queue: self.with_role(Role::Recv)?,
        })
    }

    /// Splits this two-way handle into a send-only and a receive-only one.
    ///
    /// ```
    /// let (tx, rx) = procshare::Queue::<u32>::new()?.split()?;
    /// tx.put(&7)?;
    /// drop(tx); // the last handle that could send
    /// assert_eq!(rx.get()?, 7);
    /// assert_eq!(rx.get(), Err(procshare::QueueError::Disconnected));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`sender`](Queue::sender).
    pub fn split(self) -> Result<(QueueSender<T>, QueueReceiver<T>)> {
        Ok((self.sender()?, self.receiver()?))
    }
}

/// The sending end of a [`Queue`], from [`Queue::sender`] or [`Queue::split`]: `put`
/// only. Clone it for more producers; a forked child shares it.
pub struct QueueSender<T> {
    queue: Queue<T>,
}

impl<T: Serialize + DeserializeOwned + 'static> QueueSender<T> {
    /// As [`Queue::put`].
    ///
    /// # Errors
    ///
    /// As for [`Queue::put`]; `Disconnected` once no live handle can receive.
    pub fn put(&self, value: &T) -> Result<(), QueueError> {
        self.queue.put(value)
    }

    /// As [`Queue::put_timeout`].
    ///
    /// # Errors
    ///
    /// As for [`Queue::put_timeout`].
    pub fn put_timeout(&self, value: &T, timeout: Duration) -> Result<(), QueueError> {
        self.queue.put_timeout(value, timeout)
    }

    /// As [`Queue::try_put`].
    ///
    /// # Errors
    ///
    /// As for [`Queue::try_put`].
    pub fn try_put(&self, value: &T) -> Result<(), QueueError> {
        self.queue.try_put(value)
    }

    /// As [`Queue::close`]: receivers drain what is queued, then get `Closed`.
    pub fn close(&self) {
        self.queue.close();
    }

    /// Whether the queue was closed.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Values waiting (a snapshot).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no value is waiting (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// The receiving end of a [`Queue`], from [`Queue::receiver`] or [`Queue::split`]: `get`
/// only. Clone it for more consumers; a forked child shares it.
pub struct QueueReceiver<T> {
    queue: Queue<T>,
}

impl<T: Serialize + DeserializeOwned + 'static> QueueReceiver<T> {
    /// As [`Queue::get`].
    ///
    /// # Errors
    ///
    /// As for [`Queue::get`]; `Disconnected` once the queue is empty and no live handle
    /// can send (receive-only handles, this process's included, do not count).
    pub fn get(&self) -> Result<T, QueueError> {
        self.queue.get()
    }

    /// As [`Queue::get_timeout`].
    ///
    /// # Errors
    ///
    /// As for [`Queue::get_timeout`].
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, QueueError> {
        self.queue.get_timeout(timeout)
    }

    /// As [`Queue::get_into`]: refills `place`, reusing its buffers.
    ///
    /// # Errors
    ///
    /// As for [`Queue::get_into`].
    pub fn get_into(&self, place: &mut T) -> Result<(), QueueError> {
        self.queue.get_into(place)
    }

    /// As [`Queue::get_into_timeout`].
    ///
    /// # Errors
    ///
    /// As for [`Queue::get_into_timeout`].
    pub fn get_into_timeout(&self, place: &mut T, timeout: Duration) -> Result<(), QueueError> {
        self.queue.get_into_timeout(place, timeout)
    }

    /// As [`Queue::try_get_into`].
    ///
    /// # Errors
    ///
    /// As for [`Queue::try_get_into`].
    pub fn try_get_into(&self, place: &mut T) -> Result<(), QueueError> {
        self.queue.try_get_into(place)
    }

    /// As [`Queue::try_get`].
    ///
    /// # Errors
    ///
    /// As for [`Queue::try_get`].
    pub fn try_get(&self) -> Result<T, QueueError> {
        self.queue.try_get()
    }

    /// Whether the queue was closed.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Values waiting (a snapshot).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no value is waiting (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

// ---- Handing a handle to a spawned child (`process::handles`) ------------------------

impl<T> Queue<T> {
    /// The byte queue underneath (any `T`).
    pub(crate) fn bytes(&self) -> &ByteQueue {
        &self.bytes
    }

    /// A typed handle on `bytes` (any `T`).
    pub(crate) fn wrap(bytes: ByteQueue) -> Queue<T> {
        Queue {
            bytes,
            _type: PhantomData,
        }
    }
}

impl<T> QueueSender<T> {
    pub(crate) fn bytes(&self) -> &ByteQueue {
        &self.queue.bytes
    }

    pub(crate) fn wrap(bytes: ByteQueue) -> QueueSender<T> {
        QueueSender {
            queue: Queue::wrap(bytes),
        }
    }
}

impl<T> QueueReceiver<T> {
    pub(crate) fn bytes(&self) -> &ByteQueue {
        &self.queue.bytes
    }

    pub(crate) fn wrap(bytes: ByteQueue) -> QueueReceiver<T> {
        QueueReceiver {
            queue: Queue::wrap(bytes),
        }
    }
}

macro_rules! role_handle_impls {
    ($($ty:ident),*) => {$(
        impl<T> Clone for $ty<T> {
            fn clone(&self) -> Self {
                $ty {
                    queue: self.queue.clone(),
                }
            }
        }

        impl<T> fmt::Debug for $ty<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($ty)).field(&self.queue.bytes).finish()
            }
        }
    )*};
}

role_handle_impls!(QueueSender, QueueReceiver);

fn decode_error(e: postcard::Error) -> QueueError {
    QueueError::Decode(e.to_string())
}

fn leftover(n: usize) -> QueueError {
    QueueError::Decode(format!(
        "{n} bytes were left over after the value: the message was sent as another type"
    ))
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            bytes: self.bytes.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Queue").field(&self.bytes).finish()
    }
}

// These need memfd-backed shared memory, which Miri cannot provide.
#[cfg(all(test, not(miri)))]
mod tests {
    use super::*;

    #[test]
    fn values_of_every_size_round_trip() {
        // Sizes on both sides of the single-record limit (a quarter of the ring) and far
        // beyond the ring itself, which need a concurrent consumer to drain the chunks.
        let sizes = [0usize, 1, 100, 16 * 1024, 64 * 1024, 1 << 20];
        let q: Queue<Vec<u8>> = Queue::builder().capacity(64 * 1024).build().unwrap();
        let make = |size: usize| -> Vec<u8> { (0..size).map(|i| (i % 251) as u8).collect() };
        let consumer = {
            let q = q.clone();
            std::thread::spawn(move || {
                for size in sizes {
                    assert_eq!(q.get().unwrap(), make(size), "size {size}");
                }
            })
        };
        for size in sizes {
            q.put(&make(size)).unwrap();
        }
        consumer.join().unwrap();
        assert!(q.is_empty());
    }

    #[test]
    fn a_reader_of_another_type_gets_a_decode_error() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug, Default)]
        struct Job {
            name: String,
            data: Vec<f64>,
        }
        let q: Queue<(Vec<u8>, u32)> = Queue::new().unwrap();
        let as_bytes: Queue<Vec<u8>> = Queue::from_bytes(q.as_bytes().clone());
        q.put(&(vec![1, 2, 3], 7)).unwrap();
        // postcard alone would return `[1, 2, 3]` and ignore the `u32`.
        assert!(matches!(as_bytes.get(), Err(QueueError::Decode(_))));
        // And the other way: the fast path's bytes read by a generic reader.
        as_bytes.put(&vec![9; 5]).unwrap();
        assert!(matches!(q.get(), Err(QueueError::Decode(_))));
        // get_into on a struct checks leftovers the same way.
        let jobs: Queue<Job> = Queue::from_bytes(q.as_bytes().clone());
        let mut job = Job::default();
        jobs.put(&Job {
            name: "a".into(),
            data: vec![1.5; 64],
        })
        .unwrap();
        jobs.get_into(&mut job).unwrap();
        jobs.put(&Job {
            name: "b".into(),
            data: vec![2.5; 8],
        })
        .unwrap();
        jobs.get_into(&mut job).unwrap();
        assert_eq!(job.data, vec![2.5; 8]);
        assert_eq!(job.name, "b");
        q.put(&(vec![], 1)).unwrap();
        assert!(matches!(
            jobs.get_into(&mut job),
            Err(QueueError::Decode(_))
        ));
    }

    #[test]
    fn too_large_is_refused_whole() {
        let q: Queue<Vec<u8>> = Queue::builder().max_message(1000).build().unwrap();
        // A second handle: a lone one would (rightly) be told `Disconnected`.
        let _peer = q.clone();
        let e = q.put(&vec![0; 2000]).unwrap_err();
        assert!(
            matches!(e, QueueError::MessageTooLarge { max: 1000, .. }),
            "{e}"
        );
        assert_eq!(q.try_get(), Err(QueueError::Empty));
        q.put(&vec![1; 10]).unwrap();
        assert_eq!(q.get().unwrap(), vec![1; 10]);
    }

    #[test]
    fn full_timeout_close() {
        let q: Queue<u64> = Queue::builder().capacity(4096).build().unwrap();
        let peer = q.clone(); // could receive, so a full queue is full, not disconnected
        let mut n = 0;
        while q.try_put(&n).is_ok() {
            n += 1;
        }
        assert_eq!(q.try_put(&0), Err(QueueError::Full));
        assert_eq!(
            q.put_timeout(&0, Duration::from_millis(20)),
            Err(QueueError::Timeout)
        );
        q.close();
        assert_eq!(q.put(&1), Err(QueueError::Closed));
        drop(peer);
        for i in 0..n {
            assert_eq!(q.get().unwrap(), i);
        }
        assert_eq!(q.get(), Err(QueueError::Closed));
    }

    #[test]
    fn lone_handle_is_disconnected_not_hung() {
        let q: Queue<u8> = Queue::new().unwrap();
        assert_eq!(q.get(), Err(QueueError::Disconnected));
        let other = q.clone();
        assert_eq!(
            q.get_timeout(Duration::from_millis(30)),
            Err(QueueError::Timeout)
        );
        drop(other);
        // Polling learns it too, not only blocking (the check runs at most every 20 ms).
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(q.try_get(), Err(QueueError::Disconnected));
    }

    #[test]
    fn threads_mpmc_exactly_once() {
        let q: Queue<(u32, u32)> = Queue::builder().capacity(8192).build().unwrap();
        let per = 5_000;
        let producers: Vec<_> = (0..2)
            .map(|p| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        q.put(&(p, i)).unwrap();
                    }
                })
            })
            .collect();
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Ok(m) = q.get_timeout(Duration::from_millis(500)) {
                        got.push(m);
                    }
                    got
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        let mut all: Vec<_> = consumers
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 2 * per as usize);
    }
}
