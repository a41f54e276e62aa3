//! The header at the start of every segment, and its parser.
//!
//! The header is read from memory another process controls, so parsing works on a private
//! copy of its bytes and checks every field before anything is derived from it. The parser
//! is a pure function of those bytes so the fuzzer can drive it directly.
//!
//! # Layout (format 2, native endian)
//!
//! ```text
//!   0 magic "PROCSHR\0"     8 format u32        12 state u32 (atomic)
//!  16 total_len u64         24 data_offset u64  32 data_len u64
//!  40 fingerprint u64       48 elements u64     56 creator pid u32   60 flags u32 (atomic)
//!  64 creator start u64     72 data_align u64   80 creator pid namespace u64
//!  88 type description, NUL-padded, to 256
//! ```
//!
//! # Shared words and what a crash leaves
//!
//! Everything but `state` and `flags` is written once by the creator before `state` turns
//! ready (Release), and never again.
//!
//! | word  | states | a creator killed ... | leaves | repaired by |
//! |-------|--------|----------------------|--------|-------------|
//! | state | 0 initialising → 1 ready | before the header is written (object sized, all zero) | no magic | `open` fails `NotReady` after its timeout; `list` shows "not a procshare header"; remove by name |
//! | state | | after the header, before `ready` | magic, state 0 | `open` fails `NotReady`; the creator is proven dead, so `remove_stale` removes it (unless persisted) |
//! | state | | after `ready` | a normal segment | a named one is stale once its creator is proven dead |
//! | flags | bit 0 persistent, set once by `persist` | around the `fetch_or` | either value | a single atomic RMW: nothing torn |

use std::fmt;

/// `b"PROCSHR\0"`: what every procshare segment starts with.
pub(crate) const MAGIC: [u8; 8] = *b"PROCSHR\0";
/// Bumped whenever the header or any shared layout changes incompatibly.
///
/// 2: the header records the data's alignment (mappings are placed so the data is aligned
/// in every process, even above a page) and the creator's pid namespace.
/// 3: a `ByteQueue`'s message count is split into `sent` and `taken` (a receive no longer
/// does a read-modify-write on the producers' line), so an older build must not share one.
pub(crate) const ABI_VERSION: u32 = 3;
/// Bytes reserved for the header; data starts at a multiple of this (or of the data's
/// alignment, if larger).
pub(crate) const HEADER_LEN: usize = 256;

pub(crate) const STATE_INITIALISING: u32 = 0;
pub(crate) const STATE_READY: u32 = 1;

/// The creator asked for the segment to outlive it.
pub(crate) const FLAG_PERSISTENT: u32 = 1;

// Field offsets. The header is described by offsets rather than a `#[repr(C)]` struct
// because it is only ever read as a copied byte array (see `parse`).
const OFF_MAGIC: usize = 0;
const OFF_ABI: usize = 8;
pub(crate) const OFF_STATE: usize = 12;
const OFF_TOTAL_LEN: usize = 16;
const OFF_DATA_OFFSET: usize = 24;
const OFF_DATA_LEN: usize = 32;
const OFF_FINGERPRINT: usize = 40;
const OFF_ELEMENTS: usize = 48;
const OFF_CREATOR_PID: usize = 56;
/// Flags the creator may change after initialisation (see [`FLAG_PERSISTENT`]).
pub(crate) const OFF_FLAGS: usize = 60;
const OFF_CREATOR_START: usize = 64;
/// The alignment the data needs; every process maps the segment at an address that is a
/// multiple of it (and of the page size), so `base + data_offset` is aligned everywhere.
const OFF_DATA_ALIGN: usize = 72;
/// Inode of the creator's `/proc/self/ns/pid`; 0 if it could not tell.
const OFF_CREATOR_PID_NS: usize = 80;
const OFF_TYPE_DESC: usize = 88;
const TYPE_DESC_LEN: usize = HEADER_LEN - OFF_TYPE_DESC;

/// What a segment holds, as far as the processes sharing it must agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TypeTag {
    /// Hash of the description below; compared first because it is cheap and exact.
    pub(crate) fingerprint: u64,
    /// Human-readable: `name (size S, align A, procshare V)`, used in error messages.
    pub(crate) description: String,
    pub(crate) align: usize,
}

impl TypeTag {
    /// The tag for values (or slice elements) of type `T`, named by [`short_type_name`]:
    /// two programs that each define `#[repr(C)] struct Stats` agree on it, whatever their
    /// module paths.
    pub(crate) fn of<T>(kind: &str) -> TypeTag {
        Self::new(
            kind,
            &short_type_name(std::any::type_name::<T>()),
            size_of::<T>(),
            align_of::<T>(),
        )
    }

