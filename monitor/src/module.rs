//! The monitor module table.
//!
//! Modules are registered in order; the order is the order of every callback. As in the
//! seed's `MonModule` table:
//!
//! | callback          | runs on                         | when                              |
//! |-------------------|---------------------------------|-----------------------------------|
//! | `init`            | the boot vCPU (vCPU 0)          | once, after the VM is created     |
//! | `init_per_thread` | every vCPU thread (boot too)    | after every module's `init`       |
//! | `sync`            | the boot vCPU                   | checkpoint SAVE_SYNC / CONTINUE_SYNC / RESTORE_SYNC |
//! | `checkpoint`      | the boot vCPU                   | checkpoint SAVE (section `module/<name>`) |
//! | `checkpoint_vm`   | the thread running SAVE         | checkpoint SAVE, for VM-wide state (instead of `checkpoint`) |
//! | `restore`         | the boot vCPU                   | checkpoint RESTORE                |
//!
//! Every callback has a default body that does nothing, so a module implements only what it
//! needs. The standard table is MainMem, CPU, Irqchip (main memory and the CPU first).
//!
//! A module whose saved state is VM-wide (guest memory, the VM fd, facts fetched at start)
//! implements `checkpoint_vm`: SAVE then calls it on its own thread, while every vCPU captures
//! its registers on its own — the page copy overlaps the vCPU state reads, and when no module
//! needs the boot vCPU the SAVE step makes no cross-call to it at all. All three standard
//! modules do; each group keeps table order (sections come back in table order).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use checkpoint::memfile::{self, MainMemPersist, MemState};
use checkpoint::Persist;

use kvm_bindings::{kvm_regs, kvm_segment, KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{self, Layout};
use crate::shared::VmShared;
use crate::vcpu::VcpuContext;
use crate::{Error, Result};

/// One monitor module.
pub trait Module: Send + Sync {
    /// The module's name (used in logs, errors and checkpoint sections).
    fn name(&self) -> &'static str;
    /// Called once on the boot vCPU after the VM is created.
    fn init(&self, _vm: &VmShared) -> Result<()> {
        Ok(())
    }
    /// Called on every vCPU thread after all modules' `init`.
    fn init_per_thread(&self, _vcpu: &mut VcpuContext) -> Result<()> {
        Ok(())
    }
    /// Checkpoint sync, called on the boot vCPU while the VM is stunned. Returns what it did,
    /// for the trace (`None`: nothing, and nothing is traced).
    fn sync(&self, _vcpu0: &mut VcpuContext) -> Result<Option<String>> {
        Ok(None)
    }
    /// Whether [`Module::sync`] does anything. A module that overrides `sync` says so here;
    /// when no module does, the sync steps skip the cross-call to the boot vCPU (two per
    /// epoch, each a thread round trip inside the guest's pause).
    fn syncs(&self) -> bool {
        false
    }
    /// Version of the state `checkpoint` writes.
    fn version(&self) -> u32 {
        1
    }
    /// Checkpoint save, called on the boot vCPU while the VM is stunned. `None`: no state.
    fn checkpoint(&self, _vcpu0: &mut VcpuContext, _args: &CptArgs) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Whether this module's saved state is VM-wide (guest memory, VM ioctls, facts fetched at
    /// start): SAVE then calls [`Module::checkpoint_vm`] on its own thread instead of
    /// [`Module::checkpoint`] on the boot vCPU.
    fn vm_wide(&self) -> bool {
        false
    }
    /// Checkpoint save of VM-wide state (see [`Module::vm_wide`]), on the thread running the
    /// SAVE step while the VM is stunned. `None`: no state.
    fn checkpoint_vm(&self, _vm: &Arc<VmShared>, _args: &CptArgs) -> Saved {
        Ok(None)
    }
    /// Checkpoint restore of state saved at `version`, on the boot vCPU before any vCPU runs.
    fn restore(
        &self,
        _vcpu0: &mut VcpuContext,
        _version: u32,
        _data: &[u8],
        _args: &CptArgs,
    ) -> Result<()> {
        Ok(())
    }
}

/// What a module's checkpoint returns: its state (`None`: it has none).
pub type Saved = Result<Option<Vec<u8>>>;

/// Where a checkpoint's bulk data goes (or comes from).
#[derive(Clone, Default)]
pub struct CptArgs {
    /// The sparse memory file (written on save, checked on restore).
    pub mem_path: Option<PathBuf>,
    /// On restore, check every memory chunk's checksum first (otherwise pages load lazily).
    pub verify: bool,
    /// On save, put memory into the state file as zstd chunks instead of a `.mem` file.
    pub compress: bool,
    /// Sections a module saves besides its own (the compressed memory chunks).
    pub extra: Arc<Mutex<Vec<checkpoint::Section>>>,
    /// On restore, the whole snapshot (for modules whose state spans several sections).
    pub snapshot: Option<Arc<checkpoint::Snapshot>>,
    /// Told (bytes done, bytes in all) as long work (memory save or load) goes on.
    pub progress: Option<Progress>,
    /// Replication: on SAVE, MainMem copies the dirty pages (or all of memory) here instead of
    /// writing a memory file, and resets the dirty log.
    pub epoch: Option<EpochMem>,
}

/// Where MainMem puts an epoch's pages (see [`CptArgs::epoch`]).
#[derive(Clone, Default)]
pub struct EpochMem {
    /// Copy every page (full sync), not only the dirty ones.
    pub full: bool,
    /// Re-arm every dirty page (leave none writable between epochs): the next epoch's set is
    /// exactly what the guest wrote meanwhile, not a superset (a converging migration's
    /// epochs; see [`crate::dirty`]).
    pub precise: bool,
    /// The copied runs of contiguous pages, in address order (filled by MainMem).
    pub runs: Arc<Mutex<Vec<PageRun>>>,
}

pub use crate::dirty::{dirty_runs, PageRun, MAX_RUN_PAGES};

/// A progress callback: (bytes done, bytes in all). Called from several threads.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

impl std::fmt::Debug for CptArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CptArgs")
            .field("mem_path", &self.mem_path)
            .field("verify", &self.verify)
            .field("compress", &self.compress)
            .finish_non_exhaustive()
    }
}

