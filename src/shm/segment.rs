//! [`Segment`]: a region of memory mapped into several processes.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use memmap2::MmapRaw;

use super::header::{
    self, HEADER_LEN, HeaderError, HeaderFields, OFF_STATE, Placement, STATE_INITIALISING,
    STATE_READY, TypeTag,
};
use crate::error::{Error, Result};
use crate::sys;

/// Prefix of every named segment in the POSIX shared memory namespace (`/dev/shm` on
/// Linux), so procshare's objects can be listed and cleaned up without touching others.
const NAME_PREFIX: &str = "procshare.";

/// How long [`Segment::open`] waits for a creator that is still initialising.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(1);

/// A block of memory shared between processes, with a checked header in front.
///
/// Two kinds exist:
///
/// * **Anonymous** ([`Segment::anonymous`]): backed by a `memfd`, sealed so it can never
///   be shrunk or grown. It has no name, is inherited by `fork`ed children (the mapping
///   stays at the same address) and can be handed to an exec'd child as a file descriptor
///   ([`Segment::as_fd`], [`Segment::from_fd`]). The memory is freed when the last process
///   that maps it exits or drops it, so a crash leaves nothing behind. This is the default.
/// * **Named** ([`Segment::create`] / [`Segment::open`]): a POSIX shared memory object
///   `/dev/shm/procshare.<name>`, created exclusively with mode 0600, for processes that
///   are not related by fork. The creator removes the name when it drops the segment
///   (unless [`Segment::persist`] was called); segments left behind by crashed creators
///   are found with [`Segment::list`] and removed with [`Segment::remove_stale`].
///
/// Every segment starts with a header (magic, format version, a fingerprint of what it
/// holds, its length, and an initialisation flag). [`Segment::open`] checks the file size
/// before touching memory, then the header, and waits (bounded) for the creator to finish
/// initialising, so opening the wrong name, a truncated file or a segment of another type
/// is an [`Error`] naming what differed, never a crash.
///
/// `Segment` is the untyped layer: [`as_ptr`](Segment::as_ptr) gives the start of the
/// data. [`Shared`](crate::Shared) puts a typed value in one.
///
/// ```
/// use procshare::Segment;
///
/// let seg = Segment::anonymous(4096)?;
/// assert_eq!(seg.len(), 4096);
/// // The data starts zeroed and is at least 64-byte aligned.
/// assert_eq!(seg.as_ptr() as usize % 64, 0);
/// # Ok::<(), procshare::Error>(())
/// ```
pub struct Segment {
    map: MmapRaw,
    file: File,
    placement: Placement,
    /// Element count recorded by the creator (1 for a value, n for a slice).
    elements: u64,
    name: Option<String>,
    unlink_on_drop: bool,
}

// SAFETY: a Segment owns its mapping and descriptor; it hands out only raw pointers, so
// sharing or sending it between threads cannot by itself cause a data race.
unsafe impl Send for Segment {}
// SAFETY: as above: every method takes `&self` and touches only immutable process-local
// fields or the shared state word through an atomic.
unsafe impl Sync for Segment {}

/// Where a new segment's memory comes from.
pub(crate) enum Backing<'a> {
    Anonymous,
    Named(&'a str),
}

