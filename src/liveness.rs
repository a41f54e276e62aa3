//! Is the thread or process that a word in shared memory names still running?
//!
//! Owners are recorded as `(id, start time)` pairs, possibly with the start time cut down
//! to a few bits (how they are packed into words is `crate::owner`'s business). Anything that takes over from an owner (a lock, a claimed slot, a peer
//! table entry, a named segment) acts only on *proof* that the owner is gone, and every
//! answer here errs towards "alive":
//!
//! | what the kernel says about id `t`                       | verdict            |
//! |---------------------------------------------------------|--------------------|
//! | `/proc/t/stat` readable, state `Z`/`X` (a thread)       | dead               |
//! | `/proc/t/stat` readable, start time differs             | dead (id recycled) |
//! | `/proc/t/stat` readable, same start (or start unknown)  | alive              |
//! | `/proc/t` missing or unreadable, `kill(t, 0)` → `ESRCH` | dead               |
//! | `/proc/t` missing or unreadable, `kill(t, 0)` → 0/EPERM | alive (hidden: `hidepid`, non-dumpable, no `/proc`) |
//! | owner recorded in another pid namespace, or either namespace unknown | alive (cannot tell) |
//! | `/proc` mounted for another pid namespace               | only `kill` is asked |
//!
//! A *process* is judged by its whole thread group: a main thread that has exited
//! (`pthread_exit`) shows as a zombie while the other threads run on, and such a process
//! is alive. A *thread* (a lock owner) is judged by itself: a zombie main thread holds
//! nothing any more.
//!
//! Ids are only comparable inside one pid namespace. Callers that record the owner's
//! namespace (the mutex does) pass it in; named segments refuse to open from a foreign
//! namespace, so the owners recorded inside them are always in the caller's.

use crate::owner;
use crate::sys;

/// What the kernel can prove about one task id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Evidence {
    /// Gone, a zombie, or recycled: the recorded owner runs no more code.
    Dead,
    /// Running, stopped, or invisible to us: treat as alive.
    Alive,
    /// `/proc` shows a zombie main thread; the group may still have live threads.
    ZombieLeader,
}

/// Inspects task `tid`, whose start time agrees with `start_bits` in the low `bits` bits.
/// A `start_bits` of 0 (in those bits) records an unknown start time: only existence is
/// then checked.
fn inspect(tid: u32, start_bits: u64, bits: u32) -> Evidence {
    if tid == 0 || tid > sys::TID_LIMIT {
        // No task can have this id: the record is garbage, and garbage owns nothing.
        return Evidence::Dead;
    }
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let recorded = start_bits & mask;
    if sys::proc_matches_own_namespace() {
        if let Ok(Some(stat)) = sys::thread_stat(tid) {
            if recorded != 0 && stat.start & mask != recorded {
                return Evidence::Dead;
            }
            if stat.is_dead() {
                return Evidence::ZombieLeader;
            }
            return Evidence::Alive;
        }
        // Missing from /proc is not proof: `hidepid=2` hides other users' and
        // non-dumpable processes. Ask the kernel directly below.
    }
    match sys::task_exists(tid) {
        Some(false) => Evidence::Dead,
        Some(true) | None => Evidence::Alive,
    }
}

/// Whether thread `tid`, whose start time has `start_bits` as its low `bits` bits, is
/// provably gone (exited, a zombie, or its id now names another task). Assumes `tid` is
/// numbered in the caller's pid namespace.
pub(crate) fn thread_is_dead(tid: u32, start_bits: u64, bits: u32) -> bool {
    match inspect(tid, start_bits, bits) {
        Evidence::Dead | Evidence::ZombieLeader => true,
        Evidence::Alive => false,
    }
}

/// Like [`thread_is_dead`], for an owner recorded with its pid namespace (`ns`, 0 when
/// unknown): an owner in another namespace than ours, or where either namespace is
/// unknown, is never judged (ids from different namespaces name different tasks, and
/// `kill(tid, 0)` would answer for the wrong one).
pub(crate) fn thread_in_namespace_is_dead(tid: u32, start_bits: u64, bits: u32, ns: u32) -> bool {
    let mine = sys::current_thread().ns;
    if ns == 0 || mine == 0 || ns != mine {
        return false;
    }
    thread_is_dead(tid, start_bits, bits)
}

/// Whether the process named by `identity` (an [`owner::process_identity`]) is provably
/// gone: every thread of its group has exited, or its pid now names another task.
pub(crate) fn process_is_dead(identity: u64) -> bool {
    let (pid, start) = owner::identity_parts(identity);
    match inspect(pid, start, owner::START_BITS) {
        Evidence::Dead => true,
        Evidence::Alive => false,
        Evidence::ZombieLeader => !group_has_live_thread(pid),
    }
}

/// Whether any thread of process `pid` (whose main thread is a zombie) still runs. A task
/// list we cannot read counts as "yes".
fn group_has_live_thread(pid: u32) -> bool {
    let Ok(tids) = sys::thread_ids(pid) else {
        return true;
    };
    tids.into_iter().any(|tid| match sys::thread_stat(tid) {
        Ok(Some(stat)) => !stat.is_dead(),
        // Exited between the listing and the read: that thread is gone.
        Ok(None) => false,
        Err(_) => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "no /proc or kill under Miri")]
    fn own_thread_and_process_are_alive() {
        let me = sys::current_thread();
        assert!(!thread_is_dead(me.tid, me.start, 40));
        assert!(!thread_in_namespace_is_dead(me.tid, me.start, 40, me.ns));
        let (pid, start) = sys::current_process_noalloc();
        assert!(!process_is_dead(owner::process_identity(pid, start)));
    }

    #[test]
    #[cfg_attr(miri, ignore = "no /proc or kill under Miri")]
    fn recycled_start_time_and_impossible_ids_are_dead() {
        let me = sys::current_thread();
        assert!(thread_is_dead(me.tid, me.start + 1, 40));
        assert!(thread_is_dead(0, 1, 40));
        assert!(thread_is_dead(sys::TID_LIMIT + 1, 1, 40));
    }

    #[test]
    #[cfg_attr(miri, ignore = "no /proc or kill under Miri")]
    fn foreign_namespace_is_never_judged() {
        let me = sys::current_thread();
        if me.ns == 0 {
            return; // no /proc: namespaces cannot be told apart here
        }
        assert!(!thread_in_namespace_is_dead(
            me.tid,
            me.start + 1,
            40,
            me.ns ^ 1
        ));
    }

    #[test]
    #[cfg_attr(miri, ignore = "no /proc or kill under Miri")]
    fn exited_thread_is_dead() {
        let id = std::thread::spawn(sys::current_thread).join().unwrap();
        // The tid may already be reused by another thread, but then its start differs.
        // `join` returns when the kernel clears the thread's tid word, a little before the
        // task is released: until then it still shows in /proc as running, and a thread
        // not proven dead counts as alive. So: dead within a while, not at once.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !thread_is_dead(id.tid, id.start, 40) {
            assert!(
                std::time::Instant::now() < deadline,
                "still alive after 5 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
