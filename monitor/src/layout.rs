//! The guest-physical memory layout and the entry ABI every Tandem guest runs under.
//!
//! ```text
//!  GPA                      what                                     who writes it
//!  0x0000_0000 ─ 0x0000_0fff  (unused, mapped)                        —
//!  0x0000_1000 ─ 0x0000_1fff  GDT                                     monitor (MainMem init)
//!  0x0000_2000 ─ 0x0000_2fff  PML4                                    monitor
//!  0x0000_3000 ─ 0x0000_3fff  PDPT                                    monitor
//!  0x0000_4000 ─ 0x0001_3fff  16 page directories (2 MiB pages, ≤16 GiB) monitor
//!  0x0001_4000 ─ 0x0001_4fff  IDT (256 gates, zeroed: guests fill it)   guest

//!  0x0002_0000 ─ 0x0002_03ff  progress slots, 64 B per vCPU            guest
//!  0x0003_0000 ─ 0x0005_0fff  TSS per vCPU, with a zeroed I/O bitmap   monitor
//!  0x0010_0000 ─ 0x001f_ffff  output rings, 64 KiB per vCPU            guest (head) / host (tail)
//!  0x0020_0000 ─ 0x003f_ffff  guest image (default load address)       monitor, once
//!  0x0040_0000 ─ 0x004f_ffff  stacks, 64 KiB per vCPU (grows down)     guest
//!  0x0050_0000 ─ 0x0053_ffff  kernel stacks (interrupts), 16 KiB each  CPU
//!  0x0080_0000 ─ end          data, split evenly between the vCPUs     guest
//! ```
//!
//! Every byte of RAM is identity-mapped with 2 MiB user pages (present, writable, user), so
//! guest code at CPL3 can touch all of it. The entry ABI (register state at the first
//! instruction, on every vCPU):
//!
//! | register | value                                           |
//! |----------|-------------------------------------------------|
//! | `rip`    | the entry point (default: the load address)     |
//! | `rsp`    | top of this vCPU's 64 KiB stack                 |
//! | `rdi`    | vCPU id (0-based; vCPU 0 is the boot vCPU)      |
//! | `rsi`    | number of vCPUs                                 |
//! | `rdx`    | GPA of this vCPU's output ring                  |
//! | `rcx`    | GPA of this vCPU's data area                    |
//! | `r8`     | size of this vCPU's data area in bytes          |
//! | `r9`     | GPA of this vCPU's progress slot                |
//! | `rflags` | `0x3002` (IOPL = 3: `in`/`out` allowed at CPL3) |
//!
//! Segments: `cs = 0x23` (64-bit code, DPL 3), `ss = ds = es = fs = gs = 0x1b` (data, DPL 3);
//! `gs.base` = this vCPU's progress slot (so CPL0 handlers find per-vCPU data at `gs:`).
//! IDTR = [`IDT_ADDR`], 256 gates, all absent until the guest writes them (memory is
//! user-writable); TR = this vCPU's TSS, whose `rsp0` is its kernel stack. Interrupts are off
//! (`rflags.IF = 0`) until the guest runs `sti`.
//! Ports: a write to [`DOORBELL_PORT`] asks the host to drain this vCPU's output ring; a write
//! to [`DONE_PORT`] says this vCPU has finished (it is never run again).

use crate::Error;

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of the large pages the identity map uses.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x1000;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x2000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x3000;
/// First of the page directories (one per GiB of RAM).
pub const PD_ADDR: u64 = 0x4000;
/// Number of page directories, which bounds the RAM size.
pub const PD_COUNT: u64 = 16;
/// Interrupt descriptor table (256 16-byte gates).
pub const IDT_ADDR: u64 = 0x1_4000;
/// First task-state segment.
pub const TSS_ADDR: u64 = 0x3_0000;
/// Stride between two TSSs (104-byte TSS, 8 KiB I/O bitmap, terminator byte).
pub const TSS_STRIDE: u64 = 0x2100;
/// TSS limit: the 104-byte TSS, the I/O permission bitmap for all 65,536 ports (all zero:
/// every port allowed) and its 0xff terminator. On this machine's KVM-PVM, port I/O at CPL3
/// is checked against the bitmap even with IOPL = 3, so the bitmap must be there.
pub const TSS_LIMIT: u64 = 104 + 8192;
/// First kernel (interrupt) stack.
pub const KSTACK_BASE: u64 = 0x50_0000;
/// Size of each kernel stack.
pub const KSTACK_SIZE: u64 = 0x4000;
/// GDT index of vCPU 0's TSS descriptor (16 bytes: two entries per vCPU).
pub const GDT_TSS_INDEX: u64 = 5;

