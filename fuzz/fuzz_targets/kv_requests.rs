#![no_main]
//! The kv guest's request path, fed hostile bytes: the first byte picks a split point so the
//! stream arrives in two reads (as TCP may deliver it); every whole request is parsed and run
//! against a store with a small maxmemory, exactly as the guest's event loop does. Nothing may
//! panic, every parse consumes at least one byte or waits for more, and a request is re-encoded
//! into the log format and must parse back to the same arguments. The same bytes, read as a
//! disk, are replayed by the append-only log, which must stop at the first bad record.
use kvstore::aof::{Disk, Log, SECTOR};
use kvstore::resp::encode_request;
use kvstore::{parse, Parsed, ServerInfo, Store};
use libfuzzer_sys::fuzz_target;

struct Bytes(Vec<u8>);

impl Disk for Bytes {
    type Error = ();
    fn sectors(&self) -> u64 {
        (self.0.len() / SECTOR) as u64
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), ()> {
        let at = sector as usize * SECTOR;
        buf.copy_from_slice(self.0.get(at..at + buf.len()).ok_or(())?);
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), ()> {
        let at = sector as usize * SECTOR;
        self.0.get_mut(at..at + buf.len()).ok_or(())?.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), ()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let mut store = Store::new(64 * 1024);
    let info = ServerInfo::default();
    let mut input: Vec<u8> = Vec::new();
    let cut = (split as usize * data.len()) / 255;
    for part in [&data[..cut], &data[cut..]] {
        input.extend_from_slice(part);
        let mut at = 0;
        loop {
            match parse(&input[at..]) {
                Parsed::Incomplete => break,
                Parsed::Empty { used } => {
                    assert!(used > 0);
                    at += used;
                }
                Parsed::Error(_) => {
                    at = input.len();
                    break;
                }
                Parsed::Request { args, used } => {
                    assert!(used > 0 && at + used <= input.len());
                    at += used;
                    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
                    let mut logged = Vec::new();
                    encode_request(&refs, &mut logged);
                    match parse(&logged) {
                        Parsed::Request { args: back, used } => {
                            assert_eq!(back, args);
                            assert_eq!(used, logged.len());
                        }
                        other => panic!("a logged request does not parse back: {other:?}"),
                    }
                    let mut out = Vec::new();
                    store.execute(&args, &info, &mut out);
                    assert!(!out.is_empty(), "every request gets a reply");
                }
            }
        }
        input.drain(..at);
    }
    // The same bytes as a disk (padded to whole sectors, at least two).
    let mut disk = data.to_vec();
    disk.resize(disk.len().div_ceil(SECTOR).max(2) * SECTOR, 0);
    let mut disk = Bytes(disk);
    let mut replayed = Store::new(64 * 1024);
    let mut out = Vec::new();
    if let Ok((_, opened)) = Log::open(&mut disk, 1, |args| {
        out.clear();
        replayed.execute(args, &info, &mut out);
    }) {
        assert!(opened.tail as usize <= disk.0.len());
    }
});