fn validate_name(name: &str) -> Result<String> {
    if name.is_empty() || name.len() > 200 || name.contains('/') || name.contains('\0') {
        return Err(Error::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(format!("/{NAME_PREFIX}{name}"))
}

impl Segment {
    /// Creates an anonymous (memfd-backed) segment with `len` bytes of zeroed data.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the kernel refuses the memfd or the mapping (out of memory, or too
    /// many open files).
    pub fn anonymous(len: usize) -> Result<Segment> {
        Self::create_with(
            Backing::Anonymous,
            &TypeTag::bytes(),
            len as u64,
            len,
            |_| {},
        )
    }

    /// Creates the named segment `name` with `len` bytes of zeroed data, failing if one of
    /// that name exists. Another process opens it with [`Segment::open`].
    ///
    /// ```
    /// use procshare::Segment;
    ///
    /// let name = format!("doc-create-{}", std::process::id());
    /// let mine = Segment::create(&name, 100)?;
    /// let theirs = Segment::open(&name)?; // normally in another process
    /// assert_eq!(theirs.len(), 100);
    /// drop(mine); // the creator removes the name; open mappings stay valid
    /// assert!(Segment::open(&name).is_err());
    /// # Ok::<(), procshare::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::SegmentExists`], [`Error::InvalidName`], or [`Error::Io`].
    pub fn create(name: &str, len: usize) -> Result<Segment> {
        Self::create_with(
            Backing::Named(name),
            &TypeTag::bytes(),
            len as u64,
            len,
            |_| {},
        )
    }

    /// Opens the named segment `name`, waiting up to [`DEFAULT_OPEN_TIMEOUT`] for its
    /// creator to finish initialising it.
    ///
    /// # Errors
    ///
    /// [`Error::SegmentNotFound`], [`Error::ForeignSegment`], [`Error::VersionMismatch`],
    /// [`Error::SizeMismatch`], [`Error::NotReady`] or [`Error::Io`].
    pub fn open(name: &str) -> Result<Segment> {
        Self::open_with(name, None, DEFAULT_OPEN_TIMEOUT)
    }

    /// Like [`open`](Segment::open), waiting up to `timeout` for initialisation.
    ///
    /// # Errors
    ///
    /// As for [`open`](Segment::open).
    pub fn open_timeout(name: &str, timeout: Duration) -> Result<Segment> {
        Self::open_with(name, None, timeout)
    }

    /// Adopts a segment received as a file descriptor (for example inherited by an exec'd
    /// child), checking its header like [`open`](Segment::open).
    ///
    /// # Errors
    ///
    /// As for [`open`](Segment::open).
    pub fn from_fd(fd: OwnedFd) -> Result<Segment> {
        let label = "<descriptor>".to_owned();
        Self::attach(File::from(fd), label, None, None, DEFAULT_OPEN_TIMEOUT)
    }

    pub(crate) fn create_with(
        backing: Backing<'_>,
        tag: &TypeTag,
        elements: u64,
        data_len: usize,
        init: impl FnOnce(NonNull<u8>),
    ) -> Result<Segment> {
        let placement =
            Placement::for_data(data_len, tag.align).ok_or_else(|| Error::InvalidArgument {
                what: format!("a segment of {data_len} bytes does not fit in the address space"),
            })?;
        let (file, name) = match backing {
            Backing::Anonymous => {
                let file = sys::memfd_create("procshare", placement.total_len as u64)
                    .map_err(|e| Error::io("creating anonymous shared memory (memfd)", e))?;
                (file, None)
            }
            Backing::Named(name) => {
                let os_name = validate_name(name)?;
                let file = sys::shm_create(&os_name, placement.total_len as u64).map_err(|e| {
                    match e.kind() {
                        io::ErrorKind::AlreadyExists => Error::SegmentExists {
                            name: name.to_owned(),
                        },
                        _ => Error::io("creating named shared memory (shm_open)", e),
                    }
                })?;
                (file, Some(name.to_owned()))
            }
        };
        let unlink_on_drop = name.is_some();
        let map = match sys::map_shared(&file, placement.total_len) {
            Ok(map) => map,
            Err(e) => {
                if let Some(name) = &name {
                    let _ = sys::shm_unlink(&format!("/{NAME_PREFIX}{name}"));
                }
                return Err(Error::io("mapping shared memory", e));
            }
        };
        let fields = HeaderFields {
            placement,
            fingerprint: tag.fingerprint,
            elements,
            creator_pid: sys::getpid(),
            creator_start: sys::thread_stat(sys::getpid())
                .ok()
                .flatten()
                .map_or(0, |s| s.start),
            description: tag.description.clone(),
        };
        let seg = Segment {
            map,
            file,
            placement,
            elements,
            name,
            unlink_on_drop,
        };
        let bytes = fields.encode();
        // SAFETY: the mapping is at least HEADER_LEN bytes long and nobody else can have
        // it yet (the memfd is private to us; a named object's header reads as "not
        // ready" to openers until the state store below).
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), seg.map.as_mut_ptr(), HEADER_LEN) };
        init(seg.data_ptr());
        seg.state_word().store(STATE_READY, Ordering::Release);
        sys::futex_wake(seg.state_word(), u32::MAX);
        Ok(seg)
    }

    pub(crate) fn open_with(
        name: &str,
        expected: Option<&TypeTag>,
        timeout: Duration,
    ) -> Result<Segment> {
        let os_name = validate_name(name)?;
        let file = sys::shm_open_existing(&os_name).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::SegmentNotFound {
                name: name.to_owned(),
            },
            _ => Error::io("opening named shared memory (shm_open)", e),
        })?;
        Self::attach(file, name.to_owned(), Some(name), expected, timeout)
    }

    fn attach(
        file: File,
        label: String,
        name: Option<&str>,
        expected: Option<&TypeTag>,
        timeout: Duration,
    ) -> Result<Segment> {
        let deadline = sys::Deadline::after(timeout);
        loop {
            let file_len = file
                .metadata()
                .map_err(|e| Error::io("reading shared memory size (fstat)", e))?
                .len();
            // Check the size before mapping anything: touching bytes past the end of the
            // object would be a SIGBUS, not an error.
            if file_len < HEADER_LEN as u64 {
                if deadline.has_passed() {
                    return Err(header_error(
                        &label,
                        HeaderError::Truncated { found: file_len },
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let map_len = usize::try_from(file_len).map_err(|_| Error::SizeMismatch {
                name: label.clone(),
                expected: usize::MAX as u64,
                found: file_len,
            })?;
            let map = sys::map_shared(&file, map_len)
                .map_err(|e| Error::io("mapping shared memory", e))?;
            // SAFETY: the mapping is at least HEADER_LEN bytes and OFF_STATE is 4-aligned
            // within a page-aligned mapping, so this is a valid AtomicU32 for as long as
            // `map` lives; every process only ever accesses it atomically.
            let state = unsafe { AtomicU32::from_ptr(map.as_mut_ptr().add(OFF_STATE).cast()) };
            let mut state_now = state.load(Ordering::Acquire);
            while state_now == STATE_INITIALISING && !deadline.has_passed() {
                sys::futex_wait(state, state_now, deadline.capped(Duration::from_millis(10)));
                state_now = state.load(Ordering::Acquire);
            }
            let mut bytes = [0u8; HEADER_LEN];
            // SAFETY: the mapping holds at least HEADER_LEN readable bytes. We copy them
            // out once and check only the copy, so a peer changing them cannot make a
            // checked value change under us.
            unsafe { ptr::copy_nonoverlapping(map.as_ptr(), bytes.as_mut_ptr(), HEADER_LEN) };
            let parsed =
                header::parse(&bytes, file_len, expected).map_err(|e| header_error(&label, e))?;
            return Ok(Segment {
                map,
                file,
                placement: parsed.placement,
                elements: parsed.elements,
                name: name.map(str::to_owned),
                unlink_on_drop: false,
            });
        }
    }

    fn state_word(&self) -> &AtomicU32 {
        // SAFETY: see `attach`: OFF_STATE lies inside the mapping, is 4-aligned, and is
        // only ever accessed atomically by every process.
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(OFF_STATE).cast()) }
    }

    pub(crate) fn data_ptr(&self) -> NonNull<u8> {
        // SAFETY: data_offset was checked to lie inside the mapping, whose base is non-null.
        unsafe { NonNull::new_unchecked(self.map.as_mut_ptr().add(self.placement.data_offset)) }
    }

    pub(crate) fn elements(&self) -> u64 {
        self.elements
    }

    /// Start of the data area (after the header). Aligned to at least 64 bytes.
    ///
    /// Other processes may write through their own mappings at any time: access the
    /// memory through atomics or a procshare lock, never through plain references that
    /// assume nobody else writes.
    pub fn as_ptr(&self) -> *mut u8 {
        self.data_ptr().as_ptr()
    }

    /// Length of the data area in bytes.
    pub fn len(&self) -> usize {
        self.placement.data_len
    }

    /// Whether the data area is empty.
    pub fn is_empty(&self) -> bool {
        self.placement.data_len == 0
    }

    /// The name this segment was created or opened with; `None` if anonymous.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Keeps the name after this (creating) handle is dropped, so the segment outlives its
    /// creator until [`Segment::remove`] is called. [`Segment::remove_stale`] leaves
    /// persisted segments alone.
    pub fn persist(&mut self) {
        self.unlink_on_drop = false;
        self.flags_word()
            .fetch_or(header::FLAG_PERSISTENT, Ordering::Relaxed);
    }

    fn flags_word(&self) -> &AtomicU32 {
        // SAFETY: OFF_FLAGS lies inside the mapping's header, is 4-aligned, and is only
        // accessed atomically.
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(header::OFF_FLAGS).cast()) }
    }

    /// Removes the name `name`. Processes that have the segment open keep using it; the
    /// memory is freed when the last of them lets go.
    ///
    /// # Errors
    ///
    /// [`Error::SegmentNotFound`] if there is no such segment.
    pub fn remove(name: &str) -> Result<()> {
        let os_name = validate_name(name)?;
        sys::shm_unlink(&os_name).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::SegmentNotFound {
                name: name.to_owned(),
            },
            _ => Error::io("removing named shared memory (shm_unlink)", e),
        })
    }

    /// Lists the named procshare segments on this machine, with whether their creator is
    /// still running.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory directory cannot be read.
    pub fn list() -> Result<Vec<SegmentInfo>> {
        let names = sys::shm_list(NAME_PREFIX)
            .map_err(|e| Error::io("listing shared memory objects", e))?;
        Ok(names
            .into_iter()
            .filter_map(|os| {
                let name = os.strip_prefix(NAME_PREFIX)?.to_owned();
                Some(SegmentInfo::inspect(name))
            })
            .collect())
    }

    /// Removes named segments whose creator has exited without removing them (it crashed,
    /// or was killed) and that were not [`persist`](Segment::persist)ed. Returns the names
    /// removed. Processes still using such a segment are unaffected.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory directory cannot be read.
    pub fn remove_stale() -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for info in Self::list()? {
            if info.is_stale() && Segment::remove(&info.name).is_ok() {
                removed.push(info.name);
            }
        }
        Ok(removed)
    }
}

