//! The producer side: reserving and publishing records, single and chunked sends.

use std::sync::atomic::Ordering;

use super::QueueError;
use super::hooks::{FailPoint, fail_point};
use super::record::{ALIGN, Kind, REC_HEADER, Rec, State, Word, record_len};
use super::shared::{Core, Role};
use crate::sync::eventcount::{Attempt, block_on, block_on_after_miss};
use crate::sys::Deadline;

/// A reserved record not yet published: if the caller's `fill` unwinds, the record is
/// published as padding, so nothing waits for it and nothing is sent.
struct Unpublished<'a> {
    core: &'a Core,
    rec: Rec,
}

impl Drop for Unpublished<'_> {
    fn drop(&mut self) {
        self.core.publish(self.rec, true);
    }
}

/// A payload length that passed `single_limit` (so it fits the word's 32 bits).
fn payload_len(len: usize) -> u32 {
    u32::try_from(len).expect("a record's payload is at most `single_limit`, below 2^32")
}

impl Core {
    /// Reserves a record with `len` payload bytes (plus padding if it would wrap). The
    /// caller holds the producer lock.
    fn reserve(&self, len: u32, kind: Kind) -> Result<Option<Rec>, QueueError> {
        let h = self.h();
        // We hold the producer lock: `tail` is ours to move.
        let tail = h.tail.load(Ordering::Acquire);
        let span = record_len(len);
        let off = tail & (self.cap() - 1);
        let to_end = self.cap() - off;
        let pad = if span > to_end { to_end } else { 0 };
        let free = self.free_for(tail, pad + span)?;
        if tail.wrapping_add(pad + span).wrapping_sub(free) > self.cap() {
            return Ok(None);
        }
        if pad > 0 {
            let r = self.rec_header(tail)?;
            r.own();
            r.set(Word {
                state: State::Ready,
                kind: Kind::Pad,
                // `pad < span`, so its payload is below this record's padded one.
                len: payload_len((pad - REC_HEADER) as usize),
            });
            fail_point(FailPoint::ReservePad);
        }
        let pos = tail.wrapping_add(pad);
        let rec = Rec { pos, kind, len };
        let r = self.rec_header(pos)?;
        r.own();
        r.set(rec.word(State::Writing));
        fail_point(FailPoint::ReserveWriting);
        // SYNC POINT: consumers acquire `tail` and then read the records before it.
        h.tail.store(pos.wrapping_add(span), Ordering::Release);
        Ok(Some(rec))
    }

    /// Makes a reserved record visible (or, with `discard`, turns it into padding that
    /// consumers skip unseen).
    pub(super) fn publish(&self, rec: Rec, discard: bool) {
        let h = self.h();
        if !discard && rec.kind.ends_message() {
            // Counted before it is visible, so the count never misses a claimable
            // message (see `resync_count`).
            h.sent.fetch_add(1, Ordering::SeqCst);
            fail_point(FailPoint::PublishCounted);
        }
        let kind = if discard { Kind::Pad } else { rec.kind };
        if let Ok(r) = self.rec_header(rec.pos) {
            // SYNC POINT: the payload written before this store is read after a consumer
            // acquires READY.
            r.set(Rec { kind, ..rec }.word(State::Ready));
        }
        h.not_empty.notify_all();
    }

    /// Sends one message of `len` bytes written by `fill`, waiting for room until
    /// `deadline`.
    pub(crate) fn send(
        &self,
        role: Role,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        self.may_send(len)?;
        self.send_open(role, len, fill, deadline)
    }

    /// The checks every send makes before it touches the ring, in one place so that no
    /// send path can skip one: this process's pid namespace, the size, `close`.
    fn may_send(&self, len: usize) -> Result<(), QueueError> {
        if self.foreign() {
            return Err(QueueError::ForeignPidNamespace);
        }
        if len > self.max_message {
            return Err(QueueError::MessageTooLarge {
                size: len,
                max: self.max_message,
            });
        }
        if self.h().closed.load(Ordering::Acquire) != 0 {
            return Err(QueueError::Closed);
        }
        Ok(())
    }

