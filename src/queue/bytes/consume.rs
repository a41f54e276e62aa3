//! The consumer side: claiming, reading and releasing records.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::QueueError;
use super::hooks::{FailPoint, fail_point};
use super::partial::Assembly;
use super::record::{Kind, Rec, State};
use super::shared::{Core, Role};
use crate::queue::peers;
use crate::sync::eventcount::{Attempt, block_on_after_miss};
use crate::sys::Deadline;

/// A release moves `free` itself once this fraction of the ring is done behind it (see
/// [`Core::release`]).
const FREE_BATCH: u64 = 8;

/// How a receive attempt ended, before the payload is handed to the caller.
enum Got {
    /// A whole single-record message, claimed and ready to read in place.
    InPlace(Rec),
    /// A reassembled chunked message.
    Assembled(Vec<u8>),
}

/// A claimed record lent to the caller's `f`: released when `f` returns or unwinds (a
/// message whose reader panicked is consumed).
struct Claimed<'a> {
    core: &'a Core,
    rec: Rec,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.core.release(self.rec);
    }
}

impl Core {
    /// The READY message record at `head`, not yet claimed: skips padding and finishes
    /// what a consumer that died holding the consumer lock left half done (see the state
    /// table). `Ok(None)`: nothing ready at `head`. The caller holds the consumer lock.
    pub(super) fn peek(&self) -> Result<Option<Rec>, QueueError> {
        let h = self.h();
        loop {
            // We hold the consumer lock: `head` is ours to move.
            let head = h.head.load(Ordering::Acquire);
            let tail = self.tail_for(head)?;
            if head == tail {
                return Ok(None);
            }
            let (state, rec) = self.read_record(head, tail)?;
            match state {
                State::Ready if rec.kind == Kind::Pad => {
                    self.rec_header(head)?.set(rec.word(State::Done));
                    fail_point(FailPoint::ClaimPadDone);
                    h.head
                        .store(head.wrapping_add(rec.span()), Ordering::Release);
                    self.advance_free();
                }
                State::Ready => return Ok(Some(rec)),
                State::Writing => return Ok(None),
                // Only a holder of the consumer lock marks the record at `head`, and it
                // moves `head` on before letting go. We hold the lock, so the one that
                // marked this record died between its two stores (the robust lock passed
                // to us only on the kernel's word that it is gone). Finish its step:
                // skipped padding is passed, and a message claimed but never handed to
                // its reader goes to the next one, us.
                State::Done => {
                    h.head
                        .store(head.wrapping_add(rec.span()), Ordering::Release);
                    self.advance_free();
                }
                State::Reading => {
                    self.rec_header(head)?
                        .replace(rec.word(State::Reading), rec.word(State::Ready));
                }
            }
        }
    }

    /// Claims the record `peek` returned. The caller holds the consumer lock.
    pub(super) fn take(&self, rec: Rec) -> Result<(), QueueError> {
        let h = self.h();
        let r = self.rec_header(rec.pos)?;
        r.own();
        r.set(rec.word(State::Reading));
        fail_point(FailPoint::ClaimReading);
        h.head
            .store(rec.pos.wrapping_add(rec.span()), Ordering::Release);
        fail_point(FailPoint::ClaimHead);
        if rec.kind.ends_message() {
            // Only holders of the consumer lock write `taken`: no read-modify-write.
            let taken = h.taken.load(Ordering::Relaxed);
            h.taken.store(taken.wrapping_add(1), Ordering::Release);
        }
        Ok(())
    }

    /// Marks a claimed record consumed. `free` moves over finished records only when a
    /// producer waits for room or a batch of them is done (`cap / FREE_BATCH` bytes
    /// behind this record); otherwise a later release, or the producer that needs the
    /// room ([`free_for`](Core::free_for)), moves it. One compare-and-swap and one
    /// wake-up check per batch instead of per message.
    pub(super) fn release(&self, rec: Rec) {
        if let Ok(r) = self.rec_header(rec.pos) {
            r.set(rec.word(State::Done));
        }
        fail_point(FailPoint::ReleaseDone);
        let h = self.h();
        let done_to = rec.pos.wrapping_add(rec.span());
        let behind = done_to.wrapping_sub(h.free.load(Ordering::Relaxed));
        // SYNC POINT: `has_waiters` is `not_full`'s notify read-modify-write, after the
        // DONE store: a producer that announced after it sees the DONE in its own
        // attempt and moves `free` itself; one announced before is seen here.
        if behind >= self.cap() / FREE_BATCH || h.not_full.has_waiters() {
            self.advance_free();
        }
    }

