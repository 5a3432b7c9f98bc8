//! The primary's end of the replication link: a thread that sends each captured epoch and
//! waits for its acknowledgement, and a reader thread for the standby's replies.
//!
//! Pipelining is one deep: the protector hands over epoch E+1 only after E was acknowledged
//! (the guest runs on while E travels, Remus-style). With nothing to send, heartbeats flow
//! every interval.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use transport::message::NackCode;
use transport::{Channel, Epoch, Fence, Generation, Message, PageRange, Received};

use rayon::prelude::*;
use transport::pages::{
    encode_patch, encode_range, encode_range_delta, is_zero, Codec, PageRangeRef,
};

use super::epoch::RECORDS_PREFIX;
use checkpoint::digest::{combine_hashes, range_hash};
use devices::virtio::InputFrame;
use vmx::machine::Captured;

/// Faults a test can inject into the primary's link. Production code never sets them: the
/// `tandem` binary reads them from `TANDEM_TEST_*` only when this crate is built with its
/// `fault-injection` feature (the end-to-end tests' dev-dependency turns it on, so
/// `cargo test --workspace` builds it so; `tandem`'s own `fault-injection` feature forwards
/// to it).
#[derive(Clone, Debug, Default)]
pub struct TestHooks {
    /// `TANDEM_TEST_SEND_DELAY_MS`: sleep this long between an epoch's pages and its state
    /// (widens the window in which a kill lands in the middle of a transfer).
    pub send_delay: Option<Duration>,
    /// `TANDEM_TEST_BAD_EPOCH=E:digest|truncate|outside`: send epoch E damaged, once.
    pub bad_epoch: Option<(u64, Fault)>,
}

/// A way to damage an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A wrong page digest.
    Digest,
    /// EpochEnd promises a range that never came.
    Truncate,
    /// A page range outside guest memory.
    Outside,
}

impl TestHooks {
    /// No hooks: this build has no `fault-injection` feature, so `TANDEM_TEST_*` is not read.
    #[cfg(not(feature = "fault-injection"))]
    pub fn from_env() -> Self {
        Self::default()
    }

    /// Reads the hooks from the environment (`TANDEM_TEST_SEND_DELAY_MS`,
    /// `TANDEM_TEST_BAD_EPOCH`): only in a build with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    pub fn from_env() -> Self {
        let send_delay = std::env::var("TANDEM_TEST_SEND_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        let bad_epoch = std::env::var("TANDEM_TEST_BAD_EPOCH").ok().and_then(|v| {
            let (e, f) = v.split_once(':')?;
            let f = match f {
                "digest" => Fault::Digest,
                "truncate" => Fault::Truncate,
                "outside" => Fault::Outside,
                _ => return None,
            };
            Some((e.parse().ok()?, f))
        });
        if send_delay.is_some() || bad_epoch.is_some() {
            log::warn!("test hooks active: delay {send_delay:?}, bad epoch {bad_epoch:?}");
        }
        TestHooks {
            send_delay,
            bad_epoch,
        }
    }
}

/// What one epoch cost on the wire.
#[derive(Clone, Debug, Default)]
pub struct SendStats {
    /// Dirty bytes captured.
    pub raw_bytes: u64,
    /// Page payload bytes sent (after compression).
    pub page_bytes: u64,
    /// State bytes sent.
    pub state_bytes: u64,
    /// Held-output bytes sent.
    pub record_bytes: u64,
    /// Encoding + sending time.
    pub send: Duration,
    /// NACKs before the ACK.
    pub nacks: u32,
    /// Ranges sent as XOR deltas.
    pub xor_ranges: u64,
    /// Bytes in the XOR-delta cache after the epoch.
    pub xor_cache_bytes: u64,
}

/// What the link reports.
#[derive(Debug)]
pub enum LinkEvent {
    /// The standby committed this epoch.
    Acked {
        /// The epoch.
        epoch: u64,
        /// Its cost.
        stats: SendStats,
    },
    /// The standby refused this epoch; the link sends it again (a stale refusal, or a
    /// fourth, ends the link: [`LinkEvent::Lost`] follows).
    Nacked {
        /// The epoch.
        epoch: u64,
    },
    /// The standby is gone (or refused the same epoch too often, or refused a switch).
    Lost {
        /// Why.
        reason: String,
    },
    /// The standby took the VM over (a migration's switch) as `generation`; the link ended.
    Switched {
        /// Its generation.
        generation: u64,
    },
}

enum Job {
    Epoch(Box<Captured>),
    Switch(Fence),
    Goodbye,
}

/// How long a switching primary waits for the receiver's confirmation (it claims a
/// generation at its arbiter first: etcd may take a lease's TTL).
pub const SWITCH_PATIENCE: Duration = Duration::from_secs(30);

/// The running link.
pub struct Link {
    jobs: Sender<Job>,
    events: Receiver<LinkEvent>,
    inputs: Sender<InputFrame>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Received frames the link may queue for the standby (input replication); more are dropped
/// by the card's tap, not waited for.
pub const INPUT_QUEUE: usize = 4096;

/// Fixed facts of a link.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The primary's generation.
    pub generation: u64,
    /// Epoch interval (heartbeats flow at this pace when nothing else does).
    pub interval: Duration,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Test faults.
    pub hooks: TestHooks,
    /// Bound of the XOR-delta cache (copies of recently sent pages); 0 turns deltas off.
    pub xor_cache_bytes: u64,
}

