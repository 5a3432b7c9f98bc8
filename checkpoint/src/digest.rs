//! The page digest: what a primary and its standby both compute over the pages of an epoch
//! (or of a pre-copy round) to check that what was applied is what was sent.
//!
//! ```text
//!  range i:  gpa_i (u64, 8 bytes little-endian) ‖ bytes_i (the range's decoded pages)
//!            h_i = BLAKE3(gpa_i ‖ bytes_i)                          (range_hash)
//!
//!  digest  = BLAKE3(h_0 ‖ h_1 ‖ … ‖ h_{n-1})    32-byte hashes, in send order
//!                                                                  (combine_hashes)
//!  n = 0:    digest = BLAKE3("")  (an epoch without pages)
//! ```
//!
//! BLAKE3, not SHA-256: both sides hash every page of every epoch, on the CPUs the guest
//! runs on. Here SHA-256 (with the SHA extensions) runs at 1.5 GB/s, 11 ms per 16 MiB on each
//! side; BLAKE3 several times faster. The link's AEAD authenticates the bytes; the digest
//! checks that what was decoded and applied is what was sent.
//!
//! `bytes_i` are the pages as they are in guest memory after decoding (not the wire form: a
//! zstd, zero or XOR-delta range hashes the same as its raw pages), so the digest checks the
//! decoders too. The order is the order the ranges were sent in; the same pages in another
//! order give another digest. Per-range hashes are independent, so [`pages_digest`] computes
//! them in parallel.

use rayon::prelude::*;

/// BLAKE3(gpa as 8 little-endian bytes ‖ bytes) of one range.
pub fn range_hash(gpa: u64, data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&gpa.to_le_bytes());
    h.update(data);
    h.finalize().into()
}

/// Combines the ranges' hashes, in order, into the digest: BLAKE3 of their concatenation.
pub fn combine_hashes(hashes: impl IntoIterator<Item = [u8; 32]>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in hashes {
        h.update(&p);
    }
    h.finalize().into()
}

/// The digest of `(gpa, bytes)` ranges in order: [`combine_hashes`] of every [`range_hash`].
pub fn pages_digest(ranges: &[(u64, &[u8])]) -> [u8; 32] {
    let parts: Vec<[u8; 32]> = ranges
        .par_iter()
        .map(|(gpa, data)| range_hash(*gpa, data))
        .collect();
    combine_hashes(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_the_documented_layout() {
        let a = vec![1u8; 4096];
        let b = vec![2u8; 8192];
        // By hand: BLAKE3(gpa LE ‖ bytes) per range, then BLAKE3 of the hashes in order.
        let h = |gpa: u64, d: &[u8]| -> [u8; 32] {
            let mut buf = gpa.to_le_bytes().to_vec();
            buf.extend_from_slice(d);
            blake3::hash(&buf).into()
        };
        let mut cat = h(0x1000, &a).to_vec();
        cat.extend_from_slice(&h(0x8000, &b));
        let want: [u8; 32] = blake3::hash(&cat).into();
        assert_eq!(pages_digest(&[(0x1000, &a), (0x8000, &b)]), want);
        // Order and address matter; no ranges is BLAKE3 of nothing.
        assert_ne!(pages_digest(&[(0x8000, &b), (0x1000, &a)]), want);
        assert_ne!(pages_digest(&[(0x2000, &a), (0x8000, &b)]), want);
        let empty: [u8; 32] = blake3::hash(&[]).into();
        assert_eq!(pages_digest(&[]), empty);
    }
}
