//! The VM as vmx sees it: power-on (a phase table), the main loop, and the checkpoint driver.
//!
//! Save (monitor first at every step, then vmx):
//!
//! ```text
//!   vmx                                   monitor
//!    │ Stun ───────────────────────────▶ │ cross-calls, acks
//!    │ CptStep(SAVE_SYNC) ─────────────▶ │ modules sync
//!    │ ◀──────────────── StepDone ────── │
//!    │ groups sync (output drained)      │
//!    │ CptStep(QUIESCE) ───────────────▶ │ drain + restrict actions
//!    │ ◀──────────────── StepDone ────── │
//!    │ CptStep(SAVE) ──────────────────▶ │ vCPU state, modules checkpoint (memory file)
//!    │ ◀──────── StepDone(sections) ──── │
//!    │ stun callback; groups checkpoint; write state file (tmp + rename: the commit)
//!    │ delete the files of the previous snapshot at that path (checkpoint::files)
//!    │ CptStep(CONTINUE_SYNC) ─────────▶ │ lift restrictions, modules sync
//!    │ ◀──────────────── StepDone ────── │
//!    │ groups sync; Unstun; unstun callback            (or: power off after SAVE)
//! ```
//!
//! Restore happens in power-on phase 6 (vmx first at every step, then the monitor): RESTORE
//! (groups restore, then `CptStep(RESTORE)`: modules, vCPU state), RESTORE_SYNC (groups sync,
//! unpause, then `CptStep(RESTORE_SYNC)`: modules sync).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::files;
use checkpoint::group::{quiesce_groups, restore_groups, save_groups, sync_groups};
use checkpoint::memfile::{self, MemIndex, MemState};
use checkpoint::{CptState, Group, Machine, Persist, SaveEnd, Section, Side, Snapshot, Trace};
use crossbeam_channel::{never, unbounded, Receiver};
use devices::Record;
use devices::{DigestReport, DigestSink, OutputDevice, OutputSink, TextSink};
use monitor::{
    CptArgs, EpochMem, Layout, ModuleTable, Monitor, MonitorAction, PageRun, StepOutput, UserRpc,
    Vm, VmConfig,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::control::{
    self, reply, Answer, ControlSocket, Envelope, Request, RunState, SnapshotDone, VcpuStatus,
    VmStatus,
};
use crate::groups::{ConfigGroup, ConfigPersist, MachineConfig, OutputGroup, Sinks, VmmDevGroup};
use crate::spec::{GuestSpec, HeartbeatReport, OutputTarget, RunReport, VcpuReport};
use crate::virtio::{self, VirtioGroup};
use crate::{Error, Result};
use devices::vmmdev::{HeartbeatEvent, VmmDev};

/// How the VM comes to life.
#[derive(Clone, Debug)]
pub enum Boot {
    /// A fresh guest.
    Fresh {
        /// The guest code.
        guest: GuestSpec,
        /// vCPUs.
        vcpus: u32,
        /// RAM in MiB.
        mem_mib: u64,
        /// virtio-blk devices (`--disk`), device windows 0.. in this order.
        disks: Vec<devices::virtio::BlockConfig>,
        /// virtio-net devices (`--net`), windows after the disks.
        nets: Vec<devices::virtio::NetConfig>,
    },
    /// An empty VM shaped like a primary's, to hold a replica of it (a standby): memory and
    /// state arrive over the replication link and are loaded by [`Vmx::activate`].
    Replica {
        /// The primary's machine configuration.
        config: MachineConfig,
    },
    /// From a snapshot state file (and the files it names, beside it).
    Restore {
        /// The state file.
        path: PathBuf,
        /// Check every memory chunk's checksum before running.
        verify: bool,
    },
}

/// Everything besides the guest.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Where records go besides the digest.
    pub output: OutputTarget,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// Stay paused after power-on until a `resume`.
    pub paused: bool,
    /// Give up after this long.
    pub timeout: Option<Duration>,
    /// Write the checkpoint trace (JSON) here after every checkpoint or restore.
    pub trace: Option<PathBuf>,
    /// Host scheduling policy of the vCPU threads.
    pub vcpu_sched: monitor::VcpuSched,
}

/// Where the SAVE step puts memory.
enum SaveTarget {
    /// A snapshot: state file at `path`, memory in `path.mem-<nonce>` or compressed in the
    /// state file, disk copies in `path.disk<i>-<nonce>` (see `checkpoint::files`).
    File {
        path: PathBuf,
        compress: bool,
        nonce: String,
    },
    /// A replication epoch: pages copied into memory.
    Epoch(EpochMem),
}

/// Most data in one `disk-writes` section (a control message holds at most 16 MiB).
pub const DISK_WRITES_PART_BYTES: u64 = 8 << 20;

/// How [`Vmx::capture_epoch`] takes an epoch (default: the dirty pages, hot pages left
/// writable, the disk blocks written since the last take).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochCapture {
    /// Every page, not only the dirty ones.
    pub full: bool,
    /// Every disk block, not only those written since the last take.
    pub full_disk: bool,
    /// The exact dirty set: no page left writable between epochs (see
    /// [`monitor::EpochMem::precise`]).
    pub precise: bool,
}

/// One captured replication epoch (copies; the guest already runs on).
#[derive(Debug)]
pub struct Captured {
    /// Its number.
    pub epoch: u64,
    /// Every page (a full sync), not only the dirty ones.
    pub full: bool,
    /// The pages.
    pub runs: Vec<PageRun>,
    /// vCPU, module and group state (with the group manifest).
    pub sections: Vec<Section>,
    /// Output drained during the epoch, per vCPU (held until the epoch is acknowledged).
    pub records: Vec<Vec<Record>>,
    /// Frames the network cards sent during the epoch, taken while the guest was stunned
    /// (held until the epoch is acknowledged): (window, frames). Not sent to the standby.
    pub frames: Vec<(u32, devices::virtio::HeldFrames)>,
    /// How long the guest was stopped.
    pub pause: Duration,
    /// Of that, the monitor's SAVE step (dirty log, page copies, vCPU and module state).
    pub save_step: Duration,
    /// Where the pause went, in order: (phase, time) — see [`PAUSE_PHASES`].
    pub phases: Vec<(&'static str, Duration)>,
    /// Of that, waiting for every vCPU to stop (a vCPU thread that the host does not run at
    /// that moment acknowledges late; the guest was not running meanwhile either).
    pub stun: Duration,
}

/// The phases of an epoch's pause, in order: stopping the vCPUs (`stun`), the checkpoint
/// steps `save_sync` and `quiesce` (net RX stopped), the monitor's SAVE (`monitor_save`:
/// dirty log, page copies, vCPU and module state), the groups' SAVE (`groups_save`), taking
/// the held frames and the disks' writes (`devices`), `continue_sync` (net RX started again)
/// and `unstun`.
pub const PAUSE_PHASES: [&str; 8] = [
    "stun",
    "save_sync",
    "quiesce",
    "monitor_save",
    "groups_save",
    "devices",
    "continue_sync",
    "unstun",
];

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every vCPU finished.
    Finished(RunReport),
    /// Saved and powered off.
    Suspended {
        /// The snapshot.
        path: PathBuf,
        /// Output so far.
        report: RunReport,
    },
    /// Moved to another host (a planned migration): the VM runs there now.
    Moved {
        /// The receiver's address.
        to: String,
        /// The generation it runs as there.
        generation: u64,
        /// Output of the run here.
        report: RunReport,
    },
}

