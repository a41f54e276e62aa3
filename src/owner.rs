//! Who owns this word: how a thread or a process is packed into a shared word, and back.
//!
//! A lock, a claimed slot or a table entry names its owner in shared memory so that, if the
//! owner dies, someone else can prove it gone (`crate::liveness`) and repair the state. An
//! id alone is not enough: ids are recycled. An id plus the task's start time (clock ticks
//! after boot) names one thread or process for the life of the machine. Every packing of
//! that pair lives here; the words that use them only store, compare and pass them on.
//!
//! # The packings
//!
//! ```text
//!  thread record (64 bits)                  process identity (64 bits)
//!  63..40          39..0                    63..40          39..0
//! [tid (24)][start time (40)]              [pid (24)][start time (40)]
//!  0 = no record                            never 0 (pids start at 1)
//!
//!  thread tag (22 + H bits, inside a wider word)
//!  21+H..22                     21..0
//! [start time mod 2^H (H)][tid (22)]
//! ```
//!
//! * Linux thread and process ids are below `PID_MAX_LIMIT` = 2^22 (`sys::TID_LIMIT`), so
//!   an id always fits in 22 bits; 24 are reserved in the 64-bit words.
//! * 40 bits of start time last 348 years at 100 ticks a second.
//! * A *tag* is the short form that fits beside other state in one atomic word. Its H bits
//!   of start time tell a recycled id apart only 1 time in 2^H, so a tag is trusted alone
//!   only to err towards "alive"; where it matters the owner also writes its full record
//!   to a second word, and a checker trusts that record only when it
//!   [agrees with the tag](record_matches_tag).
//!
//! # Who uses which
//!
//! | word | packing |
//! |---|---|
//! | `RawMutex` state word (`sync/raw_mutex.rs`) | thread tag, H = 9, below the `WAITERS` bit |
//! | `RawMutex` owner record | thread record (plus the pid namespace in its own word) |
//! | mpmc slot stamp while claimed (`queue/mpmc.rs`) | thread tag, H = 8, in bits 61..32 |
//! | mpmc slot claimant word | thread record |
//! | `ByteQueue` record owner (`queue/bytes.rs`) | thread record (still packed by hand there) |
//! | peer table and spsc end owners (`queue/peers.rs`, `queue/spsc.rs`), `ByteQueue` keeper, segment creator | process identity |

use crate::liveness;
use crate::sys::ThreadIdentity;

/// Bits of a thread or process id in a tag; ids are below 2^22 on Linux.
pub(crate) const TID_BITS: u32 = 22;
/// The id bits of a tag.
pub(crate) const TID_MASK: u32 = (1 << TID_BITS) - 1;
/// Bits of start time in a thread record or process identity.
pub(crate) const START_BITS: u32 = 40;
const START_MASK: u64 = (1 << START_BITS) - 1;

// ---------------------------------------------------------------------------------------
// Thread records
// ---------------------------------------------------------------------------------------

/// The thread record of thread `tid` started at `start`: tid above 40 bits of start time.
/// Never 0 for a real thread (tids start at 1).
#[inline]
pub(crate) fn thread_record(tid: u32, start: u64) -> u64 {
    (u64::from(tid) << START_BITS) | (start & START_MASK)
}

/// The calling thread's record.
#[inline]
pub(crate) fn record_of(id: ThreadIdentity) -> u64 {
    thread_record(id.tid, id.start)
}

/// The thread id a record names.
#[inline]
pub(crate) fn record_tid(record: u64) -> u32 {
    (record >> START_BITS) as u32
}

/// Whether the thread a record names is provably gone (see `liveness::thread_is_dead`).
/// Assumes the record was written in the caller's pid namespace.
#[inline]
pub(crate) fn record_is_dead(record: u64) -> bool {
    liveness::thread_is_dead(record_tid(record), record & START_MASK, START_BITS)
}

