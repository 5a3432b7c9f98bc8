//! virtio-net: TX, RX, hostile chains, save/restore, and a real TAP (root only).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::virtio::persist::{self, VirtioState};
use crate::virtio::testutil::*;
use crate::virtio::CountingInterrupt;

/// An in-memory wire: what the device sent, what it will receive.
#[derive(Clone, Default)]
struct Wire {
    tx: Arc<Mutex<Vec<Vec<u8>>>>,
    rx: Arc<Mutex<VecDeque<Vec<u8>>>>,
    reads: Arc<AtomicUsize>,
}

impl FrameSink for Wire {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.tx.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

impl FrameSource for Wire {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        match self.rx.lock().unwrap().pop_front() {
            Some(f) => {
                // Like a TAP: a frame longer than the buffer is cut.
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Wire {
    fn backend(&self) -> NetBackend {
        NetBackend {
            sink: Box::new(self.clone()),
            source: Box::new(self.clone()),
            tap: None,
        }
    }
    fn sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.tx.lock().unwrap())
    }
    fn inject(&self, f: Vec<u8>) {
        self.rx.lock().unwrap().push_back(f);
    }
}

fn cfg() -> NetConfig {
    NetConfig::parse("tap=tdtest0,mac=02:00:00:00:00:01").unwrap()
}

fn drv() -> (Wire, Driver<Net>) {
    let w = Wire::default();
    let d = Driver::start(Net::new(cfg(), w.backend()));
    (w, d)
}

fn frame(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const TXH: u64 = DATA;
const TXF: u64 = DATA + 0x100;

fn send(d: &mut Driver<Net>, f: &[u8]) -> Vec<(u32, u32)> {
    d.put(TXH, &[0xaa; VNET_HDR_LEN]); // any header: ignored
    d.put(TXF, f);
    d.submit(
        TX_QUEUE,
        &[
            (TXH, VNET_HDR_LEN as u32, false),
            (TXF, f.len() as u32, false),
        ],
    );
    d.used(TX_QUEUE)
}

fn rx_buf(i: u64) -> u64 {
    DATA + 0x1_0000 + i * 0x1000
}

/// Posts `n` RX buffers of `len` bytes.
fn post(d: &mut Driver<Net>, n: u64, len: u32) {
    for i in 0..n {
        let h = d.chain(RX_QUEUE, &[(rx_buf(i), len, true)]);
        d.publish(RX_QUEUE, h);
    }
    d.kick(RX_QUEUE);
}

#[test]
fn config_parses_tap_and_mac() {
    let c = NetConfig::parse("tap=tap0").unwrap();
    assert_eq!(
        c,
        NetConfig {
            tap: "tap0".into(),
            mac: None
        }
    );
    assert_eq!(c.effective_mac()[0], 0x02, "locally administered");
    assert_eq!(
        c.effective_mac(),
        NetConfig::parse("tap=tap0").unwrap().effective_mac()
    );
    assert_eq!(cfg().mac, Some([2, 0, 0, 0, 0, 1]));
    for bad in [
        "",
        "tap=",
        "mac=02:00:00:00:00:01",
        "tap=a,mac=zz:00:00:00:00:01",
        "tap=a,mac=01:00:00:00:00:01",
        "tap=a,x=1",
        "tap=abcdefghijklmnop",
    ] {
        let e = NetConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains("tap=NAME"), "{bad}: {e}");
    }
}

#[test]
fn config_space_holds_the_mac() {
    let w = Wire::default();
    let mut d = Driver::new(Net::new(cfg(), w.backend()));
    assert_eq!(d.r(crate::virtio::mmio::reg::DEVICE_ID), 1);
    assert_ne!(d.features() & 1 << VIRTIO_NET_F_MAC, 0);
    let mut mac = [0u8; 8];
    d.t.read(0x100, &mut mac);
    assert_eq!(mac, [2, 0, 0, 0, 0, 1, 0, 0]);
}

#[test]
fn tx_strips_the_header_and_sends_the_frame() {
    let (w, mut d) = drv();
    let f = frame(60, 1);
    assert_eq!(send(&mut d, &f), vec![(0, 0)]);
    assert_eq!(w.sent(), vec![f.clone()]);
    // Header and frame in one buffer, frame split over two.
    d.put(TXH, &[0; VNET_HDR_LEN]);
    d.put(TXH + VNET_HDR_LEN as u64, &f[..20]);
    d.put(TXF, &f[20..]);
    d.submit(
        TX_QUEUE,
        &[(TXH, VNET_HDR_LEN as u32 + 20, false), (TXF, 40, false)],
    );
    assert_eq!(w.sent(), vec![f]);
    assert_eq!(d.t.device().stats().tx_frames, 2);
    assert_eq!(d.r(crate::virtio::mmio::reg::INTERRUPT_STATUS), 1);
}

#[test]
fn hostile_tx_header_that_is_too_short_is_dropped() {
    let (w, mut d) = drv();
    let h = d.submit(TX_QUEUE, &[(TXH, 8, false)]);
    assert_eq!(d.used(TX_QUEUE), vec![(u32::from(h), 0)]);
    assert!(w.sent().is_empty());
    assert_eq!(d.t.device().stats().tx_dropped, 1);
    assert_eq!(send(&mut d, &frame(60, 2)).len(), 1);
    assert_eq!(w.sent().len(), 1, "the device goes on");
}

#[test]
fn hostile_tx_with_device_writable_buffers_is_dropped() {
    let (w, mut d) = drv();
    d.submit(
        TX_QUEUE,
        &[(TXH, VNET_HDR_LEN as u32, false), (TXF, 60, true)],
    );
    assert_eq!(d.used(TX_QUEUE).len(), 1);
    assert!(w.sent().is_empty());
    assert_eq!(d.t.device().stats().tx_dropped, 1);
}

#[test]
fn hostile_tx_buffer_outside_guest_memory_is_dropped() {
    let (w, mut d) = drv();
    d.submit(
        TX_QUEUE,
        &[
            (TXH, VNET_HDR_LEN as u32, false),
            (MEM_SIZE - 10, 60, false),
        ],
    );
    assert_eq!(d.used(TX_QUEUE).len(), 1);
    assert!(w.sent().is_empty());
    assert_eq!(d.t.device().stats().tx_dropped, 1);
}

#[test]
fn hostile_tx_frame_longer_than_the_maximum_is_dropped() {
    let (w, mut d) = drv();
    d.submit(
        TX_QUEUE,
        &[
            (TXH, VNET_HDR_LEN as u32, false),
            (DATA + 0x1000, MAX_FRAME_LEN as u32 + 1, false),
        ],
    );
    assert_eq!(d.used(TX_QUEUE).len(), 1);
    assert!(w.sent().is_empty());
}

#[test]
fn rx_reads_frames_only_while_the_guest_has_buffers() {
    let (w, mut d) = drv();
    let (f1, f2) = (frame(60, 3), frame(1514, 4));
    w.inject(f1.clone());
    w.inject(f2.clone());
    assert!(!d.t.poll(), "no buffers: nothing to do");
    assert_eq!(
        w.reads.load(Ordering::SeqCst),
        0,
        "frames wait in the back end"
    );
    post(&mut d, 1, 2048); // the kick delivers one frame
    assert_eq!(d.used(RX_QUEUE), vec![(0, 12 + 60)]);
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[10] = 1; // num_buffers
    assert_eq!(d.get(rx_buf(0), 12), hdr);
    assert_eq!(d.get(rx_buf(0) + 12, 60), f1);
    assert!(!d.t.poll());
    post(&mut d, 1, 2048);
    assert_eq!(d.used(RX_QUEUE), vec![(1, 12 + 1514)]);
    assert_eq!(d.get(rx_buf(0) + 12, 1514), f2);
    let s = d.t.device().stats().clone();
    assert_eq!((s.rx_frames, s.rx_bytes), (2, 1574));
    // A frame arriving later goes out on poll().
    post(&mut d, 1, 2048);
    assert!(d.used(RX_QUEUE).is_empty());
    w.inject(frame(100, 5));
    assert!(d.t.poll());
    assert_eq!(d.used(RX_QUEUE), vec![(2, 112)]);
}

/// Input replication: every delivered frame is copied to the tap with the epoch set at the
/// time; injected frames go to the guest before the back end's, and bad ones are dropped.
#[test]
fn delivered_frames_are_copied_and_injected_frames_go_first() {
    let (w, mut d) = drv();
    let tap = crate::virtio::InputTap::new(4);
    let (tx, rx) = crossbeam_channel::bounded(16);
    tap.start(tx);
    tap.set_epoch(9);
    d.t.device_mut().set_input_tap(tap.clone());
    let (a, b, c) = (frame(60, 1), frame(80, 2), frame(70, 3));
    w.inject(c.clone());
    d.t.device_mut().inject([
        a.clone(),
        vec![0; 10],
        vec![0; MAX_FRAME_LEN + 1],
        b.clone(),
    ]);
    post(&mut d, 3, 2048);
    assert_eq!(
        d.used(RX_QUEUE),
        vec![(0, 12 + 60), (1, 12 + 80), (2, 12 + 70)]
    );
    assert_eq!(d.get(rx_buf(0) + 12, 60), a, "injected first");
    assert_eq!(d.get(rx_buf(1) + 12, 80), b);
    assert_eq!(d.get(rx_buf(2) + 12, 70), c, "then the back end's");
    let copied: Vec<(u64, u32, Vec<u8>)> =
        rx.try_iter().map(|f| (f.epoch, f.card, f.frame)).collect();
    assert_eq!(copied, vec![(9, 4, a), (9, 4, b), (9, 4, c)]);
    assert_eq!(
        d.t.device().stats().rx_dropped_oversize,
        2,
        "bad injected frames"
    );
}

/// The RX used ring's flags (bit 0: VRING_USED_F_NO_NOTIFY).
fn rx_used_flags(d: &Driver<Net>) -> u16 {
    let b = d.get(d.qs[RX_QUEUE].used, 2);
    u16::from_le_bytes([b[0], b[1]])
}

#[test]
fn rx_notifications_are_off_while_the_guest_has_buffers_and_on_when_it_has_none() {
    let (w, mut d) = drv();
    assert_eq!(rx_used_flags(&d), 0, "a fresh queue wants notifications");
    post(&mut d, 3, 2048);
    assert_eq!(
        rx_used_flags(&d),
        1,
        "3 buffers left, nothing waiting: no notification needed for more"
    );
    // Frames come: poll() finds the buffers without any notification.
    for i in 0..2 {
        w.inject(frame(60, i));
    }
    assert!(d.t.poll());
    assert_eq!(d.used(RX_QUEUE).len(), 2);
    assert_eq!(rx_used_flags(&d), 1, "one buffer left");
    // A buffer added without a kick (as a driver does while NO_NOTIFY is set) is used by
    // the next poll.
    let h = d.chain(RX_QUEUE, &[(rx_buf(3), 2048, true)]);
    d.publish(RX_QUEUE, h);
    for i in 2..5 {
        w.inject(frame(70, i));
    }
    assert!(d.t.poll());
    assert_eq!(
        d.used(RX_QUEUE),
        vec![(2, 12 + 70), (3, 12 + 70)],
        "the unkicked buffer took a frame"
    );
    assert_eq!(
        rx_used_flags(&d),
        0,
        "out of buffers with a frame waiting: the device wants the next notification"
    );
    // That notification delivers the waiting frame.
    post(&mut d, 1, 2048);
    let got = d.used(RX_QUEUE);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, 12 + 70);
    assert_eq!(d.t.device().stats().rx_frames, 5);
}

#[test]
fn hostile_rx_buffer_too_small_drops_the_frame_without_cutting_it() {
    let (w, mut d) = drv();
    w.inject(frame(1000, 6));
    w.inject(frame(100, 7));
    post(&mut d, 2, 512);
    assert_eq!(d.used(RX_QUEUE), vec![(0, 0), (1, 112)]);
    assert_eq!(d.get(rx_buf(1) + 12, 100), frame(100, 7));
    assert_eq!(d.t.device().stats().rx_dropped_too_small, 1);
}

#[test]
fn hostile_rx_device_readable_buffer_is_returned_unused() {
    let (w, mut d) = drv();
    w.inject(frame(60, 8));
    let h = d.chain(RX_QUEUE, &[(rx_buf(0), 2048, false)]);
    d.publish(RX_QUEUE, h);
    let h2 = d.chain(RX_QUEUE, &[(rx_buf(1), 2048, true)]);
    d.publish(RX_QUEUE, h2);
    d.kick(RX_QUEUE);
    assert_eq!(d.used(RX_QUEUE), vec![(0, 0), (1, 72)]);
    assert_eq!(
        d.get(rx_buf(1) + 12, 60),
        frame(60, 8),
        "the frame waited for a good buffer"
    );
    assert_eq!(d.t.device().stats().rx_bad_buffers, 1);
}

#[test]
fn hostile_rx_buffer_outside_guest_memory_is_returned_unused() {
    let (w, mut d) = drv();
    w.inject(frame(60, 9));
    let h = d.chain(RX_QUEUE, &[(MEM_SIZE - 16, 2048, true)]);
    d.publish(RX_QUEUE, h);
    d.kick(RX_QUEUE);
    assert_eq!(d.used(RX_QUEUE), vec![(0, 0)]);
    assert_eq!(d.t.device().stats().rx_bad_buffers, 1);
}

#[test]
fn rx_frame_longer_than_the_maximum_is_dropped() {
    let (w, mut d) = drv();
    w.inject(vec![0; MAX_FRAME_LEN + 100]);
    w.inject(frame(60, 10));
    post(&mut d, 1, 2048);
    assert_eq!(d.used(RX_QUEUE), vec![(0, 72)]);
    assert_eq!(d.t.device().stats().rx_dropped_oversize, 1);
}

#[test]
fn hostile_rx_chain_that_loops_needs_reset() {
    let (w, mut d) = drv();
    w.inject(frame(60, 11));
    d.desc(RX_QUEUE, 0, rx_buf(0), 64, F_WRITE | F_NEXT, 1);
    d.desc(RX_QUEUE, 1, rx_buf(1), 64, F_WRITE | F_NEXT, 0);
    d.publish(RX_QUEUE, 0);
    d.kick(RX_QUEUE);
    assert!(d.needs_reset());
    assert!(d.t.needs_reset_reason().unwrap().contains("does not end"));
    w.inject(frame(60, 12));
    assert!(!d.t.poll(), "a device that needs a reset does not poll");
}

#[test]
fn save_and_restore_mid_stream_gives_the_same_results() {
    let (wa, mut a) = drv();
    let (wb, mut b) = drv();
    for (w, d) in [(&wa, &mut a), (&wb, &mut b)] {
        send(d, &frame(60, 1));
        w.inject(frame(70, 2));
        post(d, 3, 2048);
        assert_eq!(w.sent().len(), 1);
    }
    let saved = VirtioState::decode(&b.t.save().encode()).unwrap();
    let irq = Arc::new(CountingInterrupt::default());
    let wb2 = Wire::default();
    b.t = persist::restore_net(&saved, b.mem.clone(), irq, Some(wb2.backend())).unwrap();
    assert_eq!(b.t.device().mac(), [2, 0, 0, 0, 0, 1]);
    for (w, d) in [(&wa, &mut a), (&wb2, &mut b)] {
        w.inject(frame(80, 3));
        assert!(d.t.poll());
        send(d, &frame(90, 4));
        assert_eq!(w.sent(), vec![frame(90, 4)]);
    }
    assert_eq!(a.used(RX_QUEUE), b.used(RX_QUEUE));
    assert_eq!(a.get(0, MEM_SIZE as usize), b.get(0, MEM_SIZE as usize));
    let e = persist::restore_block(
        &saved,
        a.mem.clone(),
        Arc::new(CountingInterrupt::default()),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a block device"), "{e}");
}

// ---- a real TAP ----

mod tap_test {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    const ETHERTYPE: u16 = 0x88b5; // local experimental

    fn test_frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6]; // broadcast
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.extend_from_slice(payload);
        f.resize(f.len().max(60), 0);
        f
    }

