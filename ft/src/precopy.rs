//! The full sync of a new standby while the guest keeps running (pre-copy): the standby a
//! primary connects to at start, and every one that joins later.
//!
//! ```text
//!  primary (unprotected, guest running)                     new standby
//!   │ FullSync{fence(g, E), mem_bytes, vcpus} ───────────────▶ │ new base image (memory only)
//!   │ reset dirty log                                         │
//!   │ PreCopy{round 0, every page} Pages… PreCopyEnd{digest} ─▶ │ verify round, write into base
//!   │ dirty log → PreCopy{round 1, pages dirtied meanwhile} … ─▶ │   "
//!   │   … until a round is small (≤ STOP_PAGES), stops        │
//!   │     shrinking, or MAX_ROUNDS                             │
//!   │ ◀────────────── PreCopyEnd{last round} (verified) ───── │ (each round's end is sent
//!   │                                                         │  back once it is verified)
//!   │ stun: epoch E = pages dirtied during the last round     │
//!   │       + all state, output held from here on ───────────▶ │ verify, build the VM, base →
//!   │                                                         │ memory, commit E (all or none)
//!   │ ◀──────────────────────────────────────────── Ack{E} ── │ protecting
//!   │ PROTECTED again: epochs every interval                  │
//! ```
//!
//! Reading pages while the guest writes them is safe because the dirty log is reset *before*
//! a round reads: a page changed while (or after) it was read is dirty again and goes out in
//! the next round or in epoch E. Nothing of the base counts until E commits.
//!
//! Round 0 does not read the pages nothing ever touched ([`DirtyLog::never_touched`]): they
//! go as zero ranges. Reading them would map the host's shared zero page at each, and the
//! guest's first write to one would then cost a copy-on-write fault with a TLB shootdown.
//!
//! Disks go in the same rounds (`[disk]` above): each round ends with `DeviceState` sections
//! `disk-writes/<d>/<p>` (a [`devices::virtio::block::DiskWrites`] each, at most
//! [`vmx::machine::DISK_WRITES_PART_BYTES`] of data) before its `PreCopyEnd`. Round 0 carries
//! every non-zero block (`full`: the replica is rebuilt from zeros), later rounds the blocks
//! written since the round before, and epoch E those written during the last round — taken
//! with the guest stunned. The dirty blocks are taken under the device's lock *before* the
//! blocks are read (see [`vmx::virtio::DiskTracker`]), the same rule as for pages. The
//! standby keeps the disk rounds with the base and writes them into its replica, before E's
//! own writes, only when E commits.

use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use monitor::dirty::MAX_RUN_PAGES;
use monitor::{DirtyLog, DirtyPages};
use serde::Serialize;
use transport::{Channel, Codec, Fence, Message, PageRange, Received};

use super::link::{encode_parts, send_ranges};
use checkpoint::digest::{combine_hashes, range_hash};

/// A round this small (pages) ends the pre-copy: the rest goes in the completing epoch.
pub const STOP_PAGES: u64 = 2048;
/// Most pre-copy rounds.
pub const MAX_ROUNDS: u32 = 8;
/// Pages read and coded at a time (bounds the memory a round needs).
const CHUNK_PAGES: u64 = 8192;

/// One round of a pre-copy.
#[derive(Clone, Debug, Serialize)]
pub struct RoundReport {
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire (after compression).
    pub wire_bytes: u64,
    /// Disk bytes sent in the round.
    pub disk_bytes: u64,
    /// How long the round took.
    pub ms: f64,
}

/// What a pre-copy did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PreCopyReport {
    /// The rounds, in order.
    pub rounds: Vec<RoundReport>,
    /// Start → last round sent.
    pub ms: f64,
}

/// Where a running pre-copy is (shown in the primary's `status` as its `sync`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundProgress {
    /// "pre-copy round N".
    pub phase: String,
    /// Pages of the current round.
    pub round_pages: u64,
    /// Of them, sent so far.
    pub sent_pages: u64,
    /// Since the pre-copy started, ms.
    pub elapsed_ms: u64,
}

