//! The standby: receives epochs, commits whole ones, and takes over when the primary dies.
//!
//! ```text
//!   accept + handshake ─▶ receive ─┬─ EpochBegin/Pages/State/EpochEnd ─▶ verify ─▶ commit ─▶ Ack
//!                                  │        (anything wrong: drop the staging area, Nack)
//!                                  ├─ Goodbye / end of stream ─▶ the primary finished: exit
//!                                  └─ connection lost, or 4 × interval without a frame
//!                                        ─▶ FAILOVER: generation + 1, activate the committed
//!                                           image, release retained output from the sink's
//!                                           cursor, run on as an unprotected primary
//! ```
//!
//! The protocol logic is the pure state machine of [`machine`] (its docs have the state
//! diagram and the transition table); [`Standby::run`] is its I/O driver: it reads frames,
//! watches for silence, feeds them to the machine as events, and carries out the machine's
//! actions (acknowledge, refuse, build the replica VM and commit into it, claim a generation
//! at the arbiter, take over, stand down). [`harness`] drives the same machine without KVM,
//! for the fuzzer and the tests.

pub mod harness;
pub mod machine;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver};
use transport::{Channel, Intent, Message, Psk, Received};

use self::machine::{Action, Event, Machine, Shape};
use super::epoch::{Base, Replica, Staged};
use super::{unix_ms, Protector};
use crate::status::{EndReport, FtStatus, Notes, Role};
use crate::{Error, Result};
use ::sink::SinkClient;
use vmx::groups::MachineConfig;
use vmx::machine::{power_on, Boot, Options, Outcome, Vmx};

/// How a standby is set up.
#[derive(Clone, Debug)]
pub struct StandbyConfig {
    /// The primary's key (None: --insecure-plaintext).
    pub psk: Option<Psk>,
    /// Epoch interval the primary uses (silence of 4 × this means it is dead).
    pub interval: Duration,
    /// The output sink to release to after a takeover.
    pub sink: Option<String>,
    /// Control socket, output, scheduling of the VM.
    pub opts: Options,
    /// Where role changes are decided: the standby resumes only after winning the next
    /// generation there (None: it resumes on detection alone).
    pub arbiter: Option<std::sync::Arc<dyn super::arbiter::Arbiter>>,
    /// The output sink's key (None: a plaintext sink, testing only).
    pub sink_key: Option<Psk>,
    /// This host's back ends for the primary's disks (the replicas), in the primary's order;
    /// empty: the primary's own paths.
    pub disks: Vec<devices::virtio::BlockConfig>,
    /// This host's TAPs for the primary's cards, in order; empty: the primary's TAP names.
    pub nets: Vec<devices::virtio::NetConfig>,
    /// Metrics to feed (`--metrics`; None: none served): the standby's status, then, after
    /// a takeover, the new primary's.
    pub metrics: Option<crate::metrics::Metrics>,
}

pub use crate::status::FailoverReport;

/// How a standby ended.
#[derive(Debug)]
pub enum StandbyOutcome {
    /// The primary finished the guest and said goodbye.
    PrimaryFinished {
        /// Epochs committed.
        commits: u64,
        /// The stats.
        stats: FtStatus,
    },
    /// The primary was declared dead but won the next generation first: it is alive, and
    /// this standby stood down without running anything.
    StoodDown {
        /// Why.
        reason: String,
        /// Replication stats.
        stats: FtStatus,
    },
    /// The primary died; this standby took over and ran the guest.
    TookOver {
        /// The failover.
        failover: FailoverReport,
        /// How the run ended.
        outcome: Box<Outcome>,
        /// Replication stats before the takeover.
        stats: Box<FtStatus>,
        /// The protector's final status.
        primary: Box<FtStatus>,
    },
}

