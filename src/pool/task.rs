//! What crosses the rings: task and result frames, and how a worker finds the function.
//!
//! # Frames
//!
//! ```text
//! to a worker    [kind u8 = RUN][0; 7][chunk u64][entry u64][hash u64][n u64] args...
//!                [kind u8 = MAP][mut u8][0; 6][chunk u64][entry u64][hash u64][segment u64][offset u64][count u64]
//!                [kind u8 = FORGET][0; 7][segment u64]
//!                [kind u8 = EXIT][0; 7]
//! from a worker  [kind u8 = READY | INIT_FAILED | DONE][0; 7][chunk u64] payload...
//! ```
//!
//! All integers little-endian. `args` is postcard of the chunk's `[A]`; a `DONE` payload is
//! postcard of `Vec<Result<R, TaskError>>` (one per item, panics caught per item); an
//! `INIT_FAILED` payload is postcard of `(message, Option<location>)`. Frames are read from
//! shared memory, so every parse is bounds-checked and a bad frame is an error, never a
//! panic.
//!
//! A `MAP` frame (the zero-copy chunk maps) carries no data: it names a segment by the
//! pool's id for it (its descriptor reached the worker beforehand over the worker's control
//! socket, see `worker`), a byte offset into the segment's data area and an element
//! count. The worker bounds-checks both against its own mapping, and the trampoline checks
//! the element type's alignment, before it makes a slice. `FORGET` tells a worker to unmap
//! a segment whose last handle in the pool's process is gone.
//!
//! # Finding the function
//!
//! A task names its function as the offset of a monomorphized trampoline
//! `entry::<C, A, R>` from [`anchor`], plus a hash of the type names, as `Process::spawn`
//! names its function. The same code lies at the same offset from the anchor in every
//! worker, whatever its load address: a forked worker is a copy of the pool's process,
//! and a spawned or fork-server worker runs the same executable, which `Process::spawn`'s
//! handshake proved (device, inode, size and mtime of `/proc/self/exe`, compared before
//! the worker's own body, a plain `fn`, was found by its offset) before the worker read
//! any frame. The trampoline re-checks the hash before decoding anything and makes the
//! (zero-sized) function value from nothing, as `Process::spawn` does. The rings are
//! private to the pool and its workers (anonymous memfds, inherited by fork or passed as
//! descriptors in a spawned worker's argument, never named): a process that can write
//! them can already run code as the pool's user.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::TaskError;
use crate::process::{catch_panic, type_hash};

pub(crate) const RUN: u8 = 1;
pub(crate) const EXIT: u8 = 2;
pub(crate) const READY: u8 = 3;
pub(crate) const INIT_FAILED: u8 = 4;
pub(crate) const DONE: u8 = 5;
pub(crate) const MAP: u8 = 6;
pub(crate) const FORGET: u8 = 7;

pub(crate) const RUN_HEADER: usize = 40;
pub(crate) const MAP_LEN: usize = 56;
pub(crate) const REPLY_HEADER: usize = 16;

/// A task function the pool can call: `F: Fn(A) -> R` ([`One`]) or `Fn(A, B) -> R` on
/// pairs ([`Star`]). Zero-sized and `Copy`, so a worker can make its own.
pub(crate) trait Call<A, R>: Copy + 'static {
    fn call(self, arg: A) -> R;
}

/// `f(a)`.
#[derive(Clone, Copy)]
pub(crate) struct One<F>(pub(crate) F);

impl<F, A, R> Call<A, R> for One<F>
where
    F: Fn(A) -> R + Copy + 'static,
{
    fn call(self, arg: A) -> R {
        (self.0)(arg)
    }
}

/// `f(a, b)` for an argument `(a, b)` (Python's `starmap`).
#[derive(Clone, Copy)]
pub(crate) struct Star<F>(pub(crate) F);

impl<F, A, B, R> Call<(A, B), R> for Star<F>
where
    F: Fn(A, B) -> R + Copy + 'static,
{
    fn call(self, (a, b): (A, B)) -> R {
        (self.0)(a, b)
    }
}

/// Compile-time check that a task function carries no data.
pub(crate) struct ZeroSized<F>(std::marker::PhantomData<F>);

impl<F> ZeroSized<F> {
    pub(crate) const CHECK: () = assert!(
        std::mem::size_of::<F>() == 0,
        "Pool tasks must be fn items or closures that capture nothing (a worker makes its own \
         copy of the function from nothing); pass data through the argument"
    );
}

