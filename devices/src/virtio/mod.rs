//! virtio devices on the virtio-mmio transport (version 2), device side.
//!
//! Each device sits in its own 4 KiB MMIO window (`guest_abi::layout::mmio_window(i)`, GSI
//! `MMIO_GSI_BASE + i`). The window's register file ([`mmio::MmioTransport`]):
//!
//! ```text
//!  off    name                 dir  notes
//!  0x000  MagicValue           R    0x74726976 ("virt")
//!  0x004  Version              R    2 (no legacy interface)
//!  0x008  DeviceID             R    1 net, 2 block
//!  0x00c  VendorID             R    VENDOR_ID
//!  0x010  DeviceFeatures       R    32 bits of the offer, page DeviceFeaturesSel
//!  0x014  DeviceFeaturesSel    W
//!  0x020  DriverFeatures       W    32 bits of the acceptance, page DriverFeaturesSel
//!  0x024  DriverFeaturesSel    W
//!  0x030  QueueSel             W
//!  0x034  QueueNumMax          R    0: no such queue
//!  0x038  QueueNum             W    power of two, ≤ QueueNumMax
//!  0x044  QueueReady           RW   1 only with rings inside guest memory
//!  0x050  QueueNotify          W    queue index → the device processes that queue
//!  0x060  InterruptStatus      R    bit 0 used buffer, bit 1 configuration change
//!  0x064  InterruptACK         W
//!  0x070  Status               RW   ACKNOWLEDGE 1 | DRIVER 2 | DRIVER_OK 4 | FEATURES_OK 8
//!                                   | NEEDS_RESET 64 (device) | FAILED 128; 0 resets
//!  0x080  QueueDescLow/High    W    16-byte aligned
//!  0x090  QueueDriverLow/High  W    (available ring) 2-byte aligned
//!  0x0a0  QueueDeviceLow/High  W    (used ring) 4-byte aligned
//!  0x0fc  ConfigGeneration     R
//!  0x100  Config               RW   device-specific (block: capacity; net: MAC)
//! ```
//!
//! Registers below 0x100 are 32 bits wide and aligned; anything else is ignored with a
//! warning (reads return 0). A device runs after the driver sets DRIVER_OK; every descriptor
//! it then sees is checked ([`chain`]): a chain the device cannot walk to its end (a loop, a
//! `next` outside the table, more than [`MAX_CHAIN_DESCRIPTORS`], more than 4 GiB) or a
//! driver that breaks the ring protocol makes the device set NEEDS_RESET and stop until the
//! driver resets it; a request whose buffers are wrong (outside guest memory, wrapping
//! addresses, wrong direction, short header) fails just that request with an error status.
//! Nothing a guest writes makes the host panic or touch memory outside the guest's.
//!
//! The monitor's part:
//!
//! ```text
//!  vCPU thread, KVM_EXIT_MMIO at gpa in window i:  transports[i].lock().read(gpa - base, data)
//!                                                  transports[i].lock().write(gpa - base, data)
//!  event loop, poll_fd() readable (net RX):        transports[i].lock().poll()
//!    register poll_fd() edge-triggered (EPOLLIN | EPOLLET): the device reads the TAP only
//!    while the guest has RX buffers and leaves the rest waiting there; the QueueNotify that
//!    brings new RX buffers delivers what waits
//!  interrupt:  EventFdInterrupt's eventfd registered as an irqfd on GSI 5 + i
//!  checkpoint: transports[i].lock().save() → VirtioState::encode() (vCPUs stunned)
//!  restore:    persist::restore_block / restore_net, or MmioTransport::restore
//! ```

pub mod block;
pub mod chain;
pub mod hold;
pub mod inputs;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod tap;