    /// The tag for a [`ShmSafe`](crate::ShmSafe) value type, named by its
    /// [`SHM_NAME`](crate::ShmSafe::SHM_NAME) when it sets one.
    pub(crate) fn of_shm<T: crate::ShmSafe>(kind: &str) -> TypeTag {
        if T::SHM_NAME.is_empty() {
            Self::of::<T>(kind)
        } else {
            Self::new(kind, T::SHM_NAME, size_of::<T>(), align_of::<T>())
        }
    }

    /// The tag for a value of `size`/`align` bytes shown to users as `name` (such as
    /// `Value<u64>` for the `Mutex<u64>` inside a `Value`).
    pub(crate) fn named(kind: &str, name: &str, size: usize, align: usize) -> TypeTag {
        Self::new(kind, name, size, align)
    }

    /// The tag for an untyped byte segment.
    pub(crate) fn bytes() -> TypeTag {
        Self::new("bytes", "u8", 1, 1)
    }

    fn new(kind: &str, name: &str, size: usize, align: usize) -> TypeTag {
        let description = format!(
            "{kind} {name} (size {size}, align {align}, procshare {})",
            env!("CARGO_PKG_VERSION")
        );
        TypeTag {
            fingerprint: fnv1a(description.as_bytes()),
            description,
            align,
        }
    }
}

/// `type_name` without module paths: `my_app::stats::Stats` becomes `Stats` and
/// `procshare::sync::mutex::Mutex<alloc::string::String>` becomes `Mutex<String>`.
pub(crate) fn short_type_name(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    let mut segment_start = 0;
    for (i, c) in full.char_indices() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            continue;
        }
        let token = &full[segment_start..i];
        out.push_str(token.rsplit("::").next().unwrap_or(token));
        out.push(c);
        segment_start = i + c.len_utf8();
    }
    let token = &full[segment_start..];
    out.push_str(token.rsplit("::").next().unwrap_or(token));
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Where the data lives inside a segment of `total_len` bytes.
///
/// The offset is fixed when the segment is created and recorded in the header, so it is
/// the same in every process. What makes `base + data_offset` aligned in every process is
/// that each one maps the segment at a base that is a multiple of `data_align` (see
/// `sys::map_shared_aligned`): an offset computed against one process's real address would
/// be wrong in the next process, which maps the object elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) data_offset: usize,
    pub(crate) data_len: usize,
    pub(crate) total_len: usize,
    /// A power of two: the alignment the mapping's base must have.
    pub(crate) data_align: usize,
}

impl Placement {
    /// Lays out `data_len` bytes aligned to `align` after the header.
    pub(crate) fn for_data(data_len: usize, align: usize) -> Option<Placement> {
        let align = align.max(1);
        if !align.is_power_of_two() {
            return None;
        }
        let data_offset = HEADER_LEN.checked_next_multiple_of(align)?;
        let total_len = data_offset.checked_add(data_len.max(1))?;
        // Keep every mapping a whole number of pages so no two segments ever share one.
        let total_len = total_len.checked_next_multiple_of(4096)?;
        Some(Placement {
            data_offset,
            data_len,
            total_len,
            data_align: align,
        })
    }
}

/// Everything the creator writes into a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeaderFields {
    pub(crate) placement: Placement,
    pub(crate) fingerprint: u64,
    pub(crate) elements: u64,
    pub(crate) creator_pid: u32,
    pub(crate) creator_start: u64,
    /// The creator's pid namespace (see `sys::pid_namespace_id`); 0 if unknown.
    pub(crate) creator_pid_ns: u64,
    pub(crate) description: String,
}

impl HeaderFields {
    /// The header's bytes, with the state word left at "initialising".
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut put = |off: usize, bytes: &[u8]| out[off..off + bytes.len()].copy_from_slice(bytes);
        put(OFF_MAGIC, &MAGIC);
        put(OFF_ABI, &ABI_VERSION.to_ne_bytes());
        put(OFF_STATE, &STATE_INITIALISING.to_ne_bytes());
        put(
            OFF_TOTAL_LEN,
            &(self.placement.total_len as u64).to_ne_bytes(),
        );
        put(
            OFF_DATA_OFFSET,
            &(self.placement.data_offset as u64).to_ne_bytes(),
        );
        put(
            OFF_DATA_LEN,
            &(self.placement.data_len as u64).to_ne_bytes(),
        );
        put(OFF_FINGERPRINT, &self.fingerprint.to_ne_bytes());
        put(OFF_ELEMENTS, &self.elements.to_ne_bytes());
        put(OFF_CREATOR_PID, &self.creator_pid.to_ne_bytes());
        put(OFF_CREATOR_START, &self.creator_start.to_ne_bytes());
        put(
            OFF_DATA_ALIGN,
            &(self.placement.data_align as u64).to_ne_bytes(),
        );
        put(OFF_CREATOR_PID_NS, &self.creator_pid_ns.to_ne_bytes());
        let desc = self.description.as_bytes();
        // Truncate on a character boundary so the stored text stays valid UTF-8.
        let mut n = desc.len().min(TYPE_DESC_LEN - 1);
        while !self.description.is_char_boundary(n) {
            n -= 1;
        }
        put(OFF_TYPE_DESC, &desc[..n]);
        out
    }
}