/// Per-vCPU progress slots (one u64 counter at the start of each 64-byte slot).
pub const PROGRESS_ADDR: u64 = 0x2_0000;
/// Stride between two progress slots.
pub const PROGRESS_STRIDE: u64 = 64;
/// First output ring.
pub const RING_BASE: u64 = 0x10_0000;
/// Stride between two output rings (one per vCPU).
pub const RING_STRIDE: u64 = 0x1_0000;
/// Default load address and entry point of a guest image.
pub const LOAD_ADDR: u64 = 0x20_0000;
/// Largest image the default layout holds.
pub const MAX_IMAGE_SIZE: u64 = STACK_BASE - LOAD_ADDR;
/// First stack.
pub const STACK_BASE: u64 = 0x40_0000;
/// Size of each vCPU's stack.
pub const STACK_SIZE: u64 = 0x1_0000;
/// First byte of the data areas.
pub const DATA_BASE: u64 = 0x80_0000;
/// Most vCPUs a Tandem VM has.
pub const MAX_VCPUS: u32 = 16;
/// Smallest guest RAM: the fixed layout plus 1 MiB of data per vCPU at least.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest RAM the page directories map.
pub const MAX_MEM_MIB: u64 = PD_COUNT * 1024;
/// Doorbell: `out DOORBELL_PORT, eax` asks the host to drain the ring of vCPU `eax`.
pub const DOORBELL_PORT: u16 = 0x510;
/// Done: `out DONE_PORT, eax` says vCPU `eax` has finished.
pub const DONE_PORT: u16 = 0x511;
/// Guest-host device (vmmdev): `out`, `eax` = heartbeat interval in ms (0 turns it off).
pub const HEARTBEAT_CONFIG_PORT: u16 = 0x512;
/// Guest-host device (vmmdev): `out` = heartbeat ping.
pub const HEARTBEAT_PING_PORT: u16 = 0x513;
/// Guest-host device (vmmdev): `out`, `eax` = the guest's version (guest info).
pub const GUEST_INFO_PORT: u16 = 0x514;

/// Kernel code selector (DPL 0).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector (DPL 0).
pub const KERNEL_DS: u16 = 0x10;
/// User data selector with RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// User 64-bit code selector with RPL 3.
pub const USER_CS: u16 = 0x20 | 3;

const _: () = assert!(
    PD_ADDR + PD_COUNT * PAGE_SIZE <= IDT_ADDR,
    "page tables overlap"
);
const _: () = assert!(
    PROGRESS_ADDR + MAX_VCPUS as u64 * PROGRESS_STRIDE <= TSS_ADDR,
    "slots overlap"
);
const _: () = assert!(
    TSS_ADDR + MAX_VCPUS as u64 * TSS_STRIDE <= RING_BASE,
    "TSSs overlap"
);
const _: () = assert!(TSS_LIMIT < TSS_STRIDE, "TSS overlaps the next");
const _: () = assert!(
    KSTACK_BASE + MAX_VCPUS as u64 * KSTACK_SIZE <= DATA_BASE,
    "kernel stacks overlap"
);
const _: () = assert!(
    STACK_BASE + MAX_VCPUS as u64 * STACK_SIZE <= KSTACK_BASE,
    "stacks overlap"
);
const _: () = assert!(
    RING_BASE + MAX_VCPUS as u64 * RING_STRIDE <= LOAD_ADDR,
    "rings overlap"
);

/// The GDT: null, kernel code, kernel data, user data, user code (the `sysret` order).
pub const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // kernel code: present, DPL0, code, L=1
    0x00cf_9300_0000_ffff, // kernel data: present, DPL0, data, writable
    0x00cf_f300_0000_ffff, // user data:   present, DPL3, data, writable
    0x00af_fb00_0000_ffff, // user code:   present, DPL3, code, L=1
];

/// Where things are for one VM of `mem_bytes` RAM and `vcpus` vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// RAM size in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
}

