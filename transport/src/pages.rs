//! Guest page ranges on the wire.
//!
//! ```text
//!  PageRange { gpa: u64, pages: u32, codec, payload }
//!    Zero     no payload: the pages are all zero
//!    Raw      payload = the pages' bytes (pages × 4096)
//!    Zstd     payload = zstd frame of the pages' bytes
//!    XorZstd  payload = zstd frame of (pages XOR the copy sent before) — pages re-dirtied every
//!             epoch differ in few bytes, so the XOR is mostly zeros
//! ```
//!
//! Rules a receiver enforces before touching memory ([`check_range`], [`decode_range`]): the
//! GPA is page aligned; 1 ≤ pages ≤ [`MAX_RANGE_PAGES`]; GPA + length does not overflow and
//! lies inside the receiver's memory; the payload fits its codec (Zero: empty, Raw: exactly the
//! length); a compressed payload decompresses to exactly the length, with the output capped at
//! that length before decompressing (no bombs); XorZstd needs the receiver's previous copy.
//! Encoding and decoding run on every core (rayon); long ranges are split so both cores work.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Bytes per page.
pub const PAGE: usize = 4096;
/// Most pages in one range (2 MiB).
pub const MAX_RANGE_PAGES: u32 = 512;
/// zstd level: fast; epochs stun the guest.
const LEVEL: i32 = 1;

/// How a range's payload is coded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Codec {
    /// All-zero pages, no payload.
    Zero,
    /// The bytes as they are.
    Raw,
    /// zstd.
    Zstd,
    /// XOR with the previously sent copy, then zstd.
    XorZstd,
}

/// Consecutive guest pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRange {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// Payload coding.
    pub codec: Codec,
    /// The coded bytes (serialized as one byte string, not byte by byte).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl PageRange {
    /// Bytes the range covers.
    pub fn len(&self) -> usize {
        self.pages as usize * PAGE
    }
    /// Whether the range covers no pages (never valid on the wire).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// zstd of `data XOR prev`.
