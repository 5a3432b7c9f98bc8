//! Loading a guest image into guest memory: an ELF64 executable (the Rust guests of
//! `guests/`, embedded by the `guest-images` crate) or a flat binary (the asm workloads).
//!
//! [`load`] tells them apart by the ELF magic. Everything an ELF image says is checked before
//! a byte is written (see [`parse_elf`]):
//!
//! * the header: ELF64, little endian, version 1, `ET_EXEC`, x86-64, 56-byte program headers,
//!   1 ..= [`MAX_PHNUM`] of them, all inside the file;
//! * every `PT_LOAD` segment: `p_filesz <= p_memsz`, its file bytes inside the file,
//!   `p_vaddr == p_paddr` (RAM is identity-mapped), `p_paddr .. p_paddr + p_memsz` inside the
//!   image area [`LOAD_ADDR`]`..`[`STACK_BASE`] (0x200000..0x400000), no two overlapping;
//! * no `PT_INTERP`/`PT_DYNAMIC` (a static executable only) and no `PT_TLS`;
//! * the entry point inside a loaded executable (`PF_X`) segment.
//!
//! The bytes are then copied by rust-vmm's `linux-loader` (`loader::elf::Elf`, a
//! `KernelLoader`), which loads each `PT_LOAD` segment's file bytes at its `p_paddr` (no
//! `kernel_offset`) and checks `e_entry >= highmem_start`, which we pass as the image area's
//! start. That loader is written for vmlinux: it checks neither the class, the machine, the
//! type, nor where the segments land, and it does not clear `.bss`; hence the checks above,
//! and the zeroing of `p_filesz .. p_memsz` after it.
//!
//! Flat images keep the rules `Vm::load_image` has always had ([`load_flat`]): 1 byte ..
//! [`MAX_IMAGE_SIZE`], all inside the image area.
//!
//! The entry point must be known before `Vm::new` (it goes into `VmConfig::entry`):
//! [`entry_point`] gives the same answer as [`load`] without touching memory.

use std::io::Cursor;

use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{LOAD_ADDR, MAX_IMAGE_SIZE, STACK_BASE};
use crate::shared::GuestMem;
use crate::{Error, Result};

/// The first four bytes of every ELF file.
pub const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// Most program headers an image may have.
pub const MAX_PHNUM: u16 = 64;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EV_CURRENT: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_TLS: u32 = 7;
const PF_X: u32 = 1;

/// One `PT_LOAD` segment of a checked ELF image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Index of its program header.
    pub index: usize,
    /// Guest-physical (= virtual) address.
    pub addr: u64,
    /// Offset of its bytes in the file.
    pub file_offset: u64,
    /// Bytes copied from the file.
    pub file_size: u64,
    /// Bytes it occupies in memory (the rest is zeroed).
    pub mem_size: u64,
    /// `PF_X`.
    pub exec: bool,
}

/// A checked ELF image: what [`load`] will write, and where it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    /// `e_entry`.
    pub entry: u64,
    /// The non-empty `PT_LOAD` segments, in program-header order.
    pub segments: Vec<Segment>,
}

impl ElfImage {
    /// Whether `addr` lies in a loaded executable segment.
    pub fn executable(&self, addr: u64) -> bool {
        self.segments
            .iter()
            .any(|s| s.exec && addr >= s.addr && addr - s.addr < s.mem_size)
    }
}

/// Whether `bytes` start with the ELF magic.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(&ELF_MAGIC)
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Config(format!("guest image: {what}"))
}

