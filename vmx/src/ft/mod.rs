//! Fault tolerance: a primary replicated to a hot standby, with output commit.
//!
//! ```text
//!            primary host                                   standby host
//!  ┌──────────────────────────────┐   epochs (transport)  ┌──────────────────────────────┐
//!  │ guest ─▶ output ring ─▶ hold │ ────────────────────▶ │ staging ─▶ commit ─▶ replica │
//!  │  every interval: stun, dirty │ ◀──────── ack ─────── │  (VM memory, ready to run)   │
//!  │  pages + state, unstun       │                       │                              │
//!  │  on ack E: release E's output│                       │ primary dead (EOF, or 4 ×    │
//!  └──────────────┬───────────────┘                       │ interval of silence):        │
//!                 │ records (generation g)                │ generation g+1, activate,    │
//!                 ▼                                       │ release retained output from │
//!         ┌───────────────┐ ◀──────── records (g+1) ───── │ the sink's cursor, run on    │
//!         │  output sink  │  refuses generations < newest └──────────────────────────────┘
//!         └───────────────┘
//! ```
//!
//! * [`Protector`] is the primary's side inside the vmx run loop: epoch timer, capture, held
//!   output, release on acknowledgement, and the throttle.
//! * Throttle (the standby falls behind): if epoch E is not acknowledged when E+1 is due, the
//!   guest is stunned until the acknowledgement comes, then E+1 is captured at once and the
//!   guest continues. Nothing is ever buffered beyond one epoch in flight plus the one being
//!   filled, and the guest can never run more than one interval ahead of the standby.
//! * [`standby`] runs the other side; [`sink`] is the outside world.
//! * Re-protection: an unprotected primary takes a new standby (one that joins through
//!   [`Protector::accept_joins`], or one found by [`Protector::redial`]) and syncs it by
//!   [`precopy`] while the guest runs; the first epoch after the rounds completes the sync.
//! * [`arbiter`] decides role changes (no split brain); [`pair`] and [`netlab`] run whole pairs
//!   of processes for tests, `cargo xtask run-pair`, `soak` and the benchmarks.

pub mod arbiter;
pub mod epoch;
pub mod link;
pub mod netlab;
pub mod pair;
pub mod precopy;
pub mod sink;
pub mod standby;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{never, unbounded, Receiver, Sender};
use devices::Record;
use serde_json::{json, Value};
use transport::{Channel, Epoch, Fence, Generation, Intent, Message, Psk, Received};

use crate::machine::{power_on, Boot, Options, Outcome, Vmx};
use crate::Result;
use arbiter::Arbiter;
use link::{Link, LinkEvent};
use sink::SinkClient;

/// Default epoch interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);
/// Pauses kept for the percentiles.
const PAUSE_WINDOW: usize = 8192;

/// Milliseconds since the Unix epoch (timestamps other processes can compare).
pub fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

/// The p-th percentile (0..=100) of `v` (sorted copy; 0 when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)]
}

/// Counters of a protected VM (FTM's names where it has them).
#[derive(Clone, Debug, Default)]
pub struct FtStats {
    /// Full syncs sent.
    pub full_syncs: u64,
    /// Epochs acknowledged.
    pub epochs: u64,
    /// Dirty bytes captured by epochs (full syncs not counted).
    pub mem_bytes: u64,
    /// Bytes captured by full syncs.
    pub full_sync_bytes: u64,
    /// Page bytes on the wire.
    pub page_wire_bytes: u64,
    /// State bytes sent.
    pub state_bytes: u64,
    /// Held-output bytes sent to the standby.
    pub record_bytes: u64,
    /// NACKs received.
    pub nacks: u64,
    /// Times the guest was stunned to wait for the standby.
    pub throttles: u64,
    /// Time the guest spent stunned waiting for the standby.
    pub throttled: Duration,
    /// Epoch pauses, ms (the last 8,192).
    pub pauses_ms: Vec<f64>,
    /// Of each pause, the monitor's SAVE step (dirty log, page copies, vCPU state), ms.
    pub save_steps_ms: Vec<f64>,
    /// Capture → acknowledgement of the last epoch.
    pub lag: Duration,
    /// Records released to the outside.
    pub released: u64,
    /// Times a joined standby completed its full sync.
    pub reprotections: u64,
}

