//! The output ring: one per vCPU in guest memory (see [`crate::layout`] for where).
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

/// Offset of the head counter.
pub const RING_HEAD: u64 = 0x00;
/// Offset of the tail counter.
pub const RING_TAIL: u64 = 0x08;
/// Offset of slot 0.
pub const RING_RECORDS: u64 = 0x40;
/// Number of slots (a power of two).
pub const RING_SLOTS: u64 = 1024;
/// Size of one record.
pub const RECORD_SIZE: u64 = 32;
/// Bytes one ring occupies.
pub const RING_BYTES: u64 = RING_RECORDS + RING_SLOTS * RECORD_SIZE;

/// Record kinds our workload guests use.
pub mod kind {
    /// A progress record: `value` is the running checksum, `aux` the iteration count.
    pub const PROGRESS: u32 = 1;
    /// The last record of a vCPU: `value` is the final checksum, `aux` the iteration count
    /// (the tick count for `ticker`).
    pub const DONE: u32 = 2;
    /// A `ticker` progress record: `value` is the running checksum, `aux` the timer ticks the
    /// vCPU had taken (timing-dependent, unlike everything else in the stream).
    pub const TICK: u32 = 3;
    /// A guest panic: `value` is the line, `aux` a hash of the file name; the records that
    /// follow (kind [`PANIC_TEXT`]) carry `file:line: message` 16 bytes at a time.
    pub const PANIC: u32 = 0x7e;
    /// Text that belongs to the record before: `value` and `aux` hold 16 bytes of UTF-8.
    pub const PANIC_TEXT: u32 = 0x7f;
}

/// One output record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Record {
    /// The vCPU the guest says wrote it.
    pub vcpu: u32,
    /// Record kind (see [`kind`]).
    pub kind: u32,
    /// Sequence number within the vCPU's stream.
    pub seq: u64,
    /// Payload: the running checksum for our guests.
    pub value: u64,
    /// Payload: the iteration count for our guests.
    pub aux: u64,
}

impl Record {
    /// The record's 32 wire bytes.
    pub fn to_bytes(&self) -> [u8; RECORD_SIZE as usize] {
        let mut b = [0u8; RECORD_SIZE as usize];
        b[0..4].copy_from_slice(&self.vcpu.to_le_bytes());
        b[4..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.value.to_le_bytes());
        b[24..32].copy_from_slice(&self.aux.to_le_bytes());
        b
    }
    /// Parses 32 bytes.
    pub fn from_bytes(b: &[u8; RECORD_SIZE as usize]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        Record {
            vcpu: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            kind: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            seq: u64_at(8),
            value: u64_at(16),
            aux: u64_at(24),
        }
    }
}
