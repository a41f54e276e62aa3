//! The pool's scheduler, run in the pool's own process and only when a caller waits
//! (there is no supervisor thread): dispatch, results, deaths, timeouts, respawns.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::AsFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::error::TaskError;
use super::task::{DONE, EXIT, FORGET, INIT_FAILED, MAP, READY, REPLY_HEADER, word};
use super::waker::Registry;
use super::worker::{self, BIG, BIG_BELL, Init, Worker};
use crate::channel;
use crate::process::{ProcessError, StartMethod};
use crate::queue::{QueueError, RecvTimeoutError};
use crate::shm::Segment;
use crate::sys;

/// Longest single sleep: how soon a dead worker is noticed while the pool is waited on.
pub(crate) const SLICE: Duration = Duration::from_millis(20);
/// Most chunks queued per worker whose chunks are quick (one running, the rest ready to
/// go; see `dispatch`), so a worker runs through small tasks without waiting for the pool
/// to wake up (every refill of a worker that ran dry costs a futex wake-up, ~15 µs
/// across vCPUs on a loaded machine; with 8 this was a third of a wake-up per item).
const DEPTH: usize = 128;
/// Chunks queued per worker whose last chunk took between [`QUICK`] and [`LONG`]: one
/// running and one ready. Such chunks gain nothing from a deeper queue, and a deep queue
/// would fix their split between workers in advance (largest-first `imap_unordered` of
/// `fib` would give every other task to each worker).
const SLOW_DEPTH: usize = 2;
/// Chunks queued per worker whose last chunk took [`LONG`] or more, or whose speed is not
/// known yet (a new worker): only the running one. A chunk waiting behind a long one is a
/// chunk the other worker could have started: with largest-first `fib(1..=40)`, one ready
/// chunk each held the speed-up on two CPUs at ~1.83× instead of ~1.9×. The price, a round
/// trip between a worker's chunks, is noise beside a chunk of a millisecond or more; a new
/// worker pays it once, until its first chunk tells how quick it is.
pub(crate) const LONG_DEPTH: usize = 1;
/// A chunk that came back quicker than this lets its worker take [`DEPTH`] chunks.
const QUICK: Duration = Duration::from_micros(100);
/// A chunk that took this long or longer limits its worker to [`LONG_DEPTH`].
const LONG: Duration = Duration::from_millis(1);
/// How long one `drain` waits for announced big replies to stream in.
const BIG_WAIT: Duration = Duration::from_secs(1);
/// How long `join` waits for a worker told to exit before killing it.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// The doorbell ring's size for `processes` workers (it was 4096 whatever the pool's
/// size; a smaller ring is quicker to create, which `Pool::new` pays for).
///
/// A worker rings at most twice per reply (a big one is announced first) and once when
/// ready, and has at most [`DEPTH`] chunks outstanding. Every pump first takes all waiting
/// doorbells; between two pumps a worker can reply to at most the `DEPTH` chunks it held
/// plus `DEPTH` dispatched after a health check took replies whose doorbells were still
/// on their way, so at most `4 × DEPTH + 1` of its doorbells wait, twice that across a
/// replacement (the dead worker's and the new one's). Were the ring full anyway, a
/// worker's ring would wait for the next pump, never lose the doorbell.
fn bell_capacity(processes: usize) -> usize {
    processes.saturating_mul(8 * DEPTH + 4).clamp(64, 1 << 16)
}

/// A hasher for the pool's own ids (chunks and jobs: counters it hands out, looked up
/// several times per chunk), much cheaper than the default SipHash. An id read from a ring
/// is only ever looked up, never inserted, so a hostile one cannot flood a table.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // FxHash's step: the multiply spreads a counter over the high bits, which the
        // table's tags use, and keeps the low bits, which pick its bucket, distinct.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// A map keyed by a pool id.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

