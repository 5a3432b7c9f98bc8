//! Saved state of the vmmdev device and the `vmmdev` checkpoint group.
//!
//! ```text
//!  group "vmmdev" (postcard)
//!    v1: guest_version u32
//!    v2: guest_version u32 | heartbeat_interval_ms u32 | heartbeat_pings u64 |
//!        heartbeat_flatlined bool | heartbeat_flatlines u64
//! ```
//!
//! Version 2 added the heartbeat; this build still loads version 1 (the heartbeat is off).

use checkpoint::{Error as CptError, Group, Persist};
use serde::{Deserialize, Serialize};

/// Saved state, version 1 (before the heartbeat).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmDevStateV1 {
    /// The version the guest reported.
    pub guest_version: u32,
}

/// Saved state, version 2 (current).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmDevStateV2 {
    /// The version the guest reported.
    pub guest_version: u32,
    /// Heartbeat interval in ms (0: off).
    pub heartbeat_interval_ms: u32,
    /// Pings received.
    pub heartbeat_pings: u64,
    /// The guest was flatlined when saved.
    pub heartbeat_flatlined: bool,
    /// Flatlines seen.
    pub heartbeat_flatlines: u64,
}

/// The current saved-state version.
pub const VMMDEV_STATE_VERSION: u32 = 2;

/// The vmmdev state as a [`Persist`] component: writes v2, reads v1 and v2.
pub struct VmmDevPersist;
impl Persist for VmmDevPersist {
    const NAME: &'static str = "vmmdev";
    const VERSION: u32 = VMMDEV_STATE_VERSION;
    type State = VmmDevStateV2;
    fn reads(version: u32) -> bool {
        version == 1 || version == 2
    }
    fn upgrade(version: u32, data: &[u8]) -> Result<VmmDevStateV2, CptError> {
        if version != 1 {
            return Err(checkpoint::persist::version_error::<Self>(version));
        }
        let v1: VmmDevStateV1 = postcard::from_bytes(data).map_err(|e| CptError::Component {
            component: Self::NAME.into(),
            msg: format!("state version 1 does not decode: {e}"),
        })?;
        Ok(VmmDevStateV2 {
            guest_version: v1.guest_version,
            ..Default::default()
        })
    }
}

/// The `vmmdev` group: the guest-host device with the heartbeat.
#[derive(Default)]
pub struct VmmDevGroup {
    /// The device.
    pub dev: super::VmmDev,
}

impl Group for VmmDevGroup {
    fn name(&self) -> &'static str {
        "vmmdev"
    }
    fn version(&self) -> u32 {
        VMMDEV_STATE_VERSION
    }
    fn checkpoint(&mut self) -> Result<Vec<u8>, CptError> {
        VmmDevPersist::encode(&self.dev.save_state())
    }
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), CptError> {
        self.dev
            .restore_state(version, data, std::time::Instant::now())
            .map_err(|e| CptError::component("vmmdev", e))
    }
}
