//! What the caller holds while work runs: [`AsyncResult`], the `imap` iterators and
//! [`as_completed`].

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::core::{Core, Outcome};
use super::error::TaskError;
use super::task::{decode_one, decode_results, decode_results_into};

/// Turns a finished job's chunk outcomes into the handle's value.
pub(crate) type Finish<T> = fn(Vec<(usize, Outcome)>) -> Result<T, TaskError>;

pub(crate) fn items<R: DeserializeOwned>(n: usize, o: Outcome) -> Vec<Result<R, TaskError>> {
    match o {
        Outcome::Ran(bytes) => decode_results(&bytes, n),
        Outcome::Failed(e) => (0..n).map(|_| Err(e.clone())).collect(),
    }
}

/// All items in order, or the first failure (`map`).
pub(crate) fn finish_all<R: DeserializeOwned>(
    chunks: Vec<(usize, Outcome)>,
) -> Result<Vec<R>, TaskError> {
    let mut out = Vec::with_capacity(chunks.iter().map(|c| c.0).sum());
    for (n, o) in chunks {
        match o {
            Outcome::Ran(bytes) => decode_results_into(&bytes, n, &mut out)?,
            Outcome::Failed(e) if n > 0 => return Err(e),
            Outcome::Failed(_) => {}
        }
    }
    Ok(out)
}

/// The single item (`apply`, `submit`).
pub(crate) fn finish_one<R: DeserializeOwned>(
    chunks: Vec<(usize, Outcome)>,
) -> Result<R, TaskError> {
    let (n, o) = chunks
        .into_iter()
        .next()
        .expect("an apply job has one chunk");
    if let (1, Outcome::Ran(bytes)) = (n, &o) {
        return decode_one(bytes);
    }
    items::<R>(n, o)
        .into_iter()
        .next()
        .unwrap_or(Err(TaskError::Decode("a worker returned no result".into())))
}

/// The result of [`Pool::apply_async`](super::Pool::apply_async),
/// [`Pool::map_async`](super::Pool::map_async) or [`Pool::submit`](super::Pool::submit):
/// Python's `AsyncResult` and `Future`.
///
/// The pool does its work (sending tasks, collecting results, replacing dead workers)
/// while some handle of it waits, so waiting on any handle, or calling
/// [`ready`](AsyncResult::ready), moves every job of the pool on. Dropping the handle
/// abandons the job: its tasks not yet sent are skipped, results still coming are
/// discarded.
#[must_use = "an AsyncResult does nothing unless waited on"]
pub struct AsyncResult<T> {
    core: Rc<RefCell<Core>>,
    job: u64,
    finish: Finish<T>,
    taken: bool,
    _t: PhantomData<fn() -> T>,
}

impl<T> AsyncResult<T> {
    pub(crate) fn new(core: Rc<RefCell<Core>>, job: u64, finish: Finish<T>) -> AsyncResult<T> {
        AsyncResult {
            core,
            job,
            finish,
            taken: false,
            _t: PhantomData,
        }
    }

    fn done(&self) -> bool {
        self.core
            .borrow()
            .jobs
            .get(&self.job)
            .is_none_or(|j| j.remaining == 0)
    }

    /// Whether the result is in (moves the pool on without blocking).
    pub fn ready(&self) -> bool {
        if !self.done() {
            self.core.borrow_mut().pump(Some(Instant::now()));
        }
        self.done()
    }

    /// Waits until the result is in.
    pub fn wait(&self) {
        while !self.done() {
            self.core.borrow_mut().pump(None);
        }
    }

    /// Waits at most `timeout` for the result; returns whether it is in.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while !self.done() {
            if Instant::now() >= until {
                return false;
            }
            self.core.borrow_mut().pump(Some(until));
        }
        true
    }

    fn take(&mut self) -> Result<T, TaskError> {
        assert!(
            !self.taken,
            "AsyncResult::get_timeout already returned the result"
        );
        self.taken = true;
        let job = self.core.borrow_mut().jobs.remove(&self.job);
        let Some(job) = job else {
            return Err(TaskError::Closed);
        };
        let chunks = job
            .sizes
            .into_iter()
            .zip(job.outcomes)
            .map(|(n, o)| (n, o.unwrap_or(Outcome::Failed(TaskError::Closed))))
            .collect();
        (self.finish)(chunks)
    }

    /// Waits for the result and returns it.
    ///
    /// # Panics
    ///
    /// If [`get_timeout`](AsyncResult::get_timeout) already returned it.
    pub fn get(mut self) -> Result<T, TaskError> {
        self.wait();
        self.take()
    }

    /// Waits at most `timeout`: `None` if the result is not in yet (the handle stays
    /// usable), else the result.
    ///
    /// # Panics
    ///
    /// If called again after it returned the result.
    pub fn get_timeout(&mut self, timeout: Duration) -> Option<Result<T, TaskError>> {
        assert!(
            !self.taken,
            "AsyncResult::get_timeout already returned the result"
        );
        self.wait_timeout(timeout).then(|| self.take())
    }
}