/// Runs a chunk: `(hash, args, n)` → the encoded results.
pub(crate) type Entry = fn(u64, &[u8], usize) -> Vec<u8>;

/// The fixed point entry offsets are measured from. Never inlined, so it has one address.
#[inline(never)]
fn anchor(_: u64, _: &[u8], _: usize) -> Vec<u8> {
    unreachable!("the pool anchor is never called")
}

/// The entry offset and type hash naming `C` for a task frame.
pub(crate) fn entry_of<C, A, R>() -> (u64, u64)
where
    C: Call<A, R>,
    A: DeserializeOwned,
    R: Serialize,
{
    let offset = (entry::<C, A, R> as Entry as usize).wrapping_sub(anchor as Entry as usize);
    (offset as u64, type_hash::<C, A, R>())
}

/// The trampoline for one `(C, A, R)`: runs in the worker.
fn entry<C, A, R>(hash: u64, args: &[u8], n: usize) -> Vec<u8>
where
    C: Call<A, R>,
    A: DeserializeOwned,
    R: Serialize,
{
    let fail =
        |e: TaskError| -> Vec<Result<R, TaskError>> { (0..n).map(|_| Err(e.clone())).collect() };
    let results = if hash != type_hash::<C, A, R>() {
        fail(TaskError::Decode(
            "the worker found a different function type at the task's entry point; the pool's \
             rings were overwritten"
                .into(),
        ))
    } else {
        // A user's `Deserialize` that panics fails the chunk it is in (`Panicked`), not
        // the worker.
        match catch_panic(|| postcard::from_bytes::<Vec<A>>(args))
            .map_err(|(message, location)| TaskError::Panicked { message, location })
        {
            Err(panicked) => fail(panicked),
            Ok(decoded) => match decoded {
                Ok(items) if items.len() == n => {
                    // SAFETY: `C` is zero-sized (checked at compile time where the task was
                    // submitted) and `Copy`, and the pool's process holds a value of it; a
                    // zero-sized value has no bytes, so this is a copy of that value, which
                    // `Copy` permits. Closures and fn items are inhabited and have no invalid
                    // values.
                    let f: C = unsafe { std::mem::zeroed() };
                    items
                        .into_iter()
                        .map(|a| {
                            catch_panic(|| f.call(a)).map_err(|(message, location)| {
                                TaskError::Panicked { message, location }
                            })
                        })
                        .collect()
                }
                Ok(items) => fail(TaskError::Decode(format!(
                    "the chunk held {} arguments, its frame said {n}",
                    items.len()
                ))),
                Err(e) => fail(TaskError::Decode(format!(
                    "the worker could not decode an argument of type {} ({e})",
                    std::any::type_name::<A>()
                ))),
            },
        }
    };
    encode_results(&results)
}

/// Encodes a chunk's results; an item whose result does not encode becomes
/// `Err(TaskError::Encode)` and the others keep their values.
fn encode_results<R: Serialize>(results: &[Result<R, TaskError>]) -> Vec<u8> {
    // A user's `Serialize` may panic: that is its item's failure (`Panicked`), never the
    // worker's death (which would fail the whole chunk as `WorkerDied`).
    if let Ok(Ok(bytes)) = catch_panic(|| postcard::to_allocvec(results)) {
        return bytes;
    }
    // postcard writes a sequence as its length then the items, and `Result<R, E>::Err`
    // the same way whatever `R` is: so encode item by item.
    let mut out = postcard::to_allocvec(&vec![(); results.len()]).unwrap_or_default();
    for r in results {
        let failed = match catch_panic(|| postcard::to_allocvec(r)) {
            Ok(Ok(b)) => {
                out.extend_from_slice(&b);
                continue;
            }
            Ok(Err(e)) => TaskError::Encode(format!(
                "the worker could not encode a result of type {} ({e})",
                std::any::type_name::<R>()
            )),
            Err((message, location)) => TaskError::Panicked { message, location },
        };
        let err: Result<(), TaskError> = Err(failed);
        out.extend_from_slice(&postcard::to_allocvec(&err).unwrap_or_default());
    }
    out
}

/// The encoded results of a one-item chunk that failed with `e`.
pub(crate) fn encode_one_error(e: TaskError) -> Vec<u8> {
    encode_results::<()>(&[Err(e)])
}

