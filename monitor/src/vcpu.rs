//! vCPU threads: run the guest, take cross-calls, report exits as user RPCs.
//!
//! ```text
//!  loop:
//!    clear immediate_exit; fence          ◀── a kick set after this point stops the next run
//!    drain cross-calls (block if not Running):
//!        Stun   → ack, then serve calls until Unstun (ack it too)
//!        Call   → run the closure on this thread (module init_per_thread, state access)
//!        Start  → state = Running
//!        Exit   → leave the thread
//!    KVM_RUN → handle the exit (doorbell / done ports, MMIO → the bus, EINTR = kicked)
//! ```

use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::layout::{DONE_PORT, DOORBELL_PORT};
use crate::rpc::UserRpc;
use crate::shared::VmShared;

/// A closure run on a vCPU thread.
pub type VcpuCall = Box<dyn FnOnce(&mut VcpuContext) + Send>;

/// Messages to one vCPU thread.
pub(crate) enum CrossCall {
    /// Stop running the guest, acknowledge, and wait for `Unstun`.
    Stun { ack: Sender<u32> },
    /// Run again (not acknowledged: the vCPU stamps `resumed_ns` instead).
    Unstun,
    /// Run a closure on this vCPU's thread.
    Call(VcpuCall),
    /// Begin running the guest.
    Start,
    /// Leave the thread.
    Exit,
}

/// What a vCPU is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// Created, not started yet.
    Parked = 0,
    /// Running guest code (or about to).
    Running = 1,
    /// Stopped by a stun.
    Stunned = 2,
    /// The guest said it has finished.
    Done = 3,
    /// The guest or KVM failed; the vCPU is not run again.
    Failed = 4,
}

impl VcpuState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => VcpuState::Running,
            2 => VcpuState::Stunned,
            3 => VcpuState::Done,
            4 => VcpuState::Failed,
            _ => VcpuState::Parked,
        }
    }
}

/// Counters of one vCPU, readable from any thread.
#[derive(Debug, Default)]
pub struct VcpuStats {
    state: AtomicU8,
    /// Every return from KVM_RUN.
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub io_exits: AtomicU64,
    /// MMIO exits (device registers; see [`crate::mmio`]).
    pub mmio_exits: AtomicU64,
    /// Doorbell rings.
    pub doorbells: AtomicU64,
    /// Returns caused by a kick (EINTR).
    pub kicks: AtomicU64,
    /// Stuns taken.
    pub stuns: AtomicU64,
    /// Nanoseconds from VM creation to this vCPU's start.
    pub started_ns: AtomicU64,
    /// Nanoseconds from VM creation to this vCPU's done (0 until then).
    pub done_ns: AtomicU64,
    /// Nanoseconds from VM creation to the end of this vCPU's last stun.
    pub resumed_ns: AtomicU64,
    /// The guest reported done on this vCPU.
    pub done: AtomicBool,
}

impl VcpuStats {
    /// The vCPU's current state.
    pub fn state(&self) -> VcpuState {
        VcpuState::from_u8(self.state.load(Ordering::Acquire))
    }
    fn set_state(&self, s: VcpuState) {
        self.state.store(s as u8, Ordering::Release);
    }
    /// Nanoseconds the guest ran on this vCPU from start to done (None until done).
    pub fn run_ns(&self) -> Option<u64> {
        let done = self.done_ns.load(Ordering::Acquire);
        (done != 0).then(|| done.saturating_sub(self.started_ns.load(Ordering::Acquire)))
    }
}

/// Everything a vCPU thread owns; cross-call closures get `&mut` to it.
pub struct VcpuContext {
    /// The vCPU's id (0 = boot vCPU).
    pub id: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// The VM this vCPU belongs to.
    pub shared: Arc<VmShared>,
    pub(crate) stats: Arc<VcpuStats>,
    pub(crate) rpc: Sender<UserRpc>,
    pub(crate) epoch: Instant,
    pub(crate) policy: VcpuSched,
}

