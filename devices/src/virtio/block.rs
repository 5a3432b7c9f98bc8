//! virtio-blk on a raw image file.
//!
//! A request is one descriptor chain:
//!
//! ```text
//!  device-readable                                   device-writable
//!  ┌──────────┬──────────┬──────────┬──────────────┐ ┌───────────────────────┬────────┐
//!  │ type u32 │ rsvd u32 │ sector   │ data (OUT)   │ │ data (IN: sectors,    │ status │
//!  │          │          │ u64      │              │ │  GET_ID: 20-byte id)  │ u8     │
//!  └──────────┴──────────┴──────────┴──────────────┘ └───────────────────────┴────────┘
//!   16-byte header, little endian                      the last writable byte is the status
//! ```
//!
//! Descriptor boundaries do not matter (VIRTIO_F_VERSION_1 implies any layout): the readable
//! buffers form one byte stream, the writable ones another. Sectors are 512 bytes; IN and OUT
//! move whole sectors inside the image. Status: OK, IOERR (a fault in the chain, a short
//! header, data in the wrong direction, a length that is not whole sectors, a range past the
//! end, a write to a read-only disk, a host I/O error) or UNSUPP (any other type). A chain
//! with no writable byte for the status is returned with nothing written.
//!
//! Requests are served synchronously, on the thread that took the QueueNotify exit. Every
//! sector written marks its 4 KiB block in a dirty bitmap ([`Block::take_dirty_blocks`]) for
//! disk replication.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::warn;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{self, Chain};
use super::persist::{BlockState, DeviceState};
use super::{Error, GuestMem, Result, VirtioDevice, MAX_CHAIN_DESCRIPTORS, VIRTIO_F_VERSION_1};

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Granularity of the dirty-block bitmap.
pub const DIRTY_BLOCK_SIZE: u64 = 4096;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the request header.
pub const HEADER_SIZE: u64 = 16;
/// Most bytes copied through the host at once.
const CHUNK: usize = 128 << 10;

/// What a block device is given: `FILE[,readonly]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// The raw image.
    pub path: PathBuf,
    /// Refuse writes (and offer VIRTIO_BLK_F_RO).
    pub readonly: bool,
}

const BLOCK_SYNTAX: &str = "FILE[,readonly]";

impl BlockConfig {
    /// Parses `FILE[,readonly]`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Config {
            given: s.to_string(),
            why: why.to_string(),
            expected: BLOCK_SYNTAX,
        };
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad("no image file"));
        }
        let mut readonly = false;
        for opt in parts {
            match opt {
                "readonly" | "ro" => readonly = true,
                o => return Err(bad(&format!("unknown option {o:?}"))),
            }
        }
        Ok(BlockConfig {
            path: path.into(),
            readonly,
        })
    }
}

/// What one disk's guest wrote during one replication epoch: whole 4 KiB blocks
/// ([`DIRTY_BLOCK_SIZE`]) read back from the image while the guest was stunned; for a full
/// sync (`full`), every block that is not all zeros, and the standby's replica starts from an
/// all-zero image of `capacity` bytes.
///
/// ```text
///  section disk-writes/<i>, postcard:  full bool │ capacity u64 │ runs: [ (offset u64, bytes) ]
///  every run: offset a multiple of 4096, length a non-zero multiple of 512, inside capacity
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskWrites {
    /// A full sync: the replica is rebuilt from these runs alone.
    pub full: bool,
    /// The disk's size in bytes.
    pub capacity: u64,
    /// (byte offset, bytes) of each run of written blocks, in offset order.
    pub runs: Vec<(u64, Vec<u8>)>,
}

