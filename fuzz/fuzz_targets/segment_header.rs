//! Feeds arbitrary bytes to the segment-header parser as if they had been read from a
//! shared memory object of arbitrary size. The parser must never panic, and any header it
//! accepts must place the data inside the file with an alignment that divides its offset
//! (every process maps the segment at a multiple of that alignment, so a bad one would
//! misalign the data or reserve absurd address space); the creator-identity reader used by
//! `list`/`remove_stale` must not panic either. The checks live in `fuzz_parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first 9 bytes choose the claimed file length and whether a type is expected;
    // the rest is the header.
    if input.len() < 9 {
        return;
    }
    let (params, header) = input.split_at(9);
    let file_len = u64::from_le_bytes(params[..8].try_into().unwrap());
    procshare::__fuzz::segment_header(header, file_len, params[8] & 1 == 1);
});
