//! [`Segment`]: a region of memory mapped into several processes.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::header::{
    self, HEADER_LEN, HeaderError, HeaderFields, OFF_STATE, Placement, STATE_READY, TypeTag,
};
use crate::error::{Error, Result};
use crate::liveness;
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
///   that maps it exits or drops it, so a crash leaves nothing behind. This is the default,
///   and the only kind a peer cannot crash by truncating it (see below).
/// * **Named** ([`Segment::create`] / [`Segment::open`]): a POSIX shared memory object
///   `/dev/shm/procshare.<name>`, created exclusively with mode 0600, for processes that
///   are not related by fork. The creator removes the name when it drops the segment
///   (unless [`Segment::persist`] was called); segments left behind by crashed creators
///   are found with [`Segment::list`] and removed with [`Segment::remove_stale`].
///
/// Every segment starts with a header (magic, format version, a fingerprint of what it
/// holds, its length and alignment, its creator and the creator's pid namespace, and an
/// initialisation flag). Opening ([`open`](Segment::open), [`from_fd`](Segment::from_fd))
/// reads the header with `pread` on the descriptor, never through a mapping, checks it
/// against the object's size, and waits (bounded) for the creator to finish initialising;
/// only then is the object mapped, and nothing in it is touched before `open` returns. So
/// opening the wrong name, a truncated or foreign object, a segment of another type, or an
/// object another process is truncating at that very moment is an [`Error`] naming what
/// differed, never a crash.
///
/// # Guarantees, and what remains
///
/// * **Alignment.** The data is aligned to what its type needs in every process, also above
///   the page size: the header records the alignment and every process maps the segment at
///   an address that is a multiple of it.
/// * **One pid namespace.** Locks, queues and the stale-segment sweep recognise dead
///   processes by their ids, which only mean the same process inside one pid namespace.
///   The creator's namespace is recorded; [`open`](Segment::open) and
///   [`from_fd`](Segment::from_fd) from another namespace (another container sharing
///   `/dev/shm`) fail with [`Error::ForeignPidNamespace`], and [`list`](Segment::list) /
///   [`remove_stale`](Segment::remove_stale) report such segments as "cannot tell" and never
///   remove them. Where `/proc` is not mounted the namespace cannot be read and is not
///   checked. A segment already mapped before a `fork` whose child sits in a new pid
///   namespace (`unshare(CLONE_NEWPID)` in the parent) is not checked either: don't do that.
/// * **Names are only removed for what was judged.** [`remove_stale`](Segment::remove_stale)
///   and a creator's drop remove a name only while it still refers to the very object that
///   was judged stale (or that the creator made): the name is atomically renamed to a
///   private one, the object behind it compared (device and inode) with the one judged, and
///   only then unlinked; anything else is renamed back. A segment re-created under the same
///   name is never removed. In the rare case that a third process creates the name again
///   within that handful of microseconds, the re-created segment cannot be put back and stays
///   listed as `<name>.removing-<pid>-<n>` until its own creator is gone and a sweep removes
///   it; processes that opened it are unaffected, but new `open`s of `<name>` find the newer
///   segment.
/// * **Truncation of a named segment: not guarded after `open`.** Linux cannot seal a
///   `/dev/shm` object, so any process with write access to it (the same user, or root) can
///   `ftruncate` it; the next access to the lost pages through any existing mapping raises
///   `SIGBUS` in that process, which procshare cannot turn into an error without a process-wide
///   signal handler it does not install. What is guarded: [`open`](Segment::open),
///   [`from_fd`](Segment::from_fd), [`list`](Segment::list) and
///   [`remove_stale`](Segment::remove_stale) never touch a mapping, so they fail cleanly on
///   an object truncated before or while they run. Everything after that (the creator's own
///   initialisation, and every access through [`as_ptr`](Segment::as_ptr),
///   [`Shared`](crate::Shared) or a primitive inside) is exposed.
///   **Recommendation:** when a peer might truncate the memory, whether by bug or malice,
///   use an anonymous segment (sealed against shrinking and growing by the kernel) shared by
///   `fork` or passed to the other process as a descriptor ([`inheritable_fd`](Segment::inheritable_fd)
///   and [`from_fd`](Segment::from_fd)); keep named segments for cooperating processes of one
///   user.
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
    map: sys::SharedMap,
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
// fields or the shared state and flag words through atomics.
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