/// One row of the power-on phase table.
pub struct Phase {
    /// Phase number as the seed names them.
    pub id: &'static str,
    /// What happens.
    pub name: &'static str,
    /// Modules and groups that act in this phase.
    pub modules: &'static [&'static str],
    run: fn(&mut PowerOn) -> Result<()>,
}

/// The power-on phase table: restore is detected early (phase 1) and performed late (phase 6).
pub const POWER_ON: &[Phase] = &[
    Phase {
        id: "1",
        name: "detect restore, pause",
        modules: &["checkpoint"],
        run: PowerOn::detect,
    },
    Phase {
        id: "1.5",
        name: "machine configuration",
        modules: &["config"],
        run: PowerOn::config,
    },
    Phase {
        id: "2",
        name: "guest memory source",
        modules: &["MainMem"],
        run: PowerOn::memory,
    },
    Phase {
        id: "2.5",
        name: "open checkpoint data",
        modules: &["checkpoint", "MainMem"],
        run: PowerOn::open_data,
    },
    Phase {
        id: "3",
        name: "monitor: VM, module init",
        modules: &["MainMem", "CPU", "Irqchip"],
        run: PowerOn::monitor,
    },
    Phase {
        id: "4",
        name: "devices and groups",
        modules: &["config", "output", "vmmdev", "virtio"],
        run: PowerOn::devices,
    },
    Phase {
        id: "5",
        name: "load guest image",
        modules: &["loader"],
        run: PowerOn::image,
    },
    Phase {
        id: "6",
        name: "late power-on: restore, start",
        modules: &["checkpoint", "vCPUs"],
        run: PowerOn::late,
    },
];

/// Power-on in progress.
pub struct PowerOn {
    boot: Boot,
    opts: Options,
    snapshot: Option<Arc<Snapshot>>,
    config: Option<MachineConfig>,
    code: Option<(Vec<u8>, u64, u64)>,
    /// Guest arguments for the boot-info page (fresh boot of an image).
    boot_args: String,
    memory_file: Option<PathBuf>,
    vmx: Option<Vmx>,
    /// Phases run, in order.
    pub phases_run: Vec<&'static str>,
}

impl PowerOn {
    fn restoring(&self) -> bool {
        matches!(self.boot, Boot::Restore { .. } | Boot::Replica { .. })
    }

    fn detect(&mut self) -> Result<()> {
        if let Boot::Restore { path, .. } = &self.boot {
            // The VM will stay paused until phase 6 has restored it.
            let snap = Snapshot::read_file(path)?;
            self.snapshot = Some(Arc::new(snap));
            log::info!("restoring from {}", path.display());
        }
        Ok(())
    }

    fn config(&mut self) -> Result<()> {
        self.config = Some(match (&self.boot, &self.snapshot) {
            (Boot::Restore { .. }, Some(snap)) => {
                let sec = snap
                    .get(&checkpoint::group::section_name("config"))
                    .ok_or_else(|| checkpoint::Error::Corrupt("no machine configuration".into()))?;
                let c = ConfigPersist::decode(sec.version, &sec.data)?;
                Layout::new(c.mem_mib, c.vcpus).map_err(|e| {
                    checkpoint::Error::Corrupt(format!("machine configuration: {e}"))
                })?;
                c
            }
            (
                Boot::Fresh {
                    guest,
                    vcpus,
                    mem_mib,
                    disks,
                    nets,
                },
                _,
            ) => {
                let layout = Layout::new(*mem_mib, *vcpus)?;
                let (code, load, entry, name) = guest_code(guest, &layout)?;
                self.code = Some((code, load, entry));
                if let GuestSpec::Image { args, .. } = guest {
                    self.boot_args = args.clone();
                }
                // Image paths are recorded absolute: a restore may run elsewhere.
                let disks = disks
                    .iter()
                    .map(|d| devices::virtio::BlockConfig {
                        path: std::path::absolute(&d.path).unwrap_or_else(|_| d.path.clone()),
                        readonly: d.readonly,
                    })
                    .collect();
                MachineConfig {
                    vcpus: *vcpus,
                    mem_mib: *mem_mib,
                    entry,
                    guest: name,
                    disks,
                    nets: nets.clone(),
                }
            }
            (Boot::Replica { config }, _) => {
                Layout::new(config.mem_mib, config.vcpus)?;
                config.clone()
            }
            _ => unreachable!("phase 1 reads the snapshot of a restore"),
        });
        Ok(())
    }

    fn memory(&mut self) -> Result<()> {
        if let (Boot::Restore { path, .. }, Some(snap)) = (&self.boot, &self.snapshot) {
            // Sparse memory file (the one the state file names): mapped privately.
            // Compressed: fresh memory, filled in RESTORE.
            self.memory_file = MemState::of(snap)?.file_path(path)?;
        }
        Ok(())
    }

    fn open_data(&mut self) -> Result<()> {
        let Some(snap) = &self.snapshot else {
            return Ok(());
        };
        let index = memory_index(snap)?;
        let config = self.config.as_ref().expect("phase 1.5");
        if index.size != config.mem_mib << 20 {
            return Err(checkpoint::Error::Corrupt(format!(
                "memory index says {} bytes, the configuration {} MiB",
                index.size, config.mem_mib
            ))
            .into());
        }
        if let Some(file) = &self.memory_file {
            memfile::open_checked(file, &index)?;
        }
        Ok(())
    }

