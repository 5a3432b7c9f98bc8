//! Guest page ranges on the wire.
//!
//! ```text
//!  PageRange { gpa: u64, pages: u32, codec, payload }
//!    Zero     no payload: the pages are all zero
//!    Raw      payload = the pages' bytes (pages × 4096)
//!    Zstd     payload = zstd frame of the pages' bytes
//!    XorZstd  payload = zstd frame of (pages XOR the copy sent before) — pages re-dirtied every
//!             epoch differ in few bytes, so the XOR is mostly zeros
//!    Patch    payload = the words that differ from the copy sent before, as runs:
//!
//!             ┌──────────────┬─────────────┬──────────────────────────┐
//!             │ word: u32 LE │ count: u16  │ count × 8 bytes (the new │  × runs
//!             │ (8-byte word │ LE, ≥ 1     │ values of those words)   │
//!             │ from start)  │             │                          │
//!             └──────────────┴─────────────┴──────────────────────────┘
//!             runs in increasing order, none overlapping, all inside the range; no zstd on
//!             either side (a page with a handful of changed words costs a compare, not a
//!             compression)
//! ```
//!
//! Rules a receiver enforces before touching memory ([`check_range`], [`decode_range`]): the
//! GPA is page aligned; 1 ≤ pages ≤ [`MAX_RANGE_PAGES`]; GPA + length does not overflow and
//! lies inside the receiver's memory; the payload fits its codec (Zero: empty, Raw: exactly the
//! length); a compressed payload decompresses to exactly the length, with the output capped at
//! that length before decompressing (no bombs); XorZstd and Patch need the receiver's previous
//! copy; a patch's runs are bounded by the range and by the payload before any byte is read.
//! Encoding and decoding run on every core (rayon); long ranges are split so both cores work.

use bytes::Bytes;
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
    /// The words that differ from the previously sent copy (see the module doc).
    Patch,
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
    /// The coded bytes (serialized as one byte string, not byte by byte). Shared: a range a
    /// [`Channel`](crate::Channel) received is a slice of the frame it came in
    /// ([`decode_batch_shared`]), not a copy.
    pub payload: Bytes,
}

impl PageRange {
    /// The range with its payload borrowed, as [`Channel::send_page_refs`] sends it.
    ///
    /// [`Channel::send_page_refs`]: crate::Channel::send_page_refs
    pub fn wire(&self) -> PageRangeRef<'_> {
        PageRangeRef {
            gpa: self.gpa,
            pages: self.pages,
            codec: self.codec,
            payload: &self.payload,
        }
    }

    /// Bytes the range covers.
    pub fn len(&self) -> usize {
        self.pages as usize * PAGE
    }
    /// Whether the range covers no pages (never valid on the wire).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// A range whose payload is borrowed — from a [`PageRange`], or, for a raw range, straight from
/// the pages it carries, which a sender then never copies into a payload of their own. It
/// encodes to exactly the bytes of the [`PageRange`] with that payload: a receiver decodes
/// [`PageRange`]s whichever was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRangeRef<'a> {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// Payload coding.
    pub codec: Codec,
    /// The coded bytes.
    #[serde(with = "serde_bytes", borrow)]
    pub payload: &'a [u8],
}

impl<'a> PageRangeRef<'a> {
    /// `data` (whole pages from `gpa`) as they are: a raw range whose payload is `data`.
    pub fn raw(gpa: u64, data: &'a [u8]) -> Self {
        PageRangeRef {
            gpa,
            pages: (data.len() / PAGE) as u32,
            codec: Codec::Raw,
            payload: data,
        }
    }
}

/// zstd of `data XOR prev`.
fn xor_zstd(data: &[u8], prev: &[u8]) -> std::io::Result<Vec<u8>> {
    let x: Vec<u8> = data.iter().zip(prev).map(|(a, b)| a ^ b).collect();
    zstd::bulk::compress(&x, LEVEL)
}

