//! One epoch on the wire, and the standby's staging area.
//!
//! ```text
//!  primary                                                standby
//!   │ [FullSync{fence, mem_bytes, vcpus}]   (first epoch)  │
//!   │ EpochBegin{fence, pages} ──────────────────────────▶ │ new staging area
//!   │ Pages[ranges…] ×n  (zstd / zero / raw / XOR ───────▶ │ decode + bound-check + hash into
//!   │                     / patch)                         │ staging (a patch stays a patch)
//!   │ DeviceState{"vcpu/0" …, "module/…", "group/…"} ────▶ │ staging sections
//!   │ DeviceState{"records/<v>"} (held output) ──────────▶ │ staging records
//!   │ DeviceState{"disk-writes/<d>/<p>"} (written blocks) ▶ │ staging sections
//!   │ EpochEnd{fence, ranges, digest} ───────────────────▶ │ verify count + digest + state
//!   │                                                      │ check disk writes vs replicas
//!   │                                                      │ COMMIT: pages → memory, blocks →
//!   │                                                      │ disk replicas, state replaces
//!   │                                                      │ state (all or nothing)
//!   │ ◀─────────────────────────────── Ack{fence} / Nack{code, why}
//! ```
//!
//! `digest` = [`checkpoint::digest::pages_digest`]: BLAKE3 over XXH3-128(bytes, seed gpa) of
//! every range in order, each range hashed as it is staged. Nothing in a staging area touches
//! the committed image until every range decoded, every check passed and the digest matched;
//! a malformed or truncated epoch is dropped whole (and NACKed).
//!
//! A patch (the words of a range that changed since the copy the standby holds) is not
//! expanded into pages: its hash reads the committed copy a chunk at a time with the words in
//! place, and the commit writes just those words. The committed copy cannot change between
//! the two: the primary sends epoch E+1 only after the Ack of E, which follows E's commit.

use std::collections::VecDeque;

use checkpoint::digest::{combine_hashes, range_hash, RangeHasher};
use checkpoint::{Section, Snapshot};
use guest_abi::Record;
use monitor::GuestMem;
use rayon::prelude::*;
use transport::pages::{check_range, decode_range_owned, patch_runs, Codec};
use transport::{Fence, PageRange};
use vm_memory::{Bytes, GuestAddress};

use crate::{Error, Result};

/// Most sections in one epoch.
pub const MAX_SECTIONS: usize = 4096;
/// Most state bytes in one epoch.
pub const MAX_STATE_BYTES: usize = 256 << 20;
/// Most disk bytes a pre-copy's rounds may carry in all (they wait in the standby's memory
/// with the base until the completing epoch commits).
pub const MAX_BASE_DISK_BYTES: u64 = 1 << 30;
/// Most records of one vCPU in one epoch.
pub const MAX_RECORDS: usize = 4 << 20;
/// Committed epochs whose output a standby keeps (the primary releases an epoch's output
/// before it captures the next, so one would do; the rest is margin).
pub const RETAINED_EPOCHS: usize = 4;
/// Name prefix of held-output sections.
pub const RECORDS_PREFIX: &str = "records/";

/// Reads the committed copy of guest memory: `read(gpa, buf)` fills `buf` with the committed
/// bytes at `gpa` (false where there are none). The base of the primary's XOR deltas and
/// patches.
#[derive(Clone)]
pub struct XorBase(pub std::sync::Arc<ReadCommitted>);

/// `read(gpa, buf)`: fills `buf` with the committed bytes at `gpa`; false where there are none.
pub type ReadCommitted = dyn Fn(u64, &mut [u8]) -> bool + Send + Sync;

/// What a staging area reads committed pages with (see [`XorBase`]).
pub type BaseReader<'a> = &'a (dyn Fn(u64, &mut [u8]) -> bool + Sync);

/// One staged range.
#[derive(Debug)]
pub enum StagedRange {
    /// Decoded pages at a guest-physical address (a raw range's are a slice of the frame
    /// they came in).
    Bytes(u64, transport::Bytes),
    /// A checked patch against the committed copy (`transport::pages`, `Codec::Patch`): at
    /// commit only its words are written, the rest of its pages being the committed copy
    /// already. Its hash was taken over the committed copy with the words in place.
    Patch(PageRange),
}

impl StagedRange {
    /// Guest-physical address of the first page.
    pub fn gpa(&self) -> u64 {
        match self {
            StagedRange::Bytes(gpa, _) => *gpa,
            StagedRange::Patch(r) => r.gpa,
        }
    }
}

/// Bytes of committed memory a patch's hash reads at a time.
const PATCH_CHUNK: usize = 16 << 10;

impl std::fmt::Debug for XorBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XorBase")
    }
}

/// An epoch being received.
#[derive(Debug)]
pub struct Staging {
    fence: Fence,
    declared_pages: u64,
    mem_size: u64,
    ranges: Vec<StagedRange>,
    /// Each range's hash (`checkpoint::digest::range_hash` of its pages as committed).
    hashes: Vec<[u8; 16]>,
    pages: u64,
    sections: Snapshot,
    state_bytes: usize,
    records: Vec<Vec<Record>>,
}

/// A received and verified epoch, ready to commit.
#[derive(Debug)]
pub struct Staged {
    /// The epoch.
    pub fence: Fence,
    /// Decoded pages and patches.
    pub ranges: Vec<StagedRange>,
    /// The state.
    pub sections: Snapshot,
    /// Held output per vCPU.
    pub records: Vec<Vec<Record>>,
}

fn malformed(m: impl Into<String>) -> Error {
    Error::Epoch(m.into())
}

