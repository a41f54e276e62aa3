//! Is the thread or process that a word in shared memory names still running?
//!
//! Owners are recorded as `(id, start time)` pairs, possibly with the start time cut down
//! to a few bits. Only the kernel's answer counts: an owner is dead if its id no longer
//! exists, belongs to a zombie, or now belongs to a task that started at a different time
//! (the id was recycled). When the kernel cannot be asked (no /proc), the answer is
//! "alive", so nothing is ever taken from a live owner.

use crate::sys;

/// Whether thread `tid`, whose start time has `start_bits` as its low `bits` bits, is gone.
pub(crate) fn thread_is_dead(tid: u32, start_bits: u64, bits: u32) -> bool {
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    match sys::thread_stat(tid) {
        Ok(Some(stat)) => stat.is_dead() || stat.start & mask != start_bits & mask,
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Process identity packed in 64 bits: pid above a 40-bit start time. Never 0.
pub(crate) fn process_identity(pid: u32, start: u64) -> u64 {
    (u64::from(pid) << 40) | (start & ((1 << 40) - 1))
}

/// Whether the process named by [`process_identity`] is gone.
pub(crate) fn process_is_dead(identity: u64) -> bool {
    thread_is_dead((identity >> 40) as u32, identity, 40)
}
