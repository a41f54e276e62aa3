//! Process groups: a child started as the leader of its own group, so it and everything
//! it starts can be signalled at once (`Builder::process_group`).

use std::io;

/// Puts the child `pid` into a new process group of which it is the leader
/// (`setpgid(pid, pid)`), from the parent's side.
///
/// The child makes the same call on its own side; whichever runs first wins and the other
/// is a no-op, so the group exists as soon as either side has returned (the race closed the
/// way shells close it). `EACCES` (the child already exec'd) and `ESRCH` (it already
/// exited) mean the child's own call decides, and are not errors.
pub(crate) fn make_group_leader(pid: u32) -> io::Result<()> {
    // SAFETY: setpgid takes plain integers and touches no memory of ours.
    if unsafe { libc::setpgid(pid as libc::pid_t, pid as libc::pid_t) } < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EACCES | libc::ESRCH) => Ok(()),
            _ => Err(e),
        };
    }
    Ok(())
}