/// The hash of a patch's range as it will be once committed — the committed copy with the
/// patch's words in place — reading the committed copy [`PATCH_CHUNK`] bytes at a time
/// (never the whole range in one buffer). Checks the range and every run first.
fn hash_patched(r: &PageRange, mem_size: u64, base: BaseReader<'_>) -> Result<[u8; 16]> {
    check_range(r, mem_size)?;
    let len = r.len();
    // (byte offset in the range, new bytes), in order, none overlapping: checked here.
    let mut runs: Vec<(usize, &[u8])> = Vec::new();
    patch_runs(r.gpa, &r.payload, len / 8, |w, b| runs.push((w * 8, b)))?;
    let mut h = RangeHasher::new(r.gpa);
    let mut buf = [0u8; PATCH_CHUNK];
    let mut next = 0;
    for start in (0..len).step_by(PATCH_CHUNK) {
        let end = (start + PATCH_CHUNK).min(len);
        let chunk = &mut buf[..end - start];
        if !base(r.gpa + start as u64, chunk) {
            return Err(malformed(format!(
                "patch at {:#x} without a committed copy of its pages",
                r.gpa
            )));
        }
        while let Some(&(at, bytes)) = runs.get(next) {
            if at >= end {
                break;
            }
            let run_end = at + bytes.len();
            let (lo, hi) = (at.max(start), run_end.min(end));
            chunk[lo - start..hi - start].copy_from_slice(&bytes[lo - at..hi - at]);
            if run_end > end {
                break; // the rest of this run is in the next chunk
            }
            next += 1;
        }
        h.update(chunk);
    }
    Ok(h.finish())
}

impl Staging {
    /// Starts staging an epoch that declares `pages` dirty pages, for a memory of `mem_size`.
    pub fn begin(fence: Fence, pages: u64, mem_size: u64) -> Result<Self> {
        if pages > mem_size / 4096 {
            return Err(malformed(format!(
                "epoch declares {pages} pages, memory has {}",
                mem_size / 4096
            )));
        }
        Ok(Staging {
            fence,
            declared_pages: pages,
            mem_size,
            ranges: Vec::new(),
            hashes: Vec::new(),
            pages: 0,
            sections: Snapshot::default(),
            state_bytes: 0,
            records: Vec::new(),
        })
    }

    /// The epoch.
    pub fn fence(&self) -> Fence {
        self.fence
    }

    /// Decodes a batch of ranges into the staging area (every check of
    /// [`transport::pages::decode_range`]; more pages than declared is refused).
    pub fn pages(&mut self, batch: Vec<PageRange>) -> Result<()> {
        self.pages_with(batch, &|_, _| false)
    }

    /// [`Staging::pages`] with `base(gpa, buf)` reading the committed copy of the pages an
    /// XOR range or a patch is against (false where there is none: such a range is refused,
    /// and nothing of the batch is staged). Ranges are decoded and hashed on every core; a
    /// patch stays a patch (its hash reads the committed copy a chunk at a time).
    pub fn pages_with(&mut self, batch: Vec<PageRange>, base: BaseReader<'_>) -> Result<()> {
        let n: u64 = batch.iter().map(|r| r.pages as u64).sum();
        if self.pages + n > self.declared_pages {
            return Err(malformed(format!(
                "more pages than the {} declared",
                self.declared_pages
            )));
        }
        let mem_size = self.mem_size;
        let prev = |gpa: u64, len: usize| {
            let mut v = vec![0u8; len];
            base(gpa, &mut v).then_some(v)
        };
        let staged = batch
            .into_par_iter()
            .map(|r| {
                if r.codec == Codec::Patch {
                    let h = hash_patched(&r, mem_size, base)?;
                    return Ok((StagedRange::Patch(r), h));
                }
                let (gpa, bytes) = decode_range_owned(r, mem_size, &prev)?;
                let h = range_hash(gpa, &bytes);
                Ok((StagedRange::Bytes(gpa, bytes), h))
            })
            .collect::<Result<Vec<_>>>()?;
        self.pages += n;
        for (r, h) in staged {
            self.ranges.push(r);
            self.hashes.push(h);
        }
        Ok(())
    }

    /// Takes one state section (or a vCPU's held output, `records/<v>`).
    pub fn section(&mut self, name: &str, version: u32, data: Vec<u8>) -> Result<()> {
        self.state_bytes += data.len();
        if self.state_bytes > MAX_STATE_BYTES || self.sections.names().len() >= MAX_SECTIONS {
            return Err(malformed("more state than an epoch may carry"));
        }
        if let Some(v) = name.strip_prefix(RECORDS_PREFIX) {
            let v: usize = v
                .parse()
                .map_err(|_| malformed(format!("bad records section {name:?}")))?;
            if v >= 256 {
                return Err(malformed(format!("records of vCPU {v}")));
            }
            let recs: Vec<Record> = postcard::from_bytes(&data)
                .map_err(|e| malformed(format!("records of vCPU {v}: {e}")))?;
            if self.records.len() <= v {
                self.records.resize(v + 1, Vec::new());
            }
            if self.records[v].len() + recs.len() > MAX_RECORDS {
                return Err(malformed(format!("too many records for vCPU {v}")));
            }
            self.records[v].extend(recs);
            return Ok(());
        }
        self.sections
            .push(Section {
                name: name.to_string(),
                version,
                data,
            })
            .map_err(|e| malformed(e.to_string()))
    }

    /// Ends the epoch: the fence, range count and digest must match what arrived, and the
    /// state must describe `vcpus` vCPUs.
    pub fn end(self, fence: Fence, ranges: u64, digest: [u8; 32], vcpus: u32) -> Result<Staged> {
        self.check_pages(fence, ranges, digest)?;
        self.check_state(vcpus)
    }

