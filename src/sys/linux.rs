//! Linux back end: shared futexes, memfd/shm_open, fork/wait and thread identity via /proc.

use std::cell::Cell;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::ptr;
#[cfg(not(miri))]
use std::sync::Once;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------

/// Time since an arbitrary fixed point on `CLOCK_MONOTONIC`, the clock futex deadlines use.
pub(crate) fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec, and CLOCK_MONOTONIC exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// An absolute point on the monotonic clock after which a wait gives up, or never.
///
/// Waits are expressed against an absolute deadline, not a relative timeout, so that a
/// wait interrupted by a signal or woken spuriously resumes against the same end point
/// instead of silently extending itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deadline {
    at: Option<Duration>,
}

impl Deadline {
    pub(crate) const NEVER: Deadline = Deadline { at: None };

    /// `timeout` from now; a timeout too large to represent means "never".
    pub(crate) fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: monotonic_now().checked_add(timeout),
        }
    }

    /// Time left, `None` for a deadline that never expires.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.at.map(|at| at.saturating_sub(monotonic_now()))
    }

    pub(crate) fn has_passed(&self) -> bool {
        self.remaining() == Some(Duration::ZERO)
    }

    /// The earlier of `self` and `timeout` from now.
    pub(crate) fn capped(&self, timeout: Duration) -> Deadline {
        let other = Deadline::after(timeout);
        match (self.at, other.at) {
            (Some(a), Some(b)) => Deadline { at: Some(a.min(b)) },
            (Some(a), None) => Deadline { at: Some(a) },
            (None, b) => Deadline { at: b },
        }
    }

    fn as_timespec(&self) -> Option<libc::timespec> {
        self.at.map(|at| libc::timespec {
            tv_sec: at.as_secs() as libc::time_t,
            tv_nsec: at.subsec_nanos() as libc::c_long,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Futex
// ---------------------------------------------------------------------------------------

/// How a futex wait ended. Callers must re-check their condition either way: a wake-up
/// may be spurious, and a value change or signal looks the same as a wake-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FutexWait {
    /// Woken, interrupted, or the word no longer held `expected`.
    Woken,
    /// The deadline passed.
    TimedOut,
}

/// Sleeps while `*word == expected`, until woken or `deadline` passes.
///
/// The wait is process-shared: it omits `FUTEX_PRIVATE_FLAG`, so the kernel keys it on the
/// physical page and a waker in another process that maps the same page finds it.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, deadline: Deadline) -> FutexWait {
    let ts = deadline.as_timespec();
    if let Some(ts) = &ts {
        if monotonic_now() >= Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32) {
            return FutexWait::TimedOut;
        }
    }
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |ts| ts as *const libc::timespec);
    // FUTEX_WAIT_BITSET (unlike FUTEX_WAIT) takes an absolute CLOCK_MONOTONIC deadline,
    // which is what makes restarting after EINTR exact.
    // SAFETY: `word` is a live, aligned AtomicU32 for the whole call; the kernel only reads
    // it. `ts_ptr` is null or points at `ts`, which outlives the call. The remaining
    // arguments are plain integers that FUTEX_WAIT_BITSET ignores or checks.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT_BITSET,
            expected,
            ts_ptr,
            ptr::null::<u32>(),
            libc::FUTEX_BITSET_MATCH_ANY,
        )
    };
    if rc == 0 {
        return FutexWait::Woken;
    }
    match errno() {
        libc::ETIMEDOUT => FutexWait::TimedOut,
        libc::EAGAIN | libc::EINTR => FutexWait::Woken,
        e => panic!(
            "futex wait failed with {}: the word is not in mapped memory or the kernel lacks \
             futex support",
            io::Error::from_raw_os_error(e)
        ),
    }
}

/// Wakes up to `count` waiters sleeping on `word` in any process. Returns how many woke.
pub(crate) fn futex_wake(word: &AtomicU32, count: u32) -> usize {
    let count = count.min(i32::MAX as u32) as i32;
    // SAFETY: `word` is a live, aligned AtomicU32; FUTEX_WAKE never dereferences it beyond
    // hashing its address, and the remaining arguments are ignored.
    let rc = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, count) };
    rc.max(0) as usize
}

