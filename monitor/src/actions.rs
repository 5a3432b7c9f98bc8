//! Typed queues between vmx and the monitor.
//!
//! ```text
//!   vmx                          Monitor thread                 vCPU threads
//!    │  MonitorAction::Stun ──────▶ │ Vm::stun ── CrossCall::Stun ──▶ │ (kick)
//!    │                              │ ◀──────────────── ack ───────── │
//!    │ ◀─────── reply(StunReport) ──│                                  │
//!    │ ◀──────────────────── UserRpc::OutputDoorbell / VcpuDone ──────│
//! ```
//!
//! A [`MonitorAction`] carries its own reply channel; [`UserRpc`]s are events from the monitor
//! (mostly from vCPU threads) that vmx handles in its loop.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Sender};

use crate::vm::{StunGuard, StunReport, Vm};
use crate::{Error, Result};

/// Requests from vmx to the monitor.
pub enum MonitorAction {
    /// Let the vCPUs run the guest.
    Start {
        /// Where the answer goes.
        reply: Sender<Result<()>>,
    },
    /// Stop every vCPU (pause). Stays in force until `Unstun`.
    Stun {
        /// Where the answer goes.
        reply: Sender<Result<StunReport>>,
    },
    /// Let the vCPUs run again (continue).
    Unstun {
        /// Where the answer goes.
        reply: Sender<Result<StunReport>>,
    },
    /// Run every module's `sync` on the boot vCPU (the VM must be stunned).
    SyncModules {
        /// Where the answer goes.
        reply: Sender<Result<()>>,
    },
    /// Read every vCPU's guest progress counter.
    Progress {
        /// Where the answer goes.
        reply: Sender<Result<Vec<u64>>>,
    },
    /// Stop the vCPU threads and the monitor.
    Shutdown,
}

/// Events from the monitor to vmx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRpc {
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
    /// A write to a port no device claims.
    PortWrite {
        /// The vCPU.
        vcpu: u32,
        /// The port.
        port: u16,
    },
}

/// A running monitor: owns the [`Vm`] on its own thread and serves [`MonitorAction`]s.
pub struct Monitor {
    tx: Sender<MonitorAction>,
    thread: Option<JoinHandle<()>>,
}

fn serve(vm: Arc<Vm>, rx: crossbeam_channel::Receiver<MonitorAction>) {
    let vm = &*vm;
    let mut stun: Option<StunGuard<'_>> = None;
    for action in rx.iter() {
        match action {
            MonitorAction::Start { reply } => {
                let _ = reply.send(vm.start());
            }
            MonitorAction::Stun { reply } => {
                let r = match &stun {
                    Some(_) => Err(Error::BadState {
                        action: "stun",
                        why: "the VM is already stunned".into(),
                    }),
                    None => vm.stun().map(|g| {
                        let report = g.report();
                        stun = Some(g);
                        report
                    }),
                };
                let _ = reply.send(r);
            }
            MonitorAction::Unstun { reply } => {
                let r = match stun.take() {
                    Some(g) => g.unstun(),
                    None => Err(Error::BadState {
                        action: "unstun",
                        why: "the VM is not stunned".into(),
                    }),
                };
                let _ = reply.send(r);
            }
            MonitorAction::SyncModules { reply } => {
                let r = if stun.is_none() {
                    Err(Error::BadState {
                        action: "sync modules",
                        why: "the VM must be stunned first".into(),
                    })
                } else {
                    let modules = vm.modules().clone();
                    vm.call_on(0, move |ctx| modules.run(|m| m.sync(ctx)).map(|_| ()))
                        .and_then(|r| r)
                };
                let _ = reply.send(r);
            }
            MonitorAction::Progress { reply } => {
                let _ = reply.send((0..vm.vcpu_count()).map(|i| vm.progress(i)).collect());
            }
            MonitorAction::Shutdown => break,
        }
    }
    drop(stun);
}

impl Monitor {
    /// Serves actions for `vm` on the monitor thread (callers may keep a clone of `vm` to
    /// read memory and counters).
    pub fn spawn(vm: Arc<Vm>) -> Result<Monitor> {
        let (tx, rx) = unbounded();
        let thread = std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || serve(vm, rx))
            .map_err(Error::Thread)?;
        Ok(Monitor {
            tx,
            thread: Some(thread),
        })
    }

    /// Sends an action built around a fresh reply channel and waits for the answer.
    pub fn request<T>(&self, make: impl FnOnce(Sender<Result<T>>) -> MonitorAction) -> Result<T> {
        let (tx, rx) = bounded(1);
        self.tx.send(make(tx)).map_err(|_| Error::Stopped)?;
        rx.recv().map_err(|_| Error::Stopped)?
    }

    /// Starts the guest.
    pub fn start(&self) -> Result<()> {
        self.request(|reply| MonitorAction::Start { reply })
    }
    /// Pauses (stuns) the VM.
    pub fn stun(&self) -> Result<StunReport> {
        self.request(|reply| MonitorAction::Stun { reply })
    }
    /// Continues (unstuns) the VM.
    pub fn unstun(&self) -> Result<StunReport> {
        self.request(|reply| MonitorAction::Unstun { reply })
    }
    /// Every vCPU's progress counter.
    pub fn progress(&self) -> Result<Vec<u64>> {
        self.request(|reply| MonitorAction::Progress { reply })
    }
    /// Runs the modules' sync callbacks (VM must be stunned).
    pub fn sync_modules(&self) -> Result<()> {
        self.request(|reply| MonitorAction::SyncModules { reply })
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.tx.send(MonitorAction::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
