//! `stall-probe`: spins reading the TSC and records every gap between two consecutive reads
//! that is longer than a threshold (the vCPU was not running: a host exit, a stun, a
//! checkpoint, preemption of its thread).
//!
//! Arguments: `ms` (default 1000) how long to run; `threshold_us` (default 50); `max`
//! (default 1000) most STALL records (gaps beyond it are still counted); `hb_ms` (default 0)
//! heartbeat interval: when set, the probe configures the heartbeat and pings every
//! `hb_ms / 2`; `hot_kib` (default 0) a hot set: every loop iteration also writes one qword
//! into the next page of the first `hot_kib` KiB of the data area (cycling), so the probe
//! dirties that set as fast as it runs — the memory a replication epoch must copy — and the
//! iteration count measures the guest's throughput.
//!
//! Records (kinds from `tandem_rt::kinds`):
//!
//! ```text
//! STALL_INFO     value = TSC kHz             aux = threshold in ns
//! STALL          value = gap in ns           aux = start of the gap, ns since the probe began
//! STALL_SUMMARY  value = largest gap in ns   aux = gaps over the threshold
//! DONE (2)       value = elapsed ns          aux = TSC reads (loop iterations)
//! ```
//!
//! Needs the TSC frequency in the boot-info page (panics without it).
#![no_std]
#![no_main]

use tandem_rt::{entry, kind, kinds, rdtsc, Env};

entry!(main);

fn main(env: &Env) {
    let khz = env.tsc_khz();
    assert!(khz != 0, "the boot-info page has no TSC frequency");
    let ms = env.arg_u64("ms", 1000);
    let threshold_ns = env.arg_u64("threshold_us", 50).saturating_mul(1000);
    let max = env.arg_u64("max", 1000);
    let hb_ms = env.arg_u64("hb_ms", 0).min(u64::from(u32::MAX)) as u32;
    env.emit(kinds::STALL_INFO, khz, threshold_ns);
    env.doorbell();
    if hb_ms != 0 {
        env.heartbeat(hb_ms);
    }
    let (data, data_size) = env.data_area();
    let hot_pages = (env
        .arg_u64("hot_kib", 0)
        .saturating_mul(1024)
        .min(data_size)
        / 4096) as usize;
    let hot = data as *mut u64;
    let mut page = 0usize;
    let threshold = env.ns_to_ticks(threshold_ns).max(1);
    let ping_every = env.ns_to_ticks(u64::from(hb_ms) * 500_000).max(1);
    let start = rdtsc();
    let end = start.saturating_add(env.ns_to_ticks(ms.saturating_mul(1_000_000)));
    let mut last = start;
    let mut next_ping = start.saturating_add(ping_every);
    let (mut gaps, mut largest, mut iters) = (0u64, 0u64, 0u64);
    loop {
        let now = rdtsc();
        iters += 1;
        if hot_pages != 0 {
            // SAFETY: page < hot_pages, and hot_pages pages fit in this vCPU's data area, which
            // the runtime maps writable for this vCPU alone (the probe allocates nothing).
            unsafe { hot.add(page * 512).write_volatile(iters) };
            page += 1;
            if page == hot_pages {
                page = 0;
            }
        }
        let gap = now.wrapping_sub(last);
        if gap > threshold && now > last {
            gaps += 1;
            largest = largest.max(gap);
            if gaps <= max {
                // The emit itself may exit to the host (a doorbell): measure from after it.
                env.emit(
                    kinds::STALL,
                    env.ticks_to_ns(gap),
                    env.ticks_to_ns(last - start),
                );
                last = rdtsc();
                continue;
            }
        }
        if hb_ms != 0 && now >= next_ping {
            env.ping();
            next_ping = now.saturating_add(ping_every);
            last = rdtsc();
            continue;
        }
        last = now;
        if now >= end {
            break;
        }
    }
    env.emit(kinds::STALL_SUMMARY, env.ticks_to_ns(largest), gaps);
    env.emit(kind::DONE, env.ticks_to_ns(last.wrapping_sub(start)), iters);
}
