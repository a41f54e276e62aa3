//! The record format: the one place a record header's words are encoded and decoded.
//!
//! ```text
//!  record header (16 bytes, 16-aligned in the ring), then the payload padded to 16 bytes
//!
//!  word (AtomicU64):
//!   63        56 55        48 47                32 31                               0
//!  [ state (8)  ][ kind (8)   ][ zero (16)         ][ payload length (32)              ]
//!
//!  owner (AtomicU64): a thread record (`crate::owner`, where the packing is drawn):
//!   63                     40 39                                                    0
//!  [ thread id (24)          ][ thread start time, low 40 bits (clock ticks)         ]
//!
//!  state: WRITING 1, READY 2, READING 3, DONE 4   (0 and 5..=255 are corruption)
//!  kind:  SINGLE 0, FIRST 1, MIDDLE 2, LAST 3, PAD 4   (5..=255 are corruption)
//! ```
//!
//! A word is valid only if it is exactly what [`Word::encode`] makes of its decoded
//! fields: any bit in the zero field (or a length the encoder could not have written)
//! makes it corrupted. That matters beyond tidiness: repairs compare-and-swap against the
//! re-encoded word, so a word with stray bits would make every such swap fail and a
//! consumer repairing a `READING` record at `head` retry for ever (the `ring_records`
//! fuzz target found exactly that; `tests/byte_queue.rs` keeps it as
//! `a_record_word_with_stray_bits_is_corruption_not_a_spin`).
//!
//! The length field is 32 bits, so no record payload may exceed `u32::MAX`; larger
//! messages are chunked (see [`single_limit`]).

use std::sync::atomic::{AtomicU64, Ordering};

use super::QueueError;
use super::shared::Core;
use crate::sys;

/// Bytes of a record header (`word`, then `owner`).
pub(super) const REC_HEADER: u64 = 16;
/// Records start on (and payloads are padded to) this many bytes.
pub(super) const ALIGN: u64 = 16;
/// The largest payload one record can describe: the 32-bit length field's maximum,
/// rounded down so the padded record still fits it.
const MAX_PAYLOAD: u64 = (u32::MAX as u64) & !(ALIGN - 1);

/// Where a record is in its life (see the module docs of `bytes` for the transitions).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Reserved by a producer (named by `owner`), payload being written.
    Writing = 1,
    /// Published: a consumer may claim it (or skip it, if it is padding).
    Ready = 2,
    /// Claimed by a consumer (named by `owner`), payload being read.
    Reading = 3,
    /// Consumed (or skipped padding): `free` may move over it.
    Done = 4,
}

/// What a record carries.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A whole message.
    Single = 0,
    /// The first chunk of a large message; its payload starts with the total length.
    First = 1,
    /// A chunk between the first and the last.
    Middle = 2,
    /// The last chunk.
    Last = 3,
    /// Nothing: fills the ring's end before a record that would wrap, or stands for a
    /// record whose producer gave up (or died) before publishing it.
    Pad = 4,
}

impl State {
    #[inline]
    fn from_u8(v: u8) -> Option<State> {
        Some(match v {
            1 => State::Writing,
            2 => State::Ready,
            3 => State::Reading,
            4 => State::Done,
            _ => return None,
        })
    }
}

impl Kind {
    #[inline]
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0 => Kind::Single,
            1 => Kind::First,
            2 => Kind::Middle,
            3 => Kind::Last,
            4 => Kind::Pad,
            _ => return None,
        })
    }

    /// Whether a record of this kind completes a message (so it is counted in `count`).
    pub(super) fn ends_message(self) -> bool {
        matches!(self, Kind::Single | Kind::Last)
    }
}

/// A record's `word`, decoded. See the layout in the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Word {
    pub(super) state: State,
    pub(super) kind: Kind,
    pub(super) len: u32,
}

const STATE_SHIFT: u32 = 56;
const KIND_SHIFT: u32 = 48;
const LEN_MASK: u64 = 0xffff_ffff;
/// The zero field, bits 32..48.
const ZERO_MASK: u64 = 0xffff << 32;

impl Word {
    /// The word as stored.
    #[inline]
    pub(super) fn encode(self) -> u64 {
        ((self.state as u64) << STATE_SHIFT)
            | ((self.kind as u64) << KIND_SHIFT)
            | u64::from(self.len)
    }

    /// The word `w` as read from the ring, or `None` if it is not exactly what
    /// [`encode`](Word::encode) writes (an unknown state or kind, or a stray bit).
    #[inline]
    pub(super) fn decode(w: u64) -> Option<Word> {
        // The fields cover every bit but the zero field's, so with a known state and kind
        // and that field clear, `encode` gives `w` back: no need to re-encode and compare.
        if w & ZERO_MASK != 0 {
            return None;
        }
        Some(Word {
            state: State::from_u8((w >> STATE_SHIFT) as u8)?,
            kind: Kind::from_u8((w >> KIND_SHIFT) as u8)?,
            len: (w & LEN_MASK) as u32,
        })
    }