// ---------------------------------------------------------------------------------------
// Thread identity and liveness
// ---------------------------------------------------------------------------------------

/// Who the calling thread is, in a form that another process can check for liveness:
/// the kernel thread id plus the thread's start time in clock ticks since boot. Together
/// they name one thread for the lifetime of the machine, so a recycled tid is told apart
/// from the thread that used to own it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ThreadIdentity {
    pub(crate) tid: u32,
    /// Start time in clock ticks after boot; 0 when `/proc` could not tell.
    pub(crate) start: u64,
    /// The pid namespace `tid` is numbered in (its nsfs inode); 0 when unknown.
    pub(crate) ns: u32,
}

thread_local! {
    static IDENTITY: Cell<Option<ThreadIdentity>> = const { Cell::new(None) };
}

#[cfg(not(miri))]
static ATFORK: Once = Once::new();

#[cfg(not(miri))]
extern "C" fn forget_identity_in_child() {
    // The child of fork runs on a new thread with a new tid but a copy of the parent
    // thread's TLS: drop the cached identity so it is computed afresh.
    let _ = IDENTITY.try_with(|c| c.set(None));
}

/// The calling thread's identity, computed once per thread (and again after fork).
///
/// Under Miri, threads are interpreted rather than real, so they get distinct made-up
/// ids and no start time (liveness checks then always answer "cannot tell").
#[cfg(miri)]
pub(crate) fn current_thread() -> ThreadIdentity {
    use std::sync::atomic::Ordering;
    static NEXT: AtomicU32 = AtomicU32::new(1);
    IDENTITY.with(|cell| {
        let id = cell.get().unwrap_or_else(|| ThreadIdentity {
            tid: NEXT.fetch_add(1, Ordering::Relaxed),
            start: 0,
            ns: 0,
        });
        cell.set(Some(id));
        id
    })
}

/// The calling thread's identity, computed once per thread (and again after fork).
#[cfg(not(miri))]
#[inline]
pub(crate) fn current_thread() -> ThreadIdentity {
    match IDENTITY.with(Cell::get) {
        Some(id) => id,
        None => identify_current_thread(),
    }
}

#[cfg(not(miri))]
#[cold]
fn identify_current_thread() -> ThreadIdentity {
    ATFORK.call_once(|| {
        // SAFETY: registering a child handler that only touches this thread's TLS is
        // sound; the handler is an `extern "C" fn()` with static lifetime.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(forget_identity_in_child)) };
        assert_eq!(rc, 0, "pthread_atfork failed: out of memory");
    });
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() } as u32;
    // Without /proc we cannot learn our start time (0 records "unknown"); liveness checks
    // then only ask whether the tid still exists. `thread-self` names this thread whichever
    // pid namespace the mounted /proc belongs to, and start times are namespace-free.
    let start = std::fs::read("/proc/thread-self/stat")
        .ok()
        .and_then(|text| parse_stat(&text))
        .map_or(0, |stat| stat.start);
    // nsfs inode numbers are allocated below 2^32 (`proc_inum`); anything else is not one.
    let ns = pid_namespace_id()
        .and_then(|ino| u32::try_from(ino).ok())
        .unwrap_or(0);
    let id = ThreadIdentity { tid, start, ns };
    IDENTITY.with(|cell| cell.set(Some(id)));
    id
}