/// Why a header was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// Fewer bytes than a header.
    Truncated { found: u64 },
    /// The magic bytes are not procshare's.
    BadMagic,
    /// An incompatible header format.
    Version { found: u32 },
    /// Zero state: the creator has not finished (or died before finishing).
    NotReady,
    /// The header's own fields contradict each other or the file.
    Inconsistent(String),
    /// The header's total length is not the file's length.
    Size { expected: u64, found: u64 },
    /// A different type than the caller asked for.
    Type { expected: String, found: String },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Truncated { found } => write!(f, "only {found} bytes, less than a header"),
            HeaderError::BadMagic => f.write_str("wrong magic bytes"),
            HeaderError::Version { found } => write!(f, "header format {found}"),
            HeaderError::NotReady => f.write_str("not initialised"),
            HeaderError::Inconsistent(what) => f.write_str(what),
            HeaderError::Size { expected, found } => {
                write!(f, "{found} bytes, expected {expected}")
            }
            HeaderError::Type { expected, found } => {
                write!(f, "holds {found}, expected {expected}")
            }
        }
    }
}

/// A header that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ParsedHeader {
    pub(crate) placement: Placement,
    pub(crate) fingerprint: u64,
    /// Element count for slice segments; checked against the byte length by typed callers.
    pub(crate) elements: u64,
    pub(crate) description: String,
    /// The creator's pid namespace; 0 if it could not tell.
    pub(crate) creator_pid_ns: u64,
}

fn u32_at(bytes: &[u8], off: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&bytes[off..off + 4]);
    u32::from_ne_bytes(b)
}

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&bytes[off..off + 8]);
    u64::from_ne_bytes(b)
}

/// Checks a private copy of a segment's first bytes against the size of the file they came
/// from and, if given, the type the caller expects.
///
/// Never panics, whatever `bytes` holds; an `Ok` placement always lies inside `file_len`.
pub(crate) fn parse(
    bytes: &[u8],
    file_len: u64,
    expected: Option<&TypeTag>,
) -> Result<ParsedHeader, HeaderError> {
    if bytes.len() < HEADER_LEN || file_len < HEADER_LEN as u64 {
        return Err(HeaderError::Truncated {
            found: file_len.min(bytes.len() as u64),
        });
    }
    if bytes[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = u32_at(bytes, OFF_ABI);
    if version != ABI_VERSION {
        return Err(HeaderError::Version { found: version });
    }
    match u32_at(bytes, OFF_STATE) {
        STATE_READY => {}
        STATE_INITIALISING => return Err(HeaderError::NotReady),
        other => return Err(HeaderError::Inconsistent(format!("state word {other}"))),
    }
    let total_len = u64_at(bytes, OFF_TOTAL_LEN);
    if total_len != file_len {
        return Err(HeaderError::Size {
            expected: total_len,
            found: file_len,
        });
    }
    let data_offset = u64_at(bytes, OFF_DATA_OFFSET);
    let data_len = u64_at(bytes, OFF_DATA_LEN);
    let in_bounds = data_offset >= HEADER_LEN as u64
        && data_offset
            .checked_add(data_len)
            .is_some_and(|end| end <= total_len);
    if !in_bounds {
        return Err(HeaderError::Inconsistent(format!(
            "data at {data_offset}+{data_len} outside {total_len} bytes"
        )));
    }
    // The alignment decides where every process maps the segment, so it must be sane
    // before anything is mapped: a power of two that divides the data offset (which bounds
    // it by the file size, and so bounds the address space reserved for the mapping).
    let data_align = u64_at(bytes, OFF_DATA_ALIGN);
    if !data_align.is_power_of_two() || data_offset % data_align != 0 {
        return Err(HeaderError::Inconsistent(format!(
            "data alignment {data_align} does not divide the data offset {data_offset}"
        )));
    }
    let (Ok(data_offset), Ok(data_len), Ok(total_len), Ok(data_align)) = (
        usize::try_from(data_offset),
        usize::try_from(data_len),
        usize::try_from(total_len),
        usize::try_from(data_align),
    ) else {
        return Err(HeaderError::Inconsistent(
            "size exceeds the address space".into(),
        ));
    };
    let desc = &bytes[OFF_TYPE_DESC..HEADER_LEN];
    let desc_len = desc.iter().position(|&b| b == 0).unwrap_or(desc.len());
    let description = String::from_utf8_lossy(&desc[..desc_len]).into_owned();
    let fingerprint = u64_at(bytes, OFF_FINGERPRINT);
    if let Some(tag) = expected {
        if tag.fingerprint != fingerprint {
            return Err(HeaderError::Type {
                expected: tag.description.clone(),
                found: description,
            });
        }
        if data_offset % tag.align != 0 || data_align < tag.align {
            return Err(HeaderError::Inconsistent(format!(
                "data at offset {data_offset} with alignment {data_align} cannot hold a type \
                 aligned to {}",
                tag.align
            )));
        }
    }
    Ok(ParsedHeader {
        placement: Placement {
            data_offset,
            data_len,
            total_len,
            data_align,
        },
        fingerprint,
        elements: u64_at(bytes, OFF_ELEMENTS),
        description,
        creator_pid_ns: u64_at(bytes, OFF_CREATOR_PID_NS),
    })
}

/// Who made a segment, read from any header with procshare's magic, ready or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) creator_pid: u32,
    pub(crate) creator_start: u64,
    pub(crate) persistent: bool,
    pub(crate) description: String,
    /// The creator's pid namespace; 0 if it could not tell.
    pub(crate) creator_pid_ns: u64,
}

