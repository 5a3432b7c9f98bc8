//! The VM: KVM, guest memory, vCPU threads, stun.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;

use crate::actions::UserRpc;
use crate::kick::{install_kick_handler, kick_signal, KvmRunMap};
use crate::layout::{Layout, MAX_IMAGE_SIZE, PAGE_SIZE};
use crate::module::{CptArgs, ModuleTable};
use crate::state::{capture_vcpu, msr_list, Restored, VcpuSnapshot, VCPU_STATE_VERSION};
use crate::vcpu::{vcpu_loop, CrossCall, VcpuCall, VcpuContext, VcpuSched, VcpuState, VcpuStats};
use crate::{Error, Result};
use checkpoint::{Section, Snapshot};

/// Guest memory with a dirty bitmap that also records writes made by the host (devices).
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Entry point (GPA) of the guest code.
    pub entry: u64,
    /// How long a stun may take before the VM is declared wedged.
    pub stun_timeout: Duration,
    /// Host scheduling policy of the vCPU threads.
    pub vcpu_sched: VcpuSched,
    /// Guest RAM comes from this snapshot memory file, mapped privately (pages load lazily,
    /// writes stay in this process); otherwise RAM starts zeroed.
    pub memory_file: Option<PathBuf>,
    /// The VM is being restored: MainMem does not write page tables (they are in memory).
    pub restoring: bool,
    /// Guest arguments for the boot-info page (`key=value` words, `--guest-arg`).
    pub boot_args: String,
    /// The virtio-mmio devices the boot-info page lists.
    pub mmio_devices: Vec<guest_abi::boot::MmioDevice>,
}

impl VmConfig {
    /// A config with the default entry point and stun timeout.
    pub fn new(mem_mib: u64, vcpus: u32) -> Self {
        VmConfig {
            mem_mib,
            vcpus,
            entry: crate::layout::LOAD_ADDR,
            stun_timeout: Duration::from_secs(5),
            vcpu_sched: VcpuSched::default(),
            memory_file: None,
            restoring: false,
            boot_args: String::new(),
            mmio_devices: Vec::new(),
        }
    }
}

/// The parts of a VM every thread may read. Field order matters: the VM fd is dropped before
/// the memory that is registered with it.
pub struct VmShared {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// The VM fd.
    pub vm_fd: VmFd,
    /// Guest RAM.
    pub mem: GuestMem,
    /// Where things are.
    pub layout: Layout,
    /// Entry point of every vCPU.
    pub entry: u64,
    /// Whether the in-kernel irqchip (LAPIC, IOAPIC, PIC) and PIT exist.
    pub irqchip: bool,
    /// The VM is being restored from a snapshot.
    pub restoring: bool,
    /// The MSRs saved for each vCPU, in restore order.
    pub msrs: Vec<u32>,
    /// This host's KVM is KVM-PVM (it lists the PVM MSRs). PVM runs guest CPL3 natively but
    /// delivers interrupts and exceptions only to PVM-aware guests (through
    /// `MSR_PVM_EVENT_ENTRY`), never through a guest's IDT. Set by the CPU module, which asks
    /// the boot vCPU for PVM's signature MSR.
    pub pvm: AtomicBool,
    /// The CPUID KVM supports, given to every vCPU (fetched once: the ioctl is slow).
    pub cpuid: kvm_bindings::CpuId,
    /// The guest's TSC frequency in kHz (from the boot vCPU; 0 when KVM cannot say).
    pub tsc_khz: u64,
    /// Guest arguments written into the boot-info page.
    pub boot_args: String,
    /// Devices written into the boot-info page.
    pub mmio_devices: Vec<guest_abi::boot::MmioDevice>,
    pub(crate) restored: Mutex<Restored>,
    pub(crate) ran: AtomicBool,
}

