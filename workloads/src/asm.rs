//! Code generation for the workload guests.
//!
//! Register use (both workloads), after the prologue:
//!
//! | reg   | meaning                                  |
//! |-------|------------------------------------------|
//! | `rdi` | vCPU id (from the entry ABI)             |
//! | `r9`  | progress slot (from the entry ABI)       |
//! | `r12` | output ring                              |
//! | `r13` | ring head (records produced)             |
//! | `r14` | record sequence number                   |
//! | `rbx` | running checksum                         |
//! | `rcx` | iteration count                          |
//! | `r15` | iterations left until the next record    |
//!
//! `emit` takes kind in `r8d`, value `rbx`, aux `rcx`; it clobbers `rax` and `rdx`.

use guest_abi::ring::{kind, RECORD_SIZE, RING_HEAD, RING_RECORDS, RING_SLOTS, RING_TAIL};
use iced_x86::code_asm::*;
use monitor::layout::{
    DONE_PORT, DOORBELL_PORT, GUEST_INFO_PORT, HEARTBEAT_CONFIG_PORT, HEARTBEAT_PING_PORT,
    IDT_ADDR, KERNEL_CS,
};

use crate::{Error, Workload, MIX, SEED, WORD_MIX};

fn e(err: IcedError) -> Error {
    Error::Asm(err.to_string())
}

/// `out DOORBELL_PORT, eax` with `eax` = vCPU id.
fn doorbell(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, edi)?;
    a.mov(edx, DOORBELL_PORT as u32)?;
    a.out(dx, eax)
}

/// The `emit` subroutine.
fn emit_sub(a: &mut CodeAssembler, label: &mut CodeLabel, batch: u64) -> Result<(), IcedError> {
    let mut spin = a.create_label();
    let mut space = a.create_label();
    let mut done = a.create_label();
    a.set_label(label)?;
    // Ring full? Ring the doorbell once, then spin until the host moved the tail.
    a.mov(rax, r13)?;
    a.sub(rax, qword_ptr(r12 + RING_TAIL as i32))?;
    a.cmp(rax, RING_SLOTS as i32)?;
    a.jb(space)?;
    doorbell(a)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.mov(rax, r13)?;
    a.sub(rax, qword_ptr(r12 + RING_TAIL as i32))?;
    a.cmp(rax, RING_SLOTS as i32)?;
    a.jae(spin)?;
    a.set_label(&mut space)?;
    a.mov(rax, r13)?;
    a.and(rax, (RING_SLOTS - 1) as i32)?;
    a.shl(rax, RECORD_SIZE.trailing_zeros())?;
    a.lea(rax, qword_ptr(r12 + rax + RING_RECORDS as i32))?;
    a.mov(dword_ptr(rax), edi)?;
    a.mov(dword_ptr(rax + 4), r8d)?;
    a.mov(qword_ptr(rax + 8), r14)?;
    a.mov(qword_ptr(rax + 16), rbx)?;
    a.mov(qword_ptr(rax + 24), rcx)?;
    a.inc(r14)?;
    a.inc(r13)?;
    a.mov(qword_ptr(r12 + RING_HEAD as i32), r13)?;
    a.test(r13, (batch - 1) as i32)?;
    a.jnz(done)?;
    doorbell(a)?;
    a.set_label(&mut done)?;
    a.ret()?;
    Ok(())
}

/// Reports guest version 1 and asks for a heartbeat every `hb_ms`.
fn heartbeat_setup(a: &mut CodeAssembler, hb_ms: u64) -> Result<(), IcedError> {
    a.mov(eax, 1u32)?;
    a.mov(edx, GUEST_INFO_PORT as u32)?;
    a.out(dx, eax)?;
    a.mov(eax, hb_ms as u32)?;
    a.mov(edx, HEARTBEAT_CONFIG_PORT as u32)?;
    a.out(dx, eax)
}

fn prologue(a: &mut CodeAssembler, record_every: u64) -> Result<(), IcedError> {
    a.mov(r12, rdx)?;
    a.mov(r13, qword_ptr(r12 + RING_HEAD as i32))?;
    a.xor(r14d, r14d)?;
    a.lea(rbx, qword_ptr(rdi + 1))?;
    a.mov(rax, SEED)?;
    a.imul_2(rbx, rax)?;
    a.mov(r15, record_every)?;
    Ok(())
}

/// After an iteration: publish progress, count down to the next record.
fn iteration_tail(
    a: &mut CodeAssembler,
    emit: CodeLabel,
    record_every: u64,
    iters: u64,
    top: CodeLabel,
) -> Result<(), IcedError> {
    let mut next = a.create_label();
    a.inc(rcx)?;
    a.mov(qword_ptr(r9), rcx)?;
    a.dec(r15)?;
    a.jnz(next)?;
    a.mov(r8d, kind::PROGRESS)?;
    a.call(emit)?;
    a.mov(r15, record_every)?;
    a.set_label(&mut next)?;
    a.mov(rax, iters)?;
    a.cmp(rcx, rax)?;
    a.jb(top)?;
    Ok(())
}

