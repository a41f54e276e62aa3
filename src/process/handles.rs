//! Handles inside a `Process` argument: their descriptors travel beside the bytes.
//!
//! A [`Segment`], [`Shared<T>`] (a value or a slice `Shared<[T]>`), [`Value<T>`],
//! [`Array<T>`], [`Connection`], and every queue handle ([`Queue<T>`], [`QueueSender<T>`],
//! [`QueueReceiver<T>`], [`ByteQueue`], [`channel`](crate::channel) and
//! [`spsc`](crate::spsc) ends) owns a file descriptor; its bytes in a postcard message
//! are only an index (and, for a queue, its loan and settings). While `Process::spawn`
//! encodes an argument for a Spawn or ForkServer child, each such handle puts a duplicate
//! of its descriptor into the *outgoing* set and writes the index; the set is carried out
//! of band (inherited across exec for Spawn, `SCM_RIGHTS` to the fork server for
//! ForkServer), and the child decodes its argument with the received descriptors as the
//! *incoming* set: each handle takes its descriptor by index and maps it again (a
//! segment's header is checked as by `Segment::from_fd`; a queue's or a slice's header
//! must also name the same type, as a typed open by name checks, and the size must fit
//! it). Under `Fork` the argument is moved, not encoded: handles work as they are.
//!
//! Serializing a handle anywhere else (into a file, over a `Queue`) is an error, never a
//! dangling descriptor number.
//!
//! # Queue handles and peer counting
//!
//! A queue end tells "every sender is gone" from the peer tables (`queue::peers`), which
//! count the handles each process holds. A handle in a spawn argument must be counted
//! from the moment the parent may drop its own (right after `spawn` returns) until the
//! child has registered, and must stop counting if the child dies first. So:
//!
//! 1. *Encode* (parent P): each queue handle lends one handle on its end's table to the
//!    child: a slot `[lent by P]` (one per table and argument, counting every handle of
//!    that end in it) is claimed and counted before the bytes are written. The message
//!    carries the slot and P's identity.
//! 2. *Start*: the fork inside `Command::spawn` (Spawn) or the one that starts the fork
//!    server only execs, so it is lent nothing (`peers::forking_to_exec`): the exec'd
//!    image holds no handle until it decodes its argument.
//! 3. *Bind* (P, once the child's pid is known): the loan becomes `[bound to C]`, C named
//!    by pid and start time, so a scan reclaims it once C is proven dead (killed during
//!    bootstrap, a failed handshake, a decode error). A fork-server child is the
//!    server's, which may already have reaped it: its pidfd (opened by the server before
//!    it could) says so, and then the loans it did not take are cancelled instead. Since
//!    `[lent by P]` does not tell two loans of P apart, P binds or cancels a loan only if
//!    its slot was not claimed again for a newer spawn loan meanwhile (a process-local
//!    list, `peers::SPAWN_LOANS`): a child that imports and dies at once, its slot
//!    reclaimed and reused by another thread's spawn, cannot get that loan bound to it.
//!    (A fork loan of `Process::fork_unchecked` in another thread reusing the slot is not
//!    covered: it would be bound to the dead child and reclaimed, and that fork child
//!    counted afresh when it runs its fork handler; an instant without the count.)
//! 4. *Import* (C, decoding): maps the segment, then takes the loan over (owner `C`) and
//!    registers the handle in its process-local registry, as `attach` would have.
//! 5. A spawn that fails after encoding (exec refused, the fork server gone twice, an
//!    unencodable field, a panicking `Serialize`) cancels its loans.
//!
//! | killed / failed | state left | repaired by |
//! |---|---|---|
//! | P, between claiming the slot and counting | `[lent by P]`, 0 handles | scan: lender dead, nothing lent → free |
//! | P, after lending, before binding | `[lent by P]`, n handles | **kept forever** (a child may live and cannot be named): conservative |
//! | C, before importing (bootstrap, handshake, decode) | `[bound to C]`, n | scan: C dead → reclaim |
//! | fork-server C, dead before P binds | `[lent by P]`, n | P: C's pidfd says it ended → cancel |
//! | C, after importing | `C`, n | scan: C dead → reclaim |
//! | the fork server dies after forking C, P retries with a new server | C took the loan, or the new child finds it gone | the new child counts itself afresh (an instant without the count: mitigated, not closed) |
//! | no pidfd and the fork-server child reaped before P reads its start time | bound to whatever process has the pid now, or left `[lent by P]` | over-count while that process lives, or for good: conservative |
//!
//! **An spsc end has one user**, so encoding it into a spawn argument hands it over:
//! `Serialize` takes `&self`, so the parent's handle stays, but it gives up its ownership
//! of the end and panics on any later use, saying the end belongs to the spawned child
//! (dropping it is fine, and `spawn` drops the argument anyway). The child owns the end
//! from its first use. A failed encoding (outside a spawn argument) hands nothing over.
//! Encoding a handed-over end again (the same end twice in one argument, e.g. through an
//! `Rc` serialized twice, or in a later argument) is an error, so a child can never
//! decode two users of one end.
//! If the spawn fails after the end was encoded, that handle is gone with the argument:
//! get a new one from the other end (`Receiver::new_sender`, `Sender::new_receiver`).

