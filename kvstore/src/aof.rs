//! The append-only log on a raw disk: every write request, flushed before its reply goes out
//! (Redis's `appendonly yes` + `appendfsync always`), replayed at boot.
//!
//! ```text
//!  sector 0   header   ┌──────────────┬─────────────┬──────────────┐
//!                      │ "TKVAOF01" 8 │ log id u64  │ crc32c u32   │  (of the 16 bytes before)
//!                      └──────────────┴─────────────┴──────────────┘
//!  byte 512…  records, back to back, each:
//!             ┌────────────┬─────────┬─────────┬────────────┬──────────────────────────┐
//!             │ 0x4B52 u16 │ len u32 │ seq u64 │ crc32c u32 │ payload: the request in  │
//!             │ "RK"       │         │ 1, 2, … │            │ RESP2, len bytes         │
//!             └────────────┴─────────┴─────────┴────────────┴──────────────────────────┘
//!             crc32c over log id ‖ seq ‖ len ‖ payload; all integers little endian
//! ```
//!
//! Replay reads records from byte 512 while each has the magic, a length ≤ [`MAX_RECORD`], the
//! next sequence number, a matching CRC (which binds it to this log's id) and a payload that is
//! one whole request. The first record that fails is the tail: a record torn by a crash is
//! never replayed as data. Before anything new is written, [`Log::open`] zeroes
//! [`ZERO_AHEAD`] bytes from the tail: one commit never writes further than that past the last
//! flushed byte, so no record of an interrupted commit can follow the new ones.
//!
//! Appends go to memory ([`Log::append`]); [`Log::commit`] writes the sectors from the one
//! holding the flushed tail to the end of the new records (whole sectors, the tail sector read
//! back from memory), then flushes. Replies wait for the commit.

use alloc::vec;
use alloc::vec::Vec;

use crate::resp::{parse, Parsed};

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// Header magic.
pub const MAGIC: &[u8; 8] = b"TKVAOF01";
/// Record magic ("RK").
pub const RECORD_MAGIC: u16 = 0x4b52;
/// Record header bytes.
pub const RECORD_HEADER: usize = 18;
/// Largest record payload (a whole request).
pub const MAX_RECORD: usize = crate::resp::MAX_REQUEST + 64 * 1024;
/// Most bytes one commit writes past the flushed tail (bigger batches commit in steps).
pub const ZERO_AHEAD: usize = MAX_RECORD + RECORD_HEADER + SECTOR;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// A disk addressed in 512-byte sectors.
pub trait Disk {
    /// The disk's error.
    type Error: core::fmt::Debug;
    /// Size in sectors.
    fn sectors(&self) -> u64;
    /// Reads whole sectors from `sector`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes whole sectors at `sector`.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Self::Error>;
    /// Makes every write so far durable.
    fn flush(&mut self) -> Result<(), Self::Error>;
}

/// Why the log cannot go on.
#[derive(Debug, PartialEq, Eq)]
pub enum LogError<E> {
    /// The disk failed.
    Disk(E),
    /// The disk is smaller than a header and one sector of records.
    TooSmall,
    /// The records would pass the end of the disk.
    Full,
    /// An earlier disk error stopped the log.
    Poisoned,
}

/// What [`Log::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// The disk held no log (a new one was written).
    pub created: bool,
    /// Records replayed.
    pub records: u64,
    /// Where the records end (byte offset).
    pub tail: u64,
    /// Bytes after the tail were not zero (a torn or interrupted commit, or a disk never
    /// zeroed) and were zeroed.
    pub cut: bool,
}

/// The log, open for appending.
#[derive(Debug)]
pub struct Log {
    id: u64,
    seq: u64,
    /// Byte offset of the end of the flushed records.
    tail: u64,
    /// The sector holding `tail`, as on disk (bytes before `tail % SECTOR` are records).
    tail_sector: Vec<u8>,
    /// Records appended and not yet committed.
    pending: Vec<u8>,
    /// The sequence number of the last flushed record.
    committed_seq: u64,
    /// A disk error left the log in an unknown state: nothing more is written.
    poisoned: bool,
    sectors: u64,
}

fn record_crc(id: u64, seq: u64, payload: &[u8]) -> u32 {
    let mut d = CRC.digest();
    d.update(&id.to_le_bytes());
    d.update(&seq.to_le_bytes());
    d.update(&(payload.len() as u32).to_le_bytes());
    d.update(payload);
    d.finalize()
}

