//! The primary's side inside the vmx run loop: [`Protector`], the thin driver of the pure
//! protocol [`machine`].
//!
//! ```text
//!   vmx run loop ──(link event, aux, tick, output drained, finish)──▶ Protector
//!                                                                       │ Event
//!                                                                       ▼
//!                                                                  Machine::on
//!                                                                       │ Vec<Action>
//!                                                                       ▼
//!   Vmx (capture, stun, hold/release) ◀── execute ──▶ Link, SinkClient, Arbiter, pre-copy
//!                                          │
//!                                          └── answers (claim won/lost, still newest, link
//!                                              up/failed, pre-copy could not start) are fed
//!                                              back to the machine as the next event
//! ```
//!
//! The machine owns every protocol decision (which epoch, when to stun, what to release, when
//! to fence); the driver owns the resources and the bookkeeping the decisions need: the
//! captured epoch and its records, timers, counters, the joiner's channel, the status.

pub mod machine;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{never, unbounded, Receiver, Sender};
use guest_abi::Record;
use serde_json::Value;
use transport::{Channel, Epoch, Fence, Generation, Intent, Message, Psk};

use ::sink::SinkClient;
use devices::virtio::HeldFrames;
use vmx::machine::{Captured, Vmx};

use crate::arbiter::Arbiter;
use crate::link::{self, Link, LinkEvent, SendStats};
use crate::metrics::Metrics;
use crate::status::{
    BytesSent, Counters, FtStatus, LastSync, MigrationDone, MigrationStatus, Notes, PauseMs,
    PrimaryCounters, Role, SyncStatus,
};
use crate::{migrate, percentile, precopy, unix_ms, Error, Result};
use machine::{Action, Answer, CaptureKind, Event, FenceReason, Guest, Machine, SyncReason};
use vmx::control::{Answer as CtlAnswer, Request};

/// Pauses kept for the percentiles.
const PAUSE_WINDOW: usize = 8192;

/// Counters of a protected VM (FTM's names where it has them).
#[derive(Clone, Debug, Default)]
pub struct FtStats {
    /// Full syncs sent.
    pub full_syncs: u64,
    /// Page ranges sent as XOR deltas.
    pub xor_ranges: u64,
    /// Bytes in the XOR-delta cache.
    pub xor_cache_bytes: u64,
    /// Epochs acknowledged.
    pub epochs: u64,
    /// Dirty bytes captured by epochs.
    pub mem_bytes: u64,
    /// Bytes read by the pre-copy rounds of full syncs.
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
    /// Epochs whose Ack came after the next tick (the next epoch captured at the Ack).
    pub late: u64,
    /// Time the guest spent stunned waiting for the standby.
    pub throttled: Duration,
    /// Epoch pauses, ms (the last 8,192).
    pub pauses_ms: Vec<f64>,
    /// Of each pause, the monitor's SAVE step (dirty log, page copies, vCPU state), ms.
    pub save_steps_ms: Vec<f64>,
    /// Of each pause, every phase (`vmx::machine::PAUSE_PHASES`), ms (the last 8,192).
    pub phases_ms: Vec<(&'static str, Vec<f64>)>,
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
    /// A metrics scrape wants the status (see [`crate::metrics`]).
    Status(Sender<FtStatus>),
    /// The receiver of a migration answered (or could not be reached).
    Receiver {
        /// Its address.
        peer: String,
        /// The authenticated channel, or why there is none.
        result: std::result::Result<Box<Channel<TcpStream>>, String>,
    },
}

/// What the driver remembers of a migration under way (the machine decides its steps).
struct Migration {
    to: String,
    /// The `ctl migrate` waiting for the outcome.
    reply: Option<Sender<Value>>,
    max_downtime: Duration,
    started: Instant,
    converge: migrate::Converge,
    throttle: Option<migrate::Throttle>,
    max_throttle: f64,
    /// When the guest stopped for the last epoch (and as Unix ms).
    frozen: Option<(Instant, f64)>,
    switchover: bool,
    precopy: Option<crate::status::PreCopySummary>,
    last: Option<migrate::Assessment>,
    last_pages: u64,
    last_pause_ms: f64,
    phase: &'static str,
}

/// What the driver remembers of the sync the machine runs.
struct Resync {
    started: Instant,
    report: Option<precopy::PreCopyReport>,
    completing_pages: u64,
    completing_pause_ms: f64,
    completing_stun_ms: f64,
}

/// The records and capture time of the epoch in flight.
struct InFlight {
    epoch: u64,
    /// Its pages.
    pages: u64,
    /// What kind of epoch it is.
    kind: CaptureKind,
    records: Vec<Vec<Record>>,
    /// Frames the guest's cards sent during the epoch (output commit): (window, frames).
    frames: Vec<(u32, HeldFrames)>,
    captured: Instant,
}

/// How often an unprotected VM's held network frames are flushed (output released at once).
pub const FRAME_FLUSH: Duration = Duration::from_millis(1);

/// The primary's replication inside the vmx run loop: executes what its [`Machine`] decides.
pub struct Protector {
    machine: Machine,
    interval: Duration,
    link: Option<Link>,
    events: Receiver<LinkEvent>,
    sink: Option<SinkClient>,
    arbiter: Option<Arc<dyn Arbiter>>,
    sink_addr: Option<String>,
    aux_tx: Sender<Aux>,
    aux_rx: Receiver<Aux>,
    /// The epoch captured and not yet handed to the link.
    captured: Option<Captured>,
    in_flight: Option<InFlight>,
    /// The cost of the epoch being acknowledged.
    ack_stats: Option<SendStats>,
    next_tick: Option<Instant>,
    /// The VM has network cards: while output is released at once, their held frames are
    /// flushed every [`FRAME_FLUSH`] (frames come without a doorbell).
    pub cards: bool,
    throttled_since: Option<Instant>,
    /// Drained output taken from the VM while the machine decides whether it goes out.
    drained: Vec<Vec<Record>>,
    /// Frames taken with `drained`, released with it.
    drained_frames: Vec<(u32, HeldFrames)>,
    /// A joiner's channel, until it is refused or pre-copied.
    joiner: Option<Box<Channel<TcpStream>>>,
    /// The pre-copied joiner's channel, until the link starts over it.
    precopied: Option<Box<Channel<TcpStream>>>,
    resync: Option<Resync>,
    sync_status: Arc<Mutex<Option<precopy::RoundProgress>>>,
    last_sync: Option<LastSync>,
    /// Set while a redial thread should look for a standby.
    want_standby: Arc<AtomicBool>,
    /// Counters.
    pub stats: FtStats,
    /// Extra facts for `status` (e.g. the failover that made this primary).
    pub notes: Option<Notes>,
    /// Faults to inject into every link this primary starts (tests only).
    pub hooks: link::TestHooks,
    /// The sink's key, for reconnecting as a new generation (None: a plaintext sink).
    pub sink_key: Option<transport::Psk>,
    /// The process's metrics (`--metrics`), if served.
    metrics: Option<Metrics>,
    /// The replication key, for the links this primary opens itself (a migration's).
    pub psk: Option<Psk>,
    /// The standby's address, while one protects the VM.
    standby_addr: Option<String>,
    migration: Option<Migration>,
    /// (pages, capture → acknowledgement, kind) of the epoch released last.
    last_acked: Option<(u64, Duration, CaptureKind)>,
    /// Where the VM went (a migration): the run ends.
    moved: Option<vmx::Moved>,
}

impl Protector {
    /// A primary of `generation` releasing to `sink` (or only to the local text output).
    /// Without a link it runs unprotected.
    pub fn new(generation: u64, interval: Duration, sink: Option<SinkClient>) -> Self {
        let (aux_tx, aux_rx) = unbounded();
        Protector {
            machine: Machine::new(generation, false),
            interval,
            link: None,
            events: never(),
            sink,
            arbiter: None,
            sink_addr: None,
            aux_tx,
            aux_rx,
            captured: None,
            in_flight: None,
            ack_stats: None,
            next_tick: None,
            cards: false,
            throttled_since: None,
            drained: Vec::new(),
            drained_frames: Vec::new(),
            joiner: None,
            precopied: None,
            resync: None,
            sync_status: Arc::new(Mutex::new(None)),
            last_sync: None,
            want_standby: Arc::new(AtomicBool::new(true)),
            stats: FtStats::default(),
            notes: None,
            hooks: link::TestHooks::default(),
            sink_key: None,
            metrics: None,
            psk: None,
            standby_addr: None,
            migration: None,
            last_acked: None,
            moved: None,
        }
    }

