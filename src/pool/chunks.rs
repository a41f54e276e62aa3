//! Zero-copy chunk maps: [`Pool::map_chunks`] and [`Pool::for_each_chunk_mut`] over data
//! already in shared memory. See "Zero-copy chunk maps" in the [module docs](super).

use std::rc::Rc;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Pool;
use super::core::{Outcome, State};
use super::error::TaskError;
use super::handle::{self, AsyncResult};
use super::task::{ChunkEntry, ZeroSized, chunk_entry_offset, map_frame, read_entry, write_entry};
use crate::process::type_hash;
use crate::shm::{Segment, Shared, ShmSafe};
use crate::sync::{Array, ArrayGuard};

mod sealed {
    pub trait Sealed {}
    /// Only this module can make one, so only the pool can call `lease`.
    pub struct Token(pub(super) ());
}

/// Shared-memory slices a pool can cut into chunks without copying them:
/// [`Array<T>`](crate::Array) and [`Shared<[T]>`](crate::Shared). Sealed.
pub trait SharedSlice<T>: sealed::Sealed {
    #[doc(hidden)]
    /// The segment, the byte offset of the first element in its data area, the length,
    /// and the lock guard held for the call (an `Array`'s lock).
    fn lease(&self, _: sealed::Token) -> (&Arc<Segment>, usize, usize, Option<ArrayGuard<'_, T>>);
}

impl<T> sealed::Sealed for Array<T> {}
impl<T: ShmSafe + Send> SharedSlice<T> for Array<T> {
    fn lease(&self, _: sealed::Token) -> (&Arc<Segment>, usize, usize, Option<ArrayGuard<'_, T>>) {
        // A poisoned array is read as it is: the flag stays for the caller to see.
        let guard = self
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (seg, offset) = self.segment_parts();
        (seg, offset, self.len(), Some(guard))
    }
}

impl<T> sealed::Sealed for Shared<[T]> {}
impl<T: ShmSafe> SharedSlice<T> for Shared<[T]> {
    fn lease(&self, _: sealed::Token) -> (&Arc<Segment>, usize, usize, Option<ArrayGuard<'_, T>>) {
        let (seg, offset) = self.segment_parts();
        (seg, offset, self.len(), None)
    }
}

/// Every chunk's own outcome, in order.
fn finish_each<R: DeserializeOwned>(
    chunks: Vec<(usize, Outcome)>,
) -> Result<Vec<Result<R, TaskError>>, TaskError> {
    Ok(chunks
        .into_iter()
        .flat_map(|(n, o)| handle::items::<R>(n, o))
        .collect())
}

impl Pool {
    /// Sends one `MAP` frame per chunk and waits for every outcome.
    fn run_chunks<T, R>(
        &self,
        seg: &Arc<Segment>,
        offset: usize,
        len: usize,
        chunk_len: usize,
        mutable: bool,
        (entry, hash): (ChunkEntry, u64),
    ) -> Result<Vec<Result<R, TaskError>>, TaskError>
    where
        R: DeserializeOwned,
    {
        if chunk_len == 0 {
            return Err(TaskError::Encode(
                "chunk_len 0 is not a chunk length; pass at least 1".into(),
            ));
        }
        let job = {
            let mut core = self.core.borrow_mut();
            core.disown();
            match &core.state {
                State::Running => {}
                State::Closed => return Err(TaskError::Closed),
                State::Stopped(e) => return Err(e.clone()),
            }
            let id = core.segment_id(seg);
            let entry = chunk_entry_offset(entry);
            let size = size_of::<T>();
            let chunks = (0..len)
                .step_by(chunk_len)
                .map(|start| {
                    let count = chunk_len.min(len - start);
                    let frame = map_frame(
                        core.fresh_id(),
                        mutable,
                        entry,
                        hash,
                        id,
                        offset + start * size,
                        count,
                    );
                    (1, Ok(frame))
                })
                .collect();
            core.add_job(chunks)
        };
        AsyncResult::new(Rc::clone(&self.core), job, finish_each::<R>).get()
    }