    fn is_ours(f: &[u8], payload: &[u8]) -> bool {
        f.len() >= 14 + payload.len()
            && f[12..14] == ETHERTYPE.to_be_bytes()
            && &f[14..14 + payload.len()] == payload
    }

    /// Brings the interface up and opens a packet socket on it (the host side of the wire).
    fn host_side(name: &str) -> std::io::Result<OwnedFd> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked and owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one 40-byte `struct ifreq`; `ifr` is
        // that size, NUL-terminated name first, flags (c_short) at offset 16.
        unsafe {
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, ifr.as_mut_ptr()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let flags = i16::from_ne_bytes([ifr[16], ifr[17]]) | libc::IFF_UP as i16;
            ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, ifr.as_mut_ptr()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: `cname` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        // SAFETY: sockaddr_ll is plain data; zero is a valid bit pattern.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a live sockaddr_ll and the length passed is its size.
        let r = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval; `tv` is one and the length is its size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(sock)
    }

    fn run() -> std::result::Result<(), String> {
        // A network namespace of this thread's own, so the test leaves the host's alone.
        // SAFETY: unshare(2) affects only the calling thread, a test thread we own.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "cannot make a network namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun".into());
        }
        let net = Net::open(NetConfig::parse("tap=tdtap%d").unwrap()).map_err(|e| e.to_string())?;
        let name = net.tap().unwrap().name().to_string();
        assert!(name.starts_with("tdtap"), "{name}");
        let host = host_side(&name).map_err(|e| format!("cannot bring {name} up: {e}"))?;
        let mut d = Driver::start(net);
        assert!(d.t.poll_fd().is_some());