/// Whether `b` (whole pages, or any whole number of 8-byte words) is all zeros.
pub fn is_zero(b: &[u8]) -> bool {
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
            if let Some(r) = encode_patch(gpa, [(data, prev)], data.len()) {
                return r;
            }
            let delta: Vec<u8> = data.iter().zip(prev).map(|(a, b)| a ^ b).collect();
            encode_range_delta(gpa, data, &delta)
        }
        None => encode_plain(gpa, data),
    }
}

/// Header bytes of one patch run (word: u32, count: u16).
const RUN_HEADER: usize = 6;
/// Most words in one patch run.
const MAX_RUN_WORDS: usize = u16::MAX as usize;
/// A patch is used when it is at most this fraction of its range (1/16: up to about 18
/// changed words per page); past it, XOR-then-zstd codes the delta smaller.
pub const PATCH_MAX_FRACTION: usize = 16;

/// Codes `len` bytes of pages from `gpa` as a [`Codec::Patch`] against the copy sent before,
/// given as pieces `(new, old)` of equal length (a sender keeping its copies page by page
/// passes one piece per page), in order. `None` when the patch would be larger than
/// `len / PATCH_MAX_FRACTION` (the scan stops there) or the pages are all zero (a zero range
/// is smaller). Runs may cross pieces.
pub fn encode_patch<'a>(
    gpa: u64,
    pieces: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    len: usize,
) -> Option<PageRange> {
    assert!(len % PAGE == 0 && len > 0, "whole pages");
    let limit = len / PATCH_MAX_FRACTION;
    let mut out: Vec<u8> = Vec::new();
    // The open run: where its header sits in `out`, and its first word and count.
    let mut run: Option<(usize, usize, usize)> = None;
    let mut word = 0usize;
    let mut nonzero = false;
    let mut seen = 0usize;
    for (new, old) in pieces {
        assert_eq!(new.len(), old.len(), "pieces of equal length");
        assert!(new.len() % 64 == 0, "pieces of whole 64-byte blocks");
        seen += new.len();
        for (nb, ob) in new.chunks_exact(64).zip(old.chunks_exact(64)) {
            if nb == ob {
                if let Some((at, first, n)) = run.take() {
                    close_run(&mut out, at, first, n);
                }
                if !nonzero {
                    nonzero = nb.iter().any(|b| *b != 0);
                }
                word += 8;
                continue;
            }
            if !nonzero {
                nonzero = nb.iter().any(|b| *b != 0);
            }
            for (nw, ow) in nb.chunks_exact(8).zip(ob.chunks_exact(8)) {
                if nw == ow {
                    if let Some((at, first, n)) = run.take() {
                        close_run(&mut out, at, first, n);
                    }
                } else {
                    match &mut run {
                        Some((_, _, n)) if *n < MAX_RUN_WORDS => *n += 1,
                        _ => {
                            if let Some((at, first, n)) = run.take() {
                                close_run(&mut out, at, first, n);
                            }
                            run = Some((out.len(), word, 1));
                            out.extend_from_slice(&[0; RUN_HEADER]);
                        }
                    }
                    out.extend_from_slice(nw);
                    if out.len() > limit {
                        return None;
                    }
                }
                word += 1;
            }
        }
    }
    assert_eq!(seen, len, "pieces cover the range");
    if let Some((at, first, n)) = run.take() {
        close_run(&mut out, at, first, n);
    }
    if !nonzero {
        return None;
    }
    Some(PageRange {
        gpa,
        pages: (len / PAGE) as u32,
        codec: Codec::Patch,
        payload: out.into(),
    })
}

fn close_run(out: &mut [u8], at: usize, first: usize, n: usize) {
    out[at..at + 4].copy_from_slice(&(first as u32).to_le_bytes());
    out[at + 4..at + 6].copy_from_slice(&(n as u16).to_le_bytes());
}