/// Joins and syncs of new standbys, for the run loop (see [`Protector::on_aux`]).
pub enum Aux {
    /// A standby is ready for a full sync over `chan`.
    Joined {
        /// The authenticated channel.
        chan: Box<Channel<TcpStream>>,
        /// Who.
        peer: String,
    },
    /// The pre-copy to `peer` ended.
    PreCopied {
        /// The channel back and what it did, or why it failed.
        result: std::result::Result<(Box<Channel<TcpStream>>, precopy::PreCopyReport), String>,
        /// Who.
        peer: String,
    },
}

struct Resync {
    peer: String,
    started: Instant,
    epoch: u64,
    report: Option<precopy::PreCopyReport>,
    completing_pages: u64,
}

struct InFlight {
    epoch: u64,
    records: Vec<Vec<Record>>,
    captured: Instant,
}

/// The primary's replication state inside the vmx run loop.
pub struct Protector {
    generation: u64,
    interval: Duration,
    link: Option<Link>,
    events: Receiver<LinkEvent>,
    sink: Option<SinkClient>,
    next_epoch: u64,
    last_ack: u64,
    in_flight: Option<InFlight>,
    next_tick: Option<Instant>,
    throttled_since: Option<Instant>,
    lost: Option<String>,
    arbiter: Option<Arc<dyn Arbiter>>,
    sink_addr: Option<String>,
    aux_tx: Sender<Aux>,
    aux_rx: Receiver<Aux>,
    /// A standby joined and its full sync is under way.
    syncing: Option<Resync>,
    /// The sync whose completing epoch is in flight.
    completing: Option<Resync>,
    sync_status: Arc<Mutex<Value>>,
    last_sync: Value,
    /// Set while a redial thread should look for a standby.
    want_standby: Arc<AtomicBool>,
    /// Counters.
    pub stats: FtStats,
    /// Extra facts for `status` (e.g. the failover that made this primary).
    pub notes: Value,
}

impl Protector {
    /// A primary of `generation` releasing to `sink` (or only to the local text output).
    /// Without a link it runs unprotected.
    pub fn new(generation: u64, interval: Duration, sink: Option<SinkClient>) -> Self {
        let (aux_tx, aux_rx) = unbounded();
        Protector {
            generation,
            interval,
            link: None,
            events: never(),
            sink,
            next_epoch: 1,
            last_ack: 0,
            in_flight: None,
            next_tick: None,
            throttled_since: None,
            lost: None,
            arbiter: None,
            sink_addr: None,
            aux_tx,
            aux_rx,
            syncing: None,
            completing: None,
            sync_status: Arc::new(Mutex::new(Value::Null)),
            last_sync: Value::Null,
            want_standby: Arc::new(AtomicBool::new(true)),
            stats: FtStats::default(),
            notes: Value::Null,
        }
    }

    /// Arbitrates role changes with `arbiter`; `sink_addr` is where to reconnect as a new
    /// generation.
    pub fn with_arbiter(mut self, arbiter: Arc<dyn Arbiter>, sink_addr: Option<String>) -> Self {
        self.arbiter = Some(arbiter);
        self.sink_addr = sink_addr;
        self
    }

    /// Whether a standby protects the VM.
    pub fn protected(&self) -> bool {
        self.link.is_some()
    }

    /// The generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Starts protecting over `link`: captures a full sync now (the guest may be paused or
    /// running) and hands it to the link. Output is held from here on.
    pub fn protect(&mut self, vmx: &mut Vmx, link: Link) -> Result<()> {
        vmx.hold_output(true);
        let cap = vmx.capture_epoch(self.next_epoch, true)?;
        log::info!(
            "role: primary (generation {}), full sync of {} MiB to the standby",
            self.generation,
            cap.runs.iter().map(|r| r.data.len()).sum::<usize>() >> 20
        );
        self.events = link.events();
        self.link = Some(link);
        self.lost = None;
        self.want_standby.store(false, Ordering::Relaxed);
        self.stats.full_syncs += 1;
        self.dispatch(cap);
        Ok(())
    }