    fn monitor(&mut self) -> Result<()> {
        let c = self.config.clone().expect("phase 1.5");
        let (rpc_tx, rpc_rx) = unbounded();
        let specs = virtio::device_specs(&c.disks, &c.nets)?;
        let vm_cfg = VmConfig {
            mmio_devices: virtio::boot_devices(&specs),
            entry: c.entry,
            memory_file: self.memory_file.clone(),
            restoring: self.restoring(),
            vcpu_sched: self.opts.vcpu_sched,
            boot_args: self.boot_args.clone(),
            ..VmConfig::new(c.mem_mib, c.vcpus)
        };
        let vm = Arc::new(Vm::new(
            &vm_cfg,
            ModuleTable::standard(vec![]),
            rpc_tx.clone(),
        )?);
        let monitor = Monitor::spawn(vm.clone(), rpc_tx)?;
        let layout = *vm.layout();
        let text: Option<Box<dyn std::io::Write + Send>> = match &self.opts.output {
            OutputTarget::None => None,
            OutputTarget::Stdout => Some(Box::new(std::io::BufWriter::new(std::io::stdout()))),
            OutputTarget::File(p) => Some(Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|source| Error::Io {
                    path: p.display().to_string(),
                    source,
                })?,
            ))),
        };
        let rings = (0..c.vcpus).map(|v| layout.ring(v)).collect();
        let output = OutputGroup {
            dev: OutputDevice::new(vm.memory().clone(), rings),
            sinks: Sinks {
                digest: DigestSink::new(c.vcpus),
                text: text.map(TextSink::new),
                hold: None,
            },
        };
        let (ctl_rx, ctl_guard) = match &self.opts.control {
            Some(p) => {
                let (rx, g) = control::listen(p)?;
                (rx, Some(g))
            }
            None => (never(), None),
        };
        let output_mem = vm.memory().clone();
        self.vmx = Some(Vmx {
            vm,
            monitor,
            rpc_rx,
            ctl_rx,
            _ctl_guard: ctl_guard,
            config: ConfigGroup(c.clone()),
            output,
            vmmdev: VmmDevGroup::default(),
            virtio: VirtioGroup::empty(output_mem),
            epoch_frames: Vec::new(),
            epoch_disks: Vec::new(),
            epoch_full_disk: false,
            epoch_number: 0,
            pause_marks: Vec::new(),
            heartbeat_events: Vec::new(),
            unclaimed_ports: Vec::new(),
            machine: Machine::default(),
            trace: Trace::default(),
            paused: true,
            started: false,
            done: vec![false; c.vcpus as usize],
            start: Instant::now(),
            opts: self.opts.clone(),
            checkpoints: 0,
            last_save_step: Duration::ZERO,
            last_stun: Duration::ZERO,
        });
        Ok(())
    }

    fn devices(&mut self) -> Result<()> {
        // The output device and the config group were built with the VM in phase 3, because
        // they need its memory; here they are checked against each other.
        let restoring = self.restoring();
        let c = self.config.clone().expect("phase 1.5");
        let specs = virtio::device_specs(&c.disks, &c.nets)?;
        let v = self.vmx.as_mut().expect("phase 3");
        debug_assert_eq!(v.output.dev.drained().len() as u32, v.vm.vcpu_count());
        // virtio: a restore first puts the captured disks back where the configuration says,
        // then RESTORE rebuilds the transports from their saved state.
        if let (Boot::Restore { path, .. }, Some(snap)) = (&self.boot, &self.snapshot) {
            if let Some(sec) = snap.get(&checkpoint::group::section_name("virtio")) {
                for line in virtio::restore_disks(path, sec, &specs)? {
                    log::info!("{line}");
                    v.trace.push(CptState::Restore, Side::Vmx, line);
                }
            }
        }
        v.virtio = VirtioGroup::build(&v.vm, &specs, restoring)?;
        Ok(())
    }

    fn image(&mut self) -> Result<()> {
        if let Some((code, load, entry)) = &self.code {
            self.vmx
                .as_ref()
                .expect("phase 3")
                .vm
                .load_guest(code, *load, Some(*entry))?;
        }
        Ok(())
    }

    fn late(&mut self) -> Result<()> {
        let snapshot = self.snapshot.clone();
        let verify = matches!(self.boot, Boot::Restore { verify: true, .. });
        let paused = self.opts.paused;
        let mem_file = self.memory_file.clone();
        let vmx = self.vmx.as_mut().expect("phase 3");
        if let Some(snap) = snapshot {
            vmx.restore(
                snap,
                CptArgs {
                    mem_path: mem_file,
                    verify,
                    progress: Some(crate::progress::reporter("loading memory")),
                    ..CptArgs::default()
                },
                paused,
            )?;
        } else if !paused && !matches!(self.boot, Boot::Replica { .. }) {
            vmx.unpause()?;
        }
        Ok(())
    }
}

fn memory_index(snap: &Snapshot) -> Result<MemIndex> {
    Ok(MemState::of(snap)?.index)
}

fn guest_code(guest: &GuestSpec, layout: &Layout) -> Result<(Vec<u8>, u64, u64, String)> {
    match guest {
        GuestSpec::Workload(w) => {
            w.check_fits(layout)?;
            let at = monitor::layout::LOAD_ADDR;
            Ok((w.code(at)?, at, at, format!("{w:?}")))
        }
        GuestSpec::Image {
            path,
            load_addr,
            entry,
            ..
        } => {
            let code = std::fs::read(path).map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })?;
            // Every header field and segment is checked here, before the VM exists.
            let entry = monitor::image::entry_point(&code, *load_addr, *entry)
                .map_err(|e| Error::Usage(format!("--image {}: {e}", path.display())))?;
            Ok((code, *load_addr, entry, format!("image {}", path.display())))
        }
    }
}

/// Powers a VM on by running the phase table in order.
pub fn power_on(boot: Boot, opts: &Options) -> Result<Vmx> {
    let mut p = PowerOn {
        boot,
        opts: opts.clone(),
        snapshot: None,
        config: None,
        code: None,
        boot_args: String::new(),
        memory_file: None,
        vmx: None,
        phases_run: Vec::new(),
    };
    for phase in POWER_ON {
        let t = Instant::now();
        (phase.run)(&mut p)?;
        log::debug!(
            "power-on phase {} ({}, {:?}) took {:?}",
            phase.id,
            phase.name,
            phase.modules,
            t.elapsed()
        );
        p.phases_run.push(phase.id);
    }
    Ok(p.vmx.expect("phase 3 builds the VM"))
}