/// Walks a patch payload's runs for a range of `words` 8-byte words, checking each against the
/// payload and the range before handing it to `run(first word, new bytes)`. On error some
/// runs may have been handed over already: callers patch a copy they drop on error.
pub fn patch_runs<'a>(
    gpa: u64,
    payload: &'a [u8],
    words: usize,
    mut run: impl FnMut(usize, &'a [u8]),
) -> Result<()> {
    let bad = |why: String| Error::Pages(format!("patch of the range at {gpa:#x}: {why}"));
    let mut rest = payload;
    let mut end = 0usize;
    while !rest.is_empty() {
        let Some((head, tail)) = rest.split_first_chunk::<RUN_HEADER>() else {
            return Err(bad(format!(
                "{} stray bytes after the last run",
                rest.len()
            )));
        };
        let first = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let n = u16::from_le_bytes(head[4..].try_into().expect("2 bytes")) as usize;
        if n == 0 {
            return Err(bad(format!("an empty run at word {first}")));
        }
        if first < end {
            return Err(bad(format!(
                "run at word {first} overlaps or precedes the run ending at word {end}"
            )));
        }
        if first + n > words {
            return Err(bad(format!(
                "run of {n} words at word {first} ends past the range's {words} words"
            )));
        }
        if tail.len() < n * 8 {
            return Err(bad(format!(
                "run of {n} words at word {first} carries {} bytes",
                tail.len()
            )));
        }
        run(first, &tail[..n * 8]);
        end = first + n;
        rest = &tail[n * 8..];
    }
    Ok(())
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
        payload: payload.into(),
    };
    let z = worth_compressing(delta)
        .then(|| zstd::bulk::compress(delta, LEVEL).ok())
        .flatten();
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

/// Ranges at least this long are sampled before zstd runs on them.
const SAMPLE_FROM: usize = 256 << 10;
/// Bytes of a sample: four pieces spread over the range.
const SAMPLE: usize = 64 << 10;

/// Whether zstd is worth running on `data`: a long range whose sample (four 16 KiB pieces at
/// its start, its quarters and its end) does not shrink below 90 % is sent as it is. zstd at
/// level 1 spends ~2–3 ms per MiB on random bytes here and saves nothing; a sender meeting
/// 16 MiB of them for the first time spent 53 ms coding that epoch (two tries per range: the
/// XOR delta, then the pages) and was throttled. A sample costs 1/32 of a 2 MiB range's try.
fn worth_compressing(data: &[u8]) -> bool {
    if data.len() < SAMPLE_FROM {
        return true;
    }
    let piece = SAMPLE / 4;
    let mut sample = Vec::with_capacity(SAMPLE);
    for i in 0..4 {
        let at = (data.len() - piece) * i / 3;
        sample.extend_from_slice(&data[at..at + piece]);
    }
    zstd::bulk::compress(&sample, LEVEL).map_or(true, |z| z.len() * 10 < sample.len() * 9)
}

/// The smallest of zero, zstd and raw, without a copy sent before.
fn encode_plain(gpa: u64, data: &[u8]) -> PageRange {
    let pages = (data.len() / PAGE) as u32;
    if is_zero(data) {
        return zero_range(gpa, pages);
    }
    if !worth_compressing(data) {
        return PageRange {
            gpa,
            pages,
            codec: Codec::Raw,
            payload: Bytes::copy_from_slice(data),
        };
    }
    match zstd::bulk::compress(data, LEVEL) {
        Ok(z) if z.len() < data.len() => PageRange {
            gpa,
            pages,
            codec: Codec::Zstd,
            payload: z.into(),
        },
        _ => PageRange {
            gpa,
            pages,
            codec: Codec::Raw,
            payload: Bytes::copy_from_slice(data),
        },
    }
}

