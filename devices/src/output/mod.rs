//! The output device: drains the per-vCPU output rings (layout in `guest_abi::ring`):
//!
//! ```text
//!  ring + 0x00  head   u64   records ever produced   (written by the guest)
//!  ring + 0x08  tail   u64   records ever consumed   (written by the host)
//!  ring + 0x10  ...    reserved (zero)
//!  ring + 0x40  slot[0 .. RING_SLOTS]  32-byte records; record n lives in slot n % RING_SLOTS
//!
//!  record:  +0 vcpu u32 | +4 kind u32 | +8 seq u64 | +16 value u64 | +24 aux u64   (little endian)
//! ```
//!
//! Protocol: the guest writes record `head % RING_SLOTS`, then stores `head + 1` (x86 keeps the
//! stores in order). When `head - tail == RING_SLOTS` it must ring the doorbell and wait for
//! `tail` to move. It rings the doorbell (`out DOORBELL_PORT, eax`) at least every
//! `RING_SLOTS` records and before it reports done. On a doorbell the host copies every record
//! in `tail..head` to the sink and then advances `tail`.
//!
//! The ring lives entirely in guest memory, so a checkpoint of memory captures it exactly.

use std::io::Write;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::{Error, Result};

pub mod persist;
pub use persist::{OutputGroup, OutputState, Sinks, OUTPUT_STATE_VERSION};

pub use guest_abi::ring::{
    kind, Record, RECORD_SIZE, RING_BYTES, RING_HEAD, RING_RECORDS, RING_SLOTS, RING_TAIL,
};

/// Where drained records go.
pub trait OutputSink: Send {
    /// Takes records drained from vCPU `vcpu`'s ring, in ring order.
    fn records(&mut self, vcpu: u32, records: &[Record]) -> std::io::Result<()>;
    /// Pushes out anything buffered.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records as text lines: `vcpu seq kind value aux` (hex value).
pub struct TextSink<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> TextSink<W> {
    /// Writes to `out`.
    pub fn new(out: W) -> Self {
        TextSink { out }
    }
}

impl<W: Write + Send> OutputSink for TextSink<W> {
    fn records(&mut self, vcpu: u32, records: &[Record]) -> std::io::Result<()> {
        for r in records {
            writeln!(
                self.out,
                "{vcpu} {} {} {:016x} {}",
                r.seq, r.kind, r.value, r.aux
            )?;
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A running digest of each vCPU's record stream: `d(n+1) = SHA-256(d(n) ‖ record)`, from
/// `d(0)` = 32 zero bytes. A hash chain rather than one SHA-256 so that its state can be saved
/// in a snapshot and a restored VM goes on to report the digest of the whole stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestSink {
    vcpus: Vec<DigestLane>,
}

/// One vCPU's digest state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestLane {
    /// Chain value.
    pub chain: [u8; 32],
    /// Records so far.
    pub records: u64,
    /// The last record.
    pub last: Option<Record>,
}

/// Version of [`DigestSink`]'s saved state.
pub const DIGEST_STATE_VERSION: u32 = 1;

/// The digest of a whole run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestReport {
    /// Per vCPU: (records, hex chain value, last record).
    pub vcpus: Vec<(u64, String, Option<Record>)>,
    /// SHA-256 over every vCPU's (id, count, chain value), in vCPU order.
    pub total: String,
}

impl DigestReport {
    /// Number of records over all vCPUs.
    pub fn records(&self) -> u64 {
        self.vcpus.iter().map(|v| v.0).sum()
    }
}

impl std::fmt::Display for DigestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (n, d, _)) in self.vcpus.iter().enumerate() {
            writeln!(f, "vcpu {i}: {n} records, digest {d}")?;
        }
        write!(
            f,
            "total: {} records, digest {}",
            self.records(),
            self.total
        )
    }
}

impl DigestSink {
    /// A sink for `vcpus` streams.
    pub fn new(vcpus: u32) -> Self {
        DigestSink {
            vcpus: vec![DigestLane::default(); vcpus as usize],
        }
    }

