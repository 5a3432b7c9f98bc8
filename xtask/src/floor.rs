//! The physical floor a benchmark compares against, measured in the same run: how fast this
//! machine copies memory.
//!
//! ```text
//!   memcpy_gib_s   one thread, 256 MiB, best of 5        (bench stall: "the physical limit")
//!   hot_copy_ms    N pages just written, 2 MiB pieces,   (bench ft: "copy alone")
//!                  best of 21, one thread and two
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

/// What copying `pages` pages alone takes here, ms, as the epoch pause copies them: from a
/// source just written (as a guest's hot set is, so partly in cache) into destination buffers
/// reused from copy to copy, in 2 MiB pieces (`monitor::dirty::MAX_RUN_PAGES`); the best of
/// 21 copies 20 ms apart (a floor), on one thread and on two (the pieces split in halves, a
/// second thread started for each copy).
pub fn hot_copy_ms(pages: u64) -> (f64, f64) {
    const PIECE: usize = 2 << 20;
    let len = (pages as usize * 4096).max(4096);
    let mut src = vec![0u8; len];
    let mut dst: Vec<Vec<u8>> = (0..len.div_ceil(PIECE))
        .map(|i| vec![0u8; PIECE.min(len - i * PIECE)])
        .collect();
    let copy = |dst: &mut [Vec<u8>], first: usize, src: &[u8]| {
        for (i, d) in dst.iter_mut().enumerate() {
            let (at, n) = ((first + i) * PIECE, d.len());
            d.copy_from_slice(&src[at..at + n]);
        }
    };
    let mut one = Vec::new();
    let mut two = Vec::new();
    for round in 0..42u64 {
        std::thread::sleep(Duration::from_millis(20));
        // Rewrite one qword per page, as the `dirty` guest and the probe do.
        for (p, page) in src.chunks_mut(4096).enumerate() {
            page[(round as usize * 8) % 4096] = (p as u64 ^ round) as u8;
        }
        let t = std::time::Instant::now();
        if round % 2 == 0 {
            copy(&mut dst, 0, std::hint::black_box(&src));
            one.push(t.elapsed().as_secs_f64() * 1e3);
        } else {
            let half = dst.len().div_ceil(2);
            let (a, b) = dst.split_at_mut(half);
            std::thread::scope(|sc| {
                sc.spawn(|| copy(a, 0, &src));
                copy(b, half, &src);
            });
            two.push(t.elapsed().as_secs_f64() * 1e3);
        }
        std::hint::black_box(&dst);
    }
    let best = |v: Vec<f64>| v.into_iter().fold(f64::INFINITY, f64::min);
    (best(one), best(two))
}