/// `(device, inode)`: which object a descriptor or a name refers to.
type ObjectId = (u64, u64);

/// Removes the shared memory name `os_name` only if it still refers to the object `id`.
/// Returns whether it did.
///
/// There is no "unlink if it is still this file" in POSIX, so: rename the name atomically
/// to a private one (never replacing anything), look at what was moved, and unlink it only
/// if it is `id`; otherwise rename it back (again never replacing: if the name was taken
/// once more meanwhile, the moved object stays under the private name, which `list` shows,
/// rather than destroying the newer one). Callers keep `id` open, so its inode number
/// cannot be recycled while this runs.
fn unlink_if_same(os_name: &str, id: ObjectId) -> io::Result<bool> {
    unlink_if_same_with(os_name, id, || {})
}

/// [`unlink_if_same`], running `meanwhile` between the first look and the rename, where a
/// concurrent process may replace the name (the unit tests do exactly that there).
fn unlink_if_same_with(os_name: &str, id: ObjectId, meanwhile: impl FnOnce()) -> io::Result<bool> {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Cheap first look: usually the name is ours, or gone, or plainly someone else's.
    if sys::shm_name_id(os_name)? != Some(id) {
        return Ok(false);
    }
    meanwhile();
    let mut attempts = 0;
    let private = loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let candidate = format!("{os_name}.removing-{}-{n}", sys::getpid());
        match sys::shm_rename_noreplace(os_name, &candidate) {
            Ok(()) => break candidate,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
            Err(e) => return Err(e),
        }
    };
    match sys::shm_name_id(&private)? {
        Some(moved) if moved == id => match sys::shm_unlink(&private) {
            Ok(()) => Ok(true),
            // A concurrent sweep judged the same object and removed it first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        },
        // Swept by someone else in the meantime.
        None => Ok(false),
        Some(_) => {
            // Not the object judged: the name was re-created in between. Put it back.
            match sys::shm_rename_noreplace(&private, os_name) {
                Ok(()) => Ok(false),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Why a look at a header did not produce a segment yet.
enum Attempt {
    /// The creator may still be writing it: worth another look until the deadline.
    NotYet(Error),
    /// Final.
    Failed(Error),
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
    /// [`Error::SizeMismatch`], [`Error::NotReady`], [`Error::Corrupted`],
    /// [`Error::ForeignPidNamespace`] or [`Error::Io`].
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

    /// [`from_fd`](Segment::from_fd) that also checks the header names `tag` (the type a
    /// crate wrapper keeps in the segment), as a typed open by name does.
    pub(crate) fn from_fd_tagged(fd: OwnedFd, tag: &TypeTag) -> Result<Segment> {
        let label = "<descriptor>".to_owned();
        Self::attach(File::from(fd), label, None, Some(tag), DEFAULT_OPEN_TIMEOUT)
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
        let map = match sys::map_shared_aligned(&file, placement.total_len, placement.data_align) {
            Ok(map) => map,
            Err(e) => {
                if let Some(name) = &name {
                    if let Ok(id) = sys::file_id(&file) {
                        let _ = unlink_if_same(&format!("/{NAME_PREFIX}{name}"), id);
                    }
                }
                return Err(Error::io("mapping shared memory", e));
            }
        };
        let (creator_pid, creator_start) = sys::current_process_noalloc();
        let fields = HeaderFields {
            placement,
            fingerprint: tag.fingerprint,
            elements,
            creator_pid,
            creator_start,
            creator_pid_ns: sys::pid_namespace_id().unwrap_or(0),
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
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), seg.map.as_ptr(), HEADER_LEN) };
        init(seg.data_ptr());
        seg.state_word().store(STATE_READY, Ordering::Release);
        // Openers poll with `pread` rather than sleeping on this word, but a waker costs
        // nothing and keeps older openers of this format prompt.
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

    /// Reads and checks the header of `file` through `pread` (a file truncated meanwhile
    /// gives a short read, not a SIGBUS).
    fn look_full(
        file: &File,
        label: &str,
        expected: Option<&TypeTag>,
    ) -> Result<(Placement, u64), Attempt> {
        let mut bytes = [0u8; HEADER_LEN];
        let read = sys::read_at(file, &mut bytes, 0)
            .map_err(|e| Attempt::Failed(Error::io("reading a segment header (pread)", e)))?;
        let file_len = file
            .metadata()
            .map_err(|e| Attempt::Failed(Error::io("reading shared memory size (fstat)", e)))?
            .len();
        if read < HEADER_LEN {
            // The creator has not sized the object yet (or someone cut it short).
            let found = file_len.min(read as u64);
            return Err(Attempt::NotYet(header_error(
                label,
                HeaderError::Truncated { found },
            )));
        }
        if bytes[..8].iter().all(|&b| b == 0) {
            // Sized but the header not written yet.
            return Err(Attempt::NotYet(header_error(label, HeaderError::NotReady)));
        }
        let parsed = match header::parse(&bytes, file_len, expected) {
            Ok(parsed) => parsed,
            Err(HeaderError::NotReady) => {
                return Err(Attempt::NotYet(header_error(label, HeaderError::NotReady)));
            }
            Err(e) => return Err(Attempt::Failed(header_error(label, e))),
        };
        if let Some(ours) = sys::pid_namespace_id() {
            if parsed.creator_pid_ns != 0 && parsed.creator_pid_ns != ours {
                return Err(Attempt::Failed(Error::ForeignPidNamespace {
                    name: label.to_owned(),
                    segment_namespace: parsed.creator_pid_ns,
                    our_namespace: ours,
                }));
            }
        }
        Ok((parsed.placement, parsed.elements))
    }

    fn attach(
        file: File,
        label: String,
        name: Option<&str>,
        expected: Option<&TypeTag>,
        timeout: Duration,
    ) -> Result<Segment> {
        let deadline = sys::Deadline::after(timeout);
        let mut pause = Duration::from_micros(50);
        let (placement, elements) = loop {
            match Self::look_full(&file, &label, expected) {
                Ok(found) => break found,
                Err(Attempt::NotYet(e)) => {
                    let Some(left) = deadline.remaining().filter(|d| !d.is_zero()) else {
                        return Err(e);
                    };
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        };
        // Only now map it, at an address aligned for the data. Nothing in the mapping is
        // read here: everything `open` checked came from the `pread` copy above.
        let map = sys::map_shared_aligned(&file, placement.total_len, placement.data_align)
            .map_err(|e| Error::io("mapping shared memory", e))?;
        Ok(Segment {
            map,
            file,
            placement,
            elements,
            name: name.map(str::to_owned),
            unlink_on_drop: false,
        })
    }

    fn state_word(&self) -> &AtomicU32 {
        // SAFETY: OFF_STATE lies inside the mapping (at least HEADER_LEN bytes, page-aligned
        // base), is 4-aligned, and is only ever accessed atomically by every process.
        unsafe { AtomicU32::from_ptr(self.map.as_ptr().add(OFF_STATE).cast()) }
    }

    pub(crate) fn data_ptr(&self) -> NonNull<u8> {
        // SAFETY: data_offset was checked to lie inside the mapping, whose base is non-null.
        unsafe { NonNull::new_unchecked(self.map.as_ptr().add(self.placement.data_offset)) }
    }

    pub(crate) fn elements(&self) -> u64 {
        self.elements
    }

    /// Start of the data area (after the header). Aligned to at least 64 bytes, and to the
    /// alignment of the type a typed segment holds, in every process that maps it.
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
        unsafe { AtomicU32::from_ptr(self.map.as_ptr().add(header::OFF_FLAGS).cast()) }
    }

    /// Removes the name `name`, whatever segment it refers to now. Processes that have the
    /// segment open keep using it; the memory is freed when the last of them lets go. (To
    /// remove only abandoned segments, use [`remove_stale`](Segment::remove_stale).)
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
    /// Headers are read with `pread`, so an object truncated meanwhile is reported with a
    /// [`problem`](SegmentInfo::problem), never a crash. A creator counts as gone only on the
    /// kernel's proof (see [`SegmentInfo::creator_alive`]); a segment made in another pid
    /// namespace is reported as "cannot tell".
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory directory cannot be read.
    pub fn list() -> Result<Vec<SegmentInfo>> {
        let names = sys::shm_list(NAME_PREFIX)
            .map_err(|e| Error::io("listing shared memory objects", e))?;
        Ok(names
            .iter()
            .filter_map(|os| Some(Probe::of(os)?.info))
            .collect())
    }

    /// Removes named segments whose creator has exited without removing them (it crashed,
    /// or was killed) and that were not [`persist`](Segment::persist)ed. Returns the names
    /// removed. Processes still using such a segment are unaffected.
    ///
    /// Each name is judged and removed on its own, and removed only while it still refers to
    /// the object judged (see "Names are only removed for what was judged" on [`Segment`]):
    /// a segment re-created under a stale name meanwhile is left alone. Segments from another
    /// pid namespace, or whose creator's fate cannot be proven, are never removed.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory directory cannot be read.
    pub fn remove_stale() -> Result<Vec<String>> {
        let names = sys::shm_list(NAME_PREFIX)
            .map_err(|e| Error::io("listing shared memory objects", e))?;
        let mut removed = Vec::new();
        for os in &names {
            let Some(probe) = Probe::of(os) else { continue };
            if !probe.info.is_stale() {
                continue;
            }
            // `probe.file` stays open across the removal, so the judged object (and its
            // inode number) cannot disappear and be recycled under us.
            if let Some((_, id)) = &probe.judged {
                if matches!(unlink_if_same(&format!("/{os}"), *id), Ok(true)) {
                    removed.push(probe.info.name);
                }
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
                // Only if the name still refers to this object: it may have been removed
                // and taken by a successor meanwhile, whose segment must live on.
                if let Ok(id) = sys::file_id(&self.file) {
                    let _ = unlink_if_same(&format!("/{NAME_PREFIX}{name}"), id);
                }
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
    /// Whether that creator is still running: `Some(false)` only when the kernel proves it
    /// gone (no such process, a zombie, or its pid now names a process started later),
    /// `Some(true)` when it is running or its end cannot be proven, and `None` when this
    /// process cannot tell at all: the header is unreadable, the creator recorded no start
    /// time, or it was created in another pid namespace.
    pub creator_alive: Option<bool>,
    /// Whether the creator called [`Segment::persist`].
    pub persistent: bool,
    /// What the segment holds, from its header.
    pub contents: Option<String>,
    /// The creator's pid namespace (the inode number of its `/proc/self/ns/pid`), if it
    /// recorded one.
    pub creator_pid_namespace: Option<u64>,
    /// Whether the segment was created in this process's pid namespace; `None` if either
    /// namespace is unknown. Segments from another namespace are never judged stale.
    pub same_pid_namespace: Option<bool>,
    /// Why the header could not be read, or why its creator cannot be judged.
    pub problem: Option<String>,
}

/// A named object looked at for [`Segment::list`] and [`Segment::remove_stale`]: what was
/// found, and the open object it was found in.
struct Probe {
    info: SegmentInfo,
    /// The object the header was read from, kept open, and its identity.
    judged: Option<(File, ObjectId)>,
}

impl Probe {
    /// Looks at `/dev/shm/<os>`, where `os` is a directory entry starting with
    /// [`NAME_PREFIX`]. Nothing is mapped: the header is read with `pread`.
    fn of(os: &str) -> Option<Probe> {
        let name = os.strip_prefix(NAME_PREFIX)?.to_owned();
        let mut probe = Probe {
            info: SegmentInfo {
                name,
                creator_pid: None,
                creator_alive: None,
                persistent: false,
                contents: None,
                creator_pid_namespace: None,
                same_pid_namespace: None,
                problem: None,
            },
            judged: None,
        };
        let file = match sys::shm_open_existing(&format!("/{os}")) {
            Ok(file) => file,
            Err(e) => {
                probe.info.problem = Some(Error::io("opening it (shm_open)", e).to_string());
                return Some(probe);
            }
        };
        let mut bytes = [0u8; HEADER_LEN];
        let read = match sys::read_at(&file, &mut bytes, 0) {
            Ok(n) => n,
            Err(e) => {
                probe.info.problem = Some(Error::io("reading its header (pread)", e).to_string());
                return Some(probe);
            }
        };
        if read < HEADER_LEN {
            let e = header_error(
                &probe.info.name,
                HeaderError::Truncated { found: read as u64 },
            );
            probe.info.problem = Some(e.to_string());
            return Some(probe);
        }
        let Some(id) = header::identify(&bytes) else {
            probe.info.problem = Some("not a procshare header".into());
            return Some(probe);
        };
        let info = &mut probe.info;
        info.creator_pid = Some(id.creator_pid);
        info.persistent = id.persistent;
        info.contents = Some(id.description);
        info.creator_pid_namespace = (id.creator_pid_ns != 0).then_some(id.creator_pid_ns);
        info.same_pid_namespace = match (info.creator_pid_namespace, sys::pid_namespace_id()) {
            (Some(theirs), Some(ours)) => Some(theirs == ours),
            _ => None,
        };
        // Only a creator of our own pid namespace with a recorded start time can be judged;
        // anything else is "cannot tell", which is never stale.
        info.creator_alive =
            (info.same_pid_namespace == Some(true) && id.creator_pid != 0 && id.creator_start != 0)
                .then(|| {
                    let who = crate::owner::process_identity(id.creator_pid, id.creator_start);
                    !liveness::process_is_dead(who)
                });
        if info.same_pid_namespace == Some(false) {
            info.problem = Some(format!(
                "created in pid namespace pid:[{}], not this process's: cannot tell whether its \
                 creator is alive",
                id.creator_pid_ns
            ));
        }
        if let Ok(object) = sys::file_id(&file) {
            probe.judged = Some((file, object));
        }
        Some(probe)
    }
}

impl SegmentInfo {
    /// Left behind: its creator is proven gone and it was not persisted on purpose.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn os(name: &str) -> String {
        format!("/{NAME_PREFIX}{name}")
    }

    fn unique(what: &str) -> String {
        format!("unit-{}-{what}", sys::getpid())
    }

    #[test]
    #[cfg_attr(miri, ignore = "needs /dev/shm")]
    fn unlinks_its_own_object_and_nothing_else() {
        let name = unique("own");
        let seg = Segment::create(&name, 8).unwrap();
        let id = sys::file_id(&seg.file).unwrap();
        let other = Segment::anonymous(8).unwrap();
        let other_id = sys::file_id(&other.file).unwrap();
        assert!(!unlink_if_same(&os(&name), other_id).unwrap());
        assert!(Segment::open(&name).is_ok());
        assert!(unlink_if_same(&os(&name), id).unwrap());
        assert!(matches!(
            Segment::open(&name),
            Err(Error::SegmentNotFound { .. })
        ));
        assert!(!unlink_if_same(&os(&name), id).unwrap());
    }

    #[test]
    #[cfg_attr(miri, ignore = "needs /dev/shm")]
    fn puts_back_a_successor_that_took_the_name_after_the_first_look() {
        let name = unique("successor");
        let first = Segment::create(&name, 8).unwrap();
        let first_id = sys::file_id(&first.file).unwrap();
        let mut successor = None;
        let removed = unlink_if_same_with(&os(&name), first_id, || {
            Segment::remove(&name).unwrap();
            successor = Some(Segment::create(&name, 8).unwrap());
        })
        .unwrap();
        assert!(!removed);
        let successor = successor.unwrap();
        assert_eq!(
            sys::shm_name_id(&os(&name)).unwrap(),
            Some(sys::file_id(&successor.file).unwrap()),
            "the successor is back under its name"
        );
        let leftovers: Vec<String> = sys::shm_list(&format!("{NAME_PREFIX}{name}."))
            .unwrap()
            .into_iter()
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        drop(first); // its name now belongs to the successor: must not unlink it
        assert!(Segment::open(&name).is_ok());
        drop(successor);
        assert!(Segment::open(&name).is_err());
    }
}
