//! The physical floor a benchmark compares against, measured in the same run: how fast this
//! machine copies memory.
//!
//! ```text
//!   memcpy_gib_s   one thread, 256 MiB, best of 5        (bench stall: "the physical limit")
//!   hot_copy_ms    N pages just written, 2 MiB pieces,   (bench ft: "copy alone")
//!                  best of 21, one thread and the crew
//! ```

use std::time::Duration;

/// One thread's memcpy bandwidth on this machine, GiB/s (256 MiB, best of 5 copies).
pub fn memcpy_gib_s() -> f64 {
    const LEN: usize = 256 << 20;
    let src = vec![0x5au8; LEN];
    let mut dst = vec![0u8; LEN];
    // Touch the destination first: the first copy into fresh pages measures page faults.
    dst.copy_from_slice(&src);
    let best = (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed()
        })
        .min()
        .unwrap_or(Duration::from_secs(1));
    (LEN as f64 / (1u64 << 30) as f64) / best.as_secs_f64().max(1e-9)
}

/// What copying `pages` pages alone takes here, ms, as the epoch pause copies them: out of
/// guest memory just written (as a guest's hot set is, so partly in cache) into destination
/// buffers reused from copy to copy, in 2 MiB pieces (`monitor::dirty::MAX_RUN_PAGES`); the
/// best of 21 copies 20 ms apart (a floor), on this thread alone and shared with a
/// [`monitor::crew::Crew`] (helpers pinned to the other CPUs, woken for each copy, as the
/// pause does beyond `monitor::dirty::INLINE_COPY_BYTES`).
pub fn hot_copy_ms(pages: u64) -> (f64, f64) {
    use vm_memory::{Bytes, GuestAddress};
    const PIECE: usize = 2 << 20;
    let len = (pages as usize * 4096).max(4096);
    let Ok(mem) = monitor::GuestMem::from_ranges(&[(GuestAddress(0), len)]) else {
        return (f64::NAN, f64::NAN);
    };
    let crew = monitor::crew::Crew::new();
    let pieces: Vec<(u64, usize)> = (0..len.div_ceil(PIECE))
        .map(|i| ((i * PIECE) as u64, PIECE.min(len - i * PIECE)))
        .collect();
    let mut dst: Vec<Vec<u8>> = pieces.iter().map(|&(_, n)| vec![0u8; n]).collect();
    let mut one = Vec::new();
    let mut two = Vec::new();
    for round in 0..42u64 {
        std::thread::sleep(Duration::from_millis(20));
        // Rewrite one qword per page, as the `dirty` guest and the probe do.
        for p in 0..len as u64 / 4096 {
            let _ = mem.write_obj(p ^ round, GuestAddress(p * 4096 + (round * 8) % 4096));
        }
        let t = std::time::Instant::now();
        if round % 2 == 0 {
            for (d, &(gpa, _)) in dst.iter_mut().zip(&pieces) {
                let _ = mem.read_slice(d, GuestAddress(gpa));
            }
            one.push(t.elapsed().as_secs_f64() * 1e3);
        } else {
            let units = pieces
                .iter()
                .zip(std::mem::take(&mut dst))
                .enumerate()
                .map(|(index, (&(gpa, len), data))| monitor::crew::Unit {
                    index,
                    gpa,
                    len,
                    data,
                })
                .collect();
            let copied = crew.copy(&mem, units);
            two.push(t.elapsed().as_secs_f64() * 1e3);
            match copied {
                Ok(units) => dst = units.into_iter().map(|u| u.data).collect(),
                Err(_) => return (f64::NAN, f64::NAN),
            }
        }
        std::hint::black_box(&dst);
    }
    let best = |v: Vec<f64>| v.into_iter().fold(f64::INFINITY, f64::min);
    (best(one), best(two))
}