pub(crate) struct Config {
    pub(crate) processes: usize,
    /// `None`: the default rule, applied at each worker's start (see the pool docs).
    pub(crate) method: Option<StartMethod>,
    pub(crate) init: Option<Init>,
    pub(crate) max_tasks: Option<usize>,
    pub(crate) task_timeout: Option<Duration>,
    pub(crate) retries: u32,
}

/// A chunk's fate, as the pool knows it.
pub(crate) enum Outcome {
    /// A worker ran it: the encoded results, one per item.
    Ran(Vec<u8>),
    /// It never produced results; every item fails with this.
    Failed(TaskError),
}

struct Chunk {
    job: u64,
    index: usize,
    frame: Vec<u8>,
    items: usize,
    attempts: u32,
}

pub(crate) struct Job {
    /// Items per chunk.
    pub(crate) sizes: Vec<usize>,
    pub(crate) outcomes: Vec<Option<Outcome>>,
    /// Chunk indices in the order their outcomes arrived.
    pub(crate) arrivals: VecDeque<usize>,
    pub(crate) remaining: usize,
}

#[derive(Clone, PartialEq)]
pub(crate) enum State {
    Running,
    Closed,
    Stopped(TaskError),
}

pub(crate) struct Core {
    pub(crate) cfg: Config,
    /// The process that built the pool and forked its workers (see [`Core::disown`]).
    owner: u32,
    workers: Vec<Option<Worker>>,
    bell_rx: channel::Receiver<u32>,
    bell_tx: channel::Sender<u32>,
    pending: VecDeque<u64>,
    chunks: IdMap<Chunk>,
    pub(crate) jobs: IdMap<Job>,
    next_id: u64,
    pub(crate) state: State,
    last_health: Instant,
    /// Wakers of pending futures, and the waiter thread that wakes them.
    pub(crate) wakers: Arc<Registry>,
    /// Segments named in `MAP` frames, by the pool's id for them. The `Weak` keeps the
    /// `Arc`'s allocation (not the mapping), so its address names one segment for as long
    /// as the entry lives; an entry whose segment is gone stays until every worker that
    /// mapped it was told to forget it.
    segments: Vec<(Weak<Segment>, u64)>,
    /// Scratch for `dispatch`: the slots that take nothing more in this call.
    skip: Vec<bool>,
    /// The time of the last doorbell wait's end, read once per pump: when the replies
    /// that pump takes arrived, closely enough to tell quick chunks from long ones.
    clock: Instant,
}

/// What the end of worker `pid` means for its chunk. A worker that never reached its
/// loop because its bootstrap failed (a spawned worker that did not reach `init()`, ran
/// another executable, or exited before it) is [`TaskError::Start`]: the pool stops
/// rather than respawn a worker that would fail the same way.
fn died(pid: u32, r: &Result<(), ProcessError>) -> TaskError {
    if let Err(ProcessError::Bootstrap(why)) = r {
        return TaskError::Start(format!("worker {pid} failed to start: {why}"));
    }
    let (signal, exit_code) = match r {
        Ok(()) => (None, Some(0)),
        Err(ProcessError::Signaled(s)) => (Some(*s), None),
        Err(ProcessError::Exited(c)) => (None, Some(*c)),
        Err(_) => (None, None),
    };
    TaskError::WorkerDied {
        pid,
        signal,
        exit_code,
    }
}

impl Core {
    pub(crate) fn new(cfg: Config) -> crate::Result<Core> {
        let (bell_tx, bell_rx) = channel::channel::<u32>(bell_capacity(cfg.processes))?;
        let wakers = Registry::new(bell_rx.clone());
        let mut core = Core {
            owner: std::process::id(),
            wakers,
            segments: Vec::new(),
            workers: Vec::with_capacity(cfg.processes),
            cfg,
            bell_rx,
            bell_tx,
            pending: VecDeque::new(),
            chunks: IdMap::default(),
            jobs: IdMap::default(),
            skip: Vec::new(),
            clock: Instant::now(),
            next_id: 1,
            state: State::Running,
            last_health: Instant::now(),
        };
        for slot in 0..core.cfg.processes {
            let w = worker::start(
                slot as u32,
                core.cfg.method,
                &core.bell_tx,
                core.cfg.init.as_ref(),
                core.cfg.max_tasks,
            )?;
            core.workers.push(Some(w));
        }
        Ok(core)
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.workers.iter().flatten().map(|w| w.pid).collect()
    }