    /// [`send`](Self::send) after its checks (also used to hand a kept message back
    /// after `close`: it was in the queue before).
    pub(super) fn send_open(
        &self,
        role: Role,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        if len as u64 > self.single_limit() {
            let mut whole = vec![0u8; len];
            fill(&mut whole)?; // a panic here leaves nothing behind in shared memory
            return self.send_chunked(role, &[&whole], deadline);
        }
        self.send_single(role, len, fill, deadline)
    }

    /// Sends one message made of `parts` back to back, copying each part straight into
    /// the ring (no intermediate buffer even when the message is chunked).
    pub(crate) fn send_parts(
        &self,
        role: Role,
        parts: &[&[u8]],
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        self.may_send(len)?;
        if len as u64 > self.single_limit() {
            return self.send_chunked(role, parts, deadline);
        }
        self.send_single(
            role,
            len,
            |buf| {
                match parts {
                    // One part (a small encoded value): one plain copy.
                    [part] => buf.copy_from_slice(part),
                    _ => copy_parts(parts, 0, buf),
                }
                Ok(())
            },
            deadline,
        )
    }

    /// Sends a message of at most `single_limit` bytes in one record.
    fn send_single(
        &self,
        role: Role,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), QueueError>,
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        let rec = match self.reserve_now(payload_len(len)) {
            Some(rec) => rec,
            None => self.wait_for_room(role, deadline, true, || {
                let Some(_g) = self.lock_producer(deadline) else {
                    return Ok(None); // another producer holds it past our deadline
                };
                self.reserve(payload_len(len), Kind::Single)
            })?,
        };
        let pending = Unpublished { core: self, rec };
        // SAFETY: we reserved `rec`; no one reads a WRITING record's payload.
        let filled = fill(unsafe { self.payload(rec) });
        std::mem::forget(pending);
        self.publish(rec, filled.is_err());
        filled
    }

    /// The common case of a small send, tried before the general one: no partial
    /// message kept here, the producer lock free and needing no repair, and room now.
    /// The stores are [`reserve`](Core::reserve)'s, in its order; only the waiting
    /// around them is skipped. `None`: not now (or a corrupted position): nothing
    /// written, the general path tries again (and reports what it finds).
    #[inline]
    fn reserve_now(&self, len: u32) -> Option<Rec> {
        if self.has_partial.load(Ordering::Relaxed) {
            return None;
        }
        let _g = self.lock_producer_now()?;
        self.reserve(len, Kind::Single).ok().flatten()
    }

    /// Runs `try_reserve` until it finds room, waiting on `not_full` until `deadline`
    /// and checking for dead readers (whose records hold room) and for the receivers'
    /// disappearance meanwhile.
    fn wait_for_room(
        &self,
        role: Role,
        deadline: Deadline,
        polled: bool,
        try_reserve: impl Fn() -> Result<Option<Rec>, QueueError>,
    ) -> Result<Rec, QueueError> {
        // `polled`: the caller's quick attempt (`reserve_now`) has just missed.
        let wait = if polled {
            block_on_after_miss
        } else {
            block_on
        };
        let outcome = wait(
            &self.h().not_full,
            deadline,
            || {
                if self.has_partial.load(Ordering::Relaxed) {
                    self.pump_partial(); // see `lock_producer`
                }
                match try_reserve() {
                    Ok(Some(rec)) => Attempt::Ready(Ok(rec)),
                    Ok(None) => Attempt::Blocked,
                    Err(e) => Attempt::Ready(Err(e)),
                }
            },
            || {
                if self.free_dead_readers() || self.counterpart_alive(role, Role::Recv) {
                    return None;
                }
                Some(match try_reserve() {
                    Ok(Some(rec)) => Ok(rec),
                    Ok(None) => Err(QueueError::Disconnected),
                    Err(e) => Err(e),
                })
            },
        );
        match outcome {
            Some(r) => r,
            // Giving up. A `try_*` call never ran the periodic check above, so run it here
            // (the liveness part at most every `CHECK_EVERY`): a dead reader may have held
            // the room, or every receiver may be gone. Then one more attempt.
            None => {
                let repaired = self.free_dead_readers();
                let orphaned =
                    !repaired && self.check.due() && !self.counterpart_alive(role, Role::Recv);
                if !(repaired || orphaned) {
                    return Err(QueueError::Timeout);
                }
                match try_reserve()? {
                    Some(rec) => Ok(rec),
                    None if orphaned => Err(QueueError::Disconnected),
                    None => Err(QueueError::Timeout),
                }
            }
        }
    }

    /// Streams a message too large for one record as consecutive chunks, holding the
    /// producer lock throughout so no other producer's record lands in between. If the
    /// deadline passes (or the receivers go away) after some chunks are out, the message
    /// is abandoned: `stream` is cleared and consumers drop what they got of it.
    fn send_chunked(
        &self,
        role: Role,
        parts: &[&[u8]],
        deadline: Deadline,
    ) -> Result<(), QueueError> {
        let h = self.h();
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        let Some(_g) = self.lock_producer(deadline) else {
            return Err(QueueError::Timeout);
        };
        if deadline.has_passed() {
            // A `try_send`: start only if the whole message fits now (counting the
            // records released but not yet passed, see `release`).
            self.advance_free();
            let (free, _, tail) = self.positions()?;
            let room = self.cap() - tail.wrapping_sub(free);
            let chunks = (len as u64).div_ceil(self.single_limit() - 8);
            if len as u64 + chunks * (REC_HEADER + ALIGN) + self.cap() / 4 > room {
                return Err(QueueError::Timeout);
            }
        }
        let chunk = self.single_limit() as usize;
        let mut sent = 0usize;
        let mut first = true;
        while first || sent < len {
            let prefix = if first { 8 } else { 0 };
            let n = (len - sent).min(chunk - prefix);
            let kind = match (first, sent + n == len) {
                (true, true) => unreachable!("small messages are not chunked"),
                (true, false) => Kind::First,
                (false, false) => Kind::Middle,
                (false, true) => Kind::Last,
            };
            let rec = match self.wait_for_room(role, deadline, false, || {
                self.reserve(payload_len(prefix + n), kind)
            }) {
                Ok(rec) => rec,
                Err(e) => {
                    if !first {
                        // Abandon: consumers drop the chunks already out.
                        h.stream.store(0, Ordering::Release);
                        h.not_empty.notify_all();
                    }
                    return Err(e);
                }
            };
            if first {
                h.stream.store(rec.pos.wrapping_add(1), Ordering::Release);
                fail_point(FailPoint::StreamMarked);
            }
            // SAFETY: we reserved `rec`.
            let buf = unsafe { self.payload(rec) };
            if first {
                buf[..8].copy_from_slice(&(len as u64).to_le_bytes());
            }
            copy_parts(parts, sent, &mut buf[prefix..]);
            self.publish(rec, false);
            if first {
                fail_point(FailPoint::FirstPublished);
            }
            sent += n;
            first = false;
        }
        h.stream.store(0, Ordering::Release);
        fail_point(FailPoint::StreamCleared);
        Ok(())
    }
}

/// Copies bytes `offset..offset + dst.len()` of the concatenation of `parts` into `dst`.
fn copy_parts(parts: &[&[u8]], mut offset: usize, mut dst: &mut [u8]) {
    for part in parts {
        if dst.is_empty() {
            return;
        }
        if offset >= part.len() {
            offset -= part.len();
            continue;
        }
        let n = (part.len() - offset).min(dst.len());
        dst[..n].copy_from_slice(&part[offset..offset + n]);
        dst = &mut dst[n..];
        offset = 0;
    }
    assert!(
        dst.is_empty(),
        "copy_parts: the parts are shorter than the message"
    );
}