fn zero_range(gpa: u64, pages: u32) -> PageRange {
    PageRange {
        gpa,
        pages,
        codec: Codec::Zero,
        payload: Bytes::new(),
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
            payload: Bytes::new(),
        };
    }
    PageRange {
        gpa,
        pages,
        codec: Codec::Raw,
        payload: Bytes::copy_from_slice(data),
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
        Codec::Patch => {
            let prev = prev.expect("Patch needs the previous copy");
            let mut out = Vec::new();
            let words = data.chunks_exact(8).zip(prev.chunks_exact(8)).enumerate();
            for (i, (n, o)) in words {
                if n == o {
                    continue;
                }
                out.extend_from_slice(&(i as u32).to_le_bytes());
                out.extend_from_slice(&1u16.to_le_bytes());
                out.extend_from_slice(n);
            }
            out
        }
    };
    PageRange {
        gpa,
        pages,
        codec,
        payload: payload.into(),
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
        Codec::Zstd | Codec::XorZstd | Codec::Patch if r.payload.len() > r.len() + 1024 => {
            Err(Error::Pages(format!(
                "coded range at {:#x} is larger than its pages",
                r.gpa
            )))
        }
        _ => Ok(()),
    }
}

/// Decodes one range into its bytes after every check. `prev` is the receiver's copy of the
/// same pages (needed for XorZstd and Patch).
pub fn decode_range(r: &PageRange, mem_size: u64, prev: Option<&[u8]>) -> Result<Vec<u8>> {
    check_range(r, mem_size)?;
    if r.codec == Codec::Patch {
        let prev = prev
            .filter(|p| p.len() == r.len())
            .ok_or_else(|| no_prev(r))?;
        return decode_patch(r, prev.to_vec());
    }
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
        Codec::Raw => Ok(r.payload.to_vec()),
        Codec::Zstd => unzstd(&r.payload),
        Codec::XorZstd => {
            let prev = prev.filter(|p| p.len() == len).ok_or_else(|| no_prev(r))?;
            let mut x = unzstd(&r.payload)?;
            x.iter_mut().zip(prev).for_each(|(a, b)| *a ^= b);
            Ok(x)
        }
        Codec::Patch => unreachable!("patches are decoded above"),
    }
}

fn no_prev(r: &PageRange) -> Error {
    Error::Pages(format!(
        "{:?} range at {:#x} without a previous copy",
        r.codec, r.gpa
    ))
}

/// A checked Patch range applied to `base`, the receiver's copy of its pages (taken: the
/// patched copy is the result).
fn decode_patch(r: &PageRange, mut base: Vec<u8>) -> Result<Vec<u8>> {
    patch_runs(r.gpa, &r.payload, base.len() / 8, |first, new| {
        base[first * 8..first * 8 + new.len()].copy_from_slice(new)
    })?;
    Ok(base)
}

/// Decodes one range, taking it: a raw range's payload is its bytes (a slice of the frame it
/// came in, not a copy) and a patch is applied to the copy `prev(gpa, len)` gives, without
/// copying either again.
pub fn decode_range_owned(
    r: PageRange,
    mem_size: u64,
    prev: &(dyn Fn(u64, usize) -> Option<Vec<u8>> + Sync),
) -> Result<(u64, Bytes)> {
    let decoded = match r.codec {
        Codec::Raw => {
            check_range(&r, mem_size)?;
            return Ok((r.gpa, r.payload));
        }
        Codec::Patch => {
            check_range(&r, mem_size)?;
            let base = prev(r.gpa, r.len())
                .filter(|p| p.len() == r.len())
                .ok_or_else(|| no_prev(&r))?;
            decode_patch(&r, base)
        }
        Codec::XorZstd => {
            let p = prev(r.gpa, r.len());
            decode_range(&r, mem_size, p.as_deref())
        }
        Codec::Zero | Codec::Zstd => decode_range(&r, mem_size, None),
    };
    decoded.map(|b| (r.gpa, b.into()))
}

/// Decodes many ranges on every core; all of them or none (the first error).
pub fn decode_ranges(
    ranges: Vec<PageRange>,
    mem_size: u64,
    prev: &(dyn Fn(u64, usize) -> Option<Vec<u8>> + Sync),
) -> Result<Vec<(u64, Bytes)>> {
    ranges
        .into_par_iter()
        .map(|r| decode_range_owned(r, mem_size, prev))
        .collect()
}

/// Encodes a batch of ranges for a Pages frame.
pub fn encode_batch(ranges: &[PageRange]) -> Vec<u8> {
    let refs: Vec<PageRangeRef<'_>> = ranges.iter().map(PageRange::wire).collect();
    let mut out = Vec::new();
    encode_batch_into(&refs, &mut out);
    out
}

