//! The one owner of the dirty log: snapshots, epochs and pre-copy all read it here.
//!
//! ```text
//!   guest writes ──▶ KVM dirty log (per memslot) ──┐
//!                                                  ├─ OR ─▶ DirtyPages (bit n = page n) ─▶ runs
//!   host writes (devices) ──▶ vm-memory bitmap ────┘        ─▶ copy_runs ─▶ PageRun
//!                                         (this thread up to 2 MiB, then the copy crew)
//! ```
//!
//! [`DirtyLog::take`] fetches and resets both logs at once, so a page written after it is in
//! the next take. A page copied while the guest runs (pre-copy) may be torn; it was written
//! after the take, so it is in the next take too and is sent again.
//!
//! ## Hot pages stay writable between epochs
//!
//! KVM learns of a guest write by write-protecting the page: the first write after a reset
//! faults. On nested KVM-PVM such a fault costs tens of µs, so a guest rewriting 4,096 pages
//! every 50 ms epoch spends the whole epoch faulting (measured: 2 records/s instead of
//! 20,000). With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, KVM re-arms only the pages we name
//! (`KVM_CLEAR_DIRTY_LOG`); [`DirtyLog::take_epoch`] leaves *hot* pages writable (the
//! choice is [`crate::rearm::Rearm`]'s):
//!
//! ```text
//!  take n:  dirty D(n)   hot = D(n) ∧ (D(n-1) ∨ D(n-2)) ∧ ¬sweep(n)   re-arm D(n) ∧ ¬hot
//!           sweep(n) = pages p with p mod 16 = n mod 16   (every hot page is re-tested
//!                                                          once in 16 takes)
//! ```
//!
//! A page left writable stays set in KVM's log, so every later take reports it dirty and the
//! epoch copies it (a superset of the written pages, never a subset): a page written once is
//! copied until the next clear take re-arms it, a hot one faults once in 16 clear takes
//! instead of once in every epoch. Clear takes come every 2 to 32 takes, as the guest's
//! writing pattern pays for them ([`crate::rearm`]). Without the capability every take
//! re-arms everything, as before.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::layout::PAGE_SIZE;
use crate::shared::VmShared;
use crate::{Error, Result};

/// Contiguous guest pages copied out of a stunned VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// The pages' bytes (a multiple of the page size).
    pub data: Vec<u8>,
}

/// The longest run copied as one piece (2 MiB).
pub const MAX_RUN_PAGES: u64 = 512;

/// A set of guest pages (bit `n` of the bitmap = page `n`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyPages {
    bitmap: Vec<u64>,
    pages: u64,
}

