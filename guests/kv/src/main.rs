//! `kv`: a Redis-compatible server (RESP2, port 6379) on smoltcp TCP over virtio-net, with an
//! append-only log on virtio-blk (`appendonly yes`, `appendfsync always`). The protocol, the
//! commands and the log are `kvstore`'s; this file is the event loop.
//!
//! Arguments: `ip` (default `10.0.2.15/24`), `gw` (none), `port` (6379), `conns` (64, at most
//! 128) connections served at once, `net` (0) and `disk` (0) which virtio device of each type
//! to use, `aof` (1; 0: no log, nothing survives a restart), `maxmemory_mib` (default: half
//! the heap), `hb_ms` (0) heartbeat interval, `stats_ms` (1000) between KV_STATS records.
//! Twice `conns` sockets listen, so that connections still closing never leave a reconnecting
//! client without one.
//!
//! ```text
//!  loop:  poll smoltcp ─▶ for each connection: read (while its input < MAX_INPUT), parse every
//!         whole request (pipelining), run it; replies go to the connection's `held` bytes,
//!         writes are appended to the log
//!      ─▶ one log commit (write + flush) for the whole pass ─▶ `held` → `out` ─▶ TCP send
//! ```
//!
//! No reply leaves before the log holds every write that came before it (group commit, as
//! Redis's `appendfsync always` does per event-loop pass). A write that would not fit in the
//! log is refused with `-MISCONF` and not run. A protocol error gets Redis's `-ERR Protocol
//! error: …` and the connection is closed. A disk error stops the server (panic record): it
//! never answers without durability.
//!
//! Records (kinds from `tandem_rt::kinds`):
//!
//! ```text
//! KV_LOG    value = log records replayed at boot   aux = log bytes | 1 << 63 if a torn tail was cut
//! KV_UP     value = IPv4 (big-endian u32) << 8 | prefix        aux = port
//! KV_STATS  value = requests answered              aux = open connections    (every stats_ms)
//! ```
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::str::FromStr;

use kvstore::aof::SECTOR;
use kvstore::resp::{encode_request, Reply};
use kvstore::{Disk, Log, Parsed, ServerInfo, Store};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};
use tandem_rt::guest_abi::boot::VIRTIO_ID_BLOCK;
use tandem_rt::{entry, kinds, rdtsc, Env};
use tandem_virtio::virtio_drivers::device::blk::VirtIOBlk;
use tandem_virtio::virtio_drivers::transport::mmio::MmioTransport;
use tandem_virtio::virtio_drivers::transport::DeviceType;
use tandem_virtio::IdentityHal;

entry!(main);

/// Most connections.
const MAX_CONNS: usize = 128;
/// Bytes a connection may have waiting to be parsed before we stop reading from it.
const MAX_INPUT: usize = kvstore::resp::MAX_REQUEST + 64 * 1024;
/// Reply bytes a connection may have queued before we stop running its requests.
const MAX_OUTPUT: usize = 1 << 20;
/// TCP buffers per connection.
const RX_WINDOW: usize = 32 * 1024;
const TX_WINDOW: usize = 64 * 1024;
/// Most bytes in one disk request.
const MAX_IO: usize = 256 * 1024;