/// Host scheduling policy of vCPU threads.
///
/// Measured on a 2-CPU host (`cargo xtask bench stall --vcpu-sched P` and `cargo xtask
/// run-pair --vcpu-sched P`, four interleaved rounds, BENCHMARKS.md): nice 10 keeps 97.4 % of
/// a 1 MiB hot set's throughput at 20 Hz (SCHED_IDLE 94.7 %) and 74.6 % of a 16 MiB one
/// (SCHED_IDLE 61.8 %), and `run-pair` is throttled 0–1 times per run as with SCHED_IDLE;
/// nice 0 keeps 78 % at 16 MiB but starves the replication (`run-pair` throttled 3–5 times).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuSched {
    /// SCHED_IDLE: vCPU threads use only CPU cycles nobody else wants, and any other thread
    /// that wakes up preempts them at once. But a CPU that runs only SCHED_IDLE threads counts
    /// as idle when the kernel places a waking thread, so tandem's control threads land on
    /// the vCPU's CPU as readily as on a free one, and the guest loses that CPU to them.
    Idle,
    /// SCHED_OTHER: vCPU threads compete with the rest of the host as ordinary threads; when
    /// the vCPUs fill every CPU, the replication gets only its fair share and falls behind.
    Normal,
    /// SCHED_OTHER at this nice value (1..=19; 19 is the smallest share): the vCPUs keep
    /// their CPUs busy, so the kernel places waking control threads on a free CPU if there is
    /// one, and where there is none the control threads take most of the CPU (nice 10: 9 to
    /// 1). Tandem's default is nice 10.
    Nice(i32),
}

impl Default for VcpuSched {
    fn default() -> Self {
        VcpuSched::Nice(10)
    }
}

enum Flow {
    Continue,
    Exit,
}

impl VcpuContext {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().max(1) as u64
    }

    fn fail(&mut self, msg: String) {
        log::error!("vCPU {}: {msg}", self.id);
        self.stats.set_state(VcpuState::Failed);
        let _ = self.rpc.send(UserRpc::VcpuError {
            vcpu: self.id,
            error: msg,
        });
    }

    /// Serves cross-calls while stunned, until `Unstun`. The state is already `Stunned`.
    fn stunned(&mut self, rx: &Receiver<CrossCall>, mut before: VcpuState) -> Flow {
        loop {
            match rx.recv() {
                Ok(CrossCall::Unstun) => {
                    self.stats.set_state(before);
                    self.stats
                        .resumed_ns
                        .store(self.now_ns(), Ordering::Release);
                    return Flow::Continue;
                }
                Ok(CrossCall::Stun { ack }) => {
                    let _ = ack.send(self.id);
                }
                Ok(CrossCall::Call(f)) => f(self),
                Ok(CrossCall::Start) => {
                    if before == VcpuState::Parked {
                        self.stats
                            .started_ns
                            .store(self.now_ns(), Ordering::Release);
                        before = VcpuState::Running;
                    }
                }
                Ok(CrossCall::Exit) | Err(_) => return Flow::Exit,
            }
        }
    }

    fn handle(&mut self, cc: CrossCall, rx: &Receiver<CrossCall>) -> Flow {
        match cc {
            CrossCall::Stun { ack } => {
                self.stats.stuns.fetch_add(1, Ordering::Relaxed);
                let before = self.stats.state();
                // Publish the state before the ack: whoever holds a StunGuard sees Stunned.
                self.stats.set_state(VcpuState::Stunned);
                let _ = ack.send(self.id);
                self.stunned(rx, before)
            }
            CrossCall::Unstun => Flow::Continue,
            CrossCall::Call(f) => {
                f(self);
                Flow::Continue
            }
            CrossCall::Start => {
                if self.stats.state() == VcpuState::Parked {
                    self.stats
                        .started_ns
                        .store(self.now_ns(), Ordering::Release);
                    self.stats.set_state(VcpuState::Running);
                }
                Flow::Continue
            }
            CrossCall::Exit => Flow::Exit,
        }
    }

    fn port_out(&mut self, port: u16, data: u32) {
        self.stats.io_exits.fetch_add(1, Ordering::Relaxed);
        match port {
            DOORBELL_PORT => {
                self.stats.doorbells.fetch_add(1, Ordering::Relaxed);
                let _ = self.rpc.send(UserRpc::OutputDoorbell { vcpu: self.id });
            }
            DONE_PORT => {
                self.stats.done_ns.store(self.now_ns(), Ordering::Release);
                self.stats.done.store(true, Ordering::Release);
                self.stats.set_state(VcpuState::Done);
                let _ = self.rpc.send(UserRpc::VcpuDone { vcpu: self.id });
            }
            _ => {
                let _ = self.rpc.send(UserRpc::PortWrite {
                    vcpu: self.id,
                    port,
                    data,
                });
            }
        }
    }

    /// A restored vCPU that had finished before the snapshot: it is never run again.
    pub(crate) fn mark_done_restored(&mut self) {
        self.stats.done.store(true, Ordering::Release);
        if self.stats.state() == VcpuState::Parked {
            self.stats.set_state(VcpuState::Done);
        }
    }

    /// Describes a triple fault with where the guest was.
    fn shutdown_report(&self) -> String {
        let at = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                " at rip {:#x} (cs {:#x}, rsp {:#x}, cr2 {:#x})",
                r.rip, s.cs.selector, r.rsp, s.cr2
            ),
            _ => String::new(),
        };
        let pvm = if self.shared.pvm.load(Ordering::Relaxed) {
            " This host's KVM is KVM-PVM, which delivers no interrupt or exception through a \
             guest's IDT (only to PVM-aware guests), so guests that use interrupts (ticker) \
             cannot run here."
        } else {
            ""
        };
        format!(
            "the guest shut down (triple fault){at}: an exception with no handler, e.g. a \
             privileged instruction at CPL3, a bad memory access, or a missing IDT gate.{pvm}"
        )
    }

    /// Runs the guest once and handles the exit.
    fn run_once(&mut self) {
        self.shared.ran.store(true, Ordering::Release);
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                Ok(Some((port, u32::from_le_bytes(b))))
            }
            Ok(VcpuExit::IoIn(_, data)) => {
                data.fill(0xff);
                Ok(None)
            }
            Ok(VcpuExit::Shutdown) => Err(String::new()),
            Ok(VcpuExit::Hlt) => Err("the guest halted without an interrupt source".to_string()),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                // The bus fills `data` now; KVM hands it to the guest at the next KVM_RUN.
                self.stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !self
                    .shared
                    .mmio_bus
                    .get()
                    .is_some_and(|b| b.read(addr, data))
                {
                    data.fill(0xff);
                    log::debug!("vCPU {}: MMIO read of unbacked {addr:#x}", self.id);
                }
                Ok(None)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !self
                    .shared
                    .mmio_bus
                    .get()
                    .is_some_and(|b| b.write(addr, data))
                {
                    log::debug!("vCPU {}: MMIO write to unbacked {addr:#x}", self.id);
                }
                Ok(None)
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(format!(
                "KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"
            )),
            Ok(VcpuExit::InternalError) => Err("KVM internal error".to_string()),
            Ok(VcpuExit::Unsupported(crate::ring::EXIT_DIRTY_RING_FULL)) => {
                match &self.shared.dirty_ring {
                    Some(r) => r
                        .ring_full(self.id, &self.shared.mem, &self.shared.vm_fd)
                        .map(|()| None),
                    None => Err(crate::Error::Config("dirty ring full, but no ring".into())),
                }
                .map_err(|e| e.to_string())
            }
            Ok(other) => Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => {
                self.stats.kicks.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) if e.errno() == libc::EAGAIN => Ok(None),
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        self.stats.exits.fetch_add(1, Ordering::Relaxed);
        let exit = exit.map_err(|msg| {
            if msg.is_empty() {
                self.shutdown_report()
            } else {
                msg
            }
        });
        match exit {
            Ok(Some((port, data))) => self.port_out(port, data),
            Ok(None) => {}
            Err(msg) => self.fail(msg),
        }
    }
}