/// Default bound of the XOR-delta cache.
pub const DEFAULT_XOR_CACHE_BYTES: u64 = 64 << 20;

impl Link {
    /// Starts the threads over an authenticated channel.
    pub fn start(chan: Channel<TcpStream>, cfg: LinkConfig) -> crate::Result<Link> {
        let (tx, mut rx) = chan.split()?;
        let (rep_tx, rep_rx) = unbounded();
        std::thread::Builder::new()
            .name("link-reader".into())
            .spawn(move || loop {
                let r = rx.recv().map_err(|e| e.to_string());
                let end = r.is_err();
                if rep_tx.send(r).is_err() || end {
                    break;
                }
            })
            .map_err(|source| crate::Error::Thread {
                what: "replication link",
                source,
            })?;
        let (jobs_tx, jobs_rx) = bounded(1);
        let (ev_tx, ev_rx) = unbounded();
        let (in_tx, in_rx) = bounded(INPUT_QUEUE);
        let thread = std::thread::Builder::new()
            .name("link-sender".into())
            .spawn(move || sender(tx, rep_rx, jobs_rx, in_rx, ev_tx, cfg))
            .map_err(|source| crate::Error::Thread {
                what: "replication link",
                source,
            })?;
        Ok(Link {
            jobs: jobs_tx,
            events: ev_rx,
            inputs: in_tx,
            thread: Some(thread),
        })
    }

    /// Where the cards' received frames go (input replication): the sender sends each as an
    /// `Input` message at the first moment it is not in the middle of an epoch.
    pub fn inputs(&self) -> Sender<InputFrame> {
        self.inputs.clone()
    }

    /// Hands an epoch over (the previous one must have been acknowledged).
    pub fn send(&self, cap: Captured) -> bool {
        self.jobs.send(Job::Epoch(Box::new(cap))).is_ok()
    }

    /// What the link reports.
    pub fn events(&self) -> Receiver<LinkEvent> {
        self.events.clone()
    }

    /// Tells the standby, which committed `fence.epoch`, to take the VM over (see
    /// [`transport::Message::Switch`]); [`LinkEvent::Switched`] or [`LinkEvent::Lost`] follows.
    pub fn switch(&self, fence: Fence) -> bool {
        self.jobs.send(Job::Switch(fence)).is_ok()
    }

