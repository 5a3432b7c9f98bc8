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
//!  0x0001_5000 ─ 0x0001_5fff  page directory of the MMIO window         monitor
//!  0x0001_6000 ─ 0x0001_6fff  boot info (see [`crate::boot`])            monitor, once
//!  0x0002_0000 ─ 0x0002_03ff  progress slots, 64 B per vCPU            guest
//!  0x0003_0000 ─ 0x0005_0fff  TSS per vCPU, with a zeroed I/O bitmap   monitor
//!  0x0010_0000 ─ 0x001f_ffff  output rings, 64 KiB per vCPU            guest (head) / host (tail)
//!  0x0020_0000 ─ 0x003f_ffff  guest image (default load address)       monitor, once
//!  0x0040_0000 ─ 0x004f_ffff  stacks, 64 KiB per vCPU (grows down)     guest
//!  0x0050_0000 ─ 0x0053_ffff  kernel stacks (interrupts), 16 KiB each  CPU
//!  0x0080_0000 ─ end          data, split evenly between the vCPUs     guest
//!  0x4_0000_0000 ─ +2 MiB     virtio-mmio windows, 4 KiB each (no RAM) devices (MMIO exits)
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

/// Page directory mapping the virtio-mmio window (one 2 MiB user page, uncached).
pub const MMIO_PD_ADDR: u64 = 0x1_5000;
/// The boot-info page (see [`crate::boot`]).
pub const BOOT_INFO_ADDR: u64 = 0x1_6000;
/// Size of the boot-info page.
pub const BOOT_INFO_SIZE: u64 = 0x1000;
/// First virtio-mmio window: just above the largest RAM, so no RAM size collides with it.
/// A Linux guest finds device `i` with `virtio_mmio.device=4K@0x{MMIO_BASE + i * 0x1000}:{5 + i}`.
pub const MMIO_BASE: u64 = MAX_MEM_MIB << 20;
/// Size of one virtio-mmio window (as Firecracker's).
pub const MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices one VM has (GSIs 5 ..= 20 on the in-kernel IOAPIC's 24 pins).
pub const MAX_MMIO_DEVICES: u32 = 16;
/// GSI of the first virtio-mmio device; device `i` uses `MMIO_GSI_BASE + i`.
pub const MMIO_GSI_BASE: u32 = 5;

/// GPA of virtio-mmio window `i`.
pub const fn mmio_window(i: u32) -> u64 {
    MMIO_BASE + i as u64 * MMIO_SIZE
}

const _: () = assert!(
    PD_ADDR + PD_COUNT * PAGE_SIZE <= IDT_ADDR && IDT_ADDR + PAGE_SIZE <= MMIO_PD_ADDR,
    "page tables overlap the IDT"
);
const _: () = assert!(
    MMIO_PD_ADDR + PAGE_SIZE <= BOOT_INFO_ADDR && BOOT_INFO_ADDR + BOOT_INFO_SIZE <= PROGRESS_ADDR,
    "boot info overlaps"
);
const _: () = assert!(
    MAX_MMIO_DEVICES as u64 * MMIO_SIZE <= HUGE_PAGE_SIZE,
    "the MMIO windows must fit the one 2 MiB page mapping them"
);
const _: () = assert!(
    MMIO_GSI_BASE + MAX_MMIO_DEVICES <= 24,
    "the IOAPIC has 24 pins"
);