    /// Feeds `metrics`: every epoch's pause, and this protector's status for every scrape
    /// (asked through the run loop, like the control socket's `status`).
    pub fn set_metrics(&mut self, metrics: &Metrics) {
        let tx = self.aux_tx.clone();
        metrics.set_source(
            Role::Primary,
            Box::new(move |reply| tx.send(Aux::Status(reply)).is_ok()),
        );
        self.metrics = Some(metrics.clone());
    }

    /// Releases to `sink` from now on (a standby that took over connects to it after its
    /// guest runs again: output is held until then).
    pub fn set_sink(&mut self, sink: Option<SinkClient>) {
        self.sink = sink;
    }

    /// Arbitrates role changes with `arbiter`; `sink_addr` is where to reconnect as a new
    /// generation.
    pub fn with_arbiter(mut self, arbiter: Arc<dyn Arbiter>, sink_addr: Option<String>) -> Self {
        self.arbiter = Some(arbiter);
        self.sink_addr = sink_addr;
        self.machine.set_arbiter(true);
        self
    }

    /// Whether a standby protects the VM.
    pub fn protected(&self) -> bool {
        self.machine.protected()
    }

    /// The generation.
    pub fn generation(&self) -> u64 {
        self.machine.generation()
    }

    /// The protocol state.
    pub fn state(&self) -> &machine::State {
        self.machine.state()
    }

