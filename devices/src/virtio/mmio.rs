//! The virtio-mmio transport, version 2: the register file of one device window.
//!
//! ```text
//!  0x000 Magic "virt"   0x004 Version 2     0x008 DeviceID        0x00c VendorID
//!  0x010 DevFeatures R  0x014 DevFeatSel W  0x020 DrvFeatures W   0x024 DrvFeatSel W
//!  0x030 QueueSel W     0x034 QueueNumMax R 0x038 QueueNum W      0x044 QueueReady RW
//!  0x050 QueueNotify W  0x060 IntStatus R   0x064 IntACK W        0x070 Status RW
//!  0x080 DescLo/Hi W    0x090 DriverLo/Hi W 0x0a0 DeviceLo/Hi W   0x0fc ConfigGeneration R
//!  0x100 …              device configuration space
//!
//!  Status:  0 ─ACK─▶ 1 ─DRIVER─▶ 3 ─FEATURES_OK─▶ 11 ─(queues)─DRIVER_OK─▶ 15  (activate)
//!           any ─FAILED─▶ +128;  device error ─▶ +NEEDS_RESET (64) + config interrupt;
//!           write 0 ─▶ reset (queues, features, interrupt status, device run-time state)
//! ```
//!
//! What the driver may do when (anything else is refused):
//! * feature pages: after DRIVER, before FEATURES_OK; FEATURES_OK is refused (the bit stays
//!   clear, as the spec asks) unless the driver accepted VERSION_1 and only offered bits;
//! * queue registers: after FEATURES_OK, before DRIVER_OK, on a queue that is not ready.
//!   A size that is not a power of two ≤ QueueNumMax, a misaligned ring, rings outside guest
//!   memory at QueueReady = 1, or any change to a ready queue or after DRIVER_OK sets
//!   NEEDS_RESET. Writes before FEATURES_OK are ignored with a warning.

use std::sync::Arc;

use log::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{Error, GuestMem, Interrupt, Result, VirtioDevice, VIRTIO_F_VERSION_1};

/// "virt", little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version (2: modern, no legacy registers).
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id ("TNDM", little endian).
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"TNDM");
/// Offset of the configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Register offsets.
pub mod reg {
    /// MagicValue (R): 0x74726976.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version (R): 2.
    pub const VERSION: u64 = 0x004;
    /// DeviceID (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures (R): 32 offered bits, page DeviceFeaturesSel.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures (W): 32 accepted bits, page DriverFeaturesSel.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax (R): 0 for a queue that does not exist.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify (W): the queue index.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status (RW).
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (W): the available ring.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow (W): the used ring.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// SHMSel (W): no shared-memory regions here.
    pub const SHM_SEL: u64 = 0x0ac;
    /// SHMLenLow (R): all ones (no region).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// SHMLenHigh (R): all ones.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// SHMBaseLow (R): all ones.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// SHMBaseHigh (R): all ones.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Status bits.
pub mod status {
    use super::*;
    /// The driver found the device.
    pub const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The driver knows how to drive it.
    pub const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready: the device runs.
    pub const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    /// The driver accepted features and the device agreed.
    pub const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device broke and needs a reset (set by the device).
    pub const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up.
    pub const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
    /// Every bit a status may have.
    pub const ALL: u32 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | NEEDS_RESET | FAILED;
}

/// InterruptStatus bit: a buffer was used.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration (or NEEDS_RESET) changed.
pub const INT_CONFIG: u32 = 2;

/// One device window: registers, queues, interrupt, and the device behind them.
///
/// The monitor keeps it behind a mutex and calls [`read`](Self::read) / [`write`](Self::write)
/// from the vCPU thread that took the MMIO exit, and [`poll`](Self::poll) from whatever
/// thread watches [`poll_fd`](Self::poll_fd).
pub struct MmioTransport<D> {
    pub(super) device: D,
    pub(super) mem: GuestMem,
    pub(super) interrupt: Arc<dyn Interrupt>,
    pub(super) queues: Vec<Queue>,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) acked_features: u64,
    pub(super) queue_sel: u32,
    pub(super) status: u32,
    pub(super) interrupt_status: u32,
    pub(super) config_generation: u32,
    pub(super) activated: bool,
    pub(super) broken: Option<String>,
}