    /// Joins and syncs of new standbys, for the run loop to select on.
    pub fn aux(&self) -> Receiver<Aux> {
        self.aux_rx.clone()
    }

    /// Accepts standbys that join (`tandem standby --join`) on `listener`, from now on. A
    /// joiner is synced only while this VM is unprotected; otherwise it is told why not.
    pub fn accept_joins(&mut self, listener: TcpListener, psk: Option<Psk>) {
        let tx = self.aux_tx.clone();
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        log::info!("accepting standbys that join at {addr}");
        let r = std::thread::Builder::new()
            .name("join-listener".into())
            .spawn(move || loop {
                match accept(&listener, psk.as_ref(), Intent::Join) {
                    Ok((chan, peer)) => {
                        if tx
                            .send(Aux::Joined {
                                chan: Box::new(chan),
                                peer,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        log::error!("join listener at {addr}: {e}; no more joins accepted");
                        return;
                    }
                }
            });
        if let Err(e) = r {
            log::error!("cannot start the join listener: {e}");
        }
    }

    /// While unprotected, dials the standby address `peer` every
    /// [`precopy::REDIAL_EVERY`] until a standby there answers, then syncs it.
    pub fn redial(&mut self, peer: String, psk: Option<Psk>) {
        let tx = self.aux_tx.clone();
        let want = self.want_standby.clone();
        let r = std::thread::Builder::new()
            .name("redial".into())
            .spawn(move || {
                let mut failures = 0u64;
                loop {
                    std::thread::sleep(precopy::REDIAL_EVERY);
                    if !want.load(Ordering::Relaxed) {
                        failures = 0;
                        continue;
                    }
                    match connect(&peer, psk.as_ref(), Duration::ZERO) {
                        Ok(chan) => {
                            want.store(false, Ordering::Relaxed);
                            let chan = Box::new(chan);
                            let peer = peer.clone();
                            if tx.send(Aux::Joined { chan, peer }).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            if failures == 0 {
                                log::info!("no standby at {peer} yet ({e}); retrying");
                            }
                            failures += 1;
                        }
                    }
                }
            });
        if let Err(e) = r {
            log::error!("cannot start redialling the standby: {e}");
        }
    }

    /// A join or sync event arrived (see [`Protector::aux`]).
    pub fn on_aux(&mut self, a: Aux, vmx: &mut Vmx) -> Result<()> {
        match a {
            Aux::Joined { mut chan, peer } => {
                let busy = if self.link.is_some() || self.completing.is_some() {
                    Some("this VM is already protected")
                } else if self.syncing.is_some() {
                    Some("another standby is being synced")
                } else if vmx.finished() {
                    Some("the guest has finished")
                } else {
                    None
                };
                if let Some(why) = busy {
                    log::warn!("refused standby {peer}: {why}");
                    let _ = chan.send(&Message::Nack {
                        fence: self.fence_at(self.next_epoch),
                        code: transport::message::NackCode::OutOfOrder,
                        message: why.into(),
                    });
                    return Ok(());
                }
                self.want_standby.store(false, Ordering::Relaxed);
                let fence = self.fence_at(self.next_epoch);
                let shared = vmx.vm().shared().clone();
                log::warn!(
                    "RE-PROTECTION: standby {peer} joined; full sync of {} MiB by pre-copy while                      the guest runs (generation {}, completing with epoch {})",
                    shared.layout.mem_bytes >> 20,
                    self.generation,
                    self.next_epoch
                );
                self.syncing = Some(Resync {
                    peer: peer.clone(),
                    started: Instant::now(),
                    epoch: self.next_epoch,
                    report: None,
                    completing_pages: 0,
                });
                let tx = self.aux_tx.clone();
                let who = peer.clone();
                let started = precopy::spawn(
                    shared,
                    *chan,
                    fence,
                    vmx.vm().vcpu_count(),
                    self.sync_status.clone(),
                    move |r| {
                        let result = r.map(|(c, rep)| (Box::new(c), rep));
                        let _ = tx.send(Aux::PreCopied { result, peer: who });
                    },
                );
                if let Err(e) = started {
                    log::error!("cannot start the pre-copy to {peer}: {e}");
                    self.syncing = None;
                    self.want_standby.store(true, Ordering::Relaxed);
                }
            }
            Aux::PreCopied { result, peer } => {
                let Some(mut rs) = self.syncing.take() else {
                    return Ok(());
                };
                self.set_sync_status(Value::Null);
                let (chan, report) = match result {
                    Ok(x) => x,
                    Err(e) => {
                        log::error!("re-protection by {peer} failed: {e}; still UNPROTECTED");
                        self.want_standby.store(true, Ordering::Relaxed);
                        return Ok(());
                    }
                };
                if vmx.finished() {
                    return Ok(());
                }
                // Output drained so far belongs to the unprotected past: release it; from the
                // completing epoch on, output waits for the standby again.
                self.after_output(vmx)?;
                let link = match Link::start(
                    *chan,
                    link::LinkConfig {
                        generation: self.generation,
                        interval: self.interval,
                        mem_bytes: vmx.vm().layout().mem_bytes,
                        vcpus: vmx.vm().vcpu_count(),
                        hooks: link::TestHooks::from_env(),
                    },
                ) {
                    Ok(l) => l,
                    Err(e) => {
                        log::error!("re-protection by {peer} failed: {e}; still UNPROTECTED");
                        self.want_standby.store(true, Ordering::Relaxed);
                        return Ok(());
                    }
                };
                let cap = vmx.capture_epoch(self.next_epoch, false)?;
                log::info!(
                    "pre-copy done in {} rounds ({:.0} ms); completing epoch {}: {} pages dirtied                      during the last round, stunned {:.2} ms",
                    report.rounds.len(),
                    report.ms,
                    cap.epoch,
                    cap.runs.iter().map(|r| r.data.len()).sum::<usize>() / 4096,
                    cap.pause.as_secs_f64() * 1e3
                );
                self.events = link.events();
                self.link = Some(link);
                self.lost = None;
                self.stats.full_syncs += 1;
                rs.report = Some(report);
                rs.epoch = cap.epoch;
                rs.completing_pages =
                    cap.runs.iter().map(|r| r.data.len() as u64).sum::<u64>() / 4096;
                self.completing = Some(rs);
                self.dispatch(cap);
            }
        }
        Ok(())
    }

    fn fence_at(&self, epoch: u64) -> Fence {
        Fence {
            generation: Generation(self.generation),
            epoch: Epoch(epoch),
        }
    }

    fn set_sync_status(&self, v: Value) {
        if let Ok(mut s) = self.sync_status.lock() {
            *s = v;
        }
    }

    /// Releases output inherited from the previous primary (the records of the epochs this
    /// standby committed last), skipping what the sink already has.
    pub fn release_inherited(&mut self, vmx: &mut Vmx, records: Vec<Vec<Record>>) -> Result<()> {
        let mut n = 0;
        if let Some(s) = &mut self.sink {
            for (v, r) in records.iter().enumerate() {
                n += s.release_inherited(v as u32, r)?;
            }
            log::info!(
                "released {n} inherited records the sink had not received (cursor {:?})",
                s.cursor
            );
        } else {
            vmx.release_local(&records);
        }
        self.stats.released += n as u64;
        Ok(())
    }

    /// Link events for the run loop to select on.
    pub fn events(&self) -> Receiver<LinkEvent> {
        self.events.clone()
    }

    /// When [`Protector::tick`] wants to run next.
    pub fn deadline(&self) -> Option<Instant> {
        self.link.as_ref().and(self.next_tick)
    }

    fn dispatch(&mut self, cap: crate::machine::Captured) {
        let pause_ms = cap.pause.as_secs_f64() * 1e3;
        if self.stats.pauses_ms.len() >= PAUSE_WINDOW {
            self.stats.pauses_ms.remove(0);
        }
        if !cap.full {
            self.stats.pauses_ms.push(pause_ms);
            if self.stats.save_steps_ms.len() >= PAUSE_WINDOW {
                self.stats.save_steps_ms.remove(0);
            }
            self.stats
                .save_steps_ms
                .push(cap.save_step.as_secs_f64() * 1e3);
        }
        let bytes = cap.runs.iter().map(|r| r.data.len() as u64).sum::<u64>();
        if cap.full {
            self.stats.full_sync_bytes += bytes;
        } else {
            self.stats.mem_bytes += bytes;
        }
        self.in_flight = Some(InFlight {
            epoch: cap.epoch,
            records: cap.records.clone(),
            captured: Instant::now(),
        });
        self.next_epoch = cap.epoch + 1;
        self.next_tick = Some(Instant::now() + self.interval);
        let ok = self.link.as_ref().is_some_and(|l| l.send(cap));
        if !ok {
            log::error!("the replication link is gone");
        }
    }

    /// The epoch timer fired.
    pub fn tick(&mut self, vmx: &mut Vmx) -> Result<()> {
        if self.link.is_none() || vmx.finished() {
            self.next_tick = None;
            return Ok(());
        }
        if self.in_flight.is_some() {
            // The standby is behind: stop the guest until it catches up.
            if self.throttled_since.is_none() && !vmx.is_paused() {
                vmx.suspend()?;
                self.throttled_since = Some(Instant::now());
                self.stats.throttles += 1;
                log::debug!("standby behind: guest stunned until the ack");
            }
            self.next_tick = None;
            return Ok(());
        }
        let cap = vmx.capture_epoch(self.next_epoch, false)?;
        self.dispatch(cap);
        Ok(())
    }

    fn release(&mut self, vmx: &mut Vmx, records: Vec<Vec<Record>>) -> Result<()> {
        vmx.release_local(&records);
        if let Some(s) = &mut self.sink {
            for (v, r) in records.iter().enumerate() {
                if !r.is_empty() {
                    s.release(v as u32, r)?;
                }
            }
        }
        self.stats.released += records.iter().map(|r| r.len() as u64).sum::<u64>();
        Ok(())
    }

    /// A link event arrived.
    pub fn event(&mut self, ev: LinkEvent, vmx: &mut Vmx) -> Result<()> {
        match ev {
            LinkEvent::Acked { epoch, stats } => {
                let Some(f) = self.in_flight.take_if(|f| f.epoch == epoch) else {
                    log::warn!("acknowledgement of epoch {epoch}, which is not in flight");
                    return Ok(());
                };
                self.last_ack = epoch;
                self.stats.epochs += 1;
                self.stats.lag = f.captured.elapsed();
                self.stats.page_wire_bytes += stats.page_bytes;
                self.stats.state_bytes += stats.state_bytes;
                self.stats.record_bytes += stats.record_bytes;
                self.stats.nacks += stats.nacks as u64;
                self.release(vmx, f.records)?;
                if let Some(rs) = self.completing.take_if(|r| r.epoch == epoch) {
                    let ms = rs.started.elapsed().as_secs_f64() * 1e3;
                    log::warn!(
                        "PROTECTED again: standby {} committed the full sync (epoch {epoch})                          {ms:.0} ms after it joined",
                        rs.peer
                    );
                    self.stats.reprotections += 1;
                    self.last_sync = json!({
                        "peer": rs.peer,
                        "joined_to_protected_ms": ms,
                        "completing_epoch": epoch,
                        "completing_pages": rs.completing_pages,
                        "precopy": rs.report,
                        "protected_unix_ms": unix_ms(),
                    });
                }
                if let Some(since) = self.throttled_since.take() {
                    // Capture while still stunned, then let the guest go.
                    let cap = vmx.capture_epoch(self.next_epoch, false)?;
                    self.dispatch(cap);
                    vmx.resume()?;
                    self.stats.throttled += since.elapsed();
                }
            }
            LinkEvent::Lost { reason } => self.unprotect(vmx, reason)?,
        }
        Ok(())
    }

    fn unprotect(&mut self, vmx: &mut Vmx, reason: String) -> Result<()> {
        if let Some(arb) = self.arbiter.clone() {
            // The standby may be taking over right now: race it for the next generation
            // before anything more leaves this VM.
            let next = self.generation + 1;
            let who = format!("primary pid {}", std::process::id());
            let won = arb.claim(next, &who)?;
            if !won {
                return Err(self.fence(
                    vmx,
                    &format!(
                        "lost its standby ({reason}) and then the claim of generation {next} at \
                     the {}: another VM is primary",
                        arb.describe()
                    ),
                ));
            }
            log::warn!(
                "won generation {next} at the {} after losing the standby",
                arb.describe()
            );
            self.generation = next;
            if let (Some(addr), Some(_)) = (&self.sink_addr, &self.sink) {
                let vcpus = vmx.vm().vcpu_count();
                self.sink = Some(SinkClient::connect(
                    addr,
                    next,
                    vcpus,
                    Duration::from_secs(5),
                )?);
            }
        }
        log::error!(
            "STANDBY LOST: {reason}. The VM runs UNPROTECTED from now on (generation {}); \
             its output is released at once",
            self.generation
        );
        self.link = None;
        self.events = never();
        self.lost = Some(reason);
        self.completing = None;
        self.want_standby.store(true, Ordering::Relaxed);
        self.next_tick = None;
        if let Some(f) = self.in_flight.take() {
            self.release(vmx, f.records)?;
        }
        let held = vmx.take_held();
        self.release(vmx, held)?;
        if let Some(since) = self.throttled_since.take() {
            vmx.resume()?;
            self.stats.throttled += since.elapsed();
        }
        Ok(())
    }

    /// Output was drained: an unprotected VM releases it at once (after the arbiter, if any,
    /// confirms this VM is still the newest generation).
    pub fn after_output(&mut self, vmx: &mut Vmx) -> Result<()> {
        if self.link.is_none() {
            let held = vmx.take_held();
            if held.iter().any(|h| !h.is_empty()) {
                if let Some(arb) = self.arbiter.clone() {
                    if !arb.still(self.generation)? {
                        return Err(self.fence(
                            vmx,
                            &format!(
                                "the {} says generation {} is no longer the newest",
                                arb.describe(),
                                self.generation
                            ),
                        ));
                    }
                }
                self.release(vmx, held)?;
            }
        }
        Ok(())
    }

    /// Stops the guest and releases nothing: another VM is primary.
    fn fence(&mut self, vmx: &mut Vmx, why: &str) -> crate::Error {
        let _ = vmx.suspend();
        self.link = None;
        self.in_flight = None;
        let dropped: usize = vmx.take_held().iter().map(|h| h.len()).sum();
        log::error!(
            "FENCED: this VM (generation {}) {why}. The guest is stopped and {dropped} held \
             records are dropped unreleased.",
            self.generation
        );
        crate::Error::Fenced(format!(
            "generation {} {why}; this VM stopped without releasing its held output",
            self.generation
        ))
    }

    /// The guest finished: the last epoch is captured, acknowledged and its output released;
    /// then the standby is told goodbye.
    pub fn finish(&mut self, vmx: &mut Vmx) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Wait for the epoch in flight, then send the last one and wait for it too.
        let mut last_sent = false;
        while self.link.is_some() {
            if self.in_flight.is_none() {
                if last_sent {
                    break;
                }
                let cap = vmx.capture_epoch(self.next_epoch, false)?;
                self.dispatch(cap);
                last_sent = true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) => self.event(ev, vmx)?,
                Err(_) => self.unprotect(vmx, "no acknowledgement of the last epoch".into())?,
            }
        }
        if let Some(link) = self.link.take() {
            link.goodbye();
            log::info!("guest finished; the standby was told goodbye");
        }
        self.after_output(vmx)
    }