fn module_err(module: &'static str) -> impl Fn(String) -> Error {
    move |msg| Error::Module { module, msg }
}

/// The ordered module table.
#[derive(Clone)]
pub struct ModuleTable {
    modules: Arc<Vec<Arc<dyn Module>>>,
}

impl ModuleTable {
    /// The standard table: [`MainMem`], [`Cpu`], [`Irqchip`], then `extra` in order.
    pub fn standard(extra: Vec<Arc<dyn Module>>) -> Self {
        let mut modules: Vec<Arc<dyn Module>> =
            vec![Arc::new(MainMem), Arc::new(Cpu), Arc::new(Irqchip)];
        modules.extend(extra);
        ModuleTable {
            modules: Arc::new(modules),
        }
    }

    /// The modules in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Module>> {
        self.modules.iter()
    }

    /// Their names in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.modules.iter().map(|m| m.name()).collect()
    }

    pub(crate) fn run<T>(
        &self,
        mut f: impl FnMut(&Arc<dyn Module>) -> Result<T>,
    ) -> Result<Vec<(&'static str, T)>> {
        self.modules.iter().map(|m| Ok((m.name(), f(m)?))).collect()
    }
}

/// Main memory: registers guest RAM with KVM (dirty logging on) and writes the page tables and
/// GDT of the [`layout`].
pub struct MainMem;

