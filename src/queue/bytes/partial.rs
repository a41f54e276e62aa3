//! Receiving chunked messages: reassembly, and the start of a message a receive that
//! timed out keeps for this process (see "Timeouts" in the module docs).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::QueueError;
use super::hooks::{FailPoint, fail_point};
use super::record::{Kind, Rec};
use super::shared::{Core, Role};
use crate::queue::peers;
use crate::sync::eventcount::{Attempt, block_on};
use crate::sys::Deadline;

/// How long a handle's drop waits for room to put back a message its process kept (see
/// `Core::hand_back_partial`): the process may be its only receiver.
const HAND_BACK_PATIENCE: Duration = Duration::from_secs(2);

/// The received start of a chunked message.
pub(super) struct Partial {
    /// The process that received it: a forked child inherits a copy and must drop it.
    pub(super) owner: u64,
    /// Position of its `FIRST` record.
    pub(super) first: u64,
    pub(super) total: usize,
    /// Complete when `bytes.len() == total` (finished by a send's [`Core::pump_partial`]
    /// and waiting for this process's next receive).
    pub(super) bytes: Vec<u8>,
}

/// How reassembling a chunked message ended.
pub(super) enum Assembly {
    Done(Vec<u8>),
    /// Its producer gave up on it (or died): dropped whole.
    Abandoned,
    /// The deadline passed first: the part received is kept in `Core::partial`.
    Kept,
}

impl Core {
    /// Takes in whatever chunks of the kept partial message are there, without waiting,
    /// if the consumer lock is free. A message completed this way stays in `partial` for
    /// this process's next receive; `keeper` is cleared as the last chunk is taken.
    pub(super) fn pump_partial(&self) {
        let Some(_g) = self.lock_consumer(Deadline::after(Duration::ZERO)) else {
            return;
        };
        let Some(p) = self.take_partial() else {
            return;
        };
        let me = peers::current_process();
        if p.owner != me {
            return;
        }
        if p.bytes.len() == p.total {
            self.keep_partial(p);
            return;
        }
        if self.h().keeper.load(Ordering::Acquire) != me {
            return; // abandoned meanwhile
        }
        let (first, owner) = (p.first, p.owner);
        // `Kept` stored it back; `Abandoned` dropped it; an error is met again (and
        // reported) by the next receive.
        if let Ok(Assembly::Done(bytes)) = self.assemble(p, Deadline::after(Duration::ZERO)) {
            self.keep_partial(Partial {
                owner,
                first,
                total: bytes.len(),
                bytes,
            });
        }
    }

    fn keep_partial(&self, p: Partial) {
        *self.partial.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        self.has_partial.store(true, Ordering::Relaxed);
    }

    pub(super) fn take_partial(&self) -> Option<Partial> {
        let p = self
            .partial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.has_partial.store(false, Ordering::Relaxed);
        p
    }