        // Guest → host.
        let out = test_frame(d.t.device().mac(), b"tandem-tx");
        send(&mut d, &out);
        assert_eq!(d.t.device().stats().tx_frames, 1);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = vec![0u8; 65536];
        let mut seen = false;
        while !seen && Instant::now() < deadline {
            // SAFETY: `buf` is live and writable for its length.
            let n = unsafe { libc::recv(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            seen = n > 0 && is_ours(&buf[..n as usize], b"tandem-tx");
        }
        assert!(seen, "the TX frame did not reach {name}");

        // Host → guest.
        post(&mut d, 8, 2048);
        let back = test_frame([2, 0, 0, 0, 0, 9], b"tandem-rx");
        // SAFETY: `back` is live for its length.
        let n = unsafe { libc::send(host.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
        assert_eq!(
            n,
            back.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
        let mut got = false;
        let mut posted = 8;
        while !got && Instant::now() < deadline {
            d.t.poll();
            for (id, len) in d.used(RX_QUEUE) {
                let f = d.get(rx_buf(u64::from(id) % 8) + 12, len as usize - 12);
                got |= f == back;
                // Re-post the buffer (other traffic, e.g. IPv6 router solicitations, may come).
                let h = d.chain(RX_QUEUE, &[(rx_buf(posted % 8), 2048, true)]);
                d.publish(RX_QUEUE, h);
                posted += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(got, "the frame sent on {name} did not land in an RX buffer");
        Ok(())
    }

    #[test]
    fn frames_cross_a_real_tap_both_ways() {
        match std::thread::spawn(run).join().unwrap() {
            Ok(()) => {}
            Err(why) => println!("skipped: the TAP test needs root and /dev/net/tun: {why}"),
        }
    }
}