    /// Number of streams.
    pub fn vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// The digest of everything seen so far.
    pub fn report(&self) -> DigestReport {
        let mut total = Sha256::new();
        let vcpus: Vec<_> = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, lane)| {
                total.update((i as u32).to_le_bytes());
                total.update(lane.records.to_le_bytes());
                total.update(lane.chain);
                (lane.records, hex::encode(lane.chain), lane.last)
            })
            .collect();
        DigestReport {
            vcpus,
            total: hex::encode(total.finalize()),
        }
    }

    /// Digest of a list of per-vCPU streams (for reference computations).
    pub fn of(streams: &[Vec<Record>]) -> DigestReport {
        let mut s = DigestSink::new(streams.len() as u32);
        for (i, recs) in streams.iter().enumerate() {
            s.records(i as u32, recs).expect("in-memory sink");
        }
        s.report()
    }
}

impl OutputSink for DigestSink {
    fn records(&mut self, vcpu: u32, records: &[Record]) -> std::io::Result<()> {
        let slot = self.vcpus.get_mut(vcpu as usize).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no vCPU {vcpu}"))
        })?;
        for r in records {
            let mut h = Sha256::new();
            h.update(slot.chain);
            h.update(r.to_bytes());
            slot.chain = h.finalize().into();
        }
        slot.records += records.len() as u64;
        if let Some(r) = records.last() {
            slot.last = Some(*r);
        }
        Ok(())
    }
}

/// Sends every record to two sinks.
pub struct Tee<A, B>(pub A, pub B);