impl Module for MainMem {
    fn name(&self) -> &'static str {
        "MainMem"
    }

    fn version(&self) -> u32 {
        MainMemPersist::VERSION
    }

    fn init(&self, vm: &VmShared) -> Result<()> {
        for (slot, region) in vm.mem.iter().enumerate() {
            let host = vm
                .mem
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory(e.to_string()))?;
            let desc = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is the whole of one region of `vm.mem`, which VmShared
            // keeps mapped for as long as the VM fd lives (fields drop in order: fd first).
            unsafe { vm.vm_fd.set_user_memory_region(desc) }
                .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        if vm.restoring {
            // The page tables and GDT come back with the rest of memory.
            return Ok(());
        }
        write_tables(&vm.mem, &vm.layout)?;
        write_boot_info(vm)
    }

    fn checkpoint(&self, vcpu0: &mut VcpuContext, args: &CptArgs) -> Result<Option<Vec<u8>>> {
        main_mem_checkpoint(&vcpu0.shared, args)
    }

    fn checkpoint_vm(&self, vm: &Arc<VmShared>, args: &CptArgs) -> Saved {
        main_mem_checkpoint(vm, args)
    }

    fn vm_wide(&self) -> bool {
        true
    }

    fn restore(
        &self,
        vcpu0: &mut VcpuContext,
        version: u32,
        data: &[u8],
        args: &CptArgs,
    ) -> Result<()> {
        let err = module_err("MainMem");
        let index = MainMemPersist::decode(version, data)
            .map_err(|e| err(format!("bad memory index: {e}")))?
            .index;
        index.check().map_err(|e| err(e.to_string()))?;
        if index.size != vcpu0.shared.layout.mem_bytes {
            return Err(err(format!(
                "the snapshot holds {} MiB of memory but this VM has {} MiB",
                index.size >> 20,
                vcpu0.shared.layout.mem_bytes >> 20
            )));
        }
        if index.compressed {
            // Every chunk is decompressed and checked before any is written.
            let snap = args
                .snapshot
                .as_ref()
                .ok_or_else(|| err("no snapshot to load memory from".into()))?;
            let mem = &vcpu0.shared.mem;
            let done = std::sync::atomic::AtomicU64::new(0);
            let total = index.used_bytes();
            let write = |gpa: u64, b: &[u8]| {
                mem.write_slice(b, GuestAddress(gpa))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let n = b.len() as u64;
                let so_far = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                if let Some(p) = &args.progress {
                    p(so_far, total);
                }
                Ok(())
            };
            memfile::load_compressed(&index, snap, &write).map_err(|e| err(e.to_string()))?;
        } else if args.verify {
            let path = args
                .mem_path
                .as_ref()
                .ok_or_else(|| err("no memory file to verify".into()))?;
            memfile::verify_sparse(path, &index).map_err(|e| err(e.to_string()))?;
        }
        Ok(())
    }
}

/// MainMem's checkpoint: an epoch's pages (see [`CptArgs::epoch`]) or the whole memory into a
/// memory file or compressed sections.
fn main_mem_checkpoint(shared: &Arc<VmShared>, args: &CptArgs) -> Saved {
    let err = module_err("MainMem");
    let size = shared.layout.mem_bytes;
    if let Some(epoch) = &args.epoch {
        // Replication: fetch and reset the dirty log, copy the pages out (with the crew's
        // helpers beyond 2 MiB: `crate::crew`).
        let log = crate::dirty::DirtyLog::new(shared.clone());
        let runs = if epoch.full {
            log.take()?;
            crate::dirty::DirtyPages::all(log.pages()).runs()
        } else if epoch.precise {
            log.take()?.runs()
        } else {
            log.take_epoch()?.runs()
        };
        let copied = log.copy_runs(&runs).map_err(|e| err(e.to_string()));
        *epoch.runs.lock().unwrap_or_else(|p| p.into_inner()) = copied?;
        return Ok(None);
    }
    let progress = |done: u64| {
        if let Some(p) = &args.progress {
            p(done, size)
        }
    };
    // Pages nothing ever touched are zeros, written as holes without being read (reading
    // them would tax a guest that runs on after the snapshot; see `DirtyLog::read_touched`).
    let log = crate::dirty::DirtyLog::new(shared.clone());
    let untouched = log.never_touched().unwrap_or_else(|e| {
        log::debug!("every page is read for the snapshot: {e}");
        crate::dirty::DirtyPages::none(log.pages())
    });
    let read = |gpa: u64, buf: &mut [u8]| {
        log.read_touched(&untouched, gpa, buf)
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    let state = if args.compress {
        let (index, sections) =
            memfile::save_compressed(size, &read, &progress).map_err(|e| err(e.to_string()))?;
        args.extra
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(sections);
        MemState { index, file: None }
    } else {
        let Some(path) = &args.mem_path else {
            return Ok(None);
        };
        // The state file names the memory file (it lies beside it).
        let file = checkpoint::files::name_of(path).map_err(|e| err(e.to_string()))?;
        let index =
            memfile::save_sparse(path, size, &read, &progress).map_err(|e| err(e.to_string()))?;
        MemState {
            index,
            file: Some(file),
        }
    };
    MainMemPersist::encode(&state)
        .map(Some)
        .map_err(|e| err(e.to_string()))
}

/// Writes the boot-info page (`guest_abi::boot`): vCPUs, RAM, TSC frequency, devices, arguments.
pub fn write_boot_info(vm: &VmShared) -> Result<()> {
    use guest_abi::boot::{BootInfo, MAX_ARGS};
    let mut info = BootInfo::new(vm.layout.vcpus, vm.layout.mem_bytes, vm.tsc_khz);
    if vm.boot_args.len() > MAX_ARGS {
        return Err(Error::Config(format!(
            "the guest arguments take {} bytes: at most {MAX_ARGS} fit the boot-info page",
            vm.boot_args.len()
        )));
    }
    if vm.mmio_devices.len() > info.devices.len() {
        return Err(Error::Config(format!(
            "{} devices: at most {} fit",
            vm.mmio_devices.len(),
            info.devices.len()
        )));
    }
    info.args = &vm.boot_args;
    info.device_count = vm.mmio_devices.len();
    info.devices[..vm.mmio_devices.len()].copy_from_slice(&vm.mmio_devices);
    let mut page = vec![0u8; layout::BOOT_INFO_SIZE as usize];
    info.write(&mut page)
        .map_err(|e| Error::Config(format!("boot info: {e:?}")))?;
    vm.mem
        .write_slice(&page, GuestAddress(layout::BOOT_INFO_ADDR))
        .map_err(|e| Error::Memory(e.to_string()))
}

/// Writes the GDT and the identity-mapped page tables into guest memory.
pub fn write_tables(mem: &crate::GuestMem, layout: &Layout) -> Result<()> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))
    };
    for (i, d) in layout::GDT.iter().enumerate() {
        w(layout::GDT_ADDR + 8 * i as u64, *d)?;
    }
    for v in 0..layout.vcpus {
        let [low, high] = layout.tss_descriptor(v);
        let at = layout::GDT_ADDR + u64::from(layout.tss_selector(v));
        w(at, low)?;
        w(at + 8, high)?;
        // TSS: rsp0 at offset 4; the I/O bitmap right after the TSS (offset 104), all zero
        // (every port allowed), then its 0xff terminator.
        w(layout.tss(v) + 4, layout.kstack_top(v))?;
        let tss = GuestAddress(layout.tss(v));
        let werr = |e: vm_memory::GuestMemoryError| Error::Memory(e.to_string());
        mem.write_obj(104u16, tss.unchecked_add(102))
            .map_err(werr)?;
        mem.write_slice(&[0u8; 8192], tss.unchecked_add(104))
            .map_err(werr)?;
        mem.write_obj(0xffu8, tss.unchecked_add(layout::TSS_LIMIT))
            .map_err(werr)?;
    }
    for (addr, v) in layout.page_table_entries() {
        w(addr, v)?;
    }
    Ok(())
}