    /// Moves `free` over the `DONE` records behind `head`, waking producers if it moved.
    pub(super) fn advance_free(&self) {
        let h = self.h();
        let mut freed = false;
        let Ok((mut free, mut head, _)) = self.positions() else {
            return;
        };
        // `free` comes from our own swap (or the one that beat it), `head` is loaded
        // again after each move, as `positions` would (only `tail` is not needed here).
        while free != head && head.wrapping_sub(free) <= self.cap() {
            match self.read_record(free, head) {
                Ok((State::Done, rec)) => {
                    let next = free.wrapping_add(rec.span());
                    match h
                        .free
                        .compare_exchange(free, next, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => {
                            freed = true;
                            free = next;
                        }
                        Err(now) => free = now,
                    }
                    head = h.head.load(Ordering::Acquire);
                }
                _ => break,
            }
        }
        if freed {
            h.not_full.notify_all();
        }
    }

    /// Called with the consumer lock held when `head == tail` was seen: every message
    /// counted in `sent` has been claimed (or was never published: its producer was killed
    /// between counting it and publishing it, and the record became padding), so `taken`
    /// catches up with `sent`, which a peer killed between a record store and its count
    /// update left apart. `sent` is loaded *before* the positions: a producer counts after
    /// reserving, so if its increment is in `s`, its reservation is in `tail`, and with
    /// `head == tail` that message was claimed (or skipped); a message counted after the
    /// load is still to be claimed and stays counted (`sent - taken` is then 1). Only
    /// holders of the consumer lock, which we hold, write `taken`.
    fn resync_count(&self) {
        let h = self.h();
        let s = h.sent.load(Ordering::SeqCst);
        if s == h.taken.load(Ordering::Relaxed) {
            return;
        }
        if let Ok((_, head, tail)) = self.positions() {
            if head == tail {
                h.taken.store(s, Ordering::Release);
            }
        }
    }

