//! Saved state of vCPUs and of the VM's in-kernel devices.
//!
//! ```text
//!  section "vcpu/<n>"  (VcpuSnapshot, v1)        section "module/Irqchip" (IrqchipSnapshot, v1)
//!    done flag, MP state, regs, sregs, xsave,       PIC master, PIC slave, IOAPIC,
//!    xcrs, debug regs, LAPIC, MSRs, events          PIT (channels), KVM clock
//! ```
//!
//! Capture order follows what KVM needs on restore: MP state, regs, sregs, xsave, xcrs,
//! debug regs, LAPIC, MSRs (every MSR KVM lists as saveable, with TSC_DEADLINE after TSC so
//! the deadline is interpreted against the restored TSC), then vCPU events.
//!
//! Time keeps moving inside KVM even while a VM is paused (TSC, LAPIC timer count, kvmclock,
//! PIT load times). A VM restored and not yet run has, architecturally, exactly the restored
//! state; [`Restored`] remembers those time-derived values so a snapshot taken before the VM
//! runs again reproduces the restored snapshot byte for byte (everything else is re-read
//! from KVM).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};
use checkpoint::Persist;

/// Version of [`VcpuSnapshot`]'s layout.
pub const VCPU_STATE_VERSION: u32 = <VcpuPersist as Persist>::VERSION;
/// Version of [`IrqchipSnapshot`]'s layout.
pub const IRQCHIP_STATE_VERSION: u32 = <IrqchipPersist as Persist>::VERSION;

/// The saved state of one vCPU (section `vcpu/<n>`).
pub struct VcpuPersist;
impl Persist for VcpuPersist {
    const NAME: &'static str = "vCPU state";
    const VERSION: u32 = 1;
    type State = VcpuSnapshot;
}

/// The saved state of the in-kernel irqchip, PIT and clock (section `module/Irqchip`).
pub struct IrqchipPersist;
impl Persist for IrqchipPersist {
    const NAME: &'static str = "monitor module Irqchip";
    const VERSION: u32 = 1;
    type State = IrqchipSnapshot;
}

const MSR_IA32_TSC: u32 = 0x10;
/// An MSR that this machine's KVM-PVM answers with the signature "PVM" (0x4d5650); a plain
/// KVM has no such MSR. Found by scanning KVM's MSR range on this host.
pub const MSR_PVM_SIGNATURE: u32 = 0x4b56_4d11;
/// The value of [`MSR_PVM_SIGNATURE`] on a PVM host.
pub const PVM_SIGNATURE: u64 = 0x4d_5650;

/// Whether the vCPU belongs to a KVM-PVM host (it answers PVM's signature MSR).
pub fn is_pvm(fd: &VcpuFd) -> bool {
    let Ok(mut probe) = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_PVM_SIGNATURE,
        ..Default::default()
    }]) else {
        return false;
    };
    fd.get_msrs(&mut probe) == Ok(1) && probe.as_slice()[0].data == PVM_SIGNATURE
}

/// Whether this host's KVM is KVM-PVM (creates a throwaway VM and vCPU to ask).
pub fn host_is_pvm() -> Result<bool> {
    let kvm = Kvm::new().map_err(Error::KvmOpen)?;
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    let vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
    Ok(is_pvm(&vcpu))
}
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Offset of the LAPIC timer current-count register.
const APIC_TMCCT: usize = 0x390;

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// The guest reported done on this vCPU (it is not run again).
    pub done: bool,
    /// Multiprocessor state.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM.
    pub events: kvm_vcpu_events,
}

/// The VM's in-kernel interrupt controllers, PIT and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IrqchipSnapshot {
    /// PIC master (chip 0), PIC slave (chip 1), IOAPIC (chip 2).
    pub chips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
}

/// The time-derived values of a restored VM, valid until any vCPU runs again.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    /// Per vCPU: (TSC MSR value, LAPIC TMCCT bytes).
    pub vcpus: Vec<Option<(u64, [i8; 4])>>,
    /// PIT and clock as restored.
    pub vm: Option<(kvm_pit_state2, kvm_clock_data)>,
}

/// The MSRs to save, in restore order (TSC_DEADLINE after TSC).
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut v: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_TSC_DEADLINE)
        .collect();
    if list.as_slice().contains(&MSR_IA32_TSC_DEADLINE) {
        v.push(MSR_IA32_TSC_DEADLINE);
    }
    Ok(v)
}

