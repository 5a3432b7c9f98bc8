//! The VM's virtio-mmio devices: the bus that routes MMIO exits to them, the net RX threads,
//! the `virtio` checkpoint group and the disk capture of a snapshot.
//!
//! (The group lives here rather than beside the devices in `devices/src/virtio/` while that
//! directory is still being finished by its owner; it only uses the devices' public API.)
//!
//! ```text
//!  --disk FILE[,readonly] ...  --net tap=NAME[,mac=MAC] ...      (MachineConfig: disks, nets)
//!  device i (disks first, then nets):  window MMIO_BASE + i·0x1000, GSI MMIO_GSI_BASE + i (5 + i)
//!
//!  vCPU thread, KVM_EXIT_MMIO at gpa ─▶ VirtioBus: i = (gpa − MMIO_BASE) / 0x1000, bounds
//!       checked ─▶ slots[i].lock() ─▶ MmioTransport::read / write (QueueNotify serves the
//!       queue right there: block I/O is synchronous on the vCPU thread)
//!  net RX thread per net device: epoll (edge-triggered) on the TAP fd + a stop eventfd,
//!       1 s timeout ─▶ slots[i].lock() ─▶ MmioTransport::poll (frames → guest RX buffers)
//!  interrupt: EventFdInterrupt's eventfd = irqfd on GSI 5 + i (kept across a restore)
//! ```
//!
//! Checkpoint group `virtio` (optional: a snapshot of a VM without devices has none):
//!
//! ```text
//!  SAVE_SYNC      nothing (block requests finish inside their MMIO exit; vCPUs are stunned)
//!  QUIESCE        stop and join every net RX thread: nothing writes guest memory any more
//!  SAVE           every transport's VirtioState (registers, queues, device), and for a
//!                 snapshot file every writable disk copied to SNAPFILE.disk<i>-<nonce> first
//!  CONTINUE_SYNC  RX threads started again              (power-off: they stay stopped)
//!  RESTORE        the transports rebuilt from their saved state (image and TAP opened then)
//!  RESTORE_SYNC   RX threads started
//! ```
//!
//! Disk capture: a reflink (`FICLONE`) of the image when its file system shares extents
//! (btrfs, XFS: constant time), otherwise a sparse copy (`SEEK_DATA`/`SEEK_HOLE` +
//! `copy_file_range`: only the data extents, holes stay holes), then fsync. The copy gets a
//! name of its own save (`checkpoint::files`) that only the state file written after it names,
//! so a save killed half-way never leaves a copy an older state file would take. Power-on of
//! a restore puts the copy the state names back at the image path recorded in the
//! configuration the same way (temporary file + rename), so the guest finds exactly the disk
//! it left. Read-only disks are not captured: the guest cannot change them.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use checkpoint::{Error as CptError, Group, Persist};
use devices::virtio::block::DiskWrites;
use devices::virtio::hold::DEFAULT_HOLD_BYTES;
use devices::virtio::persist::DeviceState;
use devices::virtio::{
    persist, Block, EventFdInterrupt, Interrupt, MmioTransport, Net, VirtioState,
};
use devices::virtio::{FrameHold, HeldFrames, HoldStats, InputFrame, InputTap, NetBackend};
use guest_abi::boot::{MmioDevice, VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
use guest_abi::layout::{mmio_window, MAX_MMIO_DEVICES, MMIO_BASE, MMIO_GSI_BASE, MMIO_SIZE};
use monitor::{GuestMem, MmioBus, Vm};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

/// What a device is, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `--disk`.
    Block(BlockConfig),
    /// `--net`.
    Net(NetConfig),
}

impl DeviceSpec {
    fn device_id(&self) -> u32 {
        match self {
            DeviceSpec::Block(_) => VIRTIO_ID_BLOCK,
            DeviceSpec::Net(_) => VIRTIO_ID_NET,
        }
    }
}

/// The devices of a configuration in window order: disks first, then nets.
pub fn device_specs(disks: &[BlockConfig], nets: &[NetConfig]) -> Result<Vec<DeviceSpec>> {
    let specs: Vec<DeviceSpec> = disks
        .iter()
        .cloned()
        .map(DeviceSpec::Block)
        .chain(nets.iter().cloned().map(DeviceSpec::Net))
        .collect();
    if specs.len() > MAX_MMIO_DEVICES as usize {
        return Err(Error::Usage(format!(
            "{} --disk and --net devices: at most {MAX_MMIO_DEVICES} fit",
            specs.len()
        )));
    }
    Ok(specs)
}

