//! A worker process: its rings, how it is started, and its loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::TaskError;
use super::task::{
    DONE, FORGET, INIT_FAILED, MAP, MAP_LEN, READY, RUN, RUN_HEADER, encode_one_error, reply_frame,
    run_chunk, run_map, word,
};
use crate::channel;
use crate::error::{Error, Result};
use crate::pipe::Connection;
use crate::process::{self, Child, Process, StartMethod, catch_panic};
use crate::queue::{ByteQueue, QueueError};
use crate::shm::Segment;
use crate::sys;

/// Ring size of each worker's task and result queues. Small, because every worker start
/// (and restart) creates two and a pool's memory grows with them; larger messages stream
/// through it in pieces while the other side reads.
pub(crate) const RING: usize = 64 << 10;
/// A frame above this streams in pieces ([`ByteQueue`] chunks records over a quarter of
/// the ring): the reader must be waiting for it.
pub(crate) const BIG: usize = RING / 4;
/// Doorbell flag: "a big reply is coming from this slot, read it as it streams".
pub(crate) const BIG_BELL: u32 = 1 << 31;
/// Largest task or result message.
pub(crate) const MAX_MESSAGE: usize = 1 << 30;

/// The pool's initializer: how to run it in a forked worker, and how to start a worker
/// under Spawn or ForkServer that runs it (with its argument encoded into the spawn
/// argument, so handles in it cross as in any `Process::spawn` argument).
#[derive(Clone)]
pub(crate) struct Init {
    /// Runs it here (a forked worker inherits the closure and its argument).
    pub(crate) run: Rc<dyn Fn()>,
    /// Spawns a worker that runs it (see [`spawner`]).
    pub(crate) spawner: Spawner,
}

/// Starts a Spawn or ForkServer worker from its parts (typed by the initializer).
pub(crate) type Spawner = Rc<dyn Fn(process::Builder, Parts) -> Result<Child<()>>>;

/// An initializer a spawned worker can make from nothing: zero-sized and `Copy`, as a
/// `Process::spawn` function.
pub(crate) trait InitFn: Copy + 'static {
    type Arg: Serialize + DeserializeOwned + Clone + 'static;
    fn run(self, arg: Self::Arg);
}

/// No initializer.
#[derive(Clone, Copy)]
pub(crate) struct NoInit;

impl InitFn for NoInit {
    type Arg = ();
    fn run(self, (): ()) {}
}

/// The user's initializer `f(arg)`.
pub(crate) struct UserInit<F, A>(pub(crate) F, pub(crate) PhantomData<fn(A)>);

impl<F: Copy, A> Clone for UserInit<F, A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Copy, A> Copy for UserInit<F, A> {}

impl<F, A> InitFn for UserInit<F, A>
where
    F: Fn(A) + Copy + 'static,
    A: Serialize + DeserializeOwned + Clone + 'static,
{
    type Arg = A;
    fn run(self, arg: A) {
        (self.0)(arg)
    }
}