impl Layout {
    /// Checks the size and count and returns the layout, or says what is wrong.
    pub fn new(mem_mib: u64, vcpus: u32) -> Result<Self, Error> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "--vcpus {vcpus} is out of range: use 1 to {MAX_VCPUS}"
            )));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
            return Err(Error::Config(format!(
                "--mem-mib {mem_mib} is out of range: use {MIN_MEM_MIB} to {MAX_MEM_MIB}"
            )));
        }
        if mem_mib % 2 != 0 {
            return Err(Error::Config(format!(
                "--mem-mib {mem_mib} is not a multiple of 2 (guest RAM is mapped in 2 MiB pages)"
            )));
        }
        let layout = Layout {
            mem_bytes: mem_mib << 20,
            vcpus,
        };
        if layout.data_size() < (1 << 20) {
            return Err(Error::Config(format!(
                "--mem-mib {mem_mib} leaves less than 1 MiB of data per vCPU for {vcpus} vCPUs: \
                 use at least {} MiB",
                (DATA_BASE >> 20) + u64::from(vcpus)
            )));
        }
        Ok(layout)
    }

    /// GPA of vCPU `vcpu`'s output ring.
    pub fn ring(&self, vcpu: u32) -> u64 {
        RING_BASE + u64::from(vcpu) * RING_STRIDE
    }
    /// GPA of vCPU `vcpu`'s progress slot.
    pub fn progress(&self, vcpu: u32) -> u64 {
        PROGRESS_ADDR + u64::from(vcpu) * PROGRESS_STRIDE
    }
    /// GPA of vCPU `vcpu`'s TSS.
    pub fn tss(&self, vcpu: u32) -> u64 {
        TSS_ADDR + u64::from(vcpu) * TSS_STRIDE
    }
    /// Top of vCPU `vcpu`'s kernel stack.
    pub fn kstack_top(&self, vcpu: u32) -> u64 {
        KSTACK_BASE + (u64::from(vcpu) + 1) * KSTACK_SIZE
    }
    /// GDT selector of vCPU `vcpu`'s TSS.
    pub fn tss_selector(&self, vcpu: u32) -> u16 {
        ((GDT_TSS_INDEX + 2 * u64::from(vcpu)) * 8) as u16
    }
    /// The two GDT entries of a 64-bit TSS descriptor for vCPU `vcpu` (available TSS).
    pub fn tss_descriptor(&self, vcpu: u32) -> [u64; 2] {
        let base = self.tss(vcpu);
        let limit = TSS_LIMIT;
        let low = (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | 0x89 << 40 // present, type 9: available 64-bit TSS
            | ((limit >> 16) & 0xf) << 48
            | ((base >> 24) & 0xff) << 56;
        [low, base >> 32]
    }

    /// Initial stack pointer of vCPU `vcpu`.
    pub fn stack_top(&self, vcpu: u32) -> u64 {
        STACK_BASE + (u64::from(vcpu) + 1) * STACK_SIZE
    }
    /// Bytes of data area each vCPU gets (page aligned).
    pub fn data_size(&self) -> u64 {
        let per = self.mem_bytes.saturating_sub(DATA_BASE) / u64::from(self.vcpus);
        per & !(PAGE_SIZE - 1)
    }
    /// GPA of vCPU `vcpu`'s data area.
    pub fn data(&self, vcpu: u32) -> u64 {
        DATA_BASE + u64::from(vcpu) * self.data_size()
    }
    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.mem_bytes / PAGE_SIZE
    }

    /// The page-table entries of the identity map, as (GPA, value) pairs to write.
    pub fn page_table_entries(&self) -> Vec<(u64, u64)> {
        const PRESENT_RW_USER: u64 = 0x7;
        const HUGE: u64 = 0x80;
        let mut out = vec![(PML4_ADDR, PDPT_ADDR | PRESENT_RW_USER)];
        let gibs = self.mem_bytes.div_ceil(1 << 30);
        for gib in 0..gibs {
            let pd = PD_ADDR + gib * PAGE_SIZE;
            out.push((PDPT_ADDR + gib * 8, pd | PRESENT_RW_USER));
        }
        for (i, base) in (0..self.mem_bytes)
            .step_by(HUGE_PAGE_SIZE as usize)
            .enumerate()
        {
            let pd = PD_ADDR + (i as u64 / 512) * PAGE_SIZE;
            out.push((pd + (i as u64 % 512) * 8, base | PRESENT_RW_USER | HUGE));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sizes_with_a_reason() {
        assert!(Layout::new(64, 0)
            .unwrap_err()
            .to_string()
            .contains("1 to 16"));
        assert!(Layout::new(64, 17).is_err());
        assert!(Layout::new(15, 1).is_err());
        assert!(Layout::new(17, 1)
            .unwrap_err()
            .to_string()
            .contains("multiple of 2"));
        assert!(Layout::new(16, 16)
            .unwrap_err()
            .to_string()
            .contains("at least 24"));
        assert!(Layout::new(24, 16).is_ok());
    }

    #[test]
    fn areas_do_not_overlap() {
        let l = Layout::new(64, 16).unwrap();
        assert!(l.ring(15) + RING_STRIDE <= LOAD_ADDR);
        assert!(l.progress(15) + PROGRESS_STRIDE <= RING_BASE);
        assert!(l.stack_top(15) <= DATA_BASE);
        assert!(l.data(15) + l.data_size() <= l.mem_bytes);
    }

    #[test]
    fn identity_map_covers_all_ram() {
        let l = Layout::new(2048 + 2, 1).unwrap();
        let e = l.page_table_entries();
        let huge = e.iter().filter(|(_, v)| v & 0x80 != 0).count() as u64;
        assert_eq!(huge, l.mem_bytes / HUGE_PAGE_SIZE);
        // the last 2 MiB page sits in the third page directory
        assert!(e
            .iter()
            .any(|&(a, v)| a == PD_ADDR + 2 * PAGE_SIZE && v & !0xfff == 2048 << 20));
    }
}