    /// Ends a pre-copy round (pages only): fence, range count and digest must match.
    /// The round's disk sections (`disk-writes/<d>/<p>`, the only state a round may carry)
    /// come back beside its pages.
    #[allow(clippy::type_complexity)]
    pub fn end_pages(
        self,
        fence: Fence,
        ranges: u64,
        digest: [u8; 32],
    ) -> Result<(Vec<(u64, transport::Bytes)>, Vec<Section>)> {
        self.check_pages(fence, ranges, digest)?;
        let disk = |s: &Section| {
            matches!(
                checkpoint::SectionId::parse(&s.name),
                checkpoint::SectionId::DiskWrites { .. }
            )
        };
        if !self.sections.iter().all(disk) || !self.records.is_empty() {
            return Err(malformed("state inside a pre-copy round"));
        }
        let sections = self.sections.iter().cloned().collect();
        let ranges = self
            .ranges
            .into_iter()
            .map(|r| match r {
                StagedRange::Bytes(gpa, data) => Ok((gpa, data)),
                StagedRange::Patch(r) => Err(malformed(format!(
                    "a patch at {:#x} inside a pre-copy round",
                    r.gpa
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((ranges, sections))
    }

    /// What arrived so far: the range count and the digest of the pages (what an end that
    /// matches them must carry).
    pub fn received(&self) -> (u64, [u8; 32]) {
        (
            self.ranges.len() as u64,
            combine_hashes(self.hashes.iter().copied()),
        )
    }

    fn check_pages(&self, fence: Fence, ranges: u64, digest: [u8; 32]) -> Result<()> {
        if fence != self.fence {
            return Err(malformed(format!(
                "epoch ends with {fence:?}, began with {:?}",
                self.fence
            )));
        }
        if ranges != self.ranges.len() as u64 || self.pages != self.declared_pages {
            return Err(malformed(format!(
                "truncated epoch: {} of {ranges} ranges, {} of {} pages arrived",
                self.ranges.len(),
                self.pages,
                self.declared_pages
            )));
        }
        if combine_hashes(self.hashes.iter().copied()) != digest {
            return Err(malformed(
                "page digest mismatch: the epoch's pages are damaged",
            ));
        }
        Ok(())
    }

    fn check_state(self, vcpus: u32) -> Result<Staged> {
        for v in 0..vcpus {
            if self.sections.get(&format!("vcpu/{v}")).is_none() {
                return Err(malformed(format!("no state for vCPU {v}")));
            }
        }
        for needed in ["groups", "group/config"] {
            if self.sections.get(needed).is_none() {
                return Err(malformed(format!("no {needed} section")));
            }
        }
        let mut records = self.records;
        if records.len() > vcpus as usize {
            return Err(malformed("records for a vCPU the VM does not have"));
        }
        records.resize(vcpus as usize, Vec::new());
        Ok(Staged {
            fence: self.fence,
            ranges: self.ranges,
            sections: self.sections,
            records,
        })
    }
}

/// Bytes of a [`Base`] allocated at a time (only chunks that hold a written page exist).
const BASE_CHUNK: usize = 2 << 20;

/// A full sync being assembled from pre-copy rounds: memory only, nothing committed. The
/// epoch that completes the sync writes it into the replica together with its own pages.
///
/// The image is allocated in chunks of 2 MiB as pages arrive, so a `FullSync` announcing a
/// large memory costs a bitmap, not the memory, until the pages come.
pub struct Base {
    size: u64,
    chunks: Vec<Option<Box<[u8]>>>,
    touched: Vec<u64>,
    /// The rounds' disk writes (`disk-writes/<d>/<p>` sections), in the order they came.
    disks: Vec<Section>,
    /// Their bytes.
    disk_bytes: u64,
    /// Rounds applied.
    pub rounds: u32,
    /// Pages received over all rounds.
    pub pages: u64,
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("size", &self.size)
            .field("rounds", &self.rounds)
            .field("pages", &self.pages)
            .field("disk_bytes", &self.disk_bytes)
            .finish_non_exhaustive()
    }
}

impl Base {
    /// An empty image of `mem_size` bytes (zero pages cost nothing until written).
    pub fn new(mem_size: u64) -> Self {
        let pages = mem_size / 4096;
        let chunks = (mem_size as usize).div_ceil(BASE_CHUNK);
        Base {
            size: mem_size,
            chunks: std::iter::repeat_with(|| None).take(chunks).collect(),
            touched: vec![0; pages.div_ceil(64) as usize],
            disks: Vec::new(),
            disk_bytes: 0,
            rounds: 0,
            pages: 0,
        }
    }

    /// Keeps a verified round's disk sections (decoded and checked against the replica's
    /// disks when the completing epoch commits), at most [`MAX_BASE_DISK_BYTES`] in all.
    pub fn keep_disks(&mut self, sections: Vec<Section>) -> Result<()> {
        let bytes: u64 = sections.iter().map(|s| s.data.len() as u64).sum();
        if self.disk_bytes + bytes > MAX_BASE_DISK_BYTES {
            return Err(malformed(format!(
                "a pre-copy of more than {MAX_BASE_DISK_BYTES} bytes of disk"
            )));
        }
        self.disk_bytes += bytes;
        self.disks.extend(sections);
        Ok(())
    }

    /// Disk bytes kept.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Writes a verified round's pages (bounds were checked when they were decoded).
    pub fn apply(&mut self, ranges: Vec<(u64, transport::Bytes)>) -> Result<()> {
        for (gpa, data) in ranges {
            let end = gpa.checked_add(data.len() as u64);
            if end.is_none_or(|e| e > self.size) || gpa % 4096 != 0 || data.len() % 4096 != 0 {
                return Err(malformed(format!(
                    "pre-copy range at {gpa:#x} outside memory"
                )));
            }
            for (i, page) in data.chunks(4096).enumerate() {
                let p = gpa as usize / 4096 + i;
                let touched = self.touched[p / 64] >> (p % 64) & 1 == 1;
                // Untouched pages are zero already: skip zero pages there (keeps them free).
                if touched || page.iter().any(|b| *b != 0) {
                    let at = p * 4096;
                    let chunk = self.chunks[at / BASE_CHUNK]
                        .get_or_insert_with(|| vec![0u8; BASE_CHUNK].into_boxed_slice());
                    chunk[at % BASE_CHUNK..at % BASE_CHUNK + 4096].copy_from_slice(page);
                    self.touched[p / 64] |= 1 << (p % 64);
                }
                self.pages += 1;
            }
        }
        self.rounds += 1;
        Ok(())
    }

    /// Copies every written page into `mem`.
    pub fn write_into(&self, mem: &GuestMem) -> Result<()> {
        let runs = monitor::module::dirty_runs(&self.touched, self.size / 4096);
        runs.par_iter()
            .try_for_each(|&(first, n)| {
                // A run may cross chunks: write it chunk by chunk (a touched page's chunk
                // exists).
                let mut at = (first * 4096) as usize;
                let end = at + (n * 4096) as usize;
                while at < end {
                    let upto = end.min((at / BASE_CHUNK + 1) * BASE_CHUNK);
                    let chunk = self.chunks[at / BASE_CHUNK]
                        .as_deref()
                        .expect("a touched page has its chunk");
                    mem.write_slice(
                        &chunk[at % BASE_CHUNK..at % BASE_CHUNK + (upto - at)],
                        GuestAddress(at as u64),
                    )?;
                    at = upto;
                }
                Ok(())
            })
            .map_err(|e: vm_memory::GuestMemoryError| {
                Error::Epoch(format!("writing the pre-copied image: {e}"))
            })
    }
}

/// The standby's committed image: guest memory (in the VM, ready to run) and the state of the
/// last committed epoch.
pub struct Replica {
    mem: GuestMem,
    /// The replicas of the primary's writable disks: (window, image, size in bytes).
    disks: Vec<(u32, std::fs::File, u64)>,
    /// The last committed epoch.
    pub fence: Fence,
    /// Its state.
    pub state: Snapshot,
    /// Output of the last committed epochs, oldest first.
    pub retained: VecDeque<(u64, Vec<Vec<Record>>)>,
    /// Epochs committed.
    pub commits: u64,
}

impl Replica {
    /// Reads the committed image: the base of the primary's XOR deltas.
    pub fn xor_base(&self) -> XorBase {
        let mem = self.mem.clone();
        XorBase(std::sync::Arc::new(move |gpa, buf| {
            mem.read_slice(buf, GuestAddress(gpa)).is_ok()
        }))
    }

    /// A replica whose memory is `mem` (already holding the first epoch's pages or not).
    pub fn new(mem: GuestMem) -> Self {
        Replica {
            mem,
            disks: Vec::new(),
            fence: Fence::default(),
            state: Snapshot::default(),
            retained: VecDeque::new(),
            commits: 0,
        }
    }

    /// The replica's memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Opens the disk replicas (window, image path) the epochs' `disk-writes/<i>` sections
    /// are written into.
    pub fn with_disks(mut self, images: &[(u32, std::path::PathBuf)]) -> Result<Self> {
        for (i, path) in images {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| {
                    Error::Epoch(format!(
                        "cannot open the disk replica {}: {e} (give the standby --disk FILE \
                         of the primary's size)",
                        path.display()
                    ))
                })?;
            let len = f
                .metadata()
                .map_err(|e| Error::Epoch(format!("disk replica {}: {e}", path.display())))?
                .len();
            self.disks.push((*i, f, len));
        }
        Ok(self)
    }

    /// Applies a verified epoch: its pages, its disk writes and its state together. Every
    /// range was bound-checked against this memory when it was decoded and every disk write
    /// is decoded and checked against its replica before anything is written, so a bad epoch
    /// changes nothing.
    pub fn commit(&mut self, staged: Staged) -> Result<()> {
        let (sections, disks) = self.split_disk_writes(&staged)?;
        staged
            .ranges
            .par_iter()
            .try_for_each(|r| match r {
                StagedRange::Bytes(gpa, data) => self
                    .mem
                    .write_slice(data, GuestAddress(*gpa))
                    .map_err(|e| e.to_string()),
                StagedRange::Patch(p) => {
                    let mut wrote = Ok(());
                    patch_runs(p.gpa, &p.payload, p.len() / 8, |w, b| {
                        if wrote.is_ok() {
                            wrote = self
                                .mem
                                .write_slice(b, GuestAddress(p.gpa + (w * 8) as u64));
                        }
                    })
                    .map_err(|e| e.to_string())?;
                    wrote.map_err(|e| e.to_string())
                }
            })
            .map_err(|e| Error::Epoch(format!("commit: {e}")))?;
        for (d, w) in disks {
            w.apply(&self.disks[d].1).map_err(|e| {
                Error::Epoch(format!("writing disk replica {}: {e}", self.disks[d].0))
            })?;
        }
        self.fence = staged.fence;
        self.state = sections;
        self.retained
            .push_back((staged.fence.epoch.0, staged.records));
        while self.retained.len() > RETAINED_EPOCHS {
            self.retained.pop_front();
        }
        self.commits += 1;
        Ok(())
    }

    /// Syncs the replica's disks (`fdatasync`): a standby taking over does so before it
    /// releases anything, since from then on its copy is the only one.
    pub fn sync_disks(&self) -> Result<()> {
        for (i, f, _) in &self.disks {
            f.sync_data()
                .map_err(|e| Error::Epoch(format!("syncing disk replica {i}: {e}")))?;
        }
        Ok(())
    }

    /// Checks an epoch's disk writes against this replica's disks without writing anything
    /// (a hostile primary's bad section is refused before the commit).
    pub fn check(&self, base: Option<&Base>, staged: &Staged) -> Result<()> {
        if let Some(b) = base {
            self.decode_disk_writes(&b.disks)?;
        }
        self.split_disk_writes(staged).map(|_| ())
    }

    /// Decodes and checks disk-writes sections against this replica's disks.
    fn decode_disk_writes(
        &self,
        sections: &[Section],
    ) -> Result<Vec<(usize, devices::virtio::block::DiskWrites)>> {
        let mut out = Vec::new();
        for s in sections {
            let checkpoint::SectionId::DiskWrites { disk: i, .. } =
                checkpoint::SectionId::parse(&s.name)
            else {
                return Err(Error::Epoch(format!("{:?} is not a disk's writes", s.name)));
            };
            let Some(d) = self.disks.iter().position(|d| d.0 == i) else {
                return Err(Error::Epoch(format!(
                    "the primary writes disk {i}, and this standby has no replica of it (give \
                     it --disk)"
                )));
            };
            let w = devices::virtio::block::DiskWrites::decode(&s.data, self.disks[d].2)
                .map_err(|e| Error::Epoch(format!("disk {i}: {e}")))?;
            out.push((d, w));
        }
        Ok(out)
    }

    /// The epoch's state without its disk writes, and the decoded, checked disk writes
    /// (index into the replica's disks, writes).
    #[allow(clippy::type_complexity)]
    fn split_disk_writes(
        &self,
        staged: &Staged,
    ) -> Result<(Snapshot, Vec<(usize, devices::virtio::block::DiskWrites)>)> {
        let mut sections = Snapshot::default();
        let mut disk_sections = Vec::new();
        for s in staged.sections.iter() {
            if matches!(
                checkpoint::SectionId::parse(&s.name),
                checkpoint::SectionId::DiskWrites { .. }
            ) {
                disk_sections.push(s.clone());
            } else {
                sections
                    .push(s.clone())
                    .map_err(|e| Error::Epoch(format!("commit: {e}")))?;
            }
        }
        Ok((sections, self.decode_disk_writes(&disk_sections)?))
    }

    /// Commits the epoch that completes a full sync: the pre-copied image (if any) goes in
    /// first, then the epoch itself (see [`Replica::commit`]).
    /// The base's disk rounds go into the replica's disks in the order they came (round 0
    /// rebuilds a disk from zeros), before the epoch's own writes.
    pub fn complete(&mut self, base: Option<Base>, staged: Staged) -> Result<()> {
        if let Some(b) = base {
            let disks = self.decode_disk_writes(&b.disks)?;
            b.write_into(&self.mem)?;
            for (d, w) in disks {
                w.apply(&self.disks[d].1).map_err(|e| {
                    Error::Epoch(format!("writing disk replica {}: {e}", self.disks[d].0))
                })?;
            }
            log::info!(
                "pre-copied image of {} rounds, {} pages and {} KiB of disk, written into the \
                 replica",
                b.rounds,
                b.pages,
                b.disk_bytes >> 10
            );
        }
        self.commit(staged)
    }

    /// The output of the retained epochs, per vCPU, oldest first.
    pub fn inherited_output(&self, vcpus: u32) -> Vec<Vec<Record>> {
        let mut out = vec![Vec::new(); vcpus as usize];
        for (_, recs) in &self.retained {
            for (v, r) in recs.iter().enumerate().take(vcpus as usize) {
                out[v].extend_from_slice(r);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint::digest::pages_digest;
    use sha2::{Digest, Sha256};
    use transport::pages::encode_range;
    use transport::{Epoch, Generation};
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn fence(e: u64) -> Fence {
        Fence {
            generation: Generation(1),
            epoch: Epoch(e),
        }
    }

    fn state(st: &mut Staging) {
        st.section("vcpu/0", 1, vec![1, 2, 3]).unwrap();
        st.section("groups", 1, vec![0]).unwrap();
        st.section("group/config", 1, vec![7]).unwrap();
    }

    #[test]
    fn disk_writes_commit_with_the_pages_and_a_bad_one_changes_nothing() {
        use devices::virtio::block::DiskWrites;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica");
        std::fs::write(&path, vec![5u8; 64 * 1024]).unwrap();
        let mut r = Replica::new(mem())
            .with_disks(&[(0, path.clone())])
            .unwrap();
        let staged = |e: u64, writes: &DiskWrites, page: u8| Staged {
            fence: fence(e),
            ranges: vec![StagedRange::Bytes(0, vec![page; 4096].into())],
            sections: {
                let mut s = Snapshot::default();
                s.push(Section {
                    name: "vcpu/0".into(),
                    version: 1,
                    data: vec![1],
                })
                .unwrap();
                s.push(Section {
                    name: checkpoint::SectionId::DiskWrites { disk: 0, part: 0 }.name(),
                    version: 1,
                    data: postcard::to_stdvec(writes).unwrap(),
                })
                .unwrap();
                s
            },
            records: vec![],
        };
        let good = DiskWrites {
            full: true,
            capacity: 64 * 1024,
            runs: vec![(4096, vec![9u8; 4096])],
        };
        r.commit(staged(1, &good, 1)).unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert!(
            disk[..4096].iter().all(|&b| b == 0),
            "a full sync zeroes the replica"
        );
        assert!(disk[4096..8192].iter().all(|&b| b == 9));
        assert!(
            r.state.get("disk-writes/0/0").is_none(),
            "disk writes are not state"
        );
        assert!(r.state.get("vcpu/0").is_some());
        // Past the end of the disk: refused by check and by commit, nothing written.
        let bad = DiskWrites {
            full: false,
            capacity: 64 * 1024,
            runs: vec![(60 * 1024, vec![1u8; 8192])],
        };
        let before = hash(r.memory());
        assert!(r.check(None, &staged(2, &bad, 2)).is_err());
        assert!(r.commit(staged(2, &bad, 2)).is_err());
        assert_eq!(hash(r.memory()), before, "memory untouched");
        assert_eq!(std::fs::read(&path).unwrap(), disk, "disk untouched");
        assert_eq!(r.fence, fence(1));
        // A disk this replica does not have.
        let mut other = Replica::new(mem());
        assert!(other.check(None, &staged(1, &good, 1)).is_err());
        assert!(other.commit(staged(1, &good, 1)).is_err());
    }

    /// A pre-copy's disk rounds stay with the base until the completing epoch commits, then
    /// go in order (round 0 rebuilds the disk from zeros), before the epoch's own writes; a
    /// bad one is refused by the check, before anything is written.
    #[test]
    fn precopied_disk_rounds_go_in_with_the_completing_epoch_in_order() {
        use devices::virtio::block::DiskWrites;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica");
        std::fs::write(&path, vec![5u8; 64 * 1024]).unwrap();
        let mut r = Replica::new(mem())
            .with_disks(&[(0, path.clone())])
            .unwrap();
        let section = |w: &DiskWrites| Section {
            name: checkpoint::SectionId::DiskWrites { disk: 0, part: 0 }.name(),
            version: 1,
            data: postcard::to_stdvec(w).unwrap(),
        };
        // Round 0 (full) and round 1, each a verified round with one page and a disk part.
        let mut base = Base::new(1 << 20);
        for (round, w) in [
            DiskWrites {
                full: true,
                capacity: 64 * 1024,
                runs: vec![(0, vec![1u8; 8192])],
            },
            DiskWrites {
                full: false,
                capacity: 64 * 1024,
                runs: vec![(4096, vec![2u8; 4096])],
            },
        ]
        .iter()
        .enumerate()
        {
            let page = vec![round as u8 + 1; 4096];
            let mut st = Staging::begin(fence(1), 1, 1 << 20).unwrap();
            st.pages(vec![encode_range(0, &page, None)]).unwrap();
            let s = section(w);
            st.section(&s.name, s.version, s.data).unwrap();
            let (pages, disks) = st
                .end_pages(fence(1), 1, pages_digest(&[(0, &page)]))
                .unwrap();
            assert_eq!(
                disks.len(),
                1,
                "the round's disk part comes back beside its pages"
            );
            base.apply(pages).unwrap();
            base.keep_disks(disks).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![5u8; 64 * 1024],
            "nothing yet"
        );
        // The completing epoch writes block 2.
        let mut sections = Snapshot::default();
        sections
            .push(section(&DiskWrites {
                full: false,
                capacity: 64 * 1024,
                runs: vec![(8192, vec![3u8; 4096])],
            }))
            .unwrap();
        let staged = Staged {
            fence: fence(1),
            ranges: vec![],
            sections,
            records: vec![],
        };
        // A base with a disk part past the disk's end is refused before anything is written.
        let mut bad = Base::new(1 << 20);
        bad.keep_disks(vec![section(&DiskWrites {
            full: false,
            capacity: 64 * 1024,
            runs: vec![(64 * 1024, vec![1u8; 4096])],
        })])
        .unwrap();
        assert!(r.check(Some(&bad), &staged).is_err());
        r.check(Some(&base), &staged).unwrap();
        r.complete(Some(base), staged).unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert!(disk[..4096].iter().all(|&b| b == 1), "round 0");
        assert!(
            disk[4096..8192].iter().all(|&b| b == 2),
            "round 1 over round 0"
        );
        assert!(
            disk[8192..12288].iter().all(|&b| b == 3),
            "the epoch's own write"
        );
        assert!(
            disk[12288..].iter().all(|&b| b == 0),
            "round 0 rebuilt from zeros"
        );
        // Any other state inside a round is refused.
        let mut st = Staging::begin(fence(1), 0, 1 << 20).unwrap();
        st.section("vcpu/0", 1, vec![1]).unwrap();
        assert!(st.end_pages(fence(1), 0, pages_digest(&[])).is_err());
    }

    fn hash(m: &GuestMem) -> [u8; 32] {
        let mut b = vec![0u8; 1 << 20];
        m.read_slice(&mut b, GuestAddress(0)).unwrap();
        Sha256::digest(&b).into()
    }

    #[test]
    fn xor_deltas_and_patches_decode_against_the_committed_image_and_a_missing_base_is_refused() {
        let m = mem();
        // The committed copy of pages 3 and 4, and the guest's next version of them: a few
        // bytes moved, one run crossing the pages' boundary and the patch hash's chunks.
        let old: Vec<u8> = (0..2 * 4096u32).map(|i| (i * 7) as u8).collect();
        let mut new = old.clone();
        new[100..108].copy_from_slice(b"changed!");
        new[4090..4102].copy_from_slice(b"across pages");
        let xor = transport::pages::encode_range_with(3 * 4096, &new, Some(&old), Codec::XorZstd);
        let patch = encode_range(3 * 4096, &new, Some(&old));
        assert_eq!(patch.codec, Codec::Patch, "a patch for a few changed words");
        for r in [xor, patch] {
            let mut replica = Replica::new(m.clone());
            m.write_slice(&old, GuestAddress(3 * 4096)).unwrap();
            // Without a base: refused, nothing staged.
            let mut st = Staging::begin(fence(2), 2, 1 << 20).unwrap();
            let e = st
                .pages_with(vec![r.clone()], &|_, _| false)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("without a previous copy") || e.contains("without a committed copy"),
                "{e}"
            );
            assert_eq!(st.pages, 0);
            // A base outside memory reads as none.
            let base = replica.xor_base();
            assert!(!(base.0)(2 << 20, &mut [0u8; 4096]));
            // With the committed image as base: the new pages, exactly.
            let mut st = Staging::begin(fence(2), 2, 1 << 20).unwrap();
            st.pages_with(vec![r.clone()], &*base.0).unwrap();
            state(&mut st);
            let digest = pages_digest(&[(3 * 4096, &new)]);
            assert_eq!(st.received(), (1, digest));
            let staged = st.end(fence(2), 1, digest, 1).unwrap();
            replica.commit(staged).unwrap();
            let mut back = vec![0u8; 2 * 4096];
            m.read_slice(&mut back, GuestAddress(3 * 4096)).unwrap();
            assert_eq!(back, new, "{:?}", r.codec);
        }
    }

    /// CPU time of the standby's staging (decode + hash) and commit of one epoch: a 16 MiB
    /// hot set whose pages each changed in one qword (what `stall-probe` dirties), sent as
    /// patches and as XOR deltas.
    /// `cargo test -p ft --release --lib -- --ignored --nocapture standby_apply_cpu`.
    #[test]
    #[ignore = "a measurement: run by hand"]
    fn standby_apply_cpu() {
        let cpu = crate::process_cpu;
        const MIB: usize = 16;
        let m: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let mut replica = Replica::new(m.clone());
        let base = replica.xor_base();
        let mut mem: Vec<u8> = (0..MIB << 20).map(|i| (i * 31 % 251) as u8).collect();
        m.write_slice(&mem, GuestAddress(0)).unwrap();
        for codec in [Codec::Patch, Codec::XorZstd] {
            let (mut stage, mut commit, n) =
                (std::time::Duration::ZERO, std::time::Duration::ZERO, 40u64);
            for e in 1..=n {
                let old = mem.clone();
                for page in 0..(MIB << 20) / 4096 {
                    mem[page * 4096 + (e as usize * 8) % 4096] ^= 0x5a;
                }
                let ranges: Vec<PageRange> = mem
                    .chunks(2 << 20)
                    .zip(old.chunks(2 << 20))
                    .enumerate()
                    .map(|(i, (d, o))| {
                        transport::pages::encode_range_with((i << 21) as u64, d, Some(o), codec)
                    })
                    .collect();
                let parts: Vec<(u64, &[u8])> = mem
                    .chunks(2 << 20)
                    .enumerate()
                    .map(|(i, d)| ((i << 21) as u64, d))
                    .collect();
                let digest = pages_digest(&parts);
                let t = cpu();
                let mut st = Staging::begin(fence(e), (MIB << 20) as u64 / 4096, 32 << 20).unwrap();
                st.pages_with(ranges, &*base.0).unwrap();
                state(&mut st);
                let staged = st.end(fence(e), (MIB / 2) as u64, digest, 1).unwrap();
                stage += cpu() - t;
                let t = cpu();
                replica.commit(staged).unwrap();
                commit += cpu() - t;
            }
            let mut back = vec![0u8; MIB << 20];
            m.read_slice(&mut back, GuestAddress(0)).unwrap();
            assert!(back == mem, "the replica holds the pages sent");
            println!(
                "{MIB} MiB epoch as {codec:?}, CPU per epoch: staging {:.2} ms, commit {:.2} ms",
                stage.as_secs_f64() * 1e3 / n as f64,
                commit.as_secs_f64() * 1e3 / n as f64
            );
        }
    }

    /// A patch's hash reads the committed copy in chunks: runs inside one chunk, across two,
    /// and at both ends of a 2 MiB range hash as the patched bytes do.
    #[test]
    fn a_patch_hashes_as_its_patched_pages_across_chunks() {
        let m: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let replica = Replica::new(m.clone());
        let old: Vec<u8> = (0..2usize << 20).map(|i| (i * 13 % 241) as u8).collect();
        m.write_slice(&old, GuestAddress(1 << 20)).unwrap();
        let mut new = old.clone();
        for at in [
            0,
            8,
            PATCH_CHUNK - 16,
            PATCH_CHUNK + 8,
            5 * PATCH_CHUNK - 8,
            new.len() - 8,
        ] {
            let end = (at + 16).min(new.len());
            new[at..end].fill(0xee);
        }
        let r = encode_range(1 << 20, &new, Some(&old));
        assert_eq!(r.codec, Codec::Patch);
        let base = replica.xor_base();
        assert_eq!(
            hash_patched(&r, 4 << 20, &*base.0).unwrap(),
            range_hash(1 << 20, &new)
        );
    }

    #[test]
    fn a_good_epoch_commits_and_a_bad_one_changes_nothing() {
        let m = mem();
        let mut rep = Replica::new(m.clone());
        let page = vec![0xabu8; 8192];
        let r = encode_range(0x2000, &page, None);
        let digest = pages_digest(&[(0x2000, &page)]);
        let mut st = Staging::begin(fence(1), 2, 1 << 20).unwrap();
        st.pages(vec![r.clone()]).unwrap();
        state(&mut st);
        rep.commit(st.end(fence(1), 1, digest, 1).unwrap()).unwrap();
        let before = hash(&m);
        let state_before = rep.state.clone();

        let other = vec![0xcdu8; 4096];
        let r2 = encode_range(0x2000, &other, None);
        // Wrong digest.
        let mut st = Staging::begin(fence(2), 1, 1 << 20).unwrap();
        st.pages(vec![r2.clone()]).unwrap();
        state(&mut st);
        assert!(st
            .end(fence(2), 1, [0; 32], 1)
            .unwrap_err()
            .to_string()
            .contains("digest"));
        // Truncated: one range promised more.
        let mut st = Staging::begin(fence(2), 2, 1 << 20).unwrap();
        st.pages(vec![r2.clone()]).unwrap();
        state(&mut st);
        let d2 = pages_digest(&[(0x2000, &other)]);
        assert!(st
            .end(fence(2), 2, d2, 1)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        // A range outside memory.
        let mut st = Staging::begin(fence(2), 1, 1 << 20).unwrap();
        let far = encode_range(1 << 20, &other, None);
        assert!(st.pages(vec![far]).is_err());
        // More pages than declared.
        let mut st = Staging::begin(fence(2), 0, 1 << 20).unwrap();
        assert!(st.pages(vec![r2.clone()]).is_err());
        // Missing vCPU state.
        let mut st = Staging::begin(fence(2), 1, 1 << 20).unwrap();
        st.pages(vec![r2.clone()]).unwrap();
        assert!(st.end(fence(2), 1, d2, 1).is_err());
        // Bad records section.
        let mut st = Staging::begin(fence(2), 1, 1 << 20).unwrap();
        assert!(st.section("records/x", 1, vec![]).is_err());
        assert!(st.section("records/0", 1, vec![0xff; 9]).is_err());

        assert_eq!(hash(&m), before, "a refused epoch changed memory");
        assert_eq!(rep.state, state_before);
        assert_eq!(rep.fence, fence(1));

        // And the next good epoch still commits.
        let mut st = Staging::begin(fence(2), 1, 1 << 20).unwrap();
        st.pages(vec![r2.clone()]).unwrap();
        state(&mut st);
        let rec = Record {
            seq: 5,
            ..Record::default()
        };
        st.section("records/0", 1, postcard::to_stdvec(&vec![rec]).unwrap())
            .unwrap();
        rep.commit(st.end(fence(2), 1, d2, 1).unwrap()).unwrap();
        assert_ne!(hash(&m), before);
        assert_eq!(rep.inherited_output(1), vec![vec![rec]]);
    }

    #[test]
    fn pre_copy_rounds_verify_and_count_only_through_write_into() {
        let m = mem();
        let mut base = Base::new(1 << 20);
        // Round 0: a data page and a zero page.
        let data = vec![0x5au8; 4096];
        let zero = vec![0u8; 4096];
        let ranges = [
            encode_range(0x1000, &data, None),
            encode_range(0x3000, &zero, None),
        ];
        let digest = pages_digest(&[(0x1000, &data), (0x3000, &zero)]);
        let mut st = Staging::begin(fence(1), 2, 1 << 20).unwrap();
        st.pages(ranges.to_vec()).unwrap();
        base.apply(st.end_pages(fence(1), 2, digest).unwrap().0)
            .unwrap();
        // A damaged round is refused whole.
        let mut st = Staging::begin(fence(1), 1, 1 << 20).unwrap();
        st.pages(ranges[..1].to_vec()).unwrap();
        assert!(st.end_pages(fence(1), 1, [0; 32]).is_err());
        // A round with state in it is refused.
        let mut st = Staging::begin(fence(1), 0, 1 << 20).unwrap();
        st.section("vcpu/0", 1, vec![1]).unwrap();
        assert!(st.end_pages(fence(1), 0, pages_digest(&[])).is_err());
        // Round 1 rewrites the data page with zeros: a touched page takes zeros too.
        let mut st = Staging::begin(fence(1), 1, 1 << 20).unwrap();
        st.pages(vec![encode_range(0x1000, &zero, None)]).unwrap();
        base.apply(
            st.end_pages(fence(1), 1, pages_digest(&[(0x1000, &zero)]))
                .unwrap()
                .0,
        )
        .unwrap();
        assert_eq!((base.rounds, base.pages), (2, 3));
        // Nothing reached memory until write_into.
        let mut b = vec![0u8; 4096];
        m.write_slice(&[0x11u8; 4096], GuestAddress(0x1000))
            .unwrap();
        base.write_into(&m).unwrap();
        m.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, zero);
        // Out-of-range pages cannot get in.
        assert!(base.apply(vec![(1 << 20, vec![0u8; 4096].into())]).is_err());
    }

    #[test]
    fn a_base_is_allocated_as_pages_come_and_writes_runs_across_chunks() {
        // A huge announced memory costs no memory until pages arrive.
        let huge = Base::new(1 << 40);
        assert!(huge.chunks.iter().all(Option::is_none));
        let m: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut base = Base::new(4 << 20);
        let at = (2 << 20) - 8192;
        let data: Vec<u8> = (0..16384).map(|i| (i / 4096 + 1) as u8).collect();
        base.apply(vec![(at, data.clone().into())]).unwrap();
        assert_eq!(base.chunks.iter().filter(|c| c.is_some()).count(), 2);
        base.write_into(&m).unwrap();
        let mut b = vec![0u8; 16384];
        m.read_slice(&mut b, GuestAddress(at)).unwrap();
        assert_eq!(b, data);
        assert!(base
            .apply(vec![(u64::MAX - 4095, vec![1u8; 4096].into())])
            .is_err());
    }
}