    /// Says goodbye (the guest finished) and waits for the threads.
    pub fn goodbye(mut self) {
        let _ = self.jobs.send(Job::Goodbye);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Replies = Receiver<Result<Received, String>>;

/// Most received frames sent to the standby in one write.
const INPUT_BATCH: usize = 64;

/// Sends a received frame as an `Input` message, with the frames queued behind it (up to
/// [`INPUT_BATCH`]) in the same write: under load the card delivers frames in bursts, and one
/// write (and one wake-up of this thread) per frame costs the CPU the guest needs.
fn send_inputs(
    tx: &mut Channel<TcpStream>,
    generation: u64,
    first: InputFrame,
    queued: &Receiver<InputFrame>,
) -> transport::Result<()> {
    let msg = |f: InputFrame| Message::Input {
        fence: Fence {
            generation: Generation(generation),
            epoch: Epoch(f.epoch),
        },
        card: f.card,
        frame: f.frame,
    };
    let batch: Vec<Message> = std::iter::once(first)
        .chain(queued.try_iter().take(INPUT_BATCH - 1))
        .map(msg)
        .collect();
    tx.send_batch(&batch)
}

fn sender(
    mut tx: Channel<TcpStream>,
    replies: Replies,
    jobs: Receiver<Job>,
    inputs: Receiver<InputFrame>,
    events: Sender<LinkEvent>,
    cfg: LinkConfig,
) {
    let fence = |e: u64| Fence {
        generation: Generation(cfg.generation),
        epoch: Epoch(e),
    };
    let mut last = 0u64;
    // The first epoch of a link completes a sync: the standby may build its VM first.
    let mut first_epoch = true;
    let mut codec = CodecChoice::default();
    // What the standby holds of each recently sent page: the base of XOR deltas. It starts
    // empty with every link (a new standby has nothing of ours).
    let mut cache = XorCache::new(cfg.xor_cache_bytes);
    let lost = |reason: String| {
        let _ = events.send(LinkEvent::Lost { reason });
    };
    loop {
        select! {
            recv(jobs) -> job => match job {
                Ok(Job::Epoch(mut cap)) => {
                    last = cap.epoch;
                    let first = std::mem::replace(&mut first_epoch, false);
                    let sent = send_epoch(&mut tx, &replies, &inputs, &events, &cap, &cfg, &mut codec, &mut cache, first);
                    // The copy buffers serve the next epoch's capture (no page faults on them
                    // while the guest is stunned).
                    monitor::dirty::recycle(std::mem::take(&mut cap.runs));
                    match sent {
                        Ok(stats) => {
                            let _ = events.send(LinkEvent::Acked { epoch: cap.epoch, stats });
                        }
                        Err(reason) => {
                            let _ = tx.get_ref().shutdown(std::net::Shutdown::Both);
                            return lost(reason);
                        }
                    }
                }
                Ok(Job::Switch(f)) => {
                    match switch(&mut tx, &replies, &inputs, f, &cfg) {
                        Ok(generation) => {
                            let _ = events.send(LinkEvent::Switched { generation });
                        }
                        Err(reason) => {
                            let _ = tx.get_ref().shutdown(std::net::Shutdown::Both);
                            lost(reason);
                        }
                    }
                    return;
                }
                Ok(Job::Goodbye) => {
                    let _ = tx.send(&Message::Goodbye);
                    let _ = tx.end();
                    return;
                }
                Err(_) => return,
            },
            recv(inputs) -> f => {
                if let Ok(f) = f {
                    if let Err(e) = send_inputs(&mut tx, cfg.generation, f, &inputs) {
                        return lost(format!("sending a received frame failed: {e}"));
                    }
                }
            },
            recv(replies) -> r => {
                let why = match r {
                    Ok(Ok(m)) => format!("unexpected {m:?} from the standby"),
                    Ok(Err(e)) => format!("connection to the standby lost: {e}"),
                    Err(_) => "connection to the standby lost".into(),
                };
                let _ = tx.get_ref().shutdown(std::net::Shutdown::Both);
                return lost(why);
            },
            default(cfg.interval) => {
                if let Err(e) = tx.send(&Message::Heartbeat { fence: fence(last) }) {
                    return lost(format!("heartbeat failed: {e}"));
                }
            }
        }
    }
}

/// Sends the switch and waits for the standby's confirmation: `Ack` with the next generation
/// and the same epoch. Received frames go on to it meanwhile (its copy of the guest must see
/// them); heartbeats too. Returns the standby's generation.
fn switch(
    tx: &mut Channel<TcpStream>,
    replies: &Replies,
    inputs: &Receiver<InputFrame>,
    fence: Fence,
    cfg: &LinkConfig,
) -> Result<u64, String> {
    let net = |e: transport::Error| format!("switching to the standby: {e}");
    tx.send(&Message::Switch { fence }).map_err(net)?;
    let waiting = Instant::now();
    loop {
        let left = SWITCH_PATIENCE.saturating_sub(waiting.elapsed());
        select! {
            recv(replies) -> r => return match r {
                Ok(Ok(Received::Message(Message::Ack { fence: f })))
                    if f.epoch == fence.epoch && f.generation.0 == fence.generation.0 + 1 =>
                {
                    Ok(f.generation.0)
                }
                Ok(Ok(Received::Message(Message::Nack { message, .. }))) => {
                    Err(format!("the standby refused the switch: {message}"))
                }
                Ok(Ok(other)) => Err(format!("unexpected {other:?} from the standby after the switch")),
                Ok(Err(e)) => Err(format!("connection to the standby lost during the switch: {e}")),
                Err(_) => Err("connection to the standby lost during the switch".into()),
            },
            recv(inputs) -> f => {
                if let Ok(f) = f {
                    send_inputs(tx, cfg.generation, f, inputs).map_err(net)?;
                }
            }
            default(left.min(cfg.interval)) => {
                if left.is_zero() {
                    return Err(format!(
                        "the standby did not confirm the switch within {SWITCH_PATIENCE:?}"
                    ));
                }
                tx.send(&Message::Heartbeat { fence }).map_err(net)?;
            }
        }
    }
}

/// Whether to try zstd: after an epoch whose pages compressed to more than 90 %, the next
/// [`RAW_STREAK`] epochs go raw, then zstd is tried again.
#[derive(Default)]
struct CodecChoice {
    raw_until: u64,
}

const RAW_STREAK: u64 = 8;

impl CodecChoice {
    fn compress(&self, epoch: u64) -> bool {
        epoch >= self.raw_until
    }
    fn learn(&mut self, epoch: u64, compressed: bool, raw: u64, wire: u64) {
        if compressed && raw >= 1 << 20 && wire * 10 > raw * 9 {
            log::debug!(
                "pages do not compress ({wire} of {raw} bytes): raw for {RAW_STREAK} epochs"
            );
            self.raw_until = epoch + RAW_STREAK;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send_epoch(
    tx: &mut Channel<TcpStream>,
    replies: &Replies,
    inputs: &Receiver<InputFrame>,
    events: &Sender<LinkEvent>,
    cap: &Captured,
    cfg: &LinkConfig,
    codec: &mut CodecChoice,
    cache: &mut XorCache,
    first: bool,
) -> Result<SendStats, String> {
    let t0 = Instant::now();
    let fence = Fence {
        generation: Generation(cfg.generation),
        epoch: Epoch(cap.epoch),
    };
    let parts: Vec<(u64, &[u8])> = cap
        .runs
        .iter()
        .map(|r| (r.gpa, r.data.as_slice()))
        .collect();
    // One pass on every core: code each range and hash it. Pages that did not compress last
    // time are sent raw for a while (zstd on random data costs time and saves nothing).
    let compress = cap.full || codec.compress(cap.epoch);
    // A full sync replaces everything the standby had: no XOR base.
    let coded = if cap.full {
        cache.clear();
        encode_parts(&parts, compress)
    } else {
        encode_parts_xor(&parts, compress, cache)
    };
    let xor_ranges = coded
        .iter()
        .filter(|c| matches!(c.0.codec(), Codec::XorZstd | Codec::Patch))
        .count() as u64;
    let digest = combine_hashes(coded.iter().map(|c| c.1));
    let coded: Vec<Coded> = coded.into_iter().map(|c| c.0).collect();
    // What goes on the wire: raw parts straight from the captured pages.
    let ranges: Vec<PageRangeRef<'_>> = coded
        .iter()
        .zip(&parts)
        .map(|(c, &(gpa, data))| c.wire(gpa, data))
        .collect();
    let t_enc = t0.elapsed();
    let pages: u64 = ranges.iter().map(|r| r.pages as u64).sum();
    let mut stats = SendStats {
        raw_bytes: parts.iter().map(|p| p.1.len() as u64).sum(),
        ..SendStats::default()
    };
    let net = |e: transport::Error| format!("sending epoch {}: {e}", cap.epoch);
    let progress = cap.full.then(|| vmx::progress::reporter("full sync"));
    for attempt in 0..4 {
        let fault = cfg
            .hooks
            .bad_epoch
            .filter(|(e, _)| attempt == 0 && *e == cap.epoch)
            .map(|(_, f)| f);
        if cap.full {
            tx.send(&Message::FullSync {
                fence,
                mem_bytes: cfg.mem_bytes,
                vcpus: cfg.vcpus,
            })
            .map_err(net)?;
        }
        tx.send(&Message::EpochBegin { fence, pages })
            .map_err(net)?;
        let mut sent_pages = 0u64;
        // Borrowed: the ranges stay here for a resend and for the XOR cache.
        let to_send = ranges.iter().enumerate().map(|(i, &r)| {
            if fault == Some(Fault::Outside) && i == 0 {
                PageRangeRef {
                    gpa: cfg.mem_bytes,
                    ..r
                }
            } else {
                r
            }
        });
        send_ranges(tx, to_send, |n| {
            sent_pages += n;
            if let Some(p) = &progress {
                p(sent_pages * 4096, pages * 4096);
            }
        })
        .map_err(net)?;
        let wire: u64 = ranges.iter().map(|r| r.payload.len() as u64).sum();
        stats.page_bytes += wire;
        if attempt == 0 && !cap.full {
            codec.learn(cap.epoch, compress, stats.raw_bytes, wire);
        }
        if let Some(d) = cfg.hooks.send_delay {
            std::thread::sleep(d);
        }
        for s in &cap.sections {
            stats.state_bytes += s.data.len() as u64;
            tx.send(&Message::DeviceState {
                fence,
                name: s.name.clone(),
                version: s.version,
                data: s.data.clone(),
            })
            .map_err(net)?;
        }
        for (v, recs) in cap.records.iter().enumerate() {
            for chunk in recs.chunks(100_000) {
                let data = postcard::to_stdvec(chunk).expect("records encode");
                stats.record_bytes += data.len() as u64;
                tx.send(&Message::DeviceState {
                    fence,
                    name: format!("{RECORDS_PREFIX}{v}"),
                    version: 1,
                    data,
                })
                .map_err(net)?;
            }
        }
        let mut digest_sent = digest;
        let mut ranges_sent = ranges.len() as u64;
        match fault {
            Some(Fault::Digest) => digest_sent[0] ^= 1,
            Some(Fault::Truncate) => ranges_sent += 1,
            _ => {}
        }
        if let Some(f) = fault {
            log::warn!("test hook: epoch {} sent damaged ({f:?})", cap.epoch);
        }
        tx.send(&Message::EpochEnd {
            fence,
            ranges: ranges_sent,
            digest: digest_sent,
        })
        .map_err(net)?;
        stats.send = t0.elapsed();
        let t_sent = t0.elapsed();
        let patience = if cap.full || first {
            Duration::from_secs(60)
        } else {
            (cfg.interval * 20).max(Duration::from_secs(5))
        };
        // Heartbeats go on while the acknowledgement travels: a slow link must not look like
        // a dead primary to the standby.
        // Received frames go out meanwhile (input replication).
        let waiting = Instant::now();
        let reply = loop {
            let left = patience.saturating_sub(waiting.elapsed());
            select! {
                recv(replies) -> r => break r.map_err(|_| ()),
                recv(inputs) -> f => {
                    if let Ok(f) = f {
                        send_inputs(tx, cfg.generation, f, inputs).map_err(net)?;
                    }
                }
                default(left.min(cfg.interval)) => {
                    if left.is_zero() {
                        break Err(());
                    }
                    tx.send(&Message::Heartbeat { fence }).map_err(net)?;
                }
            }
        };
        match reply {
            Ok(Ok(Received::Message(Message::Ack { fence: f }))) if f == fence => {
                log::debug!(
                    "epoch {}: {} KiB dirty → {} KiB; encode+hash {:?}, send {:?}, ack {:?}",
                    cap.epoch,
                    stats.raw_bytes >> 10,
                    stats.page_bytes >> 10,
                    t_enc,
                    t_sent - t_enc,
                    t0.elapsed() - t_sent
                );
                if !cap.full {
                    cache.acknowledged(cap.epoch, codec, &parts, &ranges);
                }
                stats.xor_ranges = xor_ranges;
                stats.xor_cache_bytes = cache.bytes();
                return Ok(stats);
            }
            Ok(Ok(Received::Message(Message::Nack {
                fence: f,
                code,
                message,
            }))) => {
                stats.nacks += 1;
                let _ = events.send(LinkEvent::Nacked { epoch: cap.epoch });
                log::warn!(
                    "standby refused epoch {} ({code:?}: {message}); sending it again",
                    f.epoch.0
                );
                if code == NackCode::Stale {
                    return Err(format!("the standby says we are stale: {message}"));
                }
            }
            Ok(Ok(other)) => return Err(format!("unexpected reply {other:?}")),
            Ok(Err(e)) => return Err(format!("connection to the standby lost: {e}")),
            Err(_) => {
                return Err(format!(
                    "no acknowledgement of epoch {} within {patience:?}",
                    cap.epoch
                ))
            }
        }
    }
    Err(format!(
        "the standby refused epoch {} four times",
        cap.epoch
    ))
}

/// The primary's copies of recently sent pages, bounded in bytes: the base of XOR deltas.
///
/// ```text
///  epoch E sent ─▶ Ack(E) ─▶ remember(E, pages)     (the standby committed them: same bytes;
///                                                    a full sync is not kept)
///  epoch E+1: a run whose pages are all cached ─▶ a patch of the words that changed when
///             that is small; else XOR against the copies, zstd, and keep it when smaller
///             than zstd alone (encode_range_delta picks the smallest coding)
///  Ack(E+1): a run sent as a patch updates only those words of its copies
///  over the bound: the pages sent longest ago go first
/// ```
///
/// Only acknowledged epochs update it, and epochs go one at a time, so a copy here is exactly
/// the page the standby holds; a NACKed epoch is resent with the same coding against the same
/// base. A new link starts empty.
pub(crate) struct XorCache {
    pages: std::collections::HashMap<u64, (u64, Box<[u8]>)>,
    limit_pages: usize,
}

impl XorCache {
    pub(crate) fn new(limit_bytes: u64) -> Self {
        XorCache {
            pages: std::collections::HashMap::new(),
            limit_pages: (limit_bytes / PAGE as u64) as usize,
        }
    }

    fn clear(&mut self) {
        self.pages.clear();
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        (self.pages.len() * PAGE) as u64
    }

    /// Codes `data` (pages from `gpa`) against the cached copies of its pages, if every one
    /// is cached: a patch of the changed words where that is small (one compare pass, no
    /// zstd), else the XOR delta — built in `buf`, a buffer kept by the caller (a fresh
    /// 2 MiB one costs a page fault per 4 KiB) — coded by [`encode_range_delta`].
    fn code(&self, gpa: u64, data: &[u8], buf: &mut Vec<u8>) -> Option<PageRange> {
        let first = gpa / PAGE as u64;
        let copies = (0..(data.len() / PAGE) as u64)
            .map(|p| self.pages.get(&(first + p)).map(|c| &c.1[..]))
            .collect::<Option<Vec<&[u8]>>>()?;
        if let Some(r) = encode_patch(
            gpa,
            data.chunks_exact(PAGE).zip(copies.iter().copied()),
            data.len(),
        ) {
            return Some(r);
        }
        buf.resize(data.len(), 0);
        for ((o, d), c) in buf
            .chunks_exact_mut(PAGE)
            .zip(data.chunks_exact(PAGE))
            .zip(copies)
        {
            for ((o, d), c) in o.iter_mut().zip(d).zip(c) {
                *o = d ^ c;
            }
        }
        Some(encode_range_delta(gpa, data, buf))
    }

    /// Epoch `epoch` (not a full sync: copying all of memory would hold the sender, and its
    /// heartbeats, for longer than the standby waits) was committed by the standby: its pages
    /// are the base of the next deltas. Unless the next epoch goes raw (pages that do not
    /// compress) and takes no base: then its pages are dropped instead, so what stays is
    /// still what the standby holds. Copying them would be a pass over every page sent
    /// (measured: a fifth of the sender thread's time in `perf` of `run-pair` with `dirty`).
    fn acknowledged(
        &mut self,
        epoch: u64,
        codec: &CodecChoice,
        parts: &[(u64, &[u8])],
        coded: &[PageRangeRef<'_>],
    ) {
        if codec.compress(epoch + 1) {
            self.remember(epoch, parts, coded);
        } else {
            self.forget(parts);
        }
    }

    /// Drops the copies of the pages of `parts` (sent without being remembered: the
    /// standby's pages are no longer these copies).
    fn forget(&mut self, parts: &[(u64, &[u8])]) {
        for (gpa, data) in parts {
            let first = gpa / PAGE as u64;
            for n in first..first + (data.len() / PAGE) as u64 {
                self.pages.remove(&n);
            }
        }
    }

    /// The copies of `len` bytes of pages from `gpa`, if every one is cached.
    #[cfg(test)]
    fn base(&self, gpa: u64, len: usize) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        for p in 0..(len / PAGE) as u64 {
            out.extend_from_slice(&self.pages.get(&(gpa / PAGE as u64 + p))?.1);
        }
        Some(out)
    }

    /// Keeps the pages of an acknowledged epoch, then trims to the bound (oldest first).
    /// `coded[i]`, where given, is how `parts[i]` was sent: a part sent as a patch against
    /// these copies updates just its changed words (the rest of its pages are the copies
    /// already).
    fn remember(&mut self, epoch: u64, parts: &[(u64, &[u8])], coded: &[PageRangeRef<'_>]) {
        if self.limit_pages == 0 {
            return;
        }
        for (i, (gpa, data)) in parts.iter().enumerate() {
            let first = gpa / PAGE as u64;
            let pages = (data.len() / PAGE) as u64;
            let patch = coded.get(i).filter(|r| {
                r.codec == Codec::Patch
                    && r.gpa == *gpa
                    && r.pages as usize * PAGE == data.len()
                    && (first..first + pages).all(|n| self.pages.contains_key(&n))
            });
            if let Some(r) = patch {
                for n in first..first + pages {
                    if let Some((e, _)) = self.pages.get_mut(&n) {
                        *e = epoch;
                    }
                }
                let pages = &mut self.pages;
                let applied = transport::pages::patch_runs(
                    r.gpa,
                    r.payload,
                    data.len() / 8,
                    |word, mut new| {
                        // A run may cross pages.
                        let mut at = word * 8;
                        while !new.is_empty() {
                            let n = first + (at / PAGE) as u64;
                            let off = at % PAGE;
                            let take = new.len().min(PAGE - off);
                            let copy = &mut pages.get_mut(&n).expect("checked cached").1;
                            copy[off..off + take].copy_from_slice(&new[..take]);
                            new = &new[take..];
                            at += take;
                        }
                    },
                );
                if applied.is_ok() {
                    continue;
                }
                log::warn!("our own patch at {gpa:#x} does not apply: keeping the whole pages");
            }
            for (i, page) in data.chunks_exact(PAGE).enumerate() {
                let n = first + i as u64;
                match self.pages.get_mut(&n) {
                    Some((e, copy)) => {
                        *e = epoch;
                        copy.copy_from_slice(page);
                    }
                    None => {
                        self.pages.insert(n, (epoch, page.into()));
                    }
                }
            }
        }
        if self.pages.len() > self.limit_pages {
            let mut ages: Vec<(u64, u64)> = self.pages.iter().map(|(n, (e, _))| (*e, *n)).collect();
            ages.sort_unstable();
            let excess = self.pages.len() - self.limit_pages;
            for (_, n) in ages.into_iter().take(excess) {
                self.pages.remove(&n);
            }
        }
    }
}

const PAGE: usize = 4096;

thread_local! {
    /// Each coding thread's delta buffer (at most one run, 2 MiB).
    static DELTA: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A part coded for the wire: a range with its own payload, or the part's pages as they are
/// (raw; sent from the captured pages, never copied into a payload).
#[derive(Debug)]
pub(crate) enum Coded {
    /// Coded into a payload of its own (zstd, XOR, patch, zero; or raw after zstd failed).
    Range(PageRange),
    /// The pages of the part, raw.
    Raw,
}

impl Coded {
    /// As it goes on the wire, for the part `(gpa, data)` it was coded from.
    pub(crate) fn wire<'a>(&'a self, gpa: u64, data: &'a [u8]) -> PageRangeRef<'a> {
        match self {
            Coded::Range(r) => r.wire(),
            Coded::Raw => PageRangeRef::raw(gpa, data),
        }
    }

    /// Its codec.
    pub(crate) fn codec(&self) -> Codec {
        match self {
            Coded::Range(r) => r.codec,
            Coded::Raw => Codec::Raw,
        }
    }
}

/// [`encode_parts`] with XOR deltas against `cache` where every page of a part is cached.
fn encode_parts_xor(
    parts: &[(u64, &[u8])],
    compress: bool,
    cache: &XorCache,
) -> Vec<(Coded, [u8; 16])> {
    if !compress || cache.pages.is_empty() {
        return encode_parts(parts, compress);
    }
    parts
        .par_iter()
        .map(|(gpa, data)| {
            let coded = DELTA.with(|buf| {
                cache
                    .code(*gpa, data, &mut buf.borrow_mut())
                    .unwrap_or_else(|| encode_range(*gpa, data, None))
            });
            (Coded::Range(coded), range_hash(*gpa, data))
        })
        .collect()
}

/// Codes each part (zstd, or raw when `compress` is off; zero pages always as zero ranges)
/// and hashes it, in one pass on every core. A raw part is left where it is ([`Coded::Raw`]).
pub(crate) fn encode_parts(parts: &[(u64, &[u8])], compress: bool) -> Vec<(Coded, [u8; 16])> {
    parts
        .par_iter()
        .map(|&(gpa, data)| {
            let c = if compress {
                Coded::Range(encode_range(gpa, data, None))
            } else if is_zero(data) {
                Coded::Range(PageRange {
                    gpa,
                    pages: (data.len() / PAGE) as u32,
                    codec: Codec::Zero,
                    payload: transport::Bytes::new(),
                })
            } else {
                Coded::Raw
            };
            (c, range_hash(gpa, data))
        })
        .collect()
}

/// Sends ranges in `Pages` frames of about 8 MiB each; `sent(pages)` after every frame.
pub(crate) fn send_ranges<'a>(
    tx: &mut Channel<TcpStream>,
    ranges: impl IntoIterator<Item = PageRangeRef<'a>>,
    mut sent: impl FnMut(u64),
) -> transport::Result<()> {
    let mut batch: Vec<PageRangeRef<'a>> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut flush = |tx: &mut Channel<TcpStream>, batch: &mut Vec<PageRangeRef<'a>>| {
        if batch.is_empty() {
            return Ok(());
        }
        tx.send_page_refs(batch)?;
        sent(batch.iter().map(|r| r.pages as u64).sum());
        batch.clear();
        Ok(())
    };
    for r in ranges {
        batch_bytes += r.payload.len() + 32;
        batch.push(r);
        if batch_bytes >= 8 << 20 {
            flush(tx, &mut batch)?;
            batch_bytes = 0;
        }
    }
    flush(tx, &mut batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The range a part was coded into (not left raw).
    fn owned(c: &Coded) -> &PageRange {
        match c {
            Coded::Range(r) => r,
            Coded::Raw => panic!("a raw part has no range of its own"),
        }
    }

    /// Uncompressed, a part goes raw from the captured pages (no payload of its own), zero
    /// pages as a zero range; either way the receiver decodes the pages and their hash.
    #[test]
    fn raw_parts_are_sent_from_the_captured_pages() {
        let data: Vec<u8> = (0..3 * PAGE).map(|i| (i * 7 % 253) as u8).collect();
        let zeros = vec![0u8; 2 * PAGE];
        let parts = [(0x4000u64, &data[..]), (0x10000, &zeros[..])];
        for compress in [false, true] {
            let coded = encode_parts(&parts, compress);
            if !compress {
                assert!(matches!(coded[0].0, Coded::Raw));
            }
            assert_eq!(coded[1].0.codec(), Codec::Zero);
            let refs: Vec<PageRangeRef<'_>> = coded
                .iter()
                .zip(&parts)
                .map(|(c, &(g, d))| c.0.wire(g, d))
                .collect();
            let batch = transport::pages::decode_batch(&{
                let mut b = Vec::new();
                transport::pages::encode_batch_into(&refs, &mut b);
                b
            })
            .unwrap();
            let back = transport::pages::decode_ranges(batch, 1 << 30, &|_, _| None).unwrap();
            assert_eq!(
                back,
                vec![
                    (0x4000, data.clone().into()),
                    (0x10000, zeros.clone().into())
                ]
            );
            for ((_, h), &(g, d)) in coded.iter().zip(&parts) {
                assert_eq!(*h, range_hash(g, d));
            }
        }
    }

    #[test]
    fn the_xor_cache_holds_acknowledged_pages_and_drops_the_oldest_over_its_bound() {
        let mut c = XorCache::new(3 * PAGE as u64);
        // Pages that zstd cannot shrink, so only a delta can.
        let noise = |seed: u64| -> Vec<u8> {
            let mut x = seed;
            (0..2 * PAGE)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect()
        };
        let a = noise(1);
        let b = noise(2);
        c.remember(1, &[(0, &a)], &[]);
        assert_eq!(c.base(0, 2 * PAGE), Some(a.clone()));
        assert_eq!(
            c.base(0, 3 * PAGE),
            None,
            "every page of a run must be cached"
        );
        c.remember(2, &[(8 * PAGE as u64, &b)], &[]);
        // Over the bound (4 pages > 3): one page of epoch 1 went.
        assert_eq!(c.bytes(), 3 * PAGE as u64);
        assert_eq!(c.base(8 * PAGE as u64, 2 * PAGE), Some(b.clone()));
        // The oldest page went first (epoch 1, page 0); page 1 is still there.
        assert_eq!(c.base(0, PAGE), None);
        let base = c.base(PAGE as u64, PAGE).expect("page 1 cached");
        // Deltas are chosen where they are smaller, and decode against the same base.
        let mut next = a[PAGE..].to_vec();
        next[10] = 9;
        let parts = [(PAGE as u64, &next[..])];
        let coded = encode_parts_xor(&parts, true, &c);
        assert_eq!(coded[0].0.codec(), Codec::Patch);
        let back =
            transport::pages::decode_range(owned(&coded[0].0), 1 << 30, Some(&base)).unwrap();
        assert_eq!(back, next);
        // Remembering a patch updates the copy to the page sent.
        c.remember(3, &parts, &[owned(&coded[0].0).wire()]);
        assert_eq!(c.base(PAGE as u64, PAGE), Some(next.clone()));
        // Many changed words: the XOR's zstd is smaller than a patch.
        let mut busy = next.clone();
        for w in busy.chunks_exact_mut(16) {
            w[0] ^= 1;
        }
        let parts = [(PAGE as u64, &busy[..])];
        let coded = encode_parts_xor(&parts, true, &c);
        assert_eq!(coded[0].0.codec(), Codec::XorZstd);
        let back =
            transport::pages::decode_range(owned(&coded[0].0), 1 << 30, Some(&next)).unwrap();
        assert_eq!(back, busy);
        c.remember(4, &parts, &[owned(&coded[0].0).wire()]);
        assert_eq!(c.base(PAGE as u64, PAGE), Some(busy));
        // An epoch followed by raw ones is not kept, and its pages' old copies go: they are
        // no longer what the standby holds. Copies of other pages stay.
        let mut raw_next = CodecChoice { raw_until: 0 };
        raw_next.learn(5, true, 1 << 20, 1 << 20);
        assert!(!raw_next.compress(6));
        let mut c = XorCache::new(64 * PAGE as u64);
        c.acknowledged(
            4,
            &CodecChoice { raw_until: 0 },
            &[(0, &a), (8 * PAGE as u64, &b)],
            &[],
        );
        assert_eq!(c.bytes(), 4 * PAGE as u64);
        c.acknowledged(5, &raw_next, &[(PAGE as u64, &next)], &[]);
        assert_eq!(c.base(0, PAGE), Some(a[..PAGE].to_vec()));
        assert_eq!(c.base(PAGE as u64, PAGE), None, "sent raw: forgotten");
        assert_eq!(c.base(8 * PAGE as u64, 2 * PAGE), Some(b.clone()));
        assert_eq!(c.bytes(), 3 * PAGE as u64);
        // A disabled cache keeps nothing.
        let mut off = XorCache::new(0);
        off.remember(1, &[(0, &a)], &[]);
        assert_eq!(off.bytes(), 0);
    }

    /// CPU time of the sender's coding of one epoch: a 16 MiB hot set whose pages each
    /// changed in one qword since the acknowledged copy (what `stall-probe` dirties).
    /// `cargo test -p ft --release -- --ignored --nocapture sender_coding_cpu`.
    #[test]
    #[ignore = "a measurement: run by hand"]
    fn sender_coding_cpu() {
        let cpu = crate::process_cpu;
        const MIB: usize = 16;
        let mut mem: Vec<u8> = (0..MIB << 20).map(|i| (i * 31 % 251) as u8).collect();
        let mut cache = XorCache::new(64 << 20);
        let runs: Vec<(u64, usize)> = (0..MIB / 2).map(|i| ((i << 21) as u64, 2 << 20)).collect();
        let parts = |m: &[u8]| -> Vec<(u64, Vec<u8>)> {
            runs.iter()
                .map(|&(g, n)| (g, m[g as usize..g as usize + n].to_vec()))
                .collect()
        };
        let p0 = parts(&mem);
        let refs: Vec<(u64, &[u8])> = p0.iter().map(|(g, d)| (*g, d.as_slice())).collect();
        cache.remember(1, &refs, &[]);
        let (mut enc, mut rem, n) = (std::time::Duration::ZERO, std::time::Duration::ZERO, 60);
        for e in 2..2 + n {
            for page in 0..(MIB << 20) / PAGE {
                mem[page * PAGE + (e as usize * 8) % PAGE] ^= 0x5a;
            }
            let p = parts(&mem);
            let refs: Vec<(u64, &[u8])> = p.iter().map(|(g, d)| (*g, d.as_slice())).collect();
            let t = cpu();
            let coded = encode_parts_xor(&refs, true, &cache);
            let _ = combine_hashes(coded.iter().map(|c| c.1));
            enc += cpu() - t;
            assert!(coded.iter().all(|c| c.0.codec() == Codec::Patch));
            let ranges: Vec<PageRangeRef<'_>> = coded.iter().map(|c| owned(&c.0).wire()).collect();
            let t = cpu();
            cache.remember(e, &refs, &ranges);
            rem += cpu() - t;
        }
        // Where coding goes, one step at a time over the same 16 MiB (single thread).
        let p = parts(&mem);
        let step = |name: &str, f: &dyn Fn()| {
            let t = cpu();
            for _ in 0..20 {
                f();
            }
            println!(
                "  {name}: {:.2} ms per 16 MiB",
                (cpu() - t).as_secs_f64() * 1e3 / 20.0
            );
        };
        step("to_vec", &|| {
            for (_, d) in &p {
                std::hint::black_box(d.to_vec());
            }
        });
        step("base", &|| {
            for (g, d) in &p {
                std::hint::black_box(cache.base(*g, d.len()));
            }
        });
        let bases: Vec<Vec<u8>> = p
            .iter()
            .map(|(g, d)| cache.base(*g, d.len()).unwrap())
            .collect();
        step("xor", &|| {
            for ((_, d), b) in p.iter().zip(&bases) {
                let x: Vec<u8> = d.iter().zip(b).map(|(a, b)| a ^ b).collect();
                std::hint::black_box(x);
            }
        });
        let xs: Vec<Vec<u8>> = p
            .iter()
            .zip(&bases)
            .map(|((_, d), b)| d.iter().zip(b).map(|(a, b)| a ^ b).collect())
            .collect();
        step("zstd of the delta", &|| {
            for x in &xs {
                std::hint::black_box(transport::pages::encode_range_with(
                    0,
                    x,
                    None,
                    transport::pages::Codec::Zstd,
                ));
            }
        });
        step("range hashes (XXH3-128)", &|| {
            for (g, d) in &p {
                std::hint::black_box(range_hash(*g, d));
            }
        });
        println!(
            "{MIB} MiB epoch, CPU per epoch: coding {:.2} ms, remembering {:.2} ms",
            enc.as_secs_f64() * 1e3 / n as f64,
            rem.as_secs_f64() * 1e3 / n as f64
        );
    }
}