/// Reads `len` bytes at byte `offset` (any alignment) into a fresh buffer.
fn read_bytes<D: Disk>(disk: &mut D, offset: u64, len: usize) -> Result<Vec<u8>, D::Error> {
    let first = offset / SECTOR as u64;
    let skip = (offset % SECTOR as u64) as usize;
    let n = (skip + len).div_ceil(SECTOR);
    let mut buf = vec![0u8; n * SECTOR];
    disk.read(first, &mut buf)?;
    buf.drain(..skip);
    buf.truncate(len);
    Ok(buf)
}

impl Log {
    /// Opens the log on `disk`: replays every whole record through `apply` (each a request's
    /// arguments), cuts a torn tail, or writes a new header with id `new_id` if the disk holds
    /// no log.
    pub fn open<D: Disk>(
        disk: &mut D,
        new_id: u64,
        mut apply: impl FnMut(&[Vec<u8>]),
    ) -> Result<(Log, Opened), LogError<D::Error>> {
        let sectors = disk.sectors();
        if sectors < 2 {
            return Err(LogError::TooSmall);
        }
        let end = sectors * SECTOR as u64;
        let mut head = vec![0u8; SECTOR];
        disk.read(0, &mut head).map_err(LogError::Disk)?;
        let stored_crc = u32::from_le_bytes(head[16..20].try_into().unwrap_or_default());
        let mut opened = Opened::default();
        let id = if &head[..8] == MAGIC && CRC.checksum(&head[..16]) == stored_crc {
            u64::from_le_bytes(head[8..16].try_into().unwrap_or_default())
        } else {
            let mut h = vec![0u8; SECTOR];
            h[..8].copy_from_slice(MAGIC);
            h[8..16].copy_from_slice(&new_id.to_le_bytes());
            let c = CRC.checksum(&h[..16]);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            disk.write(0, &h).map_err(LogError::Disk)?;
            opened.created = true;
            new_id
        };
        let mut at = SECTOR as u64;
        let mut seq = 0u64;
        if !opened.created {
            while at + RECORD_HEADER as u64 <= end {
                let h = read_bytes(disk, at, RECORD_HEADER).map_err(LogError::Disk)?;
                let magic = u16::from_le_bytes([h[0], h[1]]);
                let len = u32::from_le_bytes(h[2..6].try_into().unwrap_or_default()) as usize;
                let rseq = u64::from_le_bytes(h[6..14].try_into().unwrap_or_default());
                let crc = u32::from_le_bytes(h[14..18].try_into().unwrap_or_default());
                if magic != RECORD_MAGIC
                    || len > MAX_RECORD
                    || rseq != seq + 1
                    || at + (RECORD_HEADER + len) as u64 > end
                {
                    break;
                }
                let payload =
                    read_bytes(disk, at + RECORD_HEADER as u64, len).map_err(LogError::Disk)?;
                if record_crc(id, rseq, &payload) != crc {
                    break;
                }
                let Parsed::Request { args, used } = parse(&payload) else {
                    break;
                };
                if used != payload.len() {
                    break;
                }
                apply(&args);
                seq = rseq;
                at += (RECORD_HEADER + len) as u64;
            }
        }
        opened.records = seq;
        opened.tail = at;
        // Zero what an interrupted commit may have left after the tail.
        let zero_end = (at + ZERO_AHEAD as u64).min(end);
        let first = at / SECTOR as u64;
        let mut tail_sector = vec![0u8; SECTOR];
        disk.read(first, &mut tail_sector).map_err(LogError::Disk)?;
        let keep = (at % SECTOR as u64) as usize;
        let mut chunk = vec![0u8; 64 * SECTOR];
        let mut s = first;
        let last = zero_end.div_ceil(SECTOR as u64);
        while s < last {
            let n = ((last - s) as usize).min(64);
            let buf = &mut chunk[..n * SECTOR];
            disk.read(s, buf).map_err(LogError::Disk)?;
            let from = if s == first { keep } else { 0 };
            if buf[from..].iter().any(|&b| b != 0) {
                opened.cut = true;
                buf[from..].fill(0);
                disk.write(s, buf).map_err(LogError::Disk)?;
            }
            s += n as u64;
        }
        tail_sector[keep..].fill(0);
        disk.flush().map_err(LogError::Disk)?;
        Ok((
            Log {
                id,
                seq,
                tail: at,
                tail_sector,
                pending: Vec::new(),
                committed_seq: seq,
                poisoned: false,
                sectors,
            },
            opened,
        ))
    }

