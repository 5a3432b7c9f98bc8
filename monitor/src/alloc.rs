//! How the process's allocator treats big buffers.
//!
//! ```text
//!  every epoch, on both hosts:   frame payloads, decoded ranges, coded ranges
//!                                (up to 2 MiB each, 16 MiB and more per epoch)
//!  glibc default:   > 128 KiB (rising to 32 MiB) ─▶ mmap; free ─▶ munmap
//!                   next epoch: mmap again, one page fault + zeroing per 4 KiB touched
//!  tune_allocator:  < 64 MiB from the heap; freed memory kept (trim above 256 MiB)
//!                   next epoch: the same pages again, no fault
//! ```
//!
//! Measured (`cargo xtask bench stall --hot-mib 16 --hz 20`, five interleaved rounds,
//! BENCHMARKS.md): with the standby decoding into fresh mappings every epoch, a third of its
//! CPU went to page faults, and the guest kept 74 % of its throughput (stall p99 3.2–4.8 ms);
//! with freed buffers kept, 81 % (stall p99 2.8–2.9 ms).

/// Allocations below this size come from the heap, not from a mapping of their own.
pub const MMAP_THRESHOLD: usize = 64 << 20;
/// Freed heap memory above this much is given back to the kernel.
pub const TRIM_THRESHOLD: usize = 256 << 20;

/// Makes the allocator keep big freed buffers for reuse instead of unmapping them (see the
/// module doc). Call it once, early in `main`. Returns whether the allocator took both
/// settings (only glibc's does; elsewhere it is a no-op returning `false`).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's thresholds (a value it does not take
        // is refused with 0, nothing else happens).
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as i32) };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
