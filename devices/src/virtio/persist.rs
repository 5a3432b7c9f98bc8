//! Saved state of a virtio-mmio device (Firecracker style: one versioned struct beside the
//! device, restored into a fresh device).
//!
//! ```text
//!  encoded:  version u32 LE | postcard(VirtioState)
//!  VirtioState
//!   ├─ transport: TransportState  status, features (offered, acked, selectors), queue_sel,
//!   │                             interrupt status, config generation,
//!   │                             queues[]: max, size, ready, desc/avail/used, next_avail/used
//!   └─ device: DeviceState        Block { path, readonly, capacity } | Net { tap, mac } | None
//! ```
//!
//! The rings themselves live in guest memory and travel with it. A restore checks everything
//! against the fresh device and the guest memory before anything runs: device type, queue
//! count and sizes, ring alignment, rings inside memory, status bits, accepted features ⊆
//! offered. A running device (DRIVER_OK) is activated again. The interrupt line is not
//! re-raised: a pending interrupt is part of the interrupt controller's saved state.
//! Run-time extras are not saved: a net frame read from the TAP but not yet delivered (as if
//! the wire dropped it), counters, and the block dirty bitmap (the replication layer takes it
//! at every epoch).

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::block::Block;
use super::mmio::{self, status, MmioTransport};
use super::net::{Net, NetBackend};
use super::{Error, GuestMem, Interrupt, Result, VirtioDevice};

/// The version [`VirtioState::encode`] writes and [`VirtioState::decode`] reads.
pub const VIRTIO_STATE_VERSION: u32 = 1;

/// One queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// QueueNumMax.
    pub max_size: u16,
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

/// The transport's registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// DeviceID.
    pub device_type: u32,
    /// Features the device offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// Status.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The queues.
    pub queues: Vec<QueueSnapshot>,
}

/// A block device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The image.
    pub path: PathBuf,
    /// Read-only.
    pub readonly: bool,
    /// Size in sectors (the restored image must have it).
    pub capacity_sectors: u64,
}

/// A net device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// TAP interface name.
    pub tap: String,
    /// The guest's MAC.
    pub mac: [u8; 6],
}

/// The device-specific part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// A device with nothing of its own to save.
    None,
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
}

/// Everything saved of one virtio-mmio device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// The transport.
    pub transport: TransportState,
    /// The device.
    pub device: DeviceState,
}

