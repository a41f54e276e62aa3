//! The result channel: what a child sends its parent over their socketpair, and the code
//! every child (forked or spawned) runs around the user's function.
//!
//! ```text
//! frame := tag:u8  len:u32 (little endian)  payload:[u8; len]
//! tag 1 STARTED    len 0          spawned child: handshake passed, function about to run
//! tag 2 VALUE      postcard(R)    the function returned
//! tag 3 PANIC      postcard((String, Option<String>))  message, location
//! tag 4 BOOTSTRAP  utf-8 text     the child could not start its function
//! tag 5 ENCODE     utf-8 text     the return value could not be encoded
//! ```
//!
//! The child writes at most one STARTED frame and then one final frame, then `_exit`s.
//! A child that dies mid-frame leaves a truncated frame; the parent never waits for the
//! rest (it waits for the *process* to end, then reads what is there), so a truncated
//! frame is reported through the exit status, never as a hang. The parent treats the
//! bytes as untrusted: an unknown tag or a length past the end is `Decode`, never a panic.

use std::cell::RefCell;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use serde::Serialize;

use crate::sys;

pub(crate) const STARTED: u8 = 1;
pub(crate) const VALUE: u8 = 2;
pub(crate) const PANIC: u8 = 3;
pub(crate) const BOOTSTRAP: u8 = 4;
pub(crate) const ENCODE: u8 = 5;

/// Exit code of a child whose function panicked (as Rust's own test harness uses).
pub(crate) const PANIC_EXIT: i32 = 101;
/// Exit code of a spawned child that failed its bootstrap.
pub(crate) const BOOTSTRAP_EXIT: i32 = 87;

pub(crate) fn frame(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + payload.len());
    v.push(tag);
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// What the parent found in the bytes a child sent.
#[derive(Debug, Default)]
pub(crate) struct Received<'a> {
    pub(crate) started: bool,
    /// The final frame, if it arrived whole.
    pub(crate) last: Option<(u8, &'a [u8])>,
    /// Bytes that do not form frames (unknown tag, or an oversized length).
    pub(crate) malformed: Option<String>,
}

pub(crate) fn parse(mut buf: &[u8]) -> Received<'_> {
    let mut r = Received::default();
    while buf.len() >= 5 {
        let tag = buf[0];
        let len = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if !(STARTED..=ENCODE).contains(&tag) {
            r.malformed = Some(format!("unknown frame tag {tag}"));
            return r;
        }
        let Some(payload) = buf.get(5..5usize.saturating_add(len)) else {
            return r; // truncated: the child died mid-write, or more is coming
        };
        if tag == STARTED {
            r.started = true;
        } else {
            r.last = Some((tag, payload));
        }
        buf = &buf[5 + len..];
    }
    r
}

thread_local! {
    static LAST_PANIC: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
}

/// Records each panic's message and location (then prints it as usual), so the child can
/// send them to its parent. Installed once per child process.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = payload_text(info.payload());
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            let _ = LAST_PANIC.try_with(|p| {
                if let Ok(mut p) = p.try_borrow_mut() {
                    *p = Some((message, location));
                }
            });
            previous(info);
        }));
    });
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_owned()
    }
}

/// Runs `f`, returning its panic (if any) as the message and location the hook recorded,
/// as [`run_child`] reports them. For pool workers, which run many tasks per process.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, (String, Option<String>)> {
    install_panic_hook();
    let _ = LAST_PANIC.try_with(|p| p.borrow_mut().take());
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Ok(v),
        Err(payload) => {
            let recorded = LAST_PANIC.with(|p| p.borrow_mut().take());
            let caught = recorded.unwrap_or_else(|| (payload_text(&*payload), None));
            // The payload's destructor is user code that could panic again: never run it.
            std::mem::forget(payload);
            Err(caught)
        }
    }
}

/// Sends a frame, ignoring failure (the parent may be gone; there is nobody to tell).
pub(crate) fn send_frame(sock: &OwnedFd, tag: u8, payload: &[u8]) {
    let _ = sys::send_all(sock.as_fd(), &frame(tag, payload));
}

/// Reports a bootstrap failure to the parent and ends the child.
pub(crate) fn bootstrap_failed(sock: &OwnedFd, why: &str) -> ! {
    send_frame(sock, BOOTSTRAP, why.as_bytes());
    sys::exit_immediately(BOOTSTRAP_EXIT)
}

/// The child side of every start method: runs `body`, sends its value (or its panic) to
/// the parent, and leaves with `_exit`, never unwinding into the parent's code.
pub(crate) fn run_child<R: Serialize>(sock: OwnedFd, body: impl FnOnce() -> R) -> ! {
    install_panic_hook();
    // The value is encoded (and dropped) inside the catch too: a user's `Serialize` or
    // `Drop` that panics is reported as the function's panic, and never unwinds out of
    // here (into the code that forked us, under `Fork`).
    let run = || {
        let value = body();
        postcard::to_allocvec(&value)
    };
    let (tag, payload, code) = match catch_unwind(AssertUnwindSafe(run)) {
        Ok(encoded) => match encoded {
            Ok(bytes) => (VALUE, bytes, 0),
            Err(e) => (
                ENCODE,
                format!(
                    "the child could not encode its return value of type {} with postcard \
                     ({e}); return a type whose Serialize impl postcard supports (no \
                     serialize_any, no maps with unknown length)",
                    std::any::type_name::<R>()
                )
                .into_bytes(),
                1,
            ),
        },
        Err(payload) => {
            let recorded = LAST_PANIC.with(|p| p.borrow_mut().take());
            let (message, location) = recorded.unwrap_or_else(|| (payload_text(&*payload), None));
            // The payload's destructor is user code that could panic again: never run it.
            std::mem::forget(payload);
            let bytes = postcard::to_allocvec(&(message, location)).unwrap_or_default();
            (PANIC, bytes, PANIC_EXIT)
        }
    };
    send_frame(&sock, tag, &payload);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    sys::exit_immediately(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_frames_and_truncation() {
        let mut buf = frame(STARTED, &[]);
        buf.extend(frame(VALUE, b"abc"));
        let r = parse(&buf);
        assert!(r.started);
        assert_eq!(r.last, Some((VALUE, &b"abc"[..])));
        let r = parse(&buf[..buf.len() - 1]);
        assert!(r.started && r.last.is_none() && r.malformed.is_none());
        let r = parse(&[9, 0, 0, 0, 0]);
        assert!(r.malformed.is_some());
        let r = parse(&[VALUE, 0xff, 0xff, 0xff, 0xff, 1]);
        assert!(r.last.is_none() && r.malformed.is_none());
    }
}
