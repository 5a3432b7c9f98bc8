#![no_main]
//! Control messages: decode or a typed error; whatever decodes re-encodes to itself.
use libfuzzer_sys::fuzz_target;
use transport::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }
});