/// Reads back from `file` (a disk of `capacity` bytes) the 4 KiB `blocks` as runs of
/// [`DiskWrites`]; with `None`, a full sync: every block that is not all zeros. Used with the
/// guest stunned ([`Block::take_writes`]), or while it runs by a pre-copy that took the
/// dirty blocks under the device's lock first (a block the guest writes after that take is
/// dirty again and goes out later).
pub fn read_writes(
    file: &File,
    capacity: u64,
    blocks: Option<Vec<u64>>,
) -> std::io::Result<DiskWrites> {
    let full = blocks.is_none();
    let blocks: Vec<u64> = match blocks {
        Some(b) => b,
        None => (0..capacity.div_ceil(DIRTY_BLOCK_SIZE)).collect(),
    };
    let mut w = DiskWrites {
        full,
        capacity,
        runs: Vec::new(),
    };
    let mut i = 0;
    while i < blocks.len() {
        // A run of consecutive blocks, at most 1 MiB.
        let start = blocks[i];
        let mut n = 1;
        while i + n < blocks.len() && blocks[i + n] == start + n as u64 && n < 256 {
            n += 1;
        }
        i += n;
        let off = start * DIRTY_BLOCK_SIZE;
        if off >= capacity {
            continue;
        }
        let len = (n as u64 * DIRTY_BLOCK_SIZE).min(capacity - off);
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, off)?;
        if !full {
            w.runs.push((off, buf));
            continue;
        }
        // A full sync sends only the blocks that are not all zeros (the replica starts
        // from zeros).
        let bs = DIRTY_BLOCK_SIZE as usize;
        let mut k = 0;
        while k < buf.len() {
            if buf[k..(k + bs).min(buf.len())].iter().all(|&x| x == 0) {
                k += bs;
                continue;
            }
            let from = k;
            while k < buf.len() && buf[k..(k + bs).min(buf.len())].iter().any(|&x| x != 0) {
                k += bs;
            }
            let to = k.min(buf.len());
            w.runs.push((off + from as u64, buf[from..to].to_vec()));
        }
    }
    Ok(w)
}

impl DiskWrites {
    /// Decodes and checks a section from a (hostile) primary against a replica of `capacity`
    /// bytes: every run starting on a block, whole sectors, non-empty and inside the disk.
    pub fn decode(data: &[u8], capacity: u64) -> Result<Self> {
        let w: DiskWrites =
            postcard::from_bytes(data).map_err(|e| Error::State(format!("disk writes: {e}")))?;
        if w.capacity != capacity {
            return Err(Error::State(format!(
                "disk writes for a disk of {} bytes, the replica has {capacity}: give the \
                 standby a --disk of the primary's size",
                w.capacity
            )));
        }
        for (off, bytes) in &w.runs {
            let len = bytes.len() as u64;
            let end = off.checked_add(len);
            if off % DIRTY_BLOCK_SIZE != 0
                || len == 0
                || len % SECTOR_SIZE != 0
                || end.is_none_or(|e| e > capacity)
            {
                return Err(Error::State(format!(
                    "disk writes: a run of {len} bytes at {off} is not whole sectors from a block \
                     boundary inside the \
                     {capacity}-byte disk"
                )));
            }
        }
        Ok(w)
    }

    /// Splits into parts of at most `max` bytes of data each (runs stay whole; a run is at
    /// most 1 MiB); only the first part of a full sync says `full`. At least one part.
    pub fn split(self, max: u64) -> Vec<DiskWrites> {
        let mut parts = vec![DiskWrites {
            full: self.full,
            capacity: self.capacity,
            runs: Vec::new(),
        }];
        let mut bytes = 0u64;
        for run in self.runs {
            let len = run.1.len() as u64;
            if bytes + len > max && bytes > 0 {
                parts.push(DiskWrites {
                    full: false,
                    capacity: self.capacity,
                    runs: Vec::new(),
                });
                bytes = 0;
            }
            bytes += len;
            parts.last_mut().expect("one part at least").runs.push(run);
        }
        parts
    }

    /// Bytes of data.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.1.len() as u64).sum()
    }

    /// Writes the runs into `file` (after zeroing it, for a full sync).
    pub fn apply(&self, file: &File) -> std::io::Result<()> {
        if self.full {
            file.set_len(0)?;
            file.set_len(self.capacity)?;
        }
        for (off, bytes) in &self.runs {
            file.write_all_at(bytes, *off)?;
        }
        Ok(())
    }
}

/// Counters of a block device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests completed (any status).
    pub requests: u64,
    /// Bytes read from the image into the guest.
    pub read_bytes: u64,
    /// Bytes written from the guest to the image.
    pub written_bytes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Of them, completed under speculation (no `fdatasync`: a standby protects the writes).
    pub speculative_flushes: u64,
    /// Requests answered IOERR.
    pub errors: u64,
    /// Requests answered UNSUPP.
    pub unsupported: u64,
    /// Chains without a writable status byte (returned with nothing written).
    pub no_status: u64,
}