/// `.await` gives what [`get`](AsyncResult::get) returns, without blocking the
/// executor's thread: each poll moves the pool on without waiting, and a small waiter
/// thread wakes the task when a reply arrives (see "Async" in the
/// [module docs](super#async)).
///
/// # Panics
///
/// If polled again after it returned `Ready` (or after
/// [`get_timeout`](AsyncResult::get_timeout) returned the result).
impl<T> Future for AsyncResult<T> {
    type Output = Result<T, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        assert!(
            !this.taken,
            "AsyncResult polled after it returned its result"
        );
        if !this.done() {
            // Never blocks for long: at most while a large reply already streaming in
            // finishes (see the module docs).
            this.core.borrow_mut().pump(Some(Instant::now()));
        }
        if this.done() {
            return Poll::Ready(this.take());
        }
        let wakers = Arc::clone(&this.core.borrow().wakers);
        if !wakers.register(this.job, cx.waker()) {
            // No waiter thread could be started: poll again soon rather than never.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<T> Drop for AsyncResult<T> {
    fn drop(&mut self) {
        if let Ok(mut core) = self.core.try_borrow_mut() {
            core.wakers.unregister(self.job);
            core.forget_job(self.job);
        }
    }
}

impl<T> fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult")
            .field("job", &self.job)
            .field("done", &self.done())
            .finish()
    }
}

/// Yields `handles` as their results come in (Python's
/// `concurrent.futures.as_completed`). Each yielded handle is [`ready`](AsyncResult::ready).
pub fn as_completed<T>(handles: Vec<AsyncResult<T>>) -> AsCompleted<T> {
    AsCompleted { handles }
}

/// The iterator from [`as_completed`].
#[derive(Debug)]
pub struct AsCompleted<T> {
    handles: Vec<AsyncResult<T>>,
}

impl<T> Iterator for AsCompleted<T> {
    type Item = AsyncResult<T>;

    fn next(&mut self) -> Option<AsyncResult<T>> {
        loop {
            let first = self.handles.first()?;
            if let Some(i) = self.handles.iter().position(AsyncResult::done) {
                return Some(self.handles.remove(i));
            }
            let core = Rc::clone(&first.core);
            core.borrow_mut().pump(None);
        }
    }
}

/// The iterator from [`Pool::imap`](super::Pool::imap) and
/// [`Pool::imap_unordered`](super::Pool::imap_unordered): each item's own outcome.
///
/// Dropping it abandons the rest of the job.
pub struct IMap<R> {
    core: Rc<RefCell<Core>>,
    job: u64,
    ordered: bool,
    next_chunk: usize,
    chunks_left: usize,
    buf: VecDeque<Result<R, TaskError>>,
}

impl<R> IMap<R> {
    pub(crate) fn new(core: Rc<RefCell<Core>>, job: u64, ordered: bool) -> IMap<R> {
        let chunks_left = core.borrow().jobs.get(&job).map_or(0, |j| j.sizes.len());
        IMap {
            core,
            job,
            ordered,
            next_chunk: 0,
            chunks_left,
            buf: VecDeque::new(),
        }
    }
}

impl<R: DeserializeOwned> Iterator for IMap<R> {
    type Item = Result<R, TaskError>;

    fn next(&mut self) -> Option<Result<R, TaskError>> {
        loop {
            if let Some(x) = self.buf.pop_front() {
                return Some(x);
            }
            if self.chunks_left == 0 {
                return None;
            }
            let got = {
                let mut core = self.core.borrow_mut();
                let Some(job) = core.jobs.get_mut(&self.job) else {
                    self.chunks_left = 0;
                    return Some(Err(TaskError::Closed));
                };
                let index = if self.ordered {
                    job.outcomes[self.next_chunk]
                        .is_some()
                        .then_some(self.next_chunk)
                } else {
                    job.arrivals.pop_front()
                };
                index.and_then(|i| Some((job.sizes[i], job.outcomes[i].take()?)))
            };
            match got {
                Some((n, o)) => {
                    self.chunks_left -= 1;
                    self.next_chunk += 1;
                    self.buf.extend(items::<R>(n, o));
                }
                None => self.core.borrow_mut().pump(None),
            }
        }
    }
}

impl<R> Drop for IMap<R> {
    fn drop(&mut self) {
        if let Ok(mut core) = self.core.try_borrow_mut() {
            core.forget_job(self.job);
        }
    }
}

impl<R> fmt::Debug for IMap<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IMap")
            .field("job", &self.job)
            .field("ordered", &self.ordered)
            .field("chunks_left", &self.chunks_left)
            .finish()
    }
}
