#![no_main]
//! Page-range batches: every decoded range lies inside memory and has exactly its length.
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use transport::pages::{decode_batch, decode_range};

const MEM: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    static PREV: OnceLock<Vec<u8>> = OnceLock::new();
    let prev = PREV.get_or_init(|| vec![0x5au8; 2 << 20]);
    if let Ok(ranges) = decode_batch(data) {
        for r in ranges.iter().take(64) {
            let p = prev.get(..r.len());
            if let Ok(bytes) = decode_range(r, MEM, p) {
                assert_eq!(bytes.len(), r.len());
                assert!(r.gpa + r.len() as u64 <= MEM);
            }
        }
    }
});
