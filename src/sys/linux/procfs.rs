//! What `/proc` (and the pid namespace) tell about tasks and mappings: thread stat lines,
//! thread lists, children, memory maps, and whether this `/proc` is our namespace's.
//! This is the raw evidence; `crate::liveness` turns it into verdicts.

use std::fs::File;
use std::io;

use super::task::getpid;

/// The fields of `/proc/<tid>/stat` procshare needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ThreadStat {
    /// The one-letter scheduler state (`R`, `S`, `T`, `Z`, ...).
    pub(crate) state: u8,
    /// Number of threads in the thread's process.
    pub(crate) num_threads: u64,
    /// Start time in clock ticks after boot.
    pub(crate) start: u64,
}

impl ThreadStat {
    /// A zombie (or a task being torn down) runs no more code and holds no more locks.
    pub(crate) fn is_dead(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses the text of a `/proc/<pid>/stat` file. The command name is in parentheses and
/// may itself contain spaces and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &[u8]) -> Option<ThreadStat> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let mut fields = text[close + 1..]
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let number = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u64>().ok();
    let state = *fields.next()?.first()?;
    // Fields are numbered from 1 in proc(5); `state` was field 3.
    let num_threads = number(fields.nth(20 - 4)?)?;
    let start = number(fields.nth(22 - 21)?)?;
    Some(ThreadStat {
        state,
        num_threads,
        start,
    })
}

/// Reads `/proc/<tid>/stat`. `Ok(None)` means no such thread exists (in our pid namespace).
pub(crate) fn thread_stat(tid: u32) -> io::Result<Option<ThreadStat>> {
    if cfg!(miri) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no /proc under Miri",
        ));
    }
    // /proc/<tid> resolves any thread id, not only process ids, though only the latter
    // are listed.
    match std::fs::read(format!("/proc/{tid}/stat")) {
        Ok(text) => parse_stat(&text).map(Some).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/<tid>/stat")
        }),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How many threads the calling process has.
pub(crate) fn thread_count() -> io::Result<u64> {
    let text = std::fs::read("/proc/self/stat")?;
    parse_stat(&text)
        .map(|s| s.num_threads)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/self/stat"))
}

/// Whether the `/proc` this process sees belongs to its own pid namespace, so that
/// `/proc/<id>` names the task the kernel calls `<id>` here. It does not after
/// `unshare(CLONE_NEWPID)` without a new proc mount, and there is no `/proc` at all in
/// some sandboxes.
pub(crate) fn proc_matches_own_namespace() -> bool {
    if cfg!(miri) {
        return false;
    }
    match std::fs::read_link("/proc/self") {
        Ok(target) => target.to_str().and_then(|t| t.parse::<u32>().ok()) == Some(getpid()),
        Err(_) => false,
    }
}

/// The ids of the threads of process `pid` (the entries of `/proc/<pid>/task`).
pub(crate) fn thread_ids(pid: u32) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(id) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// The identity of the pid namespace the calling process is in: the inode number of
/// `/proc/self/ns/pid` (what `readlink` shows as `pid:[N]`). `None` where it cannot be read
/// (no /proc, or a /proc from a namespace this process is not visible in). Cached per
/// process: a process never changes its own pid namespace (`unshare`/`setns` only affect
/// its future children), and a forked child recomputes because its pid differs.
pub(crate) fn pid_namespace_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    if cfg!(miri) {
        return None;
    }
    /// `pid << 32 | inode` of the last answer; 0 when nothing is cached.
    static CACHE: AtomicU64 = AtomicU64::new(0);
    let pid = getpid();
    let cached = CACHE.load(Ordering::Relaxed);
    if cached != 0 && (cached >> 32) as u32 == pid {
        return Some(cached & 0xffff_ffff);
    }
    let ino = match std::fs::metadata("/proc/self/ns/pid") {
        Ok(m) => m.ino(),
        // No /proc (or one this process is not visible in): ask the pidfd instead.
        Err(_) => pid_namespace_from_pidfd()?,
    };
    if ino != 0 && ino <= u64::from(u32::MAX) {
        CACHE.store((u64::from(pid) << 32) | ino, Ordering::Relaxed);
    }
    Some(ino)
}

/// The pid namespace inode through `ioctl(pidfd, PIDFD_GET_PID_NAMESPACE)` (Linux 6.11),
/// which needs no `/proc`. `None` on older kernels.
fn pid_namespace_from_pidfd() -> Option<u64> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    /// `_IO(PIDFS_IOCTL_MAGIC, 5)` from `<linux/pidfd.h>`.
    const PIDFD_GET_PID_NAMESPACE: libc::c_ulong = (0xFF << 8) | 5;
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, getpid() as libc::pid_t, 0) };
    if pidfd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: this ioctl takes no argument and returns a new namespace descriptor or -1.
    let ns = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            PIDFD_GET_PID_NAMESPACE as _,
            0,
        )
    };
    if ns < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let ns = File::from(unsafe { OwnedFd::from_raw_fd(ns) });
    ns.metadata().ok().map(|m| m.ino())
}

