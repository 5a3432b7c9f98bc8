//! `panic`: panics on purpose, to test the panic path of `tandem-rt`.
//!
//! Emits 3 PROGRESS records (value = i, aux = i for i in 1..=3), then
//! `panic!("on purpose: {why}")` with `why` the `why=` argument (default `no reason`), so the
//! stream ends with a PANIC record (value = the line of that `panic!`) and PANIC_TEXT records
//! spelling `panic/src/main.rs:LINE: on purpose: WHY`. With `oom=1` it instead asks the heap
//! for more than the data area holds, which panics with `memory allocation of N bytes failed`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use tandem_rt::{entry, kind, Env};

entry!(main);

fn main(env: &Env) {
    for i in 1..=3 {
        env.emit(kind::PROGRESS, i, i);
    }
    if env.arg_u64("oom", 0) != 0 {
        let too_much = env.heap_size() as usize + 4096;
        let v: Vec<u8> = Vec::with_capacity(too_much);
        core::hint::black_box(&v);
    }
    let why = String::from(env.arg("why").unwrap_or("no reason"));
    panic!("on purpose: {why}");
}