    /// Reads the `FIRST` chunk `first` (claimed) into a new partial message and releases it.
    pub(super) fn start_partial(&self, first: Rec) -> Result<Partial, QueueError> {
        // SAFETY: we claimed `first`.
        let payload = unsafe { self.payload(first) };
        let total = match payload.get(..8) {
            Some(b) => u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize,
            None => usize::MAX,
        };
        if total > self.max_message || total < payload.len() - 8 {
            self.release(first);
            return Err(QueueError::Corrupted(format!(
                "chunked message claims {total} bytes (maximum {})",
                self.max_message
            )));
        }
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&payload[8..]);
        self.release(first);
        Ok(Partial {
            owner: peers::current_process(),
            first: first.pos,
            total,
            bytes,
        })
    }

    /// Receives the rest of the chunked message `p`. The caller holds the consumer lock.
    /// If `deadline` passes first, `p` is kept for the next receive in this process and
    /// this process is marked as its keeper, so no other consumer takes its chunks.
    pub(super) fn assemble(
        &self,
        mut p: Partial,
        deadline: Deadline,
    ) -> Result<Assembly, QueueError> {
        let h = self.h();
        let mine = p.first.wrapping_add(1);
        while p.bytes.len() < p.total {
            let next = block_on(
                &h.not_empty,
                deadline,
                || {
                    // Loaded before looking at `head`: the producer clears it only after
                    // publishing every chunk it will publish.
                    let streaming = h.stream.load(Ordering::Acquire);
                    match self.peek() {
                        Err(e) => Attempt::Ready(Err(e)),
                        Ok(Some(rec)) if matches!(rec.kind, Kind::Middle | Kind::Last) => {
                            Attempt::Ready(Ok(Some(rec)))
                        }
                        // Another message starts: this one was abandoned.
                        Ok(Some(_)) => Attempt::Ready(Ok(None)),
                        // Its producer gave up on it (or finished with a chunk we lost).
                        Ok(None) if streaming != mine => Attempt::Ready(Ok(None)),
                        Ok(None) => Attempt::Blocked,
                    }
                },
                // A dead producer leaves its lock held: the rest is never coming.
                || h.producer.holder_is_dead().then_some(Ok(None)),
            );
            let rec = match next {
                None => {
                    self.keep_partial(p);
                    self.set_keeper(peers::current_process());
                    fail_point(FailPoint::Stashed);
                    return Ok(Assembly::Kept);
                }
                Some(Ok(Some(rec))) => rec,
                Some(Ok(None)) => {
                    self.drop_keeper();
                    return Ok(Assembly::Abandoned);
                }
                Some(Err(e)) => {
                    self.drop_keeper();
                    return Err(e);
                }
            };
            self.take(rec)?;
            // SAFETY: we claimed `rec`.
            let chunk = unsafe { self.payload(rec) };
            if p.bytes.len() + chunk.len() > p.total {
                self.release(rec);
                self.drop_keeper();
                return Err(QueueError::Corrupted("chunks exceed their message".into()));
            }
            p.bytes.extend_from_slice(chunk);
            let last = rec.kind == Kind::Last;
            self.release(rec);
            if last != (p.bytes.len() == p.total) {
                self.drop_keeper();
                return Err(QueueError::Corrupted(
                    "chunk count disagrees with length".into(),
                ));
            }
        }
        self.drop_keeper();
        Ok(Assembly::Done(p.bytes))
    }

    /// A handle of this process is dropped while the process keeps a chunked message
    /// (see "Timeouts"): receives the rest of it (waiting for its producer for as long as
    /// that streams it: only its death or abandoning the message ends the wait early),
    /// then puts the whole message back into the queue as a new message, waiting for
    /// room at most [`HAND_BACK_PATIENCE`] (a message larger than the ring needs a
    /// receiver taking its chunks meanwhile). If that runs out, nothing was put back: the
    /// whole message stays with this process for its next receive (or its next handle
    /// drop), unless `last` (this was the process's last handle), when it is lost, with a
    /// line on stderr saying so. Lost also if every receiver is gone, or if its producer
    /// abandoned it.
    pub(super) fn hand_back_partial(&self, role: Role, last: bool) {
        let me = peers::current_process();
        let mine = self
            .partial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|p| p.owner == me);
        if !mine {
            return; // nothing, or a copy a fork left here: another process keeps it
        }
        let bytes = {
            let Some(_g) = self.lock_consumer(Deadline::NEVER) else {
                return;
            };
            let Some(p) = self.take_partial() else {
                return;
            };
            if p.bytes.len() == p.total {
                p.bytes
            } else if self.h().keeper.load(Ordering::Acquire) != me {
                return; // abandoned meanwhile, and already skipped by another receiver
            } else {
                match self.assemble(p, Deadline::NEVER) {
                    Ok(Assembly::Done(bytes)) => bytes,
                    // Abandoned by its producer, or corrupted: `assemble` let go of it.
                    Ok(Assembly::Abandoned) | Err(_) => return,
                    // (Not with this deadline; if it were, let other receivers on.)
                    Ok(Assembly::Kept) => {
                        let _ = self.take_partial();
                        self.drop_keeper();
                        return;
                    }
                }
            }
        };
        let put = self.send_open(
            role,
            bytes.len(),
            |buf| {
                buf.copy_from_slice(&bytes);
                Ok(())
            },
            Deadline::after(HAND_BACK_PATIENCE),
        );
        if put != Err(QueueError::Timeout) {
            return; // put back; or lost with every receiver, or to corruption
        }
        if last {
            eprintln!(
                "procshare: a {}-byte queue message this process had started receiving (a \
                 receive timed out in the middle of it) was lost as the process dropped its \
                 last handle to the queue: no receiver took it back within {:?}. Receive \
                 again before dropping the queue, or keep a receiver receiving meanwhile",
                bytes.len(),
                HAND_BACK_PATIENCE
            );
            return;
        }
        let total = bytes.len();
        self.keep_partial(Partial {
            owner: me,
            first: 0,
            total,
            bytes,
        });
    }
}
