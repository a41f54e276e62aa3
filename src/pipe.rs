//! Python's `multiprocessing.Pipe`: a duplex connection between two processes over a
//! Unix socketpair.
//!
//! Each message travels as one frame: its length as 8 little-endian bytes, then that many
//! bytes of payload (postcard for [`Connection::send`], raw for
//! [`Connection::send_bytes`]). A frame is written with one `sendmsg` whenever the socket
//! buffer has room for it, and read with one `recv` for the header and one for the payload
//! (more only for payloads bigger than the socket buffer). Every length read from the peer
//! is checked against [`Connection::MAX_MESSAGE_LEN`] before anything is allocated for it.

use std::any::type_name;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::sys::{self, Deadline};

/// Bytes in a frame header: the payload length as a little-endian `u64`.
const HEADER: usize = 8;

/// How much buffer a receive grows by before any payload bytes have arrived; after that
/// the buffer at most doubles what has actually arrived, so a peer announcing a huge
/// message and then dying costs little memory.
const FIRST_CHUNK: usize = 64 * 1024;

/// Scratch buffers larger than this are freed after use rather than kept for the next
/// message, so one huge message does not pin its size in memory for the connection's life.
const KEEP_SCRATCH: usize = 16 * 1024 * 1024;

const CLOSED: &str = "the other end of the pipe was closed (its process exited or dropped it)";

/// Creates a duplex pipe: two connected [`Connection`]s, each able to send to and receive
/// from the other. Python's `multiprocessing.Pipe(duplex=True)`.
///
/// The pair is a Unix stream `socketpair`, close-on-exec. Both ends survive `fork`: create
/// the pipe, fork, and let the child use one end and the parent the other. Each process
/// should drop the end it does not use. A receiver only sees end of file (an
/// [`UnexpectedEof`](std::io::ErrorKind::UnexpectedEof) error, instead of blocking forever)
/// once *every* copy of the other end is closed, including the copy a fork left in the
/// receiver's own process. Moving the child's end into the closure given to
/// [`Process::fork`](crate::Process::fork) does this for the parent: the parent's copy is
/// dropped when `fork` returns.
///
/// An end is meant to be used by one process. Within that process it may be shared by
/// threads (see [`Connection`]), but two processes sending on copies of the same end can
/// interleave their frames.
///
/// # Errors
///
/// [`Error::Io`] if the sockets cannot be created (for example, too many open files).
///
/// # Example
///
/// The parent sends a few messages; a forked child counts them and replies.
///
/// ```
/// use procshare::pipe;
///
/// let (parent_end, child_end) = pipe()?;
/// // `move` hands `child_end` to the child; the parent's copy is dropped as fork returns.
/// let child = procshare::Process::fork(move || {
///     let mut count = 0u32;
///     while child_end.recv::<String>().unwrap() != "END" {
///         count += 1;
///     }
///     child_end.send(&count).unwrap();
///     count
/// })?;
/// for msg in ["hello", "hey", "hru?", "END"] {
///     parent_end.send(msg)?;
/// }
/// assert_eq!(parent_end.recv::<u32>()?, 3);
/// assert_eq!(child.join(), Ok(3));
/// // The child has exited and the parent holds no copy of its end: end of file.
/// assert!(parent_end.recv::<u32>().is_err());
/// # Ok::<(), procshare::Error>(())
/// ```
pub fn pipe() -> Result<(Connection, Connection)> {
    let (a, b) =
        sys::socketpair_stream().map_err(|e| Error::io("creating a pipe (socketpair)", e))?;
    Ok((Connection::new(a), Connection::new(b)))
}

