//! # tandem-rt — the runtime of Tandem's Rust guests
//!
//! A guest is a `#![no_std]`, `#![no_main]` binary built for the host target and linked static
//! at 0x200000 (see `guests/link.ld`). It names its `main` with [`entry!`]:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use tandem_rt::{entry, kind, Env};
//! entry!(main);
//! fn main(env: &Env) {
//!     let n = env.arg_u64("n", 10);
//!     for i in 0..n { env.emit(kind::PROGRESS, i, 0); }
//! }
//! ```
//!
//! What the runtime does (the ABI is in `guest_abi::layout`):
//!
//! * `_start` (first in the image, so the entry is 0x200000) aligns the stack and calls the
//!   runtime with the entry registers, which are exactly the System V argument registers:
//!   `rdi` vCPU id, `rsi` vCPU count, `rdx` ring, `rcx` data area, `r8` its size, `r9` progress
//!   slot.
//! * **Only vCPU 0 runs `main`.** Every other vCPU reports done at once (`out 0x511`) and is
//!   never run again; its ring stays empty.
//! * On vCPU 0 it reads the boot-info page (`guest_abi::boot::BootInfo::parse`, which bounds
//!   every count and length), starts the heap over vCPU 0's data area (the whole of it; the
//!   `#[global_allocator]` is `linked_list_allocator`, so `alloc`'s `Vec`, `String`, `BTreeMap`
//!   work), calls `main(&Env)`, then rings the doorbell and reports done.
//! * [`Env::emit`] writes one record to the output ring: slot `head % 1024`, then `head + 1`;
//!   the doorbell (`out 0x510`) every [`Env::set_batch`] records (default 256) and when the
//!   ring is full, then it waits for the host to move `tail`.
//! * A panic (including a failed allocation) emits a `kind::PANIC` record (`value` = line,
//!   `aux` = FNV-1a 64 of the file name), then `kind::PANIC_TEXT` records with
//!   `"file:line: message"` (at most [`PANIC_TEXT_MAX`] bytes), 16 bytes each (`value` = bytes
//!   0..8, `aux` = bytes 8..16, little endian, zero padded), then the doorbell and done.
//! * The clock: [`Env::now_ns`] from `rdtsc`, scaled by the boot-info page's TSC kHz.
//! * `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp` (there is no libc).
#![no_std]

extern crate alloc;

use core::cell::Cell;
use core::fmt::Write as _;
use core::panic::PanicInfo;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicPtr, AtomicU32, Ordering};

pub use guest_abi;
use guest_abi::boot::BootInfo;
use guest_abi::layout::{
    BOOT_INFO_ADDR, BOOT_INFO_SIZE, DATA_BASE, DONE_PORT, DOORBELL_PORT, GUEST_INFO_PORT,
    HEARTBEAT_CONFIG_PORT, HEARTBEAT_PING_PORT,
};
pub use guest_abi::ring::{kind, Record};
use guest_abi::ring::{RECORD_SIZE, RING_HEAD, RING_RECORDS, RING_SLOTS, RING_TAIL};

mod mem;

/// Record kinds of the Rust guests beyond `guest_abi::ring::kind` (mirrored, with their
/// meaning, in the host crate `guest-images`: `guest_images::kind`).
pub mod kinds {
    /// blk-check, first record: `value` = disk bytes checked, `aux` = pattern seed.
    pub const BLK_INFO: u32 = 0x20;
    /// blk-check, after the write pass and the flush: `value` = digest of the pattern written,
    /// `aux` = write requests.
    pub const BLK_WRITTEN: u32 = 0x21;
    /// blk-check, after the read pass: `value` = digest of the bytes read, `aux` = read
    /// requests.
    pub const BLK_VERIFIED: u32 = 0x22;
    /// blk-check, the first mismatch (only then): `value` = disk offset, `aux` = the word read.
    pub const BLK_MISMATCH: u32 = 0x23;
    /// blk-check `bench=1`, after BLK_INFO: `value` = bytes per request, `aux` = TSC kHz.
    pub const BLK_BENCH: u32 = 0x24;
    /// blk-check `bench=1`: `value` = TSC ticks of the write pass with its flush, `aux` =
    /// ticks of the flush.
    pub const BLK_BENCH_WRITE: u32 = 0x25;
    /// blk-check `bench=1`: `value` = TSC ticks of the read pass, `aux` = queue
    /// notifications of both passes.
    pub const BLK_BENCH_READ: u32 = 0x26;
    /// net-echo, once the interface is up: `value` = IPv4 address (big-endian u32) << 8 |
    /// prefix length, `aux` = UDP port.
    pub const NET_UP: u32 = 0x28;
    /// net-echo, every `every` datagrams: `value` = datagrams echoed, `aux` = payload bytes.
    pub const NET_ECHO: u32 = 0x29;
    /// stall-probe, first: `value` = TSC kHz, `aux` = threshold in ns.
    pub const STALL_INFO: u32 = 0x30;
    /// stall-probe, one gap over the threshold: `value` = gap in ns, `aux` = when it began, ns
    /// since the probe started.
    pub const STALL: u32 = 0x31;
    /// stall-probe, last before `DONE`: `value` = largest gap in ns, `aux` = gaps over the
    /// threshold (also those not recorded once `max` was reached).
    pub const STALL_SUMMARY: u32 = 0x32;
    /// kv, after the log replay at boot: `value` = records replayed, `aux` = log bytes, bit 63
    /// set if a torn tail was cut.
    pub const KV_LOG: u32 = 0x38;
    /// kv, listening: `value` = IPv4 (big-endian u32) << 8 | prefix, `aux` = TCP port.
    pub const KV_UP: u32 = 0x39;
    /// kv, every `stats_ms`: `value` = requests answered, `aux` = open connections.
    pub const KV_STATS: u32 = 0x3a;
}

