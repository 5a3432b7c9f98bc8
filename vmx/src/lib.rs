//! # vmx — Tandem's userland side
//!
//! vmx owns the devices and drives the [`monitor`] through its typed queues: it sends
//! `MonitorAction`s and handles the `UserRpc`s that come back (output doorbells, vCPU done,
//! vCPU errors). [`run::run`] is `tandem run` as a library call.
#![forbid(unsafe_code)]

pub mod control;
pub mod groups;
pub mod machine;
pub mod progress;
pub mod replication;
pub mod run;
mod runloop;
pub mod spec;
pub mod virtio;

pub use machine::{power_on, Boot, Options, Outcome, Vmx, POWER_ON};
pub use monitor::{tune_allocator, VcpuSched};
pub use replication::{Moved, Replication, Unreplicated};
pub use run::RunConfig;
pub use spec::{GuestSpec, OutputTarget, RunEnd, RunReport};

/// Everything that can go wrong in vmx.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request cannot be run as given (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The monitor failed.
    #[error(transparent)]
    Monitor(#[from] monitor::Error),
    /// A device failed.
    #[error(transparent)]
    Device(#[from] devices::Error),
    /// A checkpoint, snapshot file or restore failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// The VM refused a control request (the reason it gave).
    #[error("the VM refused the request: {0}")]
    Refused(String),
    /// The monitor's half of a checkpoint step failed.
    #[error("checkpoint step failed: {0}")]
    Step(String),
    /// A guest vCPU failed.
    #[error("the guest failed on vCPU {vcpu}: {error}")]
    Guest {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        error: String,
    },
    /// The run took longer than its time limit.
    #[error("the guest did not finish within {0:?} (raise --timeout-secs, or check the guest)")]
    Timeout(std::time::Duration),
    /// The replication layer failed (its own error, kept whole).
    #[error(transparent)]
    Replication(Box<dyn std::error::Error + Send + Sync>),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The process exit code for this error: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            Error::Monitor(monitor::Error::Config(_)) => 2,
            _ => 1,
        }
    }
}

impl From<workloads::Error> for Error {
    fn from(e: workloads::Error) -> Self {
        Error::Usage(e.to_string())
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