impl DirtyPages {
    /// Every one of `pages` pages.
    pub fn all(pages: u64) -> Self {
        DirtyPages {
            bitmap: vec![u64::MAX; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// A bitmap of `pages` pages (missing words count as clean, extra bits are ignored).
    pub fn from_bitmap(bitmap: Vec<u64>, pages: u64) -> Self {
        DirtyPages { bitmap, pages }
    }

    /// None of `pages` pages.
    pub fn none(pages: u64) -> Self {
        DirtyPages {
            bitmap: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// The bitmap.
    pub fn bitmap(&self) -> &[u64] {
        &self.bitmap
    }

    /// The pages of this set that are not in `other`.
    pub fn without(&self, other: &DirtyPages) -> DirtyPages {
        let bitmap = self
            .bitmap
            .iter()
            .enumerate()
            .map(|(i, w)| w & !other.bitmap.get(i).copied().unwrap_or(0))
            .collect();
        DirtyPages {
            bitmap,
            pages: self.pages,
        }
    }

    /// Pages in the set.
    pub fn count(&self) -> u64 {
        let mut n = 0;
        for (i, w) in self.bitmap.iter().enumerate() {
            let valid = self.pages.saturating_sub(i as u64 * 64).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            n += u64::from((w & mask).count_ones());
        }
        n
    }

    /// Whether page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages
            && self
                .bitmap
                .get((page / 64) as usize)
                .is_some_and(|w| w >> (page % 64) & 1 == 1)
    }

    /// Runs of at most [`MAX_RUN_PAGES`] dirty pages: (first page, page count).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        dirty_runs(&self.bitmap, self.pages)
    }
}

/// Turns a dirty bitmap (bit n = page n) into runs of at most [`MAX_RUN_PAGES`] pages:
/// (first page, page count).
pub fn dirty_runs(bitmap: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut p = 0;
    loop {
        let start = next_bit(bitmap, pages, p, true);
        if start >= pages {
            return runs;
        }
        let end = next_bit(bitmap, pages, start, false);
        let mut first = start;
        while first < end {
            let n = (end - first).min(MAX_RUN_PAGES);
            runs.push((first, n));
            first += n;
        }
        p = end;
    }
}

/// The first page at or after `from` whose bit is `set` (`pages` when there is none), a word
/// at a time: a 1 GiB guest's bitmap is 262,144 bits, scanned inside the epoch pause.
fn next_bit(bitmap: &[u64], pages: u64, from: u64, set: bool) -> u64 {
    let mut p = from;
    while p < pages {
        let w = (p / 64) as usize;
        let word = bitmap.get(w).copied().unwrap_or(0);
        let word = if set { word } else { !word } & (u64::MAX << (p % 64));
        if word != 0 {
            return (w as u64 * 64 + u64::from(word.trailing_zeros())).min(pages);
        }
        p = (w as u64 + 1) * 64;
    }
    pages
}

/// The dirty log of one VM, and the copy of dirty pages out of its memory.
#[derive(Clone)]
pub struct DirtyLog {
    shared: Arc<VmShared>,
}

impl DirtyLog {
    pub(crate) fn new(shared: Arc<VmShared>) -> Self {
        DirtyLog { shared }
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.shared.layout.mem_bytes
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.shared.layout.pages()
    }

    /// Fetches and resets the log: KVM's (guest writes) OR vm-memory's (host writes). Every
    /// page is write-protected again.
    pub fn take(&self) -> Result<DirtyPages> {
        Ok(DirtyPages {
            bitmap: self.shared.take_dirty_bitmap(false)?,
            pages: self.pages(),
        })
    }

    /// Like [`DirtyLog::take`], for back-to-back epochs of a stunned guest: hot pages stay
    /// writable and are reported dirty again next time (see the module doc).
    pub fn take_epoch(&self) -> Result<DirtyPages> {
        Ok(DirtyPages {
            bitmap: self.shared.take_dirty_bitmap(true)?,
            pages: self.pages(),
        })
    }

    /// Whether this host lets hot pages stay writable between epochs.
    pub fn keeps_hot_pages(&self) -> bool {
        self.shared.manual_dirty
    }

    /// Pages nothing ever touched: guest RAM whose host page is neither present nor swapped
    /// out (`/proc/self/pagemap`, bits 63 and 62), so all zero. Reading such a page
    /// would map the kernel's shared zero page at it, and the guest's first write would then
    /// be a copy-on-write fault that shoots down the TLB of every CPU running the VM (measured
    /// here: ~70 µs per page, 4,096 of them in the first 300 ms of a 16 MiB hot set, against a
    /// few µs for a first write to a page never mapped). In memory mapped from a file (a
    /// restored snapshot's sparse memory file), such a page counts only where the file has a
    /// hole (`SEEK_DATA`/`SEEK_HOLE`): elsewhere it holds the file's bytes. A page written after
    /// this call is in the next dirty log (take the log first).
    pub fn never_touched(&self) -> Result<DirtyPages> {
        use std::os::unix::fs::FileExt;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let mut out = DirtyPages::none(self.pages());
        let err = |e: String| Error::Memory(format!("reading /proc/self/pagemap: {e}"));
        let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(|e| err(e.to_string()))?;
        let mut entries = vec![0u8; 8 * 4096];
        for region in self.shared.mem.iter() {
            // A file-backed region: its pages that hold some of the file's data.
            let data = match region.file_offset() {
                None => None,
                Some(fo) => {
                    let mut pages = DirtyPages::none(region.len().div_ceil(PAGE_SIZE));
                    for (s, e) in data_extents(fo.file(), fo.start(), region.len())? {
                        for p in s / PAGE_SIZE..e.div_ceil(PAGE_SIZE).min(pages.pages) {
                            pages.bitmap[(p / 64) as usize] |= 1 << (p % 64);
                        }
                    }
                    Some(pages)
                }
            };
            let in_data = |page: u64| data.as_ref().is_some_and(|d| d.contains(page));
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| err(e.to_string()))? as u64;
            let first = region.start_addr().0 / PAGE_SIZE;
            let n = region.len() / PAGE_SIZE;
            let mut p = 0u64;
            while p < n {
                let take = (n - p).min(4096);
                let buf = &mut entries[..take as usize * 8];
                pagemap
                    .read_exact_at(buf, (host / PAGE_SIZE + p) * 8)
                    .map_err(|e| err(e.to_string()))?;
                for (i, e) in buf.chunks_exact(8).enumerate() {
                    let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
                    if e & (PRESENT | SWAPPED) == 0 && !in_data(p + i as u64) {
                        let g = first + p + i as u64;
                        if g < out.pages {
                            out.bitmap[(g / 64) as usize] |= 1 << (g % 64);
                        }
                    }
                }
                p += take;
            }
        }
        Ok(out)
    }

    /// Fills `buf` with guest memory from `gpa`, without reading the pages in `untouched`
    /// ([`DirtyLog::never_touched`]): those are zero, and reading one would map the zero page
    /// at it, so the guest's first write after a snapshot would be a copy-on-write fault with
    /// a TLB shootdown instead of a first touch. Pages only partly inside `buf` are read.
    pub fn read_touched(&self, untouched: &DirtyPages, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let end = gpa
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::Memory(format!("{gpa:#x} + {} overflows", buf.len())))?;
        // Whole untouched pages inside [gpa, end) are zeroed; everything between is read.
        let mut at = gpa;
        while at < end {
            let page = at / PAGE_SIZE;
            let whole = at % PAGE_SIZE == 0 && at + PAGE_SIZE <= end;
            let zero = whole && untouched.contains(page);
            // Extend the span while pages keep the same kind.
            let mut next = if whole {
                at + PAGE_SIZE
            } else {
                ((page + 1) * PAGE_SIZE).min(end)
            };
            while next < end
                && next + PAGE_SIZE <= end
                && untouched.contains(next / PAGE_SIZE) == zero
            {
                next += PAGE_SIZE;
            }
            let span = &mut buf[(at - gpa) as usize..(next - gpa) as usize];
            if zero {
                span.fill(0);
            } else {
                self.shared
                    .mem
                    .read_slice(span, GuestAddress(at))
                    .map_err(|e| Error::Memory(e.to_string()))?;
            }
            at = next;
        }
        Ok(())
    }

    /// Copies `runs` (first page, count) out of guest memory into buffers given back with
    /// [`recycle`] when there are any: on this thread up to [`INLINE_COPY_BYTES`], beyond that
    /// shared with the VM's copy crew ([`crate::crew`]), which helps from the other CPUs.
    pub fn copy_runs(&self, runs: &[(u64, u64)]) -> Result<Vec<PageRun>> {
        let mem = &self.shared.mem;
        let bufs: Vec<Vec<u8>> = {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            runs.iter()
                .map(|&(_, n)| pool.take((n * PAGE_SIZE) as usize))
                .collect()
        };
        let bytes: u64 = runs.iter().map(|&(_, n)| n * PAGE_SIZE).sum();
        let units: Vec<crate::crew::Unit> = runs
            .iter()
            .zip(bufs)
            .enumerate()
            .map(|(index, (&(first, n), data))| crate::crew::Unit {
                index,
                gpa: first * PAGE_SIZE,
                len: (n * PAGE_SIZE) as usize,
                data,
            })
            .collect();
        let copied = if bytes > INLINE_COPY_BYTES && self.shared.crew.helpers() > 0 {
            self.shared.crew.copy(mem, units)?
        } else {
            units
                .into_iter()
                .map(|u| crate::crew::fill(mem, u))
                .collect::<Result<Vec<_>>>()?
        };
        Ok(copied
            .into_iter()
            .map(|u| PageRun {
                gpa: u.gpa,
                data: u.data,
            })
            .collect())
    }
}

/// The byte ranges of `file` within `[start, start + len)` that hold data, relative to
/// `start` (from `SEEK_DATA`/`SEEK_HOLE`), in order and disjoint. A file system that cannot tell
/// holes gives one range: all of it.
fn data_extents(file: &std::fs::File, start: u64, len: u64) -> Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let end = start
        .checked_add(len)
        .ok_or_else(|| Error::Memory(format!("file range {start:#x} + {len:#x} overflows")))?;
    let seek = |from: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let from = libc::off_t::try_from(from).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a file descriptor this File owns and keeps open for the call; it
        // only moves the file's offset, which nothing here reads from (the memory is mapped).
        let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // No data at or after `from`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => {
                log::debug!("cannot find the holes of guest memory's file ({e}): all data");
                return Ok(vec![(0, len)]);
            }
        };
        if data >= end {
            break;
        }
        let hole = match seek(data, libc::SEEK_HOLE) {
            Ok(Some(h)) => h.min(end),
            Ok(None) | Err(_) => end,
        };
        if hole <= data {
            // Not a file system that answers sensibly: count everything as data.
            return Ok(vec![(0, len)]);
        }
        out.push((data - start, hole - start));
        at = hole;
    }
    Ok(out)
}

