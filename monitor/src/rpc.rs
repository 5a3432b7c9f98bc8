//! The typed queue from the monitor to vmx: [`UserRpc`] (step done, doorbells, vCPU done or
//! failed, port writes for vmx devices). vCPU threads and the monitor loop send them; nothing
//! here knows either.

use checkpoint::{CptState, Section};

/// What the monitor did in one checkpoint step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepOutput {
    /// Sections saved (SAVE).
    pub sections: Vec<Section>,
    /// What was done, in order (for the checkpoint trace).
    pub steps: Vec<String>,
}

/// Events from the monitor to vmx.
#[derive(Debug)]
pub enum UserRpc {
    /// The monitor finished its half of a checkpoint step.
    StepDone {
        /// The state the step entered.
        state: CptState,
        /// What it did, or why it failed (the monitor's error, with its kind).
        result: std::result::Result<StepOutput, crate::Error>,
    },
    /// The guest rang vCPU `vcpu`'s output doorbell: drain its ring.
    OutputDoorbell {
        /// Which vCPU's ring.
        vcpu: u32,
    },
    /// vCPU `vcpu` finished its work.
    VcpuDone {
        /// The vCPU.
        vcpu: u32,
    },
    /// vCPU `vcpu` failed and will not run again.
    VcpuError {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        error: String,
    },
    /// A port write for a vmx device (anything but the doorbell and done ports).
    PortWrite {
        /// The vCPU.
        vcpu: u32,
        /// The port.
        port: u16,
        /// The value written (zero-extended).
        data: u32,
    },
}
