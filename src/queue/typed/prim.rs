//! The fast path of [`Queue<T>`](crate::Queue) for plain integers (`u64`, `usize`, `u32`,
//! `i64`, `i32`): postcard writes each as a varint (LEB128, after a zigzag for the signed
//! ones), and this module writes those bytes straight into the ring and reads them back,
//! instead of encoding through serde onto the stack and copying. **The bytes on the wire
//! are postcard's, bit for bit** (the unit tests compare), so fast and generic handles mix
//! freely. Decoding takes only the canonical form of a value that fits (the only form an
//! encoder writes); anything else (overlong, out of range, leftovers, a short message)
//! goes to postcard, which decides it as it always did.
//!
//! The dispatch is on `TypeId`, resolved at compile time: other types pay nothing.

use std::any::Any;

/// Most bytes a varint this module writes takes (a `u64`).
const MAX_LEN: usize = 10;

/// `value`'s varint value if `T` is one of the integers above.
#[inline]
pub(crate) fn view<T: 'static>(value: &T) -> Option<u64> {
    let v = value as &dyn Any;
    if let Some(&n) = v.downcast_ref::<u64>() {
        return Some(n);
    }
    if let Some(&n) = v.downcast_ref::<usize>() {
        return Some(n as u64);
    }
    if let Some(&n) = v.downcast_ref::<u32>() {
        return Some(u64::from(n));
    }
    if let Some(&n) = v.downcast_ref::<i64>() {
        return Some(zigzag(n));
    }
    if let Some(&n) = v.downcast_ref::<i32>() {
        // postcard zigzags an i32 in 32 bits: the same number as in 64.
        return Some(zigzag(i64::from(n)));
    }
    None
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Bytes the varint of `n` takes.
#[inline]
pub(crate) fn len(n: u64) -> usize {
    let bits = 64 - (n | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Writes the varint of `n` into `buf`, exactly [`len(n)`](len) bytes long.
#[inline]
pub(crate) fn write(mut n: u64, buf: &mut [u8]) {
    debug_assert_eq!(buf.len(), len(n));
    let mut i = 0;
    while n >= 0x80 && i < buf.len() {
        buf[i] = (n as u8) | 0x80;
        n >>= 7;
        i += 1;
    }
    if let Some(last) = buf.get_mut(i) {
        *last = n as u8;
    }
}

/// `bytes` as a `T`, if `T` is one of the integers above and `bytes` is exactly the
/// canonical varint of a value of it; `None` otherwise (ask postcard).
#[inline]
pub(crate) fn decode<T: 'static>(bytes: &[u8]) -> Option<T> {
    // Canonical: continuation bits on all bytes but the last, no high zero byte; at most
    // nine bytes (63 bits, so no overflow to check; the tenth byte's case is postcard's).
    let (&last, init) = bytes.split_last()?;
    if bytes.len() >= MAX_LEN || last & 0x80 != 0 || (last == 0 && !init.is_empty()) {
        return None;
    }
    let mut n = u64::from(last) << (7 * init.len());
    for (i, &b) in init.iter().enumerate() {
        if b & 0x80 == 0 {
            return None;
        }
        n |= u64::from(b & 0x7f) << (7 * i);
    }
    let mut out: Option<T> = None;
    let o = &mut out as &mut dyn Any;
    if let Some(o) = o.downcast_mut::<Option<u64>>() {
        *o = Some(n);
    } else if let Some(o) = o.downcast_mut::<Option<usize>>() {
        *o = Some(usize::try_from(n).ok()?);
    } else if let Some(o) = o.downcast_mut::<Option<u32>>() {
        *o = Some(u32::try_from(n).ok()?);
    } else if let Some(o) = o.downcast_mut::<Option<i64>>() {
        *o = Some(unzigzag(n));
    } else if let Some(o) = o.downcast_mut::<Option<i32>>() {
        let n = u32::try_from(n).ok()?;
        *o = Some(i32::try_from(unzigzag(u64::from(n))).ok()?);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// The fast encoding is postcard's, byte for byte, and decodes back (both ways).
    fn same_as_postcard<T>(value: T)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + Copy + 'static,
    {
        let want = postcard::to_stdvec(&value).unwrap();
        let n = view(&value).expect("a fast integer type");
        let mut got = vec![0; len(n)];
        write(n, &mut got);
        assert_eq!(got, want, "{value:?}");
        // Ten-byte varints (values above 2^63) are left to postcard.
        let fast = (want.len() < MAX_LEN).then_some(value);
        assert_eq!(decode::<T>(&want), fast, "{value:?}");
        assert_eq!(postcard::from_bytes::<T>(&got).unwrap(), value);
    }

    fn edges() -> Vec<u64> {
        let mut v = vec![0, 1, 2, 126, 127, 128, 129, 255, 256, 300, 16_383, 16_384];
        for shift in (7..64).step_by(7) {
            let p = 1u64 << shift;
            v.extend([p - 1, p, p + 1]);
        }
        v.extend([
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX / 2,
            u64::MAX,
        ]);
        v
    }

    #[test]
    fn integers_encode_exactly_as_postcard() {
        for n in edges() {
            same_as_postcard(n);
            same_as_postcard(n as usize);
            same_as_postcard(n as u32);
            same_as_postcard(n as i64);
            same_as_postcard((n as i64).wrapping_neg());
            same_as_postcard(n as i32);
            same_as_postcard((n as i32).wrapping_neg());
        }
        for t in [i32::MIN, i32::MAX] {
            same_as_postcard(t);
        }
        for t in [i64::MIN, i64::MAX] {
            same_as_postcard(t);
        }
        assert_eq!(view(&3u8), None);
        assert_eq!(view(&(1u64,)), None);
        assert_eq!(decode::<u16>(&[1]), None);
    }

    /// What the fast decoder takes, postcard reads the same; what it leaves, it leaves to
    /// postcard (never a different answer).
    #[test]
    fn decoding_never_disagrees_with_postcard() {
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x80],
            vec![0x80, 0x00],
            vec![0xff; 10],
            vec![0xff, 0xff, 0xff, 0xff, 0x0f],
            vec![0xff, 0xff, 0xff, 0xff, 0x1f],
            vec![0xff, 0xff, 0xff, 0xff, 0x10],
            vec![1, 2],
            vec![0x81, 0x01, 0x00],
        ];
        for n in edges() {
            let mut b = vec![0; len(n)];
            write(n, &mut b);
            cases.push(b.clone());
            b.push(0);
            cases.push(b);
        }
        fn check<T>(bytes: &[u8])
        where
            T: DeserializeOwned + PartialEq + std::fmt::Debug + 'static,
        {
            if let Some(fast) = decode::<T>(bytes) {
                match postcard::take_from_bytes::<T>(bytes) {
                    Ok((v, [])) => assert_eq!(v, fast, "{bytes:?}"),
                    other => panic!("{bytes:?}: fast {fast:?}, postcard {other:?}"),
                }
            }
        }
        for b in &cases {
            check::<u64>(b);
            check::<usize>(b);
            check::<u32>(b);
            check::<i64>(b);
            check::<i32>(b);
        }
    }
}