/// The boot-info page's device table for `specs`: device `i` at window `i`, GSI `5 + i`.
pub fn boot_devices(specs: &[DeviceSpec]) -> Vec<MmioDevice> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| MmioDevice {
            device_id: s.device_id(),
            gsi: MMIO_GSI_BASE + i as u32,
            base: mmio_window(i as u32),
            size: MMIO_SIZE,
        })
        .collect()
}

/// One transport, of either kind.
pub enum Transport {
    /// virtio-blk.
    Block(MmioTransport<Block>),
    /// virtio-net.
    Net(MmioTransport<Net>),
}

impl Transport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self {
            Transport::Block(t) => t.read(offset, data),
            Transport::Net(t) => t.read(offset, data),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        match self {
            Transport::Block(t) => t.write(offset, data),
            Transport::Net(t) => t.write(offset, data),
        }
    }
    fn poll(&mut self) -> bool {
        match self {
            Transport::Block(t) => t.poll(),
            Transport::Net(t) => t.poll(),
        }
    }
    fn poll_fd(&self) -> Option<RawFd> {
        match self {
            Transport::Block(t) => t.poll_fd(),
            Transport::Net(t) => t.poll_fd(),
        }
    }
    fn save(&self) -> VirtioState {
        match self {
            Transport::Block(t) => t.save(),
            Transport::Net(t) => t.save(),
        }
    }
    /// The Status register (for status reports).
    pub fn status(&self) -> u32 {
        match self {
            Transport::Block(t) => t.status(),
            Transport::Net(t) => t.status(),
        }
    }
}

/// One device window.
pub struct Slot {
    /// Window index.
    pub index: u32,
    /// What was configured.
    pub spec: DeviceSpec,
    irq: Arc<EventFdInterrupt>,
    /// The transport; `None` on a restoring VM until RESTORE rebuilds it.
    dev: Mutex<Option<Transport>>,
    /// A card's output-commit buffer (it outlives transports rebuilt by a restore).
    hold: Option<Arc<FrameHold>>,
    /// A card's input copy (input replication; it outlives transports too).
    input: Option<Arc<InputTap>>,
}

impl Slot {
    /// The transport, locked.
    pub fn lock(&self) -> MutexGuard<'_, Option<Transport>> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writable disks of a running VM, for a pre-copy that reads them while the guest runs.
///
/// ```text
///  take(full):  per disk: lock the device ─ take its dirty blocks (all, with full) ─ unlock
///               then read those blocks from a read-only handle of the image, unlocked
/// ```
///
/// Block requests are served whole under the device's lock (on the vCPU thread), so a write
/// is either finished before the take (and read here) or marks its block after it (and goes
/// out in the next take or in the completing epoch, taken with the guest stunned).
pub struct DiskTracker {
    disks: Vec<(Arc<Slot>, std::fs::File)>,
}

impl DiskTracker {
    /// Whether there is a disk to track.
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// The blocks each disk's guest wrote since the last take (every non-zero block with
    /// `full`, which also starts the tracking afresh): (window, writes); a disk with nothing
    /// to send is left out unless `full`.
    pub fn take(&self, full: bool) -> Result<Vec<(u32, DiskWrites)>> {
        let mut out = Vec::new();
        for (slot, file) in &self.disks {
            let (blocks, capacity) = {
                let mut g = slot.lock();
                let Some(Transport::Block(t)) = g.as_mut() else {
                    continue;
                };
                let blocks = t.device_mut().take_dirty_blocks();
                let capacity = t.device().capacity_sectors() * devices::virtio::block::SECTOR_SIZE;
                (blocks, capacity)
            };
            let w = devices::virtio::block::read_writes(
                file,
                capacity,
                if full { None } else { Some(blocks) },
            )
            .map_err(|e| Error::Io {
                path: match &slot.spec {
                    DeviceSpec::Block(c) => c.path.display().to_string(),
                    _ => String::new(),
                },
                source: e,
            })?;
            if full || !w.runs.is_empty() {
                out.push((slot.index, w));
            }
        }
        Ok(out)
    }
}

/// Routes MMIO exits to device windows (`MMIO_BASE + i·0x1000`, 4 KiB each).
pub struct VirtioBus {
    slots: Arc<Vec<Arc<Slot>>>,
}

impl VirtioBus {
    /// The slot and offset of `gpa`, if an access of `len` bytes there is inside a window.
    fn route(&self, gpa: u64, len: usize) -> Option<(&Slot, Option<u64>)> {
        let rel = gpa.checked_sub(MMIO_BASE)?;
        let slot = self.slots.get(usize::try_from(rel / MMIO_SIZE).ok()?)?;
        let off = rel % MMIO_SIZE;
        // An access that runs past the window's end is claimed but not served.
        Some((slot, (off + len as u64 <= MMIO_SIZE).then_some(off)))
    }
}

impl MmioBus for VirtioBus {
    fn read(&self, gpa: u64, data: &mut [u8]) -> bool {
        let Some((slot, off)) = self.route(gpa, data.len()) else {
            return false;
        };
        match (off, slot.lock().as_mut()) {
            (Some(off), Some(t)) => t.read(off, data),
            (None, _) => {
                log::warn!(
                    "virtio-mmio: {}-byte read at {gpa:#x} crosses the end of window {}; all ones",
                    data.len(),
                    slot.index
                );
                data.fill(0xff);
            }
            (_, None) => data.fill(0xff),
        }
        true
    }

    fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some((slot, off)) = self.route(gpa, data.len()) else {
            return false;
        };
        match (off, slot.lock().as_mut()) {
            (Some(off), Some(t)) => t.write(off, data),
            (None, _) => log::warn!(
                "virtio-mmio: {}-byte write at {gpa:#x} crosses the end of window {}; ignored",
                data.len(),
                slot.index
            ),
            (_, None) => {}
        }
        true
    }
}

/// A running net RX thread. A QUIESCE pauses it (an epoch comes many times a second:
/// stopping and starting a thread each time cost ~0.17 ms of every pause); a restore, which
/// rebuilds the transports and their TAP fds, stops it.
struct RxThread {
    slot: Arc<Slot>,
    stop: Arc<EventFd>,
    kick: Arc<EventFd>,
    paused: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl RxThread {
    fn spawn(slot: Arc<Slot>) -> std::io::Result<RxThread> {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let paused = Arc::new(AtomicBool::new(false));
        let (sl, st, k, p) = (slot.clone(), stop.clone(), kick.clone(), paused.clone());
        let thread = std::thread::Builder::new()
            .name(format!("virtio-net-rx-{}", slot.index))
            .spawn(move || rx_loop(&sl, &st, &k, &p))?;
        Ok(RxThread {
            slot,
            stop,
            kick,
            paused,
            thread,
        })
    }

    /// Stops delivering: once this returns, the thread moves nothing into the guest until
    /// [`RxThread::resume`] (a delivery in progress finished under the device's lock).
    fn pause(&self) {
        self.paused.store(true, Ordering::Release);
        drop(self.slot.lock());
    }

    /// Delivers again, starting with what came while paused (the TAP is watched
    /// edge-triggered, so the thread is kicked to look).
    fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        let _ = self.kick.write(1);
    }

    fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}

/// Waits for frames on the TAP (edge-triggered: a device without guest RX buffers leaves
/// frames waiting there, and the QueueNotify that brings buffers delivers them) and moves them
/// into the guest, until `stop` is written.
fn rx_loop(slot: &Slot, stop: &EventFd, kick: &EventFd, paused: &AtomicBool) {
    if let Err(e) = rx_watch(slot, stop, kick, paused) {
        log::error!(
            "virtio-net {}: {e}; this device receives nothing more",
            slot.index
        );
    }
}

fn rx_watch(
    slot: &Slot,
    stop: &EventFd,
    kick: &EventFd,
    paused: &AtomicBool,
) -> std::io::Result<()> {
    const STOP: u64 = 0;
    const TAP: u64 = 1;
    const KICK: u64 = 2;
    let ep = Epoll::new()?;
    ep.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP),
    )?;
    ep.ctl(
        ControlOperation::Add,
        kick.as_raw_fd(),
        EpollEvent::new(EventSet::IN, KICK),
    )?;
    if let Some(fd) = slot.lock().as_ref().and_then(Transport::poll_fd) {
        ep.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TAP),
        )?;
    }
    // Frames that came while no thread watched.
    if let Some(t) = slot.lock().as_mut() {
        t.poll();
    }
    let mut events = [EpollEvent::default(); 3];
    loop {
        let n = match ep.wait(1000, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut look = false;
        for ev in &events[..n] {
            match ev.data() {
                STOP => return Ok(()),
                KICK => {
                    let _ = kick.read();
                    look = true;
                }
                _ => look = true,
            }
        }
        if look {
            // Checked under the lock: a pause waits for this delivery, or this one sees it.
            let mut g = slot.lock();
            if paused.load(Ordering::Acquire) {
                continue;
            }
            if let Some(t) = g.as_mut() {
                t.poll();
            }
        }
    }
}