    /// Appends a request (its RESP2 encoding) to the next commit.
    pub fn append(&mut self, request: &[u8]) {
        self.seq += 1;
        let crc = record_crc(self.id, self.seq, request);
        self.pending.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        self.pending
            .extend_from_slice(&(request.len() as u32).to_le_bytes());
        self.pending.extend_from_slice(&self.seq.to_le_bytes());
        self.pending.extend_from_slice(&crc.to_le_bytes());
        self.pending.extend_from_slice(request);
    }

    /// Records appended and not yet committed, in bytes.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Flushed bytes of records (header sector included).
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Writes the appended records and flushes. On `Full` nothing is written and the appended
    /// records are dropped (their requests must be answered with an error); after a disk
    /// error the log refuses every later commit ([`LogError::Poisoned`]).
    pub fn commit<D: Disk>(&mut self, disk: &mut D) -> Result<(), LogError<D::Error>> {
        if self.poisoned {
            self.pending.clear();
            self.seq = self.committed_seq;
            return Err(LogError::Poisoned);
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let end = self.sectors * SECTOR as u64;
        if self.tail + self.pending.len() as u64 > end {
            self.pending.clear();
            self.seq = self.committed_seq;
            return Err(LogError::Full);
        }
        let r = self.write_pending(disk);
        if r.is_err() {
            self.poisoned = true;
        } else {
            self.committed_seq = self.seq;
        }
        r
    }

    fn write_pending<D: Disk>(&mut self, disk: &mut D) -> Result<(), LogError<D::Error>> {
        let pending = core::mem::take(&mut self.pending);
        // Steps of at most ZERO_AHEAD bytes past the flushed tail, each flushed.
        let step = ZERO_AHEAD - SECTOR;
        for part in pending.chunks(step) {
            let keep = (self.tail % SECTOR as u64) as usize;
            let first = self.tail / SECTOR as u64;
            let mut buf = Vec::with_capacity((keep + part.len()).div_ceil(SECTOR) * SECTOR);
            buf.extend_from_slice(&self.tail_sector[..keep]);
            buf.extend_from_slice(part);
            buf.resize((keep + part.len()).div_ceil(SECTOR) * SECTOR, 0);
            disk.write(first, &buf).map_err(LogError::Disk)?;
            disk.flush().map_err(LogError::Disk)?;
            self.tail += part.len() as u64;
            let new_keep = (self.tail % SECTOR as u64) as usize;
            let last = buf.len() - SECTOR;
            self.tail_sector.copy_from_slice(&buf[last..]);
            if new_keep == 0 {
                self.tail_sector.fill(0);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::encode_request;

    /// A disk in memory that can stop accepting writes after `budget` sectors.
    struct MemDisk {
        data: Vec<u8>,
        budget: Option<usize>,
    }

    impl Disk for MemDisk {
        type Error = &'static str;
        fn sectors(&self) -> u64 {
            (self.data.len() / SECTOR) as u64
        }
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
            let at = sector as usize * SECTOR;
            let end = at + buf.len();
            buf.copy_from_slice(self.data.get(at..end).ok_or("read past the end")?);
            Ok(())
        }
        fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Self::Error> {
            let at = sector as usize * SECTOR;
            for (i, s) in buf.chunks(SECTOR).enumerate() {
                if let Some(b) = &mut self.budget {
                    if *b == 0 {
                        return Err("crashed");
                    }
                    *b -= 1;
                }
                let o = at + i * SECTOR;
                self.data
                    .get_mut(o..o + SECTOR)
                    .ok_or("write past the end")?
                    .copy_from_slice(s);
            }
            Ok(())
        }
        fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    fn val(i: u64) -> Vec<u8> {
        alloc::format!("value-{i}-{}", "x".repeat((i % 700) as usize)).into_bytes()
    }

    fn req(i: u64) -> Vec<u8> {
        let mut r = Vec::new();
        encode_request(&[b"RPUSH", b"l", &val(i)], &mut r);
        r
    }

    fn replay(disk: &mut MemDisk) -> (Vec<Vec<Vec<u8>>>, Opened) {
        let mut got = Vec::new();
        let (_, o) = Log::open(disk, 7, |a| got.push(a.to_vec())).unwrap();
        (got, o)
    }

    #[test]
    fn records_replay_in_order_across_reopens() {
        let mut disk = MemDisk {
            data: vec![0xAA; 8 << 20],
            budget: None,
        };
        let (mut log, o) = Log::open(&mut disk, 7, |_| panic!("no records yet")).unwrap();
        assert!(o.created);
        for i in 0..300 {
            log.append(&req(i));
            if i % 7 == 0 {
                log.commit(&mut disk).unwrap();
            }
        }
        log.commit(&mut disk).unwrap();
        let (got, o) = replay(&mut disk);
        assert_eq!(o.records, 300);
        assert_eq!(got.len(), 300);
        assert_eq!(got[299][2], val(299));
        // Reopened, appended, replayed again.
        let (mut log, _) = Log::open(&mut disk, 9, |_| {}).unwrap();
        log.append(&req(300));
        log.commit(&mut disk).unwrap();
        assert_eq!(replay(&mut disk).1.records, 301);
    }

    #[test]
    fn a_crash_at_any_sector_of_a_commit_keeps_a_prefix_and_never_replays_garbage() {
        let mut base = MemDisk {
            data: vec![0; 1 << 20],
            budget: None,
        };
        let (mut log, _) = Log::open(&mut base, 7, |_| {}).unwrap();
        for i in 0..20 {
            log.append(&req(i));
        }
        log.commit(&mut base).unwrap();
        let committed = base.data.clone();
        for budget in 0..12 {
            let mut disk = MemDisk {
                data: committed.clone(),
                budget: None,
            };
            let (mut log, _) = Log::open(&mut disk, 7, |_| {}).unwrap();
            for i in 20..40 {
                log.append(&req(i));
            }
            disk.budget = Some(budget);
            let r = log.commit(&mut disk);
            disk.budget = None;
            let (got, o) = replay(&mut disk);
            assert!(o.records >= 20, "budget {budget}: lost flushed records");
            if r.is_ok() {
                assert_eq!(o.records, 40);
            }
            for (i, a) in got.iter().enumerate() {
                assert_eq!(a[2], val(i as u64), "record {i}");
            }
            // Appending after the cut replays exactly the new prefix + the new records.
            let (mut log, _) = Log::open(&mut disk, 7, |_| {}).unwrap();
            log.append(&req(1000));
            log.commit(&mut disk).unwrap();
            assert_eq!(replay(&mut disk).1.records, o.records + 1);
        }
    }

    #[test]
    fn garbage_and_foreign_logs_are_not_replayed() {
        let mut disk = MemDisk {
            data: vec![0; 1 << 20],
            budget: None,
        };
        let (mut log, _) = Log::open(&mut disk, 7, |_| {}).unwrap();
        for i in 0..5 {
            log.append(&req(i));
        }
        log.commit(&mut disk).unwrap();
        // Flip one payload byte of record 3: records 1..=2 stay, the rest is cut.
        let mut at = SECTOR;
        for _ in 0..2 {
            let len = u32::from_le_bytes(disk.data[at + 2..at + 6].try_into().unwrap()) as usize;
            at += RECORD_HEADER + len;
        }
        disk.data[at + RECORD_HEADER + 3] ^= 1;
        let (got, o) = replay(&mut disk);
        assert_eq!((got.len(), o.records, o.cut), (2, 2, true));
        // A header of another log id makes the records foreign: nothing replays.
        let mut d2 = MemDisk {
            data: disk.data.clone(),
            budget: None,
        };
        d2.data[8] ^= 0xff;
        let c = CRC.checksum(&d2.data[..16]);
        d2.data[16..20].copy_from_slice(&c.to_le_bytes());
        assert_eq!(replay(&mut d2).1.records, 0);
    }

    #[test]
    fn a_full_disk_refuses_the_commit_and_keeps_what_was_flushed() {
        let mut disk = MemDisk {
            data: vec![0; 4 * SECTOR],
            budget: None,
        };
        let (mut log, _) = Log::open(&mut disk, 7, |_| {}).unwrap();
        log.append(&req(1));
        log.commit(&mut disk).unwrap();
        for i in 602..606 {
            log.append(&req(i));
        }
        assert_eq!(log.commit(&mut disk), Err(LogError::Full));
        assert_eq!(replay(&mut disk).1.records, 1);
        // The refused records' numbers are free again: the next commit replays.
        let (mut log, _) = Log::open(&mut disk, 7, |_| {}).unwrap();
        log.append(&req(2));
        for i in 603..606 {
            log.append(&req(i));
        }
        assert_eq!(log.commit(&mut disk), Err(LogError::Full));
        log.append(&req(3));
        log.commit(&mut disk).unwrap();
        assert_eq!(replay(&mut disk).1.records, 2);
    }
}