    fn sync_phase(&self) -> Value {
        if let Some(rs) = &self.syncing {
            let mut v = self
                .sync_status
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            if v.is_null() {
                v = json!({"phase": "pre-copy starting"});
            }
            v["peer"] = json!(rs.peer);
            return v;
        }
        if let Some(rs) = &self.completing {
            return json!({"phase": "completing epoch", "peer": rs.peer, "epoch": rs.epoch});
        }
        Value::Null
    }

    /// For `status`.
    pub fn status(&self) -> Value {
        let p = &self.stats.pauses_ms;
        json!({
            "role": "primary",
            "protected": self.protected(),
            "unprotected_because": self.lost,
            "generation": self.generation,
            "epoch": self.next_epoch.saturating_sub(1),
            "last_ack": self.last_ack,
            "in_flight": self.in_flight.as_ref().map(|f| f.epoch),
            "lag_ms": self.stats.lag.as_secs_f64() * 1e3,
            "interval_ms": self.interval.as_secs_f64() * 1e3,
            "pause_ms": {"p50": percentile(p, 50.0), "p99": percentile(p, 99.0),
                         "max": p.iter().cloned().fold(0.0, f64::max), "count": p.len(),
                         "save_step_p50": percentile(&self.stats.save_steps_ms, 50.0)},
            "bytes_sent": {"pages": self.stats.page_wire_bytes, "state": self.stats.state_bytes,
                           "records": self.stats.record_bytes},
            "counters": {"full_syncs": self.stats.full_syncs, "epochs": self.stats.epochs,
                         "mem_bytes": self.stats.mem_bytes, "full_sync_bytes": self.stats.full_sync_bytes,
                         "state_bytes": self.stats.state_bytes,
                         "nacks": self.stats.nacks, "throttles": self.stats.throttles,
                         "throttled_ms": self.stats.throttled.as_secs_f64() * 1e3,
                         "released_records": self.stats.released},
            "notes": self.notes,
            "sync": self.sync_phase(),
            "last_sync": self.last_sync,
            "reprotections": self.stats.reprotections,
        })
    }
}