impl VmShared {
    /// Fetches and resets the dirty-page bitmap: KVM's log (guest writes) OR vm-memory's bitmap
    /// (host writes, e.g. devices). Bit `n` stands for guest page `n`.
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>> {
        let pages = self.layout.pages() as usize;
        let mut out = vec![0u64; pages.div_ceil(64)];
        let mut page_base = 0usize;
        for (slot, region) in self.mem.iter().enumerate() {
            let kvm = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(Error::kvm("KVM_GET_DIRTY_LOG"))?;
            let host = std::ops::Deref::deref(region).bitmap().get_and_reset();
            let region_pages = (region.len() / PAGE_SIZE) as usize;
            let word =
                |w: usize| kvm.get(w).copied().unwrap_or(0) | host.get(w).copied().unwrap_or(0);
            if page_base % 64 == 0 {
                // Whole words at a time (the usual case: one region from 0).
                for w in 0..region_pages.div_ceil(64) {
                    let valid = (region_pages - w * 64).min(64);
                    let mask = if valid == 64 {
                        u64::MAX
                    } else {
                        (1u64 << valid) - 1
                    };
                    out[page_base / 64 + w] |= word(w) & mask;
                }
            } else {
                for p in 0..region_pages {
                    if word(p / 64) >> (p % 64) & 1 != 0 {
                        let g = page_base + p;
                        out[g / 64] |= 1 << (g % 64);
                    }
                }
            }
            page_base += region_pages;
        }
        Ok(out)
    }

    /// The restored PIT and clock, while no vCPU has run since the restore.
    pub(crate) fn frozen_vm_time(
        &self,
    ) -> Option<(kvm_bindings::kvm_pit_state2, kvm_bindings::kvm_clock_data)> {
        if self.ran.load(Ordering::Acquire) {
            return None;
        }
        self.restored.lock().unwrap_or_else(|p| p.into_inner()).vm
    }
    pub(crate) fn remember_vm_time(
        &self,
        pit: kvm_bindings::kvm_pit_state2,
        clock: kvm_bindings::kvm_clock_data,
    ) {
        self.restored.lock().unwrap_or_else(|p| p.into_inner()).vm = Some((pit, clock));
    }
}