    /// Starts protecting the VM with the standby at the other end of `chan` (`peer`): the same
    /// pre-copy as for a standby that joins, while the guest runs (or before it starts), then
    /// the completing epoch; output is released at once until that epoch and held from it on.
    pub fn protect(&mut self, vmx: &mut Vmx, chan: Channel<TcpStream>, peer: String) -> Result<()> {
        self.joiner = Some(Box::new(chan));
        let r = self.drive(vmx, Event::Connected { peer });
        self.joiner = None;
        r
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
                match crate::accept(&listener, psk.as_ref(), Intent::Join) {
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
                    match crate::connect(&peer, psk.as_ref(), Duration::ZERO) {
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

    /// A join or sync event arrived (see `Replication::aux`).
    pub fn on_aux(&mut self, a: Aux, vmx: &mut Vmx) -> Result<()> {
        match a {
            Aux::Joined { chan, peer } => {
                self.joiner = Some(chan);
                let guest_finished = vmx.finished();
                let r = self.drive(
                    vmx,
                    Event::Joined {
                        peer,
                        guest_finished,
                    },
                );
                self.joiner = None;
                r
            }
            Aux::Status(reply) => {
                let _ = reply.send(self.ft_status());
                Ok(())
            }
            Aux::Receiver { peer, result } => {
                if self.migration.as_ref().is_none_or(|m| m.to != peer) {
                    return Ok(());
                }
                match result {
                    Err(why) => {
                        self.end_migration(Err(why));
                        Ok(())
                    }
                    Ok(chan) => {
                        self.joiner = Some(chan);
                        let guest_finished = vmx.finished();
                        let r = self.drive(
                            vmx,
                            Event::Migrate {
                                peer,
                                guest_finished,
                            },
                        );
                        self.joiner = None;
                        r
                    }
                }
            }
            Aux::PreCopied { result, peer } => {
                if self.machine.resyncing().is_none() {
                    return Ok(());
                }
                self.set_sync_status(None);
                match result {
                    Err(e) => {
                        log::error!("re-protection by {peer} failed: {e}; still UNPROTECTED");
                        self.drive(vmx, Event::PreCopyFailed { reason: e })
                    }
                    Ok((chan, report)) => {
                        self.stats.full_sync_bytes +=
                            report.rounds.iter().map(|r| r.pages * 4096).sum::<u64>();
                        self.precopied = Some(chan);
                        if let Some(rs) = &mut self.resync {
                            rs.report = Some(report);
                        }
                        let guest_finished = vmx.finished();
                        if guest_finished {
                            log::info!(
                                "the guest finished while {peer} pre-copied: nothing is left \
                                 to protect, so no epoch link is started"
                            );
                        }
                        let pending_output = self.collect_drained(vmx);
                        let r = self.drive(
                            vmx,
                            Event::PreCopyDone {
                                guest_finished,
                                pending_output,
                            },
                        );
                        self.precopied = None;
                        r
                    }
                }
            }
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

    /// The epoch timer fired.
    pub fn tick(&mut self, vmx: &mut Vmx) -> Result<()> {
        let guest = Guest {
            paused: vmx.is_paused(),
            finished: vmx.finished(),
        };
        self.drive(vmx, Event::Tick { guest })
    }

    /// A link event arrived.
    pub fn event(&mut self, ev: LinkEvent, vmx: &mut Vmx) -> Result<()> {
        match ev {
            LinkEvent::Acked { epoch, stats } => {
                self.ack_stats = Some(stats);
                let r = self.drive(vmx, Event::Ack { epoch });
                self.ack_stats = None;
                r
            }
            LinkEvent::Nacked { epoch } => self.drive(vmx, Event::Nack { epoch }),
            LinkEvent::Lost { reason } => self.drive(vmx, Event::LinkLost { reason }),
            LinkEvent::Switched { generation } => self.drive(vmx, Event::Switched { generation }),
        }
    }

    /// `tandem ctl SOCK migrate ADDR`: moves the VM to the `tandem standby` at `addr`; `reply`
    /// hears the outcome when it is known (see [`crate::migrate`]).
    pub fn migrate(
        &mut self,
        addr: String,
        max_downtime: Duration,
        reply: Sender<Value>,
        vmx: &mut Vmx,
    ) -> Result<()> {
        let busy = if let Some(m) = &self.migration {
            Some(format!("a migration to {} is under way", m.to))
        } else if self.machine.fenced() || self.moved.is_some() {
            Some("this VM is done here".to_string())
        } else if vmx.finished() || self.machine.finishing() {
            Some("the guest has finished".to_string())
        } else {
            None
        };
        if let Some(why) = busy {
            let _ = reply.send(CtlAnswer::refused(format!(
                "cannot migrate to {addr}: {why}"
            )));
            return Ok(());
        }
        let switchover = self.machine.protected() && self.standby_addr.as_deref() == Some(&addr);
        log::warn!(
            "MIGRATION to {addr} requested (downtime budget {} ms){}",
            max_downtime.as_millis(),
            if switchover {
                ": it is this VM's standby, a switchover"
            } else {
                ""
            }
        );
        self.migration = Some(Migration {
            to: addr.clone(),
            reply: Some(reply),
            max_downtime,
            started: Instant::now(),
            converge: migrate::Converge::new(max_downtime),
            throttle: None,
            max_throttle: 0.0,
            frozen: None,
            switchover,
            precopy: None,
            last: None,
            last_pages: 0,
            last_pause_ms: 0.0,
            phase: if switchover {
                "converging"
            } else {
                "connecting"
            },
        });
        if switchover {
            return self.drive(vmx, Event::Switchover { peer: addr });
        }
        let tx = self.aux_tx.clone();
        let psk = self.psk.clone();
        let started = std::thread::Builder::new()
            .name("migrate-connect".into())
            .spawn(move || {
                let result = crate::connect(&addr, psk.as_ref(), Duration::from_secs(2))
                    .map(Box::new)
                    .map_err(|e| e.to_string());
                let _ = tx.send(Aux::Receiver { peer: addr, result });
            });
        if let Err(e) = started {
            self.end_migration(Err(format!("cannot start connecting: {e}")));
        }
        Ok(())
    }

    /// The migration ended: the throttle stops, and the `ctl migrate` hears how it went.
    fn end_migration(&mut self, outcome: std::result::Result<MigrationDone, String>) {
        let Some(mut m) = self.migration.take() else {
            return;
        };
        drop(m.throttle.take());
        let answer = match outcome {
            Ok(done) => {
                log::warn!(
                    "MIGRATED to {}: the VM runs there as generation {} ({:.2} ms stopped here \
                     until it confirmed; {:.0} ms in all)",
                    done.to,
                    done.generation,
                    done.downtime_ms,
                    done.total_ms
                );
                vmx::control::reply(&done)
            }
            Err(why) => {
                let here = format!(
                    "{} the VM runs on here as generation {}, {}",
                    if why.ends_with('.') { "" } else { ";" },
                    self.machine.generation(),
                    if self.machine.protected() {
                        "protected"
                    } else {
                        "unprotected"
                    }
                );
                let msg = format!("migration to {} failed: {why}{here}", m.to);
                log::error!("{msg}");
                CtlAnswer::refused(msg)
            }
        };
        if let Some(r) = m.reply.take() {
            let _ = r.send(answer);
        }
    }

    /// Output was drained: an unprotected VM releases it at once (after the arbiter, if any,
    /// confirms this VM is still the newest generation).
    pub fn after_output(&mut self, vmx: &mut Vmx) -> Result<()> {
        let pending = self.collect_drained(vmx);
        self.drive(vmx, Event::OutputDrained { pending })
    }

    /// The guest finished: the last epoch is captured, acknowledged and its output released;
    /// then the standby is told goodbye.
    pub fn finish(&mut self, vmx: &mut Vmx) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        self.drive(vmx, Event::GuestFinished)?;
        while self.machine.finishing() || self.machine.handing() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) => self.event(ev, vmx)?,
                Err(_) => self.drive(
                    vmx,
                    Event::LinkLost {
                        reason: "no acknowledgement of the last epoch".into(),
                    },
                )?,
            }
        }
        if self.machine.moved().is_none() {
            self.end_migration(Err("the guest finished".into()));
        }
        self.after_output(vmx)
    }

    /// Takes the drained output while the machine would release it at once; whether any waits.
    fn collect_drained(&mut self, vmx: &mut Vmx) -> bool {
        if self.machine.releases_at_once() {
            let held = vmx.take_held();
            append(&mut self.drained, held);
            self.drained_frames.extend(vmx.take_held_frames());
        }
        self.drained.iter().any(|h| !h.is_empty()) || !self.drained_frames.is_empty()
    }

    /// Feeds `ev` to the machine and executes what it says, feeding answers back.
    fn drive(&mut self, vmx: &mut Vmx, ev: Event) -> Result<()> {
        let mut next = Some(ev);
        while let Some(ev) = next.take() {
            for a in self.machine.on(ev) {
                if let Some(answer) = self.execute(vmx, a)? {
                    next = Some(answer);
                }
            }
        }
        Ok(())
    }

    fn install(&mut self, vmx: &Vmx, link: Link) {
        self.events = link.events();
        // Input replication: the cards' received frames go to the standby as they come.
        vmx.copy_inputs(Some(link.inputs()));
        self.link = Some(link);
    }

    fn link_config(&self, vmx: &Vmx) -> link::LinkConfig {
        link::LinkConfig {
            generation: self.machine.generation(),
            interval: self.interval,
            mem_bytes: vmx.vm().layout().mem_bytes,
            vcpus: vmx.vm().vcpu_count(),
            hooks: self.hooks.clone(),
            xor_cache_bytes: link::DEFAULT_XOR_CACHE_BYTES,
        }
    }

    fn describe_arbiter(&self) -> String {
        self.arbiter
            .as_ref()
            .map_or_else(|| "arbiter".into(), |a| a.describe())
    }

    /// Does one action; returns the answer for the machine, if it has one.
    fn execute(&mut self, vmx: &mut Vmx, a: Action) -> Result<Option<Event>> {
        match a {
            Action::Capture { epoch, kind } => self.capture(vmx, epoch, kind)?,
            Action::Send { epoch } => {
                let ok = match (self.captured.take(), &self.link) {
                    (Some(cap), Some(link)) if cap.epoch == epoch => link.send(cap),
                    _ => false,
                };
                if !ok {
                    log::error!("the replication link is gone");
                }
            }
            Action::Release { epoch, acked } => {
                if !acked {
                    // Released without the standby's commit: the writes it depends on are
                    // this host's alone; make them durable first.
                    vmx.set_speculative_flush(false)?;
                }
                self.confirm_claim(vmx)?;
                let Some(f) = self.in_flight.take_if(|f| f.epoch == epoch) else {
                    log::error!("no records of epoch {epoch} to release");
                    return Ok(None);
                };
                if acked {
                    self.last_acked = Some((f.pages, f.captured.elapsed(), f.kind));
                    self.stats.epochs += 1;
                    self.stats.lag = f.captured.elapsed();
                    if let Some(s) = self.ack_stats.take() {
                        self.stats.page_wire_bytes += s.page_bytes;
                        self.stats.state_bytes += s.state_bytes;
                        self.stats.record_bytes += s.record_bytes;
                        self.stats.nacks += s.nacks as u64;
                        self.stats.xor_ranges += s.xor_ranges;
                        self.stats.xor_cache_bytes = s.xor_cache_bytes;
                    }
                }
                vmx.release_frames(f.frames);
                self.release(vmx, f.records)?;
            }
            Action::ReleaseHeld => {
                // Output released at once depends on writes this host alone holds: make them
                // durable first (and flushes real from now on).
                vmx.set_speculative_flush(false)?;
                self.confirm_claim(vmx)?;
                let mut records = std::mem::take(&mut self.drained);
                append(&mut records, vmx.take_held());
                let mut frames = std::mem::take(&mut self.drained_frames);
                frames.extend(vmx.take_held_frames());
                vmx.release_frames(frames);
                self.release(vmx, records)?;
            }
            Action::Stun => {
                vmx.suspend()?;
                self.throttled_since = Some(Instant::now());
                self.stats.throttles += 1;
                log::debug!("standby behind: guest stunned until the ack");
            }
            Action::Resume => {
                vmx.resume()?;
                if let Some(since) = self.throttled_since.take() {
                    self.stats.throttled += since.elapsed();
                }
            }
            Action::Late { epoch } => {
                self.stats.late += 1;
                self.next_tick = Some(Instant::now() + self.interval);
                log::debug!("epoch {epoch} not yet acknowledged: the next epoch waits for it");
            }
            Action::StopTimer => self.next_tick = None,
            Action::Claim { generation } => {
                let Some(arb) = self.arbiter.clone() else {
                    return Ok(Some(Event::Arbiter(Answer::Won)));
                };
                // The standby may be taking over right now: race it for the next generation
                // before anything more leaves this VM.
                let who = format!("primary pid {}", std::process::id());
                let won = match arb.claim(generation, &who) {
                    Ok(won) => won,
                    // Undecided: the standby may have won. Nothing more may leave this VM.
                    Err(e) => {
                        let why = format!(
                            "lost its standby and then could not claim generation {generation} \
                             at the {} ({e}): the standby may have won it",
                            arb.describe()
                        );
                        return Err(self.fence(vmx, &why));
                    }
                };
                if won {
                    log::warn!(
                        "won generation {generation} at the {} after losing the standby",
                        arb.describe()
                    );
                }
                let answer = if won { Answer::Won } else { Answer::Lost };
                return Ok(Some(Event::Arbiter(answer)));
            }
            Action::AskStill { generation } => {
                let newest = match self.arbiter.clone() {
                    Some(arb) => match arb.still(generation) {
                        Ok(newest) => newest,
                        // Unconfirmed is not newest: a standby may have won a newer generation.
                        Err(e) => {
                            let why = format!(
                                "could not confirm at the {} that generation {generation} is \
                                 still the newest ({e})",
                                arb.describe()
                            );
                            return Err(self.fence(vmx, &why));
                        }
                    },
                    None => true,
                };
                return Ok(Some(Event::Arbiter(Answer::Still { newest })));
            }
            Action::ReconnectSink { generation } => {
                if let (Some(addr), Some(_)) = (&self.sink_addr, &self.sink) {
                    let vcpus = vmx.vm().vcpu_count();
                    self.sink = Some(SinkClient::connect(
                        addr,
                        self.sink_key.as_ref(),
                        generation,
                        vcpus,
                        Duration::from_secs(5),
                    )?);
                }
            }
            Action::DropLink { reason } => {
                log::error!(
                    "STANDBY LOST: {reason}. The VM runs UNPROTECTED from now on (generation \
                     {}); its output is released at once",
                    self.machine.generation()
                );
                vmx.copy_inputs(None);
                self.link = None;
                self.events = never();
                self.standby_addr = None;
            }
            Action::Fence { why } => {
                let why = match why {
                    FenceReason::LostClaim { reason, generation } => format!(
                        "lost its standby ({reason}) and then the claim of generation \
                         {generation} at the {}: another VM is primary",
                        self.describe_arbiter()
                    ),
                    FenceReason::NotNewest { generation } => format!(
                        "the {} says generation {generation} is no longer the newest",
                        self.describe_arbiter()
                    ),
                };
                return Err(self.fence(vmx, &why));
            }
            Action::WantStandby(on) => self.want_standby.store(on, Ordering::Relaxed),
            Action::StartPreCopy { peer, why, fence } => {
                let Some(chan) = self.joiner.take() else {
                    return Ok(Some(Event::PreCopyFailed {
                        reason: "no channel to the joiner".into(),
                    }));
                };
                let dirty = vmx.vm().dirty_log();
                let mib = vmx.vm().layout().mem_bytes >> 20;
                let (g, e) = (fence.generation.0, fence.epoch.0);
                match why {
                    SyncReason::Start => log::info!(
                        "role: primary (generation {g}); full sync of {mib} MiB to the standby \
                         {peer} by pre-copy while the guest runs (output is released at once \
                         until epoch {e} completes the sync, and held from it on)"
                    ),
                    SyncReason::Rejoin => log::warn!(
                        "RE-PROTECTION: standby {peer} joined; full sync of {mib} MiB by \
                         pre-copy while the guest runs (generation {g}, completing with epoch \
                         {e})"
                    ),
                    SyncReason::Migrate => {
                        if let Some(m) = &mut self.migration {
                            m.phase = "pre-copy";
                        }
                        log::warn!(
                            "MIGRATION to {peer}: full sync of {mib} MiB by pre-copy while the \
                             guest runs (generation {g}, completing with epoch {e})"
                        )
                    }
                }
                self.resync = Some(Resync {
                    started: Instant::now(),
                    report: None,
                    completing_pages: 0,
                    completing_pause_ms: 0.0,
                    completing_stun_ms: 0.0,
                });
                let tx = self.aux_tx.clone();
                let who = peer.clone();
                let disks = match vmx.disk_tracker() {
                    Ok(d) => (!d.is_empty()).then_some(d),
                    Err(e) => {
                        return Ok(Some(Event::PreCopyFailed {
                            reason: format!("cannot read the disks for the pre-copy: {e}"),
                        }))
                    }
                };
                let started = precopy::spawn(
                    dirty,
                    disks,
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
                    return Ok(Some(Event::PreCopyFailed {
                        reason: e.to_string(),
                    }));
                }
            }
            Action::Refuse { peer, why, fence } => {
                log::warn!("refused standby {peer}: {why}");
                if let Some(mut chan) = self.joiner.take() {
                    let _ = chan.send(&Message::Nack {
                        fence,
                        code: transport::message::NackCode::OutOfOrder,
                        message: why.to_string(),
                    });
                }
            }
            Action::StartLink { peer } => {
                let started = match self.precopied.take() {
                    Some(chan) => Link::start(*chan, self.link_config(vmx)),
                    None => Err(Error::Link(transport::Error::Io(std::io::Error::other(
                        "no channel to the joiner",
                    )))),
                };
                return Ok(Some(match started {
                    Ok(link) => {
                        self.install(vmx, link);
                        Event::LinkUp
                    }
                    Err(e) => {
                        log::error!("re-protection by {peer} failed: {e}; still UNPROTECTED");
                        Event::LinkFailed {
                            reason: e.to_string(),
                        }
                    }
                }));
            }
            Action::Synced { peer, epoch, why } => {
                self.standby_addr = Some(peer.clone());
                let rs = self.resync.take();
                let ms = rs
                    .as_ref()
                    .map_or(0.0, |r| r.started.elapsed().as_secs_f64() * 1e3);
                let pause = rs.as_ref().map_or(0.0, |r| r.completing_pause_ms);
                match why {
                    SyncReason::Start => log::info!(
                        "PROTECTED: standby {peer} committed the full sync (epoch {epoch}) {ms:.0} \
                         ms after the primary connected; the guest stopped {pause:.2} ms for it"
                    ),
                    SyncReason::Rejoin => {
                        log::warn!(
                            "PROTECTED again: standby {peer} committed the full sync (epoch \
                             {epoch}) {ms:.0} ms after it joined"
                        );
                        self.stats.reprotections += 1;
                    }
                    SyncReason::Migrate => {
                        log::info!(
                            "migration: {peer} committed the full sync (epoch {epoch}) {ms:.0} \
                             ms after it answered; it protects the VM; converging"
                        );
                        if let Some(m) = &mut self.migration {
                            m.precopy = rs.as_ref().and_then(|r| r.report.as_ref()).map(Into::into);
                        }
                        return Ok(None);
                    }
                }
                self.last_sync = Some(LastSync {
                    peer,
                    first: why == SyncReason::Start,
                    joined_to_protected_ms: ms,
                    completing_epoch: epoch,
                    completing_pages: rs.as_ref().map_or(0, |r| r.completing_pages),
                    completing_pause_ms: pause,
                    completing_stun_ms: rs.as_ref().map_or(0.0, |r| r.completing_stun_ms),
                    precopy: rs.as_ref().and_then(|r| r.report.as_ref()).map(Into::into),
                    protected_unix_ms: unix_ms(),
                });
            }
            Action::Goodbye => {
                if let Some(link) = self.link.take() {
                    link.goodbye();
                    match &self.migration {
                        Some(m) => log::warn!(
                            "the standby {} was told goodbye: the VM moves to {}; UNPROTECTED \
                             until it has its sync",
                            self.standby_addr.as_deref().unwrap_or("?"),
                            m.to
                        ),
                        None => log::info!("guest finished; the standby was told goodbye"),
                    }
                }
                vmx.copy_inputs(None);
                self.events = never();
                self.standby_addr = None;
            }
            Action::Assess { epoch } => {
                let Some(m) = &mut self.migration else {
                    return Ok(Some(Event::Assessed { last: true }));
                };
                // Only converging epochs teach the policy: the completing epoch (the receiver
                // built its VM meanwhile) and an ordinary epoch (hot pages reported whether
                // written or not) say nothing of the guest's pace or the link's.
                let Some((pages, rtt, CaptureKind::Switch)) = self.last_acked else {
                    m.phase = "converging";
                    return Ok(Some(Event::Assessed { last: false }));
                };
                let a = m.converge.assess(pages, rtt);
                m.last = Some(a);
                m.phase = "converging";
                m.max_throttle = m.max_throttle.max(a.throttle);
                log::info!(
                    "migration: epoch {epoch} of {pages} pages took {:.2} ms; the last would \
                     take about {:.2} ms{}; guest throttled {:.0} %",
                    rtt.as_secs_f64() * 1e3,
                    a.predicted.as_secs_f64() * 1e3,
                    if a.last { ": switching" } else { "" },
                    a.throttle * 100.0
                );
                if a.throttle > 0.0 && !a.last {
                    match &m.throttle {
                        Some(t) => t.set(a.throttle),
                        None => match migrate::Throttle::start(vmx.vm().clone(), a.throttle) {
                            Ok(t) => m.throttle = Some(t),
                            Err(e) => log::warn!("migration: no throttle ({e})"),
                        },
                    }
                }
                return Ok(Some(Event::Assessed { last: a.last }));
            }
            Action::Freeze => {
                if let Some(m) = &mut self.migration {
                    drop(m.throttle.take());
                    m.phase = "switching";
                    m.frozen = Some((Instant::now(), unix_ms()));
                }
                if let Some(since) = self.throttled_since.take() {
                    self.stats.throttled += since.elapsed();
                }
                vmx.suspend()?;
            }
            Action::Switch { peer, epoch } => {
                let fence = Fence {
                    generation: Generation(self.machine.generation()),
                    epoch: Epoch(epoch),
                };
                let sent = self.link.as_ref().is_some_and(|l| l.switch(fence));
                if !sent {
                    return Ok(Some(Event::LinkLost {
                        reason: format!("no link to {peer} for the switch"),
                    }));
                }
                log::info!("migration: {peer} holds epoch {epoch}; told it to take over");
            }
            Action::Moved { to, generation } => {
                vmx.copy_inputs(None);
                self.link = None;
                self.events = never();
                let done = match &self.migration {
                    Some(m) => MigrationDone {
                        ok: true,
                        to: to.clone(),
                        generation,
                        downtime_ms: m
                            .frozen
                            .map_or(f64::NAN, |f| f.0.elapsed().as_secs_f64() * 1e3),
                        frozen_unix_ms: m.frozen.map_or(0.0, |f| f.1),
                        total_ms: m.started.elapsed().as_secs_f64() * 1e3,
                        switchover: m.switchover,
                        precopy: m.precopy.clone(),
                        converging_epochs: m.converge.epochs(),
                        last_epoch_pages: m.last_pages,
                        last_epoch_pause_ms: m.last_pause_ms,
                        predicted_ms: m.last.map_or(0.0, |a| a.predicted.as_secs_f64() * 1e3),
                        forced: m.last.is_some_and(|a| a.forced),
                        max_throttle: m.max_throttle,
                        max_downtime_ms: m.max_downtime.as_secs_f64() * 1e3,
                    },
                    None => MigrationDone {
                        ok: true,
                        to: to.clone(),
                        generation,
                        ..MigrationDone::default()
                    },
                };
                self.end_migration(Ok(done));
                self.moved = Some(vmx::Moved { to, generation });
            }
            Action::MigrationFailed { to, why } => {
                if self.migration.as_ref().is_some_and(|m| m.to == to) {
                    self.end_migration(Err(why));
                }
            }
        }
        Ok(None)
    }

    /// Captures `epoch`, accounts for it, keeps its records until it is acknowledged, and arms
    /// the epoch timer. [`Action::Send`] hands it to the link.
    fn capture(&mut self, vmx: &mut Vmx, epoch: u64, kind: CaptureKind) -> Result<()> {
        // The pre-copy rounds carried memory and disks whole: every epoch, the completing one
        // too, carries what was written since the last take; a migration's, exactly that.
        let precise = matches!(kind, CaptureKind::Switch | CaptureKind::Final);
        let mut cap = vmx.capture_epoch(
            epoch,
            vmx::machine::EpochCapture {
                precise,
                ..Default::default()
            },
        )?;
        // From this epoch on the guest's writes reach the outside only through epochs the
        // standby commits: its flushes need no fdatasync here.
        vmx.set_speculative_flush(true)?;
        if !self.drained.is_empty() {
            // Output taken for a release that did not happen belongs to this epoch.
            let mut records = std::mem::take(&mut self.drained);
            append(&mut records, std::mem::take(&mut cap.records));
            cap.records = records;
        }
        let bytes = cap.runs.iter().map(|r| r.data.len() as u64).sum::<u64>();
        match kind {
            CaptureKind::Completing => {
                let pages = bytes / 4096;
                let (rounds, ms) = self
                    .resync
                    .as_ref()
                    .and_then(|r| r.report.as_ref())
                    .map_or((0, 0.0), |r| (r.rounds.len(), r.ms));
                log::info!(
                    "pre-copy done in {rounds} rounds ({ms:.0} ms); completing epoch {epoch}: \
                     {pages} pages dirtied during the last round, stunned {:.2} ms ({})",
                    cap.pause.as_secs_f64() * 1e3,
                    cap.phases
                        .iter()
                        .map(|(p, d)| format!("{p} {:.2}", d.as_secs_f64() * 1e3))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if let Some(rs) = &mut self.resync {
                    rs.completing_pages = pages;
                    rs.completing_pause_ms = cap.pause.as_secs_f64() * 1e3;
                    rs.completing_stun_ms = cap.stun.as_secs_f64() * 1e3;
                }
                self.stats.full_syncs += 1;
            }
            CaptureKind::Final => {
                let pages = bytes / 4096;
                log::info!(
                    "migration: last epoch {epoch}: {pages} pages, captured in {:.2} ms",
                    cap.pause.as_secs_f64() * 1e3
                );
                if let Some(m) = &mut self.migration {
                    m.last_pages = pages;
                    m.last_pause_ms = cap.pause.as_secs_f64() * 1e3;
                }
            }
            CaptureKind::Epoch | CaptureKind::Switch => {}
        }
        let pause_ms = cap.pause.as_secs_f64() * 1e3;
        if self.stats.pauses_ms.len() >= PAUSE_WINDOW {
            self.stats.pauses_ms.remove(0);
        }
        self.stats.pauses_ms.push(pause_ms);
        if let Some(m) = &self.metrics {
            m.observe_pause(cap.pause);
        }
        for (phase, d) in &cap.phases {
            let i = match self.stats.phases_ms.iter().position(|p| p.0 == *phase) {
                Some(i) => i,
                None => {
                    self.stats.phases_ms.push((phase, Vec::new()));
                    self.stats.phases_ms.len() - 1
                }
            };
            let v = &mut self.stats.phases_ms[i].1;
            if v.len() >= PAUSE_WINDOW {
                v.remove(0);
            }
            v.push(d.as_secs_f64() * 1e3);
        }
        if self.stats.save_steps_ms.len() >= PAUSE_WINDOW {
            self.stats.save_steps_ms.remove(0);
        }
        self.stats
            .save_steps_ms
            .push(cap.save_step.as_secs_f64() * 1e3);
        self.stats.mem_bytes += bytes;
        // Frames of this epoch (taken by the capture while the guest was stunned: nothing of a
        // later epoch is among them), after any taken for a release that did not happen.
        let mut frames = std::mem::take(&mut self.drained_frames);
        frames.append(&mut cap.frames);
        self.in_flight = Some(InFlight {
            epoch: cap.epoch,
            pages: bytes / 4096,
            kind,
            records: cap.records.clone(),
            frames,
            captured: Instant::now(),
        });
        self.next_tick = Some(Instant::now() + self.interval);
        self.captured = Some(cap);
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

    /// Before a release: the arbiter must still back this VM's claim to its generation
    /// ([`Arbiter::check_lease`]: an etcd lease lost or unrenewed for its TTL); if not, fences.
    fn confirm_claim(&mut self, vmx: &mut Vmx) -> Result<()> {
        let Some(arb) = self.arbiter.clone() else {
            return Ok(());
        };
        match arb.check_lease(self.machine.generation()) {
            Ok(()) => Ok(()),
            Err(e) => {
                let why = format!(
                    "can no longer show its claim at the {} ({e})",
                    arb.describe()
                );
                Err(self.fence(vmx, &why))
            }
        }
    }

    /// Stops the guest and releases nothing: another VM is primary.
    fn fence(&mut self, vmx: &mut Vmx, why: &str) -> Error {
        let _ = vmx.suspend();
        vmx.copy_inputs(None);
        self.link = None;
        let in_flight = self.in_flight.take().map(|f| f.records).unwrap_or_default();
        let dropped: usize = std::mem::take(&mut self.drained)
            .iter()
            .chain(in_flight.iter())
            .chain(vmx.take_held().iter())
            .map(|h| h.len())
            .sum();
        log::error!(
            "FENCED: this VM (generation {}) {why}. The guest is stopped and {dropped} held \
             records are dropped unreleased.",
            self.machine.generation()
        );
        Error::Fenced(format!(
            "generation {} {why}; this VM stopped without releasing its held output",
            self.machine.generation()
        ))
    }

    fn set_sync_status(&self, v: Option<precopy::RoundProgress>) {
        if let Ok(mut s) = self.sync_status.lock() {
            *s = v;
        }
    }

    fn sync_phase(&self) -> Option<SyncStatus> {
        if let Some(peer) = self.machine.resyncing() {
            let progress = self.sync_status.lock().ok().and_then(|s| s.clone());
            return Some(match progress {
                Some(p) => SyncStatus {
                    phase: p.phase,
                    peer: peer.to_string(),
                    epoch: None,
                    round_pages: Some(p.round_pages),
                    sent_pages: Some(p.sent_pages),
                    elapsed_ms: Some(p.elapsed_ms),
                },
                None => SyncStatus {
                    phase: "pre-copy starting".into(),
                    peer: peer.to_string(),
                    epoch: None,
                    round_pages: None,
                    sent_pages: None,
                    elapsed_ms: None,
                },
            });
        }
        self.machine.completing().map(|(peer, epoch)| SyncStatus {
            phase: "completing epoch".into(),
            peer: peer.to_string(),
            epoch: Some(epoch),
            round_pages: None,
            sent_pages: None,
            elapsed_ms: None,
        })
    }

    /// The typed status.
    pub fn ft_status(&self) -> FtStatus {
        let s = &self.stats;
        let p = &s.pauses_ms;
        FtStatus {
            role: Role::Primary,
            protected: Some(self.machine.protected()),
            unprotected_because: self.machine.unprotected_because().map(str::to_string),
            generation: Some(self.machine.generation()),
            phase: None,
            committed_epoch: None,
            epoch: Some(self.machine.next_epoch().saturating_sub(1)),
            last_ack: Some(self.machine.last_ack()),
            in_flight: self.machine.in_flight(),
            lag_ms: Some(s.lag.as_secs_f64() * 1e3),
            interval_ms: Some(self.interval.as_secs_f64() * 1e3),
            pause_ms: Some(PauseMs {
                p50: percentile(p, 50.0),
                p99: percentile(p, 99.0),
                max: p.iter().cloned().fold(0.0, f64::max),
                count: p.len() as u64,
                save_step_p50: percentile(&s.save_steps_ms, 50.0),
                phases_p50: s
                    .phases_ms
                    .iter()
                    .map(|(phase, v)| crate::status::PhaseMs {
                        phase: phase.to_string(),
                        ms: percentile(v, 50.0),
                    })
                    .collect(),
            }),
            bytes_sent: Some(BytesSent {
                pages: s.page_wire_bytes,
                state: s.state_bytes,
                records: s.record_bytes,
            }),
            counters: Counters::Primary(PrimaryCounters {
                full_syncs: s.full_syncs,
                epochs: s.epochs,
                mem_bytes: s.mem_bytes,
                full_sync_bytes: s.full_sync_bytes,
                state_bytes: s.state_bytes,
                nacks: s.nacks,
                throttles: s.throttles,
                late_epochs: s.late,
                throttled_ms: s.throttled.as_secs_f64() * 1e3,
                released_records: s.released,
                xor_ranges: s.xor_ranges,
                xor_cache_bytes: s.xor_cache_bytes,
            }),
            notes: self.notes.clone(),
            sync: self.sync_phase(),
            last_sync: self.last_sync.clone(),
            reprotections: Some(s.reprotections),
            migration: self.migration.as_ref().map(|m| MigrationStatus {
                to: m.to.clone(),
                phase: m.phase.into(),
                converging_epochs: m.converge.epochs(),
                throttle: m.last.map_or(0.0, |a| a.throttle),
                elapsed_ms: m.started.elapsed().as_secs_f64() * 1e3,
            }),
        }
    }

    /// For `status`: [`Protector::ft_status`] as JSON.
    pub fn status(&self) -> Value {
        serde_json::to_value(self.ft_status()).unwrap_or_default()
    }
}

/// Appends `more` to `into`, vCPU by vCPU.
fn append(into: &mut Vec<Vec<Record>>, more: Vec<Vec<Record>>) {
    if into.len() < more.len() {
        into.resize(more.len(), Vec::new());
    }
    for (v, r) in more.into_iter().enumerate() {
        into[v].extend(r);
    }
}

impl vmx::Replication for Protector {
    type Event = LinkEvent;
    type Aux = Aux;
    type Error = Error;

    fn events(&self) -> Receiver<LinkEvent> {
        self.events.clone()
    }
    fn aux(&self) -> Receiver<Aux> {
        self.aux_rx.clone()
    }
    fn deadline(&self) -> Option<Instant> {
        let epoch = self.link.as_ref().and(self.next_tick);
        let frames =
            (self.cards && self.machine.releases_at_once()).then(|| Instant::now() + FRAME_FLUSH);
        epoch.into_iter().chain(frames).min()
    }
    fn on_event(&mut self, ev: LinkEvent, vmx: &mut Vmx) -> Result<()> {
        self.event(ev, vmx)
    }
    fn on_aux(&mut self, a: Aux, vmx: &mut Vmx) -> Result<()> {
        Protector::on_aux(self, a, vmx)
    }
    fn tick(&mut self, vmx: &mut Vmx) -> Result<()> {
        if self.cards && self.machine.releases_at_once() {
            Protector::after_output(self, vmx)?;
        }
        // The frame flush may come before the epoch is due: only a due epoch ticks.
        let due = self.link.is_some() && self.next_tick.is_some_and(|t| t <= Instant::now());
        if due {
            Protector::tick(self, vmx)?;
        }
        Ok(())
    }
    fn after_output(&mut self, vmx: &mut Vmx) -> Result<()> {
        Protector::after_output(self, vmx)
    }
    fn finish(&mut self, vmx: &mut Vmx) -> Result<()> {
        Protector::finish(self, vmx)
    }
    fn status(&self) -> Option<Value> {
        Some(Protector::status(self))
    }
    fn request(&mut self, req: Request, reply: Sender<Value>, vmx: &mut Vmx) -> Result<()> {
        match req {
            Request::Migrate {
                addr,
                max_downtime_ms,
            } => {
                let budget =
                    max_downtime_ms.map_or(migrate::DEFAULT_MAX_DOWNTIME, Duration::from_millis);
                self.migrate(addr, budget, reply, vmx)
            }
            other => {
                let _ = reply.send(CtlAnswer::refused(format!(
                    "{other:?} is not for the replication layer"
                )));
                Ok(())
            }
        }
    }
    fn moved(&self) -> Option<vmx::Moved> {
        self.moved.clone()
    }
}