fn msrs_of(indices: &[u32]) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("too many MSRs to save: {e:?}")))
}

/// Reads every MSR in `indices` that KVM can read (it stops at the first it cannot; that one
/// is dropped and the rest read again).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut want = indices.to_vec();
    loop {
        let mut msrs = msrs_of(&want)?;
        let n = fd.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        if n == want.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        log::debug!("MSR {:#x} is listed but not readable; not saved", want[n]);
        want.remove(n);
    }
}

/// Captures one vCPU (call on its own thread, stunned or not yet started).
pub fn capture_vcpu(fd: &VcpuFd, msr_indices: &[u32], done: bool) -> Result<VcpuSnapshot> {
    Ok(VcpuSnapshot {
        done,
        mp_state: fd.get_mp_state().map_err(Error::kvm("KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?,
        debugregs: fd
            .get_debug_regs()
            .map_err(Error::kvm("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?,
        msrs: read_msrs(fd, msr_indices)?,
        events: fd
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?,
    })
}

impl VcpuSnapshot {
    /// Replaces the time-derived values with those of a restore (see [`Restored`]).
    pub fn freeze_time(&mut self, tsc: u64, tmcct: [i8; 4]) {
        if let Some(m) = self.msrs.iter_mut().find(|m| m.index == MSR_IA32_TSC) {
            m.data = tsc;
        }
        self.lapic.regs[APIC_TMCCT..APIC_TMCCT + 4].copy_from_slice(&tmcct);
    }

    /// The time-derived values of this snapshot.
    pub fn time_values(&self) -> (u64, [i8; 4]) {
        let tsc = self
            .msrs
            .iter()
            .find(|m| m.index == MSR_IA32_TSC)
            .map_or(0, |m| m.data);
        let mut t = [0i8; 4];
        t.copy_from_slice(&self.lapic.regs[APIC_TMCCT..APIC_TMCCT + 4]);
        (tsc, t)
    }

    /// Loads this state into a vCPU (call on its own thread before it runs).
    pub fn apply(&self, fd: &VcpuFd) -> Result<()> {
        fd.set_mp_state(self.mp_state)
            .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs)
            .map_err(Error::kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs)
            .map_err(Error::kvm("KVM_SET_SREGS"))?;
        // SAFETY: `self.xsave` is a complete kvm_xsave as KVM_GET_XSAVE returned it (legacy
        // 4 KiB size, no variable-length tail), which is what KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs)
            .map_err(Error::kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic)
            .map_err(Error::kvm("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs)
            .map_err(|e| Error::Snapshot(format!("too many MSRs in the snapshot: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        if n != self.msrs.len() {
            return Err(Error::Snapshot(format!(
                "this host's KVM refused MSR {:#x} of the snapshot (set {n} of {}): \
                 the snapshot comes from an incompatible host",
                self.msrs[n].index,
                self.msrs.len()
            )));
        }
        fd.set_vcpu_events(&self.events)
            .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Captures the in-kernel irqchip, PIT and clock.
pub fn capture_irqchip(vm: &VmFd) -> Result<IrqchipSnapshot> {
    let mut chips = Vec::with_capacity(3);
    for chip_id in 0..3 {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(Error::kvm("KVM_GET_IRQCHIP"))?;
        chips.push(c);
    }
    Ok(IrqchipSnapshot {
        chips,
        pit: vm.get_pit2().map_err(Error::kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(Error::kvm("KVM_GET_CLOCK"))?,
    })
}

impl IrqchipSnapshot {
    /// Loads this state into the VM.
    pub fn apply(&self, vm: &VmFd) -> Result<()> {
        if self.chips.len() != 3
            || self
                .chips
                .iter()
                .enumerate()
                .any(|(i, c)| c.chip_id != i as u32)
        {
            return Err(Error::Snapshot(
                "the irqchip state must hold PIC master, PIC slave, IOAPIC".into(),
            ));
        }
        vm.set_pit2(&self.pit).map_err(Error::kvm("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(Error::kvm("KVM_SET_CLOCK"))?;
        for c in &self.chips {
            vm.set_irqchip(c).map_err(Error::kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
