//! # devices — Tandem's emulated devices
//!
//! * [`output`]: the output device. Each vCPU appends [`Record`]s to its ring in guest memory
//!   and rings a doorbell; the host drains the ring into an [`OutputSink`]. This stream is the
//!   VM's "externally visible output".
//! * [`vmmdev`]: the guest-host device: guest info and the guest heartbeat (flatline detection).
//! * [`disk_copy`]: reflink-or-sparse copies of disk images (snapshots of virtio-blk disks).

pub mod disk_copy;
pub mod output;
pub mod virtio;
pub mod vmmdev;

pub use output::{
    DigestReport, DigestSink, OutputDevice, OutputSink, OutputState, Record, TextSink,
};

/// Everything that can go wrong in a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest left its ring in a state no correct guest produces.
    #[error(
        "vCPU {vcpu}'s output ring is corrupt (head {head}, tail {tail}, {slots} slots): \
         the guest broke the ring protocol"
    )]
    RingCorrupt {
        /// The vCPU.
        vcpu: u32,
        /// Producer count the guest wrote.
        head: u64,
        /// Consumer count the host wrote.
        tail: u64,
        /// Ring size.
        slots: u64,
    },
    /// A ring of a vCPU the device does not have.
    #[error("there is no output ring for vCPU {0}")]
    NoSuchRing(u32),
    /// Guest memory could not be accessed.
    #[error("guest memory access failed: {0}")]
    Memory(String),
    /// Saved state that does not fit this device.
    #[error("device state does not fit: {0}")]
    State(String),
    /// The sink failed.
    #[error("the output sink failed: {0} (is the disk full or the reader gone?)")]
    Sink(#[from] std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