/// Which 4 KiB blocks of the image were written since the last [`take`](Self::take).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBlocks {
    bits: Vec<u64>,
    blocks: u64,
    count: u64,
}

impl DirtyBlocks {
    /// A clean bitmap for a disk of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let blocks = bytes.div_ceil(DIRTY_BLOCK_SIZE);
        DirtyBlocks {
            bits: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            count: 0,
        }
    }

    /// Marks the blocks that bytes `[offset, offset + len)` touch.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / DIRTY_BLOCK_SIZE;
        let last = ((offset + len - 1) / DIRTY_BLOCK_SIZE).min(self.blocks.saturating_sub(1));
        for b in first..=last {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if let Some(word) = self.bits.get_mut(w) {
                if *word & bit == 0 {
                    *word |= bit;
                    self.count += 1;
                }
            }
        }
    }

    /// Number of dirty blocks.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The dirty block numbers (block n = bytes `n * 4096 ..`), ascending; clears the map.
    pub fn take(&mut self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.count as usize);
        for (w, word) in self.bits.iter_mut().enumerate() {
            let mut x = std::mem::take(word);
            while x != 0 {
                out.push(w as u64 * 64 + u64::from(x.trailing_zeros()));
                x &= x - 1;
            }
        }
        self.count = 0;
        out
    }
}

