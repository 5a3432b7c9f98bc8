//! vmx's checkpoint groups: the machine configuration (`config`) here; the devices' groups
//! (`output`, `vmmdev`) live beside their devices and are re-exported.

use checkpoint::{Error as CptError, Group, Persist};
use serde::{Deserialize, Serialize};

pub use devices::output::{OutputGroup as DeviceOutputGroup, Sinks};
pub use devices::vmmdev::VmmDevGroup;

/// The `output` group of this VM's memory.
pub type OutputGroup = DeviceOutputGroup<monitor::GuestMem>;

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
    /// virtio-blk devices (`--disk`), windows 0.. (v2).
    pub disks: Vec<devices::virtio::BlockConfig>,
    /// virtio-net devices (`--net`), windows after the disks (v2).
    pub nets: Vec<devices::virtio::NetConfig>,
}

impl MachineConfig {
    /// The same machine, whatever back ends its devices use on this host: equal but for
    /// the disks' image paths and the cards' TAP names (a standby runs the primary's machine
    /// on its own replicas and TAPs).
    pub fn same_machine(&self, other: &MachineConfig) -> bool {
        let strip = |c: &MachineConfig| {
            let mut c = c.clone();
            for d in &mut c.disks {
                d.path = Default::default();
            }
            for n in &mut c.nets {
                n.tap = String::new();
            }
            c
        };
        strip(self) == strip(other)
    }
}

/// [`MachineConfig`] as version 1 saved it (no devices).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfigV1 {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Entry point.
    pub entry: u64,
    /// What the guest is.
    pub guest: String,
}

/// Version of [`MachineConfig`]'s saved layout.
pub const CONFIG_VERSION: u32 = ConfigPersist::VERSION;

/// The machine configuration as a [`Persist`] component. Version 2 added the virtio
/// devices; version 1 (no devices) still loads.
pub struct ConfigPersist;
impl Persist for ConfigPersist {
    const NAME: &'static str = "config";
    const VERSION: u32 = 2;
    type State = MachineConfig;
    fn reads(version: u32) -> bool {
        version == 1 || version == 2
    }
    fn upgrade(version: u32, data: &[u8]) -> Result<MachineConfig, CptError> {
        debug_assert_eq!(version, 1);
        let v1: MachineConfigV1 = postcard::from_bytes(data).map_err(|e| CptError::Component {
            component: "config".into(),
            msg: format!("state version 1 does not decode: {e}"),
        })?;
        Ok(MachineConfig {
            vcpus: v1.vcpus,
            mem_mib: v1.mem_mib,
            entry: v1.entry,
            guest: v1.guest,
            disks: Vec::new(),
            nets: Vec::new(),
        })
    }
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
        ConfigPersist::encode(&self.0)
    }
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), CptError> {
        let saved = ConfigPersist::decode(version, data)?;
        if !saved.same_machine(&self.0) {
            return Err(CptError::component(
                "config",
                format!("saved {saved:?}, VM built as {:?}", self.0),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_s_own_back_ends_are_the_same_machine_and_anything_else_is_not() {
        let primary = MachineConfig {
            vcpus: 1,
            mem_mib: 64,
            entry: 0x20_0000,
            guest: "kv".into(),
            disks: vec![devices::virtio::BlockConfig::parse("/a/disk").unwrap()],
            nets: vec![devices::virtio::NetConfig::parse("tap=tapA").unwrap()],
        };
        let mut standby = primary.clone();
        standby.disks[0].path = "/b/replica".into();
        standby.nets[0].tap = "tapB".into();
        assert!(primary.same_machine(&standby));
        let mut other = standby.clone();
        other.nets[0].mac = Some([2, 0, 0, 0, 0, 1]);
        assert!(
            !primary.same_machine(&other),
            "the guest's MAC is the machine's"
        );
        let mut other = standby.clone();
        other.disks[0].readonly = true;
        assert!(!primary.same_machine(&other));
        let mut other = standby;
        other.mem_mib = 128;
        assert!(!primary.same_machine(&other));
    }

    #[test]
    fn config_v1_without_devices_still_loads() {
        let v1 = MachineConfigV1 {
            vcpus: 2,
            mem_mib: 64,
            entry: 0x20_0000,
            guest: "counter".into(),
        };
        let c = ConfigPersist::decode(1, &postcard::to_stdvec(&v1).unwrap()).unwrap();
        assert_eq!(
            (c.vcpus, c.mem_mib, c.entry, c.guest.as_str()),
            (2, 64, 0x20_0000, "counter")
        );
        assert!(c.disks.is_empty() && c.nets.is_empty());

        let v2 = MachineConfig {
            disks: vec![devices::virtio::BlockConfig::parse("/d.img,readonly").unwrap()],
            nets: vec![devices::virtio::NetConfig::parse("tap=tap0").unwrap()],
            ..c
        };
        let bytes = ConfigPersist::encode(&v2).unwrap();
        assert_eq!(ConfigPersist::decode(2, &bytes).unwrap(), v2);
        assert!(ConfigPersist::decode(3, &bytes).is_err());
    }
}
