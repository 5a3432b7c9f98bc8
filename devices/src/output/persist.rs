//! Saved state of the output device and the `output` checkpoint group.
//!
//! ```text
//!  group "output", version 1 (postcard):
//!    device          OutputState { rings: [u64], drained: [u64] }   (OUTPUT_STATE_VERSION)
//!    device_version  u32
//!    digest          DigestSink (one hash chain per vCPU)            (DIGEST_STATE_VERSION)
//!    digest_version  u32
//! ```
//!
//! The rings live in guest memory (saved with it); the device keeps only how much it has
//! drained from each.

use std::io::Write;

use checkpoint::{Error as CptError, Group, Persist};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryBackend;

use super::{DigestSink, OutputDevice, OutputSink, Record, TextSink, DIGEST_STATE_VERSION};

/// Saved state of the output device (version [`OUTPUT_STATE_VERSION`]). The rings themselves
/// live in guest memory; the device keeps only how much it has drained from each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputState {
    /// Ring addresses, per vCPU.
    pub rings: Vec<u64>,
    /// Records drained, per vCPU.
    pub drained: Vec<u64>,
}

/// Version of [`OutputState`].
pub const OUTPUT_STATE_VERSION: u32 = 1;

/// The output device's state as a [`Persist`] component.
pub struct OutputPersist;
impl Persist for OutputPersist {
    const NAME: &'static str = "output";
    const VERSION: u32 = 1;
    type State = OutputGroupState;
}

/// Where drained records go: the running digest, and optionally text lines.
pub struct Sinks {
    /// The digest of every vCPU's stream.
    pub digest: DigestSink,
    /// Text lines, if asked for.
    pub text: Option<TextSink<Box<dyn Write + Send>>>,
    /// Replication: records held per vCPU until their epoch is acknowledged (the text lines are
    /// written on release instead).
    pub hold: Option<Vec<Vec<Record>>>,
}

impl OutputSink for Sinks {
    fn records(&mut self, vcpu: u32, records: &[Record]) -> std::io::Result<()> {
        self.digest.records(vcpu, records)?;
        if let Some(h) = &mut self.hold {
            if let Some(lane) = h.get_mut(vcpu as usize) {
                lane.extend_from_slice(records);
            }
        } else if let Some(t) = &mut self.text {
            t.records(vcpu, records)?;
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.text {
            Some(t) => t.flush(),
            None => Ok(()),
        }
    }
}

/// The `output` group: the output device and what it has emitted.
pub struct OutputGroup<M> {
    /// The device.
    pub dev: OutputDevice<M>,
    /// Its sinks.
    pub sinks: Sinks,
}

/// Saved state of the `output` group (v1): the device and the digest so far.
#[derive(Serialize, Deserialize)]
pub struct OutputGroupState {
    device: OutputState,
    device_version: u32,
    digest: DigestSink,
    digest_version: u32,
}

impl<M: GuestMemoryBackend> OutputGroup<M> {
    /// Drains vCPU `vcpu`'s ring.
    pub fn drain(&mut self, vcpu: u32) -> crate::Result<usize> {
        self.dev.drain(vcpu, &mut self.sinks)
    }
    /// Drains every ring.
    pub fn drain_all(&mut self) -> crate::Result<usize> {
        let mut n = 0;
        for v in 0..self.dev.drained().len() as u32 {
            n += self.drain(v)?;
        }
        Ok(n)
    }
}

impl<M: GuestMemoryBackend + Send> Group for OutputGroup<M> {
    fn name(&self) -> &'static str {
        "output"
    }
    fn version(&self) -> u32 {
        OutputPersist::VERSION
    }
    fn sync(&mut self) -> Result<Option<String>, CptError> {
        // Everything the guest produced before the stun leaves the VM before the save.
        self.drain_all()
            .map_err(|e| CptError::component("output", e))?;
        self.sinks
            .flush()
            .map_err(|e| CptError::component("output", e))?;
        Ok(Some("drain output rings".into()))
    }
    fn checkpoint(&mut self) -> Result<Vec<u8>, CptError> {
        OutputPersist::encode(&OutputGroupState {
            device: self.dev.save_state(),
            device_version: OUTPUT_STATE_VERSION,
            digest: self.sinks.digest.clone(),
            digest_version: DIGEST_STATE_VERSION,
        })
    }
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), CptError> {
        let s = OutputPersist::decode(version, data)?;
        if s.device_version != OUTPUT_STATE_VERSION || s.digest_version != DIGEST_STATE_VERSION {
            return Err(CptError::component(
                "output",
                "unknown device or digest state version",
            ));
        }
        if s.digest.vcpus() != self.sinks.digest.vcpus() {
            return Err(CptError::component(
                "output",
                "digest state for another number of vCPUs",
            ));
        }
        self.dev
            .restore_state(s.device)
            .map_err(|e| CptError::component("output", e))?;
        self.sinks.digest = s.digest;
        Ok(())
    }
}