    pub(crate) fn all_ready(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.as_ref().is_some_and(|w| w.ready))
    }

    /// Registers a job of `chunks` = (items, frame or the error that stopped it).
    pub(crate) fn add_job(&mut self, chunks: Vec<(usize, Result<Vec<u8>, TaskError>)>) -> u64 {
        let count = chunks.len();
        let mut chunks = chunks.into_iter();
        self.add_job_with(count, |_, _| chunks.next().expect("one per index"))
    }

    /// Registers a job of `count` chunks made one at a time by `make(chunk_id, index)`
    /// = (items, frame made with `chunk_id` or another id from
    /// [`fresh_id`](Core::fresh_id), or the error that stopped it). The first
    /// chunks are sent as soon as they are made (then after 2, 4, 8, ... chunks), so the
    /// workers start while the rest are encoded. If `make` panics, the job is forgotten
    /// (what was sent of it is discarded on arrival) and the panic goes on.
    pub(crate) fn add_job_with(
        &mut self,
        count: usize,
        mut make: impl FnMut(u64, usize) -> (usize, Result<Vec<u8>, TaskError>),
    ) -> u64 {
        let id = self.fresh_id();
        self.jobs.insert(
            id,
            Job {
                sizes: Vec::with_capacity(count),
                outcomes: Vec::with_capacity(count),
                arrivals: VecDeque::new(),
                remaining: 0,
            },
        );
        for index in 0..count {
            let cid = self.fresh_id();
            let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make(cid, index)));
            let (items, frame) = match made {
                Ok(made) => made,
                Err(panic) => {
                    self.forget_job(id);
                    std::panic::resume_unwind(panic);
                }
            };
            let job = self.jobs.get_mut(&id).expect("inserted above");
            job.sizes.push(items);
            match frame {
                Ok(frame) => {
                    job.outcomes.push(None);
                    job.remaining += 1;
                    // The id the frame was made with (`cid`, or one from `fresh_id`).
                    let cid = word(&frame, 8).expect("a task frame has a header");
                    self.chunks.insert(
                        cid,
                        Chunk {
                            job: id,
                            index,
                            frame,
                            items,
                            attempts: 0,
                        },
                    );
                    self.pending.push_back(cid);
                    if index < self.cfg.processes || index.is_power_of_two() {
                        self.dispatch();
                    }
                }
                Err(e) => {
                    job.outcomes.push(Some(Outcome::Failed(e)));
                    job.arrivals.push_back(index);
                }
            }
        }
        self.dispatch();
        id
    }

    /// A chunk id to put in a frame before the chunk exists: ids are unique per pool.
    pub(crate) fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The pool's id for `seg` in `MAP` frames (a new one the first time). Also tells
    /// workers to unmap segments whose last handle here is gone.
    pub(crate) fn segment_id(&mut self, seg: &Arc<Segment>) -> u64 {
        self.forget_dead_segments();
        if let Some(e) = self
            .segments
            .iter()
            .find(|e| std::ptr::eq(e.0.as_ptr(), Arc::as_ptr(seg)))
        {
            return e.1;
        }
        let id = self.fresh_id();
        self.segments.push((Arc::downgrade(seg), id));
        id
    }

    fn forget_dead_segments(&mut self) {
        let workers = &mut self.workers;
        self.segments.retain(|(weak, id)| {
            if weak.strong_count() > 0 {
                return true;
            }
            let mut all = true;
            for w in workers.iter_mut().flatten() {
                if w.segments.contains(id) {
                    let mut frame = vec![FORGET, 0, 0, 0, 0, 0, 0, 0];
                    frame.extend_from_slice(&id.to_le_bytes());
                    if w.tasks.try_send(&frame).is_ok() {
                        w.segments.remove(id);
                    } else {
                        all = false; // its ring is full: next time
                    }
                }
            }
            !all
        });
    }

    /// Drops a job whose handle is gone; its chunks still in flight are discarded on
    /// arrival, those not yet sent are skipped.
    pub(crate) fn forget_job(&mut self, job: u64) {
        self.jobs.remove(&job);
    }

    /// In a process other than the one that built the pool (a child forked while the
    /// pool existed, which borrows or inherited it): stops this copy without touching
    /// what belongs to the owner, and returns true. The rings, workers and jobs are the
    /// owner's: a copy that sent tasks or took replies would steal them (the owner's
    /// job would wait forever), and one that killed or reaped workers would break the
    /// owner's pool. So the workers are forgotten here, never signalled or reaped (their
    /// handles' descriptors stay open in this process), and every job of the copy fails
    /// with [`TaskError::OtherProcess`].
    pub(crate) fn disown(&mut self) -> bool {
        let me = std::process::id();
        if self.owner == me {
            return false;
        }
        if !matches!(self.state, State::Stopped(TaskError::OtherProcess { .. })) {
            let why = TaskError::OtherProcess { owner: self.owner };
            self.state = State::Stopped(why.clone());
            for w in self.workers.iter_mut() {
                std::mem::forget(w.take());
            }
            self.pending.clear();
            let ids: Vec<u64> = self.chunks.keys().copied().collect();
            for cid in ids {
                self.finish(cid, Outcome::Failed(why.clone()));
            }
        }
        true
    }

    /// One round of work, sleeping at most until `until` (and at most [`SLICE`]).
    pub(crate) fn pump(&mut self, until: Option<Instant>) {
        if self.disown() {
            return;
        }
        self.dispatch();
        let now = Instant::now();
        let mut wait = SLICE;
        if let Some(u) = until {
            wait = wait.min(u.saturating_duration_since(now));
        }
        if let Some(t) = self.next_timeout() {
            wait = wait.min(t.saturating_duration_since(now));
        }
        if self.workers.iter().all(Option::is_none) {
            // Nothing can ring: stopped, or every respawn failed.
            std::thread::sleep(wait.min(Duration::from_millis(1)));
        } else {
            let rung = self.bell_rx.recv_timeout(wait);
            self.clock = Instant::now();
            match rung {
                Ok(bell) => {
                    self.ring(bell);
                    while let Ok(bell) = self.bell_rx.try_recv() {
                        self.ring(bell);
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.health(),
                // This process holds a sender, so neither is expected; poll instead.
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(1));
                    self.health();
                }
            }
        }
        if self.last_health.elapsed() >= SLICE {
            self.health();
        }
        self.check_timeouts();
        self.dispatch();
        self.wakers.progressed();
    }

    fn next_timeout(&self) -> Option<Instant> {
        let limit = self.cfg.task_timeout?;
        self.workers
            .iter()
            .flatten()
            .filter(|w| w.started)
            .filter_map(|w| {
                let head = self.chunks.get(w.outstanding.front()?)?;
                Some(w.head_since + limit * head.items.max(1) as u32)
            })
            .min()
    }

    /// Sends pending chunks to workers with room, in queue order, spreading them: each
    /// chunk goes to the worker with the fewest outstanding (the lowest slot on a tie),
    /// so first one each, then a second each, and so on up to [`DEPTH`].
    fn dispatch(&mut self) {
        if self.state != State::Running && self.state != State::Closed {
            return;
        }
        let mut skip = std::mem::take(&mut self.skip);
        skip.clear();
        skip.resize(self.workers.len(), false);
        self.dispatch_with(&mut skip);
        self.skip = skip;
    }

    fn dispatch_with(&mut self, skip: &mut [bool]) {
        loop {
            // Skip chunks whose job was forgotten.
            let cid = loop {
                let Some(&cid) = self.pending.front() else {
                    return;
                };
                match self.chunks.get(&cid) {
                    Some(c) if self.jobs.contains_key(&c.job) => break cid,
                    Some(_) => {
                        self.pending.pop_front();
                        self.chunks.remove(&cid);
                    }
                    None => {
                        self.pending.pop_front();
                    }
                }
            };
            // The worker with the fewest chunks outstanding that can take one now.
            let mut best: Option<(usize, usize)> = None;
            for (slot, w) in self.workers.iter().enumerate() {
                let Some(w) = w else { continue };
                let level = w.outstanding.len();
                if skip[slot]
                    || !w.ready
                    || level >= w.depth
                    || self.cfg.max_tasks.is_some_and(|m| w.dispatched >= m)
                {
                    continue;
                }
                if best.is_none_or(|(_, b)| level < b) {
                    best = Some((slot, level));
                }
            }
            let Some((slot, level)) = best else {
                return;
            };
            // A chunk queued behind others waits for them, so the `level`-th one is
            // queued only while there is work for every worker `level + 1` times over:
            // the tail of a job goes to whichever worker is free first.
            if level > 0 && self.pending.len() < (level + 1) * self.cfg.processes {
                return;
            }
            let chunk = &self.chunks[&cid];
            let big = chunk.frame.len() > BIG;
            if big && level > 0 {
                return; // a big frame streams to an idle worker only, and none is idle
            }
            let w = self.workers[slot].as_mut().expect("chosen above");
            if chunk.frame[0] == MAP {
                let id = word(&chunk.frame, 32).unwrap_or(0);
                if !w.segments.contains(&id) {
                    let seg = self
                        .segments
                        .iter()
                        .find(|s| s.1 == id)
                        .and_then(|s| s.0.upgrade());
                    let sent = match seg {
                        Some(seg) => {
                            sys::send_with_fds(w.ctrl.as_fd(), &id.to_le_bytes(), &[seg.as_fd()])
                                .map_err(|e| {
                                    format!(
                                        "passing the segment's descriptor to a worker failed: {e}"
                                    )
                                })
                        }
                        None => Err("the segment was dropped before its chunk ran".into()),
                    };
                    match sent {
                        Ok(()) => {
                            w.segments.insert(id);
                        }
                        Err(why) => {
                            self.pending.pop_front();
                            self.finish(cid, Outcome::Failed(TaskError::Encode(why)));
                            continue;
                        }
                    }
                }
            }
            let sent = if big {
                // Streamed in pieces while the (idle) worker reads them.
                let t = Duration::from_secs(1) + Duration::from_nanos(chunk.frame.len() as u64 * 5);
                w.tasks.send_timeout(&chunk.frame, t)
            } else {
                w.tasks.try_send(&chunk.frame)
            };
            match sent {
                Ok(()) => {
                    self.pending.pop_front();
                    if w.outstanding.is_empty() {
                        let now = Instant::now();
                        w.head_start = now;
                        w.head_since = now;
                    }
                    w.outstanding.push_back(cid);
                    w.dispatched += 1;
                }
                Err(QueueError::MessageTooLarge { size, max }) => {
                    // No worker could ever take it: fail it rather than retry forever.
                    self.pending.pop_front();
                    self.finish(
                        cid,
                        Outcome::Failed(TaskError::Encode(format!(
                            "a chunk's arguments take {size} bytes, over the pool's \
                             {max} byte message limit; use a smaller chunksize or pass \
                             large data through a Segment"
                        ))),
                    );
                }
                // Full or timed out: later. A dead worker is found by `health`.
                Err(_) => skip[slot] = true,
            }
        }
    }

    fn ring(&mut self, bell: u32) {
        let slot = (bell & !BIG_BELL) as usize;
        if slot >= self.workers.len() {
            return; // read from shared memory: not a bell a worker of ours rings
        }
        if bell & BIG_BELL != 0 {
            if let Some(Some(w)) = self.workers.get_mut(slot) {
                w.big_expected += 1;
            }
        }
        self.drain_rung(slot);
    }

    /// `drain` after a doorbell: a worker rings only after its reply is in the ring (and
    /// the ring counts a message before it is visible), so a ring that counts none has
    /// nothing for us, e.g. when an earlier doorbell's drain took this one's reply too.
    /// That saves the full empty receive (its clock reads and repair checks), which
    /// `health` still makes every slice.
    fn drain_rung(&mut self, slot: usize) {
        let idle = self
            .workers
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|w| w.big_expected == 0 && w.results.is_empty());
        if !idle {
            self.drain(slot);
        }
    }

    /// Takes every reply waiting in worker `slot`'s result ring, and waits for the big
    /// ones it announced as they stream in (while it lives).
    fn drain(&mut self, slot: usize) {
        let mut replies = Vec::new();
        let mut corrupted = false;
        // A stuck (live) writer holds the pool here at most this long per call; the part
        // received so far is kept by the queue for the next call.
        let until = Instant::now() + BIG_WAIT;
        if let Some(Some(w)) = self.workers.get_mut(slot) {
            loop {
                let r = if w.big_expected > 0 {
                    w.results.recv_with_timeout(SLICE, |b| b.to_vec())
                } else {
                    w.results.try_recv_with(|b| b.to_vec())
                };
                match r {
                    Ok(r) => {
                        if r.len() > BIG {
                            w.big_expected = w.big_expected.saturating_sub(1);
                        }
                        replies.push(r);
                    }
                    Err(QueueError::Corrupted { .. }) => {
                        corrupted = true;
                        break;
                    }
                    Err(QueueError::Timeout) if w.child.is_alive() && Instant::now() < until => {}
                    Err(_) => {
                        if !w.child.is_alive() {
                            w.big_expected = 0;
                        }
                        break;
                    }
                }
            }
        }
        for r in replies {
            self.reply(slot, r);
        }
        self.retire(slot);
        if corrupted {
            // Its ring cannot be trusted: replace the worker; its chunks go on elsewhere.
            if let Some(Some(w)) = self.workers.get(slot) {
                let _ = w.child.kill();
            }
        }
    }

    /// A worker that used its `max_tasks_per_child` and has nothing outstanding exits by
    /// itself: reap it now and start its replacement, rather than at the next health check.
    fn retire(&mut self, slot: usize) {
        let Some(max) = self.cfg.max_tasks else {
            return;
        };
        let done = self.workers[slot]
            .as_ref()
            .is_some_and(|w| w.dispatched >= max && w.outstanding.is_empty());
        if !done {
            return;
        }
        let mut w = self.workers[slot].take().expect("checked above");
        let r = w.child.join_timeout(EXIT_GRACE);
        if matches!(r, Err(ProcessError::Timeout)) {
            let _ = w.child.kill();
        }
        let cause = died(w.pid, &r);
        self.lost(slot, w, cause);
    }

    fn reply(&mut self, slot: usize, mut r: Vec<u8>) {
        let (Some(&kind), Some(chunk)) = (r.first(), word(&r, 8)) else {
            return;
        };
        let payload = r.get(REPLY_HEADER..).unwrap_or_default();
        let Some(w) = self.workers[slot].as_mut() else {
            return;
        };
        match kind {
            READY => {
                w.ready = true;
                w.started = true;
                // A chunk sent while it was starting starts now (see `check_timeouts`).
                w.head_since = Instant::now();
            }
            INIT_FAILED => {
                let (message, location) = postcard::from_bytes::<(String, Option<String>)>(payload)
                    .unwrap_or_else(|_| ("(message unreadable)".into(), None));
                self.stop(TaskError::Initializer { message, location });
            }
            DONE => {
                let Some(pos) = w.outstanding.iter().position(|&c| c == chunk) else {
                    return; // not ours (stale or overwritten): ignore
                };
                w.outstanding.remove(pos);
                if pos == 0 {
                    // Replies taken in one pump share its clock: a worker that finished
                    // several chunks between two pumps is quick.
                    let took = self.clock.saturating_duration_since(w.head_start);
                    w.depth = if took < QUICK {
                        DEPTH
                    } else if took < LONG {
                        SLOW_DEPTH
                    } else {
                        LONG_DEPTH
                    };
                    w.head_start = self.clock;
                    if self.cfg.task_timeout.is_some() {
                        w.head_since = Instant::now();
                    }
                }
                // A chunk map that failed in the worker (its one result is `Err`: postcard
                // writes the length 1, then variant 1) may have failed to receive or map
                // the segment (the worker at its descriptor limit): send the descriptor
                // again with the next chunk naming it, or every later map of that array
                // on this worker would wait for it in vain. (A worker that has it maps it
                // anew.)
                if payload.get(..2) == Some(&[1, 1]) {
                    let map = self.chunks.get(&chunk).map(|c| &c.frame[..]);
                    if let Some(id) = map
                        .filter(|f| f.first() == Some(&MAP))
                        .and_then(|f| word(f, 32))
                    {
                        w.segments.remove(&id);
                    }
                }
                r.drain(..REPLY_HEADER); // the payload, without a copy into a new buffer
                self.finish(chunk, Outcome::Ran(r));
            }
            _ => {}
        }
    }

    fn finish(&mut self, cid: u64, outcome: Outcome) {
        let Some(chunk) = self.chunks.remove(&cid) else {
            return;
        };
        if let Some(job) = self.jobs.get_mut(&chunk.job) {
            if let Some(slot @ None) = job.outcomes.get_mut(chunk.index) {
                *slot = Some(outcome);
                job.arrivals.push_back(chunk.index);
                job.remaining -= 1;
                if job.remaining == 0 {
                    self.wakers.wake_job(chunk.job);
                }
            }
        }
    }

    /// Reaps dead workers, fails or retries what they held, and replaces them.
    fn health(&mut self) {
        self.last_health = Instant::now();
        if !self.segments.is_empty() {
            self.forget_dead_segments();
        }
        for slot in 0..self.workers.len() {
            let ended = match self.workers[slot].as_mut() {
                Some(w) => {
                    let r = w.child.try_join();
                    if !w.started && r.is_none() && !w.child.is_bootstrapping() {
                        // Past its handshake, so its `READY` is due at once (or after its
                        // initializer, which no chunk waits behind): should it not come
                        // (stopped in between), its chunks are timed from here.
                        w.started = true;
                        w.head_since = Instant::now();
                    }
                    r
                }
                None => continue,
            };
            if let Some(r) = ended {
                self.drain(slot);
                // (`drain` may have retired it and put a new one in already.)
                let ended_here = self.workers[slot]
                    .as_ref()
                    .is_some_and(|w| !w.child.is_alive());
                if ended_here {
                    let w = self.workers[slot].take().expect("checked above");
                    let cause = died(w.pid, &r);
                    self.lost(slot, w, cause);
                }
            } else {
                self.drain(slot);
            }
        }
    }

    fn check_timeouts(&mut self) {
        let Some(limit) = self.cfg.task_timeout else {
            return;
        };
        let now = Instant::now();
        for slot in 0..self.workers.len() {
            // Not before it said READY: a worker still starting (an exec, a fork server's
            // fork, a stopped bootstrap) has not begun its first chunk; its bootstrap
            // has its own deadline (`Child`'s, then `TaskError::Start`).
            let over = self.workers[slot]
                .as_ref()
                .filter(|w| w.started)
                .and_then(|w| {
                    let head = self.chunks.get(w.outstanding.front()?)?;
                    (now >= w.head_since + limit * head.items.max(1) as u32).then_some(())
                });
            if over.is_none() {
                continue;
            }
            let mut w = self.workers[slot].take().expect("checked above");
            let _ = w.child.kill();
            // Its result may have landed just in time.
            let _ = w.child.join_timeout(EXIT_GRACE);
            let pid = w.pid;
            self.workers[slot] = Some(w);
            self.drain(slot);
            if self.workers[slot].as_ref().map(|w| w.pid) != Some(pid) {
                continue; // `drain` retired it and started its replacement
            }
            let w = self.workers[slot].take().expect("checked above");
            let still_over = w
                .outstanding
                .front()
                .is_some_and(|c| self.chunks.contains_key(c));
            let cause = if still_over {
                TaskError::Timeout { limit }
            } else {
                died(w.pid, &Err(ProcessError::Signaled(9)))
            };
            self.lost(slot, w, cause);
        }
    }

    /// Worker `w` (taken out of `slot`) has ended: its first chunk fails with `cause` (or
    /// is retried), the rest go back to the front of the queue, and the slot is refilled.
    fn lost(&mut self, slot: usize, mut w: Worker, cause: TaskError) {
        if matches!(cause, TaskError::Start(_)) {
            // Its bootstrap failed (see `died`): the next one would fail the same way.
            drop(w);
            self.stop(cause);
            return;
        }
        if !w.ready && !matches!(self.state, State::Stopped(_)) {
            // It died before its initializer finished: a pool error, not a respawn loop.
            self.stop(TaskError::Initializer {
                message: format!("the worker ended during the initializer ({cause})"),
                location: None,
            });
            return;
        }
        let head = w.outstanding.pop_front();
        for cid in w.outstanding.drain(..).rev() {
            self.pending.push_front(cid);
        }
        if let Some(cid) = head {
            // A chunk transformed in place may be half done: never run it twice.
            let retry = matches!(cause, TaskError::WorkerDied { .. })
                && self.chunks.get_mut(&cid).is_some_and(|c| {
                    c.attempts += 1;
                    c.attempts <= self.cfg.retries && !(c.frame[0] == MAP && c.frame[1] != 0)
                });
            if retry {
                self.pending.push_front(cid);
            } else {
                self.finish(cid, Outcome::Failed(cause));
            }
        }
        drop(w);
        if matches!(self.state, State::Running | State::Closed) {
            match worker::start(
                slot as u32,
                self.cfg.method,
                &self.bell_tx,
                self.cfg.init.as_ref(),
                self.cfg.max_tasks,
            ) {
                Ok(w) => self.workers[slot] = Some(w),
                Err(e) => self.stop(TaskError::Start(e.to_string())),
            }
        }
    }

    /// Stops the pool for good: kills and reaps every worker and fails every unfinished
    /// chunk with `why`.
    pub(crate) fn stop(&mut self, why: TaskError) {
        if self.disown() || matches!(self.state, State::Stopped(_)) {
            return;
        }
        self.state = State::Stopped(why.clone());
        for w in self.workers.iter().flatten() {
            let _ = w.child.kill();
        }
        // Dropping a daemon Child kills it (again) and reaps it.
        self.workers.iter_mut().for_each(|w| drop(w.take()));
        let ids: Vec<u64> = self.chunks.keys().copied().collect();
        for cid in ids {
            self.finish(cid, Outcome::Failed(why.clone()));
        }
        self.pending.clear();
    }

    /// Python's `join` after `close`: waits for all work, then lets workers exit.
    pub(crate) fn join(&mut self) {
        if self.disown() {
            return;
        }
        while !self.chunks.is_empty() && !matches!(self.state, State::Stopped(_)) {
            self.pump(None);
        }
        self.state = match &self.state {
            State::Stopped(e) => State::Stopped(e.clone()),
            _ => State::Stopped(TaskError::Closed),
        };
        for w in self.workers.iter().flatten() {
            let _ = w.tasks.try_send(&[EXIT, 0, 0, 0, 0, 0, 0, 0]);
        }
        for w in self.workers.iter_mut() {
            if let Some(mut w) = w.take() {
                if w.child.join_timeout(EXIT_GRACE).is_err() && w.child.is_alive() {
                    let _ = w.child.kill();
                }
            }
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.wakers.shutdown();
    }
}