/// Decodes a chunk's results in the pool's process.
pub(crate) fn decode_results<R: DeserializeOwned>(
    bytes: &[u8],
    n: usize,
) -> Vec<Result<R, TaskError>> {
    let all = |e: TaskError| (0..n).map(|_| Err(e.clone())).collect();
    match postcard::from_bytes::<Vec<Result<R, TaskError>>>(bytes) {
        Ok(v) if v.len() == n => v,
        Ok(v) => all(TaskError::Decode(format!(
            "a worker returned {} results for a chunk of {n}",
            v.len()
        ))),
        Err(e) => all(TaskError::Decode(format!(
            "the pool could not decode a result of type {} ({e})",
            std::any::type_name::<R>()
        ))),
    }
}

/// Decodes a chunk's `n` results in the pool's process straight onto `out` (no vector of
/// `Result`s in between), for `map`: `Err` with the first failure, judged exactly as
/// [`decode_results`] followed by a scan would (a chunk that does not decode, or holds
/// another number of results, is [`TaskError::Decode`] whatever its items say). On `Err`,
/// `out` holds a part of the chunk's values, for the caller to discard.
pub(crate) fn decode_results_into<R: DeserializeOwned>(
    bytes: &[u8],
    n: usize,
    out: &mut Vec<R>,
) -> Result<(), TaskError> {
    let mut first = None;
    let seed = ResultsInto {
        out,
        first: &mut first,
    };
    let mut de = postcard::Deserializer::from_bytes(bytes);
    match serde::de::DeserializeSeed::deserialize(seed, &mut de) {
        Ok(count) if count == n => first.map_or(Ok(()), Err),
        Ok(count) => Err(TaskError::Decode(format!(
            "a worker returned {count} results for a chunk of {n}"
        ))),
        Err(e) => Err(TaskError::Decode(format!(
            "the pool could not decode a result of type {} ({e})",
            std::any::type_name::<R>()
        ))),
    }
}

/// Decodes the results of a one-item chunk, as [`decode_results`]`(bytes, 1)` would,
/// without a vector: postcard writes a one-element sequence as the length 1 (a varint)
/// then the element, which are the bytes of the pair `(1usize, element)`.
pub(crate) fn decode_one<R: DeserializeOwned>(bytes: &[u8]) -> Result<R, TaskError> {
    match postcard::from_bytes::<(usize, Result<R, TaskError>)>(bytes) {
        Ok((1, r)) => r,
        // Another count, or bytes that are no pair: the general path says which.
        _ => decode_results(bytes, 1)
            .into_iter()
            .next()
            .unwrap_or(Err(TaskError::Decode("a worker returned no result".into()))),
    }
}

/// Visits a chunk's `Vec<Result<R, TaskError>>`: values go onto `out` until the first
/// failure, which is kept; the rest is still decoded (and dropped), to count and check it.
struct ResultsInto<'a, R> {
    out: &'a mut Vec<R>,
    first: &'a mut Option<TaskError>,
}

impl<'de, R: serde::Deserialize<'de>> serde::de::DeserializeSeed<'de> for ResultsInto<'_, R> {
    type Value = usize;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, R: serde::Deserialize<'de>> serde::de::Visitor<'de> for ResultsInto<'_, R> {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of task results")
    }

    fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<usize, S::Error> {
        let mut count = 0usize;
        while let Some(r) = seq.next_element::<Result<R, TaskError>>()? {
            count += 1;
            match r {
                Ok(v) if self.first.is_none() => self.out.push(v),
                Ok(_) => {}
                Err(e) => {
                    self.first.get_or_insert(e);
                }
            }
        }
        Ok(count)
    }
}

/// Runs a task frame's chunk in the worker. `entry` and `hash` come from shared memory.
pub(crate) fn run_chunk(entry: u64, hash: u64, args: &[u8], n: usize) -> Vec<u8> {
    let address = (anchor as Entry as usize).wrapping_add(entry as usize);
    // SAFETY: the worker is a fork of the pool's process or runs the same executable
    // (checked by `Process::spawn`'s handshake before the worker started; see the module
    // docs), so `anchor + offset` here is the pool's `entry::<C, A, R>` for the offset it
    // wrote: a function of type `Entry`, which re-checks the type hash before using
    // anything. A function pointer and a usize have
    // the same size on every Linux target. (Only the pool's process and its workers map the
    // ring the offset was read from; see the module docs.)
    let f: Entry = unsafe { std::mem::transmute::<usize, Entry>(address) };
    f(hash, args, n)
}