/// Reads the creator's identity from a header copy, without the readiness and size checks
/// of [`parse`]: used to decide whether a segment was abandoned.
pub(crate) fn identify(bytes: &[u8]) -> Option<Identity> {
    if bytes.len() < HEADER_LEN || bytes[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
        return None;
    }
    let desc = &bytes[OFF_TYPE_DESC..HEADER_LEN];
    let desc_len = desc.iter().position(|&b| b == 0).unwrap_or(desc.len());
    Some(Identity {
        creator_pid: u32_at(bytes, OFF_CREATOR_PID),
        creator_start: u64_at(bytes, OFF_CREATOR_START),
        persistent: u32_at(bytes, OFF_FLAGS) & FLAG_PERSISTENT != 0,
        description: String::from_utf8_lossy(&desc[..desc_len]).into_owned(),
        creator_pid_ns: u64_at(bytes, OFF_CREATOR_PID_NS),
    })
}

/// Entry point for the `segment_header` fuzz target: parses arbitrary bytes as a header
/// of a file of `file_len` bytes and checks the parser's promises.
#[cfg(any(test, feature = "test-hooks"))]
#[doc(hidden)]
pub fn fuzz_parse(bytes: &[u8], file_len: u64, expect_bytes_tag: bool) {
    let tag = TypeTag::bytes();
    let expected = expect_bytes_tag.then_some(&tag);
    // Used by list/remove_stale on any object with the magic, ready or not.
    let _ = identify(bytes);
    if let Ok(h) = parse(bytes, file_len, expected) {
        let p = h.placement;
        assert!(p.data_offset >= HEADER_LEN);
        assert!(p.data_offset + p.data_len <= p.total_len);
        assert!(p.data_align.is_power_of_two());
        assert_eq!(p.data_offset % p.data_align, 0);
        assert!(p.data_align <= p.total_len);
        assert_eq!(p.total_len as u64, file_len);
        if let Some(tag) = expected {
            assert_eq!(h.fingerprint, tag.fingerprint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_lose_their_module_paths() {
        assert_eq!(short_type_name("app_a::stats::Stats"), "Stats");
        assert_eq!(
            short_type_name("procshare::sync::mutex::Mutex<alloc::string::String>"),
            "Mutex<String>"
        );
        assert_eq!(short_type_name("[a::B; 4]"), "[B; 4]");
        assert_eq!(short_type_name("(u8, x::Y<z::W>)"), "(u8, Y<W>)");
        assert_eq!(
            TypeTag::of::<u64>("value").fingerprint,
            TypeTag::named("value", "u64", 8, 8).fingerprint
        );
    }

    fn ready(fields: &HeaderFields) -> [u8; HEADER_LEN] {
        let mut bytes = fields.encode();
        bytes[OFF_STATE..OFF_STATE + 4].copy_from_slice(&STATE_READY.to_ne_bytes());
        bytes
    }

    fn sample() -> HeaderFields {
        let tag = TypeTag::of::<u64>("value");
        HeaderFields {
            placement: Placement::for_data(8, 8).unwrap(),
            fingerprint: tag.fingerprint,
            elements: 1,
            creator_pid: 42,
            creator_start: 7,
            creator_pid_ns: 4026531836,
            description: tag.description,
        }
    }

    #[test]
    fn round_trips() {
        let f = sample();
        let h = parse(
            &ready(&f),
            f.placement.total_len as u64,
            Some(&TypeTag::of::<u64>("value")),
        )
        .unwrap();
        assert_eq!(h.placement, f.placement);
        assert_eq!(h.elements, 1);
        assert_eq!(identify(&ready(&f)).unwrap().creator_pid, 42);
        assert_eq!(identify(&ready(&f)).unwrap().creator_pid_ns, 4026531836);
        assert_eq!(h.creator_pid_ns, 4026531836);
        assert_eq!(h.description, f.description);
    }

    #[test]
    fn alignment_above_a_page_is_recorded_and_checked() {
        let p = Placement::for_data(8, 8192).unwrap();
        assert_eq!(
            (p.data_offset, p.data_align, p.total_len),
            (8192, 8192, 12288)
        );
        let f = HeaderFields {
            placement: p,
            ..sample()
        };
        let len = p.total_len as u64;
        assert_eq!(parse(&ready(&f), len, None).unwrap().placement, p);
        // An alignment that does not divide the offset, or is not a power of two, is
        // refused before anything is mapped with it.
        for bad in [0u64, 3, 16384, 1 << 62] {
            let mut b = ready(&f);
            b[OFF_DATA_ALIGN..OFF_DATA_ALIGN + 8].copy_from_slice(&bad.to_ne_bytes());
            assert!(
                matches!(parse(&b, len, None), Err(HeaderError::Inconsistent(_))),
                "alignment {bad}"
            );
        }
        // A type needing more alignment than the segment records is refused.
        let mut tag = TypeTag::of::<u64>("value");
        tag.align = 16384;
        assert!(matches!(
            parse(&ready(&sample()), 4096, Some(&tag)),
            Err(HeaderError::Inconsistent(_))
        ));
    }

    #[test]
    fn rejects_each_kind_of_damage() {
        let f = sample();
        let len = f.placement.total_len as u64;
        let good = ready(&f);
        assert_eq!(
            parse(&good[..100], len, None),
            Err(HeaderError::Truncated { found: 100 })
        );
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(parse(&bad, len, None), Err(HeaderError::BadMagic));
        let mut bad = good;
        bad[OFF_ABI] = 99;
        assert_eq!(
            parse(&bad, len, None),
            Err(HeaderError::Version { found: 99 })
        );
        assert_eq!(parse(&f.encode(), len, None), Err(HeaderError::NotReady));
        assert!(matches!(
            parse(&good, len + 1, None),
            Err(HeaderError::Size { .. })
        ));
        let mut bad = good;
        bad[OFF_DATA_LEN..OFF_DATA_LEN + 8].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert!(matches!(
            parse(&bad, len, None),
            Err(HeaderError::Inconsistent(_))
        ));
        let err = parse(&good, len, Some(&TypeTag::of::<u32>("value"))).unwrap_err();
        assert!(matches!(err, HeaderError::Type { ref found, .. } if found.contains("u64")));
    }

    #[test]
    fn fuzz_seed_is_a_valid_header() {
        // Keeps the fuzzer's seed in step with the format: it must pass every check.
        let seed = include_bytes!("../../fuzz/seeds/segment_header/valid_bytes_4096");
        let h = parse(&seed[9..], 4096, None).expect("seed header parses");
        assert_eq!(h.placement.data_offset, HEADER_LEN);
        assert_eq!(h.placement.data_len, 100);
        assert_eq!(h.placement.data_align, 1);
        assert_eq!(identify(&seed[9..]).unwrap().creator_pid, 1234);
    }

    #[test]
    fn fuzz_entry_survives_garbage() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for round in 0..if cfg!(miri) { 200 } else { 2000 } {
            let mut bytes = ready(&sample());
            for _ in 0..(round % 7) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes[(x as usize) % HEADER_LEN] = (x >> 32) as u8;
            }
            fuzz_parse(&bytes, 4096 + (x % 3) * 4096, round % 2 == 0);
        }
    }
}