/// A powered-on VM and everything vmx keeps for it.
pub struct Vmx {
    pub(crate) vm: Arc<Vm>,
    pub(crate) monitor: Monitor,
    pub(crate) rpc_rx: Receiver<UserRpc>,
    pub(crate) ctl_rx: Receiver<Envelope>,
    pub(crate) _ctl_guard: Option<ControlSocket>,
    pub(crate) config: ConfigGroup,
    pub(crate) output: OutputGroup,
    pub(crate) vmmdev: VmmDevGroup,
    pub(crate) virtio: VirtioGroup,
    /// Frames taken at the last epoch's SAVE (see [`Captured::frames`]).
    epoch_frames: Vec<(u32, devices::virtio::HeldFrames)>,
    /// Disk writes taken at the last epoch's SAVE.
    epoch_disks: Vec<(u32, devices::virtio::block::DiskWrites)>,
    /// The epoch being captured sends every disk whole (a standby's first sync).
    epoch_full_disk: bool,
    /// The epoch being captured (input replication tags frames with the next one).
    epoch_number: u64,
    /// When each phase of an epoch's pause ended (empty outside an epoch capture).
    pause_marks: Vec<(&'static str, Instant)>,
    pub(crate) heartbeat_events: Vec<(f64, HeartbeatEvent)>,
    pub(crate) unclaimed_ports: Vec<u16>,
    pub(crate) machine: Machine,
    pub(crate) trace: Trace,
    pub(crate) paused: bool,
    pub(crate) started: bool,
    pub(crate) done: Vec<bool>,
    pub(crate) start: Instant,
    pub(crate) opts: Options,
    pub(crate) checkpoints: u64,
    pub(crate) last_save_step: Duration,
    /// How long the last save waited for the vCPUs to stop (zero if they were stopped).
    pub(crate) last_stun: Duration,
}

impl Vmx {
    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The checkpoint trace so far.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// The checkpoint groups; `virtio` only when the VM has devices (so a VM without any
    /// saves and traces exactly what it did before devices existed).
    fn groups(&mut self) -> Vec<&mut dyn Group> {
        let mut g: Vec<&mut dyn Group> = vec![&mut self.config, &mut self.output, &mut self.vmmdev];
        if !self.virtio.slots().is_empty() {
            g.push(&mut self.virtio);
        }
        g
    }

    fn heartbeat_event(&mut self, e: HeartbeatEvent) {
        match &e {
            HeartbeatEvent::Flatlined {
                silent_ms,
                interval_ms,
            } => log::warn!(
                "guest flatlined: no heartbeat for {silent_ms} ms (interval {interval_ms} ms): \
                 the guest may be hung"
            ),
            HeartbeatEvent::Reawakened { silent_ms } => {
                log::warn!("guest reawakened: heartbeat back after {silent_ms} ms of silence")
            }
        }
        self.heartbeat_events
            .push((self.start.elapsed().as_secs_f64() * 1e3, e));
    }

    pub(crate) fn check_heartbeat(&mut self) {
        if let Some(e) = self.vmmdev.dev.check(Instant::now()) {
            self.heartbeat_event(e);
        }
    }

    fn unpause(&mut self) -> Result<()> {
        if !self.started {
            self.monitor.start()?;
            self.started = true;
        } else {
            self.monitor.unstun()?;
        }
        self.paused = false;
        self.vmmdev.dev.resume_timer(Instant::now());
        Ok(())
    }

    fn pause(&mut self) -> Result<()> {
        if self.paused {
            return Ok(());
        }
        self.monitor.stun()?;
        self.paused = true;
        self.vmmdev.dev.suspend_timer();
        Ok(())
    }

    /// Handles one user RPC; a finished checkpoint step is handed back.
    pub(crate) fn handle_rpc(
        &mut self,
        rpc: UserRpc,
    ) -> Result<Option<(CptState, monitor::Result<StepOutput>)>> {
        match rpc {
            UserRpc::OutputDoorbell { vcpu } => {
                self.output.drain(vcpu)?;
                // A `--output` file is readable as the guest goes, and survives a SIGKILL up
                // to the last doorbell.
                if let Some(t) = &mut self.output.sinks.text {
                    if let Err(e) = t.flush() {
                        log::warn!("cannot write output text: {e}");
                    }
                }
            }
            UserRpc::VcpuDone { vcpu } => {
                self.output.drain(vcpu)?;
                if let Some(d) = self.done.get_mut(vcpu as usize) {
                    *d = true;
                }
            }
            UserRpc::VcpuError { vcpu, error } => return Err(Error::Guest { vcpu, error }),
            UserRpc::PortWrite { vcpu, port, data } => {
                if VmmDev::claims(port) {
                    if let Some(e) = self.vmmdev.dev.write(port, data, Instant::now()) {
                        self.heartbeat_event(e);
                    }
                } else if !self.unclaimed_ports.contains(&port) {
                    self.unclaimed_ports.push(port);
                    log::warn!(
                        "vCPU {vcpu} wrote to port {port:#x}, which no device claims \
                         (ignored; reported once)"
                    );
                }
            }
            UserRpc::StepDone { state, result } => return Ok(Some((state, result))),
        }
        Ok(None)
    }

    /// Posts the monitor's half of a step and waits for it, serving other RPCs meanwhile.
    fn monitor_step(
        &mut self,
        state: CptState,
        args: CptArgs,
        snapshot: Option<Arc<Snapshot>>,
    ) -> Result<StepOutput> {
        self.monitor.post(MonitorAction::CptStep {
            state,
            args,
            snapshot,
        })?;
        loop {
            let rpc = self
                .rpc_rx
                .recv_timeout(Duration::from_secs(120))
                .map_err(|_| {
                    Error::Step(format!("the monitor did not finish {state:?} within 120 s"))
                })?;
            if let Some((s, r)) = self.handle_rpc(rpc)? {
                if s != state {
                    return Err(Error::Step(format!(
                        "the monitor answered {s:?} while vmx waited for {state:?}"
                    )));
                }
                let out = r?;
                for step in &out.steps {
                    self.trace.push(state, Side::Monitor, step.clone());
                }
                return Ok(out);
            }
        }
    }

    fn groups_sync(&mut self, state: CptState) -> Result<()> {
        let done = sync_groups(&mut self.groups())?;
        for (n, what) in done {
            self.trace
                .push(state, Side::Vmx, format!("sync group {n}: {what}"));
        }
        Ok(())
    }