/// Appends the encoding of a batch of ranges to `out` (the bytes [`encode_batch`] gives for
/// the same ranges owned).
pub fn encode_batch_into(ranges: &[PageRangeRef<'_>], out: &mut Vec<u8>) {
    let taken = std::mem::take(out);
    *out = postcard::to_extend(ranges, taken).expect("ranges always encode");
}

/// Decodes a Pages frame's batch (structure only; each range is checked by [`decode_range`]),
/// copying the payloads out of `bytes`.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<PageRange>> {
    decode_batch_shared(&Bytes::copy_from_slice(bytes))
}

/// [`decode_batch`] of a shared frame: every range's payload is a slice of `frame`, nothing is
/// copied. The ranges keep the frame alive until the last of them is dropped.
pub fn decode_batch_shared(frame: &Bytes) -> Result<Vec<PageRange>> {
    let (v, rest): (Vec<PageRangeRef<'_>>, &[u8]) = postcard::take_from_bytes(frame)
        .map_err(|e| Error::Pages(format!("batch does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Pages(format!(
            "{} stray bytes after the batch",
            rest.len()
        )));
    }
    Ok(v.into_iter()
        .map(|r| PageRange {
            gpa: r.gpa,
            pages: r.pages,
            codec: r.codec,
            payload: frame.slice_ref(r.payload),
        })
        .collect())
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
    fn a_borrowed_range_encodes_to_the_bytes_of_the_owned_one() {
        let data = text_pages(3, 4);
        let owned = vec![
            encode_range(0x3000, &data, None),
            encode_range_with(0x10000, &data, None, Codec::Raw),
            encode_range(0x20000, &vec![0u8; PAGE], None),
        ];
        let mut refs: Vec<PageRangeRef<'_>> = owned.iter().map(PageRange::wire).collect();
        let mut out = vec![9u8; 3];
        encode_batch_into(&refs, &mut out);
        assert_eq!(&out[..3], &[9, 9, 9], "appended after what was there");
        assert_eq!(out[3..], encode_batch(&owned)[..]);
        // A raw range borrowing the pages themselves is the raw range.
        refs[1] = PageRangeRef::raw(0x10000, &data);
        let mut again = Vec::new();
        encode_batch_into(&refs, &mut again);
        assert_eq!(again, encode_batch(&owned));
        assert_eq!(decode_batch(&again).unwrap(), owned);
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
        redirtied[2 * PAGE + 7] ^= 0x01;
        // Every fourth word changed: a patch would be a third of the range, the XOR's zstd
        // far less.
        let mut rewritten = text.clone();
        for w in rewritten.chunks_exact_mut(32) {
            w[0] ^= 0x80;
        }
        let zeroed = vec![0u8; text.len()];
        for (data, prev, codec) in [
            (&zero, None, Codec::Zero),
            (&text, None, Codec::Zstd),
            (&random, None, Codec::Raw),
            (&redirtied, Some(&text), Codec::Patch),
            (&text, Some(&text), Codec::Patch),
            (&rewritten, Some(&text), Codec::XorZstd),
            (&zeroed, Some(&text), Codec::Zero),
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
        assert!(err(PageRange {
            codec: Codec::Patch,
            payload: Bytes::new(),
            ..good.clone()
        })
        .contains("without a previous copy"));
        // A bomb: 1 page declared, 64 MiB inside.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        assert!(err(PageRange {
            gpa: 0,
            pages: 1,
            codec: Codec::Zstd,
            payload: bomb.into()
        })
        .contains("does not decompress"));
        // Fewer bytes than declared.
        let short = zstd::bulk::compress(&[1u8; 100], 3).unwrap();
        assert!(err(PageRange {
            gpa: 0,
            pages: 1,
            codec: Codec::Zstd,
            payload: short.into()
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

    /// Builds a patch payload from (word, count, fill byte) runs.
    fn patch(runs: &[(u32, u16, u8)]) -> Vec<u8> {
        let mut p = Vec::new();
        for (w, n, b) in runs {
            p.extend_from_slice(&w.to_le_bytes());
            p.extend_from_slice(&n.to_le_bytes());
            p.extend(std::iter::repeat_n(*b, *n as usize * 8));
        }
        p
    }

    #[test]
    fn patches_write_exactly_their_words() {
        let prev = text_pages(2, 5);
        let r = PageRange {
            gpa: 0x4000,
            pages: 2,
            codec: Codec::Patch,
            payload: patch(&[(0, 1, 0xaa), (1, 2, 0xbb), (1022, 2, 0xcc)]).into(),
        };
        let out = decode_range(&r, MEM, Some(&prev)).unwrap();
        let mut want = prev.clone();
        want[..8].fill(0xaa);
        want[8..24].fill(0xbb);
        want[1022 * 8..1024 * 8].fill(0xcc);
        assert_eq!(out, want);
        // The encoder's runs cross pages and pieces, and decode to the data.
        let mut data = prev.clone();
        data[PAGE - 8..PAGE + 8].fill(0x11);
        let (a, b) = (&data[..PAGE], &data[PAGE..]);
        let (pa, pb) = (&prev[..PAGE], &prev[PAGE..]);
        let r = encode_patch(0x4000, [(a, pa), (b, pb)], 2 * PAGE).unwrap();
        assert_eq!(r.payload, patch(&[(511, 2, 0x11)]));
        assert_eq!(decode_range(&r, MEM, Some(&prev)).unwrap(), data);
    }

    #[test]
    fn hostile_patches_get_their_own_error() {
        let prev = text_pages(1, 2);
        let err = |payload: Vec<u8>| {
            decode_range(
                &PageRange {
                    gpa: 0x8000,
                    pages: 1,
                    codec: Codec::Patch,
                    payload: payload.into(),
                },
                MEM,
                Some(&prev),
            )
            .unwrap_err()
            .to_string()
        };
        assert!(err(patch(&[(0, 0, 1)])).contains("empty run"));
        assert!(err(patch(&[(4, 2, 1), (5, 1, 1)])).contains("overlaps"));
        assert!(err(patch(&[(9, 1, 1), (3, 1, 1)])).contains("precedes"));
        assert!(err(patch(&[(511, 2, 1)])).contains("ends past"));
        assert!(err(patch(&[(u32::MAX, 1, 1)])).contains("ends past"));
        let mut short = patch(&[(0, 4, 1)]);
        short.truncate(20);
        assert!(err(short).contains("carries 14 bytes"));
        let mut stray = patch(&[(0, 1, 1)]);
        stray.extend_from_slice(&[1, 2, 3]);
        assert!(err(stray).contains("3 stray bytes"));
        assert!(err(vec![0; PAGE + 1025]).contains("larger than its pages"));
    }

    #[test]
    fn long_random_ranges_are_not_compressed_and_a_compressible_part_is_still_found() {
        let mut random = vec![0u8; 512 * PAGE];
        rand::RngCore::fill_bytes(
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7),
            &mut random,
        );
        assert!(!worth_compressing(&random));
        assert_eq!(encode_range(0, &random, None).codec, Codec::Raw);
        // Against a copy that differs everywhere: neither the delta nor the pages compress.
        let mut other = random.clone();
        other.reverse();
        let r = encode_range(0, &random, Some(&other));
        assert_eq!(r.codec, Codec::Raw);
        assert_eq!(decode_range(&r, MEM, Some(&other)).unwrap(), random);
        // Text in one quarter of an otherwise random range: the sample sees it and zstd runs.
        let mut mixed = random.clone();
        let q = mixed.len() / 4;
        mixed[q..2 * q].copy_from_slice(&text_pages(128, 9));
        assert!(worth_compressing(&mixed));
        assert_eq!(encode_range(0, &mixed, None).codec, Codec::Zstd);
        // Short ranges are always tried.
        assert!(worth_compressing(&random[..PAGE]));
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
