//! `hello`: the smallest useful Rust guest, with an exact reference model
//! (`guest_images::model::hello_records`).
//!
//! Arguments: `n` (default 1000) records. Only vCPU 0 writes; the others report done at once.
//!
//! ```text
//! c = 0x9e37_79b9_7f4a_7c15
//! for i in 1..=n:  c = rotl(c ^ i, 13) * 0xff51_afd7_ed55_8ccd   (wrapping)
//!                  record kind PROGRESS (1), seq i-1, value c, aux i;  progress slot = i
//! record kind DONE (2), seq n, value c, aux n
//! ```
//!
//! It also keeps every checksum in a `Vec` and checks the last one against `c` (exercising the
//! heap: a mismatch would panic).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use tandem_rt::{entry, kind, Env};

entry!(main);

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const MIX: u64 = 0xff51_afd7_ed55_8ccd;

fn main(env: &Env) {
    let n = env.arg_u64("n", 1000);
    let mut c = SEED;
    let mut all = Vec::new();
    for i in 1..=n {
        c = (c ^ i).rotate_left(13).wrapping_mul(MIX);
        env.emit(kind::PROGRESS, c, i);
        env.set_progress(i);
        if all.len() < 1 << 20 {
            all.push(c);
        }
    }
    if n > 0 && n <= 1 << 20 {
        assert_eq!(all.last(), Some(&c), "the heap lost a checksum");
    }
    env.emit(kind::DONE, c, n);
}