    /// Saves a snapshot to `path` (state) and the data files it names (memory, disk copies),
    /// then continues or stops. The previous snapshot at `path` stays whole until the new
    /// state file replaces it (the order is in `checkpoint::files`).
    pub fn checkpoint(
        &mut self,
        path: &Path,
        end: SaveEnd,
        compress: bool,
    ) -> Result<SnapshotDone> {
        let t0 = Instant::now();
        let first = self.trace.0.len();
        let target = SaveTarget::File {
            path: path.to_path_buf(),
            compress,
            nonce: files::new_nonce(),
        };
        let mut session = SaveSession::begin(self)?;
        let result = session.save(target, end);
        let bytes = match result {
            Ok(snap) => {
                session.commit();
                snap.to_bytes().len()
            }
            Err(e) => {
                log::error!("checkpoint to {} failed: {e}", path.display());
                drop(session);
                self.write_trace();
                return Err(e);
            }
        };
        self.write_trace();
        self.checkpoints += 1;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        log::info!(
            "checkpoint {} saved in {ms:.1} ms ({} trace steps)",
            path.display(),
            self.trace.0.len() - first
        );
        Ok(SnapshotDone {
            ok: true,
            path: path.to_path_buf(),
            ms,
            state_bytes: bytes as u64,
            stopped: end == SaveEnd::PowerOff,
        })
    }

    /// The save steps on a stunned VM: SAVE_SYNC, QUIESCE, SAVE, then CONTINUE_SYNC or power
    /// off. Returns the state saved (written to the state file for a file target).
    fn save_stunned(
        &mut self,
        target: SaveTarget,
        end: SaveEnd,
        stunned_here: bool,
    ) -> Result<Snapshot> {
        self.mark("stun");
        // SAVE_SYNC
        self.machine.advance(CptState::SaveSync)?;
        self.monitor_step(CptState::SaveSync, CptArgs::default(), None)?;
        self.groups_sync(CptState::SaveSync)?;
        self.mark("save_sync");
        // QUIESCE: the monitor, then every group stops what runs outside vCPU exits.
        self.machine.advance(CptState::Quiesce)?;
        self.monitor_step(CptState::Quiesce, CptArgs::default(), None)?;
        for (n, what) in quiesce_groups(&mut self.groups())? {
            self.trace.push(
                CptState::Quiesce,
                Side::Vmx,
                format!("quiesce group {n}: {what}"),
            );
        }
        self.mark("quiesce");
        // SAVE
        self.machine.advance(CptState::Save)?;
        let args = match &target {
            SaveTarget::File {
                path,
                compress,
                nonce,
            } => CptArgs {
                mem_path: (!compress).then(|| files::data_path(path, "mem", nonce)),
                compress: *compress,
                progress: Some(crate::progress::reporter("saving memory")),
                ..CptArgs::default()
            },
            SaveTarget::Epoch(mem) => CptArgs {
                epoch: Some(mem.clone()),
                ..CptArgs::default()
            },
        };
        let saved = self.save_step(&target, args);
        if let (Err(_), SaveTarget::File { path, nonce, .. }) = (&saved, &target) {
            // No state file names this save's data files: they go (the old snapshot stays).
            files::remove_save(path, nonce);
        }
        let snap = saved?;
        if let SaveTarget::File { path, nonce, .. } = &target {
            // The commit point. Should it fail, this save's files are orphans that the next
            // save to `path` deletes; the old snapshot is whole either way.
            checkpoint::snapshot::write_atomic(path, &snap.to_bytes())?;
            self.trace
                .push(CptState::Save, Side::Vmx, "write state file");
            // The previous snapshot's files (and a killed save's leftovers) belong to no
            // snapshot now.
            for p in files::sweep(path, nonce) {
                log::debug!("deleted {}", p.display());
            }
        } else if let SaveTarget::Epoch(mem) = &target {
            self.mark("groups_save");
            // Output commit: the frames the cards sent up to this stun belong to this epoch;
            // take them now, before the guest runs again and sends the next epoch's.
            self.epoch_frames = self.virtio.take_held_frames();
            // Input replication: frames delivered from here on belong to the next epoch.
            self.virtio.set_input_epoch(self.epoch_number + 1);
            // Disk replication: the blocks written during this epoch travel with it.
            let full_disk = self.epoch_full_disk || mem.full;
            self.epoch_disks = self.virtio.take_disk_writes(full_disk)?;
            let pages: usize = mem
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|r| r.data.len() / 4096)
                .sum();
            self.trace.push(
                CptState::Save,
                Side::Vmx,
                format!("hand {pages} dirty pages and the state to the replicator"),
            );
            self.mark("devices");
        }
        match end {
            SaveEnd::Continue => {
                self.machine.advance(CptState::ContinueSync)?;
                self.monitor_step(CptState::ContinueSync, CptArgs::default(), None)?;
                self.groups_sync(CptState::ContinueSync)?;
                self.mark("continue_sync");
                if stunned_here {
                    self.monitor.unstun()?;
                    self.vmmdev.dev.resume_timer(Instant::now());
                    self.trace.push(CptState::ContinueSync, Side::Vmx, "unstun");
                }
                self.mark("unstun");
            }
            SaveEnd::PowerOff => {
                self.trace.push(CptState::Save, Side::Vmx, "power off");
                self.paused = true;
            }
        }
        self.machine.advance(CptState::None)?;
        Ok(snap)
    }

    /// The SAVE step up to the state file: the monitor (vCPUs, modules, memory), the disk
    /// copies of a snapshot, then the groups. Returns the state.
    fn save_step(&mut self, target: &SaveTarget, args: CptArgs) -> Result<Snapshot> {
        let t_save = Instant::now();
        let out = self.monitor_step(CptState::Save, args, None)?;
        self.last_save_step = t_save.elapsed();
        self.mark("monitor_save");
        let mut snap = Snapshot::default();
        for s in out.sections {
            snap.push(s)?;
        }
        if let SaveTarget::File { path, nonce, .. } = target {
            // Disk contents at this point, beside the state file (before it names them).
            for line in self.virtio.capture_disks(path, nonce)? {
                log::info!("{line}");
                self.trace.push(CptState::Save, Side::Vmx, line);
            }
        }
        let mut groups = self.groups();
        let saved = save_groups(&mut groups, &mut snap)?;
        for g in saved {
            self.trace
                .push(CptState::Save, Side::Vmx, format!("checkpoint group {g}"));
        }
        Ok(snap)
    }

