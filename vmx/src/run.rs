//! `tandem run`: boot a guest, drain its output, report a digest.

use std::path::PathBuf;
use std::time::Duration;

use devices::DigestReport;
use serde::Serialize;
use workloads::Workload;

use crate::machine::{power_on, Boot, Options, Outcome};
use crate::Result;

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
    /// The guest heartbeat.
    pub heartbeat: HeartbeatReport,
}

/// What the heartbeat saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeartbeatReport {
    /// Interval the guest asked for (0: off).
    pub interval_ms: u32,
    /// Pings received.
    pub pings: u64,
    /// The version the guest reported through the guest-info port.
    pub guest_version: u32,
    /// Flatlines and reawakenings, with ms since power-on.
    pub events: Vec<(f64, devices::vmmdev::HeartbeatEvent)>,
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
        for (at, e) in &self.heartbeat.events {
            writeln!(f, "heartbeat at {at:.0} ms: {e:?}")?;
        }
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

/// Runs a guest to completion and reports its output digest.
pub fn run(cfg: &RunConfig) -> Result<RunReport> {
    let boot = Boot::Fresh {
        guest: cfg.guest.clone(),
        vcpus: cfg.vcpus,
        mem_mib: cfg.mem_mib,
    };
    let opts = Options {
        output: cfg.output.clone(),
        timeout: cfg.timeout,
        ..Options::default()
    };
    match power_on(boot, &opts)?.run()? {
        Outcome::Finished(r) => Ok(r),
        Outcome::Suspended { .. } => unreachable!("nothing asks a plain run to suspend"),
    }
}