/// Like [`record_is_dead`], for a record written in pid namespace `ns` (0 = unknown): an
/// owner of another namespace, or of an unknown one, is never judged.
#[inline]
pub(crate) fn record_in_namespace_is_dead(record: u64, ns: u32) -> bool {
    liveness::thread_in_namespace_is_dead(record_tid(record), record & START_MASK, START_BITS, ns)
}

// ---------------------------------------------------------------------------------------
// Thread tags
// ---------------------------------------------------------------------------------------

/// The tag of thread `tid` started at `start`, with `hash_bits` bits of start time above
/// the 22-bit tid. Fits in `22 + hash_bits` bits.
#[inline]
pub(crate) fn thread_tag(tid: u32, start: u64, hash_bits: u32) -> u32 {
    debug_assert!(tid <= TID_MASK, "thread id {tid} exceeds PID_MAX_LIMIT");
    debug_assert!(TID_BITS + hash_bits <= 32);
    let hash = (start & ((1 << hash_bits) - 1)) as u32;
    (tid & TID_MASK) | (hash << TID_BITS)
}

/// The calling thread's tag with `hash_bits` bits of start time.
#[inline]
pub(crate) fn tag_of(id: ThreadIdentity, hash_bits: u32) -> u32 {
    thread_tag(id.tid, id.start, hash_bits)
}

/// The thread id a tag names.
#[inline]
pub(crate) fn tag_tid(tag: u32) -> u32 {
    tag & TID_MASK
}

/// Whether a full record names the same thread as a tag with `hash_bits` bits of start
/// time: same tid, and start times that agree in those bits. Only then may the record be
/// used to judge the tag's owner.
#[inline]
pub(crate) fn record_matches_tag(record: u64, tag: u32, hash_bits: u32) -> bool {
    record_tid(record) == tag_tid(tag)
        && record & ((1 << hash_bits) - 1) == u64::from(tag >> TID_BITS)
}

/// Whether the thread a tag names is provably gone, judged by the tag's `hash_bits` bits
/// of start time alone (which can mistake a live stranger for the owner, never the
/// reverse). Assumes the tag was written in the caller's pid namespace.
#[inline]
pub(crate) fn tag_is_dead(tag: u32, hash_bits: u32) -> bool {
    liveness::thread_is_dead(tag_tid(tag), u64::from(tag >> TID_BITS), hash_bits)
}

// ---------------------------------------------------------------------------------------
// Process identities
// ---------------------------------------------------------------------------------------

/// The identity of process `pid` started at `start`: pid above 40 bits of start time.
/// Never 0, and below 2^62 (pids are below 2^22), so a word may keep its top two bits for
/// flags.
#[inline]
pub(crate) fn process_identity(pid: u32, start: u64) -> u64 {
    (u64::from(pid) << START_BITS) | (start & START_MASK)
}

/// The pid and 40-bit start time a process identity names.
#[inline]
pub(crate) fn identity_parts(identity: u64) -> (u32, u64) {
    ((identity >> START_BITS) as u32, identity & START_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packings_round_trip_and_match() {
        let (tid, start) = (0x3f_ffff, 0xab_cdef_1234_5678);
        let record = thread_record(tid, start);
        assert_eq!(record_tid(record), tid);
        assert_eq!(record & START_MASK, start & START_MASK);
        for bits in [8, 9] {
            let tag = thread_tag(tid, start, bits);
            assert!(tag < 1 << (TID_BITS + bits));
            assert_eq!(tag_tid(tag), tid);
            assert!(record_matches_tag(record, tag, bits));
            assert!(!record_matches_tag(
                thread_record(tid, start + 1),
                tag,
                bits
            ));
            assert!(!record_matches_tag(
                thread_record(tid - 1, start),
                tag,
                bits
            ));
            assert!(!record_matches_tag(0, tag, bits));
        }
        let id = process_identity(tid, start);
        assert!(id != 0 && id < 1 << 62);
        assert_eq!(identity_parts(id), (tid, start & START_MASK));
    }
}