use std::any::Any;
use std::cell::RefCell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};
use serde::ser::{self, Serialize, Serializer};

use crate::pipe::Connection;
use crate::queue::bytes::Role;
use crate::queue::peers::{self, PeerTable, SpawnLoan};
use crate::queue::{ByteQueue, Queue, QueueReceiver, QueueSender, mpmc, spsc};
use crate::shm::{Segment, Shared, ShmSafe};
use crate::sync::{Array, Value};
use crate::sys;

thread_local! {
    /// The text of the last handle failure: serde formats like postcard keep only a
    /// generic "custom error", so `Process::spawn` reports this instead.
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
    static OUTGOING: RefCell<Option<Vec<OwnedFd>>> = const { RefCell::new(None) };
    static INCOMING: RefCell<Option<Vec<Option<OwnedFd>>>> = const { RefCell::new(None) };
    /// The loans the argument being encoded made (only while `OUTGOING` is set).
    static LOANS: RefCell<Vec<PendingLoan>> = const { RefCell::new(Vec::new()) };
}

/// The last handle (de)serialization failure on this thread, if any.
pub(crate) fn take_last_error() -> Option<String> {
    LAST_ERROR.with(|e| e.borrow_mut().take())
}

fn failed(why: String) -> String {
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(why.clone()));
    why
}

/// A loan of queue handles made while encoding an argument, not yet bound to its child.
struct PendingLoan {
    /// The peer table's address, kept mapped by `_keep`.
    table: usize,
    loan: SpawnLoan,
    _keep: Arc<dyn Any + Send + Sync>,
}

impl PendingLoan {
    fn table(&self) -> &PeerTable {
        // SAFETY: `table` is the address of a peer table inside the mapping `_keep` holds
        // alive for as long as `self` exists; its words are only accessed atomically.
        unsafe { &*(self.table as *const PeerTable) }
    }
}

/// The peer-table loans an encoded argument made for its child (see the module docs):
/// [`bind`](Loans::bind) them once the child's pid is known. Dropped unbound (the spawn
/// failed), they are cancelled.
#[must_use = "unbound loans are cancelled when dropped"]
pub(crate) struct Loans(Vec<PendingLoan>);

impl Loans {
    /// Binds the loans to the child `pid`, so they are reclaimed once it is proven dead.
    /// `pidfd`: for a child that is not ours (a fork-server child, which its server may
    /// have reaped already), a pidfd the server opened before it could: if it says the
    /// child ended, the loans it did not take over are cancelled instead, since the
    /// identity read for `pid` may be a newer process's.
    pub(crate) fn bind(mut self, pid: u32, pidfd: Option<BorrowedFd<'_>>) {
        let loans = std::mem::take(&mut self.0);
        if loans.is_empty() {
            return;
        }
        // First the identity, then the proof it was the child's: alive after the read.
        let child = peers::identity_of(pid);
        let ended =
            pidfd.is_some_and(|fd| sys::poll_readable(fd, Some(Duration::ZERO)).unwrap_or(false));
        for l in &loans {
            match child {
                _ if ended => peers::cancel_spawn_loan(l.table(), l.loan),
                Some(child) => peers::bind_spawn_loan(l.table(), l.loan, child),
                // Cannot name the child (no /proc?): the loan stays counted for as long
                // as it exists (conservative).
                None => peers::abandon_spawn_loan(l.table(), l.loan),
            }
        }
    }
}