/// A disk captured with a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCapture {
    /// Device window index.
    pub device: u32,
    /// File name of the copy, beside the state file (`SNAPFILE.disk<i>-<nonce>`; `SNAPFILE.disk<i>` in older snapshots).
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// Saved state of the `virtio` group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioGroupState {
    /// Each device's `VirtioState::encode()`, in window order.
    pub devices: Vec<Vec<u8>>,
    /// The disks captured beside a snapshot file (none for a replication epoch).
    pub disks: Vec<DiskCapture>,
}

/// The `virtio` group's state as a [`Persist`] component.
pub struct VirtioPersist;
impl Persist for VirtioPersist {
    const NAME: &'static str = "virtio";
    const VERSION: u32 = 1;
    type State = VirtioGroupState;
}

pub use devices::disk_copy::{copy_disk, CopyMethod};
pub use devices::virtio::{BlockConfig, NetConfig};

/// `SNAPFILE.disk<i>-<nonce>`: the copy of disk `device` made by the save with `nonce`.
pub fn disk_capture_path(snapshot: &Path, device: u32, nonce: &str) -> PathBuf {
    checkpoint::files::data_path(snapshot, &format!("disk{device}"), nonce)
}

/// The `virtio` checkpoint group: every device of the VM, their RX threads and disk captures.
pub struct VirtioGroup {
    slots: Arc<Vec<Arc<Slot>>>,
    mem: GuestMem,
    rx: Vec<RxThread>,
    /// No RX threads run (not yet started on a restoring VM, or stopped for a restore).
    quiesced: bool,
    /// The RX threads are paused by a QUIESCE.
    rx_paused: bool,
    captured: Vec<DiskCapture>,
}

impl VirtioGroup {
    /// No devices.
    pub fn empty(mem: GuestMem) -> Self {
        VirtioGroup {
            slots: Arc::new(Vec::new()),
            mem,
            rx: Vec::new(),
            quiesced: false,
            rx_paused: false,
            captured: Vec::new(),
        }
    }