/// One end of a [`pipe`]: Python's `multiprocessing.connection.Connection`.
///
/// Messages are any `serde` value ([`send`](Self::send)/[`recv`](Self::recv), encoded
/// with postcard) or raw bytes ([`send_bytes`](Self::send_bytes)/
/// [`recv_bytes`](Self::recv_bytes)); the two share one frame format, so bytes sent one way
/// can be received the other as long as they are valid postcard for the type asked for.
///
/// `Connection` is `Send` and `Sync`. Sends are serialised by a process-local mutex, as
/// are receives, so threads of one process sharing an end never interleave or split
/// frames; a send and a receive can proceed at the same time. The mutexes are ordinary
/// `std` ones: they do not coordinate *processes*, which is why each end belongs to one
/// process.
///
/// If a receive fails partway through a frame (an announced length above
/// [`MAX_MESSAGE_LEN`](Self::MAX_MESSAGE_LEN), or an I/O error in mid-message), the
/// boundaries of later messages are lost: every later receive fails with
/// [`Error::Corrupted`]. Likewise for a send that failed partway (other than because the
/// peer is gone). A message that fails to *decode* was read completely, so the next
/// receive is unaffected.
pub struct Connection {
    fd: OwnedFd,
    /// Held for a whole frame write; holds the encoding buffer reused by `send`.
    send: Mutex<Vec<u8>>,
    /// Held for a whole frame read; holds the payload buffer reused by `recv`.
    recv: Mutex<Vec<u8>>,
    send_broken: AtomicBool,
    recv_broken: AtomicBool,
}

impl Connection {
    /// The largest payload, in bytes, a message may have: 1 GiB. Sending more fails with
    /// [`Error::InvalidArgument`]; a frame header announcing more is taken as corruption
    /// ([`Error::Corrupted`]) and nothing is allocated for it. For bulk data, use a shared
    /// memory [`Segment`](crate::Segment) and send its description instead.
    pub const MAX_MESSAGE_LEN: usize = 1 << 30;

    pub(crate) fn new(fd: OwnedFd) -> Connection {
        Connection {
            fd,
            send: Mutex::new(Vec::new()),
            recv: Mutex::new(Vec::new()),
            send_broken: AtomicBool::new(false),
            recv_broken: AtomicBool::new(false),
        }
    }

    /// Sends `value`, encoded with postcard, as one message. Python's `Connection.send`.
    ///
    /// Blocks while the socket buffer is full (the peer is not receiving). The encoding
    /// buffer is kept between calls, so sending allocates nothing once warm.
    ///
    /// # Errors
    ///
    /// * [`Error::Io`] with [`BrokenPipe`](io::ErrorKind::BrokenPipe) if the other end was
    ///   closed (its process exited or dropped it); never `SIGPIPE`.
    /// * [`Error::InvalidArgument`] if `value` cannot be encoded (postcard needs sequence
    ///   lengths up front, for example) or encodes to more than
    ///   [`MAX_MESSAGE_LEN`](Self::MAX_MESSAGE_LEN) bytes.
    /// * [`Error::Corrupted`] if an earlier send on this end failed partway through.
    pub fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<()> {
        let mut buf = lock(&self.send);
        let result = self.encode_and_write(value, &mut buf);
        if buf.capacity() > KEEP_SCRATCH {
            *buf = Vec::new();
        }
        result
    }

    fn encode_and_write<T: Serialize + ?Sized>(&self, value: &T, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        buf.extend_from_slice(&[0; HEADER]);
        if let Err(e) = postcard::to_io(value, &mut *buf) {
            return Err(Error::InvalidArgument {
                what: format!(
                    "a {} could not be encoded with postcard to send on a pipe: {e}",
                    type_name::<T>()
                ),
            });
        }
        let len = buf.len() - HEADER;
        check_send_len(len)?;
        buf[..HEADER].copy_from_slice(&(len as u64).to_le_bytes());
        self.write_frame(&mut [IoSlice::new(buf)])
    }

    /// Sends the bytes of `buf` as one message. Python's `Connection.send_bytes`.
    ///
    /// The header and `buf` go out in one `sendmsg` without being copied together.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send); [`Error::InvalidArgument`] if `buf` is longer than
    /// [`MAX_MESSAGE_LEN`](Self::MAX_MESSAGE_LEN).
    pub fn send_bytes(&self, buf: &[u8]) -> Result<()> {
        check_send_len(buf.len())?;
        let header = (buf.len() as u64).to_le_bytes();
        let _guard = lock(&self.send);
        self.write_frame(&mut [IoSlice::new(&header), IoSlice::new(buf)])
    }

