//! Records left by dead peers, finished only on the kernel's proof that their owner thread
//! is gone (see the state tables in the module docs). Records the consumer lock's holder
//! marks at `head` are repaired by [`peek`](Core::peek) instead, without asking about
//! their owner.

use super::record::{Kind, Rec, RecHeader, State};
use super::shared::Core;
use crate::sys::Deadline;

impl Core {
    /// Finishes a record at `head` whose producer died before publishing it.
    pub(super) fn finish_dead_writer(&self, deadline: Deadline) -> bool {
        let Ok((_, head, tail)) = self.positions() else {
            return false;
        };
        if head == tail {
            return false;
        }
        let Some(_g) = self.lock_consumer(deadline) else {
            return false;
        };
        let Ok((_, head, tail)) = self.positions() else {
            return false;
        };
        let Some((r, rec)) = self.dead_owners_record(head, tail, State::Writing) else {
            return false;
        };
        // Never published, so never sent: turn it into padding that consumers skip.
        r.set(
            Rec {
                kind: Kind::Pad,
                ..rec
            }
            .word(State::Ready),
        );
        self.h().not_empty.notify_all();
        true
    }

    /// Finishes a record at `free` whose consumer died while reading it.
    pub(super) fn free_dead_readers(&self) -> bool {
        // Past the records released but not yet passed (see `release`) first.
        self.advance_free();
        let Ok((free, head, _)) = self.positions() else {
            return false;
        };
        let Some((r, rec)) = self.dead_owners_record(free, head, State::Reading) else {
            return false;
        };
        let freed = r.replace(rec.word(State::Reading), rec.word(State::Done));
        self.advance_free();
        freed
    }

    /// The record at `pos` (before `limit`), if it is in `state` and the kernel proves
    /// its owner thread gone.
    fn dead_owners_record(&self, pos: u64, limit: u64, state: State) -> Option<(&RecHeader, Rec)> {
        if pos == limit {
            return None;
        }
        let (found, rec) = self.read_record(pos, limit).ok()?;
        if found != state {
            return None;
        }
        let r = self.rec_header(pos).ok()?;
        r.owner_is_dead().then_some((r, rec))
    }
}