/// The CPU: CPUID, long-mode CPL3 segment state and the entry registers of every vCPU.
pub struct Cpu;

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The CPU module's state: the vCPU count and the TSC rate the boot vCPU reported at start
/// (fixed for the VM's life, so not asked of KVM again at every epoch).
fn cpu_checkpoint(shared: &VmShared) -> Saved {
    let s = CpuState {
        vcpus: shared.layout.vcpus,
        tsc_khz: u32::try_from(shared.tsc_khz).unwrap_or(0),
    };
    postcard::to_stdvec(&s)
        .map(Some)
        .map_err(|e| module_err("CPU")(e.to_string()))
}

/// Saved state of the CPU module.
#[derive(serde::Serialize, serde::Deserialize)]
struct CpuState {
    vcpus: u32,
    tsc_khz: u32,
}

impl Module for Cpu {
    fn name(&self) -> &'static str {
        "CPU"
    }

    fn checkpoint(&self, vcpu0: &mut VcpuContext, _args: &CptArgs) -> Result<Option<Vec<u8>>> {
        cpu_checkpoint(&vcpu0.shared)
    }

    fn checkpoint_vm(&self, vm: &Arc<VmShared>, _args: &CptArgs) -> Saved {
        cpu_checkpoint(vm)
    }

    fn vm_wide(&self) -> bool {
        true
    }

    fn restore(
        &self,
        vcpu0: &mut VcpuContext,
        _version: u32,
        data: &[u8],
        _args: &CptArgs,
    ) -> Result<()> {
        let err = module_err("CPU");
        let s: CpuState =
            postcard::from_bytes(data).map_err(|e| err(format!("bad CPU state: {e}")))?;
        if s.vcpus != vcpu0.shared.layout.vcpus {
            return Err(err(format!(
                "the snapshot has {} vCPUs but this VM has {}",
                s.vcpus, vcpu0.shared.layout.vcpus
            )));
        }
        let here = vcpu0.fd.get_tsc_khz().unwrap_or(0);
        if s.tsc_khz != 0 && here != 0 && s.tsc_khz != here {
            log::warn!(
                "the snapshot's TSC ran at {} kHz, this host's at {here} kHz",
                s.tsc_khz
            );
        }
        Ok(())
    }

    fn init_per_thread(&self, vcpu: &mut VcpuContext) -> Result<()> {
        let shared = vcpu.shared.clone();
        vcpu.fd
            .set_cpuid2(&shared.cpuid)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;

        let mut sregs = vcpu.fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        sregs.cs = segment(layout::USER_CS, 0xb, true);
        let data = segment(layout::USER_DS, 0x3, false);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        let l = &shared.layout;
        let id = vcpu.id;
        if id == 0 {
            let pvm = crate::state::is_pvm(&vcpu.fd);
            shared.pvm.store(pvm, std::sync::atomic::Ordering::Relaxed);
            if pvm {
                log::debug!("this host's KVM is KVM-PVM");
            }
        }
        sregs.gs.base = l.progress(id);
        sregs.gdt.base = layout::GDT_ADDR;
        sregs.gdt.limit = (u64::from(l.tss_selector(l.vcpus - 1)) + 15) as u16;
        sregs.idt.base = layout::IDT_ADDR;
        sregs.idt.limit = 256 * 16 - 1;
        sregs.tr = kvm_segment {
            base: l.tss(id),
            limit: layout::TSS_LIMIT as u32,
            selector: l.tss_selector(id),
            type_: 0xb, // busy 64-bit TSS
            present: 1,
            ..Default::default()
        };
        // PE | MP | ET | NE | WP | AM | PG
        sregs.cr0 = 0x8005_0033;
        sregs.cr3 = layout::PML4_ADDR;
        // PAE | OSFXSR | OSXMMEXCPT: SSE works at CPL3.
        sregs.cr4 = 0x20 | 0x200 | 0x400;
        // LME | LMA
        sregs.efer = 0x500;
        vcpu.fd
            .set_sregs(&sregs)
            .map_err(Error::kvm("KVM_SET_SREGS"))?;

        let regs = kvm_regs {
            rip: shared.entry,
            rsp: l.stack_top(id),
            rdi: u64::from(id),
            rsi: u64::from(l.vcpus),
            rdx: l.ring(id),
            rcx: l.data(id),
            r8: l.data_size(),
            r9: l.progress(id),
            rflags: 0x2 | (3 << 12),
            ..Default::default()
        };
        vcpu.fd
            .set_regs(&regs)
            .map_err(Error::kvm("KVM_SET_REGS"))?;
        if shared.irqchip {
            // With the in-kernel LAPIC, application processors start in UNINITIALIZED and wait
            // for INIT/SIPI; every Tandem vCPU starts at the entry point instead.
            let runnable = kvm_bindings::kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            vcpu.fd
                .set_mp_state(runnable)
                .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }
}