/// Runs a zero-copy chunk: `(hash, region, region_len, offset, count)` → the encoded
/// result (one item).
///
/// # Safety
///
/// `region` must be valid for reads and writes of `region_len` bytes for the call, and
/// nothing else may access the bytes the frame names (`offset`, `count` elements) meanwhile.
pub(crate) type ChunkEntry = unsafe fn(u64, *mut u8, usize, usize, usize) -> Vec<u8>;

/// The elements a `MAP` frame names, as a pointer into `region`, or why they cannot be.
fn chunk_ptr<T>(
    region: *mut u8,
    region_len: usize,
    offset: usize,
    count: usize,
) -> Result<*mut T, TaskError> {
    let end = count
        .checked_mul(size_of::<T>())
        .and_then(|bytes| bytes.checked_add(offset));
    if end.is_none_or(|end| end > region_len) {
        return Err(TaskError::Decode(format!(
            "a chunk of {count} elements at byte {offset} lies outside the worker's {region_len}              byte mapping of the segment; the pool's rings were overwritten"
        )));
    }
    let ptr = region.wrapping_add(offset);
    if ptr as usize % align_of::<T>() != 0 {
        return Err(TaskError::Decode(format!(
            "a chunk at byte {offset} is not aligned for {}; the pool's rings were overwritten",
            std::any::type_name::<T>()
        )));
    }
    Ok(ptr.cast::<T>())
}

fn hash_mismatch() -> TaskError {
    TaskError::Decode(
        "the worker found a different function type at the task's entry point; the pool's \
         rings were overwritten"
            .into(),
    )
}

/// The trampoline for `map_chunks`: `f(&chunk)`.
///
/// # Safety
///
/// As [`ChunkEntry`].
pub(crate) unsafe fn read_entry<F, T, R>(
    hash: u64,
    region: *mut u8,
    region_len: usize,
    offset: usize,
    count: usize,
) -> Vec<u8>
where
    F: Fn(&[T]) -> R + Copy + 'static,
    T: crate::ShmSafe,
    R: Serialize,
{
    let r = if hash != type_hash::<F, T, R>() {
        Err(hash_mismatch())
    } else {
        chunk_ptr::<T>(region, region_len, offset, count).and_then(|p| {
            // SAFETY: `p` lies inside `region` with room for `count` T (checked above) and
            // is aligned; T is ShmSafe, so any bytes are a valid T; the caller guarantees
            // nobody writes these elements during the call (the pool holds the array's
            // lock and gives every chunk to one worker).
            let chunk = unsafe { std::slice::from_raw_parts(p, count) };
            // SAFETY: `F` is zero-sized and Copy, as in `entry`.
            let f: F = unsafe { std::mem::zeroed() };
            catch_panic(|| f(chunk))
                .map_err(|(message, location)| TaskError::Panicked { message, location })
        })
    };
    encode_results(&[r])
}

/// The trampoline for `for_each_chunk_mut`: `f(&mut chunk)`.
///
/// # Safety
///
/// As [`ChunkEntry`].
pub(crate) unsafe fn write_entry<F, T>(
    hash: u64,
    region: *mut u8,
    region_len: usize,
    offset: usize,
    count: usize,
) -> Vec<u8>
where
    F: Fn(&mut [T]) + Copy + 'static,
    T: crate::ShmSafe,
{
    let r = if hash != type_hash::<F, T, ()>() {
        Err(hash_mismatch())
    } else {
        chunk_ptr::<T>(region, region_len, offset, count).and_then(|p| {
            // SAFETY: as in `read_entry`; and no one else reads or writes these elements
            // during the call (the caller's contract), so a unique reference is sound.
            let chunk = unsafe { std::slice::from_raw_parts_mut(p, count) };
            // SAFETY: `F` is zero-sized and Copy, as in `entry`.
            let f: F = unsafe { std::mem::zeroed() };
            catch_panic(|| f(chunk))
                .map_err(|(message, location)| TaskError::Panicked { message, location })
        })
    };
    encode_results(&[r])
}

/// The entry offset of a chunk trampoline (as [`entry_of`]).
pub(crate) fn chunk_entry_offset(f: ChunkEntry) -> u64 {
    (f as usize).wrapping_sub(anchor as Entry as usize) as u64
}

