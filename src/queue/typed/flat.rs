//! The fast path of [`Queue<T>`](crate::Queue) for the types users send most: byte
//! vectors, strings and vectors of floats.
//!
//! serde hands postcard a `Vec<u8>` one element at a time (a call and a bounds check per
//! byte, on both sides), which held `Queue<Vec<u8>>` to a third of a socket's speed. For
//! the types below, postcard's encoding is a varint length followed by the elements'
//! little-endian bytes, back to back; this module writes and reads exactly those bytes
//! with slice copies (sending copies the value's memory straight into the ring, even for a
//! message chunked through a small ring). **The bytes on the wire are postcard's, bit for bit**, so a queue
//! mixes fast and generic handles freely, and a reader of another type sees what postcard
//! would show it (the unit tests compare both encoders on every type). Decoding is as
//! strict as postcard's (overlong varints, short payloads and bad UTF-8 are `Decode`
//! errors) and stricter in one way shared with the generic path: bytes left over after the
//! value are an error, not ignored.
//!
//! The dispatch is on `TypeId` (hence `T: 'static` on `Queue`), resolved at compile time:
//! other types pay nothing.
//!
//! | type | postcard encoding | element bytes |
//! |---|---|---|
//! | `Vec<u8>`, `Box<[u8]>`, `Vec<i8>` | `varint(len)`, the bytes | 1 |
//! | `String`, `Box<str>` | `varint(len)`, the UTF-8 bytes | 1 |
//! | `Vec<f32>` / `Vec<f64>` | `varint(len)`, each `to_le_bytes` | 4 / 8 (little-endian targets only) |
//!
//! (Wider integers are not here: postcard encodes each as a varint, so their wire form is
//! not their memory.)

use std::any::Any;

/// Most bytes a `usize` varint takes.
const VARINT_MAX: usize = 10;

/// A value of one of the flat types, seen as its wire form: postcard's varint length,
/// then `bytes` exactly as they go on the wire.
pub(crate) struct Flat<'a> {
    /// Elements (the varint length postcard writes).
    count: usize,
    bytes: &'a [u8],
}

/// An encoded varint length, at most [`VARINT_MAX`] bytes.
pub(crate) struct Prefix {
    buf: [u8; VARINT_MAX],
    len: usize,
}

impl std::ops::Deref for Prefix {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<'a> Flat<'a> {
    /// The varint length postcard writes first.
    pub(crate) fn prefix(&self) -> Prefix {
        let mut buf = [0; VARINT_MAX];
        let len = write_varint(self.count, &mut buf);
        Prefix { buf, len }
    }

    /// The elements' bytes, which follow the prefix.
    pub(crate) fn payload(&self) -> &'a [u8] {
        self.bytes
    }
}

fn bytes(b: &[u8]) -> Option<Flat<'_>> {
    Some(Flat {
        count: b.len(),
        bytes: b,
    })
}

/// `value` as a flat type, if it is one.
#[inline]
pub(crate) fn view<T: 'static>(value: &T) -> Option<Flat<'_>> {
    let any = value as &dyn Any;
    if let Some(v) = any.downcast_ref::<Vec<u8>>() {
        bytes(v)
    } else if let Some(s) = any.downcast_ref::<String>() {
        bytes(s.as_bytes())
    } else if let Some(b) = any.downcast_ref::<Box<[u8]>>() {
        bytes(b)
    } else if let Some(s) = any.downcast_ref::<Box<str>>() {
        bytes(s.as_bytes())
    } else if let Some(v) = any.downcast_ref::<Vec<i8>>() {
        Some(Flat {
            count: v.len(),
            bytes: as_bytes(v),
        })
    } else if let Some(v) = any.downcast_ref::<Vec<f32>>().filter(|_| LITTLE_ENDIAN) {
        Some(Flat {
            count: v.len(),
            bytes: as_bytes(v),
        })
    } else {
        any.downcast_ref::<Vec<f64>>()
            .filter(|_| LITTLE_ENDIAN)
            .map(|v| Flat {
                count: v.len(),
                bytes: as_bytes(v),
            })
    }
}

/// postcard writes floats little-endian: only there is their memory their wire form.
const LITTLE_ENDIAN: bool = cfg!(target_endian = "little");

/// The memory of a slice of `i8`, `f32` or `f64` as bytes.
fn as_bytes<E: Copy + 'static>(v: &[E]) -> &[u8] {
    // SAFETY: only called with i8, f32, f64: no padding, so every byte of the slice is
    // initialised; u8 has alignment 1; the new slice covers exactly the old one's memory
    // (size_of_val bytes) and borrows it for the same lifetime, read-only.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v)) }
}

