#![no_main]
//! Frame headers: decode or a typed error; an accepted length is within its type's bound.
use libfuzzer_sys::fuzz_target;
use transport::FrameHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = FrameHeader::decode(data) {
        assert!(h.len <= h.kind.max_len());
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
    }
});