#[cfg(test)]
mod testutil;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use log::warn;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use block::{Block, BlockConfig};
pub use hold::{FrameHold, HeldFrames, HoldStats};
pub use inputs::{InputFrame, InputTap};
pub use mmio::MmioTransport;
pub use net::{FrameSink, FrameSource, Net, NetBackend, NetConfig};
pub use persist::{DeviceState, VirtioState, VIRTIO_STATE_VERSION};
pub use tap::Tap;

/// Guest memory as the monitor has it: vm-memory's mmap backend with its dirty bitmap, so that
/// every byte a device writes into the guest counts as dirty for the next epoch.
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Most descriptors in one chain (direct or through an indirect table). Linux's block driver
/// uses 3 (we offer `seg_max` = this − 2), its net driver at most `MAX_SKB_FRAGS` + 2.
pub const MAX_CHAIN_DESCRIPTORS: usize = 128;

/// Largest queue any of our devices offers.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Feature bit: the device speaks virtio 1.x (the only kind we offer).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Everything that can go wrong in a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver broke the ring protocol; the device needs a reset.
    #[error("virtqueue {queue}: {source}; the guest driver must reset the device")]
    Queue {
        /// Queue index.
        queue: usize,
        /// What virtio-queue found.
        source: virtio_queue::Error,
    },
    /// A descriptor chain the device cannot walk; the device needs a reset.
    #[error("virtqueue {queue}: {source}; the guest driver must reset the device")]
    Chain {
        /// Queue index.
        queue: usize,
        /// What is wrong with the chain.
        source: chain::ChainError,
    },
    /// A configuration string that does not parse.
    #[error("bad device configuration {given:?}: {why} (expected {expected})")]
    Config {
        /// What was given.
        given: String,
        /// What is wrong.
        why: String,
        /// The accepted syntax.
        expected: &'static str,
    },
    /// The block device's image could not be opened or used.
    #[error("disk image {path}: {source} (does the file exist, and may this process open it read-write, or is `readonly` wanted?)")]
    Image {
        /// The image file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TAP device could not be opened.
    #[error("TAP device {name:?}: {source} (needs CAP_NET_ADMIN and /dev/net/tun; or create it first with `ip tuntap add {name} mode tap`)")]
    Tap {
        /// The interface name.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Saved state that this build cannot load or that does not fit this device.
    #[error("virtio device state does not fit: {0}")]
    State(String),
    /// Saved state of a version this build does not know.
    #[error("virtio device state version {0} is not one this build reads (it reads {VIRTIO_STATE_VERSION}): restore with the Tandem build that saved it")]
    UnknownStateVersion(u32),
    /// A device that cannot start.
    #[error("the device cannot start: {0}")]
    Activate(String),
}

/// Result type of the virtio module.
pub type Result<T> = std::result::Result<T, Error>;

/// The device's interrupt line. The transport calls [`Interrupt::trigger`] after it set a bit
/// in InterruptStatus, and [`Interrupt::deassert`] when the driver acknowledged every bit.
///
/// The monitor implements it with an irqfd on the device's GSI ([`EventFdInterrupt`]) or with
/// `KVM_IRQ_LINE` (raise in `trigger`, lower in `deassert`: level-triggered).
pub trait Interrupt: Send + Sync {
    /// Raises (or pulses) the line.
    fn trigger(&self);
    /// Every InterruptStatus bit was acknowledged: a level-triggered line may be lowered.
    fn deassert(&self) {}
}

/// An interrupt line that writes 1 to an eventfd; register the eventfd with KVM as an irqfd
/// (`VmFd::register_irqfd(evt, gsi)`) to raise the device's GSI without leaving the kernel.
#[derive(Debug)]
pub struct EventFdInterrupt {
    evt: EventFd,
}

impl EventFdInterrupt {
    /// A fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(EventFdInterrupt {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Wraps an existing eventfd.
    pub fn from_eventfd(evt: EventFd) -> Self {
        EventFdInterrupt { evt }
    }

    /// The eventfd, to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl AsRawFd for EventFdInterrupt {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self) {
        if let Err(e) = self.evt.write(1) {
            warn!("virtio: cannot signal the interrupt eventfd: {e}");
        }
    }
}