/// The calling process's `(pid, start time in ticks)`, read without allocating (raw
/// open/read on a stack buffer), so it may be called in a fork child handler.
pub(crate) fn current_process_noalloc() -> (u32, u64) {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    if cfg!(miri) {
        return (pid, 0); // no /proc under Miri: liveness checks answer "cannot tell"
    }
    let mut buf = [0u8; 1024];
    let path = c"/proc/self/stat";
    // SAFETY: `path` is NUL-terminated; flags are plain integers.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return (pid, 0);
    }
    let mut len = 0usize;
    while len < buf.len() {
        // SAFETY: reading into the unfilled tail of `buf`, which we own.
        let n = unsafe { libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    // SAFETY: closing the descriptor we opened above.
    unsafe { libc::close(fd) };
    (pid, parse_stat(&buf[..len]).map_or(0, |s| s.start))
}

/// Registers process-wide fork handlers (see `pthread_atfork(3)`): `prepare` runs in the
/// parent before the fork, `parent` after it in the parent, `child` in the new child.
pub(crate) fn register_fork_handlers(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) {
    if cfg!(miri) {
        return; // Miri cannot fork, so there is nothing to hand over
    }
    // SAFETY: the handlers are `extern "C" fn()` with static lifetime.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    assert_eq!(rc, 0, "pthread_atfork failed: out of memory");
}

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

/// The calling process's id.
pub(crate) fn getpid() -> u32 {
    std::process::id()
}

// ---------------------------------------------------------------------------------------
// Shared memory objects
// ---------------------------------------------------------------------------------------

/// A new anonymous memory file of `len` bytes, close-on-exec, sealed so that no process
/// can shrink or grow it: a mapping of it can never SIGBUS because someone truncated it.
pub(crate) fn memfd_create(debug_name: &str, len: u64) -> io::Result<File> {
    let name = CString::new(debug_name).map_err(|_| invalid_input("name contains a NUL byte"))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own takes an integer argument; no memory involved.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            seals,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

fn invalid_input(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn shm_name(os_name: &str) -> io::Result<CString> {
    CString::new(os_name).map_err(|_| invalid_input("name contains a NUL byte"))
}

/// Creates the POSIX shared memory object `os_name` (which starts with `/`), failing if it
/// already exists, readable and writable by this user only, sized to `len` bytes.
pub(crate) fn shm_create(os_name: &str, len: u64) -> io::Result<File> {
    let name = shm_name(os_name)?;
    // SAFETY: `name` is a valid NUL-terminated string; flags and mode are plain integers.
    let fd = unsafe {
        libc::shm_open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o600 as libc::mode_t,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: shm_open returned a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    if let Err(e) = file.set_len(len) {
        let _ = shm_unlink(os_name);
        return Err(e);
    }
    Ok(file)
}

/// Opens the existing POSIX shared memory object `os_name` for reading and writing.
pub(crate) fn shm_open_existing(os_name: &str) -> io::Result<File> {
    let name = shm_name(os_name)?;
    // SAFETY: `name` is a valid NUL-terminated string; flags and mode are plain integers.
    let fd = unsafe { libc::shm_open(name.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: shm_open returned a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Removes the name `os_name`; processes that have it open or mapped keep their memory.
pub(crate) fn shm_unlink(os_name: &str) -> io::Result<()> {
    let name = shm_name(os_name)?;
    // SAFETY: `name` is a valid NUL-terminated string.
    if unsafe { libc::shm_unlink(name.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Names (without the leading `/`) of the POSIX shared memory objects that start with
/// `prefix`.
pub(crate) fn shm_list(prefix: &str) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/dev/shm")? {
        let name = entry?.file_name();
        if let Some(name) = name.to_str() {
            if name.starts_with(prefix) {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Clears close-on-exec so a child started with exec inherits `fd`.
pub(crate) fn set_inheritable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFD/F_SETFD on a descriptor borrowed for the whole call; integer args.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFD);
        if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// Which side of a fork the caller is on.
pub(crate) enum Forked {
    Child,
    Parent(u32),
}

/// Forks the calling process.
///
/// # Safety
///
/// The child gets a copy of only the calling thread. If other threads exist, any lock they
/// held at the moment of the fork (allocator, stdio, user mutexes) stays locked forever in
/// the child, so in a multi-threaded process the child may only call async-signal-safe
/// functions before it exits with [`exit_immediately`].
pub(crate) unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller upholds the contract above.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as u32)),
    }
}

/// Ends the calling process at once with `code`, without running destructors, atexit
/// handlers or stdio flushes that belong to the parent's copy of the state.
pub(crate) fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}

/// Sends `signal` to process `pid`, or to process group `-pid` when `group` is set.
pub(crate) fn send_signal(pid: u32, signal: i32, group: bool) -> io::Result<()> {
    let target = if group {
        -(pid as libc::pid_t)
    } else {
        pid as libc::pid_t
    };
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(target, signal) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the calling process the leader of a new process group, so that it and every
/// process it starts can be signalled together.
pub(crate) fn become_group_leader() -> io::Result<()> {
    // SAFETY: setpgid(0, 0) acts on the calling process only.
    if unsafe { libc::setpgid(0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The signal numbers procshare uses, re-exported so no module above `sys` needs libc.
pub(crate) mod signal {
    /// SIGKILL.
    pub const KILL: i32 = libc::SIGKILL;
    /// SIGTERM.
    pub const TERM: i32 = libc::SIGTERM;
}

// ---------------------------------------------------------------------------------------
// Liveness evidence
// ---------------------------------------------------------------------------------------

/// The largest thread id Linux can hand out (`PID_MAX_LIMIT`, 2^22 on 64-bit kernels).
pub(crate) const TID_LIMIT: u32 = 1 << 22;

/// Whether a task with id `tid` exists in the caller's pid namespace, asked with
/// `kill(tid, 0)`: `Some(false)` only on `ESRCH`. `EPERM` means it exists but belongs to
/// someone we may not signal, which is still "exists". `None` when the id cannot name a
/// task (0, or beyond `PID_MAX_LIMIT`: `kill` would read it as a process group or
/// "every process") or the kernel gives another answer.
///
/// `kill` resolves any thread id, not only process ids, and answers `0` for a zombie: a
/// caller that needs "zombie means dead" must ask `/proc` as well.
pub(crate) fn task_exists(tid: u32) -> Option<bool> {
    if tid == 0 || tid > TID_LIMIT || cfg!(miri) {
        return None;
    }
    // SAFETY: signal 0 only checks existence and permission; `tid` is a positive id.
    if unsafe { libc::kill(tid as libc::pid_t, 0) } == 0 {
        return Some(true);
    }
    match errno() {
        libc::ESRCH => Some(false),
        libc::EPERM => Some(true),
        _ => None,
    }
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

// --- shm: aligned mappings, pid namespace, name-checked removal, header reads ---

/// A shared mapping of a file, unmapped on drop.
pub(crate) struct SharedMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: a SharedMap is an address range owned by this value; it hands out only raw
// pointers, so moving or sharing it between threads cannot by itself cause a data race.
unsafe impl Send for SharedMap {}
// SAFETY: as above; every method takes `&self` and only reads the two fields.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// The first mapped byte.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is exactly the range mapped by `map_shared_aligned`, owned
        // by this value and unmapped nowhere else.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The size of a memory page.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

/// Maps the first `len` bytes of `file` readable, writable and shared, at an address that
/// is a multiple of `align` (a power of two; anything up to a page is what `mmap` gives
/// anyway). Larger alignments reserve `len + align - page` bytes of address space without
/// memory behind them, map the file at the first aligned address inside, and give the rest
/// back. Nothing in the file is touched, so a file shorter than `len` is no fault here.
pub(crate) fn map_shared_aligned(file: &File, len: usize, align: usize) -> io::Result<SharedMap> {
    use std::os::fd::AsRawFd;
    let page = page_size();
    if len == 0 || !align.is_power_of_two() {
        return Err(invalid_input(
            "empty mapping or alignment not a power of two",
        ));
    }
    let align = align.max(page);
    let len_pages = len
        .checked_next_multiple_of(page)
        .ok_or_else(|| invalid_input("mapping too large"))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let fd = file.as_raw_fd();
    if align == page {
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), of a descriptor we
        // borrow for the call; it overlaps nothing that Rust code owns.
        let p = unsafe { libc::mmap(ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(|| invalid_input("null mapping"))?;
        return Ok(SharedMap { ptr, len });
    }
    let reserve = len_pages
        .checked_add(align - page)
        .ok_or_else(|| invalid_input("mapping too large"))?;
    // SAFETY: reserves fresh address space chosen by the kernel, inaccessible and without
    // memory behind it; it overlaps nothing that Rust code owns.
    let base = unsafe {
        libc::mmap(
            ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base_addr = base as usize;
    let start = base_addr.next_multiple_of(align);
    // `start - base_addr` is a multiple of the page size below `align`, so
    // `start + len_pages <= base_addr + reserve`.
    // SAFETY: `start..start+len_pages` lies inside the reservation we own, so MAP_FIXED
    // replaces only our own inaccessible pages.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        // SAFETY: unmapping exactly the reservation made above, which nothing else uses.
        unsafe { libc::munmap(base, reserve) };
        return Err(e);
    }
    // SAFETY: the head and tail of the reservation around the file mapping are ours and
    // unused; unmapping them leaves exactly `start..start+len_pages` mapped.
    unsafe {
        if start > base_addr {
            libc::munmap(base, start - base_addr);
        }
        let end = start + len_pages;
        let reserve_end = base_addr + reserve;
        if reserve_end > end {
            libc::munmap(end as *mut libc::c_void, reserve_end - end);
        }
    }
    let ptr = std::ptr::NonNull::new(start as *mut u8).ok_or_else(|| invalid_input("null"))?;
    Ok(SharedMap { ptr, len })
}

/// Reads up to `buf.len()` bytes of `file` at `offset` with `pread`, without using (or
/// moving) any mapping or file position: a file shorter than asked is a short count, never
/// a fault. Returns how many bytes were read.
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
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

/// `(device, inode)` of an open file: which object it is, whatever its name now.
pub(crate) fn file_id(file: &File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

fn shm_path(os_name: &str) -> String {
    // glibc's shm_open is open(2) under /dev/shm; `os_name` starts with '/'.
    format!("/dev/shm{os_name}")
}

/// `(device, inode)` of the object the shared memory name `os_name` refers to now, or
/// `None` if there is no such name.
pub(crate) fn shm_name_id(os_name: &str) -> io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(shm_path(os_name)) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Atomically renames the shared memory object `from` to `to`, failing with
/// `AlreadyExists` rather than replacing an object named `to`.
pub(crate) fn shm_rename_noreplace(from: &str, to: &str) -> io::Result<()> {
    let from = CString::new(shm_path(from)).map_err(|_| invalid_input("NUL in name"))?;
    let to = CString::new(shm_path(to)).map_err(|_| invalid_input("NUL in name"))?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; the
    // directory descriptors are AT_FDCWD and the flag is a plain integer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    #[cfg_attr(miri, ignore = "no /proc under Miri")]
    fn own_identity_is_alive_and_stable() {
        let me = current_thread();
        assert_eq!(me, current_thread());
        let stat = thread_stat(me.tid).unwrap().expect("we exist");
        assert_eq!(stat.start, me.start);
        assert!(!stat.is_dead());
    }

    #[test]
    fn futex_wait_times_out_and_mismatch_returns() {
        let word = AtomicU32::new(7);
        assert_eq!(
            futex_wait(&word, 8, Deadline::after(Duration::from_secs(5))),
            FutexWait::Woken
        );
        let start = monotonic_now();
        let r = futex_wait(&word, 7, Deadline::after(Duration::from_millis(20)));
        assert_eq!(r, FutexWait::TimedOut);
        assert!(monotonic_now() - start >= Duration::from_millis(20));
    }
}

// --- peer tables: fork children, exec'd holders ---

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

/// Sets `errno` to 0, so that a later [`errno_is_set`] tells whether a call failed since.
pub(crate) fn clear_errno() {
    if cfg!(miri) {
        return;
    }
    // SAFETY: __errno_location returns the calling thread's errno, valid for writes.
    unsafe { *libc::__errno_location() = 0 };
}

/// Whether `errno` is non-zero (see [`clear_errno`]).
pub(crate) fn errno_is_set() -> bool {
    !cfg!(miri) && errno() != 0
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

/// The mapping of the calling process that contains `addr`: its range and its file
/// (`None` for an anonymous mapping). `Ok(None)` if `addr` is not mapped.
pub(crate) fn own_mapping_at(
    addr: usize,
) -> io::Result<Option<(usize, usize, Option<MappedFile>)>> {
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
mod peer_table_tests {
    use super::*;

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