impl<A: OutputSink, B: OutputSink> OutputSink for Tee<A, B> {
    fn records(&mut self, vcpu: u32, records: &[Record]) -> std::io::Result<()> {
        self.0.records(vcpu, records)?;
        self.1.records(vcpu, records)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

/// The output device: knows where each vCPU's ring is and drains it.
pub struct OutputDevice<M> {
    mem: M,
    rings: Vec<u64>,
    drained: Vec<u64>,
}

impl<M: GuestMemoryBackend> OutputDevice<M> {
    /// A device for rings at the given guest-physical addresses (index = vCPU id).
    pub fn new(mem: M, rings: Vec<u64>) -> Self {
        let drained = vec![0; rings.len()];
        OutputDevice {
            mem,
            rings,
            drained,
        }
    }

    /// Records drained so far from each vCPU.
    pub fn drained(&self) -> &[u64] {
        &self.drained
    }

    /// The device's saved state.
    pub fn save_state(&self) -> OutputState {
        OutputState {
            rings: self.rings.clone(),
            drained: self.drained.clone(),
        }
    }

    /// Loads saved state; it must describe the same rings.
    pub fn restore_state(&mut self, s: OutputState) -> Result<()> {
        if s.rings != self.rings || s.drained.len() != self.rings.len() {
            return Err(Error::State(format!(
                "the saved output device has rings {:x?}, this VM {:x?}",
                s.rings, self.rings
            )));
        }
        self.drained = s.drained;
        Ok(())
    }

    fn mem_err(e: impl std::fmt::Display) -> Error {
        Error::Memory(e.to_string())
    }

    /// Copies every record in `tail..head` of vCPU `vcpu`'s ring to `sink`, then advances the
    /// tail. Returns how many records moved. A corrupt ring changes nothing.
    pub fn drain(&mut self, vcpu: u32, sink: &mut dyn OutputSink) -> Result<usize> {
        let ring = *self
            .rings
            .get(vcpu as usize)
            .ok_or(Error::NoSuchRing(vcpu))?;
        let head: u64 = self
            .mem
            .load(GuestAddress(ring + RING_HEAD), Ordering::Acquire)
            .map_err(Self::mem_err)?;
        let tail: u64 = self
            .mem
            .load(GuestAddress(ring + RING_TAIL), Ordering::Acquire)
            .map_err(Self::mem_err)?;
        let pending = head.wrapping_sub(tail);
        if head < tail || pending > RING_SLOTS {
            return Err(Error::RingCorrupt {
                vcpu,
                head,
                tail,
                slots: RING_SLOTS,
            });
        }
        if pending == 0 {
            return Ok(0);
        }
        let mut bytes = vec![0u8; (pending * RECORD_SIZE) as usize];
        // At most two contiguous pieces: tail..end of ring, then start of ring..head.
        let first_slot = tail % RING_SLOTS;
        let first = pending.min(RING_SLOTS - first_slot);
        let (a, b) = bytes.split_at_mut((first * RECORD_SIZE) as usize);
        self.mem
            .read_slice(
                a,
                GuestAddress(ring + RING_RECORDS + first_slot * RECORD_SIZE),
            )
            .map_err(Self::mem_err)?;
        if !b.is_empty() {
            self.mem
                .read_slice(b, GuestAddress(ring + RING_RECORDS))
                .map_err(Self::mem_err)?;
        }
        let records: Vec<Record> = bytes
            .chunks_exact(RECORD_SIZE as usize)
            .map(|c| Record::from_bytes(c.try_into().expect("chunk of RECORD_SIZE")))
            .collect();
        sink.records(vcpu, &records)?;
        self.mem
            .store(head, GuestAddress(ring + RING_TAIL), Ordering::Release)
            .map_err(Self::mem_err)?;
        self.drained[vcpu as usize] += pending;
        Ok(pending as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn produce(m: &GuestMemoryMmap<()>, ring: u64, from: u64, n: u64) {
        for i in from..from + n {
            let r = Record {
                vcpu: 0,
                kind: kind::PROGRESS,
                seq: i,
                value: i * 7,
                aux: i,
            };
            let slot = ring + RING_RECORDS + (i % RING_SLOTS) * RECORD_SIZE;
            m.write_slice(&r.to_bytes(), GuestAddress(slot)).unwrap();
        }
        m.write_obj(from + n, GuestAddress(ring + RING_HEAD))
            .unwrap();
    }

    #[test]
    fn drains_across_the_wrap_in_order() {
        let m = mem();
        let mut dev = OutputDevice::new(m.clone(), vec![0x1000]);
        let mut sink = DigestSink::new(1);
        produce(&m, 0x1000, 0, 1000);
        assert_eq!(dev.drain(0, &mut sink).unwrap(), 1000);
        produce(&m, 0x1000, 1000, 1000); // wraps
        assert_eq!(dev.drain(0, &mut sink).unwrap(), 1000);
        assert_eq!(dev.drain(0, &mut sink).unwrap(), 0);
        let want: Vec<Record> = (0..2000)
            .map(|i| Record {
                vcpu: 0,
                kind: kind::PROGRESS,
                seq: i,
                value: i * 7,
                aux: i,
            })
            .collect();
        assert_eq!(sink.report(), DigestSink::of(&[want]));
        assert_eq!(dev.drained(), &[2000]);
    }

    #[test]
    fn corrupt_ring_is_refused_and_changes_nothing() {
        let m = mem();
        let mut dev = OutputDevice::new(m.clone(), vec![0x1000]);
        let mut sink = DigestSink::new(1);
        m.write_obj(RING_SLOTS + 1, GuestAddress(0x1000 + RING_HEAD))
            .unwrap();
        assert!(matches!(
            dev.drain(0, &mut sink),
            Err(Error::RingCorrupt { .. })
        ));
        m.write_obj(5u64, GuestAddress(0x1000 + RING_HEAD)).unwrap();
        m.write_obj(9u64, GuestAddress(0x1000 + RING_TAIL)).unwrap();
        assert!(matches!(
            dev.drain(0, &mut sink),
            Err(Error::RingCorrupt { .. })
        ));
        let tail: u64 = m.read_obj(GuestAddress(0x1000 + RING_TAIL)).unwrap();
        assert_eq!(tail, 9);
        assert_eq!(sink.report().records(), 0);
        assert!(matches!(dev.drain(3, &mut sink), Err(Error::NoSuchRing(3))));
    }

    #[test]
    fn record_bytes_round_trip() {
        let r = Record {
            vcpu: 3,
            kind: 2,
            seq: u64::MAX,
            value: 0x0123_4567_89ab_cdef,
            aux: 9,
        };
        assert_eq!(Record::from_bytes(&r.to_bytes()), r);
    }
}