impl VirtioState {
    /// `version u32 LE | postcard`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = VIRTIO_STATE_VERSION.to_le_bytes().to_vec();
        out.extend(postcard::to_stdvec(self).expect("in-memory serialization"));
        out
    }

    /// Decodes what [`encode`](Self::encode) wrote; another version is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let Some((v, rest)) = bytes.split_first_chunk::<4>() else {
            return Err(Error::State(
                "the saved virtio state is shorter than its version".into(),
            ));
        };
        let v = u32::from_le_bytes(*v);
        if v != VIRTIO_STATE_VERSION {
            return Err(Error::UnknownStateVersion(v));
        }
        postcard::from_bytes(rest)
            .map_err(|e| Error::State(format!("the saved virtio state does not decode: {e}")))
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The saved state (call with the vCPUs stunned).
    pub fn save(&self) -> VirtioState {
        VirtioState {
            transport: TransportState {
                device_type: self.device.device_type(),
                avail_features: self.device.avail_features(),
                acked_features: self.acked_features,
                device_features_sel: self.device_features_sel,
                driver_features_sel: self.driver_features_sel,
                queue_sel: self.queue_sel,
                status: self.status,
                interrupt_status: self.interrupt_status,
                config_generation: self.config_generation,
                queues: self
                    .queues
                    .iter()
                    .map(|q| QueueSnapshot {
                        max_size: q.max_size(),
                        size: q.size(),
                        ready: q.ready(),
                        desc_table: q.desc_table(),
                        avail_ring: q.avail_ring(),
                        used_ring: q.used_ring(),
                        next_avail: q.next_avail(),
                        next_used: q.next_used(),
                    })
                    .collect(),
            },
            device: self.device.save_device(),
        }
    }

    /// A transport for `device` (built from `state.device`) in the saved state, checked
    /// against the device and `mem`; a running device is activated again.
    pub fn restore(
        state: &VirtioState,
        mem: GuestMem,
        device: D,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<Self> {
        let t = &state.transport;
        let bad = |why: String| Err(Error::State(why));
        if t.device_type != device.device_type() {
            return bad(format!(
                "the saved device has type {}, this one {}",
                t.device_type,
                device.device_type()
            ));
        }
        let extra = t.acked_features & !device.avail_features();
        if extra != 0 {
            return bad(format!(
                "the driver accepted features {extra:#x} this device does not offer"
            ));
        }
        if t.status & !status::ALL != 0
            || t.interrupt_status & !(mmio::INT_VRING | mmio::INT_CONFIG) != 0
        {
            return bad(format!(
                "status {:#x} / interrupt status {:#x} has unknown bits",
                t.status, t.interrupt_status
            ));
        }
        let sizes = device.queue_max_sizes();
        if t.queues.len() != sizes.len() {
            return bad(format!(
                "{} saved queues, the device has {}",
                t.queues.len(),
                sizes.len()
            ));
        }
        let mut queues = Vec::with_capacity(sizes.len());
        for (i, (s, &max)) in t.queues.iter().zip(sizes).enumerate() {
            if s.max_size != max {
                return bad(format!(
                    "queue {i}: saved maximum size {}, the device has {max}",
                    s.max_size
                ));
            }
            let q = Queue::try_from(QueueState {
                max_size: s.max_size,
                next_avail: s.next_avail,
                next_used: s.next_used,
                event_idx_enabled: false,
                size: s.size,
                ready: s.ready,
                desc_table: s.desc_table,
                avail_ring: s.avail_ring,
                used_ring: s.used_ring,
            })
            .map_err(|e| Error::State(format!("queue {i}: {e}")))?;
            if q.ready() && !q.is_valid(&mem) {
                return bad(format!(
                    "queue {i}: its rings are not inside this VM's guest memory"
                ));
            }
            queues.push(q);
        }
        let mut tr = MmioTransport::new(device, mem, interrupt)?;
        tr.queues = queues;
        tr.acked_features = t.acked_features;
        tr.device_features_sel = t.device_features_sel;
        tr.driver_features_sel = t.driver_features_sel;
        tr.queue_sel = t.queue_sel;
        tr.status = t.status;
        tr.interrupt_status = t.interrupt_status;
        tr.config_generation = t.config_generation;
        if t.status & status::DRIVER_OK != 0
            && t.status & (status::NEEDS_RESET | status::FAILED) == 0
        {
            tr.device
                .activate(&tr.mem, tr.acked_features, &mut tr.queues)
                .map_err(|e| Error::State(format!("the restored device does not start: {e}")))?;
            tr.activated = true;
        }
        Ok(tr)
    }
}

/// Restores a block device: on `image`, or else on the saved path.
pub fn restore_block(
    state: &VirtioState,
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    image: Option<File>,
) -> Result<MmioTransport<Block>> {
    let DeviceState::Block(b) = &state.device else {
        return Err(Error::State(format!(
            "the saved device is not a block device: {:?}",
            state.device
        )));
    };
    MmioTransport::restore(state, mem, Block::from_state(b, image)?, interrupt)
}

/// Restores a net device: on `backend`, or else on the saved TAP.
pub fn restore_net(
    state: &VirtioState,
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    backend: Option<NetBackend>,
) -> Result<MmioTransport<Net>> {
    let DeviceState::Net(n) = &state.device else {
        return Err(Error::State(format!(
            "the saved device is not a net device: {:?}",
            state.device
        )));
    };
    MmioTransport::restore(state, mem, Net::from_state(n, backend)?, interrupt)
}