fn map_memory(config: &VmConfig, layout: &Layout) -> Result<GuestMem> {
    let size = layout.mem_bytes as usize;
    let Some(path) = &config.memory_file else {
        return GuestMem::from_ranges(&[(GuestAddress(0), size)]).map_err(|e| {
            Error::Memory(format!(
                "cannot map {} MiB of guest RAM: {e}",
                config.mem_mib
            ))
        });
    };
    use vm_memory::bitmap::NewBitmap;
    use vm_memory::mmap::MmapRegionBuilder;
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Memory(format!("cannot open {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .map_err(|e| Error::Memory(e.to_string()))?
        .len();
    if len != layout.mem_bytes {
        return Err(Error::Memory(format!(
            "{} is {len} bytes, the VM needs {} bytes",
            path.display(),
            layout.mem_bytes
        )));
    }
    let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
        .with_file_offset(vm_memory::FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| Error::Memory(format!("cannot map {}: {e}", path.display())))?;
    let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| Error::Memory("guest memory region overflows".into()))?;
    GuestMem::from_regions(vec![region]).map_err(|e| Error::Memory(e.to_string()))
}

struct VcpuHandle {
    tx: Sender<CrossCall>,
    kick: KvmRunMap,
    thread: Option<JoinHandle<()>>,
    stats: Arc<VcpuStats>,
}

/// How long a stun or unstun took.
#[derive(Clone, Copy, Debug)]
pub struct StunReport {
    /// Stun: from posting the first cross-call to the last acknowledgement. Unstun: the time
    /// to release every vCPU (each stamps `VcpuStats::resumed_ns` when it runs again).
    pub latency: Duration,
    /// Nanoseconds since VM creation when the operation began (compare with `resumed_ns`).
    pub at_ns: u64,
}

/// A KVM virtual machine with its vCPU threads.
pub struct Vm {
    shared: Arc<VmShared>,
    vcpus: Vec<VcpuHandle>,
    modules: ModuleTable,
    stun_lock: Mutex<()>,
    stun_timeout: Duration,
    epoch: Instant,
}

impl Vm {
    /// Creates the VM, its memory and its vCPU threads, and runs the module table's `init`
    /// (boot vCPU) and `init_per_thread` (all vCPUs). The vCPUs wait for [`Vm::start`].
    pub fn new(config: &VmConfig, modules: ModuleTable, rpc: Sender<UserRpc>) -> Result<Vm> {
        let layout = Layout::new(config.mem_mib, config.vcpus)?;
        if config.entry >= layout.mem_bytes {
            return Err(Error::Config(format!(
                "entry point {:#x} is outside guest RAM ({} MiB)",
                config.entry, config.mem_mib
            )));
        }
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(Error::KvmOpen)?;
        let max = kvm.get_max_vcpus();
        if config.vcpus as usize > kvm.get_nr_vcpus() {
            log::info!(
                "{} vCPUs on a host KVM recommends {} for: they will share host CPUs",
                config.vcpus,
                kvm.get_nr_vcpus()
            );
        }
        if config.vcpus as usize > max {
            return Err(Error::Config(format!(
                "--vcpus {} is more than this host's KVM allows ({max})",
                config.vcpus
            )));
        }
        let vm_fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        if let Err(e) = vm_fd.set_tss_address(0xfffb_d000) {
            log::debug!("KVM_SET_TSS_ADDR not needed or not supported here: {e}");
        }
        let irqchip = match vm_fd.create_irq_chip() {
            Ok(()) => {
                let pit = kvm_bindings::kvm_pit_config::default();
                vm_fd
                    .create_pit2(pit)
                    .map_err(Error::kvm("KVM_CREATE_PIT2"))?;
                true
            }
            Err(e) => {
                log::warn!("no in-kernel irqchip ({e}); interrupt guests will not work");
                false
            }
        };
        let mem = map_memory(config, &layout)?;
        let msrs = msr_list(&kvm)?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let fds = (0..config.vcpus)
            .map(|id| {
                vm_fd
                    .create_vcpu(u64::from(id))
                    .map_err(Error::kvm("KVM_CREATE_VCPU"))
            })
            .collect::<Result<Vec<_>>>()?;
        let tsc_khz = fds[0].get_tsc_khz().map(u64::from).unwrap_or_else(|e| {
            log::debug!("KVM cannot tell the TSC frequency ({e}); the boot info says 0");
            0
        });
        let shared = Arc::new(VmShared {
            tsc_khz,
            boot_args: config.boot_args.clone(),
            mmio_devices: config.mmio_devices.clone(),
            kvm,
            vm_fd,
            mem,
            layout,
            entry: config.entry,
            irqchip,
            restoring: config.restoring,
            pvm: AtomicBool::new(false),
            msrs,
            cpuid,
            restored: Mutex::new(Restored::default()),
            ran: AtomicBool::new(false),
        });
        let run_size = shared
            .kvm
            .get_vcpu_mmap_size()
            .map_err(Error::kvm("KVM_GET_VCPU_MMAP_SIZE"))?;
        let epoch = Instant::now();
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for (id, fd) in (0..config.vcpus).zip(fds) {
            let kick = KvmRunMap::new(&fd, run_size)?;
            let (tx, rx) = unbounded();
            let stats = Arc::new(VcpuStats::default());
            let ctx = VcpuContext {
                id,
                fd,
                shared: shared.clone(),
                stats: stats.clone(),
                rpc: rpc.clone(),
                epoch,
                policy: config.vcpu_sched,
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu-{id}"))
                .spawn(move || vcpu_loop(ctx, rx))
                .map_err(Error::Thread)?;
            vcpus.push(VcpuHandle {
                tx,
                kick,
                thread: Some(thread),
                stats,
            });
        }
        let vm = Vm {
            shared,
            vcpus,
            modules,
            stun_lock: Mutex::new(()),
            stun_timeout: config.stun_timeout,
            epoch,
        };
        vm.init_modules()?;
        Ok(vm)
    }

    fn init_modules(&self) -> Result<()> {
        let modules = self.modules.clone();
        self.call_on(0, move |ctx| {
            modules.run(|m| m.init(&ctx.shared)).map(|_| ())
        })??;
        // init_per_thread runs on every vCPU thread at once.
        let (tx, rx) = bounded(self.vcpus.len());
        for id in 0..self.vcpus.len() {
            let (modules, tx) = (self.modules.clone(), tx.clone());
            let call: VcpuCall = Box::new(move |ctx| {
                let _ = tx.send(modules.run(|m| m.init_per_thread(ctx)).map(|_| ()));
            });
            self.post(id, CrossCall::Call(call))?;
        }
        for _ in 0..self.vcpus.len() {
            rx.recv().map_err(|_| Error::Stopped)??;
        }
        log::debug!("monitor modules initialised: {:?}", self.modules.names());
        Ok(())
    }

    /// The shared parts (memory, fds, layout).
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }
    /// Guest RAM.
    pub fn memory(&self) -> &GuestMem {
        &self.shared.mem
    }
    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }
    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.len() as u32
    }
    /// Counters of vCPU `id`.
    pub fn vcpu_stats(&self, id: u32) -> &VcpuStats {
        &self.vcpus[id as usize].stats
    }
    /// The module table.
    pub fn modules(&self) -> &ModuleTable {
        &self.modules
    }

    /// Copies a guest image to `addr`, checking that it fits the image area.
    pub fn load_image(&self, addr: u64, image: &[u8]) -> Result<()> {
        let end = addr.checked_add(image.len() as u64).ok_or_else(|| {
            Error::Config(format!(
                "image at {addr:#x} of {} bytes overflows",
                image.len()
            ))
        })?;
        if image.is_empty() || image.len() as u64 > MAX_IMAGE_SIZE {
            return Err(Error::Config(format!(
                "the image is {} bytes: it must hold 1 to {MAX_IMAGE_SIZE} bytes",
                image.len()
            )));
        }
        if addr < crate::layout::LOAD_ADDR || end > crate::layout::STACK_BASE {
            return Err(Error::Config(format!(
                "image {addr:#x}..{end:#x} does not fit the image area {:#x}..{:#x}",
                crate::layout::LOAD_ADDR,
                crate::layout::STACK_BASE
            )));
        }
        self.shared
            .mem
            .write_slice(image, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    /// Lets every vCPU run the guest.
    pub fn start(&self) -> Result<()> {
        for v in &self.vcpus {
            v.tx.send(CrossCall::Start).map_err(|_| Error::Stopped)?;
        }
        Ok(())
    }

    fn post(&self, id: usize, cc: CrossCall) -> Result<()> {
        let v = &self.vcpus[id];
        v.tx.send(cc).map_err(|_| Error::Stopped)?;
        v.kick.request_exit();
        if v.stats.state() == VcpuState::Running {
            if let Some(t) = &v.thread {
                // A failed signal is fine: immediate_exit alone stops the next KVM_RUN, and a
                // thread that is not in KVM_RUN reads its channel anyway.
                let _ = t.kill(kick_signal());
            }
        }
        Ok(())
    }

    /// Runs `f` on vCPU `id`'s thread and returns its result (waits for it).
    pub fn call_on<R: Send + 'static>(
        &self,
        id: u32,
        f: impl FnOnce(&mut VcpuContext) -> R + Send + 'static,
    ) -> Result<R> {
        if id >= self.vcpu_count() {
            return Err(Error::Config(format!("there is no vCPU {id}")));
        }
        let (tx, rx) = bounded(1);
        let call: VcpuCall = Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        self.post(id as usize, CrossCall::Call(call))?;
        rx.recv().map_err(|_| Error::Stopped)
    }

    fn wait_acks(&self, rx: &Receiver<u32>, what: &'static str, start: Instant) -> Result<()> {
        let deadline = start + self.stun_timeout;
        let mut acked = vec![false; self.vcpus.len()];
        for _ in 0..self.vcpus.len() {
            match rx.recv_deadline(deadline) {
                Ok(id) => acked[id as usize] = true,
                Err(_) => {
                    let vcpus = (0..self.vcpu_count())
                        .filter(|&i| !acked[i as usize])
                        .collect();
                    return Err(Error::StunTimeout {
                        what,
                        vcpus,
                        timeout: self.stun_timeout,
                    });
                }
            }
        }
        Ok(())
    }

    /// Stops every vCPU: posts a stun cross-call to each, kicks it out of KVM_RUN, and waits
    /// until all acknowledged. The vCPUs run again when the guard is dropped or
    /// [`StunGuard::unstun`] is called. Only one stun is in force at a time; a second caller
    /// waits for the first guard to go.
    pub fn stun(&self) -> Result<StunGuard<'_>> {
        let lock = self.stun_lock.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let at_ns = self.now_ns();
        let (tx, rx) = bounded(self.vcpus.len());
        for id in 0..self.vcpus.len() {
            self.post(id, CrossCall::Stun { ack: tx.clone() })?;
        }
        if let Err(e) = self.wait_acks(&rx, "stun", start) {
            let _ = self.unstun_all();
            return Err(e);
        }
        Ok(StunGuard {
            vm: self,
            _lock: lock,
            report: StunReport {
                latency: start.elapsed(),
                at_ns,
            },
            released: false,
        })
    }

    fn unstun_all(&self) -> Result<StunReport> {
        let start = Instant::now();
        let at_ns = self.now_ns();
        for v in &self.vcpus {
            v.tx.send(CrossCall::Unstun).map_err(|_| Error::Stopped)?;
        }
        Ok(StunReport {
            latency: start.elapsed(),
            at_ns,
        })
    }

    /// Nanoseconds since the VM was created (the clock of `VcpuStats`' timestamps).
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().max(1) as u64
    }

    /// The guest's progress counter of vCPU `id` (the u64 at its progress slot).
    pub fn progress(&self, id: u32) -> Result<u64> {
        self.shared
            .mem
            .load::<u64>(
                GuestAddress(self.shared.layout.progress(id)),
                Ordering::Acquire,
            )
            .map_err(|e| Error::Memory(e.to_string()))
    }

    /// Saves every vCPU's state (VM stunned or not started): sections `vcpu/<n>`.
    pub fn save_vcpus(&self) -> Result<Vec<Section>> {
        // Every vCPU captures its own state on its own thread, all at once.
        let mut waits = Vec::new();
        for id in 0..self.vcpu_count() {
            let (tx, rx) = bounded(1);
            let call: VcpuCall = Box::new(move |ctx| {
                let done = ctx.stats.done.load(Ordering::Acquire);
                let r = capture_vcpu(&ctx.fd, &ctx.shared.msrs, done).map(|mut s| {
                    if !ctx.shared.ran.load(Ordering::Acquire) {
                        let r = ctx
                            .shared
                            .restored
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        if let Some(Some((tsc, tmcct))) = r.vcpus.get(ctx.id as usize) {
                            s.freeze_time(*tsc, *tmcct);
                        }
                    }
                    s
                });
                let _ = tx.send(r);
            });
            self.post(id as usize, CrossCall::Call(call))?;
            waits.push(rx);
        }
        waits
            .into_iter()
            .enumerate()
            .map(|(id, rx)| {
                let id = id as u32;
                let snap = rx.recv().map_err(|_| Error::Stopped)??;
                Section::encode(&format!("vcpu/{id}"), VCPU_STATE_VERSION, &snap).map_err(|e| {
                    Error::Vcpu {
                        vcpu: id,
                        msg: e.to_string(),
                    }
                })
            })
            .collect()
    }

    /// Loads every vCPU's state from `snap` (before any vCPU runs).
    pub fn restore_vcpus(&self, snap: &Snapshot) -> Result<()> {
        let n = self.vcpu_count();
        if snap.get(&format!("vcpu/{n}")).is_some() {
            return Err(Error::Config(format!(
                "the snapshot has more than {n} vCPUs"
            )));
        }
        for id in 0..n {
            let name = format!("vcpu/{id}");
            let sec = snap
                .get(&name)
                .ok_or_else(|| Error::Config(format!("the snapshot has no state for vCPU {id}")))?;
            if sec.version != VCPU_STATE_VERSION {
                return Err(Error::Vcpu {
                    vcpu: id,
                    msg: format!(
                        "state version {} is not one this build reads (1)",
                        sec.version
                    ),
                });
            }
            let state: VcpuSnapshot = sec.decode().map_err(|e| Error::Vcpu {
                vcpu: id,
                msg: e.to_string(),
            })?;
            self.call_on(id, move |ctx| {
                state.apply(&ctx.fd)?;
                if state.done {
                    ctx.mark_done_restored();
                }
                let mut r = ctx
                    .shared
                    .restored
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                r.vcpus.resize(ctx.shared.layout.vcpus as usize, None);
                r.vcpus[ctx.id as usize] = Some(state.time_values());
                Ok::<_, Error>(())
            })??;
        }
        Ok(())
    }

    /// Runs every module's `checkpoint` on the boot vCPU: sections `module/<name>`.
    pub fn checkpoint_modules(&self, args: &CptArgs) -> Result<Vec<Section>> {
        let modules = self.modules.clone();
        let args = args.clone();
        let extra = args.extra.clone();
        let saved = self.call_on(0, move |ctx| {
            modules.run(|m| Ok((m.version(), m.checkpoint(ctx, &args)?)))
        })??;
        let mut out: Vec<Section> = saved
            .into_iter()
            .filter_map(|(name, (version, data))| {
                data.map(|data| Section {
                    name: format!("module/{name}"),
                    version,
                    data,
                })
            })
            .collect();
        out.append(&mut extra.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(out)
    }

    /// Runs every module's `restore` on the boot vCPU, in table order. A module with saved
    /// state that this VM lacks, or the reverse, is an error that names it.
    pub fn restore_modules(&self, snap: &Snapshot, args: &CptArgs) -> Result<()> {
        let names = self.modules.names();
        for s in snap
            .names()
            .iter()
            .filter_map(|n| n.strip_prefix("module/"))
        {
            if !names.contains(&s) {
                return Err(Error::Config(format!(
                    "the snapshot has state for monitor module {s:?}, which this build lacks"
                )));
            }
        }
        let sections: Vec<Option<Section>> = names
            .iter()
            .map(|n| snap.get(&format!("module/{n}")).cloned())
            .collect();
        let modules = self.modules.clone();
        let args = args.clone();
        self.call_on(0, move |ctx| {
            let mut i = 0;
            modules.run(|m| {
                let s = &sections[i];
                i += 1;
                match s {
                    Some(s) => m.restore(ctx, s.version, &s.data, &args),
                    None => Ok(()),
                }
            })
        })??;
        Ok(())
    }

    /// Fetches and resets the dirty-page bitmap: KVM's log (guest writes) OR vm-memory's bitmap
    /// (host writes, e.g. devices). Bit `n` stands for guest page `n`.
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>> {
        self.shared.take_dirty_bitmap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for id in 0..self.vcpus.len() {
            let _ = self.post(id, CrossCall::Exit);
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Proof that every vCPU is stopped. Dropping it lets them run again.
pub struct StunGuard<'a> {
    vm: &'a Vm,
    _lock: MutexGuard<'a, ()>,
    report: StunReport,
    released: bool,
}

impl StunGuard<'_> {
    /// How long the stun took.
    pub fn report(&self) -> StunReport {
        self.report
    }
    /// The stunned VM.
    pub fn vm(&self) -> &Vm {
        self.vm
    }
    /// Lets the vCPUs run again and reports how long that took.
    pub fn unstun(mut self) -> Result<StunReport> {
        self.released = true;
        self.vm.unstun_all()
    }
}

impl Drop for StunGuard<'_> {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.vm.unstun_all() {
                log::error!("unstun failed: {e}");
            }
        }
    }
}