/// A virtio-blk device on a raw image.
pub struct Block {
    config: BlockConfig,
    file: File,
    disk_bytes: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    dirty: DirtyBlocks,
    stats: BlockStats,
    buf: Vec<u8>,
    /// Flushes complete without `fdatasync` (replication makes the writes durable: see
    /// [`Block::set_speculative`]).
    speculative: bool,
    /// Writes since the last `fdatasync` (or an image whose state is not known to be synced).
    unsynced: bool,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("config", &self.config)
            .field("disk_bytes", &self.disk_bytes)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Block {
    /// Opens the image (read-write unless `readonly`).
    pub fn new(config: BlockConfig) -> Result<Self> {
        let file = open_image(&config.path, config.readonly)?;
        Self::with_file(config, file)
    }

    /// A device on an image already open (`config.path` is kept for the saved state).
    pub fn with_file(config: BlockConfig, file: File) -> Result<Self> {
        let size = file
            .metadata()
            .map_err(|source| Error::Image {
                path: config.path.display().to_string(),
                source,
            })?
            .len();
        let disk_bytes = size / SECTOR_SIZE * SECTOR_SIZE;
        if disk_bytes != size {
            warn!(
                "disk image {}: {size} bytes is not whole sectors; the last {} bytes are not visible",
                config.path.display(),
                size - disk_bytes
            );
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = config
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block {
            config,
            file,
            disk_bytes,
            id,
            dirty: DirtyBlocks::new(disk_bytes),
            stats: BlockStats::default(),
            buf: Vec::new(),
            speculative: false,
            // A device on an image written by someone else (a standby's replica) does not
            // know whether it was synced: the first flush or leaving speculation syncs it.
            unsynced: true,
        })
    }

    /// Flushes under speculation (Remus): while a standby protects the VM, a guest's flush
    /// completes without `fdatasync` — what it makes durable is the epoch's disk writes, which
    /// the standby commits before any output that depends on them is released. Turning
    /// speculation off (the VM runs unprotected: its own image is the only copy) first syncs
    /// every write made since the last sync, so that output released from then on depends
    /// only on durable writes. Counted in [`BlockStats::speculative_flushes`].
    pub fn set_speculative(&mut self, on: bool) -> std::io::Result<()> {
        if !on && self.unsynced && !self.config.readonly {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        self.speculative = on;
        Ok(())
    }

    /// A device from its saved state, on `image` or else on the saved path. The image must
    /// have the saved size.
    pub fn from_state(state: &BlockState, image: Option<File>) -> Result<Self> {
        let config = BlockConfig {
            path: state.path.clone(),
            readonly: state.readonly,
        };
        let dev = match image {
            Some(f) => Self::with_file(config, f)?,
            None => Self::new(config)?,
        };
        if dev.capacity_sectors() != state.capacity_sectors {
            return Err(Error::State(format!(
                "disk image {} has {} sectors, the saved device had {}: restore with the same image",
                state.path.display(),
                dev.capacity_sectors(),
                state.capacity_sectors
            )));
        }
        Ok(dev)
    }

    /// The configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk_bytes / SECTOR_SIZE
    }

    /// Counters.
    pub fn stats(&self) -> &BlockStats {
        &self.stats
    }

    /// What the guest wrote since the last call (every non-zero block with `full`), read back
    /// from the image (call with the guest stunned), for a replication epoch; resets the
    /// dirty bitmap.
    pub fn take_writes(&mut self, full: bool) -> std::io::Result<DiskWrites> {
        let written = self.take_dirty_blocks();
        let capacity = self.capacity_sectors() * SECTOR_SIZE;
        read_writes(
            &self.file,
            capacity,
            if full { None } else { Some(written) },
        )
    }

    /// The 4 KiB blocks written since the last call, ascending; starts a new interval.
    pub fn take_dirty_blocks(&mut self) -> Vec<u64> {
        self.dirty.take()
    }

    /// How many 4 KiB blocks were written since the last [`take_dirty_blocks`](Self::take_dirty_blocks).
    pub fn dirty_block_count(&self) -> u64 {
        self.dirty.count()
    }

    /// Serves one walked chain; returns (status, bytes written before the status byte).
    fn serve(&mut self, mem: &GuestMem, c: &Chain) -> (u8, u32) {
        let ioerr = |why: &str| {
            warn!("virtio-blk: request at head {} fails: {why}", c.head);
            (VIRTIO_BLK_S_IOERR as u8, 0)
        };
        if let Some(f) = c.fault {
            return ioerr(&f.to_string());
        }
        let mut hdr = [0u8; HEADER_SIZE as usize];
        if c.readable_len() < HEADER_SIZE || !chain::read_stream(mem, &c.readable, 0, &mut hdr) {
            return ioerr(&format!(
                "the header is {} bytes, not {HEADER_SIZE}",
                c.readable_len()
            ));
        }
        let rtype = u32::from_le_bytes(hdr[0..4].try_into().expect("4"));
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8"));
        let out_len = c.readable_len() - HEADER_SIZE;
        let in_len = c.writable_len() - 1;
        match rtype {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = rtype == VIRTIO_BLK_T_OUT;
                let (len, wrong) = if write {
                    (out_len, in_len)
                } else {
                    (in_len, out_len)
                };
                if wrong != 0 {
                    return ioerr(&format!(
                        "{wrong} data bytes in {} buffers of a {} request",
                        if write {
                            "device-writable"
                        } else {
                            "device-readable"
                        },
                        if write { "write" } else { "read" }
                    ));
                }
                if len % SECTOR_SIZE != 0 {
                    return ioerr(&format!("{len} bytes is not whole sectors"));
                }
                let Some(offset) = sector
                    .checked_mul(SECTOR_SIZE)
                    .filter(|o| o.checked_add(len).is_some_and(|end| end <= self.disk_bytes))
                else {
                    return ioerr(&format!(
                        "sectors {sector}+{} are past the end ({} sectors)",
                        len / SECTOR_SIZE,
                        self.capacity_sectors()
                    ));
                };
                if write && self.config.readonly {
                    return ioerr("the disk is read-only");
                }
                let r = if write {
                    self.dirty.mark(offset, len);
                    self.unsynced = true;
                    self.write_out(mem, &c.readable, offset, len)
                } else {
                    self.read_in(mem, &c.writable, offset, len)
                };
                match r {
                    Ok(()) if write => {
                        self.stats.written_bytes += len;
                        (VIRTIO_BLK_S_OK as u8, 0)
                    }
                    Ok(()) => {
                        self.stats.read_bytes += len;
                        (VIRTIO_BLK_S_OK as u8, len as u32)
                    }
                    Err(e) => ioerr(&e),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes += 1;
                if self.config.readonly {
                    return (VIRTIO_BLK_S_OK as u8, 0);
                }
                if self.speculative {
                    self.stats.speculative_flushes += 1;
                    return (VIRTIO_BLK_S_OK as u8, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => {
                        self.unsynced = false;
                        (VIRTIO_BLK_S_OK as u8, 0)
                    }
                    Err(e) => ioerr(&format!("fdatasync: {e}")),
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = in_len.min(self.id.len() as u64) as usize;
                let id = self.id;
                if chain::write_stream(mem, &c.writable, 0, &id[..n]) {
                    (VIRTIO_BLK_S_OK as u8, n as u32)
                } else {
                    ioerr("cannot write the id")
                }
            }
            t => {
                warn!("virtio-blk: request type {t} is not supported");
                self.stats.unsupported += 1;
                (VIRTIO_BLK_S_UNSUPP as u8, 0)
            }
        }
    }

    /// Image → guest.
    fn read_in(
        &mut self,
        mem: &GuestMem,
        segs: &[chain::Segment],
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), String> {
        let (file, buf) = (&self.file, bounce(&mut self.buf));
        chain::for_each_piece(segs, 0, len, CHUNK, |addr, at, n| {
            file.read_exact_at(&mut buf[..n], offset + at)
                .map_err(|e| format!("reading the image at {}: {e}", offset + at))?;
            mem.write_slice(&buf[..n], addr)
                .map_err(|e| format!("writing guest memory at {:#x}: {e}", addr.0))
        })
        .map(|_| ())
    }

    /// Guest → image.
    fn write_out(
        &mut self,
        mem: &GuestMem,
        segs: &[chain::Segment],
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), String> {
        let (file, buf) = (&self.file, bounce(&mut self.buf));
        chain::for_each_piece(segs, HEADER_SIZE, len, CHUNK, |addr, at, n| {
            mem.read_slice(&mut buf[..n], addr)
                .map_err(|e| format!("reading guest memory at {:#x}: {e}", addr.0))?;
            file.write_all_at(&buf[..n], offset + at)
                .map_err(|e| format!("writing the image at {}: {e}", offset + at))
        })
        .map(|_| ())
    }
}

fn bounce(buf: &mut Vec<u8>) -> &mut [u8] {
    if buf.len() < CHUNK {
        buf.resize(CHUNK, 0);
    }
    buf
}

/// Opens a raw image as a device would (read-only or read-write).
pub fn open_image(path: &Path, readonly: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|source| Error::Image {
            path: path.display().to_string(),
            source,
        })
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        guest_abi::boot::VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        // Indirect descriptors: a request takes one slot of the ring instead of three, so a
        // driver queues more requests per notification (a VM exit). The chain walk already
        // reads indirect tables with the same checks.
        let mut f = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if self.config.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// `capacity u64 | size_max u32 (0) | seg_max u32`.
    fn config_space(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(16);
        c.extend_from_slice(&self.capacity_sectors().to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&((MAX_CHAIN_DESCRIPTORS - 2) as u32).to_le_bytes());
        c
    }

    fn process_queue(
        &mut self,
        mem: &GuestMem,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool> {
        let Some(queue) = queues.get_mut(index).filter(|_| index == 0) else {
            return Ok(false);
        };
        let mut used = false;
        for _ in 0..queue.size() {
            let Some(dc) = chain::pop(queue, mem, index)? else {
                break;
            };
            let c = chain::walk(dc, mem, index)?;
            self.stats.requests += 1;
            let len = match c.last_writable_byte() {
                Some(at) => {
                    let (status, n) = self.serve(mem, &c);
                    if status == VIRTIO_BLK_S_IOERR as u8 {
                        self.stats.errors += 1;
                    }
                    if mem.write_obj(status, GuestAddress(at)).is_err() {
                        warn!("virtio-blk: cannot write the status byte at {at:#x}");
                    }
                    n + 1
                }
                None => {
                    warn!(
                        "virtio-blk: request at head {} has no writable status byte; returned untouched",
                        c.head
                    );
                    self.stats.no_status += 1;
                    0
                }
            };
            chain::add_used(queue, mem, index, c.head, len)?;
            used = true;
        }
        Ok(used)
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            path: self.config.path.clone(),
            readonly: self.config.readonly,
            capacity_sectors: self.capacity_sectors(),
        })
    }
}

#[cfg(test)]
mod tests;