/// Copies up to this size are done on the calling thread alone: one run at most
/// ([`MAX_RUN_PAGES`]), which the crew could not split ([`crate::crew`]). Measured in the pause
/// with the crew from 1 MiB: no gain at 1 MiB (0.37 ms `monitor_save`, against 0.31–0.39 ms
/// alone), 0.57–0.66 ms against 0.69–0.87 ms at 2 MiB, and more beyond.
pub const INLINE_COPY_BYTES: u64 = MAX_RUN_PAGES * PAGE_SIZE;

/// Most bytes of copy buffers kept for reuse.
pub const POOL_BYTES: usize = 64 << 20;

/// Copy buffers given back, for the next epoch's copy: a fresh allocation of the same size
/// costs a page fault per 4 KiB on first touch (measured here: 16 MiB copied into fresh
/// buffers 3.3 ms, into reused ones 1.2 ms), and the copy happens while the guest is stunned.
static POOL: std::sync::Mutex<Pool> = std::sync::Mutex::new(Pool {
    bufs: Vec::new(),
    bytes: 0,
});

struct Pool {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl Pool {
    /// A buffer of at least `len` bytes' capacity if one is kept (the smallest such),
    /// else a new one; its contents are stale (the copy overwrites them).
    fn take(&mut self, len: usize) -> Vec<u8> {
        let best = self
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut b = self.bufs.swap_remove(i);
                self.bytes -= b.capacity();
                b.truncate(len);
                b
            }
            None => Vec::with_capacity(len),
        }
    }

    fn give(&mut self, buf: Vec<u8>) {
        if buf.capacity() > 0 && self.bytes + buf.capacity() <= POOL_BYTES {
            self.bytes += buf.capacity();
            self.bufs.push(buf);
        }
    }
}