fn epilogue(a: &mut CodeAssembler, emit: CodeLabel) -> Result<(), IcedError> {
    let mut hang = a.create_label();
    a.mov(r8d, kind::DONE)?;
    a.call(emit)?;
    doorbell(a)?;
    a.mov(edx, DONE_PORT as u32)?;
    a.out(dx, eax)?;
    a.set_label(&mut hang)?;
    a.pause()?;
    a.jmp(hang)?;
    Ok(())
}

/// Writes IDT gate `vector` → `handler` (64-bit interrupt gate, selector 0x08) from CPL3:
/// IDT memory is user-writable; only IDTR is privileged, and the monitor set it.
fn gate(
    a: &mut CodeAssembler,
    vector: u64,
    handler: CodeLabel,
    dpl3: bool,
) -> Result<(), IcedError> {
    a.lea(rax, ptr(handler))?;
    a.mov(rdx, IDT_ADDR + vector * 16)?;
    a.mov(word_ptr(rdx), ax)?;
    a.mov(word_ptr(rdx + 2), u32::from(KERNEL_CS))?;
    a.mov(byte_ptr(rdx + 4), 0u32)?;
    a.mov(byte_ptr(rdx + 5), if dpl3 { 0xeeu32 } else { 0x8eu32 })?;
    a.shr(rax, 16)?;
    a.mov(word_ptr(rdx + 6), ax)?;
    a.mov(dword_ptr(rdx + 8), 0u32)?;
    a.mov(dword_ptr(rdx + 12), 0u32)
}

/// `wrmsr` of `value` (≤ 32 bits) to `msr`.
fn wrmsr(a: &mut CodeAssembler, msr: u32, value: u32) -> Result<(), IcedError> {
    a.mov(ecx, msr)?;
    a.mov(eax, value)?;
    a.xor(edx, edx)?;
    a.wrmsr()
}

const X2APIC_EOI: u32 = 0x80b;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_TMICT: u32 = 0x838;
const X2APIC_TDCR: u32 = 0x83e;
const IA32_APIC_BASE: u32 = 0x1b;
const TIMER_VECTOR: u64 = 0x20;
const SETUP_VECTOR: u64 = 0x80;
const SPURIOUS_VECTOR: u64 = 0xff;

/// The `ticker` guest: a CPL3 compute loop whose records carry the tick count that a short
/// CPL0 LAPIC-timer handler keeps at `gs:[8]` (the vCPU's progress slot + 8).
fn ticker(a: &mut CodeAssembler, p: &crate::TickerParams) -> Result<(), IcedError> {
    let mut emit = a.create_label();
    let mut top = a.create_label();
    let mut next = a.create_label();
    let mut timer = a.create_label();
    let mut setup = a.create_label();
    let mut spurious = a.create_label();
    let mut eoi = a.create_label();

    prologue(a, p.record_every)?;
    gate(a, TIMER_VECTOR, timer, false)?;
    gate(a, SETUP_VECTOR, setup, true)?;
    gate(a, SPURIOUS_VECTOR, spurious, false)?;
    if p.hb_ms > 0 {
        heartbeat_setup(a, p.hb_ms)?;
    }
    // The LAPIC counts at 1 GHz in KVM (divide by 1): the period in ns is the count.
    a.mov(eax, (p.tick_us * 1000) as u32)?;
    a.int(SETUP_VECTOR as u32)?;
    a.sti()?;
    a.xor(ecx, ecx)?;
    a.mov(r10, MIX)?;
    a.set_label(&mut top)?;
    a.xor(rbx, rcx)?;
    a.rol(rbx, 13)?;
    a.imul_2(rbx, r10)?;
    a.inc(rcx)?;
    a.mov(qword_ptr(r9), rcx)?;
    a.dec(r15)?;
    a.jnz(next)?;
    a.push(rcx)?;
    a.mov(rcx, qword_ptr(r9 + 8))?;
    a.mov(r8d, kind::TICK)?;
    a.call(emit)?;
    a.pop(rcx)?;
    a.mov(r15, p.record_every)?;
    a.set_label(&mut next)?;
    a.mov(rax, p.iters)?;
    a.cmp(rcx, rax)?;
    a.jb(top)?;
    a.cli()?;
    if p.hb_ms > 0 {
        a.xor(eax, eax)?;
        a.mov(edx, HEARTBEAT_CONFIG_PORT as u32)?;
        a.out(dx, eax)?;
    }
    // The done record carries the final tick count.
    a.mov(rcx, qword_ptr(r9 + 8))?;
    epilogue(a, emit)?;

    // CPL0: the timer interrupt. Count, ping the heartbeat every 16 ticks, EOI.
    a.set_label(&mut timer)?;
    a.push(rax)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.inc(qword_ptr(8).gs())?;
    a.mov(rax, qword_ptr(8).gs())?;
    a.test(al, 15)?;
    a.jnz(eoi)?;
    if p.hb_ms > 0 {
        a.mov(edx, HEARTBEAT_PING_PORT as u32)?;
        a.out(dx, al)?;
    }
    a.set_label(&mut eoi)?;
    wrmsr(a, X2APIC_EOI, 0)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.iretq()?;

    // CPL0: `int 0x80` with eax = period: x2APIC on, periodic timer on TIMER_VECTOR.
    a.set_label(&mut setup)?;
    a.push(rax)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.mov(ecx, IA32_APIC_BASE)?;
    a.rdmsr()?;
    a.or(eax, 0xc00)?;
    a.wrmsr()?;
    wrmsr(a, X2APIC_SVR, 0x100 | SPURIOUS_VECTOR as u32)?;
    wrmsr(a, X2APIC_TDCR, 0xb)?;
    wrmsr(a, X2APIC_LVT_TIMER, TIMER_VECTOR as u32 | 1 << 17)?;
    a.mov(rax, qword_ptr(rsp + 16))?;
    a.mov(ecx, X2APIC_TMICT)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.iretq()?;

    a.set_label(&mut spurious)?;
    a.iretq()?;

    emit_sub(a, &mut emit, p.batch)
}

