//! A worker process: its rings, how it is started, and its loop.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use super::task::{DONE, EXIT, INIT_FAILED, READY, RUN, RUN_HEADER, reply_frame, run_chunk, word};
use crate::channel;
use crate::error::{Error, Result};
use crate::process::{Child, Process, StartMethod, catch_panic};
use crate::queue::{ByteQueue, QueueError};

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
}

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
    let child = Process::builder()
        .name(format!("PoolWorker-{slot}"))
        .start_method(StartMethod::Fork)
        .daemon(true)
        .fork({
            let (tasks, results, bell) = (tasks.clone(), results.clone(), bell.clone());
            move || worker_main(slot, &tasks, &results, &bell, init, max_tasks)
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
    })
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
    init: Option<Init>,
    max_tasks: Option<usize>,
) {
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
        match frame.first() {
            Some(&RUN) => {}
            Some(&EXIT) => return,
            _ => return, // not a frame the pool writes: the ring was overwritten
        }
        let (Some(chunk), Some(entry), Some(hash), Some(n)) = (
            word(&frame, 8),
            word(&frame, 16),
            word(&frame, 24),
            word(&frame, 32),
        ) else {
            return;
        };
        let Ok(n) = usize::try_from(n) else { return };
        let Some(args) = frame.get(RUN_HEADER..) else {
            return;
        };
        let out = run_chunk(entry, hash, args, n);
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