/// Gives the buffers of copied runs back once they are sent, for the next copy (at most
/// [`POOL_BYTES`] are kept; the rest are freed).
pub fn recycle(runs: Vec<PageRun>) {
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    for r in runs {
        pool.give(r.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_gives_the_smallest_buffer_that_fits_and_stays_bounded() {
        let mut p = Pool {
            bufs: Vec::new(),
            bytes: 0,
        };
        p.give(vec![1u8; 8192]);
        p.give(vec![2u8; 4096]);
        let b = p.take(4096);
        assert_eq!((b.len(), b.capacity()), (4096, 4096));
        let b = p.take(2 * 4096);
        assert!(b.capacity() >= 8192 && b.len() <= 8192);
        assert_eq!(p.bytes, 0);
        assert!(p.take(4096).is_empty(), "a new buffer when none is kept");
        p.give(vec![0u8; POOL_BYTES]);
        p.give(vec![0u8; 4096]);
        assert_eq!(p.bytes, POOL_BYTES, "never more than POOL_BYTES kept");
    }

    /// The bit-by-bit definition of [`dirty_runs`].
    fn naive_runs(bitmap: &[u64], pages: u64) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut start: Option<u64> = None;
        for p in 0..=pages {
            let dirty = p < pages
                && (bitmap.get((p / 64) as usize).copied().unwrap_or(0) >> (p % 64)) & 1 == 1;
            match (dirty, start) {
                (true, None) => start = Some(p),
                (true, Some(s)) if p - s == MAX_RUN_PAGES => {
                    runs.push((s, p - s));
                    start = Some(p);
                }
                (false, Some(s)) => {
                    runs.push((s, p - s));
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    #[test]
    fn word_at_a_time_runs_equal_the_bit_by_bit_definition() {
        // xorshift: varied densities, runs across word edges, bits past `pages`.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..200 {
            let words = 1 + (next() % 40) as usize;
            let bitmap: Vec<u64> = (0..words)
                .map(|_| match next() % 4 {
                    0 => 0,
                    1 => u64::MAX,
                    2 => next() & next(),
                    _ => next(),
                })
                .collect();
            let pages = (next() % (words as u64 * 64 + 70)).max(1);
            assert_eq!(
                dirty_runs(&bitmap, pages),
                naive_runs(&bitmap, pages),
                "case {case}: {pages} pages"
            );
        }
    }

    #[test]
    fn runs_split_at_gaps_and_at_the_run_limit() {
        let mut bitmap = vec![0u64; 32];
        bitmap[0] = 0b1011;
        bitmap[2..20].fill(u64::MAX);
        let runs = dirty_runs(&bitmap, 64 * 32);
        assert_eq!(runs[0], (0, 2));
        assert_eq!(runs[1], (3, 1));
        assert_eq!(runs[2], (128, MAX_RUN_PAGES));
        assert_eq!(runs[3], (128 + MAX_RUN_PAGES, MAX_RUN_PAGES));
        assert_eq!(
            runs[4],
            (128 + 2 * MAX_RUN_PAGES, 18 * 64 - 2 * MAX_RUN_PAGES)
        );
        assert_eq!(runs.len(), 5);
        assert_eq!(DirtyPages::all(10).runs(), vec![(0, 10)]);
    }
}
