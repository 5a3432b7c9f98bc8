//! Where things are for one VM: [`Layout`] computes per-vCPU addresses and the identity map
//! from the guest ABI (`guest_abi::layout`, re-exported here).

pub use guest_abi::layout::*;

use crate::Error;

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
        // The virtio-mmio windows: one uncached 2 MiB user page above all RAM, with no memslot
        // behind it, so every access exits to the devices (MMIO works from CPL3 on KVM-PVM).
        const UNCACHED: u64 = 0x18; // PCD | PWT
        out.push((
            PDPT_ADDR + (MMIO_BASE >> 30) * 8,
            MMIO_PD_ADDR | PRESENT_RW_USER,
        ));
        out.push((MMIO_PD_ADDR, MMIO_BASE | PRESENT_RW_USER | HUGE | UNCACHED));
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
    fn mmio_windows_are_mapped_above_ram() {
        let l = Layout::new(MAX_MEM_MIB, 1).unwrap();
        let e = l.page_table_entries();
        assert!(e.contains(&(PDPT_ADDR + 16 * 8, MMIO_PD_ADDR | 0x7)));
        assert!(e
            .iter()
            .any(|&(a, v)| a == MMIO_PD_ADDR && v & !0xfff == MMIO_BASE));
        assert!(l.mem_bytes <= MMIO_BASE);
    }

    #[test]
    fn identity_map_covers_all_ram() {
        let l = Layout::new(2048 + 2, 1).unwrap();
        let e = l.page_table_entries();
        let huge = e
            .iter()
            .filter(|(a, v)| v & 0x80 != 0 && *a < MMIO_PD_ADDR)
            .count() as u64;
        assert_eq!(huge, l.mem_bytes / HUGE_PAGE_SIZE);
        // the last 2 MiB page sits in the third page directory
        assert!(e
            .iter()
            .any(|&(a, v)| a == PD_ADDR + 2 * PAGE_SIZE && v & !0xfff == 2048 << 20));
    }
}
