//! The MMIO bus hook: how vmx's devices see the guest's loads and stores to device windows.
//!
//! ```text
//!  guest load/store to a GPA no memslot backs (e.g. MMIO_BASE + i·0x1000, the virtio-mmio
//!  windows; see guest_abi::layout)
//!    └▶ KVM_EXIT_MMIO on that vCPU's thread
//!        └▶ bus.read(gpa, data) / bus.write(gpa, data), synchronously, before KVM_RUN again:
//!           a read fills `data`, which KVM hands to the guest's register on the next entry
//!           returns false (no device there) → today's behaviour: reads see all ones, writes
//!           are dropped, with a debug log naming the address
//! ```
//!
//! Interrupts go the other way without the vCPU threads: a device writes its eventfd, which
//! [`crate::Vm::register_irqfd`] made an irqfd on its GSI of the in-kernel IOAPIC.
//!
//! | GSI | what |
//! |---|---|
//! | 0–4 | legacy (PIT on 0/2, unused otherwise) |
//! | `MMIO_GSI_BASE + i` = 5 + i, i < 16 (5..=20) | virtio-mmio device `i` (window `MMIO_BASE + i·0x1000`) |
//!
//! KVM's default routing sends GSIs 0–15 to the PIC and the IOAPIC and 16–23 to the IOAPIC,
//! so every device GSI reaches IOAPIC pin 5 + i. An irqfd pulses the pin (edge): a Linux guest
//! that lists the device as `virtio_mmio.device=4K@0x400000000:5` gets its interrupt there.

/// Devices behind guest-physical addresses that no memslot backs.
///
/// Called on the vCPU thread that took the exit, with nothing of the monitor locked; an
/// implementation locks what it needs (one device at a time) and returns quickly: the vCPU
/// waits. `gpa` is the address the guest used; `data.len()` is the access size (1, 2, 4 or 8).
pub trait MmioBus: Send + Sync {
    /// A guest load: fill `data` and return true, or return false if no device claims `gpa`.
    fn read(&self, gpa: u64, data: &mut [u8]) -> bool;
    /// A guest store of `data`: return true if a device claimed `gpa`.
    fn write(&self, gpa: u64, data: &[u8]) -> bool;
}