/// The Irqchip module's state: PIC, IOAPIC, PIT and clock (VM ioctls).
fn irqchip_checkpoint(shared: &VmShared) -> Saved {
    if !shared.irqchip {
        return Ok(None);
    }
    let mut s = crate::state::capture_irqchip(&shared.vm_fd)?;
    if let Some((pit, clock)) = shared.frozen_vm_time() {
        s.pit = pit;
        s.clock = clock;
    }
    postcard::to_stdvec(&s)
        .map(Some)
        .map_err(|e| module_err("Irqchip")(e.to_string()))
}

/// The in-kernel interrupt controllers (PIC, IOAPIC), the PIT and the KVM clock.
pub struct Irqchip;

impl Module for Irqchip {
    fn name(&self) -> &'static str {
        "Irqchip"
    }

    fn version(&self) -> u32 {
        crate::state::IRQCHIP_STATE_VERSION
    }

    fn checkpoint(&self, vcpu0: &mut VcpuContext, _args: &CptArgs) -> Result<Option<Vec<u8>>> {
        irqchip_checkpoint(&vcpu0.shared)
    }

    fn checkpoint_vm(&self, vm: &Arc<VmShared>, _args: &CptArgs) -> Saved {
        irqchip_checkpoint(vm)
    }

    fn vm_wide(&self) -> bool {
        true
    }

    fn restore(
        &self,
        vcpu0: &mut VcpuContext,
        version: u32,
        data: &[u8],
        _args: &CptArgs,
    ) -> Result<()> {
        let err = module_err("Irqchip");
        let s = <crate::state::IrqchipPersist as checkpoint::Persist>::decode(version, data)
            .map_err(|e| err(e.to_string()))?;
        if !vcpu0.shared.irqchip {
            return Err(err(
                "the snapshot has an in-kernel irqchip but this host's KVM has none".into(),
            ));
        }
        s.apply(&vcpu0.shared.vm_fd)?;
        vcpu0.shared.remember_vm_time(s.pit, s.clock);
        Ok(())
    }
}