/// The precompiled `alloc` is built with unwinding, and code paths such as `alloc::format!`
/// keep landing pads that name this symbol. Guests are built with `panic = "abort"`, so no
/// unwind ever starts and this is never reached; if it were, the vCPU stops here.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Longest `file:line: message` a panic reports (longer text is cut).
pub const PANIC_TEXT_MAX: usize = 512;
/// Default doorbell batch.
pub const DEFAULT_BATCH: u64 = 256;

core::arch::global_asm!(
    ".section .text.start,\"ax\",@progbits",
    ".global _start",
    "_start:",
    "and rsp, -16",
    "xor ebp, ebp",
    "call {start}",
    "2:",
    "ud2",
    "jmp 2b",
    start = sym rust_start,
);

extern "Rust" {
    /// Defined by [`entry!`] in the guest binary.
    fn __tandem_main(env: &Env);
}

/// Names the guest's `main(&Env)`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        pub fn __tandem_main(env: &$crate::Env) {
            let f: fn(&$crate::Env) = $main;
            f(env)
        }
    };
}

#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// The running vCPU 0's [`Env`] (set before `main`; read by the panic handler).
static ENV: AtomicPtr<Env> = AtomicPtr::new(core::ptr::null_mut());
/// The vCPU id, for a panic before the [`Env`] exists.
static VCPU: AtomicU32 = AtomicU32::new(0);
static PANICKING: AtomicBool = AtomicBool::new(false);

/// `out port, eax`. Not `nomem`: the compiler must not move memory accesses across it (the
/// doorbell publishes the ring).
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O is allowed at CPL3 (IOPL 3 and an all-zero I/O bitmap); it touches no
    // Rust-visible memory.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value,
            options(nostack, preserves_flags));
    }
}

/// The time stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; CR4.TSD is clear.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn report_done(vcpu: u32) -> ! {
    outl(DOORBELL_PORT, vcpu);
    outl(DONE_PORT, vcpu);
    loop {
        core::hint::spin_loop();
    }
}

/// What a guest's `main` gets: its vCPU, the output ring, the clock, the arguments.
pub struct Env {
    vcpu: u32,
    vcpus: u32,
    ring: *mut u8,
    data: u64,
    data_size: u64,
    heap_size: u64,
    progress: *mut u64,
    head: Cell<u64>,
    seq: Cell<u64>,
    batch: Cell<u64>,
    boot: Option<BootInfo<'static>>,
    tsc0: u64,
}