impl StandbyOutcome {
    /// What the `tandem standby` process prints at its end.
    pub fn end_report(&self) -> EndReport {
        match self {
            StandbyOutcome::PrimaryFinished { commits, stats } => EndReport {
                commits: Some(*commits),
                stats: Some(stats.clone()),
                ..EndReport::standby(false)
            },
            StandbyOutcome::StoodDown { reason, stats } => EndReport {
                stood_down: Some(reason.clone()),
                stats: Some(stats.clone()),
                ..EndReport::standby(false)
            },
            StandbyOutcome::TookOver {
                failover,
                outcome,
                stats,
                primary,
            } => EndReport {
                failover: Some(failover.clone()),
                replication: Some(FtStatus::clone(stats)),
                ft: Some(FtStatus::clone(primary)),
                // A suspended takeover prints where to, not the report (as it always has).
                report: Some(match outcome.as_ref() {
                    Outcome::Finished(r) => vmx::RunEnd::Finished(r.clone()),
                    Outcome::Suspended { path, .. } => vmx::RunEnd::Suspended {
                        suspended: path.clone(),
                        report: None,
                    },
                    Outcome::Moved {
                        to,
                        generation,
                        report,
                    } => vmx::RunEnd::Moved {
                        moved_to: to.clone(),
                        generation: *generation,
                        report: Some(report.clone()),
                    },
                }),
                ..EndReport::standby(true)
            },
        }
    }
}

/// The standby's receiving stream: notes when bytes arrive (ms since `t0`).
struct Watched {
    inner: TcpStream,
    last: Arc<AtomicU64>,
    t0: Instant,
}