/// How a primary is set up.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// The VM.
    pub boot: Boot,
    /// Control socket, output, scheduling.
    pub opts: Options,
    /// The standby's address (None: run unprotected).
    pub peer: Option<String>,
    /// Where to accept standbys that join (None: none do; `peer` is still redialled).
    pub listen: Option<String>,
    /// The shared key (None: --insecure-plaintext).
    pub psk: Option<transport::Psk>,
    /// Epoch interval.
    pub interval: Duration,
    /// The output sink.
    pub sink: Option<String>,
    /// Where role changes are decided (None: nothing prevents split brain).
    pub arbiter: Option<Arc<dyn Arbiter>>,
    /// How long to keep trying to reach the standby and the sink at start.
    pub connect_patience: Duration,
}

/// Connects to a standby (retrying for `patience`), authenticates, and asks to be protected.
pub fn connect(
    peer: &str,
    psk: Option<&transport::Psk>,
    patience: Duration,
) -> Result<transport::Channel<std::net::TcpStream>> {
    dial(peer, "standby", psk, patience, Intent::Protect)
}

/// Joins the unprotected primary at `primary` as its standby (retrying for `patience`).
pub fn join(
    primary: &str,
    psk: Option<&transport::Psk>,
    patience: Duration,
) -> Result<transport::Channel<std::net::TcpStream>> {
    dial(primary, "primary", psk, patience, Intent::Join)
}

