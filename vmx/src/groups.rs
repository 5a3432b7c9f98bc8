//! vmx's checkpoint groups: the machine configuration and the output device.

use std::io::Write;

use checkpoint::{Error as CptError, Group};
use devices::output::{DigestSink, OutputState, DIGEST_STATE_VERSION, OUTPUT_STATE_VERSION};
use devices::{OutputDevice, OutputSink, Record, TextSink};
use monitor::GuestMem;
use serde::{Deserialize, Serialize};

/// What power-on needs to know before the VM exists (saved as group `config`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Entry point.
    pub entry: u64,
    /// What the guest is (for people: "counter iters=…", "image foo.bin").
    pub guest: String,
}

/// Version of [`MachineConfig`]'s saved layout.
pub const CONFIG_VERSION: u32 = 1;

fn encode<T: Serialize>(group: &str, v: &T) -> Result<Vec<u8>, CptError> {
    postcard::to_stdvec(v).map_err(|e| CptError::component(group, e))
}

fn decode<'a, T: Deserialize<'a>>(group: &str, data: &'a [u8]) -> Result<T, CptError> {
    postcard::from_bytes(data)
        .map_err(|e| CptError::component(group, format!("state does not decode: {e}")))
}

/// The `config` group.
pub struct ConfigGroup(pub MachineConfig);

impl Group for ConfigGroup {
    fn name(&self) -> &'static str {
        "config"
    }
    fn version(&self) -> u32 {
        CONFIG_VERSION
    }
    fn checkpoint(&mut self) -> Result<Vec<u8>, CptError> {
        encode("config", &self.0)
    }
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), CptError> {
        if version != CONFIG_VERSION {
            return Err(CptError::component(
                "config",
                format!("version {version} is not one this build reads (1)"),
            ));
        }
        let saved: MachineConfig = decode("config", data)?;
        if saved != self.0 {
            return Err(CptError::component(
                "config",
                format!("saved {saved:?}, VM built as {:?}", self.0),
            ));
        }
        Ok(())
    }
}

/// The `vmmdev` group: the guest-host device with the heartbeat.
#[derive(Default)]
pub struct VmmDevGroup {
    /// The device.
    pub dev: devices::vmmdev::VmmDev,
}

impl Group for VmmDevGroup {
    fn name(&self) -> &'static str {
        "vmmdev"
    }
    fn version(&self) -> u32 {
        devices::vmmdev::VMMDEV_STATE_VERSION
    }
    fn checkpoint(&mut self) -> Result<Vec<u8>, CptError> {
        encode("vmmdev", &self.dev.save_state())
    }
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), CptError> {
        self.dev
            .restore_state(version, data, std::time::Instant::now())
            .map_err(|e| CptError::component("vmmdev", e))
    }
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
pub struct OutputGroup {
    /// The device.
    pub dev: OutputDevice<GuestMem>,
    /// Its sinks.
    pub sinks: Sinks,
}

/// Saved state of the `output` group (v1): the device and the digest so far.
#[derive(Serialize, Deserialize)]
struct OutputGroupState {
    device: OutputState,
    device_version: u32,
    digest: DigestSink,
    digest_version: u32,
}

impl OutputGroup {
    /// Drains vCPU `vcpu`'s ring.
    pub fn drain(&mut self, vcpu: u32) -> devices::Result<usize> {
        self.dev.drain(vcpu, &mut self.sinks)
    }
    /// Drains every ring.
    pub fn drain_all(&mut self) -> devices::Result<usize> {
        let mut n = 0;
        for v in 0..self.dev.drained().len() as u32 {
            n += self.drain(v)?;
        }
        Ok(n)
    }
}

impl Group for OutputGroup {
    fn name(&self) -> &'static str {
        "output"
    }
    fn version(&self) -> u32 {
        1
    }
    fn sync(&mut self) -> Result<(), CptError> {
        // Everything the guest produced before the stun leaves the VM before the save.
        self.drain_all()
            .map_err(|e| CptError::component("output", e))?;
        self.sinks
            .flush()
            .map_err(|e| CptError::component("output", e))
    }
    fn checkpoint(&mut self) -> Result<Vec<u8>, CptError> {
        encode(
            "output",
            &OutputGroupState {
                device: self.dev.save_state(),
                device_version: OUTPUT_STATE_VERSION,
                digest: self.sinks.digest.clone(),
                digest_version: DIGEST_STATE_VERSION,
            },
        )
    }
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), CptError> {
        if version != 1 {
            return Err(CptError::component(
                "output",
                format!("version {version} is not one this build reads (1)"),
            ));
        }
        let s: OutputGroupState = decode("output", data)?;
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