/// Sends a full sync of the running VM as pre-copy rounds over `tx`, announcing `fence` (the
/// epoch that will complete the sync). `status` shows the phase while it runs.
pub fn run(
    log: &DirtyLog,
    disks: Option<&vmx::virtio::DiskTracker>,
    tx: &mut Channel<TcpStream>,
    fence: Fence,
    vcpus: u32,
    status: &Mutex<Option<RoundProgress>>,
) -> Result<PreCopyReport, String> {
    let t0 = Instant::now();
    let mem_bytes = log.mem_bytes();
    let pages = log.pages();
    let net = |e: transport::Error| format!("pre-copy to the new standby: {e}");
    tx.send(&Message::FullSync {
        fence,
        mem_bytes,
        vcpus,
    })
    .map_err(net)?;
    // Everything the guest writes from here on is in the next bitmap.
    log.take().map_err(|e| format!("dirty log: {e}"))?;
    let mut dirty = DirtyPages::all(pages);
    // Pages nothing ever touched go as zero ranges, unread (taken after the log's reset: one
    // touched from here on is in the next round).
    let mut untouched = log.never_touched().unwrap_or_else(|e| {
        log::warn!("{e}: round 0 reads every page");
        DirtyPages::none(pages)
    });
    let mut report = PreCopyReport::default();
    let mut prev = u64::MAX;
    for round in 0..MAX_ROUNDS {
        let runs = dirty.without(&untouched).runs();
        let zero_runs = untouched.runs();
        untouched = DirtyPages::none(pages);
        let n: u64 = runs.iter().chain(&zero_runs).map(|r| r.1).sum();
        let r = send_round(
            log, disks, tx, fence, round, &runs, &zero_runs, n, status, t0,
        )?;
        log::info!(
            "pre-copy round {round}: {n} pages ({} MiB, {} KiB on the wire) and {} KiB of disk \
             in {:.0} ms",
            (n * 4096) >> 20,
            r.wire_bytes >> 10,
            r.disk_bytes >> 10,
            r.ms
        );
        report.rounds.push(r);
        // Small enough, or no longer shrinking (the guest dirties as fast as we send): the
        // rest goes in the completing epoch, with the guest stunned.
        if round > 0 && (n <= STOP_PAGES || n * 10 > prev * 9) {
            break;
        }
        if round + 1 == MAX_ROUNDS {
            break;
        }
        prev = n;
        dirty = log.take().map_err(|e| format!("dirty log: {e}"))?;
    }
    let last = report.rounds.len() as u32 - 1;
    await_round(tx, last)?;
    report.ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// How long the standby may take to verify the rounds sent (it hashes every page).
pub const ROUND_PATIENCE: Duration = Duration::from_secs(60);

/// Waits until the standby verified round `last` (it sends each round's end back, or refuses
/// it): the completing epoch is captured only then, not queued behind rounds still being
/// verified (and, with both on one host, not while the standby's verification takes the CPUs).
fn await_round(tx: &mut Channel<TcpStream>, last: u32) -> Result<(), String> {
    let net = |e: transport::Error| format!("pre-copy: waiting for the standby: {e}");
    tx.get_ref()
        .set_read_timeout(Some(ROUND_PATIENCE))
        .map_err(|e| net(transport::Error::Io(e)))?;
    let r = loop {
        match tx.recv() {
            Ok(Received::Message(Message::PreCopyEnd { round, .. })) if round == last => {
                break Ok(())
            }
            Ok(Received::Message(Message::PreCopyEnd { .. })) => {}
            Ok(Received::Message(Message::Nack { message, .. })) => {
                break Err(format!("the standby refused the pre-copy: {message}"))
            }
            Ok(other) => break Err(format!("pre-copy: unexpected {other:?} from the standby")),
            Err(e) => break Err(net(e)),
        }
    };
    tx.get_ref()
        .set_read_timeout(None)
        .map_err(|e| net(transport::Error::Io(e)))?;
    r
}

#[allow(clippy::too_many_arguments)]
fn send_round(
    log: &DirtyLog,
    disks: Option<&vmx::virtio::DiskTracker>,
    tx: &mut Channel<TcpStream>,
    fence: Fence,
    round: u32,
    runs: &[(u64, u64)],
    zero_runs: &[(u64, u64)],
    pages: u64,
    status: &Mutex<Option<RoundProgress>>,
    t0: Instant,
) -> Result<RoundReport, String> {
    let net = |e: transport::Error| format!("pre-copy to the new standby: {e}");
    let start = Instant::now();
    let (wire, disk_bytes) = send_round_parts(
        log, disks, tx, fence, round, runs, zero_runs, pages, status, t0,
    )
    .map_err(|e| match e {
        RoundError::Net(e) => net(e),
        RoundError::Disk(e) => format!("pre-copy: reading a disk: {e}"),
    })?;
    Ok(RoundReport {
        pages,
        wire_bytes: wire,
        disk_bytes,
        ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

/// Why a round failed.
enum RoundError {
    Net(transport::Error),
    Disk(String),
}

impl From<transport::Error> for RoundError {
    fn from(e: transport::Error) -> Self {
        RoundError::Net(e)
    }
}

/// Sends one round: its pages, then its disk sections; (page bytes on the wire, disk bytes).
#[allow(clippy::too_many_arguments)]
fn send_round_parts(
    log: &DirtyLog,
    disks: Option<&vmx::virtio::DiskTracker>,
    tx: &mut Channel<TcpStream>,
    fence: Fence,
    round: u32,
    runs: &[(u64, u64)],
    zero_runs: &[(u64, u64)],
    pages: u64,
    status: &Mutex<Option<RoundProgress>>,
    t0: Instant,
) -> Result<(u64, u64), RoundError> {
    tx.send(&Message::PreCopy {
        fence,
        round,
        pages,
    })?;
    let what = format!("pre-copy round {round}");
    let progress = vmx::progress::reporter(what.clone());
    let mut hashes = Vec::new();
    let mut ranges = 0u64;
    let mut done = 0u64;
    let mut wire = 0u64;
    // Untouched pages: zero ranges, hashed as the zeros they are, never read.
    let zeros = vec![0u8; MAX_RUN_PAGES as usize * 4096];
    let zero_ranges: Vec<PageRange> = zero_runs
        .iter()
        .map(|&(first, n)| {
            let gpa = first * 4096;
            hashes.push(range_hash(gpa, &zeros[..(n * 4096) as usize]));
            PageRange {
                gpa,
                pages: n as u32,
                codec: Codec::Zero,
                payload: transport::Bytes::new(),
            }
        })
        .collect();
    ranges += zero_ranges.len() as u64;
    send_ranges(tx, zero_ranges.iter().map(PageRange::wire), |n| {
        done += n;
        progress(done * 4096, pages * 4096);
    })?;
    let mut i = 0;
    while i < runs.len() {
        // Up to CHUNK_PAGES pages of runs: copy them out (the guest runs on), code, send.
        let mut j = i;
        let mut chunk = 0;
        while j < runs.len() && (j == i || chunk + runs[j].1 <= CHUNK_PAGES) {
            chunk += runs[j].1;
            j += 1;
        }
        let copies = log
            .copy_runs(&runs[i..j])
            .map_err(|e| transport::Error::Io(std::io::Error::other(e.to_string())))?;
        let parts: Vec<(u64, &[u8])> = copies.iter().map(|r| (r.gpa, r.data.as_slice())).collect();
        let coded = encode_parts(&parts, true);
        hashes.extend(coded.iter().map(|c| c.1));
        ranges += coded.len() as u64;
        let refs: Vec<_> = coded
            .iter()
            .zip(&parts)
            .map(|(c, &(gpa, data))| c.0.wire(gpa, data))
            .collect();
        wire += refs.iter().map(|r| r.payload.len() as u64).sum::<u64>();
        send_ranges(tx, refs, |n| {
            done += n;
            progress(done * 4096, pages * 4096);
        })?;
        if let Ok(mut s) = status.lock() {
            *s = Some(RoundProgress {
                phase: what.clone(),
                round_pages: pages,
                sent_pages: done,
                elapsed_ms: t0.elapsed().as_millis() as u64,
            });
        }
        i = j;
    }
    progress(pages * 4096, pages * 4096);
    // The disks: every non-zero block in round 0, then what was written since.
    let mut disk_bytes = 0;
    if let Some(d) = disks {
        for (disk, w) in d
            .take(round == 0)
            .map_err(|e| RoundError::Disk(e.to_string()))?
        {
            disk_bytes += w.bytes();
            for (part, p) in w
                .split(vmx::machine::DISK_WRITES_PART_BYTES)
                .into_iter()
                .enumerate()
            {
                tx.send(&Message::DeviceState {
                    fence,
                    name: checkpoint::SectionId::DiskWrites {
                        disk,
                        part: part as u32,
                    }
                    .name(),
                    version: 1,
                    data: postcard::to_stdvec(&p).map_err(|e| RoundError::Disk(e.to_string()))?,
                })?;
            }
        }
    }
    tx.send(&Message::PreCopyEnd {
        fence,
        round,
        ranges,
        digest: combine_hashes(hashes),
    })?;
    Ok((wire, disk_bytes))
}

/// Starts a pre-copy on its own thread; `done` gets the channel back (for the link) or why it
/// failed.
///
/// The pre-copy reads, codes and hashes all of memory while the guest runs: it codes on a
/// pool of its own, `max(1, CPUs - vCPUs)` threads, so that it leaves the guest's share of
/// the host's CPUs to the vCPUs instead of taking every core (epochs keep the shared pool).
pub fn spawn(
    log: DirtyLog,
    disks: Option<vmx::virtio::DiskTracker>,
    mut tx: Channel<TcpStream>,
    fence: Fence,
    vcpus: u32,
    status: Arc<Mutex<Option<RoundProgress>>>,
    done: impl FnOnce(Result<(Channel<TcpStream>, PreCopyReport), String>) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("pre-copy".into())
        .spawn(move || {
            let pool = crate::guest_side_pool(vcpus, "pre-copy");
            let r = crate::in_pool(pool.as_ref(), || {
                run(&log, disks.as_ref(), &mut tx, fence, vcpus, &status)
            });
            done(r.map(|rep| (tx, rep)));
        })
        .map(|_| ())
}

/// Connect-retry pace of a primary that redials its configured standby.
pub const REDIAL_EVERY: Duration = Duration::from_millis(500);