impl Drop for Loans {
    fn drop(&mut self) {
        for l in self.0.drain(..) {
            peers::cancel_spawn_loan(l.table(), l.loan);
        }
    }
}

/// Runs `f` (an encoder) with an outgoing descriptor set, and returns it with the loans
/// the queue handles inside made. If `f` unwinds (a user's `Serialize` impl panicked),
/// the loans made so far are cancelled.
pub(crate) fn collecting<T>(f: impl FnOnce() -> T) -> (T, Vec<OwnedFd>, Loans) {
    /// Puts back the caller's sets (nested encodes) and cancels what is left of ours.
    struct Restore {
        fds: Option<Vec<OwnedFd>>,
        loans: Vec<PendingLoan>,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.fds.take();
            drop(OUTGOING.with(|o| std::mem::replace(&mut *o.borrow_mut(), previous)));
            let previous = std::mem::take(&mut self.loans);
            drop(Loans(
                LOANS.with(|l| std::mem::replace(&mut *l.borrow_mut(), previous)),
            ));
        }
    }
    let restore = Restore {
        fds: OUTGOING.with(|o| o.borrow_mut().replace(Vec::new())),
        loans: LOANS.with(|l| std::mem::take(&mut *l.borrow_mut())),
    };
    let out = f();
    let fds = OUTGOING.with(|o| o.borrow_mut().take()).unwrap_or_default();
    let loans = Loans(LOANS.with(|l| std::mem::take(&mut *l.borrow_mut())));
    drop(restore);
    (out, fds, loans)
}

/// Runs `f` (a decoder) with `fds` as the incoming descriptor set. Descriptors no handle
/// took are closed afterwards.
pub(crate) fn providing<T>(fds: Vec<OwnedFd>, f: impl FnOnce() -> T) -> T {
    let set = fds.into_iter().map(Some).collect();
    let previous = INCOMING.with(|i| i.borrow_mut().replace(set));
    let out = f();
    INCOMING.with(|i| *i.borrow_mut() = previous);
    out
}

/// Puts a duplicate of `fd` into the outgoing set; its index.
fn push_fd(what: &str, fd: BorrowedFd<'_>) -> Result<u32, String> {
    OUTGOING.with(|o| {
        let mut o = o.borrow_mut();
        let Some(set) = o.as_mut() else {
            return Err(format!(
                "a {what} can only be serialized as (part of) the argument of \
                 Process::spawn, which carries its descriptor beside the bytes; to share it \
                 any other way, create it by name and open it by name (a queue: give it to \
                 each process in its spawn argument, or fork)"
            ));
        };
        let dup = fd
            .try_clone_to_owned()
            .map_err(|e| format!("duplicating the descriptor of a {what} failed: {e}"))?;
        set.push(dup);
        Ok(set.len() as u32 - 1)
    })
}

fn export<S: Serializer>(what: &str, fd: BorrowedFd<'_>, s: S) -> Result<S::Ok, S::Error> {
    push_fd(what, fd)
        .map_err(|why| ser::Error::custom(failed(why)))?
        .serialize(s)
}

/// Takes descriptor `index` out of the incoming set.
fn take_fd(what: &str, index: u32) -> Result<OwnedFd, String> {
    INCOMING.with(|i| {
        let mut i = i.borrow_mut();
        let Some(set) = i.as_mut() else {
            return Err(format!(
                "a {what} can only be deserialized from the argument of a child started by \
                 Process::spawn (its descriptor travels beside the bytes)"
            ));
        };
        set.get_mut(index as usize)
            .and_then(Option::take)
            .ok_or_else(|| {
                format!("the descriptor of a {what} (index {index}) is missing or used twice")
            })
    })
}

