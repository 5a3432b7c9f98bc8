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

use checkpoint::{CptState, Machine, Snapshot};
use crossbeam_channel::{bounded, unbounded, Sender};

use crate::module::CptArgs;
use crate::vcpu::VcpuState;
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
    /// Carry out the monitor's half of a checkpoint step; the answer comes back as
    /// [`UserRpc::StepDone`]. Save steps: SAVE_SYNC, QUIESCE, SAVE, CONTINUE_SYNC; restore
    /// steps: RESTORE (with the snapshot), RESTORE_SYNC.
    CptStep {
        /// The state to enter.
        state: CptState,
        /// Where bulk data goes or comes from.
        args: CptArgs,
        /// The snapshot being restored (RESTORE only).
        snapshot: Option<Arc<Snapshot>>,
    },
    /// Abandon a checkpoint in progress: lift restrictions, back to NONE.
    CptAbort,
    /// Read every vCPU's guest progress counter.
    Progress {
        /// Where the answer goes.
        reply: Sender<Result<Vec<u64>>>,
    },
    /// Stop the vCPU threads and the monitor.
    Shutdown,
}

pub use crate::rpc::{StepOutput, UserRpc};

/// A running monitor: owns the [`Vm`] on its own thread and serves [`MonitorAction`]s.
pub struct Monitor {
    tx: Sender<MonitorAction>,
    thread: Option<JoinHandle<()>>,
}

/// The monitor's checkpoint bookkeeping.
struct Cpt {
    machine: Machine,
    /// QUIESCE restricts actions until CONTINUE_SYNC.
    restricted: bool,
}

/// Runs every module's sync; traces only the modules that did something.
fn sync_steps(vm: &Vm, steps: &mut Vec<String>) -> Result<()> {
    let modules = vm.modules().clone();
    if !modules.iter().any(|m| m.syncs()) {
        return Ok(());
    }
    let done = vm.call_on(0, move |ctx| modules.run(|m| m.sync(ctx)))??;
    steps.extend(
        done.into_iter()
            .filter_map(|(n, what)| what.map(|w| format!("sync {n}: {w}"))),
    );
    Ok(())
}

fn cpt_step(
    vm: &Vm,
    cpt: &mut Cpt,
    stunned: bool,
    state: CptState,
    args: &CptArgs,
    snapshot: Option<Arc<Snapshot>>,
) -> Result<StepOutput> {
    let bad = |why: String| Error::BadState {
        action: "checkpoint step",
        why,
    };
    let illegal = |e: checkpoint::Error| bad(e.to_string());
    let mut out = StepOutput::default();
    match state {
        CptState::SaveSync | CptState::Save if !stunned => {
            return Err(bad(format!("{state:?} needs a stunned VM")));
        }
        CptState::Restore => {
            let running = (0..vm.vcpu_count())
                .any(|v| vm.vcpu_stats(v).state() == VcpuState::Running && !stunned);
            if running {
                return Err(bad("RESTORE needs vCPUs that are not running".into()));
            }
        }
        _ => {}
    }
    cpt.machine.check_next(state).map_err(illegal)?;
    match state {
        CptState::SaveSync => sync_steps(vm, &mut out.steps)?,
        CptState::Quiesce => {
            cpt.restricted = true;
            out.steps = vec!["restrict actions".into()];
        }
        CptState::Save => {
            // The vCPUs read their state on their own threads while the modules (MainMem's
            // page copy) run here: the two overlap within the pause.
            let vcpus = vm.save_vcpus_begin()?;
            let modules = vm.checkpoint_modules(args);
            out.sections = vm.save_vcpus_end(vcpus)?;
            out.steps.push("save vCPU state".into());
            let modules = modules?;
            // Only the modules that saved state (MainMem copying an epoch's pages hands them
            // over in `args.epoch` instead, and is traced by vmx with the epoch).
            out.steps.extend(modules.iter().filter_map(|s| {
                match checkpoint::SectionId::parse(&s.name) {
                    checkpoint::SectionId::Module(m) => Some(format!("checkpoint {m}")),
                    _ => None,
                }
            }));
            out.sections.extend(modules);
        }
        CptState::ContinueSync => {
            cpt.restricted = false;
            out.steps.push("lift restrictions".into());
            sync_steps(vm, &mut out.steps)?;
        }
        CptState::Restore => {
            let snap = snapshot.ok_or_else(|| bad("RESTORE needs the snapshot".into()))?;
            let args = CptArgs {
                snapshot: Some(snap.clone()),
                ..args.clone()
            };
            let restored = vm.restore_modules(&snap, &args)?;
            out.steps
                .extend(restored.iter().map(|n| format!("restore {n}")));
            vm.restore_vcpus(&snap)?;
            out.steps.push("restore vCPU state".into());
        }
        CptState::RestoreSync => sync_steps(vm, &mut out.steps)?,
        CptState::None => return Err(bad("NONE is not a step".into())),
    }
    cpt.machine.advance(state).map_err(illegal)?;
    if matches!(state, CptState::ContinueSync | CptState::RestoreSync) {
        cpt.machine.advance(CptState::None).map_err(illegal)?;
    }
    Ok(out)
}

fn serve(vm: Arc<Vm>, rx: crossbeam_channel::Receiver<MonitorAction>, rpc: Sender<UserRpc>) {
    let vm = &*vm;
    let mut stun: Option<StunGuard<'_>> = None;
    let mut cpt = Cpt {
        machine: Machine::default(),
        restricted: false,
    };
    let restricted = |what: &'static str| Error::BadState {
        action: what,
        why: "a checkpoint is in progress (actions are restricted until CONTINUE_SYNC)".into(),
    };
    for action in rx.iter() {
        match action {
            MonitorAction::Start { .. }
            | MonitorAction::Unstun { .. }
            | MonitorAction::SyncModules { .. }
                if cpt.restricted =>
            {
                match action {
                    MonitorAction::Start { reply } => {
                        let _ = reply.send(Err(restricted("start")));
                    }
                    MonitorAction::Unstun { reply } => {
                        let _ = reply.send(Err(restricted("unstun")));
                    }
                    MonitorAction::SyncModules { reply } => {
                        let _ = reply.send(Err(restricted("sync modules")));
                    }
                    _ => unreachable!("matched above"),
                }
            }
            MonitorAction::CptStep {
                state,
                args,
                snapshot,
            } => {
                let r = cpt_step(vm, &mut cpt, stun.is_some(), state, &args, snapshot);
                if let Err(e) = &r {
                    log::error!("checkpoint step {state:?} failed: {e}");
                }
                let _ = rpc.send(UserRpc::StepDone { state, result: r });
            }
            MonitorAction::CptAbort => {
                cpt = Cpt {
                    machine: Machine::default(),
                    restricted: false,
                };
            }
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
    /// read memory and counters). Checkpoint steps answer on `rpc`, the same channel the vCPUs
    /// report on.
    pub fn spawn(vm: Arc<Vm>, rpc: Sender<UserRpc>) -> Result<Monitor> {
        let (tx, rx) = unbounded();
        let thread = std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || serve(vm, rx, rpc))
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
    /// Posts an action without waiting (for steps answered by a user RPC).
    pub fn post(&self, action: MonitorAction) -> Result<()> {
        self.tx.send(action).map_err(|_| Error::Stopped)
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