    fn restore(&mut self, snap: Arc<Snapshot>, args: CptArgs, stay_paused: bool) -> Result<()> {
        // RESTORE: vmx groups first, then the monitor (modules, vCPU state).
        self.machine.advance(CptState::Restore)?;
        let mut groups = self.groups();
        let restored = restore_groups(&mut groups, &snap)?;
        for g in restored {
            self.trace
                .push(CptState::Restore, Side::Vmx, format!("restore group {g}"));
        }
        self.monitor_step(CptState::Restore, args, Some(snap))?;
        for v in 0..self.vm.vcpu_count() {
            if self.vm.vcpu_stats(v).done.load(Ordering::Acquire) {
                self.done[v as usize] = true;
            }
        }
        // RESTORE_SYNC: vmx groups sync, unpause, then the monitor syncs.
        self.machine.advance(CptState::RestoreSync)?;
        self.groups_sync(CptState::RestoreSync)?;
        if !stay_paused {
            self.unpause()?;
            self.trace.push(CptState::RestoreSync, Side::Vmx, "unpause");
        }
        self.monitor_step(CptState::RestoreSync, CptArgs::default(), None)?;
        self.machine.advance(CptState::None)?;
        self.write_trace();
        Ok(())
    }

    /// Captures one replication epoch: stun (unless paused), the save steps of the checkpoint
    /// engine with MainMem copying the dirty pages (every page if `full`) and resetting the
    /// dirty log, then continue. The guest runs again before this returns; the pages and state
    /// are copies.
    ///
    /// Disks travel with the epoch as `disk-writes/<i>` sections (the blocks written since the
    /// last capture, read back while stunned), whole with `full_disk` or `full`.
    pub fn capture_epoch(&mut self, epoch: u64, how: EpochCapture) -> Result<Captured> {
        self.epoch_full_disk = how.full_disk;
        self.epoch_number = epoch;
        let full = how.full;
        let t0 = Instant::now();
        self.pause_marks = vec![("start", t0)];
        let mem = EpochMem {
            full,
            precise: how.precise,
            ..EpochMem::default()
        };
        let trace_len = self.trace.0.len();
        let mut session = SaveSession::begin(self)?;
        let result = session.save(SaveTarget::Epoch(mem.clone()), SaveEnd::Continue);
        match &result {
            Ok(_) => session.commit(),
            Err(e) => {
                log::error!("epoch {epoch} capture failed: {e}");
                drop(session);
            }
        }
        // Epochs come many times a second: keep the trace of the last one only.
        if self.opts.trace.is_none() {
            self.trace.0.truncate(trace_len);
        }
        let marks = std::mem::take(&mut self.pause_marks);
        let snap = result?;
        let pause = t0.elapsed();
        let phases = marks
            .windows(2)
            .map(|w| (w[1].0, w[1].1.saturating_duration_since(w[0].1)))
            .collect();
        let runs = std::mem::take(&mut *mem.runs.lock().unwrap_or_else(|p| p.into_inner()));
        let records = self.take_held();
        let frames = std::mem::take(&mut self.epoch_frames);
        let mut sections: Vec<Section> = snap.iter().cloned().collect();
        for (disk, w) in std::mem::take(&mut self.epoch_disks) {
            for (part, p) in w.split(DISK_WRITES_PART_BYTES).into_iter().enumerate() {
                sections.push(Section {
                    name: checkpoint::SectionId::DiskWrites {
                        disk,
                        part: part as u32,
                    }
                    .name(),
                    version: 1,
                    data: postcard::to_stdvec(&p)
                        .map_err(|e| Error::Usage(format!("cannot encode disk writes: {e}")))?,
                });
            }
        }
        Ok(Captured {
            epoch,
            full,
            runs,
            sections,
            records,
            frames,
            pause,
            save_step: self.last_save_step,
            phases,
            stun: self.last_stun,
        })
    }

    /// Holds drained output (replication: released only once its epoch is acknowledged)
    /// instead of writing it to the text output at once.
    pub fn hold_output(&mut self, on: bool) {
        self.virtio.set_holding(on);
        if !on {
            let frames = self.virtio.take_held_frames();
            self.virtio.release_frames(frames);
        }
        if on {
            let n = self.vm.vcpu_count() as usize;
            self.output
                .sinks
                .hold
                .get_or_insert_with(|| vec![Vec::new(); n]);
        } else if let Some(held) = self.output.sinks.hold.take() {
            self.release_local(&held);
        }
    }

    /// Takes the output held since the last call, per vCPU.
    pub fn take_held(&mut self) -> Vec<Vec<Record>> {
        let n = self.vm.vcpu_count() as usize;
        match &mut self.output.sinks.hold {
            Some(h) => std::mem::replace(h, vec![Vec::new(); n]),
            None => vec![Vec::new(); n],
        }
    }

    /// Announces every network card's MAC from where it now is (after a failover); see
    /// [`VirtioGroup::announce`]. Returns how many cards were announced.
    pub fn announce(&self) -> usize {
        self.virtio.announce()
    }

    /// Input replication: copy every frame delivered to the cards to `out` (tagged with the
    /// epoch whose capture will include it), or stop with `None`.
    pub fn copy_inputs(&self, out: Option<crossbeam_channel::Sender<devices::virtio::InputFrame>>) {
        self.virtio.copy_inputs(out);
    }

    /// Flushes under speculation (on while a standby protects the VM: its epochs make the
    /// writes durable); off syncs every disk's unsynced writes first. See
    /// [`devices::virtio::Block::set_speculative`].
    pub fn set_speculative_flush(&self, on: bool) -> Result<()> {
        self.virtio.set_speculative_flush(on)
    }

    /// Input replication: (frames copied, frames missed).
    pub fn input_stats(&self) -> (u64, u64) {
        self.virtio.input_stats()
    }

    /// Delivers frames again to their cards, in order, before anything from the TAPs (a
    /// standby that took over). Returns how many were queued.
    pub fn inject_inputs(&self, frames: Vec<(u32, Vec<u8>)>) -> usize {
        let mut by_card: Vec<(u32, Vec<Vec<u8>>)> = Vec::new();
        for (card, f) in frames {
            match by_card.iter_mut().find(|(c, _)| *c == card) {
                Some((_, v)) => v.push(f),
                None => by_card.push((card, vec![f])),
            }
        }
        by_card
            .into_iter()
            .map(|(card, fs)| self.virtio.inject(card, fs))
            .sum()
    }

