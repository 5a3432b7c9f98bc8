//! # vmx — Tandem's userland side
//!
//! vmx owns the devices and drives the [`monitor`] through its typed queues: it sends
//! `MonitorAction`s and handles the `UserRpc`s that come back (output doorbells, vCPU done,
//! vCPU errors). [`run::run`] is `tandem run` as a library call.

pub mod control;
pub mod ft;
pub mod groups;
pub mod machine;
pub mod progress;
pub mod run;

pub use machine::{power_on, Boot, Options, Outcome, Vmx, POWER_ON};
pub use run::{GuestSpec, OutputTarget, RunConfig, RunReport};

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
    /// A replication epoch was refused (malformed, truncated, out of order).
    #[error("epoch refused: {0}")]
    Epoch(String),
    /// The replication link failed.
    #[error("replication link: {0}")]
    Link(#[from] transport::Error),
    /// The output sink is unreachable or failed.
    #[error("output sink: {0} (is `tandem sink` running at that address?)")]
    Sink(String),
    /// This VM lost its claim to be primary and stopped without releasing anything.
    #[error("fenced: {0}")]
    Fenced(String),
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
    /// The process exit code for this error: 2 for usage errors, 3 for a fenced primary, 1
    /// otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            Error::Monitor(monitor::Error::Config(_)) => 2,
            Error::Fenced(_) => 3,
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