impl AsFd for Segment {
    /// The memfd or shm object behind the segment, for passing to another process.
    /// It is close-on-exec; see [`Segment::inheritable_fd`].
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Segment {
    /// Clears close-on-exec on the segment's descriptor so a child started with exec
    /// inherits it (pass the number, then [`Segment::from_fd`] in the child), and returns
    /// the descriptor.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the descriptor flags cannot be changed.
    pub fn inheritable_fd(&self) -> Result<BorrowedFd<'_>> {
        sys::set_inheritable(self.file.as_fd())
            .map_err(|e| Error::io("making a segment inheritable (fcntl)", e))?;
        Ok(self.file.as_fd())
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.unlink_on_drop {
            if let Some(name) = &self.name {
                let _ = sys::shm_unlink(&format!("/{NAME_PREFIX}{name}"));
            }
        }
    }
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("len", &self.placement.data_len)
            .field("ptr", &self.as_ptr())
            .finish_non_exhaustive()
    }
}

/// What [`Segment::list`] knows about a named segment.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentInfo {
    /// The name, as given to [`Segment::create`].
    pub name: String,
    /// Process id of the creator, if the header could be read.
    pub creator_pid: Option<u32>,
    /// Whether that creator is still running; `None` if unknown.
    pub creator_alive: Option<bool>,
    /// Whether the creator called [`Segment::persist`].
    pub persistent: bool,
    /// What the segment holds, from its header.
    pub contents: Option<String>,
    /// Why the header could not be read, if it could not.
    pub problem: Option<String>,
}