/// Runs a `MAP` frame's chunk in the worker.
///
/// # Safety
///
/// As [`ChunkEntry`] for `region`, `region_len`, `offset` and `count`.
pub(crate) unsafe fn run_map(
    entry: u64,
    hash: u64,
    region: *mut u8,
    region_len: usize,
    offset: usize,
    count: usize,
) -> Vec<u8> {
    let address = (anchor as Entry as usize).wrapping_add(entry as usize);
    // SAFETY: as in `run_chunk`: the worker is a fork of the pool's process or runs the
    // same executable, so this is the pool's `read_entry`/`write_entry` for the offset it
    // wrote, which re-checks the
    // type hash before touching the region.
    let f: ChunkEntry = unsafe { std::mem::transmute::<usize, ChunkEntry>(address) };
    // SAFETY: forwarded from the caller.
    unsafe { f(hash, region, region_len, offset, count) }
}

/// A `MAP` frame.
pub(crate) fn map_frame(
    chunk: u64,
    mutable: bool,
    entry: u64,
    hash: u64,
    segment: u64,
    offset: usize,
    count: usize,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(MAP_LEN);
    f.extend_from_slice(&[MAP, u8::from(mutable), 0, 0, 0, 0, 0, 0]);
    for w in [chunk, entry, hash, segment, offset as u64, count as u64] {
        f.extend_from_slice(&w.to_le_bytes());
    }
    f
}

/// A task frame for `items`, encoded straight after its header (one buffer, no copy).
pub(crate) fn encode_run_frame<A: Serialize>(
    chunk: u64,
    entry: u64,
    hash: u64,
    items: &[A],
) -> postcard::Result<Vec<u8>> {
    // A guess that fits small plain arguments at once (postcard's varints are no longer
    // than the value); the buffer grows for anything else.
    let mut f = Vec::with_capacity(RUN_HEADER + 1 + std::mem::size_of_val(items));
    f.extend_from_slice(&[RUN, 0, 0, 0, 0, 0, 0, 0]);
    for w in [chunk, entry, hash, items.len() as u64] {
        f.extend_from_slice(&w.to_le_bytes());
    }
    postcard::to_extend(items, f)
}