    /// `[f(chunk) for chunk in data.chunks(chunk_len)]` in the workers, **without copying
    /// the data**: only the segment, a byte offset and a length cross the rings, and each
    /// worker maps the segment once (rayon's `par_chunks().map()`). The last chunk may be
    /// shorter. Results come back in chunk order.
    ///
    /// For an [`Array`] the pool holds its lock for the whole call, so no process that
    /// locks it sees or makes a change meanwhile; `f` must not lock it (it would wait for
    /// the call, which waits for `f`). A [`Shared<[T]>`](Shared) has no lock: as with its
    /// `Deref`, writers elsewhere are the caller's business.
    ///
    /// ```
    /// use procshare::{Array, Pool};
    ///
    /// fn sum(chunk: &[u64]) -> u64 {
    ///     chunk.iter().sum()
    /// }
    ///
    /// let pool = Pool::new(2)?;
    /// let data = Array::from_slice(&(0..1000u64).collect::<Vec<_>>())?;
    /// let sums = pool.map_chunks(&data, 100, sum)?;
    /// assert_eq!(sums.len(), 10);
    /// assert_eq!(sums.iter().sum::<u64>(), 499_500);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The first chunk's failure (as [`map`](Pool::map)); [`TaskError::Encode`] for
    /// `chunk_len` 0; [`TaskError::Closed`] if the pool takes no more work.
    pub fn map_chunks<T, R, F, S>(
        &self,
        data: &S,
        chunk_len: usize,
        f: F,
    ) -> Result<Vec<R>, TaskError>
    where
        S: SharedSlice<T> + ?Sized,
        T: ShmSafe,
        F: Fn(&[T]) -> R + Copy + 'static,
        R: Serialize + DeserializeOwned,
    {
        self.map_chunks_each(data, chunk_len, f)?
            .into_iter()
            .collect()
    }

    /// [`map_chunks`](Pool::map_chunks) giving every chunk's own outcome (chunk `i` is
    /// elements `i * chunk_len ..`).
    ///
    /// # Errors
    ///
    /// Only what stops the whole call: `chunk_len` 0, or a pool that takes no more work.
    pub fn map_chunks_each<T, R, F, S>(
        &self,
        data: &S,
        chunk_len: usize,
        _f: F,
    ) -> Result<Vec<Result<R, TaskError>>, TaskError>
    where
        S: SharedSlice<T> + ?Sized,
        T: ShmSafe,
        F: Fn(&[T]) -> R + Copy + 'static,
        R: Serialize + DeserializeOwned,
    {
        #[allow(clippy::let_unit_value)]
        let () = ZeroSized::<F>::CHECK;
        let (seg, offset, len, _guard) = data.lease(sealed::Token(()));
        self.run_chunks::<T, R>(
            seg,
            offset,
            len,
            chunk_len,
            false,
            (read_entry::<F, T, R>, type_hash::<F, T, R>()),
        )
    }

    /// `for chunk in array.chunks_mut(chunk_len) { f(chunk) }` in the workers, **in
    /// place**: the workers write the array's shared memory directly, no element crosses
    /// a ring (rayon's `par_chunks_mut().for_each()`).
    ///
    /// The aliasing contract, enforced: chunks are disjoint and each goes to exactly one
    /// worker; the pool holds the array's lock for the whole call, so no process that
    /// locks it can touch the elements meanwhile (`f` must not lock it). A chunk whose
    /// worker died (or whose `f` panicked) may be half written: it is reported, never
    /// re-run (not even with `retries`), and the array is left
    /// [poisoned](Array::is_poisoned) for the caller to check and
    /// [clear](Array::clear_poison).
    ///
    /// ```
    /// use procshare::{Array, Pool};
    ///
    /// fn double(chunk: &mut [f64]) {
    ///     chunk.iter_mut().for_each(|x| *x *= 2.0);
    /// }
    ///
    /// let pool = Pool::new(2)?;
    /// let data = Array::from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0])?;
    /// pool.for_each_chunk_mut(&data, 2, double)?;
    /// assert_eq!(data.to_vec(), [2.0, 4.0, 6.0, 8.0, 10.0]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The first chunk's failure; as [`map_chunks`](Pool::map_chunks) otherwise.
    pub fn for_each_chunk_mut<T, F>(
        &self,
        array: &Array<T>,
        chunk_len: usize,
        f: F,
    ) -> Result<(), TaskError>
    where
        T: ShmSafe + Send,
        F: Fn(&mut [T]) + Copy + 'static,
    {
        self.for_each_chunk_mut_each(array, chunk_len, f)?
            .into_iter()
            .collect()
    }

    /// [`for_each_chunk_mut`](Pool::for_each_chunk_mut) giving every chunk's own outcome
    /// (chunk `i` is elements `i * chunk_len ..`): the chunks that failed are exactly the
    /// ranges that may be half written.
    ///
    /// # Errors
    ///
    /// Only what stops the whole call: `chunk_len` 0, or a pool that takes no more work.
    pub fn for_each_chunk_mut_each<T, F>(
        &self,
        array: &Array<T>,
        chunk_len: usize,
        _f: F,
    ) -> Result<Vec<Result<(), TaskError>>, TaskError>
    where
        T: ShmSafe + Send,
        F: Fn(&mut [T]) + Copy + 'static,
    {
        #[allow(clippy::let_unit_value)]
        let () = ZeroSized::<F>::CHECK;
        let (seg, offset, len, guard) = array.lease(sealed::Token(()));
        let out = self.run_chunks::<T, ()>(
            seg,
            offset,
            len,
            chunk_len,
            true,
            (write_entry::<F, T>, type_hash::<F, T, ()>()),
        )?;
        if out.iter().any(Result::is_err) {
            if let Some(g) = &guard {
                g.poison();
            }
        }
        Ok(out)
    }
}
