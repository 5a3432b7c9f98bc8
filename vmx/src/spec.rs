//! What a VM runs and what a run reports: [`GuestSpec`], [`OutputTarget`], [`RunReport`],
//! [`RunEnd`].

use std::path::PathBuf;

use devices::DigestReport;
use serde::{Deserialize, Serialize};
use workloads::Workload;

/// What code the guest runs.
#[derive(Clone, Debug)]
pub enum GuestSpec {
    /// One of our workload guests.
    Workload(Workload),
    /// A guest image supplied by the user: ELF64 or a flat 64-bit binary.
    Image {
        /// The file.
        path: PathBuf,
        /// Where to load a flat image (an ELF image says where its segments go).
        load_addr: u64,
        /// Where to enter it (default: the ELF header's entry, or `load_addr`).
        entry: Option<u64>,
        /// `key=value` words for the boot-info page.
        args: String,
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

/// Counters of one vCPU at the end of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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

/// How a run ended, as `--json` prints it: the [`RunReport`] itself,
/// `{"suspended": path, "report": …}` (a replica that took over and was suspended prints no
/// report), or `{"moved_to": ADDR, "generation": N, "report": …}` (a planned migration moved
/// the VM away).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunEnd {
    /// Every vCPU finished.
    Finished(RunReport),
    /// Saved and powered off.
    Suspended {
        /// The snapshot.
        suspended: PathBuf,
        /// Output so far.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report: Option<RunReport>,
    },
    /// Moved to another host by a planned migration: the VM runs there.
    Moved {
        /// The receiver's address.
        moved_to: String,
        /// The generation it runs as there.
        generation: u64,
        /// Output of the run here.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report: Option<RunReport>,
    },
}

impl RunEnd {
    /// The run's report, if it has one.
    pub fn report(&self) -> Option<&RunReport> {
        match self {
            RunEnd::Finished(r) => Some(r),
            RunEnd::Suspended { report, .. } | RunEnd::Moved { report, .. } => report.as_ref(),
        }
    }
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
