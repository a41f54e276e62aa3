//! A worker process: its rings, how it is started, and its loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::TaskError;
use super::task::{
    DONE, FORGET, INIT_FAILED, MAP, MAP_LEN, READY, RUN, RUN_HEADER, encode_one_error, reply_frame,
    run_chunk, run_map, word,
};
use crate::channel;
use crate::error::{Error, Result};
use crate::process::{Child, Process, StartMethod, catch_panic};
use crate::queue::{ByteQueue, QueueError};
use crate::shm::Segment;
use crate::sys;

/// Ring size of each worker's task and result queues. Small, because creating a queue
/// costs about 0.5 µs per KiB of ring (1 MiB: ~0.6 ms, 64 KiB: ~65 µs); larger messages
/// stream through it in pieces while the other side reads.
pub(crate) const RING: usize = 64 << 10;
/// A frame above this streams in pieces ([`ByteQueue`] chunks records over a quarter of
/// the ring): the reader must be waiting for it.
pub(crate) const BIG: usize = RING / 4;
/// Doorbell flag: "a big reply is coming from this slot, read it as it streams".
pub(crate) const BIG_BELL: u32 = 1 << 31;
/// Largest task or result message.
pub(crate) const MAX_MESSAGE: usize = 1 << 30;

/// The pool's initializer, run once in each new worker.
pub(crate) type Init = Rc<dyn Fn()>;

/// The pool's side of one worker.
pub(crate) struct Worker {
    pub(crate) child: Child<()>,
    pub(crate) pid: u32,
    /// Task frames, pool → worker.
    pub(crate) tasks: ByteQueue,
    /// Reply frames, worker → pool.
    pub(crate) results: ByteQueue,
    /// It ran its initializer (or has none): tasks may be sent.
    pub(crate) ready: bool,
    /// Chunk ids sent to it, oldest first; the first is the one it is running (or about to).
    pub(crate) outstanding: VecDeque<u64>,
    /// When the first outstanding chunk became first (the worker starts it then).
    pub(crate) head_since: Instant,
    /// Chunks sent to it in all (for `max_tasks_per_child`).
    pub(crate) dispatched: usize,
    /// Big replies announced ([`BIG_BELL`]) and not yet received.
    pub(crate) big_expected: usize,
    /// The pool's end of the control socket: segment descriptors for `MAP` frames.
    pub(crate) ctrl: OwnedFd,
    /// Segment ids whose descriptor this worker was sent (and not told to forget).
    pub(crate) segments: HashSet<u64>,
}

/// How long a worker waits on its control socket for a segment's descriptor that the
/// pool sent before the frame naming it (so it is normally there at once).
const FD_WAIT: Duration = Duration::from_secs(5);

/// Forks worker number `slot`.
pub(crate) fn start(
    slot: u32,
    bell: &channel::Sender<u32>,
    init: Option<Init>,
    max_tasks: Option<usize>,
) -> Result<Worker> {
    let tasks = ByteQueue::builder()
        .capacity(RING)
        .max_message(MAX_MESSAGE)
        .bytes()?;
    let results = ByteQueue::builder()
        .capacity(RING)
        .max_message(MAX_MESSAGE)
        .bytes()?;
    let ready = init.is_none();
    let (ctrl, theirs) = sys::socketpair_seqpacket()
        .map_err(|e| Error::io("creating a pool worker's control socket", e))?;
    let child = Process::builder()
        .name(format!("PoolWorker-{slot}"))
        .start_method(StartMethod::Fork)
        .daemon(true)
        .fork({
            let (tasks, results, bell) = (tasks.clone(), results.clone(), bell.clone());
            move || worker_main(slot, &tasks, &results, &bell, &theirs, init, max_tasks)
        })?;
    Ok(Worker {
        pid: child.pid(),
        child,
        tasks,
        results,
        ready,
        outstanding: VecDeque::new(),
        head_since: Instant::now(),
        dispatched: 0,
        big_expected: 0,
        ctrl,
        segments: HashSet::new(),
    })
}

/// The worker's mapping of segment `id`, receiving descriptors from the control socket
/// until `id`'s arrives (the pool sends it before the first frame naming it).
fn segment<'a>(
    cache: &'a mut HashMap<u64, Segment>,
    ctrl: &OwnedFd,
    id: u64,
) -> std::result::Result<&'a Segment, String> {
    let until = Instant::now() + FD_WAIT;
    while !cache.contains_key(&id) {
        let left = until.saturating_duration_since(Instant::now());
        match sys::poll_readable(ctrl.as_fd(), Some(left)) {
            Ok(true) => {}
            Ok(false) if left.is_zero() => {
                return Err(format!(
                    "the worker did not receive the descriptor of segment {id} within {FD_WAIT:?}"
                ));
            }
            Ok(false) => continue,
            Err(e) => return Err(format!("the worker's control socket failed: {e}")),
        }
        let mut buf = [0u8; 8];
        let (n, mut fds) = sys::recv_with_fds(ctrl.as_fd(), &mut buf)
            .map_err(|e| format!("receiving a segment descriptor failed: {e}"))?;
        if n == 0 {
            return Err("the pool closed the worker's control socket".into());
        }
        let (Some(got), Some(fd), 8) = (word(&buf, 0), fds.pop(), n) else {
            return Err("a malformed message arrived on the worker's control socket".into());
        };
        let seg = Segment::from_fd(fd)
            .map_err(|e| format!("the worker could not map the array's segment: {e}"))?;
        cache.insert(got, seg);
    }
    Ok(&cache[&id])
}

