//! The VM: KVM, guest memory, vCPU threads, stun.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use kvm_ioctls::Kvm;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::Killable;

use crate::kick::{install_kick_handler, kick_signal, KvmRunMap};
use crate::layout::Layout;
use crate::module::{CptArgs, ModuleTable};
use crate::rpc::UserRpc;
use crate::shared::{GuestMem, VmShared};
use crate::state::{
    capture_vcpu, msr_list, Restored, VcpuPersist, VcpuSnapshot, VCPU_STATE_VERSION,
};
use crate::vcpu::{vcpu_loop, CrossCall, VcpuCall, VcpuContext, VcpuSched, VcpuState, VcpuStats};
use crate::{Error, Result};
use checkpoint::{Persist, SectionId};
use checkpoint::{Section, Snapshot};

/// One module's saved state: (its place in the table, (state version, state)).
type ModuleSaved = (usize, (u32, Option<Vec<u8>>));

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
    /// Experiment (issue 15): track dirty pages with KVM's dirty ring of this many bytes per
    /// vCPU instead of the dirty bitmap; 0 (the default) = the bitmap. See [`crate::ring`].
    pub dirty_ring_bytes: u32,
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
            dirty_ring_bytes: 0,
        }
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

/// vCPU states being captured on their threads (see [`Vm::save_vcpus_begin`]).
pub struct PendingVcpuStates(Vec<crossbeam_channel::Receiver<Result<crate::state::VcpuSnapshot>>>);

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
        // Start rayon's pool here, on the caller's thread: pool threads inherit the scheduling
        // policy of the thread that starts them, and one started from a SCHED_IDLE vCPU thread
        // (MainMem's page copy runs there) would do all replication work at idle priority.
        let _ = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("tandem-pool-{i}"))
            .build_global();
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
        let ring = config.dirty_ring_bytes;
        let ring = (ring != 0)
            .then(|| crate::ring::enable(&vm_fd, ring))
            .transpose()?;
        let manual_dirty = ring.is_none() && crate::rearm::enable_manual_protect(&kvm, &vm_fd);
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
        let dirty_ring = ring
            .map(|b| crate::ring::DirtyRings::map(&fds, b, layout.pages()))
            .transpose()?;
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
            mmio_bus: OnceLock::new(),
            manual_dirty,
            rearm: Mutex::new(crate::rearm::Rearm::default()),
            dirty_ring,
            crew: crate::crew::Crew::new(),
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
        crate::image::load_flat(&self.shared.mem, addr, image)
    }

    /// Loads a guest image, ELF64 or flat (see [`crate::image::load`]); returns its entry.
    pub fn load_guest(&self, bytes: &[u8], load_addr: u64, entry: Option<u64>) -> Result<u64> {
        crate::image::load(&self.shared.mem, bytes, load_addr, entry)
    }

    /// Installs the MMIO bus: from now on every MMIO exit goes to `bus` on the vCPU thread
    /// that took it (see [`crate::mmio`]). Once per VM, before the vCPUs start.
    pub fn set_mmio_bus(&self, bus: Arc<dyn crate::MmioBus>) -> Result<()> {
        self.shared.mmio_bus.set(bus).map_err(|_| Error::BadState {
            action: "install an MMIO bus",
            why: "this VM has one already".into(),
        })
    }

    /// Makes `evt` an irqfd: a write to it raises `gsi` on the in-kernel IOAPIC without a
    /// vCPU exit (virtio-mmio device `i` uses GSI `MMIO_GSI_BASE + i`, 5..=20; see
    /// [`crate::mmio`]). Needs the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        if !self.shared.irqchip {
            return Err(Error::Config(format!(
                "GSI {gsi}: this VM has no in-kernel irqchip, so devices cannot raise interrupts"
            )));
        }
        self.shared
            .vm_fd
            .register_irqfd(evt, gsi)
            .map_err(Error::kvm("KVM_IRQFD"))
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
        self.stun_locked(lock)
    }

    /// [`Vm::stun`], unless a stun is in force already (then `None` at once: the VM is stopped
    /// anyway). For a caller that must never wait on another's stun, such as a throttle.
    pub fn try_stun(&self) -> Result<Option<StunGuard<'_>>> {
        let lock = match self.stun_lock.try_lock() {
            Ok(l) => l,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        self.stun_locked(lock).map(Some)
    }

    fn stun_locked<'a>(&'a self, lock: MutexGuard<'a, ()>) -> Result<StunGuard<'a>> {
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
        let pending = self.save_vcpus_begin()?;
        self.save_vcpus_end(pending)
    }

    /// Asks every vCPU to capture its own state on its own thread, all at once, and returns
    /// without waiting (the caller does other work of the stun meanwhile, e.g. the page copy);
    /// [`Vm::save_vcpus_end`] collects the states.
    pub fn save_vcpus_begin(&self) -> Result<PendingVcpuStates> {
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
        Ok(PendingVcpuStates(waits))
    }

    /// The states asked for by [`Vm::save_vcpus_begin`], as `vcpu/<n>` sections.
    pub fn save_vcpus_end(&self, pending: PendingVcpuStates) -> Result<Vec<Section>> {
        pending
            .0
            .into_iter()
            .enumerate()
            .map(|(id, rx)| {
                let id = id as u32;
                let snap = rx.recv().map_err(|_| Error::Stopped)??;
                Section::encode(&SectionId::Vcpu(id).name(), VCPU_STATE_VERSION, &snap).map_err(
                    |e| Error::Vcpu {
                        vcpu: id,
                        msg: e.to_string(),
                    },
                )
            })
            .collect()
    }

    /// Loads every vCPU's state from `snap` (before any vCPU runs).
    pub fn restore_vcpus(&self, snap: &Snapshot) -> Result<()> {
        let n = self.vcpu_count();
        if snap.get(&SectionId::Vcpu(n).name()).is_some() {
            return Err(Error::Snapshot(format!(
                "the snapshot has more than {n} vCPUs"
            )));
        }
        for id in 0..n {
            let name = SectionId::Vcpu(id).name();
            let sec = snap.get(&name).ok_or_else(|| {
                Error::Snapshot(format!("the snapshot has no state for vCPU {id}"))
            })?;
            let state: VcpuSnapshot =
                VcpuPersist::decode(sec.version, &sec.data).map_err(|e| Error::Vcpu {
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

    /// Runs every module's checkpoint: sections `module/<name>`, in table order. Modules with
    /// VM-wide state ([`crate::Module::checkpoint_vm`]) save on this thread; the others on the
    /// boot vCPU, concurrently (no cross-call when there are none).
    pub fn checkpoint_modules(&self, args: &CptArgs) -> Result<Vec<Section>> {
        let modules = self.modules.clone();
        // On the boot vCPU: the modules whose state is not VM-wide, posted first so that they
        // run while this thread saves the others.
        let on_vcpu: Vec<usize> = modules
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.vm_wide())
            .map(|(i, _)| i)
            .collect();
        let pending = if on_vcpu.is_empty() {
            None
        } else {
            let (tx, rx) = bounded(1);
            let (table, args, which) = (modules.clone(), args.clone(), on_vcpu.clone());
            let call: VcpuCall = Box::new(move |ctx| {
                let r: Result<Vec<ModuleSaved>> = table
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| which.contains(i))
                    .map(|(i, m)| Ok((i, (m.version(), m.checkpoint(ctx, &args)?))))
                    .collect();
                let _ = tx.send(r);
            });
            self.post(0, CrossCall::Call(call))?;
            Some(rx)
        };
        let mut saved: Vec<ModuleSaved> = Vec::new();
        let mut first_err = None;
        for (i, m) in modules.iter().enumerate() {
            if on_vcpu.contains(&i) {
                continue;
            }
            match m.checkpoint_vm(&self.shared, args) {
                Ok(data) => saved.push((i, (m.version(), data))),
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
        }
        if let Some(rx) = pending {
            // Always collected, so that the boot vCPU's call is over before an error returns.
            let r = rx.recv().map_err(|_| Error::Stopped)?;
            match r {
                Ok(v) => saved.extend(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        saved.sort_by_key(|(i, _)| *i);
        let names = modules.names();
        let mut out: Vec<Section> = saved
            .into_iter()
            .filter_map(|(i, (version, data))| {
                data.map(|data| Section {
                    name: SectionId::Module(names[i]).name(),
                    version,
                    data,
                })
            })
            .collect();
        out.append(&mut args.extra.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(out)
    }

    /// Runs every module's `restore` on the boot vCPU, in table order. A module with saved
    /// state that this VM lacks, or the reverse, is an error that names it.
    pub fn restore_modules(&self, snap: &Snapshot, args: &CptArgs) -> Result<Vec<&'static str>> {
        let names = self.modules.names();
        for s in snap
            .names()
            .iter()
            .filter_map(|n| match SectionId::parse(n) {
                SectionId::Module(m) => Some(m),
                _ => None,
            })
        {
            if !names.contains(&s) {
                return Err(Error::Snapshot(format!(
                    "the snapshot has state for monitor module {s:?}, which this build lacks"
                )));
            }
        }
        let sections: Vec<Option<Section>> = names
            .iter()
            .map(|n| snap.get(&SectionId::Module(n).name()).cloned())
            .collect();
        let modules = self.modules.clone();
        let args = args.clone();
        let restored = self.call_on(0, move |ctx| {
            let mut i = 0;
            modules.run(|m| {
                let s = &sections[i];
                i += 1;
                match s {
                    Some(s) => m.restore(ctx, s.version, &s.data, &args).map(|()| true),
                    None => Ok(false),
                }
            })
        })??;
        Ok(restored
            .into_iter()
            .filter_map(|(name, did)| did.then_some(name))
            .collect())
    }

    /// Fetches and resets the dirty-page bitmap: KVM's log (guest writes) OR vm-memory's bitmap
    /// (host writes, e.g. devices). Bit `n` stands for guest page `n`.
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>> {
        self.dirty_log().take().map(|d| d.bitmap().to_vec())
    }

    /// The dirty log and the page copier (the one way userland reads dirty pages).
    pub fn dirty_log(&self) -> crate::DirtyLog {
        crate::DirtyLog::new(self.shared.clone())
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
