#![no_main]
//! Snapshot state files: parse or a clear error; the memory index and compressed memory
//! chunks of whatever parses are checked without panicking.
use checkpoint::memfile::{verify_compressed, MemState};
use checkpoint::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Snapshot::from_bytes(data) {
        assert_eq!(Snapshot::from_bytes(&s.to_bytes()).unwrap(), s);
        // Version 1 or 2 of module/MainMem, whichever the section says.
        if let Ok(mem) = MemState::of(&s) {
            let _ = mem.file_path(std::path::Path::new("/fuzz/snap"));
            if mem.index.compressed && mem.index.size <= 64 << 20 {
                let _ = verify_compressed(&mem.index, &s);
            }
        }
    }
});