    /// Notes the end of a pause phase (only while an epoch is being captured).
    fn mark(&mut self, phase: &'static str) {
        if !self.pause_marks.is_empty() {
            self.pause_marks.push((phase, Instant::now()));
        }
    }

    /// A handle that takes the disks' writes while the guest runs (a pre-copy's disk rounds).
    pub fn disk_tracker(&self) -> Result<crate::virtio::DiskTracker> {
        self.virtio.disk_tracker()
    }

    /// The writable disks' images as configured here, by window (a standby's replicas).
    pub fn disk_images(&self) -> Vec<(u32, PathBuf)> {
        self.virtio.disk_images()
    }

    /// Whether the VM has network cards (whose frames output commit holds).
    pub fn has_cards(&self) -> bool {
        self.virtio.has_net()
    }

    /// Takes the frames the network cards held since the last call (output commit).
    pub fn take_held_frames(&mut self) -> Vec<(u32, devices::virtio::HeldFrames)> {
        self.virtio.take_held_frames()
    }

    /// Sends frames taken by [`Vmx::take_held_frames`] out through their cards.
    pub fn release_frames(&mut self, frames: Vec<(u32, devices::virtio::HeldFrames)>) {
        if !frames.is_empty() {
            self.virtio.release_frames(frames);
        }
    }

    /// Writes released records to the local text output (if any).
    pub fn release_local(&mut self, records: &[Vec<Record>]) {
        if let Some(t) = &mut self.output.sinks.text {
            for (v, r) in records.iter().enumerate() {
                if let Err(e) = t.records(v as u32, r).and_then(|_| t.flush()) {
                    log::warn!("cannot write output text: {e}");
                }
            }
        }
    }

    /// Brings a replica to life: loads the committed state (memory is already in place) and
    /// lets it run. This is the RESTORE path of the checkpoint engine.
    pub fn activate(&mut self, state: Snapshot) -> Result<()> {
        self.restore(Arc::new(state), CptArgs::default(), false)
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether every vCPU has finished.
    pub fn finished(&self) -> bool {
        self.started && self.all_done()
    }

    /// Stops the guest (stun) until [`Vmx::resume`].
    pub fn suspend(&mut self) -> Result<()> {
        self.pause()
    }

    /// Lets a paused guest run (starts it the first time).
    pub fn resume(&mut self) -> Result<()> {
        self.unpause()
    }

    fn write_trace(&self) {
        if let Some(p) = &self.opts.trace {
            let text = serde_json::to_string_pretty(&self.trace).expect("trace serialises");
            if let Err(e) = std::fs::write(p, text) {
                log::warn!("cannot write the trace to {}: {e}", p.display());
            }
        }
    }

    /// The `status` answer, with the replication layer's status as its `ft` member.
    pub(crate) fn status(&self, ft: Option<Value>) -> VmStatus {
        let vcpus = (0..self.vm.vcpu_count())
            .map(|v| {
                let s = self.vm.vcpu_stats(v);
                VcpuStatus {
                    state: format!("{:?}", s.state()),
                    records: self.output.dev.drained()[v as usize],
                    exits: s.exits.load(Ordering::Relaxed),
                }
            })
            .collect();
        VmStatus {
            ok: true,
            state: if self.paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            checkpoint: format!("{:?}", self.machine.state()),
            checkpoints: self.checkpoints,
            uptime_ms: self.start.elapsed().as_millis() as u64,
            records: self.output.dev.drained().iter().sum::<u64>(),
            vcpus,
            ft,
        }
    }

    /// Answers a request other than `status` (which [`Vmx::status`] answers, with the
    /// replication layer's part). Returns the answer, and the path of a snapshot that
    /// powered the VM off.
    pub(crate) fn handle_request(&mut self, req: Request) -> (Value, Option<PathBuf>) {
        let err = |e: Error| Answer::refused(e);
        match req {
            Request::Status => (reply(&self.status(None)), None),
            Request::Pause => (
                self.pause().map(|_| Answer::done()).unwrap_or_else(err),
                None,
            ),
            Request::Resume => (
                self.unpause().map(|_| Answer::done()).unwrap_or_else(err),
                None,
            ),
            Request::Snapshot {
                path,
                stop,
                compress,
            } => {
                if self.all_done() {
                    return (
                        Answer::refused("the guest has finished; nothing to snapshot"),
                        None,
                    );
                }
                let end = if stop {
                    SaveEnd::PowerOff
                } else {
                    SaveEnd::Continue
                };
                match self.checkpoint(&path, end, compress) {
                    Ok(done) => (reply(&done), stop.then_some(path)),
                    Err(e) => (err(e), None),
                }
            }
            // The run loop hands `migrate` to the replication layer.
            Request::Migrate { .. } => (
                Answer::refused("migrate needs a VM run by `tandem primary`"),
                None,
            ),
        }
    }

    pub(crate) fn all_done(&self) -> bool {
        self.done.iter().all(|d| *d)
    }

    pub(crate) fn report(&mut self) -> Result<RunReport> {
        self.output.sinks.flush().map_err(devices::Error::Sink)?;
        let vcpus = (0..self.vm.vcpu_count())
            .map(|i| {
                let s = self.vm.vcpu_stats(i);
                VcpuReport {
                    records: self.output.dev.drained()[i as usize],
                    exits: s.exits.load(Ordering::Relaxed),
                    doorbells: s.doorbells.load(Ordering::Relaxed),
                    run_ms: s.run_ns().unwrap_or(0) as f64 / 1e6,
                }
            })
            .collect();
        let hb = &self.vmmdev.dev;
        Ok(RunReport {
            digest: self.output.sinks.digest.report(),
            wall_ms: self.start.elapsed().as_secs_f64() * 1e3,
            vcpus,
            heartbeat: HeartbeatReport {
                interval_ms: hb.interval_ms(),
                pings: hb.pings(),
                guest_version: hb.guest_version(),
                events: self.heartbeat_events.clone(),
            },
        })
    }

    /// The digest of the output so far.
    pub fn digest(&self) -> DigestReport {
        self.output.sinks.digest.report()
    }

    /// Answers pending control requests while the VM is not in its run loop (a standby):
    /// `status` gets `ft` as its `ft` member; everything else is refused.
    pub fn poll_control(&mut self, ft: &impl Serialize) {
        while let Ok((req, answer_to)) = self.ctl_rx.try_recv() {
            let answer = match req {
                Request::Status => {
                    let mut st = self.status(serde_json::to_value(ft).ok());
                    st.state = RunState::Standby;
                    reply(&st)
                }
                _ => Answer::refused("this is a standby: it runs no guest until it takes over"),
            };
            let _ = answer_to.send(answer);
        }
    }
}

/// One save in progress, snapshot or epoch (crosvm style: its `Drop` is the one abort path).
///
/// ```text
///  begin: stun (unless already paused), heartbeat timer off
///    save(): SAVE_SYNC → QUIESCE → SAVE → CONTINUE_SYNC | power-off
///  commit(): the save is done, nothing to undo
///  drop without commit: monitor told CptAbort, every group's `error` callback, the state
///    machine back to NONE, and (if this session stunned the VM) unstun + heartbeat timer on
/// ```
struct SaveSession<'a> {
    vmx: &'a mut Vmx,
    stunned_here: bool,
    committed: bool,
}

