//! A vCPU's KVM statistics (`KVM_GET_STATS_FD`, the binary stats API): page faults taken and
//! fixed, exits, … as KVM counts them. Used by `cargo xtask bench tracking` to count the write
//! faults each dirty-tracking mode costs the guest (they never reach userspace).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};

use crate::{Error, Result};

mod ioctls {
    #![allow(missing_docs)]
    // KVM_GET_STATS_FD = _IO(KVMIO, 0xce).
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}

/// One vCPU's statistics file.
pub struct KvmStats {
    fd: OwnedFd,
    /// (name, byte offset of its first value in the file).
    counters: Vec<(String, u64)>,
}

fn pread(fd: &OwnedFd, buf: &mut [u8], at: u64) -> Result<()> {
    // SAFETY: reads at most buf.len() bytes into `buf` from a valid fd.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            at as i64,
        )
    };
    if n != buf.len() as isize {
        return Err(Error::Host(format!(
            "reading KVM statistics: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

impl KvmStats {
    fn open(fd: &impl AsRawFd) -> Result<KvmStats> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd (or -1).
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), ioctls::KVM_GET_STATS_FD() as _) };
        if raw < 0 {
            return Err(Error::Host(format!(
                "KVM_GET_STATS_FD: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `raw` is a fresh fd that this process owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut h = [0u8; std::mem::size_of::<kvm_stats_header>()];
        pread(&fd, &mut h, 0)?;
        let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        let (name_size, num_desc, desc_offset, data_offset) =
            (u32_at(&h, 4), u32_at(&h, 8), u32_at(&h, 16), u32_at(&h, 20));
        let desc_len = std::mem::size_of::<kvm_stats_desc>() + name_size as usize;
        let mut d = vec![0u8; desc_len * num_desc as usize];
        pread(&fd, &mut d, u64::from(desc_offset))?;
        let counters = d
            .chunks(desc_len)
            .map(|c| {
                let offset = u32_at(c, 8);
                let name = &c[16..];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                (
                    String::from_utf8_lossy(&name[..end]).into_owned(),
                    u64::from(data_offset) + u64::from(offset),
                )
            })
            .collect();
        Ok(KvmStats { fd, counters })
    }

    /// The names KVM offers.
    pub fn names(&self) -> Vec<&str> {
        self.counters.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The current value of counter `name` (its first value, for histograms).
    pub fn get(&self, name: &str) -> Result<u64> {
        let (_, at) = self
            .counters
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::Host(format!("KVM has no statistic {name:?}")))?;
        let mut b = [0u8; 8];
        pread(&self.fd, &mut b, *at)?;
        Ok(u64::from_ne_bytes(b))
    }
}

impl crate::Vm {
    /// vCPU `id`'s KVM statistics (readable from any thread, while it runs).
    pub fn vcpu_kvm_stats(&self, id: u32) -> Result<KvmStats> {
        self.call_on(id, |ctx| KvmStats::open(&ctx.fd))?
    }
}
