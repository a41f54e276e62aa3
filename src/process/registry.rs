//! Process-local bookkeeping: who this process is (its name, its procshare parent) and
//! which children it has not reaped yet. Plain process-local state (nothing here lives in
//! shared memory); a forked or spawned child starts with its own fresh copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::sys;

/// A process's pid and name, as [`current_process`](super::current_process),
/// [`parent_process`](super::parent_process) and
/// [`active_children`](super::active_children) report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pid: u32,
    name: String,
}

impl ProcessInfo {
    pub(crate) fn new(pid: u32, name: String) -> ProcessInfo {
        ProcessInfo { pid, name }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its name: `MainProcess` for a program not started by procshare, `Process-N` (or
    /// the builder's name) for a child.
    pub fn name(&self) -> &str {
        &self.name
    }
}

struct Identity {
    name: Option<String>,
    parent: Option<ProcessInfo>,
}

static IDENTITY: Mutex<Identity> = Mutex::new(Identity {
    name: None,
    parent: None,
});
/// An unreaped child. Children of the fork server are not ours to `waitid`: they count
/// as active until their handle has collected their status.
pub(crate) struct Entry {
    pub(crate) info: ProcessInfo,
    via_server: bool,
}

static CHILDREN: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static NEXT_NUMBER: AtomicU64 = AtomicU64::new(1);

fn identity() -> MutexGuard<'static, Identity> {
    IDENTITY.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn lock() -> MutexGuard<'static, Vec<Entry>> {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// `Process-N`, numbered per parent process.
pub(crate) fn next_default_name() -> String {
    format!("Process-{}", NEXT_NUMBER.fetch_add(1, Ordering::Relaxed))
}

pub(crate) fn add(pid: u32, name: &str, via_server: bool) {
    lock().push(Entry {
        info: ProcessInfo {
            pid,
            name: name.to_owned(),
        },
        via_server,
    });
}

/// Called first thing in a new child: it has no children yet, a name, and a parent.
/// Uses `try_lock` so the child of `fork_unchecked` cannot deadlock on a lock another
/// parent thread held at the fork (it then keeps the parent's stale view instead).
pub(crate) fn enter_child(name: String, parent: ProcessInfo) {
    if let Ok(mut c) = CHILDREN.try_lock() {
        c.clear();
    }
    NEXT_NUMBER.store(1, Ordering::Relaxed);
    if let Ok(mut id) = IDENTITY.try_lock() {
        id.name = Some(name);
        id.parent = Some(parent);
    }
}

/// This process: its pid and procshare name.
pub fn current_process() -> ProcessInfo {
    ProcessInfo {
        pid: sys::getpid(),
        name: identity()
            .name
            .clone()
            .unwrap_or_else(|| "MainProcess".to_owned()),
    }
}

/// The process that started this one through procshare (`None` in a program started any
/// other way). The information is as of the start: the parent may have exited since
/// (compare its pid with what the kernel says, e.g. through a daemon's death signal).
pub fn parent_process() -> Option<ProcessInfo> {
    identity().parent.clone()
}

/// The children this process started and has not reaped yet that are still running.
///
/// A fork-server child is not this process's own child (the server forked it), so it is
/// listed until its handle has collected its status, even if it has just exited.
pub fn active_children() -> Vec<ProcessInfo> {
    let children = lock();
    children
        .iter()
        .filter(|c| {
            // Registered means unreaped (reaping unregisters under this lock), so the pid
            // is still that child's; WNOWAIT leaves it for its handle to reap.
            c.via_server
                || matches!(
                    sys::wait_child(sys::WaitTarget::Pid(c.info.pid), false, false),
                    Ok(None)
                )
        })
        .map(|c| c.info.clone())
        .collect()
}