/// The children of the calling thread (`/proc/thread-self/children`, which needs a kernel
/// built with `CONFIG_PROC_CHILDREN`), in no particular order.
pub(crate) fn children_of_current_thread() -> io::Result<Vec<u32>> {
    if cfg!(miri) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no /proc under Miri",
        ));
    }
    let text = std::fs::read("/proc/thread-self/children")?;
    text.split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .map(|f| {
            std::str::from_utf8(f)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable child pid"))
        })
        .collect()
}

/// The file behind a shared mapping: device and inode, as `/proc/<pid>/maps` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MappedFile {
    pub(crate) dev_major: u32,
    pub(crate) dev_minor: u32,
    pub(crate) inode: u64,
}

/// One line of `/proc/<pid>/maps`: the address range and, for a file mapping, the file.
pub(crate) fn parse_maps_line(line: &[u8]) -> Option<(usize, usize, Option<MappedFile>)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut fields = text.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let _perms = fields.next()?;
    let _offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let file = (inode != 0).then_some(MappedFile {
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode,
    });
    Some((start, end, file))
}

/// Every mapping of the calling process: its range and its file (`None` for an anonymous
/// mapping), from one read of `/proc/self/maps`. For callers that look up several
/// addresses at once (the fork handler), instead of one read per address.
pub(crate) fn own_mappings() -> io::Result<Vec<(usize, usize, Option<MappedFile>)>> {
    if cfg!(miri) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no /proc under Miri",
        ));
    }
    let text = std::fs::read("/proc/self/maps")?;
    Ok(text
        .split(|&b| b == b'\n')
        .filter_map(parse_maps_line)
        .collect())
}

/// The mapping of the calling process that contains `addr`: its range and its file
/// (`None` for an anonymous mapping). `Ok(None)` if `addr` is not mapped.
pub(crate) fn own_mapping_at(
    addr: usize,
) -> io::Result<Option<(usize, usize, Option<MappedFile>)>> {
    Ok(own_mappings()?
        .into_iter()
        .find(|&(start, end, _)| start <= addr && addr < end))
}

/// Whether process `pid` maps `file` anywhere. `Ok(None)` when that cannot be told: no
/// such process, or an empty map list (a zombie thread-group leader whose other threads
/// may still run, or a process being torn down).
pub(crate) fn process_maps_file(pid: u32, file: MappedFile) -> io::Result<Option<bool>> {
    if cfg!(miri) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no /proc under Miri",
        ));
    }
    if !proc_matches_own_namespace() {
        // `/proc/<pid>` would name another namespace's process: no answer.
        return Ok(None);
    }
    let text = match std::fs::read(format!("/proc/{pid}/maps")) {
        Ok(text) => text,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut any = false;
    for line in text.split(|&b| b == b'\n') {
        if let Some((_, _, f)) = parse_maps_line(line) {
            any = true;
            if f == Some(file) {
                return Ok(Some(true));
            }
        }
    }
    Ok(any.then_some(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{map_shared_aligned, memfd_create};

    #[test]
    fn parses_stat_with_hostile_command_names() {
        let line = b"1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 7 0 987654 \
                     1000 100 18446744073709551615";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat.state, b'S');
        assert_eq!(stat.num_threads, 7);
        assert_eq!(stat.start, 987654);
        assert!(parse_stat(b"1234 (x) S 1 2").is_none());
        assert!(parse_stat(b"no parenthesis").is_none());
    }
    #[test]
    fn parses_maps_lines() {
        let line =
            b"7f1c2a000000-7f1c2a021000 rw-s 00000000 00:01 123456    /memfd:queue (deleted)";
        assert_eq!(
            parse_maps_line(line),
            Some((
                0x7f1c_2a00_0000,
                0x7f1c_2a02_1000,
                Some(MappedFile {
                    dev_major: 0,
                    dev_minor: 1,
                    inode: 123456
                })
            ))
        );
        let anon = b"7ffd1000-7ffd2000 rw-p 00000000 00:00 0    [stack]";
        assert_eq!(
            parse_maps_line(anon),
            Some((0x7ffd_1000, 0x7ffd_2000, None))
        );
        assert_eq!(parse_maps_line(b"garbage"), None);
        assert_eq!(parse_maps_line(b""), None);
    }

    #[test]
    #[cfg_attr(miri, ignore = "no /proc under Miri")]
    fn finds_own_file_mapping_and_sees_it_in_own_maps() {
        let file = memfd_create("maps-test", 4096).unwrap();
        let map = map_shared_aligned(&file, 4096, 4096).unwrap();
        let (start, end, f) = own_mapping_at(map.as_ptr() as usize + 8)
            .unwrap()
            .expect("mapped");
        assert!(start <= map.as_ptr() as usize && map.as_ptr() as usize + 8 < end);
        let f = f.expect("a file mapping");
        assert_eq!(process_maps_file(getpid(), f).unwrap(), Some(true));
        let other = MappedFile {
            inode: f.inode ^ 0xdead_beef,
            ..f
        };
        assert_eq!(process_maps_file(getpid(), other).unwrap(), Some(false));
        assert!(!children_of_current_thread().unwrap().contains(&getpid()));
    }
}