/// Whether `T` is one of the flat types (decided at compile time).
#[inline]
pub(crate) fn is_flat<T: 'static>() -> bool {
    use std::any::TypeId;
    let t = TypeId::of::<T>();
    t == TypeId::of::<Vec<u8>>()
        || t == TypeId::of::<String>()
        || t == TypeId::of::<Box<[u8]>>()
        || t == TypeId::of::<Box<str>>()
        || t == TypeId::of::<Vec<i8>>()
        || (LITTLE_ENDIAN && (t == TypeId::of::<Vec<f32>>() || t == TypeId::of::<Vec<f64>>()))
}

/// Why a flat decode failed, in postcard's words (its `Error` display strings).
pub(crate) type DecodeError = postcard::Error;

/// Decodes `bytes` into `place` (a flat type), reusing its allocation. On error `place`
/// is left empty or unchanged.
pub(crate) fn decode_into<T: 'static>(bytes: &[u8], place: &mut T) -> Result<(), DecodeError> {
    let (count, payload) = split_len(bytes)?;
    let any = place as &mut dyn Any;
    if let Some(v) = any.downcast_mut::<Vec<u8>>() {
        let src = exact(payload, count, 1)?;
        v.clear();
        v.extend_from_slice(src);
    } else if let Some(s) = any.downcast_mut::<String>() {
        let src = exact(payload, count, 1)?;
        let text = std::str::from_utf8(src).map_err(|_| DecodeError::DeserializeBadUtf8)?;
        s.clear();
        s.push_str(text);
    } else if let Some(b) = any.downcast_mut::<Box<[u8]>>() {
        *b = exact(payload, count, 1)?.into();
    } else if let Some(b) = any.downcast_mut::<Box<str>>() {
        let src = exact(payload, count, 1)?;
        *b = std::str::from_utf8(src)
            .map_err(|_| DecodeError::DeserializeBadUtf8)?
            .into();
    } else if let Some(v) = any.downcast_mut::<Vec<i8>>() {
        let src = exact(payload, count, 1)?;
        v.clear();
        v.extend(src.iter().map(|&b| b as i8));
    } else if let Some(v) = any.downcast_mut::<Vec<f32>>() {
        let src = exact(payload, count, 4)?;
        v.clear();
        v.extend(
            src.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
        );
    } else if let Some(v) = any.downcast_mut::<Vec<f64>>() {
        let src = exact(payload, count, 8)?;
        v.clear();
        v.extend(
            src.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))),
        );
    } else {
        unreachable!("decode_into is only called for flat types (is_flat)");
    }
    Ok(())
}

/// Decodes a new flat `T` from `bytes`.
pub(crate) fn decode<T: 'static>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut out: Option<T> = None;
    let any = &mut out as &mut dyn Any;
    // Start from an empty value of the right type (no allocation), then fill it.
    if let Some(o) = any.downcast_mut::<Option<Vec<u8>>>() {
        *o = Some(Vec::new());
    } else if let Some(o) = any.downcast_mut::<Option<String>>() {
        *o = Some(String::new());
    } else if let Some(o) = any.downcast_mut::<Option<Box<[u8]>>>() {
        *o = Some(Box::default());
    } else if let Some(o) = any.downcast_mut::<Option<Box<str>>>() {
        *o = Some(Box::default());
    } else if let Some(o) = any.downcast_mut::<Option<Vec<i8>>>() {
        *o = Some(Vec::new());
    } else if let Some(o) = any.downcast_mut::<Option<Vec<f32>>>() {
        *o = Some(Vec::new());
    } else if let Some(o) = any.downcast_mut::<Option<Vec<f64>>>() {
        *o = Some(Vec::new());
    }
    let mut value = out.expect("decode is only called for flat types (is_flat)");
    decode_into(bytes, &mut value)?;
    Ok(value)
}

/// The varint length and what follows it.
fn split_len(bytes: &[u8]) -> Result<(usize, &[u8]), DecodeError> {
    let mut out: u64 = 0;
    for (i, &b) in bytes.iter().take(VARINT_MAX).enumerate() {
        out |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // postcard: the tenth byte of a u64 varint holds one bit.
            if i == VARINT_MAX - 1 && b > 1 {
                return Err(DecodeError::DeserializeBadVarint);
            }
            let n = usize::try_from(out).map_err(|_| DecodeError::DeserializeBadVarint)?;
            return Ok((n, &bytes[i + 1..]));
        }
    }
    Err(if bytes.len() < VARINT_MAX {
        DecodeError::DeserializeUnexpectedEnd
    } else {
        DecodeError::DeserializeBadVarint
    })
}