fn import<'de, D: Deserializer<'de>>(what: &str, d: D) -> Result<OwnedFd, D::Error> {
    let index = u32::deserialize(d)?;
    take_fd(what, index).map_err(|why| de::Error::custom(failed(why)))
}

fn io_error<E: de::Error>(what: &str, e: crate::Error) -> E {
    E::custom(failed(format!(
        "could not map the {what} received by the child: {e}"
    )))
}

impl Serialize for Segment {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export("Segment", self.as_fd(), s)
    }
}

impl<'de> Deserialize<'de> for Segment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Segment, D::Error> {
        let fd = import("Segment", d)?;
        Segment::from_fd(fd).map_err(|e| io_error("Segment", e))
    }
}

impl<T: ShmSafe> Serialize for Shared<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export("Shared<T>", self.segment().as_fd(), s)
    }
}

impl<'de, T: ShmSafe> Deserialize<'de> for Shared<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Shared<T>, D::Error> {
        let fd = import("Shared<T>", d)?;
        let segment = Segment::from_fd(fd).map_err(|e| io_error("Shared<T>", e))?;
        Shared::adopt(segment).map_err(|e| io_error("Shared<T>", e))
    }
}

impl<T: ShmSafe + Send> Serialize for Value<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export("Value<T>", self.segment().as_fd(), s)
    }
}

impl<'de, T: ShmSafe + Send> Deserialize<'de> for Value<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value<T>, D::Error> {
        let fd = import("Value<T>", d)?;
        let segment = Segment::from_fd(fd).map_err(|e| io_error("Value<T>", e))?;
        Value::adopt(segment).map_err(|e| io_error("Value<T>", e))
    }
}

impl<T: ShmSafe + Send> Serialize for Array<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export("Array<T>", self.segment().as_fd(), s)
    }
}

impl<'de, T: ShmSafe + Send> Deserialize<'de> for Array<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Array<T>, D::Error> {
        let fd = import("Array<T>", d)?;
        let segment = Segment::from_fd(fd).map_err(|e| io_error("Array<T>", e))?;
        Array::adopt(segment, "<descriptor>").map_err(|e| io_error("Array<T>", e))
    }
}

impl Serialize for Connection {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export("Connection", self.as_fd(), s)
    }
}

impl<'de> Deserialize<'de> for Connection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Connection, D::Error> {
        import("Connection", d).map(Connection::new)
    }
}

impl<T: ShmSafe> Serialize for Shared<[T]> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export("Shared<[T]>", self.segment().as_fd(), s)
    }
}

impl<'de, T: ShmSafe> Deserialize<'de> for Shared<[T]> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Shared<[T]>, D::Error> {
        let fd = import("Shared<[T]>", d)?;
        Shared::adopt_slice(fd).map_err(|e| io_error("Shared<[T]>", e))
    }
}

// ---- Queue handles ---------------------------------------------------------------------

/// What a queue handle's bytes in the argument say: its segment's descriptor index, and
/// the loan its parent made for it.
#[derive(serde::Serialize, serde::Deserialize)]
struct QueueWire {
    fd: u32,
    slot: u32,
    lender: u64,
}