    /// Builds the devices of `specs` on `vm` (windows and GSIs in order), registers their
    /// irqfds and installs the bus. A fresh VM gets running devices and RX threads; a
    /// restoring one (`restoring`) gets empty windows that its RESTORE fills.
    pub fn build(vm: &Vm, specs: &[DeviceSpec], restoring: bool) -> Result<Self> {
        let mem = vm.memory().clone();
        let mut group = VirtioGroup::empty(mem.clone());
        if specs.is_empty() {
            return Ok(group);
        }
        let mut slots = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let index = i as u32;
            let irq = Arc::new(EventFdInterrupt::new().map_err(|e| Error::Io {
                path: "eventfd".into(),
                source: e,
            })?);
            vm.register_irqfd(irq.eventfd(), MMIO_GSI_BASE + index)?;
            let hold =
                matches!(spec, DeviceSpec::Net(_)).then(|| FrameHold::new(DEFAULT_HOLD_BYTES));
            let input = matches!(spec, DeviceSpec::Net(_)).then(|| InputTap::new(index));
            let dev = if restoring {
                None
            } else {
                Some(new_transport(
                    spec,
                    mem.clone(),
                    irq.clone(),
                    hold.as_ref(),
                    input.as_ref(),
                )?)
            };
            slots.push(Arc::new(Slot {
                index,
                spec: spec.clone(),
                irq,
                dev: Mutex::new(dev),
                hold,
                input,
            }));
        }
        group.slots = Arc::new(slots);
        vm.set_mmio_bus(Arc::new(VirtioBus {
            slots: group.slots.clone(),
        }))?;
        group.quiesced = true;
        if !restoring {
            group.start_rx()?;
        }
        Ok(group)
    }

    /// The device windows.
    pub fn slots(&self) -> &[Arc<Slot>] {
        &self.slots
    }

    /// Input replication: copy every frame delivered to a card to `out` from now on (see
    /// [`devices::virtio::inputs`]); `None` stops it.
    pub fn copy_inputs(&self, out: Option<crossbeam_channel::Sender<InputFrame>>) {
        for i in self.slots.iter().filter_map(|s| s.input.as_ref()) {
            match &out {
                Some(tx) => i.start(tx.clone()),
                None => i.stop(),
            }
        }
    }

    /// Input replication: frames delivered from now on belong to `epoch` (called with the
    /// guest stunned, net RX stopped).
    pub fn set_input_epoch(&self, epoch: u64) {
        for i in self.slots.iter().filter_map(|s| s.input.as_ref()) {
            i.set_epoch(epoch);
        }
    }

    /// Input replication: (frames copied, frames missed) over every card.
    pub fn input_stats(&self) -> (u64, u64) {
        self.slots
            .iter()
            .filter_map(|s| s.input.as_ref())
            .map(|i| i.stats())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Delivers `frames` to card `card` again, before anything from its TAP (a standby that
    /// took over: what its copy of the guest never saw), and serves its RX queue at once.
    /// Returns how many frames were queued.
    pub fn inject(&self, card: u32, frames: Vec<Vec<u8>>) -> usize {
        let Some(slot) = self.slots.iter().find(|s| s.index == card) else {
            log::warn!(
                "{} input frames for card {card}, which does not exist",
                frames.len()
            );
            return 0;
        };
        let n = frames.len();
        let mut g = slot.lock();
        let Some(Transport::Net(t)) = g.as_mut() else {
            log::warn!("{n} input frames for device {card}, which is not a network card");
            return 0;
        };
        t.device_mut().inject(frames);
        // Frames go now if the guest has RX buffers (the used-ring interrupt with them);
        // otherwise as it posts some.
        t.poll();
        n
    }

    /// Output commit: hold every card's transmitted frames (on) or pass them through (off;
    /// frames already held stay until released).
    pub fn set_holding(&self, on: bool) {
        for h in self.slots.iter().filter_map(|s| s.hold.as_ref()) {
            h.set_holding(on);
        }
    }

    /// Takes the frames every card has held since the last call: (window, frames).
    pub fn take_held_frames(&self) -> Vec<(u32, HeldFrames)> {
        self.slots
            .iter()
            .filter_map(|s| Some((s.index, s.hold.as_ref()?.take())))
            .filter(|(_, f)| !f.is_empty())
            .collect()
    }

    /// Writes frames taken by [`VirtioGroup::take_held_frames`] to their cards' back ends.
    pub fn release_frames(&self, frames: Vec<(u32, HeldFrames)>) {
        for (index, f) in frames {
            match self
                .slots
                .iter()
                .find(|s| s.index == index)
                .and_then(|s| s.hold.as_ref())
            {
                Some(h) => h.release(f),
                None => log::warn!(
                    "{} held frames for card {index}, which has no hold",
                    f.len()
                ),
            }
        }
    }

    /// Every card's output-commit counters: (window, counters).
    pub fn hold_stats(&self) -> Vec<(u32, HoldStats)> {
        self.slots
            .iter()
            .filter_map(|s| Some((s.index, s.hold.as_ref()?.stats())))
            .collect()
    }

    /// Tells the network where each card now is, as QEMU's announce-self does: three RARP
    /// broadcasts from the card's MAC (at once, after 50 and after 150 ms, on a thread), so
    /// bridges and switches learn the new port before the guest's peers send to the old one.
    /// Returns how many cards were announced.
    pub fn announce(&self) -> usize {
        let cards: Vec<(Arc<devices::virtio::Tap>, [u8; 6])> = self
            .slots
            .iter()
            .filter_map(|s| {
                let g = s.lock();
                match g.as_ref()? {
                    Transport::Net(t) => Some((t.device().tap()?.clone(), t.device().mac())),
                    Transport::Block(_) => None,
                }
            })
            .collect();
        let n = cards.len();
        if n == 0 {
            return 0;
        }
        let spawned = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                for (i, wait) in [0u64, 50, 100].into_iter().enumerate() {
                    std::thread::sleep(std::time::Duration::from_millis(wait));
                    for (tap, mac) in &cards {
                        if let Err(e) = tap.write_frame(&rarp(*mac)) {
                            log::warn!("announce {i} of {}: {e}", fmt_mac(mac));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot announce the cards: {e}");
        }
        n
    }

    /// Replication: what each writable disk's guest wrote since the last call (every non-zero
    /// block with `full`), read back with the guest stunned: (window, writes).
    pub fn take_disk_writes(&self, full: bool) -> Result<Vec<(u32, DiskWrites)>> {
        let mut out = Vec::new();
        for s in self.slots.iter() {
            let mut g = s.lock();
            if let Some(Transport::Block(t)) = g.as_mut() {
                if t.device().config().readonly {
                    continue;
                }
                let w = t.device_mut().take_writes(full).map_err(|e| Error::Io {
                    path: t.device().config().path.display().to_string(),
                    source: e,
                })?;
                if full || !w.runs.is_empty() {
                    out.push((s.index, w));
                }
            }
        }
        Ok(out)
    }

    /// Flushes under speculation on every writable disk (see
    /// [`devices::virtio::Block::set_speculative`]); turning it off syncs what is not yet.
    pub fn set_speculative_flush(&self, on: bool) -> Result<()> {
        for s in self.slots.iter() {
            let mut g = s.lock();
            if let Some(Transport::Block(t)) = g.as_mut() {
                t.device_mut().set_speculative(on).map_err(|e| Error::Io {
                    path: t.device().config().path.display().to_string(),
                    source: e,
                })?;
            }
        }
        Ok(())
    }

    /// A handle for taking the disks' writes while the guest runs (a pre-copy): see
    /// [`DiskTracker`]. Each writable disk's image is opened again, read-only.
    pub fn disk_tracker(&self) -> Result<DiskTracker> {
        let mut disks = Vec::new();
        for s in self.slots.iter() {
            if let DeviceSpec::Block(c) = &s.spec {
                if c.readonly {
                    continue;
                }
                let file = std::fs::File::open(&c.path).map_err(|e| Error::Io {
                    path: c.path.display().to_string(),
                    source: e,
                })?;
                disks.push((s.clone(), file));
            }
        }
        Ok(DiskTracker { disks })
    }

    /// The disks' images as configured here, by window (a standby's replicas).
    pub fn disk_images(&self) -> Vec<(u32, PathBuf)> {
        self.slots
            .iter()
            .filter_map(|s| match &s.spec {
                DeviceSpec::Block(c) if !c.readonly => Some((s.index, c.path.clone())),
                _ => None,
            })
            .collect()
    }

    /// Whether any device is a network card.
    pub fn has_net(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.spec, DeviceSpec::Net(_)))
    }

    fn start_rx(&mut self) -> Result<usize> {
        if !self.quiesced {
            return Ok(0);
        }
        for s in self
            .slots
            .iter()
            .filter(|s| matches!(s.spec, DeviceSpec::Net(_)))
        {
            let t = RxThread::spawn(s.clone()).map_err(|e| Error::Io {
                path: format!("virtio-net {} RX thread", s.index),
                source: e,
            })?;
            self.rx.push(t);
        }
        self.quiesced = false;
        Ok(self.rx.len())
    }

    fn stop_rx(&mut self) -> usize {
        let n = self.rx.len();
        for t in self.rx.drain(..) {
            t.stop();
        }
        self.quiesced = true;
        self.rx_paused = false;
        n
    }

    fn pause_rx(&mut self) -> usize {
        for t in &self.rx {
            t.pause();
        }
        self.rx_paused = true;
        self.rx.len()
    }

    fn resume_rx(&mut self) -> usize {
        for t in &self.rx {
            t.resume();
        }
        self.rx_paused = false;
        self.rx.len()
    }

    /// Copies every writable disk to `SNAPFILE.disk<i>-<nonce>` (call at SAVE, RX quiesced, vCPUs
    /// stunned); the next `checkpoint` records them. Returns a line per disk for the trace.
    pub fn capture_disks(&mut self, snapshot: &Path, nonce: &str) -> Result<Vec<String>> {
        self.captured.clear();
        let mut lines = Vec::new();
        for s in self.slots.iter() {
            let DeviceSpec::Block(cfg) = &s.spec else {
                continue;
            };
            if cfg.readonly {
                continue;
            }
            let dst = disk_capture_path(snapshot, s.index, nonce);
            let t = Instant::now();
            let (method, bytes) = copy_disk(&cfg.path, &dst).map_err(|source| Error::Io {
                path: format!("{} → {}", cfg.path.display(), dst.display()),
                source,
            })?;
            lines.push(format!(
                "capture disk {} ({}) to {}: {method:?}, {bytes} bytes in {:.1} ms",
                s.index,
                cfg.path.display(),
                dst.display(),
                t.elapsed().as_secs_f64() * 1e3
            ));
            self.captured.push(DiskCapture {
                device: s.index,
                file: dst
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes,
            });
        }
        Ok(lines)
    }
}

/// Puts the disks a snapshot captured back at the image paths of `specs` (power-on of a
/// restore, before the devices open them). Returns a line per disk for the trace.
pub fn restore_disks(
    snapshot: &Path,
    section: &checkpoint::Section,
    specs: &[DeviceSpec],
) -> Result<Vec<String>> {
    let state = VirtioPersist::decode(section.version, &section.data)?;
    let mut lines = Vec::new();
    for d in &state.disks {
        let Some(DeviceSpec::Block(cfg)) = specs.get(d.device as usize) else {
            return Err(CptError::Corrupt(format!(
                "a captured disk for device {}, which is not a disk in the configuration",
                d.device
            ))
            .into());
        };
        let src = checkpoint::files::resolve(snapshot, &d.file)?;
        let len = std::fs::metadata(&src)
            .map_err(|source| Error::Io {
                path: format!(
                    "{} (the snapshot's copy of disk {})",
                    src.display(),
                    d.device
                ),
                source,
            })?
            .len();
        if len != d.bytes {
            return Err(CptError::Corrupt(format!(
                "{} is {len} bytes, the snapshot captured {}",
                src.display(),
                d.bytes
            ))
            .into());
        }
        let t = Instant::now();
        let (method, bytes) = copy_disk(&src, &cfg.path).map_err(|source| Error::Io {
            path: format!("{} → {}", src.display(), cfg.path.display()),
            source,
        })?;
        lines.push(format!(
            "restore disk {} from {} to {}: {method:?}, {bytes} bytes in {:.1} ms",
            d.device,
            src.display(),
            cfg.path.display(),
            t.elapsed().as_secs_f64() * 1e3
        ));
    }
    Ok(lines)
}

/// Puts a card's transmitted frames through its output-commit buffer, and copies its
/// received ones to its input tap.
fn behind_hold(
    mut t: MmioTransport<Net>,
    hold: Option<&Arc<FrameHold>>,
    input: Option<&Arc<InputTap>>,
) -> MmioTransport<Net> {
    if let Some(hold) = hold {
        if let Some(tap) = t.device().tap() {
            hold.set_output(Box::new(tap.clone()));
        }
        t.device_mut().set_sink(hold.sink());
    }
    if let Some(input) = input {
        t.device_mut().set_input_tap(input.clone());
    }
    t
}

fn new_transport(
    spec: &DeviceSpec,
    mem: GuestMem,
    irq: Arc<EventFdInterrupt>,
    hold: Option<&Arc<FrameHold>>,
    input: Option<&Arc<InputTap>>,
) -> Result<Transport> {
    let irq: Arc<dyn Interrupt> = irq;
    let r = match spec {
        DeviceSpec::Block(c) => Block::new(c.clone())
            .and_then(|d| MmioTransport::new(d, mem, irq))
            .map(Transport::Block),
        DeviceSpec::Net(c) => Net::open(c.clone())
            .and_then(|d| MmioTransport::new(d, mem, irq))
            .map(|t| Transport::Net(behind_hold(t, hold, input))),
    };
    // A device that cannot be built is a configuration to change (exit 2).
    r.map_err(|e| Error::Usage(e.to_string()))
}

/// How long a restore waits for a busy TAP.
const TAP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// A RARP "reverse request" broadcast from `mac` (what QEMU's announce-self sends), padded
/// to the 60-byte Ethernet minimum:
///
/// ```text
///  ff:ff:ff:ff:ff:ff │ mac │ 0x8035 │ htype 1 │ ptype 0x0800 │ hlen 6 │ plen 4 │ op 3 │
///  sha mac │ spa 0.0.0.0 │ tha mac │ tpa 0.0.0.0 │ zero padding
/// ```
pub fn rarp(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn cpt_err(e: impl std::fmt::Display) -> CptError {
    CptError::component("virtio", e.to_string())
}

impl Group for VirtioGroup {
    fn name(&self) -> &'static str {
        "virtio"
    }
    fn version(&self) -> u32 {
        VirtioPersist::VERSION
    }
    /// Snapshots of VMs without devices (and of builds before devices) have no `virtio`
    /// section; `missing` refuses that only when this VM has devices.
    fn optional(&self) -> bool {
        true
    }
    fn checkpoint(&mut self) -> std::result::Result<Vec<u8>, CptError> {
        let mut state = VirtioGroupState {
            disks: std::mem::take(&mut self.captured),
            ..VirtioGroupState::default()
        };
        for s in self.slots.iter() {
            let g = s.lock();
            let t = g
                .as_ref()
                .ok_or_else(|| cpt_err(format!("device {} was never built", s.index)))?;
            state.devices.push(t.save().encode());
        }
        VirtioPersist::encode(&state)
    }
    fn restore(&mut self, version: u32, data: &[u8]) -> std::result::Result<(), CptError> {
        let state = VirtioPersist::decode(version, data)?;
        // The transports (and their TAP fds) are rebuilt: threads watching the old ones stop;
        // the sync after the restore starts new ones.
        if !self.rx.is_empty() {
            self.stop_rx();
        }
        if state.devices.len() != self.slots.len() {
            return Err(cpt_err(format!(
                "the snapshot has {} virtio devices, this VM {} (restore with the same --disk/--net)",
                state.devices.len(),
                self.slots.len()
            )));
        }
        self.stop_rx();
        for (s, bytes) in self.slots.iter().zip(&state.devices) {
            let saved = VirtioState::decode(bytes).map_err(cpt_err)?;
            let mut g = s.lock();
            // Close the old image and TAP first: a TAP opens once.
            *g = None;
            let irq: Arc<dyn Interrupt> = s.irq.clone();
            // The configured back end where it differs from the saved one (a standby's own
            // TAP or disk replica); otherwise the saved one.
            let t = match (&s.spec, &saved.device) {
                (DeviceSpec::Block(c), DeviceState::Block(b)) if c.path != b.path => {
                    let image =
                        devices::virtio::block::open_image(&c.path, b.readonly).map_err(cpt_err)?;
                    Transport::Block(
                        persist::restore_block(&saved, self.mem.clone(), irq, Some(image))
                            .map_err(cpt_err)?,
                    )
                }
                (DeviceSpec::Block(_), _) => Transport::Block(
                    persist::restore_block(&saved, self.mem.clone(), irq, None).map_err(cpt_err)?,
                ),
                // The configured TAP (a standby's own, or the saved one). A TAP a dying
                // process still holds (a standby taking over on the killed primary's host)
                // is waited for, briefly.
                (DeviceSpec::Net(c), _) => {
                    let tap = devices::virtio::Tap::open_patiently(&c.tap, TAP_PATIENCE)
                        .map_err(cpt_err)?;
                    Transport::Net(behind_hold(
                        persist::restore_net(
                            &saved,
                            self.mem.clone(),
                            irq,
                            Some(NetBackend::tap(tap)),
                        )
                        .map_err(cpt_err)?,
                        s.hold.as_ref(),
                        s.input.as_ref(),
                    ))
                }
            };
            *g = Some(t);
        }
        Ok(())
    }
    fn quiesce(&mut self) -> std::result::Result<Option<String>, CptError> {
        if self.rx.is_empty() {
            return Ok(None);
        }
        let n = self.pause_rx();
        Ok(Some(format!("paused {n} net RX thread(s)")))
    }
    fn sync(&mut self) -> std::result::Result<Option<String>, CptError> {
        if self.rx_paused {
            let n = self.resume_rx();
            return Ok(Some(format!("resumed {n} net RX thread(s)")));
        }
        if !self.quiesced || !self.has_net() {
            self.quiesced = false;
            return Ok(None);
        }
        let n = self.start_rx().map_err(cpt_err)?;
        Ok(Some(format!("started {n} net RX thread(s)")))
    }
    fn error(&mut self, _error: &CptError) {
        self.captured.clear();
        if self.rx_paused {
            self.resume_rx();
        } else if self.quiesced && self.has_net() {
            if let Err(e) = self.start_rx() {
                log::error!("virtio: cannot restart net RX after a failed checkpoint: {e}");
            }
        }
    }
    fn missing(&mut self) -> std::result::Result<(), CptError> {
        if self.slots.is_empty() {
            return Ok(());
        }
        Err(cpt_err(format!(
            "the snapshot has no virtio state, but this VM has {} devices",
            self.slots.len()
        )))
    }
}

impl Drop for VirtioGroup {
    fn drop(&mut self) {
        self.stop_rx();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announce_is_a_rarp_reverse_request_from_the_card_s_mac() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let f = rarp(mac);
        assert_eq!(f.len(), 60, "padded to the Ethernet minimum");
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac, "from the card");
        assert_eq!(&f[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(
            &f[14..22],
            &[0, 1, 0x08, 0, 6, 4, 0, 3],
            "Ethernet/IPv4, reverse request"
        );
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        assert_eq!(&f[32..38], &mac, "target hardware address");
        assert!(f[38..].iter().all(|&b| b == 0));
    }
}