    /// Receives one message and hands its bytes to `f`, waiting until `deadline`.
    pub(crate) fn recv<R>(
        &self,
        role: Role,
        deadline: Deadline,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, QueueError> {
        if self.foreign() {
            return Err(QueueError::ForeignPidNamespace);
        }
        if let Some(rec) = self.take_now() {
            return Ok(self.read_claimed(rec, f));
        }
        let outcome = block_on_after_miss(
            &self.h().not_empty,
            deadline,
            || match self.try_take(deadline) {
                Ok(Some(got)) => Attempt::Ready(Ok(got)),
                Ok(None) => Attempt::Blocked,
                Err(e) => Attempt::Ready(Err(e)),
            },
            || {
                let repaired = self.finish_dead_writer(deadline);
                if repaired || self.counterpart_alive(role, Role::Send) {
                    return None; // look again: the repair may have uncovered a message
                }
                // Nobody else can ever send; deliver what is left, then report it.
                Some(match self.try_take(Deadline::after(Duration::ZERO)) {
                    Ok(Some(got)) => Ok(got),
                    Ok(None) => Err(QueueError::Disconnected),
                    Err(e) => Err(e),
                })
            },
        );
        let got = match outcome {
            Some(got) => got?,
            // Giving up. A `try_*` call never ran the periodic check above, so run it here
            // (the liveness part at most every `CHECK_EVERY`): a dead writer may block
            // `head`, or every sender may be gone. Then one more attempt.
            None => {
                let repaired = self.finish_dead_writer(deadline);
                let orphaned =
                    !repaired && self.check.due() && !self.counterpart_alive(role, Role::Send);
                if !(repaired || orphaned) {
                    return Err(QueueError::Timeout);
                }
                match self.try_take(Deadline::after(Duration::ZERO))? {
                    Some(got) => got,
                    None if orphaned => return Err(QueueError::Disconnected),
                    None => return Err(QueueError::Timeout),
                }
            }
        };
        match got {
            Got::InPlace(rec) => Ok(self.read_claimed(rec, f)),
            Got::Assembled(bytes) => Ok(f(&bytes)),
        }
    }

    /// Lends the payload of `rec`, which this thread claimed, to `f`, then releases it
    /// (also if `f` unwinds).
    #[inline]
    fn read_claimed<R>(&self, rec: Rec, f: impl FnOnce(&[u8]) -> R) -> R {
        let claimed = Claimed { core: self, rec };
        // SAFETY: we claimed `rec` (READING); producers do not reuse it before we release
        // it, and other consumers skip claimed records.
        let r = f(unsafe { self.payload(rec) });
        drop(claimed);
        r
    }

    /// The common case of a receive, tried before the general one: no partial message
    /// kept here, the consumer lock free and needing no repair, and a whole
    /// single-record message `READY` at `head` (with no `keeper` to clear). Its claim is
    /// [`take`](Core::take)'s stores, as in [`try_take`](Core::try_take) after
    /// [`peek`](Core::peek) found that record; only the waiting around them is skipped.
    /// `None`: not now, or not this simple (padding or a dead peer's record at `head`, a
    /// corrupted word): nothing written, the general path looks again (and repairs, or
    /// reports, what it finds).
    #[inline]
    fn take_now(&self) -> Option<Rec> {
        if self.has_partial.load(Ordering::Relaxed) {
            return None;
        }
        let _g = self.lock_consumer_now()?;
        let h = self.h();
        // We hold the consumer lock: `head` is ours to move.
        let head = h.head.load(Ordering::Acquire);
        let tail = self.tail_for(head).ok()?;
        if head == tail {
            return None;
        }
        let (state, rec) = self.read_record(head, tail).ok()?;
        if state != State::Ready
            || rec.kind != Kind::Single
            || h.keeper.load(Ordering::Relaxed) != 0
        {
            return None;
        }
        self.take(rec).ok()?;
        Some(rec)
    }

    /// One attempt to claim a message (or finish a kept one) under the consumer lock,
    /// taken by `deadline`; `Ok(None)` if there is none now.
    fn try_take(&self, deadline: Deadline) -> Result<Option<Got>, QueueError> {
        let h = self.h();
        let Some(g) = self.lock_consumer(deadline) else {
            return Ok(None); // another consumer holds it past our deadline
        };
        if self.has_partial.load(Ordering::Relaxed) {
            if let Some(p) = self.take_partial() {
                let me = peers::current_process();
                if p.owner == me && p.bytes.len() == p.total {
                    return Ok(Some(Got::Assembled(p.bytes)));
                }
                if p.owner == me && h.keeper.load(Ordering::Acquire) == me {
                    match self.assemble(p, deadline)? {
                        Assembly::Done(bytes) => return Ok(Some(Got::Assembled(bytes))),
                        Assembly::Kept => return Ok(None),
                        Assembly::Abandoned => {}
                    }
                }
                // Otherwise the message was abandoned (or this is a forked copy of
                // another process's partial): drop it.
            }
        }
        loop {
            let Some(rec) = self.peek()? else {
                let (_, head, tail) = self.positions()?;
                if head == tail {
                    self.resync_count();
                    if h.closed.load(Ordering::Acquire) != 0 {
                        return Err(QueueError::Closed);
                    }
                }
                return Ok(None);
            };
            match rec.kind {
                Kind::Single | Kind::First => {
                    // A message starts here, so whatever a keeper kept was abandoned by
                    // its producer (chunks are consecutive).
                    if h.keeper.load(Ordering::Relaxed) != 0 {
                        self.set_keeper(0);
                    }
                    self.take(rec)?;
                    if rec.kind == Kind::Single {
                        drop(g);
                        return Ok(Some(Got::InPlace(rec)));
                    }
                    let p = self.start_partial(rec)?;
                    match self.assemble(p, deadline)? {
                        Assembly::Done(bytes) => return Ok(Some(Got::Assembled(bytes))),
                        Assembly::Kept => return Ok(None),
                        Assembly::Abandoned => {} // look at what came instead
                    }
                }
                Kind::Middle | Kind::Last | Kind::Pad => {
                    let keeper = h.keeper.load(Ordering::Acquire);
                    if keeper != 0
                        && keeper != peers::current_process()
                        && !crate::liveness::process_is_dead(keeper)
                    {
                        // The rest of a message another live process started receiving:
                        // its to resume. Wait for it.
                        return Ok(None);
                    }
                    if keeper != 0 {
                        self.set_keeper(0);
                    }
                    // A chunk whose message start is gone (with its dead receiver).
                    self.take(rec)?;
                    self.release(rec);
                }
            }
        }
    }

    /// Writes `keeper` (under the consumer lock); clearing it wakes the receivers that
    /// waited behind the kept chunks.
    pub(super) fn set_keeper(&self, keeper: u64) {
        self.h().keeper.store(keeper, Ordering::Release);
        if keeper == 0 {
            self.h().not_empty.notify_all();
        }
    }

    /// Clears `keeper` if this process is it.
    pub(super) fn drop_keeper(&self) {
        let me = peers::current_process();
        if self
            .h()
            .keeper
            .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.h().not_empty.notify_all();
        }
    }
}