impl Env {
    /// This vCPU's id (always 0: only vCPU 0 runs `main`).
    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }
    /// How many vCPUs the VM has.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }
    /// This vCPU's data area `(start, bytes)` (the heap uses all of it).
    pub fn data_area(&self) -> (u64, u64) {
        (self.data, self.data_size)
    }
    /// Bytes the heap was given (0 when the data area was unusable).
    pub fn heap_size(&self) -> u64 {
        self.heap_size
    }
    /// The boot-info page, if it parsed.
    pub fn boot_info(&self) -> Option<&BootInfo<'static>> {
        self.boot.as_ref()
    }
    /// The guest argument string (`key=value` words; empty without a boot-info page).
    pub fn args(&self) -> &'static str {
        self.boot.as_ref().map_or("", |b| b.args)
    }
    /// The value of `key=value`, if given.
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.boot.as_ref().and_then(|b| b.arg(key))
    }
    /// A numeric argument: decimal, `0x` hex, or with a `k`/`M`/`G` suffix (×1000, ×10⁶,
    /// ×10⁹; `_` ignored), as the asm workloads parse them. Panics (a PANIC record) on a value
    /// that is not a number.
    pub fn arg_u64(&self, key: &str, default: u64) -> u64 {
        match self.arg(key) {
            None => default,
            Some(v) => parse_u64(v).unwrap_or_else(|| panic!("argument {key}={v}: not a number")),
        }
    }

    /// The TSC frequency in kHz from the boot-info page (0: unknown).
    pub fn tsc_khz(&self) -> u64 {
        self.boot.as_ref().map_or(0, |b| b.tsc_khz)
    }
    /// Nanoseconds since the runtime started, from `rdtsc` and [`Env::tsc_khz`]; TSC ticks
    /// when the frequency is unknown.
    pub fn now_ns(&self) -> u64 {
        self.ticks_to_ns(rdtsc().wrapping_sub(self.tsc0))
    }
    /// Converts TSC ticks to ns (identity when the frequency is unknown).
    pub fn ticks_to_ns(&self, ticks: u64) -> u64 {
        match self.tsc_khz() {
            0 => ticks,
            khz => (u128::from(ticks) * 1_000_000 / u128::from(khz)).min(u64::MAX.into()) as u64,
        }
    }
    /// Converts ns to TSC ticks (identity when the frequency is unknown).
    pub fn ns_to_ticks(&self, ns: u64) -> u64 {
        match self.tsc_khz() {
            0 => ns,
            khz => (u128::from(ns) * u128::from(khz) / 1_000_000).min(u64::MAX.into()) as u64,
        }
    }

    /// Rings the doorbell every `batch` records (clamped to 1 ..= 1024).
    pub fn set_batch(&self, batch: u64) {
        self.batch.set(batch.clamp(1, RING_SLOTS));
    }

    fn tail(&self) -> u64 {
        // SAFETY: the ring is this vCPU's, inside guest RAM (entry ABI).
        unsafe { read_volatile(self.ring.add(RING_TAIL as usize) as *const u64) }
    }

    /// Records in the ring the host has not taken yet (a tail beyond the head counts as 0).
    fn used(&self, head: u64) -> u64 {
        head.saturating_sub(self.tail())
    }

    /// Writes one record (`vcpu` and `seq` filled in) and returns its sequence number.
    pub fn emit(&self, kind: u32, value: u64, aux: u64) -> u64 {
        let head = self.head.get();
        if self.used(head) >= RING_SLOTS {
            self.doorbell();
            while self.used(head) >= RING_SLOTS {
                core::hint::spin_loop();
            }
        }
        let seq = self.seq.get();
        let off = RING_RECORDS + (head % RING_SLOTS) * RECORD_SIZE;
        // SAFETY: slot `head % RING_SLOTS` lies inside this vCPU's ring; the host reads it only
        // after it sees the new head, which is stored after the record.
        unsafe {
            let slot = self.ring.add(off as usize);
            write_volatile(slot as *mut u32, self.vcpu);
            write_volatile(slot.add(4) as *mut u32, kind);
            write_volatile(slot.add(8) as *mut u64, seq);
            write_volatile(slot.add(16) as *mut u64, value);
            write_volatile(slot.add(24) as *mut u64, aux);
            compiler_fence(Ordering::Release);
            write_volatile(self.ring.add(RING_HEAD as usize) as *mut u64, head + 1);
        }
        self.head.set(head + 1);
        self.seq.set(seq + 1);
        if (head + 1).is_multiple_of(self.batch.get()) {
            self.doorbell();
        }
        seq
    }

    /// Asks the host to drain the ring now.
    pub fn doorbell(&self) {
        compiler_fence(Ordering::Release);
        outl(DOORBELL_PORT, self.vcpu);
    }

    /// Stores `value` in this vCPU's progress slot (the host may read it any time).
    pub fn set_progress(&self, value: u64) {
        // SAFETY: the progress slot is this vCPU's (entry ABI).
        unsafe { write_volatile(self.progress, value) }
    }

    /// Asks the host for a heartbeat every `ms` (0 turns it off).
    pub fn heartbeat(&self, ms: u32) {
        outl(HEARTBEAT_CONFIG_PORT, ms);
    }
    /// A heartbeat ping.
    pub fn ping(&self) {
        outl(HEARTBEAT_PING_PORT, 1);
    }
    /// Reports the guest's version (guest info).
    pub fn guest_info(&self, version: u32) {
        outl(GUEST_INFO_PORT, version);
    }

    /// Rings the doorbell, reports done; the vCPU is not run again.
    pub fn finish(&self) -> ! {
        report_done(self.vcpu)
    }
}

