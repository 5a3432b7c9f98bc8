//! `net-echo`: a UDP echo server on smoltcp over virtio-net, in polling mode.
//!
//! Arguments: `ip` (default `10.0.2.15/24`) address and prefix; `gw` (default none) IPv4
//! default gateway; `port` (default 7); `every` (default 1000) datagrams per NET_ECHO record;
//! `count` (default 0: forever) stop after this many datagrams; `dev` (default 0: the first
//! network device of the boot-info page); `hb_ms` (default 0) heartbeat interval (pings every
//! `hb_ms / 2`).
//!
//! Every datagram to `ip:port` is sent back to its source with the same payload. Frames that
//! smoltcp cannot parse, frames longer than the receive buffer and datagrams that do not fit
//! the socket are dropped, never a panic. Records (kinds from `tandem_rt::kinds`):
//!
//! ```text
//! NET_UP    value = IPv4 address (big-endian u32) << 8 | prefix   aux = port
//! NET_ECHO  value = datagrams echoed so far   aux = payload bytes echoed so far  (every `every`)
//! DONE (2)  value = datagrams echoed          aux = payload bytes echoed     (with `count` only)
//! ```
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::str::FromStr;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::udp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};
use tandem_rt::{entry, kind, kinds, rdtsc, Env};

entry!(main);

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, prefix) = s.split_once('/').unwrap_or((s, "24"));
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some(())?;
    Some((Ipv4Addr::from_str(ip).ok()?, prefix))
}

fn now(env: &Env) -> Instant {
    Instant::from_micros((env.now_ns() / 1000) as i64)
}

fn main(env: &Env) {
    let ip_arg = env.arg("ip").unwrap_or("10.0.2.15/24");
    let (ip, prefix) = parse_cidr(ip_arg).unwrap_or_else(|| panic!("ip={ip_arg}: not a.b.c.d/n"));
    let gw = env
        .arg("gw")
        .map(|g| Ipv4Addr::from_str(g).unwrap_or_else(|_| panic!("gw={g}: not an IPv4 address")));
    let port = u16::try_from(env.arg_u64("port", 7)).expect("port= must fit 16 bits");
    let every = env.arg_u64("every", 1000).max(1);
    let count = env.arg_u64("count", 0);
    let hb_ms = env.arg_u64("hb_ms", 0).min(u64::from(u32::MAX)) as u32;
    let index = env.arg_u64("dev", 0) as usize;

    let (mut nic, mac) = tandem_virtio::net::open(env, index).unwrap_or_else(|e| panic!("{e}"));
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
    let socket = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 64 * 1536]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 64 * 1536]),
    );
    let mut sockets = SocketSet::new(Vec::new());
    let handle = sockets.add(socket);
    sockets
        .get_mut::<udp::Socket>(handle)
        .bind(port)
        .unwrap_or_else(|e| panic!("bind UDP port {port}: {e:?}"));

    env.emit(
        kinds::NET_UP,
        (u64::from(u32::from(ip)) << 8) | u64::from(prefix),
        u64::from(port),
    );
    env.doorbell();
    if hb_ms != 0 {
        env.heartbeat(hb_ms);
    }
    let ping_every = env.ns_to_ticks(u64::from(hb_ms) * 500_000).max(1);
    let mut next_ping = rdtsc().saturating_add(ping_every);

    let (mut echoed, mut bytes) = (0u64, 0u64);
    let mut payload = vec![0u8; 2048];
    loop {
        iface.poll(now(env), &mut nic, &mut sockets);
        let sock = sockets.get_mut::<udp::Socket>(handle);
        while let Some((n, to)) = sock.recv().ok().map(|(data, meta)| {
            let n = data.len().min(payload.len());
            payload[..n].copy_from_slice(&data[..n]);
            (n, meta.endpoint)
        }) {
            if sock.send_slice(&payload[..n], to).is_err() {
                continue; // the transmit buffer is full: drop it, as UDP may
            }
            echoed += 1;
            bytes += n as u64;
            env.set_progress(echoed);
            if echoed.is_multiple_of(every) {
                env.emit(kinds::NET_ECHO, echoed, bytes);
            }
        }
        if hb_ms != 0 {
            let t = rdtsc();
            if t >= next_ping {
                env.ping();
                next_ping = t.saturating_add(ping_every);
            }
        }
        if count != 0 && echoed >= count {
            // Send what is queued before stopping.
            iface.poll(now(env), &mut nic, &mut sockets);
            env.emit(kind::DONE, echoed, bytes);
            return;
        }
    }
}
