//! Reading this process's own memory map in one go (`/proc/self/maps`).

use std::io;

use super::{MappedFile, parse_maps_line};

/// Every mapping of the calling process: its range and its file (`None` for an anonymous
/// mapping), from one read of `/proc/self/maps`. For callers that look up several
/// addresses at once (the fork handler), instead of one read per address.
pub(crate) fn own_mappings() -> io::Result<Vec<(usize, usize, Option<MappedFile>)>> {
    if cfg!(miri) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no /proc under Miri",
        ));
    }
    let text = std::fs::read("/proc/self/maps")?;
    Ok(text
        .split(|&b| b == b'\n')
        .filter_map(parse_maps_line)
        .collect())
}