/// Applies the vCPU scheduling policy to the calling thread (see [`VcpuSched`]).
fn apply_policy(id: u32, policy: VcpuSched) {
    // The thread inherits its creator's policy and nice value (an embedding application may
    // run its own threads under another policy), so every policy is set explicitly.
    let class = match policy {
        VcpuSched::Idle => libc::SCHED_IDLE,
        VcpuSched::Normal | VcpuSched::Nice(_) => libc::SCHED_OTHER,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid, initialised
    // sched_param; it only changes scheduling policy.
    let rc = unsafe { libc::sched_setscheduler(0, class, &param) };
    if rc != 0 {
        log::warn!(
            "vCPU {id}: scheduling policy {policy:?} refused: {}",
            std::io::Error::last_os_error()
        );
    }
    if let VcpuSched::Nice(n) = policy {
        // SAFETY: setpriority on the calling thread (who = 0 means the caller); it only
        // changes the thread's nice value.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n.clamp(1, 19)) };
        if rc != 0 {
            log::warn!(
                "vCPU {id}: nice {n} refused: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The body of a vCPU thread.
pub(crate) fn vcpu_loop(mut ctx: VcpuContext, rx: Receiver<CrossCall>) {
    apply_policy(ctx.id, ctx.policy);
    loop {
        ctx.fd.set_kvm_immediate_exit(0);
        fence(Ordering::SeqCst);
        loop {
            let cc = if ctx.stats.state() == VcpuState::Running {
                match rx.try_recv() {
                    Ok(cc) => cc,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(cc) => cc,
                    Err(_) => return,
                }
            };
            if let Flow::Exit = ctx.handle(cc, &rx) {
                return;
            }
        }
        ctx.run_once();
    }
}