/// Parses `123`, `0x7b`, `20k`, `40M`, `1G` (`_` ignored); `None` on anything else.
pub fn parse_u64(v: &str) -> Option<u64> {
    let mut digits = [0u8; 32];
    let mut n = 0;
    for b in v.bytes().filter(|&b| b != b'_') {
        *digits.get_mut(n)? = b;
        n += 1;
    }
    let s = core::str::from_utf8(&digits[..n]).ok()?;
    if let Some(hex) = s.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok();
    }
    let (num, mul) = match s.as_bytes().last()? {
        b'k' => (&s[..s.len() - 1], 1_000),
        b'M' => (&s[..s.len() - 1], 1_000_000),
        b'G' => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// FNV-1a 64 (the file-name hash of a PANIC record).
pub const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// Where the entry registers go (System V: rdi, rsi, rdx, rcx, r8, r9).
extern "C" fn rust_start(
    vcpu: u64,
    vcpus: u64,
    ring: u64,
    data: u64,
    data_size: u64,
    progress: u64,
) -> ! {
    let vcpu = vcpu as u32;
    VCPU.store(vcpu, Ordering::Relaxed);
    if vcpu != 0 {
        report_done(vcpu);
    }
    // SAFETY: the monitor writes the boot-info page once at power-on, and nothing writes it
    // afterwards; `parse` bounds every count and length in it.
    let page: &'static [u8] = unsafe {
        core::slice::from_raw_parts(BOOT_INFO_ADDR as *const u8, BOOT_INFO_SIZE as usize)
    };
    let boot = BootInfo::parse(page).ok();
    // The heap: this vCPU's data area, when it is where the layout says and inside RAM.
    let mem_end = boot.as_ref().map_or(u64::MAX, |b| b.mem_bytes);
    let heap_ok = data >= DATA_BASE
        && data_size >= 4096
        && data
            .checked_add(data_size)
            .is_some_and(|end| end <= mem_end)
        && usize::try_from(data_size).is_ok();
    if heap_ok {
        // SAFETY: the data area is RAM that belongs to this vCPU alone and nothing else uses.
        unsafe { HEAP.lock().init(data as *mut u8, data_size as usize) };
    }
    // SAFETY: the ring is this vCPU's (entry ABI).
    let head = unsafe { read_volatile((ring + RING_HEAD) as *const u64) };
    let env = Env {
        vcpu,
        vcpus: vcpus as u32,
        ring: ring as *mut u8,
        data,
        data_size,
        heap_size: if heap_ok { data_size } else { 0 },
        progress: progress as *mut u64,
        head: Cell::new(head),
        seq: Cell::new(0),
        batch: Cell::new(DEFAULT_BATCH),
        boot,
        tsc0: rdtsc(),
    };
    ENV.store(&env as *const Env as *mut Env, Ordering::Release);
    // SAFETY: defined by `entry!` in the guest binary with this signature.
    unsafe { __tandem_main(&env) };
    env.finish()
}

/// A fixed buffer that keeps the first `N` bytes written to it.
struct TextBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> core::fmt::Write for TextBuf<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let env = ENV.load(Ordering::Acquire);
    if env.is_null() || PANICKING.swap(true, Ordering::AcqRel) {
        // Before `main`, or a panic while reporting one: just stop.
        report_done(VCPU.load(Ordering::Relaxed));
    }
    // SAFETY: `ENV` points at `rust_start`'s frame, which never returns and sits below us on
    // this stack.
    let env = unsafe { &*env };
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    let mut text = TextBuf::<PANIC_TEXT_MAX> {
        buf: [0; PANIC_TEXT_MAX],
        len: 0,
    };
    let _ = write!(text, "{file}:{line}: {}", info.message());
    env.emit(kind::PANIC, u64::from(line), fnv1a(file.as_bytes()));
    for chunk in text.buf[..text.len].chunks(16) {
        let mut b = [0u8; 16];
        b[..chunk.len()].copy_from_slice(chunk);
        let word = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        env.emit(kind::PANIC_TEXT, word(0), word(8));
    }
    env.finish()
}

/// The personality routine the precompiled `core` may name; never called (panic = abort).
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