/// What a spawned worker gets in its `Process::spawn` argument, besides its initializer's
/// argument: every handle here crosses with its descriptor (`process/handles.rs`).
#[derive(Serialize, Deserialize)]
pub(crate) struct Parts {
    slot: u32,
    tasks: ByteQueue,
    results: ByteQueue,
    bell: channel::Sender<u32>,
    /// The worker's end of its control socket (a `SOCK_SEQPACKET` socket: only its
    /// descriptor is used, for `SCM_RIGHTS`; `Connection` is what carries a socket).
    ctrl: Connection,
    max_tasks: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub(crate) struct Spawned<I: InitFn> {
    parts: Parts,
    init: Option<I::Arg>,
}

/// A [`Spawner`] for workers that run the initializer `I` on `arg` first.
pub(crate) fn spawner<I: InitFn>(arg: I::Arg) -> Spawner {
    Rc::new(move |builder: process::Builder, parts: Parts| {
        spawn_parts::<I>(builder, parts, Some(arg.clone()))
    })
}

/// Spawns a worker (its start method is set on `builder`) running `I` on `init` first.
fn spawn_parts<I: InitFn>(
    builder: process::Builder,
    parts: Parts,
    init: Option<I::Arg>,
) -> Result<Child<()>> {
    builder.spawn(spawned::<I>, Spawned::<I> { parts, init })
}

/// A spawned worker's body: a plain `fn` (zero-sized, found again by `Process::spawn`'s
/// handshake), generic over the initializer's type so its argument decodes as itself.
fn spawned<I: InitFn>(w: Spawned<I>) {
    #[allow(clippy::let_unit_value)]
    let () = super::task::ZeroSized::<I>::CHECK;
    let init: Option<Box<dyn FnOnce()>> = w.init.map(|arg| {
        // SAFETY: `I` is zero-sized (checked at compile time just above, and where the
        // initializer was given) and `Copy`, and the pool's process holds a value of it; a
        // zero-sized value has no bytes, so this is a copy of that value, which `Copy`
        // permits. Closures and fn items are inhabited and have no invalid values.
        let f: I = unsafe { std::mem::zeroed() };
        Box::new(move || f.run(arg)) as Box<dyn FnOnce()>
    });
    let p = w.parts;
    let max_tasks = p
        .max_tasks
        .map(|m| usize::try_from(m).unwrap_or(usize::MAX));
    worker_main(
        p.slot,
        &p.tasks,
        &p.results,
        &p.bell,
        p.ctrl.as_fd(),
        init,
        max_tasks,
    );
}

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
    /// It said `READY`: it is past its bootstrap (and initializer) and takes tasks, so
    /// `task_timeout` runs for its first chunk from then, not while it was still starting
    /// (an exec under `Spawn`, which the chunks sent meanwhile wait for).
    pub(crate) started: bool,
    /// Chunk ids sent to it, oldest first; the first is the one it is running (or about to).
    pub(crate) outstanding: VecDeque<u64>,
    /// When the first outstanding chunk became first (the worker starts it then).
    pub(crate) head_since: Instant,
    /// How many chunks may be queued to it (see `core::dispatch`): a few while its
    /// chunks take long or its speed is unknown, many while they are quick.
    pub(crate) depth: usize,
    /// When its current head chunk started, as the pool's clock saw it (for `depth`).
    pub(crate) head_start: Instant,
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

/// Starts worker number `slot` under `method` (`None`: the default rule of
/// [`default_start_method`](crate::process::default_start_method), applied now).
///
/// Under `Fork` the worker runs a closure that borrows its rings (the child has a copy);
/// under `Spawn` and `ForkServer` it is [`spawned`], with its rings, doorbell sender and
/// control socket in its `Process::spawn` argument.
pub(crate) fn start(
    slot: u32,
    method: Option<StartMethod>,
    bell: &channel::Sender<u32>,
    init: Option<&Init>,
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
    let (ctrl, theirs) = sys::socketpair_seqpacket()
        .map_err(|e| Error::io("creating a pool worker's control socket", e))?;
    let builder = Process::builder()
        .name(format!("PoolWorker-{slot}"))
        .daemon(true);
    let fork = |builder: process::Builder| {
        let run = init.map(|i| Rc::clone(&i.run));
        builder.start_method(StartMethod::Fork).fork(|| {
            let init = run.map(|i| Box::new(move || i()) as Box<dyn FnOnce()>);
            worker_main(
                slot,
                &tasks,
                &results,
                bell,
                theirs.as_fd(),
                init,
                max_tasks,
            )
        })
    };
    let method = match method {
        Some(m) => m,
        // The default rule, as `Process::spawn` applies it, with the common case first:
        // `fork` stops the pool's waiter thread and counts threads, and is refused only
        // in a multi-threaded process; then `default_start_method` picks what is safe
        // (ForkServer if this process runs one, else Spawn if `init()` ran, else the
        // `MultiThreaded` error).
        None => match fork(builder.clone()) {
            Err(Error::MultiThreaded { .. }) => process::default_start_method()?,
            r => return r.map(|child| Worker::new(child, tasks, results, ctrl, init)),
        },
    };
    let child = match method {
        StartMethod::Fork => fork(builder)?,
        _ => {
            let parts = Parts {
                slot,
                tasks: tasks.clone(),
                results: results.clone(),
                bell: bell.clone(),
                ctrl: Connection::new(theirs),
                max_tasks: max_tasks.map(|m| m as u64),
            };
            let builder = builder.start_method(method);
            // The initializer's argument is cloned and encoded here, in the pool's
            // process, by the user's `Clone` and `Serialize`: a panic there must not
            // unwind through the pool (a replacement starts inside any pool call, with
            // the worker's slot already emptied). It is an error that stops the pool
            // (`TaskError::Start`), or fails `build`. (The handles' loans made before the
            // panic are cancelled by `process::handles`.)
            let started = catch_panic(|| match init {
                Some(i) => (i.spawner)(builder, parts),
                None => spawn_parts::<NoInit>(builder, parts, None),
            });
            match started {
                Ok(r) => r?,
                Err((message, location)) => {
                    return Err(Error::InvalidArgument {
                        what: format!(
                            "the initializer's argument panicked while being cloned or encoded \
                             for a spawned worker: {message}{}; make its Clone and \
                             Serialize infallible",
                            location.map(|l| format!(" at {l}")).unwrap_or_default()
                        ),
                    });
                }
            }
        }
    };
    Ok(Worker::new(child, tasks, results, ctrl, init))
}

impl Worker {
    fn new(
        child: Child<()>,
        tasks: ByteQueue,
        results: ByteQueue,
        ctrl: OwnedFd,
        init: Option<&Init>,
    ) -> Worker {
        Worker {
            pid: child.pid(),
            child,
            tasks,
            results,
            ready: init.is_none(),
            started: false,
            outstanding: VecDeque::new(),
            head_since: Instant::now(),
            depth: super::core::LONG_DEPTH,
            head_start: Instant::now(),
            dispatched: 0,
            big_expected: 0,
            ctrl,
            segments: HashSet::new(),
        }
    }
}

/// The worker's mapping of segment `id`, receiving descriptors from the control socket
/// until `id`'s arrives (the pool sends it before the first frame naming it).
fn segment<'a>(
    cache: &'a mut HashMap<u64, Segment>,
    ctrl: BorrowedFd<'_>,
    id: u64,
) -> std::result::Result<&'a Segment, String> {
    let until = Instant::now() + FD_WAIT;
    while !cache.contains_key(&id) {
        let left = until.saturating_duration_since(Instant::now());
        match sys::poll_readable(ctrl, Some(left)) {
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
        let (n, mut fds) = sys::recv_with_fds(ctrl, &mut buf)
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
    ctrl: BorrowedFd<'_>,
    init: Option<Box<dyn FnOnce()>>,
    max_tasks: Option<usize>,
) {
    let mut segments: HashMap<u64, Segment> = HashMap::new();
    if let Some(init) = init {
        if let Err((message, location)) = catch_panic(init) {
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