/// A reply frame: header then the payload.
pub(crate) fn reply_frame(kind: u8, chunk: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(REPLY_HEADER + payload.len());
    f.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&chunk.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

pub(crate) fn word(bytes: &[u8], at: usize) -> Option<u64> {
    let w = bytes.get(at..at + 8)?;
    Some(u64::from_le_bytes(w.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_encode_item_by_item_when_one_fails() {
        struct Bad;
        impl Serialize for Bad {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        #[derive(Serialize)]
        enum Maybe {
            Good(u32),
            Bad(Bad),
        }
        let bytes = encode_results(&[Ok(Maybe::Good(1)), Ok(Maybe::Bad(Bad)), Ok(Maybe::Good(3))]);
        #[derive(serde::Deserialize, Debug, PartialEq)]
        enum MaybeOut {
            Good(u32),
            Bad(()),
        }
        let mut values: Vec<MaybeOut> = Vec::new();
        let first = decode_results_into(&bytes, 3, &mut values);
        assert!(matches!(first, Err(TaskError::Encode(_))));
        assert_eq!(values, [MaybeOut::Good(1)]);
        assert!(matches!(
            decode_results_into(&bytes, 2, &mut values),
            Err(TaskError::Decode(m)) if m.contains("3 results for a chunk of 2")
        ));
        assert!(matches!(
            decode_results_into(&bytes[..bytes.len() - 1], 3, &mut values),
            Err(TaskError::Decode(_))
        ));
        assert_eq!(decode_one::<u64>(&encode_results(&[Ok(7u64)])), Ok(7));
        assert!(matches!(
            decode_one::<u64>(&encode_results(&[Ok(7u64), Ok(8)])),
            Err(TaskError::Decode(m)) if m.contains("2 results for a chunk of 1")
        ));
        assert!(matches!(
            decode_one::<u64>(&encode_one_error(TaskError::Closed)),
            Err(TaskError::Closed)
        ));
        assert!(matches!(decode_one::<u64>(&[]), Err(TaskError::Decode(_))));
        let ok = encode_results(&[Ok(7u64), Ok(8)]);
        let mut values: Vec<u64> = vec![1];
        assert_eq!(decode_results_into(&ok, 2, &mut values), Ok(()));
        assert_eq!(values, [1, 7, 8]);
        let out: Vec<Result<MaybeOut, TaskError>> = decode_results(&bytes, 3);
        assert_eq!(out[0], Ok(MaybeOut::Good(1)));
        assert!(matches!(out[1], Err(TaskError::Encode(_))));
        assert_eq!(out[2], Ok(MaybeOut::Good(3)));
    }

    fn sum(c: &[u32]) -> u64 {
        c.iter().map(|&x| u64::from(x)).sum()
    }

    fn bump(c: &mut [u32]) {
        c.iter_mut().for_each(|x| *x += 1);
    }

    #[test]
    fn chunk_entries_check_bounds_alignment_and_type() {
        let mut buf = vec![0u32; 16];
        for (i, x) in buf.iter_mut().enumerate() {
            *x = i as u32;
        }
        let region = buf.as_mut_ptr().cast::<u8>();
        let len = buf.len() * 4;
        let read = |offset, count, hash| {
            // SAFETY: `region` is `len` bytes of `buf`, which nothing else touches here.
            let out = unsafe {
                read_entry::<fn(&[u32]) -> u64, u32, u64>(hash, region, len, offset, count)
            };
            decode_results::<u64>(&out, 1).remove(0)
        };
        let hash = type_hash::<fn(&[u32]) -> u64, u32, u64>();
        // (The trampoline makes the zero-sized `F` from nothing; a fn pointer is not
        // zero-sized, so only failures that stop before that are exercised with it.)
        assert!(matches!(read(0, 17, hash), Err(TaskError::Decode(m)) if m.contains("outside")));
        assert!(matches!(read(4, 16, hash), Err(TaskError::Decode(_))));
        assert!(matches!(
            read(usize::MAX, 2, hash),
            Err(TaskError::Decode(_))
        ));
        assert!(matches!(
            read(0, usize::MAX, hash),
            Err(TaskError::Decode(_))
        ));
        assert!(matches!(read(2, 1, hash), Err(TaskError::Decode(m)) if m.contains("aligned")));
        assert!(
            matches!(read(0, 1, hash ^ 1), Err(TaskError::Decode(m)) if m.contains("different function"))
        );
        assert_eq!(
            chunk_ptr::<u32>(region, len, 8, 14).ok(),
            Some(region.wrapping_add(8).cast())
        );
    }

    #[test]
    fn chunk_entries_read_and_write_in_place() {
        #[allow(clippy::let_unit_value)]
        fn run<F: Fn(&[u32]) -> u64 + Copy + 'static>(
            _: F,
            buf: &mut [u32],
            offset: usize,
            count: usize,
        ) -> Vec<u8> {
            let () = ZeroSized::<F>::CHECK;
            // SAFETY: the region is `buf`, which nothing else touches during the call.
            unsafe {
                read_entry::<F, u32, u64>(
                    type_hash::<F, u32, u64>(),
                    buf.as_mut_ptr().cast(),
                    buf.len() * 4,
                    offset,
                    count,
                )
            }
        }
        #[allow(clippy::let_unit_value)]
        fn run_mut<F: Fn(&mut [u32]) + Copy + 'static>(
            _: F,
            buf: &mut [u32],
            offset: usize,
            count: usize,
        ) -> Vec<u8> {
            let () = ZeroSized::<F>::CHECK;
            // SAFETY: as above.
            unsafe {
                write_entry::<F, u32>(
                    type_hash::<F, u32, ()>(),
                    buf.as_mut_ptr().cast(),
                    buf.len() * 4,
                    offset,
                    count,
                )
            }
        }
        let mut buf: Vec<u32> = (0..10).collect();
        let out = run(sum, &mut buf, 8, 3);
        assert_eq!(decode_results::<u64>(&out, 1), vec![Ok(2 + 3 + 4)]);
        let out = run_mut(bump, &mut buf, 4 * 5, 5);
        assert_eq!(decode_results::<()>(&out, 1), vec![Ok(())]);
        assert_eq!(buf, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]);
        // (A panicking `f` is tested with real workers: `catch_panic` forgets the panic's
        // payload on purpose, which Miri reports as a leak.)
    }

    #[test]
    fn frames_round_trip() {
        let f = encode_run_frame(7, 8, 9, &[300u32, 2]).unwrap();
        assert_eq!(f[0], RUN);
        assert_eq!(word(&f, 8), Some(7));
        assert_eq!(word(&f, 16), Some(8));
        assert_eq!(word(&f, 24), Some(9));
        assert_eq!(word(&f, 32), Some(2));
        assert_eq!(
            &f[RUN_HEADER..],
            postcard::to_allocvec(&[300u32, 2][..]).unwrap()
        );
        assert_eq!(word(&f, 48), None);
    }
}