/// Encodes a queue handle: its segment's descriptor goes into the outgoing set, and one
/// handle is lent to the child on the handle's peer table (one loan per table and
/// argument, counting every handle of that end inside it), then `extra` (settings the
/// child needs).
fn export_queue<S: Serializer>(
    what: &str,
    exported: Option<crate::queue::ring::Exported<'_>>,
    extra: impl Serialize,
    s: S,
) -> Result<S::Ok, S::Error> {
    let wire = (|| {
        let Some(e) = exported else {
            return Err(format!(
                "a {what} on a heap ring (a test-only queue) has no descriptor to send"
            ));
        };
        let fd = push_fd(what, e.segment.as_fd())?;
        let table = e.table as *const PeerTable as usize;
        let loan = LOANS.with(|l| -> Result<SpawnLoan, String> {
            let mut l = l.borrow_mut();
            if let Some(p) = l.iter().find(|p| p.table == table) {
                peers::lend_one_more(e.table, p.loan);
                return Ok(p.loan);
            }
            let loan = peers::lend_to_spawn(e.table)
                .map_err(|err| format!("lending a {what} to the spawned child: {err}"))?;
            l.push(PendingLoan {
                table,
                loan,
                _keep: Arc::clone(&e.keep),
            });
            Ok(loan)
        })?;
        Ok(QueueWire {
            fd,
            slot: loan.slot as u32,
            lender: loan.lender,
        })
    })()
    .map_err(|why| ser::Error::custom(failed(why)))?;
    (wire, extra).serialize(s)
}

/// Decodes a queue handle's descriptor, its loan and `X`.
fn import_queue<'de, D: Deserializer<'de>, X: Deserialize<'de>>(
    what: &str,
    d: D,
) -> Result<(OwnedFd, SpawnLoan, X), D::Error> {
    let (wire, extra) = <(QueueWire, X)>::deserialize(d)?;
    let fd = take_fd(what, wire.fd).map_err(|why| de::Error::custom(failed(why)))?;
    let loan = SpawnLoan {
        slot: wire.slot as usize,
        lender: wire.lender,
        ticket: 0,
    };
    Ok((fd, loan, extra))
}

fn role_code(role: Role) -> u8 {
    match role {
        Role::Both => 0,
        Role::Send => 1,
        Role::Recv => 2,
    }
}

fn export_bytes<S: Serializer>(what: &str, q: &ByteQueue, s: S) -> Result<S::Ok, S::Error> {
    match q.exported() {
        Some((e, role, max)) => export_queue(what, Some(e), (role_code(role), max as u64), s),
        None => export_queue(what, None, (), s),
    }
}

fn import_bytes<'de, D: Deserializer<'de>>(
    what: &str,
    role: Role,
    d: D,
) -> Result<ByteQueue, D::Error> {
    let (fd, loan, (code, max)) = import_queue::<D, (u8, u64)>(what, d)?;
    if code != role_code(role) {
        return Err(de::Error::custom(failed(format!(
            "the bytes of a {what} name another kind of queue handle (role {code}): the \
             argument was encoded as another type"
        ))));
    }
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    ByteQueue::adopt(fd, role, max, |t| peers::take_spawn_loan(t, loan))
        .map_err(|e| io_error(what, e))
}

impl Serialize for ByteQueue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export_bytes("ByteQueue", self, s)
    }
}

impl<'de> Deserialize<'de> for ByteQueue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteQueue, D::Error> {
        import_bytes("ByteQueue", Role::Both, d)
    }
}

impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export_bytes("Queue<T>", self.bytes(), s)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Queue<T>, D::Error> {
        import_bytes("Queue<T>", Role::Both, d).map(Queue::wrap)
    }
}

impl<T> Serialize for QueueSender<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export_bytes("QueueSender<T>", self.bytes(), s)
    }
}

impl<'de, T> Deserialize<'de> for QueueSender<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<QueueSender<T>, D::Error> {
        import_bytes("QueueSender<T>", Role::Send, d).map(QueueSender::wrap)
    }
}

impl<T> Serialize for QueueReceiver<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export_bytes("QueueReceiver<T>", self.bytes(), s)
    }
}

impl<'de, T> Deserialize<'de> for QueueReceiver<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<QueueReceiver<T>, D::Error> {
        import_bytes("QueueReceiver<T>", Role::Recv, d).map(QueueReceiver::wrap)
    }
}

impl<T: ShmSafe + Copy + Send> Serialize for mpmc::Sender<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export_queue("channel::Sender<T>", self.exported(), (), s)
    }
}