struct Blk(VirtIOBlk<IdentityHal, MmioTransport<'static>>);

impl Disk for Blk {
    type Error = tandem_virtio::virtio_drivers::Error;
    fn sectors(&self) -> u64 {
        self.0.capacity()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        for (i, c) in buf.chunks_mut(MAX_IO).enumerate() {
            self.0
                .read_blocks(sector as usize + i * (MAX_IO / SECTOR), c)?;
        }
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Self::Error> {
        for (i, c) in buf.chunks(MAX_IO).enumerate() {
            self.0
                .write_blocks(sector as usize + i * (MAX_IO / SECTOR), c)?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.0.flush()
    }
}

/// One connection slot (a listening or connected TCP socket).
struct Conn {
    handle: SocketHandle,
    /// Received bytes not yet parsed.
    input: Vec<u8>,
    /// Replies waiting for the log commit.
    held: Vec<u8>,
    /// Replies released, not yet accepted by TCP.
    out: Vec<u8>,
    /// Close once `out` is sent (QUIT, a protocol error).
    closing: bool,
    /// A client is connected.
    open: bool,
    /// The client closed its side: close ours once its last request is answered.
    closing_after_input: bool,
}

impl Conn {
    fn reset(&mut self) {
        self.input.clear();
        self.held.clear();
        self.out.clear();
        self.closing = false;
        self.open = false;
        self.closing_after_input = false;
    }
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, prefix) = s.split_once('/').unwrap_or((s, "24"));
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some(())?;
    Some((Ipv4Addr::from_str(ip).ok()?, prefix))
}

fn now(env: &Env) -> Instant {
    Instant::from_micros((env.now_ns() / 1000) as i64)
}

fn open_log(env: &Env, index: usize, store: &mut Store) -> (Blk, Log) {
    let dev = tandem_virtio::find(env, VIRTIO_ID_BLOCK, index)
        .unwrap_or_else(|e| panic!("disk {index}: {e} (give aof=0 to run without a log)"));
    let transport = tandem_virtio::transport(&dev, DeviceType::Block)
        .unwrap_or_else(|e| panic!("disk {index} at {:#x}: {e}", dev.base));
    let mut blk = Blk(VirtIOBlk::new(transport).unwrap_or_else(|e| panic!("virtio-blk: {e}")));
    let info = ServerInfo::default();
    let mut sink = Vec::new();
    let (log, opened) = Log::open(&mut blk, rdtsc() | 1, |args| {
        sink.clear();
        store.execute(args, &info, &mut sink);
    })
    .unwrap_or_else(|e| panic!("the log on disk {index}: {e:?}"));
    env.emit(
        kinds::KV_LOG,
        opened.records,
        opened.tail | (u64::from(opened.cut) << 63),
    );
    (blk, log)
}

fn main(env: &Env) {
    let ip_arg = env.arg("ip").unwrap_or("10.0.2.15/24");
    let (ip, prefix) = parse_cidr(ip_arg).unwrap_or_else(|| panic!("ip={ip_arg}: not a.b.c.d/n"));
    let gw = env
        .arg("gw")
        .map(|g| Ipv4Addr::from_str(g).unwrap_or_else(|_| panic!("gw={g}: not an IPv4 address")));
    let port = u16::try_from(env.arg_u64("port", 6379)).expect("port= must fit 16 bits");
    let nconns = (env.arg_u64("conns", 64) as usize).clamp(1, MAX_CONNS);
    let hb_ms = env.arg_u64("hb_ms", 0).min(u64::from(u32::MAX)) as u32;
    let stats_every = env.ns_to_ticks(env.arg_u64("stats_ms", 1000).max(1) * 1_000_000);
    let maxmemory = match env.arg_u64("maxmemory_mib", 0) {
        0 => (env.heap_size() / 2) as usize,
        m => (m << 20) as usize,
    };

    let mut store = Store::new(maxmemory);
    let mut log = (env.arg_u64("aof", 1) != 0)
        .then(|| open_log(env, env.arg_u64("disk", 0) as usize, &mut store));

    let (mut nic, mac) = tandem_virtio::net::open(env, env.arg_u64("net", 0) as usize)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = rdtsc();
    let mut iface = Interface::new(config, &mut nic, now(env));
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::Ipv4(Ipv4Cidr::new(ip, prefix)));
    });
    if let Some(gw) = gw {
        iface
            .routes_mut()
            .add_default_ipv4_route(gw)
            .expect("route table full");
    }
    let mut sockets = SocketSet::new(Vec::new());
    // Twice as many sockets as connections: a closing connection keeps its socket until the
    // client's last ACK, and a client that reconnects at once (redis-benchmark between two
    // tests) must still find a listening one (smoltcp has no listen backlog).
    let mut conns: Vec<Conn> = (0..nconns * 2)
        .map(|_| {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; RX_WINDOW]),
                tcp::SocketBuffer::new(vec![0u8; TX_WINDOW]),
            );
            s.set_nagle_enabled(false);
            s.listen(port)
                .unwrap_or_else(|e| panic!("listen on TCP port {port}: {e:?}"));
            Conn {
                handle: sockets.add(s),
                input: Vec::new(),
                held: Vec::new(),
                out: Vec::new(),
                closing: false,
                open: false,
                closing_after_input: false,
            }
        })
        .collect();

    env.emit(
        kinds::KV_UP,
        (u64::from(u32::from(ip)) << 8) | u64::from(prefix),
        u64::from(port),
    );
    env.doorbell();
    if hb_ms != 0 {
        env.heartbeat(hb_ms);
    }
    let ping_every = env.ns_to_ticks(u64::from(hb_ms) * 500_000).max(1);
    let started = rdtsc();
    let mut next_ping = started.saturating_add(ping_every);
    let mut next_stats = started.saturating_add(stats_every);
    let mut info = ServerInfo {
        port,
        ..ServerInfo::default()
    };
    let mut request = Vec::new();

    loop {
        iface.poll(now(env), &mut nic, &mut sockets);
        let mut ran = false;
        for c in conns.iter_mut() {
            let sock = sockets.get_mut::<tcp::Socket>(c.handle);
            if !sock.is_open() {
                if c.open {
                    info.clients -= 1;
                }
                c.reset();
                let _ = sock.listen(port);
                continue;
            }
            if sock.is_active() && !c.open && sock.state() == tcp::State::Established {
                c.open = true;
                info.clients += 1;
            }
            match sock.state() {
                // Our close is acknowledged and the client's FIN too: free the slot now rather
                // than after TIME-WAIT (the peer has nothing left in flight to us).
                tcp::State::TimeWait => {
                    sock.abort();
                    continue;
                }
                // The client will send nothing more: answer what it sent, then close.
                tcp::State::CloseWait => c.closing_after_input = true,
                _ => {}
            }
            if c.closing {
                continue;
            }
            while sock.can_recv() && c.input.len() < MAX_INPUT {
                let room = MAX_INPUT - c.input.len();
                let got = sock.recv(|buf| {
                    let n = buf.len().min(room);
                    c.input.extend_from_slice(&buf[..n]);
                    (n, n)
                });
                if !matches!(got, Ok(n) if n > 0) {
                    break;
                }
            }
            // Every whole request, in order (pipelining), while the replies fit.
            let mut at = 0;
            while !c.closing && c.held.len() + c.out.len() < MAX_OUTPUT {
                match kvstore::parse(&c.input[at..]) {
                    Parsed::Incomplete => break,
                    Parsed::Empty { used } => at += used,
                    Parsed::Error(why) => {
                        c.held
                            .error(format!("ERR Protocol error: {why}").as_bytes());
                        c.closing = true;
                        at = c.input.len();
                    }
                    Parsed::Request { args, used } => {
                        at += used;
                        ran = true;
                        info.commands += 1;
                        info.aof_bytes = log.as_ref().map_or(0, |(_, l)| l.tail());
                        request.clear();
                        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
                        encode_request(&refs, &mut request);
                        if let Some((blk, l)) = &log {
                            let room =
                                blk.sectors() * SECTOR as u64 - l.tail() - l.pending() as u64;
                            if args.first().is_some_and(|n| kvstore::store::is_write(n))
                                && request.len() as u64 + 64 > room
                            {
                                c.held.error(
                                    b"MISCONF Errors writing to the AOF file: No space left on device",
                                );
                                continue;
                            }
                        }
                        let outcome = store.execute(&args, &info, &mut c.held);
                        if outcome.log {
                            if let Some((_, l)) = &mut log {
                                l.append(&request);
                            }
                        }
                        if outcome.close {
                            c.closing = true;
                        }
                    }
                }
            }
            c.input.drain(..at);
            if c.closing_after_input && kvstore::parse(&c.input) == Parsed::Incomplete {
                c.closing = true;
            }
        }
        if ran {
            if let Some((blk, l)) = &mut log {
                if let Err(e) = l.commit(blk) {
                    panic!("the log disk failed ({e:?}): stopping rather than answer without durability");
                }
            }
        }
        for c in conns.iter_mut() {
            if !c.held.is_empty() {
                c.out.append(&mut c.held);
            }
            let sock = sockets.get_mut::<tcp::Socket>(c.handle);
            if !c.out.is_empty() && sock.can_send() {
                if let Ok(n) = sock.send_slice(&c.out) {
                    c.out.drain(..n);
                }
            }
            if c.closing && c.out.is_empty() {
                sock.close();
            }
        }
        let t = rdtsc();
        if hb_ms != 0 && t >= next_ping {
            env.ping();
            next_ping = t.saturating_add(ping_every);
        }
        if t >= next_stats {
            env.emit(kinds::KV_STATS, info.commands, info.clients);
            env.doorbell();
            next_stats = t.saturating_add(stats_every);
        }
    }
}