/// An interrupt line that only counts (for tests and for devices nobody listens to).
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    triggered: AtomicU64,
    deasserted: AtomicU64,
}

impl CountingInterrupt {
    /// Times [`Interrupt::trigger`] was called.
    pub fn triggered(&self) -> u64 {
        self.triggered.load(Ordering::SeqCst)
    }
    /// Times [`Interrupt::deassert`] was called.
    pub fn deasserted(&self) -> u64 {
        self.deasserted.load(Ordering::SeqCst)
    }
}

impl Interrupt for CountingInterrupt {
    fn trigger(&self) {
        self.triggered.fetch_add(1, Ordering::SeqCst);
    }
    fn deassert(&self) {
        self.deasserted.fetch_add(1, Ordering::SeqCst);
    }
}

/// A virtio device back end, driven by [`MmioTransport`]. The transport owns the queues and
/// the guest memory and hands them in; the device owns its back end (file, TAP) and config.
pub trait VirtioDevice: Send {
    /// virtio device id (1 net, 2 block).
    fn device_type(&self) -> u32;

    /// The largest size of each queue (powers of two, ≤ [`MAX_QUEUE_SIZE`]); the length is
    /// the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits offered (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;

    /// The device-specific configuration space (read at offset 0x100 of the window).
    fn config_space(&self) -> Vec<u8>;

    /// A driver read of the configuration space; bytes beyond its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start < config.len() {
            let n = data.len().min(config.len() - start);
            data[..n].copy_from_slice(&config[start..start + n]);
        }
    }

    /// A driver write of the configuration space. Default: read-only, ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "virtio device {}: the guest wrote {} bytes of read-only configuration at {offset:#x}; ignored",
            self.device_type(),
            data.len()
        );
    }

    /// The driver set DRIVER_OK with these features and queues (the ready ones are valid).
    fn activate(
        &mut self,
        _mem: &GuestMem,
        _acked_features: u64,
        _queues: &mut [Queue],
    ) -> Result<()> {
        Ok(())
    }

    /// The driver notified queue `index`. Returns whether buffers were used (the transport
    /// then raises the used-buffer interrupt). An error makes the device need a reset.
    fn process_queue(&mut self, mem: &GuestMem, queues: &mut [Queue], index: usize)
        -> Result<bool>;

    /// Input from the back end may be waiting (e.g. frames on the TAP): move what fits into
    /// the guest's buffers. Returns whether buffers were used. Default: no input.
    fn poll(&mut self, _mem: &GuestMem, _queues: &mut [Queue]) -> Result<bool> {
        Ok(false)
    }

    /// An fd that becomes readable when [`VirtioDevice::poll`] has work. Default: none.
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }

    /// The driver reset the device (status 0): forget everything run-time.
    fn reset(&mut self) {}

    /// The device-specific part of the saved state.
    fn save_device(&self) -> DeviceState {
        DeviceState::None
    }
}

impl<D: VirtioDevice + ?Sized> VirtioDevice for Box<D> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn avail_features(&self) -> u64 {
        (**self).avail_features()
    }
    fn config_space(&self) -> Vec<u8> {
        (**self).config_space()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(&mut self, mem: &GuestMem, acked: u64, queues: &mut [Queue]) -> Result<()> {
        (**self).activate(mem, acked, queues)
    }
    fn process_queue(
        &mut self,
        mem: &GuestMem,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool> {
        (**self).process_queue(mem, queues, index)
    }
    fn poll(&mut self, mem: &GuestMem, queues: &mut [Queue]) -> Result<bool> {
        (**self).poll(mem, queues)
    }
    fn poll_fd(&self) -> Option<RawFd> {
        (**self).poll_fd()
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn save_device(&self) -> DeviceState {
        (**self).save_device()
    }
}