impl<'de, T: ShmSafe + Copy + Send> Deserialize<'de> for mpmc::Sender<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<mpmc::Sender<T>, D::Error> {
        let what = "channel::Sender<T>";
        let (fd, loan, ()) = import_queue(what, d)?;
        mpmc::Sender::adopt(fd, |t| peers::take_spawn_loan(t, loan)).map_err(|e| io_error(what, e))
    }
}

impl<T: ShmSafe + Copy + Send> Serialize for mpmc::Receiver<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        export_queue("channel::Receiver<T>", self.exported(), (), s)
    }
}

impl<'de, T: ShmSafe + Copy + Send> Deserialize<'de> for mpmc::Receiver<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<mpmc::Receiver<T>, D::Error> {
        let what = "channel::Receiver<T>";
        let (fd, loan, ()) = import_queue(what, d)?;
        mpmc::Receiver::adopt(fd, |t| peers::take_spawn_loan(t, loan))
            .map_err(|e| io_error(what, e))
    }
}

/// Why an spsc end that was already handed over cannot be encoded again.
fn handed_twice(what: &str) -> String {
    format!(
        "this {what} was already handed to a spawned child (it was encoded twice, in this \
         argument or an earlier one), and an spsc end has one user: put it in the argument \
         once, or share a `procshare::channel` end instead"
    )
}

/// An spsc end is used by one process: encoding it for a spawned child hands it over
/// (the parent's handle panics on any later use; see the module docs). Only once the
/// encoding succeeded, so a failed attempt (outside a spawn argument) leaves it usable.
impl<T: ShmSafe + Copy + Send> Serialize for spsc::Sender<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.handed_over() {
            return Err(ser::Error::custom(failed(handed_twice("spsc::Sender<T>"))));
        }
        let ok = export_queue("spsc::Sender<T>", self.exported(), (), s)?;
        self.hand_over();
        Ok(ok)
    }
}

impl<'de, T: ShmSafe + Copy + Send> Deserialize<'de> for spsc::Sender<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<spsc::Sender<T>, D::Error> {
        let what = "spsc::Sender<T>";
        let (fd, loan, ()) = import_queue(what, d)?;
        spsc::Sender::adopt(fd, |t| peers::take_spawn_loan(t, loan)).map_err(|e| io_error(what, e))
    }
}

/// As for [`spsc::Sender`].
impl<T: ShmSafe + Copy + Send> Serialize for spsc::Receiver<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.handed_over() {
            return Err(ser::Error::custom(failed(handed_twice(
                "spsc::Receiver<T>",
            ))));
        }
        let ok = export_queue("spsc::Receiver<T>", self.exported(), (), s)?;
        self.hand_over();
        Ok(ok)
    }
}

impl<'de, T: ShmSafe + Copy + Send> Deserialize<'de> for spsc::Receiver<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<spsc::Receiver<T>, D::Error> {
        let what = "spsc::Receiver<T>";
        let (fd, loan, ()) = import_queue(what, d)?;
        spsc::Receiver::adopt(fd, |t| peers::take_spawn_loan(t, loan))
            .map_err(|e| io_error(what, e))
    }
}

#[cfg(all(test, not(miri)))]
mod tests {
    use super::*;

    #[test]
    fn handles_travel_only_inside_a_process_argument() {
        let v = Value::new(5u32).unwrap();
        assert!(postcard::to_allocvec(&v).is_err());
        let why = take_last_error().unwrap();
        assert!(
            why.contains("only be serialized as (part of) the argument"),
            "{why}"
        );
        let (bytes, fds, _loans) = collecting(|| postcard::to_allocvec(&(1u8, &v, &v)).unwrap());
        assert_eq!(fds.len(), 2);
        let (one, a, b): (u8, Value<u32>, Value<u32>) =
            providing(fds, || postcard::from_bytes(&bytes).unwrap());
        assert_eq!(one, 1);
        a.set(7);
        assert_eq!((v.get(), b.get()), (7, 7));
        // Outside a child's argument, and with an index that was never sent.
        assert!(postcard::from_bytes::<Value<u32>>(&bytes[1..]).is_err());
        assert!(take_last_error().unwrap().contains("only be deserialized"));
        assert!(providing(vec![], || postcard::from_bytes::<Value<u32>>(&[
            3
        ])
        .is_err()));
        assert!(take_last_error().unwrap().contains("missing or used twice"));
    }