    /// The raw fields of `w`, for a corruption report.
    fn describe(w: u64) -> String {
        format!(
            "word {w:#018x} (state {}, kind {}, length {})",
            w >> STATE_SHIFT,
            (w >> KIND_SHIFT) & 0xff,
            w & LEN_MASK
        )
    }
}

/// The bytes a record with `payload` bytes takes in the ring: header plus padded payload.
#[inline]
pub(super) fn record_len(payload: u32) -> u64 {
    REC_HEADER + u64::from(payload).next_multiple_of(ALIGN)
}

/// The largest payload that goes in a single record of a ring of `capacity` bytes (a
/// quarter of the ring, less a header), never more than the length field can hold.
#[inline]
pub(super) fn single_limit(capacity: u64) -> u64 {
    (capacity / 4 - REC_HEADER).min(MAX_PAYLOAD)
}

/// A record header in the ring: state word and owner word.
#[repr(C)]
pub(super) struct RecHeader {
    pub(super) word: AtomicU64,
    pub(super) owner: AtomicU64,
}

impl RecHeader {
    /// Stores `word` with release ordering.
    #[inline]
    pub(super) fn set(&self, word: Word) {
        self.word.store(word.encode(), Ordering::Release);
    }

    /// Moves the word from `from` to `to` if it is still `from`; whether it did.
    pub(super) fn replace(&self, from: Word, to: Word) -> bool {
        self.word
            .compare_exchange(
                from.encode(),
                to.encode(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Names the calling thread as the record's owner.
    #[inline]
    pub(super) fn own(&self) {
        self.owner.store(
            crate::owner::record_of(sys::current_thread()),
            Ordering::Relaxed,
        );
    }

    /// Whether the kernel proves the record's owner thread gone.
    pub(super) fn owner_is_dead(&self) -> bool {
        crate::owner::record_is_dead(self.owner.load(Ordering::Relaxed))
    }
}

/// A claimed or reserved record: its position, kind and payload length.
#[derive(Clone, Copy)]
pub(super) struct Rec {
    pub(super) pos: u64,
    pub(super) kind: Kind,
    pub(super) len: u32,
}

impl Rec {
    /// This record's word in `state`.
    #[inline]
    pub(super) fn word(self, state: State) -> Word {
        Word {
            state,
            kind: self.kind,
            len: self.len,
        }
    }

    /// Bytes it takes in the ring.
    #[inline]
    pub(super) fn span(self) -> u64 {
        record_len(self.len)
    }
}

impl Core {
    /// The header of the record at `pos`.
    #[inline]
    pub(super) fn rec_header(&self, pos: u64) -> Result<&RecHeader, QueueError> {
        let off = pos & (self.cap() - 1);
        if off % ALIGN != 0 || off + REC_HEADER > self.cap() {
            return Err(unaligned(pos));
        }
        // SAFETY: `off + 16 <= capacity` and `off` is 16-aligned in a 128-aligned data
        // area, so this is an aligned RecHeader inside the ring; its words are only ever
        // accessed atomically.
        Ok(unsafe { &*self.ring.slots_ptr().add(off as usize).cast::<RecHeader>() })
    }

    /// The payload bytes of `rec`.
    ///
    /// # Safety
    ///
    /// The caller must own the record (reserved it, or claimed it) for the returned
    /// slice's lifetime, so no other process touches these bytes meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn payload(&self, rec: Rec) -> &mut [u8] {
        let off = (rec.pos & (self.cap() - 1)) + REC_HEADER;
        // SAFETY: `read_record`/`reserve` checked off + len <= capacity; exclusivity is
        // the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ring.slots_ptr().add(off as usize),
                rec.len as usize,
            )
        }
    }

    /// Checks the positions, which only ever satisfy `free <= head <= tail <= free + cap`.
    #[inline]
    pub(super) fn positions(&self) -> Result<(u64, u64, u64), QueueError> {
        let h = self.h();
        let free = h.free.load(Ordering::Acquire);
        let head = h.head.load(Ordering::Acquire);
        let tail = h.tail.load(Ordering::Acquire);
        if head.wrapping_sub(free) > self.cap() || tail.wrapping_sub(head) > self.cap() {
            return Err(bad_positions(free, head, tail));
        }
        Ok((free, head, tail))
    }

    /// `free`, for a producer (holding the producer lock, so `tail` is stable) that needs
    /// `need` bytes of room after `tail`: the value this process last saw if that already
    /// shows the room (`free` only grows), else the shared word, loaded and checked
    /// against `tail`, after moving it over the records released since (releases leave
    /// that to a batch, see [`release`](Core::release)).
    #[inline]
    pub(super) fn free_for(&self, tail: u64, need: u64) -> Result<u64, QueueError> {
        let cap = self.cap();
        // SYNC POINT: Acquire pairs with the Release below, which passes on what the
        // Acquire load of `free` took from the releasers (their reads of the room).
        let seen = self.seen.free.load(Ordering::Acquire);
        if tail.wrapping_sub(seen) <= cap && tail.wrapping_add(need).wrapping_sub(seen) <= cap {
            return Ok(seen);
        }
        self.free_now(tail)
    }

