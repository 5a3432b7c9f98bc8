#![no_main]
//! The server side of the handshake fed arbitrary bytes: it must refuse (it cannot know the
//! key), never panic, and never hand out a sealed channel.
use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use transport::handshake::server;
use transport::Psk;

struct Peer {
    input: Cursor<Vec<u8>>,
}

impl Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let psk = Psk::from_hex(&"ab".repeat(32)).unwrap();
    let peer = Peer { input: Cursor::new(data.to_vec()) };
    assert!(server(peer, Some(&psk)).is_err(), "arbitrary bytes cannot prove the key");
});