fn reply(results: &ByteQueue, bell: &channel::Sender<u32>, slot: u32, frame: &[u8]) -> bool {
    if results.send(frame).is_err() {
        return false;
    }
    bell.send(slot).is_ok()
}

/// The worker's loop: runs task frames until told to exit, its task quota is used, or
/// its queue fails (the pool is gone). Returns to `run_child`, which `_exit`s.
fn worker_main(
    slot: u32,
    tasks: &ByteQueue,
    results: &ByteQueue,
    bell: &channel::Sender<u32>,
    ctrl: &OwnedFd,
    init: Option<Init>,
    max_tasks: Option<usize>,
) {
    let mut segments: HashMap<u64, Segment> = HashMap::new();
    if let Some(init) = init {
        if let Err((message, location)) = catch_panic(|| init()) {
            let payload = postcard::to_allocvec(&(message, location)).unwrap_or_default();
            reply(results, bell, slot, &reply_frame(INIT_FAILED, 0, &payload));
            return;
        }
    }
    if !reply(results, bell, slot, &reply_frame(READY, 0, &[])) {
        return;
    }
    let mut done = 0usize;
    let mut frame = Vec::new();
    loop {
        if tasks.recv_into(&mut frame).is_err() {
            return;
        }
        let (Some(chunk), Some(entry), Some(hash), Some(n)) = (
            word(&frame, 8),
            word(&frame, 16),
            word(&frame, 24),
            word(&frame, 32),
        ) else {
            match (frame.first(), word(&frame, 8)) {
                (Some(&FORGET), Some(id)) => {
                    segments.remove(&id);
                    continue;
                }
                _ => return, // EXIT, or not a frame the pool writes (the ring was overwritten)
            }
        };
        let (n, out) = match frame.first() {
            Some(&RUN) => {
                let Ok(n) = usize::try_from(n) else { return };
                let Some(args) = frame.get(RUN_HEADER..) else {
                    return;
                };
                (n, run_chunk(entry, hash, args, n))
            }
            Some(&MAP) if frame.len() == MAP_LEN => {
                // `n` is the segment id here; then the byte offset and element count.
                let (Some(offset), Some(count)) = (word(&frame, 40), word(&frame, 48)) else {
                    return;
                };
                let out = match segment(&mut segments, ctrl, n) {
                    // SAFETY: the region is the worker's own mapping of the segment, valid
                    // for its whole length while `segments` holds it; the pool gives each
                    // chunk of a call to one worker and holds the array's lock meanwhile
                    // (the aliasing contract in the pool docs). Offsets and counts are
                    // bounds-checked by the trampoline.
                    Ok(seg) => unsafe {
                        run_map(
                            entry,
                            hash,
                            seg.as_ptr(),
                            seg.len(),
                            usize::try_from(offset).unwrap_or(usize::MAX),
                            usize::try_from(count).unwrap_or(usize::MAX),
                        )
                    },
                    Err(why) => encode_one_error(TaskError::Decode(why)),
                };
                (1, out)
            }
            _ => return, // not a frame the pool writes: the ring was overwritten
        };
        let frame = reply_frame(DONE, chunk, &out);
        if frame.len() > BIG && frame.len() <= MAX_MESSAGE && bell.send(slot | BIG_BELL).is_err() {
            return;
        }
        let sent = match results.send(&frame) {
            Ok(()) => true,
            Err(QueueError::MessageTooLarge { .. }) => {
                let err: Vec<std::result::Result<(), super::TaskError>> = (0..n)
                    .map(|_| {
                        Err(super::TaskError::Encode(format!(
                            "the chunk's results take {} bytes, over the pool's {} byte \
                             message limit",
                            out.len(),
                            MAX_MESSAGE
                        )))
                    })
                    .collect();
                let bytes = postcard::to_allocvec(&err).unwrap_or_default();
                results.send(&reply_frame(DONE, chunk, &bytes)).is_ok()
            }
            Err(_) => false,
        };
        if !sent || bell.send(slot).is_err() {
            return;
        }
        done += 1;
        if max_tasks.is_some_and(|m| done >= m) {
            return;
        }
    }
}

/// Builds the error for a pool whose start method is not supported.
pub(crate) fn unsupported(method: StartMethod) -> Error {
    Error::InvalidArgument {
        what: format!(
            "the Pool starts its workers with StartMethod::Fork only for now (asked for \
             {method:?}); build it from a single-threaded process (e.g. first thing in main), \
             or use Process::spawn for one-off children under other start methods"
        ),
    }
}