    /// Receives one message and decodes it as a `T`, blocking until one arrives.
    /// Python's `Connection.recv`.
    ///
    /// # Errors
    ///
    /// * [`Error::Io`] with [`UnexpectedEof`](io::ErrorKind::UnexpectedEof) if the other
    ///   end was closed (its process exited or dropped it), before or during the message.
    ///   Messages it sent before closing are still delivered first.
    /// * [`Error::Corrupted`] if the message is not a postcard-encoded `T` (the two ends
    ///   disagree on the type), or the frame is not one procshare could have sent.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<T> {
        self.recv_deadline(Deadline::NEVER)
    }

    /// Like [`recv`](Self::recv), but gives up with [`Error::Timeout`] if no message has
    /// started to arrive within `timeout`.
    ///
    /// The timeout covers the wait for a message, not its transfer: once its first bytes
    /// are there, the rest (which the sender is writing at that moment) is read to the end,
    /// so a timeout never leaves half a message consumed. It also does not cover waiting
    /// for another thread of this process that is receiving on the same end.
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv), plus [`Error::Timeout`].
    pub fn recv_timeout<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T> {
        self.recv_deadline(Deadline::after(timeout))
    }

    fn recv_deadline<T: DeserializeOwned>(&self, deadline: Deadline) -> Result<T> {
        let mut buf = lock(&self.recv);
        self.read_frame(&mut buf, deadline)?;
        let result = decode(&buf);
        if buf.capacity() > KEEP_SCRATCH {
            *buf = Vec::new();
        }
        result
    }

    /// Receives one message as raw bytes, blocking until one arrives. Python's
    /// `Connection.recv_bytes`.
    ///
    /// This allocates a new `Vec` for every message; a receive loop should prefer
    /// [`recv_bytes_into`](Self::recv_bytes_into).
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv), without the decoding error.
    pub fn recv_bytes(&self) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.recv_bytes_into(&mut buf)?;
        Ok(buf)
    }

    /// Receives one message into `buf`, replacing its contents, and returns the message's
    /// length (which is then `buf.len()`). Python's `Connection.recv_bytes_into`.
    ///
    /// `buf`'s capacity is reused: once it has held a message as large as the next one,
    /// receiving allocates nothing and touches no byte twice. On error `buf` is left
    /// empty.
    ///
    /// # Errors
    ///
    /// As [`recv_bytes`](Self::recv_bytes).
    pub fn recv_bytes_into(&self, buf: &mut Vec<u8>) -> Result<usize> {
        let _guard = lock(&self.recv);
        self.read_frame(buf, Deadline::NEVER)
    }

    /// Whether a message (or end of file, or an error) is ready to be received, waiting up
    /// to `timeout` for one: `None` waits as long as it takes, `Some(Duration::ZERO)` only
    /// checks. Python's `Connection.poll`.
    ///
    /// `true` means the next receive will not wait for the peer to *start* a message
    /// (it may return an error, such as end of file).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if `poll` itself fails.
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool> {
        if self.recv_broken.load(Ordering::Relaxed) {
            return Ok(true);
        }
        self.wait_readable(timeout.map_or(Deadline::NEVER, Deadline::after))
    }

    /// Closes this end. Python's `Connection.close`; the same as dropping it.
    ///
    /// Once every copy of this end (in every process that inherited it) is closed, the
    /// other end's receives report end of file and its sends fail with a broken pipe.
    pub fn close(self) {
        drop(self);
    }

    /// Waits until the socket is readable or `deadline` passes, riding out signals.
    fn wait_readable(&self, deadline: Deadline) -> Result<bool> {
        loop {
            match sys::poll_readable(self.fd.as_fd(), deadline.remaining()) {
                Ok(ready) => return Ok(ready),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if deadline.has_passed() {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(Error::io("polling a pipe", e)),
            }
        }
    }

    /// Writes a whole frame, however many `sendmsg` calls that takes. The caller holds the
    /// send lock.
    fn write_frame(&self, bufs: &mut [IoSlice<'_>]) -> Result<()> {
        if self.send_broken.load(Ordering::Relaxed) {
            return Err(Error::Corrupted {
                what: "an earlier send on this pipe end failed partway through a message, so \
                       message boundaries are lost; create a new pipe"
                    .into(),
            });
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut left = total;
        let mut bufs = bufs;
        while left > 0 {
            match sys::send_vectored(self.fd.as_fd(), bufs) {
                Ok(0) => {
                    self.send_broken.store(left < total, Ordering::Relaxed);
                    return Err(Error::io(
                        "sending on a pipe",
                        io::Error::new(io::ErrorKind::WriteZero, "the socket accepted no bytes"),
                    ));
                }
                Ok(n) => {
                    left -= n;
                    IoSlice::advance_slices(&mut bufs, n);
                }
                Err(e) if is_peer_gone(&e) => {
                    return Err(Error::io(
                        "sending on a pipe",
                        io::Error::new(io::ErrorKind::BrokenPipe, CLOSED),
                    ));
                }
                Err(e) => {
                    self.send_broken.store(left < total, Ordering::Relaxed);
                    return Err(Error::io("sending on a pipe", e));
                }
            }
        }
        Ok(())
    }

    /// Reads one whole frame's payload into `buf` (replacing its contents) and returns its
    /// length, first waiting up to `deadline` for the frame to start. The caller holds the
    /// receive lock.
    fn read_frame(&self, buf: &mut Vec<u8>, deadline: Deadline) -> Result<usize> {
        buf.clear();
        if self.recv_broken.load(Ordering::Relaxed) {
            return Err(Error::Corrupted {
                what: "an earlier receive on this pipe end stopped partway through a message, \
                       so message boundaries are lost; create a new pipe"
                    .into(),
            });
        }
        if deadline != Deadline::NEVER && !self.wait_readable(deadline)? {
            return Err(Error::Timeout);
        }
        let result = self.read_payload(buf);
        if result.is_err() {
            buf.clear();
        }
        result
    }

    fn read_payload(&self, buf: &mut Vec<u8>) -> Result<usize> {
        let fd = self.fd.as_fd();
        let mut header = [0u8; HEADER];
        let mut got = 0;
        while got < HEADER {
            match sys::recv(fd, &mut header[got..], true) {
                Ok(0) => return Err(closed_while_receiving(got, None)),
                Ok(n) => got += n,
                Err(e) => return Err(self.recv_failed(e, got, None)),
            }
        }
        let announced = u64::from_le_bytes(header);
        let len = match usize::try_from(announced) {
            Ok(len) if len <= Self::MAX_MESSAGE_LEN => len,
            _ => {
                self.recv_broken.store(true, Ordering::Relaxed);
                return Err(Error::Corrupted {
                    what: format!(
                        "a message header on a pipe announced {announced} bytes, more than \
                         the {} a procshare Connection ever sends: the peer is not a \
                         procshare Connection, or the stream was corrupted",
                        Self::MAX_MESSAGE_LEN
                    ),
                });
            }
        };
        // Grow the buffer no faster than the data arrives (see FIRST_CHUNK); a warm buffer
        // already has room for the whole payload and takes it in one recv.
        while buf.len() < len {
            let room = (buf.capacity() - buf.len()).max(buf.len()).max(FIRST_CHUNK);
            let want = (len - buf.len()).min(room);
            match sys::recv_append(fd, buf, want, true) {
                Ok(0) => return Err(closed_while_receiving(HEADER + buf.len(), Some(len))),
                Ok(_) => {}
                Err(e) => return Err(self.recv_failed(e, HEADER + buf.len(), Some(len))),
            }
        }
        Ok(len)
    }

    /// Maps a failed recv; `got` bytes of the frame had arrived, of `HEADER + len`.
    fn recv_failed(&self, e: io::Error, got: usize, len: Option<usize>) -> Error {
        if is_peer_gone(&e) {
            return closed_while_receiving(got, len);
        }
        if got > 0 {
            self.recv_broken.store(true, Ordering::Relaxed);
        }
        Error::io("receiving from a pipe", e)
    }

    /// Writes `bytes` to the socket as they are, unframed: lets tests play a broken peer.
    #[cfg(all(test, not(miri)))]
    fn send_raw(&self, bytes: &[u8]) -> Result<()> {
        self.write_frame(&mut [IoSlice::new(bytes)])
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning cannot leave a half-written or half-read frame behind: a panic can only
    // come from user `Serialize`/`Deserialize` code, which runs before a frame is written
    // or after it was read whole. Partial transfers are tracked by the `*_broken` flags.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn check_send_len(len: usize) -> Result<()> {
    if len > Connection::MAX_MESSAGE_LEN {
        return Err(Error::InvalidArgument {
            what: format!(
                "a {len}-byte message is larger than a pipe carries ({} bytes): put bulk data \
                 in a shared memory Segment and send its description instead",
                Connection::MAX_MESSAGE_LEN
            ),
        });
    }
    Ok(())
}

fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// The error for end of file after `got` bytes of a frame whose payload length is `len`
/// (if its header had arrived).
fn closed_while_receiving(got: usize, len: Option<usize>) -> Error {
    let msg = match (got, len) {
        (0, _) => CLOSED.to_owned(),
        (got, Some(len)) => format!(
            "{CLOSED}, partway through a message ({got} of {} bytes received)",
            HEADER + len
        ),
        (got, None) => {
            format!("{CLOSED}, partway through a message header ({got} of {HEADER} bytes received)")
        }
    };
    Error::io(
        "receiving from a pipe",
        io::Error::new(io::ErrorKind::UnexpectedEof, msg),
    )
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(Error::Corrupted {
            what: format!(
                "a {}-byte message received on a pipe decoded as a {} with {} bytes left over: \
                 the sender sent a different type",
                bytes.len(),
                type_name::<T>(),
                rest.len()
            ),
        }),
        Err(e) => Err(Error::Corrupted {
            what: format!(
                "a {}-byte message received on a pipe is not a postcard-encoded {} ({e}): \
                 the sender sent a different type",
                bytes.len(),
                type_name::<T>()
            ),
        }),
    }
}

impl AsFd for Connection {
    /// The socket. Useful to wait on several connections at once with `poll`/`epoll`;
    /// reading or writing it directly breaks the framing.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

// Sockets are foreign calls Miri cannot run.
#[cfg(all(test, not(miri)))]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Instant;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Job {
        id: u64,
        name: String,
        weights: Vec<f64>,
        tag: Option<char>,
    }

    fn assert_closed(e: &Error, kind: io::ErrorKind) {
        match e {
            Error::Io { source, .. } => {
                assert_eq!(source.kind(), kind, "{e}");
                assert!(e.to_string().contains(CLOSED), "{e}");
            }
            other => panic!("expected an Io error of kind {kind:?}, got {other:?}"),
        }
    }

    #[test]
    fn struct_round_trip_both_ways() {
        let (a, b) = pipe().unwrap();
        let job = Job {
            id: 7,
            name: "render".into(),
            weights: vec![0.5, 1.5],
            tag: Some('λ'),
        };
        a.send(&job).unwrap();
        assert_eq!(b.recv::<Job>().unwrap(), job);
        b.send("reply").unwrap();
        b.send(&(1u8, -2i64)).unwrap();
        assert_eq!(a.recv::<String>().unwrap(), "reply");
        assert_eq!(a.recv::<(u8, i64)>().unwrap(), (1, -2));
    }

    #[test]
    fn bytes_and_empty_messages() {
        let (a, b) = pipe().unwrap();
        a.send_bytes(b"").unwrap();
        a.send_bytes(b"abc").unwrap();
        a.send(&()).unwrap(); // encodes to zero bytes
        a.send_bytes(&[]).unwrap();
        assert_eq!(b.recv_bytes().unwrap(), b"");
        assert_eq!(b.recv_bytes().unwrap(), b"abc");
        b.recv::<()>().unwrap();
        let mut buf = b"old contents".to_vec();
        assert_eq!(b.recv_bytes_into(&mut buf).unwrap(), 0);
        assert!(buf.is_empty());
        // Both calls use one framing: postcard bytes sent raw decode fine.
        a.send_bytes(&postcard::to_stdvec(&42u32).unwrap()).unwrap();
        assert_eq!(b.recv::<u32>().unwrap(), 42);
    }

    #[test]
    fn large_message_round_trip() {
        let (a, b) = pipe().unwrap();
        let big: Vec<u8> = (0..4 << 20)
            .map(|i: u32| (i * 7 + i / 4096) as u8)
            .collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                a.send_bytes(&big).unwrap();
                a.send(&big).unwrap();
            });
            assert_eq!(b.recv_bytes().unwrap(), big);
            assert_eq!(b.recv::<Vec<u8>>().unwrap(), big);
        });
    }

    #[test]
    fn recv_bytes_into_reuses_capacity() {
        let (a, b) = pipe().unwrap();
        let mut buf = Vec::new();
        a.send_bytes(&[1; 100_000]).unwrap();
        assert_eq!(b.recv_bytes_into(&mut buf).unwrap(), 100_000);
        assert!(buf.iter().all(|&x| x == 1));
        let (ptr, cap) = (buf.as_ptr(), buf.capacity());
        for n in [10usize, 100_000, 0, 50_000] {
            a.send_bytes(&vec![n as u8; n]).unwrap();
            assert_eq!(b.recv_bytes_into(&mut buf).unwrap(), n);
            assert_eq!(buf.len(), n);
            assert!(buf.iter().all(|&x| x == n as u8));
            assert_eq!((buf.as_ptr(), buf.capacity()), (ptr, cap), "reallocated");
        }
    }

    #[test]
    fn poll_waits_and_reports() {
        let (a, b) = pipe().unwrap();
        assert!(!b.poll(Some(Duration::ZERO)).unwrap());
        let t0 = Instant::now();
        assert!(!b.poll(Some(Duration::from_millis(50))).unwrap());
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(50),
            "returned early: {took:?}"
        );
        assert!(took < Duration::from_secs(2), "returned late: {took:?}");
        a.send(&1u8).unwrap();
        assert!(b.poll(Some(Duration::ZERO)).unwrap());
        assert!(b.poll(None).unwrap());
        assert!(!a.poll(Some(Duration::ZERO)).unwrap(), "one direction only");
        b.recv::<u8>().unwrap();
        assert!(!b.poll(Some(Duration::ZERO)).unwrap());
        // A wait is ended by a message arriving from another thread.
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                a.send(&2u8).unwrap();
            });
            assert!(b.poll(Some(Duration::from_secs(10))).unwrap());
        });
        b.recv::<u8>().unwrap();
        drop(a);
        assert!(
            b.poll(Some(Duration::ZERO)).unwrap(),
            "end of file is ready"
        );
    }

    #[test]
    fn recv_timeout_times_out_then_receives() {
        let (a, b) = pipe().unwrap();
        let t0 = Instant::now();
        let r = b.recv_timeout::<u32>(Duration::from_millis(50));
        assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
        assert!(t0.elapsed() >= Duration::from_millis(50));
        a.send(&9u32).unwrap();
        assert_eq!(b.recv_timeout::<u32>(Duration::from_secs(5)).unwrap(), 9);
        a.send(&10u32).unwrap();
        assert_eq!(b.recv_timeout::<u32>(Duration::ZERO).unwrap(), 10);
    }

    #[test]
    fn closed_peer_gives_a_clear_error() {
        let (a, b) = pipe().unwrap();
        a.send("last words").unwrap();
        a.close();
        // What was sent before closing still arrives; then end of file, every time.
        assert_eq!(b.recv::<String>().unwrap(), "last words");
        for _ in 0..2 {
            assert_closed(
                &b.recv::<String>().unwrap_err(),
                io::ErrorKind::UnexpectedEof,
            );
        }
        assert_closed(
            &b.recv_timeout::<u8>(Duration::from_secs(5)).unwrap_err(),
            io::ErrorKind::UnexpectedEof,
        );
        assert_closed(&b.send(&1u8).unwrap_err(), io::ErrorKind::BrokenPipe);
        assert_closed(&b.send_bytes(b"x").unwrap_err(), io::ErrorKind::BrokenPipe);

        // A peer that closes with messages it never read: the kernel reports a reset,
        // which means the same thing.
        let (a, b) = pipe().unwrap();
        b.send(&1u8).unwrap();
        drop(a);
        assert_closed(&b.recv::<u8>().unwrap_err(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn peer_closing_mid_message_is_reported() {
        let (a, b) = pipe().unwrap();
        let mut frame = 100u64.to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 10]);
        a.send_raw(&frame).unwrap();
        drop(a);
        let e = b.recv_bytes().unwrap_err();
        assert_closed(&e, io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("18 of 108 bytes"), "{e}");

        let (a, b) = pipe().unwrap();
        a.send_raw(&[1, 0, 0]).unwrap();
        drop(a);
        let e = b.recv::<u8>().unwrap_err();
        assert!(e.to_string().contains("3 of 8 bytes"), "{e}");
    }

    #[test]
    fn absurd_length_is_corruption_not_allocation() {
        for announced in [u64::MAX, Connection::MAX_MESSAGE_LEN as u64 + 1] {
            let (a, b) = pipe().unwrap();
            a.send_raw(&announced.to_le_bytes()).unwrap();
            a.send_bytes(b"next").unwrap();
            let mut buf = Vec::new();
            match b.recv_bytes_into(&mut buf) {
                Err(Error::Corrupted { what }) => {
                    assert!(what.contains(&announced.to_string()), "{what}")
                }
                other => panic!("expected Corrupted, got {other:?}"),
            }
            assert_eq!(buf.capacity(), 0, "allocated for a bogus length");
            // Boundaries are lost: later receives fail fast instead of misreading.
            assert!(b.poll(Some(Duration::ZERO)).unwrap());
            assert!(matches!(b.recv_bytes(), Err(Error::Corrupted { .. })));
        }
    }

    #[test]
    fn a_peer_dying_after_a_huge_header_costs_little_memory() {
        let (a, b) = pipe().unwrap();
        a.send_raw(&(Connection::MAX_MESSAGE_LEN as u64).to_le_bytes())
            .unwrap();
        a.send_raw(&[5; 1000]).unwrap();
        drop(a);
        let mut buf = Vec::new();
        assert_closed(
            &b.recv_bytes_into(&mut buf).unwrap_err(),
            io::ErrorKind::UnexpectedEof,
        );
        assert!(buf.capacity() <= 2 * FIRST_CHUNK, "{}", buf.capacity());
    }

    #[test]
    fn wrong_type_is_corruption_and_stream_stays_usable() {
        let (a, b) = pipe().unwrap();
        a.send_bytes(&[0xFF, 0xFF, 0xFF]).unwrap();
        a.send(&(1u8, 2u8)).unwrap();
        a.send("fine").unwrap();
        match b.recv::<String>() {
            Err(Error::Corrupted { what }) => assert!(what.contains("String"), "{what}"),
            other => panic!("expected Corrupted, got {other:?}"),
        }
        match b.recv::<u8>() {
            Err(Error::Corrupted { what }) => assert!(what.contains("left over"), "{what}"),
            other => panic!("expected Corrupted, got {other:?}"),
        }
        assert_eq!(b.recv::<String>().unwrap(), "fine");
    }

    #[test]
    fn unencodable_and_oversized_messages_are_refused() {
        struct NoLength;
        impl Serialize for NoLength {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                s.serialize_seq(None)?.end()
            }
        }
        let (a, b) = pipe().unwrap();
        assert!(matches!(
            a.send(&NoLength),
            Err(Error::InvalidArgument { .. })
        ));
        // Nothing was written: the connection carries on.
        a.send(&3u8).unwrap();
        assert_eq!(b.recv::<u8>().unwrap(), 3);
        // A real 1 GiB buffer is too costly for a unit test: check the limit itself.
        assert!(matches!(
            check_send_len(Connection::MAX_MESSAGE_LEN + 1),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(check_send_len(Connection::MAX_MESSAGE_LEN).is_ok());
    }

    #[test]
    fn concurrent_senders_never_interleave_frames() {
        const EACH: usize = 2_000;
        let (a, b) = pipe().unwrap();
        std::thread::scope(|s| {
            for t in 0..3u8 {
                let a = &a;
                s.spawn(move || {
                    for i in 0..EACH {
                        // Sizes vary so that frames straddle socket buffer boundaries.
                        let msg = (t, i, vec![t; (i * 37 + t as usize * 1000) % 20_000]);
                        if i % 2 == 0 {
                            a.send(&msg).unwrap();
                        } else {
                            a.send_bytes(&postcard::to_stdvec(&msg).unwrap()).unwrap();
                        }
                    }
                });
            }
            let mut next = [0usize; 3];
            for _ in 0..3 * EACH {
                let (t, i, bytes) = b.recv::<(u8, usize, Vec<u8>)>().unwrap();
                assert_eq!(i, next[t as usize], "sender {t}'s messages out of order");
                next[t as usize] += 1;
                assert!(bytes.iter().all(|&x| x == t), "interleaved frame");
            }
        });
        assert!(!b.poll(Some(Duration::ZERO)).unwrap());
    }

    #[test]
    fn connection_is_send_sync_and_debug() {
        fn check<T: Send + Sync + fmt::Debug + AsFd>() {}
        check::<Connection>();
        let (a, _b) = pipe().unwrap();
        let s = format!("{a:?}");
        assert!(s.starts_with("Connection { fd: "), "{s}");
        assert_eq!(a.as_fd().as_raw_fd(), a.fd.as_raw_fd());
    }
}
