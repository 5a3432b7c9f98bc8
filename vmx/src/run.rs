//! `tandem run`: boot a guest, drain its output, report a digest.

use std::time::Duration;

use crate::machine::{power_on, Boot, Options, Outcome};
use crate::spec::{GuestSpec, OutputTarget, RunReport};
use crate::Result;

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

/// Runs a guest to completion and reports its output digest.
pub fn run(cfg: &RunConfig) -> Result<RunReport> {
    let boot = Boot::Fresh {
        guest: cfg.guest.clone(),
        vcpus: cfg.vcpus,
        mem_mib: cfg.mem_mib,
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let opts = Options {
        output: cfg.output.clone(),
        timeout: cfg.timeout,
        ..Options::default()
    };
    match power_on(boot, &opts)?.run()? {
        Outcome::Finished(r) => Ok(r),
        Outcome::Suspended { .. } | Outcome::Moved { .. } => {
            unreachable!("nothing asks a plain run to suspend or move")
        }
    }
}