fn xor_zstd(data: &[u8], prev: &[u8]) -> std::io::Result<Vec<u8>> {
    let x: Vec<u8> = data.iter().zip(prev).map(|(a, b)| a ^ b).collect();
    zstd::bulk::compress(&x, LEVEL)
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

/// Codes one range of whole pages, picking the smallest of zero, raw, zstd and (with the copy
/// sent before) XOR-then-zstd. With a copy, the delta is tried first, and plain zstd only when
/// the delta did not shrink the range below half (a page re-dirtied by a few bytes is the
/// common case, and one compression is half the work of two).
pub fn encode_range(gpa: u64, data: &[u8], prev: Option<&[u8]>) -> PageRange {
    assert!(data.len() % PAGE == 0 && !data.is_empty(), "whole pages");
    match prev.filter(|p| p.len() == data.len()) {
        Some(prev) => {
            let delta: Vec<u8> = data.iter().zip(prev).map(|(a, b)| a ^ b).collect();
            encode_range_delta(gpa, data, &delta)
        }
        None => encode_plain(gpa, data),
    }
}

/// [`encode_range`] with the delta already made: `delta` = `data` XOR the copy sent before
/// (a sender that keeps its copies page by page XORs them in one pass, without first
/// gathering them into one buffer).
pub fn encode_range_delta(gpa: u64, data: &[u8], delta: &[u8]) -> PageRange {
    assert!(data.len() % PAGE == 0 && !data.is_empty(), "whole pages");
    assert_eq!(delta.len(), data.len(), "a delta as long as the range");
    let pages = (data.len() / PAGE) as u32;
    if is_zero(data) {
        return zero_range(gpa, pages);
    }
    let xor = |payload: Vec<u8>| PageRange {
        gpa,
        pages,
        codec: Codec::XorZstd,
        payload,
    };
    let z = zstd::bulk::compress(delta, LEVEL).ok();
    match z {
        Some(z) if z.len() * 2 < data.len() => xor(z),
        z => {
            let best = encode_plain(gpa, data);
            match z {
                Some(z) if z.len() < best.payload.len() => xor(z),
                _ => best,
            }
        }
    }
}

/// The smallest of zero, zstd and raw, without a copy sent before.
fn encode_plain(gpa: u64, data: &[u8]) -> PageRange {
    let pages = (data.len() / PAGE) as u32;
    if is_zero(data) {
        return zero_range(gpa, pages);
    }
    match zstd::bulk::compress(data, LEVEL) {
        Ok(z) if z.len() < data.len() => PageRange {
            gpa,
            pages,
            codec: Codec::Zstd,
            payload: z,
        },
        _ => PageRange {
            gpa,
            pages,
            codec: Codec::Raw,
            payload: data.to_vec(),
        },
    }
}

fn zero_range(gpa: u64, pages: u32) -> PageRange {
    PageRange {
        gpa,
        pages,
        codec: Codec::Zero,
        payload: Vec::new(),
    }
}

/// Codes one range without trying compression: zero if it is all zeros, raw otherwise (for
/// senders that know their pages do not compress).
pub fn encode_range_uncompressed(gpa: u64, data: &[u8]) -> PageRange {
    assert!(data.len() % PAGE == 0 && !data.is_empty(), "whole pages");
    let pages = (data.len() / PAGE) as u32;
    if is_zero(data) {
        return PageRange {
            gpa,
            pages,
            codec: Codec::Zero,
            payload: Vec::new(),
        };
    }
    PageRange {
        gpa,
        pages,
        codec: Codec::Raw,
        payload: data.to_vec(),
    }
}

/// Codes one range with the given codec (for benchmarks and tests; `encode_range` picks the
/// best). XorZstd needs `prev`; Zero is only valid for all-zero pages.
pub fn encode_range_with(gpa: u64, data: &[u8], prev: Option<&[u8]>, codec: Codec) -> PageRange {
    let pages = (data.len() / PAGE) as u32;
    let payload = match codec {
        Codec::Zero => Vec::new(),
        Codec::Raw => data.to_vec(),
        Codec::Zstd => zstd::bulk::compress(data, LEVEL).expect("in-memory zstd"),
        Codec::XorZstd => {
            xor_zstd(data, prev.expect("XorZstd needs the previous copy")).expect("in-memory zstd")
        }
    };
    PageRange {
        gpa,
        pages,
        codec,
        payload,
    }
}

/// Codes many ranges on every core, splitting each into pieces of at most
/// [`MAX_RANGE_PAGES`]. `prev(gpa, len)` gives the copy sent before, if any.
pub fn encode_ranges(
    ranges: &[(u64, &[u8])],
    prev: &(dyn Fn(u64, usize) -> Option<Vec<u8>> + Sync),
) -> Vec<PageRange> {
    let step = MAX_RANGE_PAGES as usize * PAGE;
    let pieces: Vec<(u64, &[u8])> = ranges
        .iter()
        .flat_map(|(gpa, data)| {
            data.chunks(step)
                .enumerate()
                .map(move |(i, c)| (gpa + (i * step) as u64, c))
        })
        .collect();
    pieces
        .par_iter()
        .map(|(gpa, data)| {
            let p = prev(*gpa, data.len());
            encode_range(*gpa, data, p.as_deref())
        })
        .collect()
}

/// Checks a range against the rules that need no decompression.
pub fn check_range(r: &PageRange, mem_size: u64) -> Result<()> {
    if r.gpa % PAGE as u64 != 0 {
        return Err(Error::Pages(format!(
            "guest-physical address {:#x} is not page aligned",
            r.gpa
        )));
    }
    if r.pages == 0 || r.pages > MAX_RANGE_PAGES {
        return Err(Error::Pages(format!(
            "{} pages in one range (1 to {MAX_RANGE_PAGES})",
            r.pages
        )));
    }
    let end = r.gpa.checked_add(r.len() as u64);
    if end.is_none_or(|e| e > mem_size) {
        return Err(Error::Pages(format!(
            "range {:#x} + {} pages lies outside guest memory ({mem_size:#x} bytes)",
            r.gpa, r.pages
        )));
    }
    match r.codec {
        Codec::Zero if !r.payload.is_empty() => Err(Error::Pages(format!(
            "zero range at {:#x} carries {} bytes",
            r.gpa,
            r.payload.len()
        ))),
        Codec::Raw if r.payload.len() != r.len() => Err(Error::Pages(format!(
            "raw range at {:#x} carries {} bytes for {} pages",
            r.gpa,
            r.payload.len(),
            r.pages
        ))),
        Codec::Zstd | Codec::XorZstd if r.payload.len() > r.len() + 1024 => Err(Error::Pages(
            format!("compressed range at {:#x} is larger than its pages", r.gpa),
        )),
        _ => Ok(()),
    }
}

/// Decodes one range into its bytes after every check. `prev` is the receiver's copy of the
/// same pages (needed for XorZstd).
pub fn decode_range(r: &PageRange, mem_size: u64, prev: Option<&[u8]>) -> Result<Vec<u8>> {
    check_range(r, mem_size)?;
    let len = r.len();
    let unzstd = |payload: &[u8]| -> Result<Vec<u8>> {
        // The capacity caps the output: a payload that would grow past the range fails here.
        let out = zstd::bulk::decompress(payload, len).map_err(|e| {
            Error::Pages(format!(
                "range at {:#x} does not decompress to {len} bytes: {e}",
                r.gpa
            ))
        })?;
        if out.len() != len {
            return Err(Error::Pages(format!(
                "range at {:#x} decompresses to {} bytes, not {len}",
                r.gpa,
                out.len()
            )));
        }
        Ok(out)
    };
    match r.codec {
        Codec::Zero => Ok(vec![0; len]),
        Codec::Raw => Ok(r.payload.clone()),
        Codec::Zstd => unzstd(&r.payload),
        Codec::XorZstd => {
            let prev = prev.filter(|p| p.len() == len).ok_or_else(|| {
                Error::Pages(format!("XOR range at {:#x} without a previous copy", r.gpa))
            })?;
            let mut x = unzstd(&r.payload)?;
            x.iter_mut().zip(prev).for_each(|(a, b)| *a ^= b);
            Ok(x)
        }
    }
}

/// Decodes many ranges on every core; all of them or none (the first error).
pub fn decode_ranges(
    ranges: Vec<PageRange>,
    mem_size: u64,
    prev: &(dyn Fn(u64, usize) -> Option<Vec<u8>> + Sync),
) -> Result<Vec<(u64, Vec<u8>)>> {
    ranges
        .into_par_iter()
        .map(|r| {
            if r.codec == Codec::Raw {
                // Checked, then the payload itself is the range (no copy of it).
                check_range(&r, mem_size)?;
                return Ok((r.gpa, r.payload));
            }
            let p = if r.codec == Codec::XorZstd {
                prev(r.gpa, r.len())
            } else {
                None
            };
            decode_range(&r, mem_size, p.as_deref()).map(|b| (r.gpa, b))
        })
        .collect()
}

/// Encodes a batch of ranges for a Pages frame.
pub fn encode_batch(ranges: &[PageRange]) -> Vec<u8> {
    postcard::to_stdvec(ranges).expect("ranges always encode")
}

/// Decodes a Pages frame's batch (structure only; each range is checked by [`decode_range`]).
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<PageRange>> {
    let (v, rest): (Vec<PageRange>, &[u8]) = postcard::take_from_bytes(bytes)
        .map_err(|e| Error::Pages(format!("batch does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Pages(format!(
            "{} stray bytes after the batch",
            rest.len()
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MEM: u64 = 64 << 20;

    fn text_pages(n: usize, seed: u8) -> Vec<u8> {
        let words = b"the quick brown fox jumps over the lazy dog tandem checkpoint epoch ";
        (0..n * PAGE)
            .map(|i| words[(i * 7 + seed as usize) % words.len()])
            .collect()
    }

    #[test]
    fn each_codec_round_trips_and_is_chosen_where_it_wins() {
        let zero = vec![0u8; 2 * PAGE];
        let text = text_pages(3, 1);
        let mut random = vec![0u8; PAGE];
        rand::RngCore::fill_bytes(
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1),
            &mut random,
        );
        let mut redirtied = text.clone();
        redirtied[100] ^= 0xff;
        for (data, prev, codec) in [
            (&zero, None, Codec::Zero),
            (&text, None, Codec::Zstd),
            (&random, None, Codec::Raw),
            (&redirtied, Some(&text), Codec::XorZstd),
        ] {
            let r = encode_range(0x10000, data, prev.map(|p| p.as_slice()));
            assert_eq!(r.codec, codec);
            assert_eq!(
                &decode_range(&r, MEM, prev.map(|p| p.as_slice())).unwrap(),
                data
            );
        }
    }

    #[test]
    fn hostile_ranges_get_their_own_error() {
        let good = encode_range(0x2000, &text_pages(1, 0), None);
        let err = |r: PageRange| decode_range(&r, MEM, None).unwrap_err().to_string();
        assert!(err(PageRange {
            gpa: 0x2001,
            ..good.clone()
        })
        .contains("not page aligned"));
        assert!(err(PageRange {
            gpa: MEM - 4096,
            pages: 2,
            ..good.clone()
        })
        .contains("outside guest memory"));
        assert!(err(PageRange {
            gpa: u64::MAX - 4095,
            ..good.clone()
        })
        .contains("outside guest memory"));
        assert!(err(PageRange {
            pages: 0,
            ..good.clone()
        })
        .contains("pages in one range"));
        assert!(err(PageRange {
            pages: MAX_RANGE_PAGES + 1,
            ..good.clone()
        })
        .contains("pages in one range"));
        assert!(err(PageRange {
            codec: Codec::Raw,
            ..good.clone()
        })
        .contains("raw range"));
        assert!(err(PageRange {
            codec: Codec::Zero,
            ..good.clone()
        })
        .contains("zero range"));
        assert!(err(PageRange {
            codec: Codec::XorZstd,
            ..good.clone()
        })
        .contains("without a previous copy"));
        // A bomb: 1 page declared, 64 MiB inside.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        assert!(err(PageRange {
            gpa: 0,
            pages: 1,
            codec: Codec::Zstd,
            payload: bomb
        })
        .contains("does not decompress"));
        // Fewer bytes than declared.
        let short = zstd::bulk::compress(&[1u8; 100], 3).unwrap();
        assert!(err(PageRange {
            gpa: 0,
            pages: 1,
            codec: Codec::Zstd,
            payload: short
        })
        .contains("not 4096"));
        // A bogus codec on the wire.
        let mut wire = encode_batch(&[PageRange { gpa: 0, ..good }]);
        assert_eq!(wire[3], 2, "count, gpa 0, pages 1, then the codec (Zstd)");
        wire[3] = 9;
        assert!(decode_batch(&wire)
            .unwrap_err()
            .to_string()
            .contains("does not decode"));
    }

    #[test]
    fn big_ranges_are_split_and_decoded_in_parallel() {
        let data = text_pages(1500, 3);
        let ranges = encode_ranges(&[(0x100000, &data)], &|_, _| None);
        assert_eq!(ranges.len(), 3);
        let back = decode_ranges(ranges.clone(), MEM, &|_, _| None).unwrap();
        let joined: Vec<u8> = back.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        assert_eq!(joined, data);
        assert_eq!(back[1].0, 0x100000 + 512 * 4096);
    }

    proptest! {
        #[test]
        fn codecs_round_trip(pages in 1usize..4, seed in any::<u8>(), flips in proptest::collection::vec(any::<u16>(), 0..8)) {
            let prev = text_pages(pages, seed);
            let mut data = prev.clone();
            for f in flips { let i = f as usize % data.len(); data[i] ^= 0x5a; }
            let r = encode_range(0, &data, Some(&prev));
            prop_assert_eq!(decode_range(&r, MEM, Some(&prev)).unwrap(), data);
            let batch = decode_batch(&encode_batch(std::slice::from_ref(&r))).unwrap();
            prop_assert_eq!(batch, vec![r]);
        }

        #[test]
        fn arbitrary_batches_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(rs) = decode_batch(&b) {
                for r in rs { let _ = decode_range(&r, MEM, None); }
            }
        }
    }
}
