//! # monitor — Tandem's VMM side
//!
//! ```text
//!            vmx (userland)                         monitor (this crate)
//!  ┌──────────────────────────┐  MonitorAction   ┌───────────────────────────────┐
//!  │ devices, checkpoint      │ ───────────────▶ │ monitor loop (Monitor)        │
//!  │ groups, power-on phases  │ ◀─────────────── │   Vm: KVM VM, GuestMemoryMmap │
//!  └──────────────────────────┘     UserRpc      │   module table (MainMem, CPU) │
//!                                                │   vCPU threads ◀─ CrossCall ─┐│
//!                                                │   (one per vCPU)  + kick     ││
//!                                                │   StunGuard ─────────────────┘│
//!                                                └───────────────────────────────┘
//! ```
//!
//! * [`Vm`] owns the KVM VM, the guest memory (dirty logging on every slot) and one thread per
//!   vCPU. Guests start directly in 64-bit long mode at CPL3 (see [`layout`]).
//! * [`Vm::stun`] stops every vCPU through cross-calls and returns a [`StunGuard`]; dropping
//!   the guard (or [`StunGuard::unstun`]) lets them run again.
//! * The [`module`] table runs `init` on the boot vCPU (vCPU 0), `init_per_thread` on every
//!   vCPU, and `sync`/`checkpoint` for the checkpoint engine.
//! * [`Monitor`] runs a [`Vm`] behind typed queues: [`MonitorAction`] in, [`UserRpc`] out.

pub mod actions;
pub mod alloc;
pub mod cow;
pub mod crew;
pub mod dirty;
pub mod image;
mod kick;
pub mod kvm_stats;
pub mod layout;
pub mod mmio;
pub mod module;
pub mod rearm;
pub mod ring;
pub mod rpc;
mod shared;
pub mod state;
mod vcpu;
mod vm;

pub use actions::{Monitor, MonitorAction, StepOutput, UserRpc};
pub use alloc::tune_allocator;
pub use dirty::{DirtyLog, DirtyPages};
pub use layout::Layout;
pub use mmio::MmioBus;
pub use module::{CptArgs, EpochMem, Module, ModuleTable, PageRun};
pub use shared::{GuestMem, VmShared};
pub use vcpu::{VcpuContext, VcpuSched, VcpuState, VcpuStats};
pub use vm::{StunGuard, StunReport, Vm, VmConfig};

use std::time::Duration;

/// Everything that can go wrong in the monitor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// The errno KVM gave.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configuration cannot be run (the message says what to change).
    #[error("{0}")]
    Config(String),
    /// A snapshot's content does not fit this VM or host (not a usage error: the snapshot is
    /// what it is).
    #[error("the snapshot does not fit: {0}")]
    Snapshot(String),
    /// A host resource (signal handler, mapping) could not be set up.
    #[error("host setup failed: {0}")]
    Host(String),
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A vCPU failed.
    #[error("vCPU {vcpu}: {msg}")]
    Vcpu {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        msg: String,
    },
    /// Some vCPUs did not acknowledge a stun or unstun in time.
    #[error("vCPUs {vcpus:?} did not acknowledge the {what} within {timeout:?}; the VM is wedged")]
    StunTimeout {
        /// "stun" or "unstun".
        what: &'static str,
        /// The vCPUs that did not answer.
        vcpus: Vec<u32>,
        /// How long we waited.
        timeout: Duration,
    },
    /// A module callback failed.
    #[error("monitor module {module}: {msg}")]
    Module {
        /// The module's name.
        module: &'static str,
        /// What happened.
        msg: String,
    },
    /// An action could not be carried out in the current state.
    #[error("cannot {action} now: {why}")]
    BadState {
        /// The action.
        action: &'static str,
        /// Why not.
        why: String,
    },
    /// The monitor or a vCPU thread is gone.
    #[error("the monitor has stopped")]
    Stopped,
    /// A thread could not be started.
    #[error("cannot start a monitor thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