/// Connects to `addr` (the `what`), retrying for `patience`, authenticates, and says `intent`.
fn dial(
    addr: &str,
    what: &str,
    psk: Option<&transport::Psk>,
    patience: Duration,
    intent: Intent,
) -> Result<transport::Channel<std::net::TcpStream>> {
    let start = Instant::now();
    let stream = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if start.elapsed() < patience => {
                log::debug!("{what} {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(crate::Error::Link(transport::Error::Io(
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot reach the {what} at {addr}: {e}"),
                    ),
                )))
            }
        }
    };
    stream.set_nodelay(true).map_err(transport::Error::Io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(transport::Error::Io)?;
    let mut ch = transport::handshake::client(stream, psk)?;
    ch.send(&Message::Intent { intent })?;
    ch.get_ref()
        .set_read_timeout(None)
        .map_err(transport::Error::Io)?;
    Ok(ch)
}

/// Accepts the next client of `listener` that authenticates and says `want` (others are told
/// why not and dropped). Returns the channel and the client's address.
pub fn accept(
    listener: &TcpListener,
    psk: Option<&Psk>,
    want: Intent,
) -> std::io::Result<(Channel<TcpStream>, String)> {
    loop {
        let (conn, peer) = listener.accept()?;
        let _ = conn.set_nodelay(true);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let mut ch = match transport::handshake::server(conn, psk) {
            Ok(ch) => ch,
            Err(e) => {
                log::warn!("refused a connection from {peer}: {e}");
                continue;
            }
        };
        match ch.recv() {
            Ok(Received::Message(Message::Intent { intent })) if intent == want => {
                let _ = ch.get_ref().set_read_timeout(None);
                return Ok((ch, peer.to_string()));
            }
            Ok(other) => {
                let why = match want {
                    Intent::Join => {
                        "this VM is a primary: it takes standbys that join \
                         (tandem standby --join), not another primary"
                    }
                    Intent::Protect => {
                        "this is a standby waiting for its primary: a standby joins a primary \
                         (tandem standby --join PRIMARY), not another standby"
                    }
                };
                log::warn!("refused {peer}: it sent {other:?}; {why}");
                let _ = ch.send(&Message::Nack {
                    fence: Fence::default(),
                    code: transport::message::NackCode::OutOfOrder,
                    message: why.into(),
                });
            }
            Err(e) => log::warn!("refused {peer}: {e}"),
        }
    }
}

