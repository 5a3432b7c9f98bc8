#![no_main]
//! The standby's state machine and staging area, driven by arbitrary scripts of transport
//! messages, page batches, link failures and arbiter answers (see `ft::standby::harness`): it
//! never panics, commits only whole verified epochs, and its committed epoch only increases.
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One worker, and the harness runs on it: the parallel digests and copies run inline
    // instead of handing work across threads for every epoch.
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a thread pool")
    })
    .install(|| ft::standby::harness::fuzz(data));
});