impl<'a> SaveSession<'a> {
    fn begin(vmx: &'a mut Vmx) -> Result<Self> {
        // The monitor holds a stun already only when a started VM was paused; otherwise
        // (running, or powered on paused and never started) the save stuns it here.
        let stunned_here = !(vmx.started && vmx.paused);
        vmx.last_stun = Duration::ZERO;
        if stunned_here {
            vmx.last_stun = vmx.monitor.stun()?.latency;
            // A stunned guest cannot ping: the save is not guest silence.
            vmx.vmmdev.dev.suspend_timer();
        }
        Ok(SaveSession {
            vmx,
            stunned_here,
            committed: false,
        })
    }

    fn save(&mut self, target: SaveTarget, end: SaveEnd) -> Result<Snapshot> {
        self.vmx.save_stunned(target, end, self.stunned_here)
    }

    fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for SaveSession<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let vmx = &mut *self.vmx;
        let _ = vmx.monitor.post(MonitorAction::CptAbort);
        let err = checkpoint::Error::component("checkpoint", "the save was aborted");
        for g in vmx.groups() {
            g.error(&err);
        }
        vmx.machine = Machine::default();
        if self.stunned_here {
            if let Err(e) = vmx.monitor.unstun() {
                log::error!("cannot unstun after an aborted save: {e}");
            }
            vmx.vmmdev.dev.resume_timer(Instant::now());
        }
    }
}

/// What `tandem verify` found: a snapshot whose every checksum held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Always true (a failed check is an error).
    pub ok: bool,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Bytes of it saved (the rest was zero).
    pub memory_used_bytes: u64,
    /// The files the snapshot is made of besides the state file (memory, disk copies).
    pub files: Vec<PathBuf>,
    /// The state file's sections, in order.
    pub sections: Vec<SectionInfo>,
}

/// One section of a verified state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionInfo {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: u32,
    /// Its payload size.
    pub bytes: u64,
}

/// Checks a snapshot: the state file's integrity and every memory chunk's checksum. Names
/// the files the snapshot is made of besides the state file.
pub fn verify(path: &Path) -> Result<VerifyReport> {
    let snap = Snapshot::read_file(path)?;
    let mem = MemState::of(&snap)?;
    let index = &mem.index;
    let mut data_files = Vec::new();
    match mem.file_path(path)? {
        None => memfile::verify_compressed(index, &snap)?,
        Some(file) => {
            memfile::verify_sparse(&file, index)?;
            data_files.push(file);
        }
    }
    if let Some(sec) = snap.get(&checkpoint::group::section_name("virtio")) {
        let state = crate::virtio::VirtioPersist::decode(sec.version, &sec.data)?;
        for d in state.disks {
            data_files.push(files::resolve(path, &d.file)?);
        }
    }
    let sections = snap
        .iter()
        .map(|s: &Section| SectionInfo {
            name: s.name.clone(),
            version: s.version,
            bytes: s.data.len() as u64,
        })
        .collect();
    Ok(VerifyReport {
        ok: true,
        memory_bytes: index.size,
        memory_used_bytes: index.used_bytes(),
        files: data_files,
        sections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint::memfile::{save_sparse, MainMemPersist};

    /// A state file of a 32 MiB machine (configuration and memory index only), naming its
    /// memory file.
    fn state_with_memory(dir: &Path) -> (PathBuf, PathBuf) {
        let state = dir.join("snap");
        let mem = files::data_path(&state, "mem", &files::new_nonce());
        let size = 32u64 << 20;
        let read = |gpa: u64, buf: &mut [u8]| {
            buf.fill(if gpa < 4 << 20 {
                (gpa >> 20) as u8 | 1
            } else {
                0
            });
            Ok(())
        };
        let index = save_sparse(&mem, size, &read, &|_| {}).unwrap();
        let mut snap = Snapshot::default();
        snap.push(Section {
            name: "module/MainMem".into(),
            version: MainMemPersist::VERSION,
            data: MainMemPersist::encode(&MemState {
                index,
                file: Some(files::name_of(&mem).unwrap()),
            })
            .unwrap(),
        })
        .unwrap();
        let config = MachineConfig {
            vcpus: 1,
            mem_mib: 32,
            entry: monitor::layout::LOAD_ADDR,
            guest: "test".into(),
            disks: Vec::new(),
            nets: Vec::new(),
        };
        snap.push(Section {
            name: checkpoint::group::section_name("config"),
            version: ConfigPersist::VERSION,
            data: ConfigPersist::encode(&config).unwrap(),
        })
        .unwrap();
        snap.write_file(&state).unwrap();
        (state, mem)
    }

    #[test]
    fn a_state_file_whose_memory_file_is_truncated_or_missing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (state, mem) = state_with_memory(dir.path());
        verify(&state).unwrap();
        let restore = |s: &Path| {
            power_on(
                Boot::Restore {
                    path: s.to_path_buf(),
                    verify: false,
                },
                &Options::default(),
            )
            .err()
            .expect("refused")
            .to_string()
        };
        let full = std::fs::read(&mem).unwrap();
        std::fs::write(&mem, &full[..full.len() / 2]).unwrap();
        for e in [verify(&state).unwrap_err().to_string(), restore(&state)] {
            assert!(e.contains("wrong or truncated memory file"), "{e}");
        }
        std::fs::remove_file(&mem).unwrap();
        for e in [verify(&state).unwrap_err().to_string(), restore(&state)] {
            assert!(e.contains("memory file") && e.contains("is missing"), "{e}");
        }
        // The state file of an older save names another file: a newer memory file at the
        // version-1 name is not taken for it.
        std::fs::write(memfile::mem_path(&state), &full).unwrap();
        assert!(verify(&state).is_err());
    }
}