fn not_exec(what: impl std::fmt::Display) -> Error {
    bad(format_args!("not an ELF64 x86-64 executable: {what}"))
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Checks an ELF image (every header field that matters, see the module doc) without loading
/// it.
pub fn parse_elf(bytes: &[u8]) -> Result<ElfImage> {
    if !is_elf(bytes) {
        return Err(not_exec("no ELF magic"));
    }
    if bytes.len() < EHDR_SIZE {
        return Err(not_exec(format_args!(
            "the ELF header is truncated ({} of {EHDR_SIZE} bytes)",
            bytes.len()
        )));
    }
    let h = &bytes[..EHDR_SIZE];
    if h[4] != ELFCLASS64 {
        return Err(not_exec(format_args!(
            "class {} (want {ELFCLASS64}, ELFCLASS64)",
            h[4]
        )));
    }
    if h[5] != ELFDATA2LSB {
        return Err(not_exec(format_args!(
            "data encoding {} (want {ELFDATA2LSB}, little endian)",
            h[5]
        )));
    }
    if h[6] != EV_CURRENT || u32_at(h, 20) != u32::from(EV_CURRENT) {
        return Err(not_exec("ELF version is not 1"));
    }
    let e_type = u16_at(h, 16);
    if e_type != ET_EXEC {
        return Err(not_exec(format_args!(
            "type {e_type} (want {ET_EXEC}, ET_EXEC: link static with -no-pie)"
        )));
    }
    let machine = u16_at(h, 18);
    if machine != EM_X86_64 {
        return Err(not_exec(format_args!(
            "machine {machine} (want {EM_X86_64}, x86-64)"
        )));
    }
    let entry = u64_at(h, 24);
    let phoff = u64_at(h, 32);
    let phentsize = u16_at(h, 54);
    let phnum = u16_at(h, 56);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(not_exec(format_args!(
            "program header size {phentsize} (want {PHDR_SIZE})"
        )));
    }
    if phnum == 0 {
        return Err(not_exec("no program headers"));
    }
    if phnum > MAX_PHNUM {
        return Err(bad(format_args!(
            "{phnum} program headers (at most {MAX_PHNUM})"
        )));
    }
    let ph_bytes = u64::from(phnum) * PHDR_SIZE as u64;
    let ph_end = phoff
        .checked_add(ph_bytes)
        .filter(|&end| end <= bytes.len() as u64 && phoff >= EHDR_SIZE as u64);
    let Some(ph_end) = ph_end else {
        return Err(bad(format_args!(
            "program headers at {phoff:#x}+{ph_bytes:#x} lie outside the {}-byte file (or \
             overlap the ELF header)",
            bytes.len()
        )));
    };

    let mut segments: Vec<Segment> = Vec::new();
    for (i, ph) in bytes[phoff as usize..ph_end as usize]
        .chunks_exact(PHDR_SIZE)
        .enumerate()
    {
        let p_type = u32_at(ph, 0);
        let flags = u32_at(ph, 4);
        let (offset, vaddr, paddr) = (u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        match p_type {
            PT_LOAD => {}
            PT_INTERP | PT_DYNAMIC => {
                return Err(not_exec(format_args!(
                    "segment {i} asks for dynamic linking (link it static)"
                )))
            }
            PT_TLS => {
                return Err(bad(format_args!(
                    "segment {i} is thread-local storage, which guests cannot have"
                )))
            }
            _ => continue,
        }
        if filesz > memsz {
            return Err(bad(format_args!(
                "segment {i}: p_filesz {filesz:#x} is larger than p_memsz {memsz:#x}"
            )));
        }
        if offset
            .checked_add(filesz)
            .is_none_or(|end| end > bytes.len() as u64)
        {
            return Err(bad(format_args!(
                "segment {i}: its file bytes {offset:#x}+{filesz:#x} lie outside the {}-byte \
                 file",
                bytes.len()
            )));
        }
        if memsz == 0 {
            continue;
        }
        if vaddr != paddr {
            return Err(bad(format_args!(
                "segment {i}: p_vaddr {vaddr:#x} != p_paddr {paddr:#x} (guest memory is \
                 identity-mapped)"
            )));
        }
        let end = paddr.checked_add(memsz);
        if paddr < LOAD_ADDR || end.is_none_or(|e| e > STACK_BASE) {
            return Err(bad(format_args!(
                "segment {i} {paddr:#x}+{memsz:#x} lies outside the image area \
                 {LOAD_ADDR:#x}..{STACK_BASE:#x}"
            )));
        }
        let end = paddr + memsz;
        if let Some(o) = segments
            .iter()
            .find(|s| paddr < s.addr + s.mem_size && s.addr < end)
        {
            return Err(bad(format_args!(
                "segments {} ({:#x}+{:#x}) and {i} ({paddr:#x}+{memsz:#x}) overlap",
                o.index, o.addr, o.mem_size
            )));
        }
        segments.push(Segment {
            index: i,
            addr: paddr,
            file_offset: offset,
            file_size: filesz,
            mem_size: memsz,
            exec: flags & PF_X != 0,
        });
    }
    if segments.is_empty() {
        return Err(not_exec("no loadable segment"));
    }
    let image = ElfImage { entry, segments };
    check_entry(&image, entry)?;
    Ok(image)
}

fn check_entry(image: &ElfImage, entry: u64) -> Result<()> {
    if !image.executable(entry) {
        return Err(bad(format_args!(
            "entry point {entry:#x} is not inside a loaded executable segment"
        )));
    }
    Ok(())
}

/// Checks a flat image of `len` bytes at `addr`; returns its end. The rules of
/// `Vm::load_image`: 1 ..= [`MAX_IMAGE_SIZE`] bytes, inside the image area.
pub fn check_flat(addr: u64, len: usize) -> Result<u64> {
    let end = addr
        .checked_add(len as u64)
        .ok_or_else(|| Error::Config(format!("image at {addr:#x} of {len} bytes overflows")))?;
    if len == 0 || len as u64 > MAX_IMAGE_SIZE {
        return Err(Error::Config(format!(
            "the image is {len} bytes: it must hold 1 to {MAX_IMAGE_SIZE} bytes"
        )));
    }
    if addr < LOAD_ADDR || end > STACK_BASE {
        return Err(Error::Config(format!(
            "image {addr:#x}..{end:#x} does not fit the image area {LOAD_ADDR:#x}..{STACK_BASE:#x}"
        )));
    }
    Ok(end)
}

/// Copies a flat image to `addr` after [`check_flat`].
pub fn load_flat(mem: &GuestMem, addr: u64, image: &[u8]) -> Result<()> {
    check_flat(addr, image.len())?;
    mem.write_slice(image, GuestAddress(addr))
        .map_err(|e| Error::Memory(e.to_string()))
}

/// The entry point [`load`] would return for these arguments, checking the image but writing
/// nothing (for `VmConfig::entry`, which `Vm::new` needs before the image can be loaded).
pub fn entry_point(bytes: &[u8], load_addr: u64, entry: Option<u64>) -> Result<u64> {
    if is_elf(bytes) {
        let image = parse_elf(bytes)?;
        let e = entry.unwrap_or(image.entry);
        check_entry(&image, e)?;
        Ok(e)
    } else {
        let end = check_flat(load_addr, bytes.len())?;
        let e = entry.unwrap_or(load_addr);
        if e < load_addr || e >= end {
            return Err(bad(format_args!(
                "entry point {e:#x} is outside the loaded image {load_addr:#x}..{end:#x}"
            )));
        }
        Ok(e)
    }
}

/// Loads a guest image and returns its entry point.
///
/// * ELF (by its magic): checked by [`parse_elf`]; segments go to their own addresses
///   (`load_addr` is not used); the entry is `e_entry`, or `entry` if given (which must also
///   lie in a loaded executable segment).
/// * Otherwise flat: the bytes go to `load_addr` ([`check_flat`]); the entry is `entry` or
///   `load_addr`, and must lie inside the image.
pub fn load(mem: &GuestMem, bytes: &[u8], load_addr: u64, entry: Option<u64>) -> Result<u64> {
    let e = entry_point(bytes, load_addr, entry)?;
    if !is_elf(bytes) {
        load_flat(mem, load_addr, bytes)?;
        return Ok(e);
    }
    let image = parse_elf(bytes)?;
    Elf::load(
        mem,
        None,
        &mut Cursor::new(bytes),
        Some(GuestAddress(LOAD_ADDR)),
    )
    .map_err(|err| bad(format_args!("the ELF loader refused it: {err}")))?;
    for s in &image.segments {
        if s.mem_size > s.file_size {
            let zeros = vec![0u8; (s.mem_size - s.file_size) as usize];
            mem.write_slice(&zeros, GuestAddress(s.addr + s.file_size))
                .map_err(|e| Error::Memory(e.to_string()))?;
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    const CODE: [u8; 4] = [0xf4, 0xeb, 0xfd, 0x90]; // hlt; jmp -3; nop

    /// A minimal static ELF64 x86-64 executable: header, `phnum` program headers (the first a
    /// PT_LOAD r-x at 0x200000 holding CODE, the rest PT_NULL), then CODE.
    fn elf(phnum: u16) -> Vec<u8> {
        let code_off = EHDR_SIZE + PHDR_SIZE * usize::from(phnum);
        let mut b = vec![0u8; code_off];
        b[..4].copy_from_slice(&ELF_MAGIC);
        b[4] = ELFCLASS64;
        b[5] = ELFDATA2LSB;
        b[6] = EV_CURRENT;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&phnum.to_le_bytes());
        b.extend_from_slice(&CODE);
        set_ph(&mut b, 0, PT_LOAD, 5, code_off as u64, 0x20_0000, 4, 0x100);
        b
    }

    #[allow(clippy::too_many_arguments)]
    fn set_ph(
        b: &mut [u8],
        i: usize,
        ty: u32,
        flags: u32,
        off: u64,
        addr: u64,
        fsz: u64,
        msz: u64,
    ) {
        let p = EHDR_SIZE + PHDR_SIZE * i;
        b[p..p + 4].copy_from_slice(&ty.to_le_bytes());
        b[p + 4..p + 8].copy_from_slice(&flags.to_le_bytes());
        b[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
        b[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes());
        b[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes());
        b[p + 32..p + 40].copy_from_slice(&fsz.to_le_bytes());
        b[p + 40..p + 48].copy_from_slice(&msz.to_le_bytes());
        b[p + 48..p + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    }

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    fn err(bytes: &[u8]) -> String {
        match load(&mem(), bytes, LOAD_ADDR, None) {
            Err(Error::Config(m)) => m,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    #[test]
    fn a_good_elf_loads_with_its_bss_cleared() {
        let m = mem();
        m.write_slice(&[0xaa; 0x100], GuestAddress(0x20_0000))
            .unwrap();
        let b = elf(1);
        assert_eq!(entry_point(&b, LOAD_ADDR, None).unwrap(), 0x20_0000);
        assert_eq!(load(&m, &b, LOAD_ADDR, None).unwrap(), 0x20_0000);
        let mut got = [0u8; 0x100];
        m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&got[..4], &CODE);
        assert!(got[4..].iter().all(|&x| x == 0), "bss is zeroed");
        // An explicit entry inside the segment is taken; outside it is refused.
        assert_eq!(load(&m, &b, LOAD_ADDR, Some(0x20_0001)).unwrap(), 0x20_0001);
        assert!(load(&m, &b, LOAD_ADDR, Some(0x20_0100)).is_err());
        // Non-load headers (PT_NULL here) are ignored.
        assert_eq!(load(&m, &elf(3), LOAD_ADDR, None).unwrap(), 0x20_0000);
        assert!(m.num_regions() == 1);
    }

    #[test]
    fn header_problems_are_named() {
        let b = elf(1);
        assert!(err(&b[..40]).contains("truncated (40 of 64 bytes)"));
        let mut x = b.clone();
        x[4] = 1;
        assert!(err(&x).contains("not an ELF64 x86-64 executable: class 1"));
        let mut x = b.clone();
        x[5] = 2;
        assert!(err(&x).contains("little endian"));
        let mut x = b.clone();
        x[18] = 3; // EM_386
        assert!(err(&x).contains("machine 3"));
        let mut x = b.clone();
        x[16] = 3; // ET_DYN
        assert!(err(&x).contains("ET_EXEC"));
        let mut x = b.clone();
        x[54] = 32;
        assert!(err(&x).contains("program header size 32"));
        let mut x = b.clone();
        x[56..58].copy_from_slice(&0u16.to_le_bytes());
        assert!(err(&x).contains("no program headers"));
    }

    #[test]
    fn a_huge_or_misplaced_program_header_table_is_refused() {
        let mut x = elf(1);
        x[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(err(&x).contains("65535 program headers (at most 64)"));
        let mut x = elf(1);
        x[56..58].copy_from_slice(&64u16.to_le_bytes());
        assert!(err(&x).contains("lie outside the"));
        let mut x = elf(1);
        x[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&x).contains("lie outside the"));
    }

    #[test]
    fn segment_problems_are_named() {
        let off = (EHDR_SIZE + PHDR_SIZE) as u64;
        let case = |ty, flags, o, addr, fsz, msz| {
            let mut b = elf(2);
            set_ph(&mut b, 1, ty, flags, o, addr, fsz, msz);
            err(&b)
        };
        let off2 = off + PHDR_SIZE as u64;
        // Outside the image area, below and above, and wrapping around.
        assert!(case(PT_LOAD, 6, off2, 0x1000, 4, 4)
            .contains("segment 1 0x1000+0x4 lies outside the image area 0x200000..0x400000"));
        assert!(case(PT_LOAD, 6, off2, 0x3f_fff0, 4, 0x20).contains("outside the image area"));
        assert!(case(PT_LOAD, 6, off2, 0x30_0000, 4, u64::MAX).contains("outside the image area"));
        // p_filesz larger than p_memsz; file bytes beyond the file; overflowing offset.
        assert!(case(PT_LOAD, 6, off2, 0x30_0000, 8, 4)
            .contains("p_filesz 0x8 is larger than p_memsz 0x4"));
        assert!(case(PT_LOAD, 6, off2, 0x30_0000, 0x1000, 0x1000).contains("lie outside the"));
        assert!(case(PT_LOAD, 6, u64::MAX, 0x30_0000, 2, 2).contains("lie outside the"));
        // Overlapping the first segment.
        assert!(case(PT_LOAD, 6, off2, 0x20_0080, 4, 4)
            .contains("segments 0 (0x200000+0x100) and 1 (0x200080+0x4) overlap"));
        // Dynamic linking and TLS.
        assert!(case(PT_INTERP, 4, off2, 0, 0, 0).contains("dynamic linking"));
        assert!(case(PT_TLS, 4, off2, 0x30_0000, 0, 8).contains("thread-local"));
        // vaddr != paddr.
        let mut b = elf(1);
        let p = EHDR_SIZE;
        b[p + 16..p + 24].copy_from_slice(&0x30_0000u64.to_le_bytes());
        assert!(err(&b).contains("p_vaddr 0x300000 != p_paddr 0x200000"));
    }

    #[test]
    fn the_entry_must_be_in_a_loaded_executable_segment() {
        let mut b = elf(1);
        b[24..32].copy_from_slice(&0x30_0000u64.to_le_bytes());
        assert!(err(&b).contains("entry point 0x300000 is not inside a loaded executable segment"));
        // In the segment, but the segment is not executable.
        let mut b = elf(1);
        let p = EHDR_SIZE;
        b[p + 4..p + 8].copy_from_slice(&6u32.to_le_bytes());
        assert!(err(&b).contains("not inside a loaded executable segment"));
        // Below the image area (linux-loader would refuse it too).
        let mut b = elf(1);
        b[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        assert!(err(&b).contains("entry point 0x1000"));
    }

    #[test]
    fn flat_images_load_as_before() {
        let m = mem();
        assert_eq!(load(&m, &CODE, LOAD_ADDR, None).unwrap(), LOAD_ADDR);
        let mut got = [0u8; 4];
        m.read_slice(&mut got, GuestAddress(LOAD_ADDR)).unwrap();
        assert_eq!(got, CODE);
        assert_eq!(
            load(&m, &CODE, 0x30_0000, Some(0x30_0002)).unwrap(),
            0x30_0002
        );
        assert!(err(&[]).contains("it must hold 1 to"));
        assert!(err(&vec![0u8; MAX_IMAGE_SIZE as usize + 1]).contains("it must hold 1 to"));
        assert!(
            matches!(load(&m, &CODE, 0x1000, None), Err(Error::Config(e)) if e.contains("does not fit the image area"))
        );
        assert!(
            matches!(load(&m, &CODE, u64::MAX - 1, None), Err(Error::Config(e)) if e.contains("overflows"))
        );
        assert!(
            matches!(load(&m, &CODE, LOAD_ADDR, Some(LOAD_ADDR + 4)), Err(Error::Config(e)) if e.contains("outside the loaded image"))
        );
    }
}