impl std::io::Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.last
                .store(self.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

impl std::io::Write for Watched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A standby: listening for its primary, or joining a running one.
pub struct Standby {
    listener: Option<TcpListener>,
    join: Option<String>,
    cfg: StandbyConfig,
    /// How long the last claim at the arbiter took.
    claim_took: Duration,
    /// A connection to the sink, authenticated in advance (once something is committed), for
    /// a takeover to say hello on.
    sink_ready: Option<Receiver<::sink::Result<::sink::Authenticated>>>,
}

impl Standby {
    /// Listens on `addr` (port 0 picks one; see [`Standby::addr`]).
    pub fn bind(addr: &str, cfg: StandbyConfig) -> Result<Standby> {
        let listener = TcpListener::bind(addr).map_err(|source| Error::Io {
            path: addr.to_string(),
            source,
        })?;
        Ok(Standby {
            listener: Some(listener),
            join: None,
            cfg,
            claim_took: Duration::ZERO,
            sink_ready: None,
        })
    }

    /// Joins the running (unprotected) primary at `primary`; after a takeover, accepts
    /// joining standbys on `listen` if given.
    pub fn join(primary: &str, listen: Option<&str>, cfg: StandbyConfig) -> Result<Standby> {
        let listener = match listen {
            Some(addr) => Some(TcpListener::bind(addr).map_err(|source| Error::Io {
                path: addr.to_string(),
                source,
            })?),
            None => None,
        };
        Ok(Standby {
            listener,
            join: Some(primary.to_string()),
            cfg,
            claim_took: Duration::ZERO,
            sink_ready: None,
        })
    }

    /// The address it listens on (for its primary, or for standbys after a takeover).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    fn connect(&self) -> Result<Channel<TcpStream>> {
        if let Some(primary) = &self.join {
            let ch = super::join(primary, self.cfg.psk.as_ref(), Duration::from_secs(30))?;
            log::info!("role: standby, joined the primary at {primary}; waiting for its full sync");
            return Ok(ch);
        }
        let listener = self.listener.as_ref().expect("a standby listens or joins");
        let (ch, peer) =
            super::accept(listener, self.cfg.psk.as_ref(), Intent::Protect).map_err(|source| {
                Error::Io {
                    path: "accept".into(),
                    source,
                }
            })?;
        log::info!("role: standby, protecting the primary at {peer}");
        Ok(ch)
    }

    /// Waits for a primary, replicates it, and takes over if it dies.
    pub fn run(mut self) -> Result<StandbyOutcome> {
        let chan = self.connect()?;
        let (mut tx, rx) = chan.split()?;
        // Liveness counts bytes, not whole frames: on a slow link one large frame of pages
        // can take longer than the silence limit to arrive.
        let t0 = Instant::now();
        let last_bytes = Arc::new(AtomicU64::new(0));
        let watch = last_bytes.clone();
        let mut rx = rx.map_stream(|inner| Watched {
            inner,
            last: watch,
            t0,
        });
        let (frames_tx, frames): (_, Receiver<std::result::Result<Received, String>>) = unbounded();
        std::thread::Builder::new()
            .name("standby-reader".into())
            .spawn(move || loop {
                let r = rx.recv().map_err(|e| e.to_string());
                let end = r.is_err();
                if frames_tx.send(r).is_err() || end {
                    break;
                }
            })
            .map_err(|source| Error::Thread {
                what: "replication",
                source,
            })?;

        let mut m = Machine::new(self.cfg.arbiter.as_ref().map(|a| a.describe()));
        let scrapes = self
            .cfg
            .metrics
            .as_ref()
            .map(|metrics| metrics.requests(Role::Standby));
        let mut vmx: Option<Vmx> = None;
        let mut replica: Option<Replica> = None;
        let mut last_frame = Instant::now();
        let mut actions: VecDeque<Action> = VecDeque::new();
        // Set when the machine leaves the protocol: the link is shut, the stats taken.
        let mut ended: Option<(FtStatus, Duration, Instant)> = None;
        let mut fatal: Option<Error> = None;
        // A frame other than pages was handled: look at the control socket.
        let mut handled = false;
        loop {
            while let Some(action) = actions.pop_front() {
                if matches!(
                    action,
                    Action::Finish
                        | Action::Fail(_)
                        | Action::Claim { .. }
                        | Action::StandDown { .. }
                        | Action::TakeOver { .. }
                ) {
                    // Out of the protocol: the primary is done with, whatever comes next (a
                    // switching primary still hears the claim's outcome).
                    if !(matches!(action, Action::Claim { .. }) && m.switching()) {
                        let _ = tx.get_ref().shutdown(std::net::Shutdown::Both);
                    }
                    if ended.is_none() {
                        ended = Some((m.status(), last_frame.elapsed(), Instant::now()));
                    }
                }
                match action {
                    Action::Ack(fence) => {
                        if let Err(e) = tx.send(&Message::Ack { fence }) {
                            log::warn!("cannot acknowledge epoch {}: {e}", fence.epoch.0);
                        }
                    }
                    Action::RoundDone {
                        fence,
                        round,
                        ranges,
                        digest,
                    } => {
                        if let Err(e) = tx.send(&Message::PreCopyEnd {
                            fence,
                            round,
                            ranges,
                            digest,
                        }) {
                            log::warn!("cannot answer pre-copy round {round}: {e}");
                        }
                    }
                    Action::Confirm(fence) => {
                        if let Err(e) = tx.send(&Message::Ack { fence }) {
                            log::warn!(
                                "cannot confirm the switch to the primary ({e}); taking over \
                                 anyway: the arbiter granted generation {}",
                                fence.generation.0
                            );
                        }
                    }
                    Action::Nack {
                        fence,
                        code,
                        message,
                    } => {
                        let _ = tx.send(&Message::Nack {
                            fence,
                            code,
                            message,
                        });
                    }
                    Action::Commit {
                        staged,
                        base,
                        shape,
                    } => {
                        let first = replica.is_none();
                        let (event, err) = self.commit(&mut vmx, &mut replica, staged, base, shape);
                        if let (true, Some(r)) = (first, &replica) {
                            m.set_xor_base(r.xor_base());
                            self.prepare_sink();
                        }
                        fatal = fatal.or(err);
                        actions.extend(m.on(event));
                    }
                    Action::Finish => {
                        let (stats, ..) = ended.take().expect("ended");
                        return Ok(StandbyOutcome::PrimaryFinished {
                            commits: m.counters().commits,
                            stats,
                        });
                    }
                    Action::Fail(e) => return Err(e),
                    Action::Claim { generation } => {
                        let arb = self.cfg.arbiter.as_ref().expect("a claim needs an arbiter");
                        let who = format!("standby pid {}", std::process::id());
                        let t = Instant::now();
                        let won = arb.claim(generation, &who)?;
                        self.claim_took = t.elapsed();
                        actions.extend(m.on(Event::Claimed { generation, won }));
                    }
                    Action::StandDown { reason } => {
                        let (stats, ..) = ended.take().expect("ended");
                        return Ok(StandbyOutcome::StoodDown { reason, stats });
                    }
                    Action::TakeOver {
                        generation,
                        from,
                        reason,
                    } => {
                        let (stats, silence, detected) = ended.take().expect("ended");
                        let vmx = vmx.take().expect("a takeover needs the replica VM");
                        let replica = replica.take().expect("a takeover needs the replica");
                        debug_assert_eq!(replica.fence, from);
                        let inputs = m.take_inputs_after(from.epoch.0);
                        return self.take_over(
                            vmx, replica, generation, reason, stats, silence, detected, inputs,
                        );
                    }
                }
            }
            if let Some(e) = fatal.take() {
                return Err(e);
            }
            if let Some(r) = &scrapes {
                crate::metrics::answer(r, || m.status());
            }
            if std::mem::take(&mut handled) {
                if let Some(v) = &mut vmx {
                    v.poll_control(&m.status());
                }
                // Time spent here (building the VM, committing) is not the primary's silence.
                last_frame = Instant::now();
            }
            let bytes_at = t0 + Duration::from_millis(last_bytes.load(Ordering::Relaxed));
            let waited = last_frame.elapsed().min(bytes_at.elapsed());
            let limit = m.silence_limit(self.cfg.interval);
            if waited >= limit {
                let acts = m.on(Event::Silence {
                    ms: waited.as_millis() as u64,
                });
                if acts.is_empty() {
                    // A state that ignores silence: the next one is due a whole limit from
                    // now, so this loop does not spin.
                    last_frame = Instant::now();
                }
                actions.extend(acts);
                continue;
            }
            let poll = (limit - waited).min(Duration::from_millis(100));
            let item = match frames.recv_timeout(poll) {
                Ok(item) => item,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if let Some(v) = &mut vmx {
                        v.poll_control(&m.status());
                    }
                    continue;
                }
                Err(_) => Err("the reader stopped".into()),
            };
            let msg = match item {
                Ok(msg) => msg,
                Err(e) => {
                    actions.extend(m.on(Event::Lost(e)));
                    continue;
                }
            };
            last_frame = Instant::now();
            let pages = matches!(msg, Received::Pages(_));
            actions.extend(m.on(match msg {
                Received::Message(msg) => Event::Message(msg),
                Received::Pages(batch) => Event::Pages(batch),
                Received::End => Event::EndOfStream,
                Received::Cancelled(why) => Event::Cancelled(why),
            }));
            handled = !pages;
        }
    }

    /// Carries out [`Action::Commit`]: builds the replica VM at the first commit, writes the
    /// pre-copied image and the epoch into it. Returns the event for the machine, and the
    /// error to stop with if the replica broke.
    fn commit(
        &self,
        vmx: &mut Option<Vmx>,
        replica: &mut Option<Replica>,
        staged: Staged,
        base: Option<Base>,
        shape: Shape,
    ) -> (Event, Option<Error>) {
        let fence = staged.fence;
        if vmx.is_none() {
            match self.build(&staged.sections, (shape.mem_bytes, shape.vcpus)) {
                Ok(v) => match Replica::new(v.vm().memory().clone()).with_disks(&v.disk_images()) {
                    Ok(r) => {
                        *replica = Some(r);
                        *vmx = Some(v);
                    }
                    Err(e) => {
                        let why = e.to_string();
                        return (Event::CommitRefused { fence, why, base }, None);
                    }
                },
                Err(e) => {
                    let why = e.to_string();
                    return (Event::CommitRefused { fence, why, base }, None);
                }
            }
        }
        let r = replica.as_mut().expect("built with the VM");
        // Disk writes this replica cannot take are refused like a VM that cannot be built:
        // nothing is written.
        if let Err(e) = r.check(base.as_ref(), &staged) {
            let why = e.to_string();
            return (Event::CommitRefused { fence, why, base }, None);
        }
        // Bounds were checked; a failure here means the replica is unusable.
        match r.complete(base, staged) {
            Ok(()) => (Event::Committed { fence }, None),
            Err(e) => (
                Event::ReplicaFailed {
                    fence,
                    why: e.to_string(),
                },
                Some(e),
            ),
        }
    }

    /// Authenticates to the sink on a thread of its own, so that a takeover only says hello.
    fn prepare_sink(&mut self) {
        let Some(addr) = self.cfg.sink.clone() else {
            return;
        };
        let key = self.cfg.sink_key.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let started = std::thread::Builder::new()
            .name("sink-ready".into())
            .spawn(move || {
                let _ = tx.send(SinkClient::authenticate(
                    &addr,
                    key.as_ref(),
                    Duration::from_secs(5),
                ));
            });
        if started.is_ok() {
            self.sink_ready = Some(rx);
        }
    }

    /// The sink as `generation`: on the connection authenticated in advance if it is there and
    /// still works, else on a new one.
    fn sink_for(&mut self, generation: u64, vcpus: u32) -> Result<Option<SinkClient>> {
        let Some(addr) = self.cfg.sink.clone() else {
            return Ok(None);
        };
        let ready = self
            .sink_ready
            .take()
            .and_then(|rx| rx.try_recv().ok())
            .and_then(|r| r.ok());
        if let Some(c) = ready {
            match c.hello(generation, vcpus) {
                Ok(c) => return Ok(Some(c)),
                Err(e @ ::sink::Error::Refused { .. }) => return Err(e.into()),
                Err(e) => {
                    log::info!("the sink connection made in advance is gone ({e}); reconnecting")
                }
            }
        }
        Ok(Some(SinkClient::connect(
            &addr,
            self.cfg.sink_key.as_ref(),
            generation,
            vcpus,
            Duration::from_secs(5),
        )?))
    }

    /// Carries out [`Action::TakeOver`]: activates the committed image as the primary of
    /// `generation` and runs it.
    #[allow(clippy::too_many_arguments)]
    fn take_over(
        mut self,
        mut vmx: Vmx,
        replica: Replica,
        generation: u64,
        reason: String,
        stats: FtStatus,
        silence: Duration,
        detected: Instant,
        inputs: Vec<(u32, Vec<u8>)>,
    ) -> Result<StandbyOutcome> {
        let vcpus = vmx.vm().vcpu_count();
        let mut ft = Protector::new(generation, self.cfg.interval, None);
        ft.sink_key = self.cfg.sink_key.clone();
        ft.psk = self.cfg.psk.clone();
        if let Some(metrics) = &self.cfg.metrics {
            ft.set_metrics(metrics);
        }
        if let Some(arb) = &self.cfg.arbiter {
            ft = ft.with_arbiter(arb.clone(), self.cfg.sink.clone());
        }
        // The guest runs first; its output is held until the sink has heard this generation
        // and the inherited output went out (a round trip to the sink off the downtime).
        vmx.hold_output(true);
        ft.cards = vmx.has_cards();
        let t_restore = Instant::now();
        vmx.activate(replica.state.clone())?;
        let restore_took = t_restore.elapsed();
        let resumed_unix_ms = unix_ms();
        let activation = detected.elapsed();
        let cards = vmx.announce();
        if cards > 0 {
            log::info!("announced {cards} network card(s) from this host (RARP)");
        }
        // Input replication: what the primary's guest received after the committed epoch,
        // its copy here never saw; its senders would wait for their retransmission timers.
        let replayed = vmx.inject_inputs(inputs);
        if replayed > 0 {
            log::info!(
                "delivered again {replayed} frame(s) the primary received after epoch {}",
                replica.fence.epoch.0
            );
        }
        let t_sink = Instant::now();
        ft.set_sink(self.sink_for(generation, vcpus)?);
        let sink_took = t_sink.elapsed();
        // The committed disk writes were written without fdatasync (the primary held them
        // too); this copy is the only one now, and output waits for it to be durable.
        replica.sync_disks()?;
        let inherited = replica.inherited_output(vcpus);
        let before = ft.stats.released;
        ft.release_inherited(&mut vmx, inherited)?;
        let failover = FailoverReport {
            reason,
            silence_ms: silence.as_secs_f64() * 1e3,
            activation_ms: activation.as_secs_f64() * 1e3,
            resumed_unix_ms,
            generation,
            from_epoch: replica.fence.epoch.0,
            inherited_released: ft.stats.released - before,
            claim_ms: self.claim_took.as_secs_f64() * 1e3,
            sink_ms: sink_took.as_secs_f64() * 1e3,
            restore_ms: restore_took.as_secs_f64() * 1e3,
        };
        log::warn!(
            "role: primary (generation {generation}, UNPROTECTED): guest running again \
             {:.1} ms after the primary was declared dead (claim {:.1} ms, restore {:.1} ms; \
             then the sink in {:.1} ms)",
            failover.activation_ms,
            failover.claim_ms,
            failover.restore_ms,
            failover.sink_ms
        );
        ft.notes = Some(Notes {
            failover: Some(failover.clone()),
        });
        if let Some(l) = self.listener.take() {
            ft.accept_joins(l, self.cfg.psk.clone());
        }
        let outcome = vmx.run_with(&mut ft)?;
        Ok(StandbyOutcome::TookOver {
            failover,
            outcome: Box::new(outcome),
            stats: Box::new(stats),
            primary: Box::new(ft.ft_status()),
        })
    }

    /// Builds the replica VM from the first epoch's configuration.
    fn build(&self, sections: &checkpoint::Snapshot, shape: (u64, u32)) -> Result<Vmx> {
        let config: MachineConfig = sections
            .get(&checkpoint::group::section_name("config"))
            .ok_or_else(|| Error::Epoch("no machine configuration".into()))?
            .decode()?;
        if (config.mem_mib << 20, config.vcpus) != shape {
            return Err(Error::Epoch(format!(
                "configuration {config:?} disagrees with the full sync {shape:?}"
            )));
        }
        log::info!(
            "building the replica VM: {} MiB, {} vCPUs ({})",
            config.mem_mib,
            config.vcpus,
            config.guest
        );
        let mut config = config;
        if !self.cfg.disks.is_empty() {
            if self.cfg.disks.len() != config.disks.len() {
                return Err(Error::Epoch(format!(
                    "the primary has {} disk(s) and this standby was given {} --disk: give one \
                     per disk of the primary, in its order (or none to use its paths)",
                    config.disks.len(),
                    self.cfg.disks.len()
                )));
            }
            config.disks = self.cfg.disks.clone();
        }
        if !self.cfg.nets.is_empty() {
            if self.cfg.nets.len() != config.nets.len() {
                return Err(Error::Epoch(format!(
                    "the primary has {} network card(s) and this standby was given {} --net: \
                     give one per card of the primary, in its order (or none to use its TAPs)",
                    config.nets.len(),
                    self.cfg.nets.len()
                )));
            }
            // The guest keeps its MAC; only the TAP is this host's.
            for (mine, theirs) in config.nets.iter_mut().zip(&self.cfg.nets) {
                mine.tap = theirs.tap.clone();
            }
        }
        let opts = Options {
            paused: true,
            ..self.cfg.opts.clone()
        };
        Ok(power_on(Boot::Replica { config }, &opts)?)
    }
}
