//! Shared memory objects and their mappings: sealed memfds, named POSIX objects (create,
//! open, list, rename without replacing, unlink), aligned shared mappings, `pread`, file
//! identities, and descriptor inheritance across exec.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::ptr;

use super::invalid_input;

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