/// The payload of `count` elements of `size` bytes: exactly all of `payload`.
fn exact(payload: &[u8], count: usize, size: usize) -> Result<&[u8], DecodeError> {
    match count.checked_mul(size) {
        Some(n) if n == payload.len() => Ok(payload),
        Some(n) if n < payload.len() => Err(trailing()),
        _ => Err(DecodeError::DeserializeUnexpectedEnd),
    }
}

/// The error for bytes left after a whole value (postcard has no variant of its own).
pub(crate) fn trailing() -> DecodeError {
    DecodeError::SerdeDeCustom
}

fn write_varint(mut n: usize, buf: &mut [u8]) -> usize {
    let mut i = 0;
    while n >= 0x80 {
        buf[i] = (n as u8) | 0x80;
        n >>= 7;
        i += 1;
    }
    buf[i] = n as u8;
    i + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// The fast encoding is postcard's, byte for byte, and decodes back (both ways).
    fn same_as_postcard<T>(value: T)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + 'static,
    {
        assert!(is_flat::<T>());
        let want = postcard::to_stdvec(&value).unwrap();
        let flat = view(&value).expect("a flat type");
        let got = [&flat.prefix()[..], flat.payload()].concat();
        assert_eq!(got, want, "{value:?}");
        assert_eq!(decode::<T>(&want).unwrap(), value);
        assert_eq!(postcard::from_bytes::<T>(&got).unwrap(), value);
    }

    #[test]
    fn flat_types_encode_exactly_as_postcard() {
        let sizes: &[usize] = if cfg!(miri) {
            &[0, 1, 127, 128, 300]
        } else {
            &[0, 1, 127, 128, 300, 16_383, 16_384, 70_000]
        };
        for &n in sizes {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            same_as_postcard(bytes.clone());
            same_as_postcard(bytes.clone().into_boxed_slice());
            same_as_postcard(bytes.iter().map(|&b| b as i8).collect::<Vec<i8>>());
            let text: String = (0..n).map(|i| if i % 5 == 0 { 'é' } else { 'x' }).collect();
            same_as_postcard(text.clone());
            same_as_postcard(text.into_boxed_str());
            same_as_postcard((0..n).map(|i| i as f32 * 0.5 - 3.0).collect::<Vec<f32>>());
            same_as_postcard((0..n).map(|i| i as f64 / 3.0 - 1e9).collect::<Vec<f64>>());
        }
        assert!(!is_flat::<Vec<u32>>() && !is_flat::<u64>() && !is_flat::<(Vec<u8>,)>());
    }

    #[test]
    fn flat_decoding_is_as_strict_as_postcard() {
        // Overlong varint (11 continuation bytes), a tenth byte with more than one bit,
        // a short payload, bad UTF-8, and leftovers.
        assert!(decode::<Vec<u8>>(&[0x80; 11]).is_err());
        let mut ten = [0xffu8; 10];
        ten[9] = 0x02;
        assert!(decode::<Vec<u8>>(&ten).is_err());
        assert!(postcard::from_bytes::<Vec<u8>>(&ten).is_err());
        assert!(decode::<Vec<u8>>(&[3, 1, 2]).is_err());
        assert!(decode::<Vec<f64>>(&[1, 0, 0, 0, 0]).is_err());
        assert!(decode::<String>(&[2, 0xff, 0xfe]).is_err());
        assert!(postcard::from_bytes::<String>(&[2, 0xff, 0xfe]).is_err());
        assert!(decode::<Vec<u8>>(&[1, 9, 9]).is_err(), "trailing bytes");
        assert!(decode::<Vec<u8>>(&[]).is_err());
        // A huge claimed length is refused before anything is allocated.
        let mut huge = vec![0xff; 9];
        huge.push(0x01);
        assert!(decode::<Vec<f64>>(&huge).is_err());
    }

    #[test]
    fn decode_into_reuses_the_allocation() {
        let mut v: Vec<u8> = Vec::with_capacity(100);
        let ptr = v.as_ptr();
        decode_into(&postcard::to_stdvec(&vec![5u8; 50]).unwrap(), &mut v).unwrap();
        assert_eq!(v, vec![5u8; 50]);
        assert_eq!(v.as_ptr(), ptr);
    }
}