pub(crate) fn assemble(w: &Workload, load_addr: u64) -> Result<Vec<u8>, Error> {
    let mut a = CodeAssembler::new(64).map_err(e)?;
    let mut emit = a.create_label();
    let mut top = a.create_label();
    let build = |a: &mut CodeAssembler, emit: &mut CodeLabel, top: &mut CodeLabel| {
        match w {
            Workload::Ticker(p) => ticker(a, p),
            Workload::Counter(p) => {
                prologue(a, p.record_every)?;
                let hb = p.hb_ms > 0;
                if hb {
                    // rbp counts down to the next ping.
                    heartbeat_setup(a, p.hb_ms)?;
                    a.mov(rbp, p.hb_every)?;
                }
                a.xor(ecx, ecx)?;
                a.mov(r10, MIX)?;
                a.set_label(top)?;
                a.xor(rbx, rcx)?;
                a.rol(rbx, 13)?;
                a.imul_2(rbx, r10)?;
                if hb {
                    let mut skip = a.create_label();
                    let mut ping = a.create_label();
                    a.dec(rbp)?;
                    a.jnz(skip)?;
                    a.mov(rbp, p.hb_every)?;
                    if p.stall_iters > 0 {
                        // No pings for iterations stall_at .. stall_at + stall_iters.
                        a.mov(rax, p.stall_at)?;
                        a.cmp(rcx, rax)?;
                        a.jb(ping)?;
                        a.mov(rax, p.stall_at.saturating_add(p.stall_iters))?;
                        a.cmp(rcx, rax)?;
                        a.jb(skip)?;
                    }
                    a.set_label(&mut ping)?;
                    a.mov(edx, HEARTBEAT_PING_PORT as u32)?;
                    a.out(dx, eax)?;
                    a.set_label(&mut skip)?;
                    a.nop()?;
                }
                iteration_tail(a, *emit, p.record_every, p.iters, *top)?;
                if hb {
                    a.xor(eax, eax)?;
                    a.mov(edx, HEARTBEAT_CONFIG_PORT as u32)?;
                    a.out(dx, eax)?;
                }
                epilogue(a, *emit)?;
                emit_sub(a, emit, p.batch)
            }
            Workload::Dirty(p) => {
                // rsi page index, r10 offset in page, r11 data base, rbp write counter j,
                // r8 pages left in this iteration.
                a.mov(r11, rcx)?;
                prologue(a, p.record_every)?;
                a.xor(ecx, ecx)?;
                a.xor(esi, esi)?;
                a.xor(r10d, r10d)?;
                a.xor(ebp, ebp)?;
                let npages = p.ws_pages();
                let mut inner = a.create_label();
                let mut nowrap = a.create_label();
                a.set_label(top)?;
                a.mov(r8, p.pages)?;
                a.set_label(&mut inner)?;
                a.mov(rax, rsi)?;
                a.shl(rax, 12)?;
                a.add(rax, r11)?;
                a.add(rax, r10)?;
                a.mov(rdx, qword_ptr(rax))?;
                a.imul_3(rdx, rdx, WORD_MIX as i32)?;
                a.add(rdx, rbp)?;
                a.mov(qword_ptr(rax), rdx)?;
                a.rol(rbx, 7)?;
                a.xor(rbx, rdx)?;
                a.inc(rbp)?;
                a.inc(rsi)?;
                a.mov(rax, npages)?;
                a.cmp(rsi, rax)?;
                a.jb(nowrap)?;
                a.xor(esi, esi)?;
                a.add(r10, 8)?;
                a.and(r10, 4095)?;
                a.set_label(&mut nowrap)?;
                a.dec(r8)?;
                a.jnz(inner)?;
                iteration_tail(a, *emit, p.record_every, p.iters, *top)?;
                epilogue(a, *emit)?;
                emit_sub(a, emit, p.batch)
            }
        }
    };
    build(&mut a, &mut emit, &mut top).map_err(e)?;
    a.assemble(load_addr).map_err(e)
}
