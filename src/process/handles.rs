//! Handles inside a `Process` argument: their descriptors travel beside the bytes.
//!
//! A [`Segment`], [`Shared<T>`], [`Value<T>`], [`Array<T>`] or [`Connection`] owns a
//! file descriptor; its bytes in a postcard message are only an index. While
//! `Process::spawn` encodes an argument for a Spawn or ForkServer child, each such handle
//! puts a duplicate of its descriptor into the *outgoing* set and writes the index; the
//! set is carried out of band (inherited across exec for Spawn, `SCM_RIGHTS` to the fork
//! server for ForkServer), and the child decodes its argument with the received
//! descriptors as the *incoming* set: each handle takes its descriptor by index and maps
//! it again (a segment's header is checked as by `Segment::from_fd`, and the size must fit
//! the type). Under `Fork` the argument is moved, not encoded: handles work as they are.
//!
//! Serializing a handle anywhere else (into a file, over a `Queue`) is an error, never a
//! dangling descriptor number. Queue, channel and ByteQueue handles do not cross Spawn or
//! ForkServer yet (they need peer registration in the child); under Fork they work.

use std::cell::RefCell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::de::{self, Deserialize, Deserializer};
use serde::ser::{self, Serialize, Serializer};

use crate::pipe::Connection;
use crate::shm::{Segment, Shared, ShmSafe};
use crate::sync::{Array, Value};

thread_local! {
    /// The text of the last handle failure: serde formats like postcard keep only a
    /// generic "custom error", so `Process::spawn` reports this instead.
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
    static OUTGOING: RefCell<Option<Vec<OwnedFd>>> = const { RefCell::new(None) };
    static INCOMING: RefCell<Option<Vec<Option<OwnedFd>>>> = const { RefCell::new(None) };
}

/// The last handle (de)serialization failure on this thread, if any.
pub(crate) fn take_last_error() -> Option<String> {
    LAST_ERROR.with(|e| e.borrow_mut().take())
}

fn failed(why: String) -> String {
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(why.clone()));
    why
}

/// Runs `f` (an encoder) with an outgoing descriptor set, and returns it.
pub(crate) fn collecting<T>(f: impl FnOnce() -> T) -> (T, Vec<OwnedFd>) {
    let previous = OUTGOING.with(|o| o.borrow_mut().replace(Vec::new()));
    let out = f();
    let fds = OUTGOING.with(|o| std::mem::replace(&mut *o.borrow_mut(), previous));
    (out, fds.unwrap_or_default())
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

fn export<S: Serializer>(what: &str, fd: BorrowedFd<'_>, s: S) -> Result<S::Ok, S::Error> {
    let index = OUTGOING.with(|o| -> Result<u32, String> {
        let mut o = o.borrow_mut();
        let Some(set) = o.as_mut() else {
            return Err(format!(
                "a {what} can only be serialized as (part of) the argument of \
                 Process::spawn, which carries its descriptor beside the bytes; to share it \
                 any other way, create it by name and open it by name"
            ));
        };
        let dup = fd
            .try_clone_to_owned()
            .map_err(|e| format!("duplicating the descriptor of a {what} failed: {e}"))?;
        set.push(dup);
        Ok(set.len() as u32 - 1)
    });
    index
        .map_err(|why| ser::Error::custom(failed(why)))?
        .serialize(s)
}

fn import<'de, D: Deserializer<'de>>(what: &str, d: D) -> Result<OwnedFd, D::Error> {
    let index = u32::deserialize(d)?;
    INCOMING
        .with(|i| -> Result<OwnedFd, String> {
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
        .map_err(|why| de::Error::custom(failed(why)))
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
        let (bytes, fds) = collecting(|| postcard::to_allocvec(&(1u8, &v, &v)).unwrap());
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
}