impl<D: std::fmt::Debug> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device)
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("interrupt_status", &self.interrupt_status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A device in its reset state. Fails if the device describes impossible queues.
    pub fn new(device: D, mem: GuestMem, interrupt: Arc<dyn Interrupt>) -> Result<Self> {
        let queues = new_queues(&device)?;
        if device.avail_features() & VIRTIO_F_VERSION_1 == 0 {
            return Err(Error::Activate(
                "the device does not offer VIRTIO_F_VERSION_1, which the mmio v2 transport needs"
                    .into(),
            ));
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
            broken: None,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (e.g. to take its dirty blocks).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Whether the device set NEEDS_RESET (it processes nothing until the driver resets it).
    pub fn needs_reset(&self) -> bool {
        self.status & status::NEEDS_RESET != 0
    }

    /// Why the device set NEEDS_RESET, until the driver resets it.
    pub fn needs_reset_reason(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Whether the device is running (DRIVER_OK, activated, not failed).
    pub fn is_active(&self) -> bool {
        self.activated && self.status & (status::NEEDS_RESET | status::FAILED) == 0
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The queues.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The fd to watch for [`poll`](Self::poll), if the device has input. Watch it
    /// edge-triggered: a device without guest buffers leaves input waiting (the fd stays
    /// readable) and picks it up when the driver posts buffers.
    pub fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.poll_fd()
    }

    /// A driver read of `data.len()` bytes at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                warn!(
                    "virtio-mmio: {}-byte config read at {offset:#x}; returning 0",
                    data.len()
                );
                data.fill(0);
                return;
            }
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            warn!(
                "virtio-mmio: {}-byte register read at {offset:#x}; registers are 32-bit and aligned; returning 0",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared-memory regions: a length of -1 says so.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A driver write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if self.status & status::DRIVER == 0 || self.status & status::FAILED != 0 {
                warn!("virtio-mmio: config write at {offset:#x} before DRIVER or after FAILED; ignored");
                return;
            }
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                warn!(
                    "virtio-mmio: {}-byte config write at {offset:#x}; ignored",
                    data.len()
                );
                return;
            }
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            warn!(
                "virtio-mmio: {}-byte register write at {offset:#x}; registers are 32-bit and aligned; ignored",
                data.len()
            );
            return;
        }
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => self.write_queue(offset, |q| {
                let max = q.max_size();
                u16::try_from(v)
                    .ok()
                    .and_then(|s| q.try_set_size(s).ok())
                    .ok_or_else(|| format!("queue size {v} is not a power of two ≤ {max}"))
            }),
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => self.write_queue(offset, |q| {
                let a = half(q.desc_table(), offset == reg::QUEUE_DESC_HIGH, v);
                q.try_set_desc_table_address(GuestAddress(a))
                    .map_err(|_| format!("descriptor table {a:#x} is not 16-byte aligned"))
            }),
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => self.write_queue(offset, |q| {
                let a = half(q.avail_ring(), offset == reg::QUEUE_DRIVER_HIGH, v);
                q.try_set_avail_ring_address(GuestAddress(a))
                    .map_err(|_| format!("available ring {a:#x} is not 2-byte aligned"))
            }),
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => self.write_queue(offset, |q| {
                let a = half(q.used_ring(), offset == reg::QUEUE_DEVICE_HIGH, v);
                q.try_set_used_ring_address(GuestAddress(a))
                    .map_err(|_| format!("used ring {a:#x} is not 4-byte aligned"))
            }),
            reg::QUEUE_READY => self.write_queue_ready(v),
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => {
                self.interrupt_status &= !v;
                if self.interrupt_status == 0 {
                    self.interrupt.deassert();
                }
            }
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => warn!("virtio-mmio: write of {v:#x} to read-only or unknown register {offset:#x}; ignored"),
        }
    }

    /// Back-end input may be waiting (the [`poll_fd`](Self::poll_fd) was readable): lets the
    /// device move it into the guest. Returns whether it raised the used-buffer interrupt.
    pub fn poll(&mut self) -> bool {
        if !self.is_active() {
            return false;
        }
        let r = self.device.poll(&self.mem, &mut self.queues);
        self.after_device(r)
    }

    /// The driver's guest memory changed (e.g. after a restore into another VM).
    pub fn set_memory(&mut self, mem: GuestMem) {
        self.mem = mem;
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            warn!("virtio-mmio: driver features written outside DRIVER..FEATURES_OK; ignored");
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            s => {
                if v != 0 {
                    warn!("virtio-mmio: driver accepted features {v:#x} in page {s}, which offers none; ignored")
                }
            }
        }
    }

    /// A write to one of the selected queue's setup registers.
    fn write_queue(
        &mut self,
        offset: u64,
        f: impl FnOnce(&mut Queue) -> std::result::Result<(), String>,
    ) {
        if self.status & status::NEEDS_RESET != 0 {
            return;
        }
        let qsel = self.queue_sel;
        if self.status & status::DRIVER_OK != 0 {
            self.set_needs_reset(&format!(
                "the driver changed queue {qsel} (register {offset:#x}) while the device runs"
            ));
            return;
        }
        if self.status & status::FEATURES_OK == 0 || self.status & status::FAILED != 0 {
            warn!("virtio-mmio: queue register {offset:#x} written before FEATURES_OK or after FAILED; ignored");
            return;
        }
        let Some(q) = self.queues.get_mut(qsel as usize) else {
            warn!("virtio-mmio: queue register {offset:#x} written for queue {qsel}, which does not exist; ignored");
            return;
        };
        if q.ready() {
            self.set_needs_reset(&format!(
                "the driver changed queue {qsel} (register {offset:#x}) while it is ready"
            ));
            return;
        }
        if let Err(why) = f(q) {
            self.set_needs_reset(&format!("queue {qsel}: {why}"));
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        let qsel = self.queue_sel as usize;
        if v == 0 {
            // Linux writes 0 to every queue after a reset when it removes a device; that is
            // fine. Stopping a queue of a running device is not (no VIRTIO_F_RING_RESET).
            if self.status & status::DRIVER_OK != 0
                && self.queues.get(qsel).is_some_and(|q| q.ready())
            {
                self.set_needs_reset(&format!(
                    "the driver stopped queue {qsel} while the device runs"
                ));
                // QueueReady reads back what the driver wrote (virtio 1.2 §4.2.2): drivers
                // that tear a queue down this way (virtio-drivers' Drop) wait for the 0.
                if let Some(q) = self.queues.get_mut(qsel) {
                    q.set_ready(false);
                }
            } else if let Some(q) = self.queues.get_mut(qsel) {
                q.set_ready(false);
            }
            return;
        }
        if self.queues.get(qsel).is_some_and(|q| q.ready()) {
            return;
        }
        let mem = self.mem.clone();
        self.write_queue(reg::QUEUE_READY, |q| {
            q.set_ready(true);
            if q.is_valid(&mem) {
                Ok(())
            } else {
                q.set_ready(false);
                Err(format!(
                    "rings at desc {:#x}, avail {:#x}, used {:#x} (size {}) are not inside guest memory",
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring(),
                    q.size()
                ))
            }
        });
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let v = v & !status::NEEDS_RESET; // device-owned
        let old = self.status & !status::NEEDS_RESET;
        if v & !status::ALL != 0 {
            warn!("virtio-mmio: status {v:#x} has unknown bits; ignored");
            return;
        }
        if v & old != old {
            warn!("virtio-mmio: status {v:#x} clears bits of {old:#x}; only a write of 0 (reset) may; ignored");
            return;
        }
        let added = v & !old;
        if added & status::FAILED != 0 {
            warn!(
                "virtio-mmio: the driver gave up on device {} (FAILED)",
                self.device.device_type()
            );
            self.status |= status::FAILED;
            return;
        }
        let needs = |bit: u32, pre: u32| added & bit == 0 || v & pre == pre;
        if !(needs(status::DRIVER, status::ACKNOWLEDGE)
            && needs(status::FEATURES_OK, status::DRIVER)
            && needs(status::DRIVER_OK, status::FEATURES_OK))
        {
            warn!("virtio-mmio: status {v:#x} skips a step (from {old:#x}); ignored");
            return;
        }
        if added & status::FEATURES_OK != 0 {
            let extra = self.acked_features & !self.device.avail_features();
            if extra != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                warn!(
                    "virtio-mmio: FEATURES_OK refused: the driver accepted {:#x} (offered {:#x}; VERSION_1 is required)",
                    self.acked_features,
                    self.device.avail_features()
                );
                self.status |= v & !status::FEATURES_OK & !status::DRIVER_OK;
                return;
            }
        }
        self.status |= v;
        if added & status::DRIVER_OK != 0 && self.status & status::NEEDS_RESET == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let r = self
            .device
            .activate(&self.mem, self.acked_features, &mut self.queues);
        match r {
            Ok(()) => self.activated = true,
            Err(e) => self.set_needs_reset(&e.to_string()),
        }
    }

    fn notify(&mut self, v: u32) {
        if !self.is_active() {
            debug!("virtio-mmio: notify of queue {v} while the device is not running; ignored");
            return;
        }
        let idx = v as usize;
        if !self.queues.get(idx).is_some_and(|q| q.ready()) {
            warn!(
                "virtio-mmio: notify of queue {v}, which is not ready or does not exist; ignored"
            );
            return;
        }
        let r = self.device.process_queue(&self.mem, &mut self.queues, idx);
        self.after_device(r);
    }

    /// Raises the interrupt for used buffers, or marks the device broken.
    fn after_device(&mut self, r: Result<bool>) -> bool {
        match r {
            Ok(true) => {
                self.interrupt_status |= INT_VRING;
                self.interrupt.trigger();
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.set_needs_reset(&e.to_string());
                false
            }
        }
    }

    /// The device cannot go on: NEEDS_RESET, and a configuration interrupt once the driver
    /// runs it (the spec's way to tell the driver).
    pub(super) fn set_needs_reset(&mut self, why: &str) {
        warn!(
            "virtio-mmio: device {} needs a reset: {why}",
            self.device.device_type()
        );
        if self.status & status::NEEDS_RESET != 0 {
            return;
        }
        self.status |= status::NEEDS_RESET;
        self.broken = Some(why.to_string());
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt_status |= INT_CONFIG;
            self.interrupt.trigger();
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.activated = false;
        self.broken = None;
        if self.interrupt_status != 0 {
            self.interrupt_status = 0;
            self.interrupt.deassert();
        }
    }
}

/// The queues a device asks for.
pub(super) fn new_queues<D: VirtioDevice + ?Sized>(device: &D) -> Result<Vec<Queue>> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&m| {
            if m > super::MAX_QUEUE_SIZE {
                return Err(Error::Activate(format!(
                    "queue size {m} is over {}",
                    super::MAX_QUEUE_SIZE
                )));
            }
            Queue::new(m).map_err(|e| Error::Activate(format!("queue size {m}: {e}")))
        })
        .collect()
}

/// `old` with its low or high 32 bits replaced by `v`.
fn half(old: u64, high: bool, v: u32) -> u64 {
    if high {
        (old & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (old & !0xffff_ffff) | u64::from(v)
    }
}

#[cfg(test)]
mod tests;