    #[test]
    fn queue_handles_travel_only_inside_a_process_argument() {
        let q: Queue<u32> = Queue::new().unwrap();
        let (tx, rx) = crate::channel::<u8>(4).unwrap();
        assert!(postcard::to_allocvec(&q).is_err());
        let why = take_last_error().unwrap();
        assert!(
            why.contains("a Queue<T> can only be serialized as"),
            "{why}"
        );
        assert!(postcard::to_allocvec(&rx).is_err());
        assert!(take_last_error().unwrap().contains("channel::Receiver<T>"));
        // Nothing was lent by the failed attempts: the last sender's drop disconnects.
        drop(tx);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(crate::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn an_encoded_queue_end_counts_until_its_loan_is_taken_or_cancelled() {
        use crate::RecvTimeoutError::{Disconnected, Timeout};
        let (tx, rx) = crate::channel::<u8>(4).unwrap();
        let (bytes, fds, loans) = collecting(|| postcard::to_allocvec(&tx).unwrap());
        drop(tx);
        // Only the loan counts the sender now: the receiver waits, it is not disconnected.
        assert_eq!(rx.recv_timeout(Duration::from_millis(60)), Err(Timeout));
        drop(loans); // as a failed spawn does
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Err(Disconnected));
        drop((bytes, fds));

        // Decoded (here, in this same process, as a child would), the loan is taken over.
        let (tx, rx) = crate::channel::<u8>(4).unwrap();
        let (bytes, fds, loans) = collecting(|| postcard::to_allocvec(&(&tx, &tx)).unwrap());
        drop(tx);
        let (a, b): (mpmc::Sender<u8>, mpmc::Sender<u8>) =
            providing(fds, || postcard::from_bytes(&bytes).unwrap());
        drop(loans); // taken over: cancelling changes nothing
        a.send(1).unwrap();
        drop(a);
        b.send(2).unwrap();
        assert_eq!((rx.recv(), rx.recv()), (Ok(1), Ok(2)));
        assert_eq!(rx.recv_timeout(Duration::from_millis(60)), Err(Timeout));
        drop(b);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Err(Disconnected));
    }

    #[test]
    fn a_panicking_serialize_cancels_the_loans_made_before_it() {
        struct Boom;
        impl Serialize for Boom {
            fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                panic!("a user's Serialize impl fails")
            }
        }
        let (tx, rx) = crate::channel::<u8>(4).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            collecting(|| postcard::to_allocvec(&(&tx, Boom)))
        }));
        assert!(r.is_err());
        drop(tx);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(crate::RecvTimeoutError::Disconnected)
        );
        // And the thread's encoder state is back to "not in a spawn argument".
        assert!(postcard::to_allocvec(&rx).is_err());
    }

    #[test]
    fn an_spsc_end_encoded_for_a_child_is_handed_over() {
        let (tx, rx) = crate::spsc::<u8>(4).unwrap();
        tx.send(1).unwrap();
        // A failed encoding hands nothing over.
        assert!(postcard::to_allocvec(&tx).is_err());
        tx.send(2).unwrap();
        let (bytes, fds, loans) = collecting(|| postcard::to_allocvec(&tx).unwrap());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tx.send(3)));
        let why = r.unwrap_err();
        let why = why.downcast_ref::<String>().unwrap();
        assert!(why.contains("was handed to a spawned child"), "{why}");
        drop(tx); // dropping the handed-over handle is fine
        // The "child" (this process again) owns the end from its first use.
        let child: spsc::Sender<u8> = providing(fds, || postcard::from_bytes(&bytes).unwrap());
        drop(loans);
        child.send(4).unwrap();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1, 2, 4]);
        drop(child);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(crate::RecvTimeoutError::Disconnected)
        );
    }
}
