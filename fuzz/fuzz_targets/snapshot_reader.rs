#![no_main]
//! Snapshot state files: parse or a clear error; the memory index and compressed memory
//! chunks of whatever parses are checked without panicking.
use checkpoint::memfile::{verify_compressed, MemIndex};
use checkpoint::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Snapshot::from_bytes(data) {
        assert_eq!(Snapshot::from_bytes(&s.to_bytes()).unwrap(), s);
        if let Some(Ok(index)) = s.get("module/MainMem").map(|sec| sec.decode::<MemIndex>()) {
            if index.check().is_ok() && index.compressed && index.size <= 64 << 20 {
                let _ = verify_compressed(&index, &s);
            }
        }
    }
});