impl SegmentInfo {
    fn inspect(name: String) -> SegmentInfo {
        let mut info = SegmentInfo {
            name,
            creator_pid: None,
            creator_alive: None,
            persistent: false,
            contents: None,
            problem: None,
        };
        let probe = validate_name(&info.name)
            .and_then(|os| sys::shm_open_existing(&os).map_err(|e| Error::io("shm_open", e)))
            .and_then(|file| {
                let len = file.metadata().map_err(|e| Error::io("fstat", e))?.len();
                if len < HEADER_LEN as u64 {
                    return Err(header_error(
                        &info.name,
                        HeaderError::Truncated { found: len },
                    ));
                }
                let map = sys::map_shared(&file, HEADER_LEN).map_err(|e| Error::io("mmap", e))?;
                let mut bytes = [0u8; HEADER_LEN];
                // SAFETY: the file is at least HEADER_LEN bytes and so is the mapping;
                // we copy the bytes out and inspect only the copy.
                unsafe { ptr::copy_nonoverlapping(map.as_ptr(), bytes.as_mut_ptr(), HEADER_LEN) };
                Ok(header::identify(&bytes))
            });
        match probe {
            Ok(Some(id)) => {
                info.creator_pid = Some(id.creator_pid);
                info.persistent = id.persistent;
                info.contents = Some(id.description);
                info.creator_alive = sys::thread_stat(id.creator_pid)
                    .ok()
                    .map(|stat| stat.is_some_and(|s| !s.is_dead() && s.start == id.creator_start));
            }
            Ok(None) => info.problem = Some("not a procshare header".into()),
            Err(e) => info.problem = Some(e.to_string()),
        }
        info
    }

    /// Left behind: its creator is known to be gone and it was not persisted on purpose.
    pub fn is_stale(&self) -> bool {
        self.creator_alive == Some(false) && !self.persistent
    }
}

fn header_error(label: &str, e: HeaderError) -> Error {
    let name = label.to_owned();
    match e {
        HeaderError::Truncated { found } => Error::SizeMismatch {
            name,
            expected: HEADER_LEN as u64,
            found,
        },
        HeaderError::BadMagic => Error::ForeignSegment {
            name,
            reason: "its first bytes are not procshare's magic".into(),
        },
        HeaderError::Version { found } => Error::VersionMismatch {
            name,
            found,
            expected: header::ABI_VERSION,
        },
        HeaderError::NotReady => Error::NotReady { name },
        HeaderError::Inconsistent(what) => Error::Corrupted {
            what: format!("segment {name:?} header: {what}"),
        },
        HeaderError::Size { expected, found } => Error::SizeMismatch {
            name,
            expected,
            found,
        },
        HeaderError::Type { expected, found } => Error::TypeMismatch {
            name,
            expected,
            found,
        },
    }
}