    #[cold]
    fn free_now(&self, tail: u64) -> Result<u64, QueueError> {
        self.advance_free();
        let h = self.h();
        let free = h.free.load(Ordering::Acquire);
        if tail.wrapping_sub(free) > self.cap() {
            return Err(bad_positions(free, h.head.load(Ordering::Relaxed), tail));
        }
        self.seen.free.store(free, Ordering::Release);
        Ok(free)
    }

    /// `tail`, for a consumer (holding the consumer lock, so `head` is stable): the value
    /// this process last saw if records lie between `head` and it (`tail` only grows,
    /// and a record is reserved whole, so every record that starts before it ends before
    /// it), else the shared word, loaded and checked against `head`.
    #[inline]
    pub(super) fn tail_for(&self, head: u64) -> Result<u64, QueueError> {
        let cap = self.cap();
        // SYNC POINT: as in `free_for`; the records themselves are read by acquiring
        // their words.
        let seen = self.seen.tail.load(Ordering::Acquire);
        if seen != head && seen.wrapping_sub(head) <= cap {
            return Ok(seen);
        }
        let h = self.h();
        let tail = h.tail.load(Ordering::Acquire);
        if tail.wrapping_sub(head) > cap {
            return Err(bad_positions(h.free.load(Ordering::Relaxed), head, tail));
        }
        self.seen.tail.store(tail, Ordering::Release);
        Ok(tail)
    }

    /// Reads and checks the record at `pos`, which must lie before `limit`.
    #[inline]
    pub(super) fn read_record(&self, pos: u64, limit: u64) -> Result<(State, Rec), QueueError> {
        let w = self.rec_header(pos)?.word.load(Ordering::Acquire);
        let off = pos & (self.cap() - 1);
        let Some(word) = Word::decode(w) else {
            return Err(bad_record(pos, w));
        };
        let span = record_len(word.len);
        if off + span > self.cap() || span > limit.wrapping_sub(pos) {
            return Err(bad_record(pos, w));
        }
        let rec = Rec {
            pos,
            kind: word.kind,
            len: word.len,
        };
        Ok((word.state, rec))
    }
}

// The errors of the checks above, out of line: the checks sit on every message's path.

#[cold]
#[inline(never)]
fn unaligned(pos: u64) -> QueueError {
    QueueError::Corrupted(format!("record at unaligned position {pos}"))
}

#[cold]
#[inline(never)]
fn bad_positions(free: u64, head: u64, tail: u64) -> QueueError {
    QueueError::Corrupted(format!("positions free {free}, head {head}, tail {tail}"))
}

#[cold]
#[inline(never)]
fn bad_record(pos: u64, w: u64) -> QueueError {
    QueueError::Corrupted(format!("record at {pos}: {}", Word::describe(w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips() {
        let states = [State::Writing, State::Ready, State::Reading, State::Done];
        let kinds = [
            Kind::Single,
            Kind::First,
            Kind::Middle,
            Kind::Last,
            Kind::Pad,
        ];
        for state in states {
            for kind in kinds {
                for len in [0, 1, 255, 1 << 16, u32::MAX] {
                    let w = Word { state, kind, len };
                    assert_eq!(Word::decode(w.encode()), Some(w));
                }
            }
        }
    }

    #[test]
    fn a_word_with_stray_bits_or_unknown_fields_does_not_decode() {
        let good = Word {
            state: State::Reading,
            kind: Kind::Single,
            len: 256,
        }
        .encode();
        assert_eq!(good, (3 << 56) | 256);
        for bit in 32..48 {
            assert_eq!(Word::decode(good | (1 << bit)), None, "bit {bit}");
        }
        assert_eq!(Word::decode(256), None, "state 0");
        assert_eq!(Word::decode((5 << 56) | 256), None, "state 5");
        assert_eq!(Word::decode((2 << 56) | (5 << 48)), None, "kind 5");
    }

    #[test]
    fn the_largest_single_record_fits_the_length_field() {
        // Rings go up to 2^40 bytes: a quarter of that is far beyond 32 bits, so the
        // limit must come from the length field, or the word would not round-trip.
        for cap in [4096u64, 1 << 20, 1 << 34, 1 << 40] {
            let limit = single_limit(cap);
            assert!(limit <= u64::from(u32::MAX), "capacity {cap}");
            let w = Word {
                state: State::Ready,
                kind: Kind::Single,
                len: limit as u32,
            };
            assert_eq!(Word::decode(w.encode()), Some(w));
        }
        assert_eq!(single_limit(4096), 1024 - REC_HEADER);
    }
}
