//! `tandem run`: boot a guest, drain its output, report a digest.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use devices::{DigestReport, DigestSink, OutputDevice, OutputSink, Record, TextSink};
use monitor::{Layout, ModuleTable, Monitor, UserRpc, Vm, VmConfig};
use serde::Serialize;
use workloads::Workload;

use crate::{Error, Result};

/// What code the guest runs.
#[derive(Clone, Debug)]
pub enum GuestSpec {
    /// One of our workload guests.
    Workload(Workload),
    /// A flat 64-bit binary supplied by the user.
    Image {
        /// The file.
        path: PathBuf,
        /// Where to load it.
        load_addr: u64,
        /// Where to enter it.
        entry: u64,
    },
}

/// Where the record stream goes besides the digest.
#[derive(Clone, Debug, Default)]
pub enum OutputTarget {
    /// Only the digest.
    #[default]
    None,
    /// Text lines on stdout.
    Stdout,
    /// Text lines in a file.
    File(PathBuf),
}

/// A `tandem run` request.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The guest.
    pub guest: GuestSpec,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Where the records go.
    pub output: OutputTarget,
    /// Give up after this long.
    pub timeout: Option<Duration>,
}

/// Counters of one vCPU at the end of a run.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuReport {
    /// Records drained.
    pub records: u64,
    /// KVM_RUN returns.
    pub exits: u64,
    /// Doorbells rung.
    pub doorbells: u64,
    /// Guest run time, start to done, in ms.
    pub run_ms: f64,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The digest of the output stream.
    pub digest: DigestReport,
    /// Wall time from start to the last vCPU's done, in ms.
    pub wall_ms: f64,
    /// Per-vCPU counters.
    pub vcpus: Vec<VcpuReport>,
}

impl RunReport {
    /// Total exits.
    pub fn exits(&self) -> u64 {
        self.vcpus.iter().map(|v| v.exits).sum()
    }
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.digest)?;
        for (i, v) in self.vcpus.iter().enumerate() {
            writeln!(
                f,
                "vcpu {i}: ran {:.1} ms, {} exits, {} doorbells",
                v.run_ms, v.exits, v.doorbells
            )?;
        }
        write!(
            f,
            "run time {:.1} ms, {} exits, {} records",
            self.wall_ms,
            self.exits(),
            self.digest.records()
        )
    }
}

struct RunSink {
    digest: DigestSink,
    text: Option<TextSink<Box<dyn Write + Send>>>,
}

impl OutputSink for RunSink {
    fn records(&mut self, vcpu: u32, records: &[Record]) -> std::io::Result<()> {
        self.digest.records(vcpu, records)?;
        if let Some(t) = &mut self.text {
            t.records(vcpu, records)?;
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.text {
            Some(t) => t.flush(),
            None => Ok(()),
        }
    }
}

/// The code to load, where, and where to enter.
fn guest_code(cfg: &RunConfig, layout: &Layout) -> Result<(Vec<u8>, u64, u64)> {
    match &cfg.guest {
        GuestSpec::Workload(w) => {
            w.check_fits(layout)?;
            let at = monitor::layout::LOAD_ADDR;
            Ok((w.code(at)?, at, at))
        }
        GuestSpec::Image {
            path,
            load_addr,
            entry,
        } => {
            let code = std::fs::read(path).map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })?;
            let end = load_addr.saturating_add(code.len() as u64);
            if !(*load_addr..end).contains(entry) {
                return Err(Error::Usage(format!(
                    "--entry {entry:#x} is outside the image ({load_addr:#x}..{end:#x})"
                )));
            }
            Ok((code, *load_addr, *entry))
        }
    }
}

/// Runs a guest to completion and reports its output digest.
pub fn run(cfg: &RunConfig) -> Result<RunReport> {
    let layout = Layout::new(cfg.mem_mib, cfg.vcpus)?;
    let (code, load_addr, entry) = guest_code(cfg, &layout)?;
    let text: Option<Box<dyn Write + Send>> = match &cfg.output {
        OutputTarget::None => None,
        OutputTarget::Stdout => Some(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        OutputTarget::File(p) => Some(Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|source| Error::Io {
                path: p.display().to_string(),
                source,
            })?,
        ))),
    };
    let mut sink = RunSink {
        digest: DigestSink::new(cfg.vcpus),
        text: text.map(TextSink::new),
    };

    let (rpc_tx, rpc_rx) = unbounded();
    let vm_cfg = VmConfig {
        entry,
        ..VmConfig::new(cfg.mem_mib, cfg.vcpus)
    };
    let vm = Arc::new(Vm::new(&vm_cfg, ModuleTable::standard(vec![]), rpc_tx)?);
    vm.load_image(load_addr, &code)?;
    let rings = (0..cfg.vcpus).map(|v| layout.ring(v)).collect();
    let mut output = OutputDevice::new(vm.memory().clone(), rings);
    let monitor = Monitor::spawn(vm.clone())?;

    let start = Instant::now();
    monitor.start()?;
    let deadline = cfg.timeout.map(|t| start + t);
    let mut done = vec![false; cfg.vcpus as usize];
    while done.iter().any(|d| !d) {
        let rpc = match deadline {
            Some(d) => rpc_rx
                .recv_deadline(d)
                .map_err(|_| Error::Timeout(cfg.timeout.unwrap_or_default()))?,
            None => rpc_rx.recv().map_err(|_| monitor::Error::Stopped)?,
        };
        match rpc {
            UserRpc::OutputDoorbell { vcpu } => {
                output.drain(vcpu, &mut sink)?;
            }
            UserRpc::VcpuDone { vcpu } => {
                output.drain(vcpu, &mut sink)?;
                done[vcpu as usize] = true;
                log::debug!("vCPU {vcpu} done");
            }
            UserRpc::VcpuError { vcpu, error } => return Err(Error::Guest { vcpu, error }),
            UserRpc::PortWrite { vcpu, port } => {
                log::warn!("vCPU {vcpu} wrote to port {port:#x}, which no device claims");
            }
        }
    }
    let wall = start.elapsed();
    sink.flush().map_err(devices::Error::Sink)?;
    drop(monitor);
    let vcpus = (0..cfg.vcpus)
        .map(|i| {
            let s = vm.vcpu_stats(i);
            VcpuReport {
                records: output.drained()[i as usize],
                exits: s.exits.load(Ordering::Relaxed),
                doorbells: s.doorbells.load(Ordering::Relaxed),
                run_ms: s.run_ns().unwrap_or(0) as f64 / 1e6,
            }
        })
        .collect();
    Ok(RunReport {
        digest: sink.digest.report(),
        wall_ms: wall.as_secs_f64() * 1e3,
        vcpus,
    })
}