/// Boots (or restores) a VM, protects it with the standby at `peer`, and runs it to the end.
/// Returns how it ended and the final replication status.
pub fn run_primary(cfg: PrimaryConfig) -> Result<(Outcome, Value)> {
    let generation = match &cfg.arbiter {
        Some(arb) => {
            let g = arb.current()? + 1;
            if !arb.claim(g, &format!("primary pid {}", std::process::id()))? {
                return Err(crate::Error::Fenced(format!(
                    "another VM claimed generation {g} at the {} first",
                    arb.describe()
                )));
            }
            log::info!("claimed generation {g} at the {}", arb.describe());
            g
        }
        None => {
            log::warn!("no --arbiter: nothing prevents two primaries after a partition");
            1
        }
    };
    let opts = Options {
        paused: true,
        ..cfg.opts.clone()
    };
    let mut vmx = power_on(cfg.boot, &opts)?;
    let vcpus = vmx.vm().vcpu_count();
    let mem_bytes = vmx.vm().layout().mem_bytes;
    let sink = match &cfg.sink {
        Some(a) => Some(SinkClient::connect(
            a,
            generation,
            vcpus,
            cfg.connect_patience,
        )?),
        None => None,
    };
    let mut ft = Protector::new(generation, cfg.interval, sink);
    if let Some(arb) = &cfg.arbiter {
        ft = ft.with_arbiter(arb.clone(), cfg.sink.clone());
    }
    vmx.hold_output(true);
    if let Some(peer) = &cfg.peer {
        match connect(peer, cfg.psk.as_ref(), cfg.connect_patience) {
            Ok(ch) => {
                let link = Link::start(
                    ch,
                    link::LinkConfig {
                        generation,
                        interval: cfg.interval,
                        mem_bytes,
                        vcpus,
                        hooks: link::TestHooks::from_env(),
                    },
                )?;
                ft.protect(&mut vmx, link)?;
            }
            Err(e) => log::error!("{e}: running UNPROTECTED"),
        }
    } else if cfg.listen.is_none() {
        log::warn!("no --peer: running UNPROTECTED (output is released at once)");
    }
    if let Some(peer) = &cfg.peer {
        ft.redial(peer.clone(), cfg.psk.clone());
    }
    if let Some(addr) = &cfg.listen {
        let l = TcpListener::bind(addr).map_err(|source| crate::Error::Io {
            path: addr.clone(),
            source,
        })?;
        ft.accept_joins(l, cfg.psk.clone());
    }
    if !cfg.opts.paused {
        vmx.resume()?;
    }
    let outcome = vmx.run_with(Some(&mut ft))?;
    Ok((outcome, ft.status()))
}
