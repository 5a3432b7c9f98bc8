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

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver};
use serde::Serialize;
use serde_json::{json, Value};
use transport::message::NackCode;
use transport::{Channel, Fence, Intent, Message, Psk, Received};

use super::epoch::{Base, Replica, Staging};
use super::sink::SinkClient;
use super::{unix_ms, Protector};
use crate::groups::MachineConfig;
use crate::machine::{power_on, Boot, Options, Outcome, Vmx};
use crate::{Error, Result};

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
}

/// What a failover took.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    /// Why the primary was declared dead.
    pub reason: String,
    /// Time since the last frame from the primary when it was declared dead.
    pub silence_ms: f64,
    /// Declared dead → guest running.
    pub activation_ms: f64,
    /// When the guest ran again (Unix ms).
    pub resumed_unix_ms: f64,
    /// The generation this standby took.
    pub generation: u64,
    /// The epoch it resumed from.
    pub from_epoch: u64,
    /// Output records inherited from the retained epochs and released.
    pub inherited_released: u64,
}

/// How a standby ended.
#[derive(Debug)]
pub enum StandbyOutcome {
    /// The primary finished the guest and said goodbye.
    PrimaryFinished {
        /// Epochs committed.
        commits: u64,
        /// The stats.
        stats: Value,
    },
    /// The primary was declared dead but won the next generation first: it is alive, and
    /// this standby stood down without running anything.
    StoodDown {
        /// Why.
        reason: String,
        /// Replication stats.
        stats: Value,
    },
    /// The primary died; this standby took over and ran the guest.
    TookOver {
        /// The failover.
        failover: FailoverReport,
        /// How the run ended.
        outcome: Box<Outcome>,
        /// Replication stats before the takeover.
        stats: Value,
        /// The protector's final status.
        primary: Value,
    },
}

#[derive(Default, Serialize)]
struct Counters {
    commits: u64,
    nacks: u64,
    partial_epochs_discarded: u64,
    precopy_rounds: u64,
    precopy_pages: u64,
    bytes_received: u64,
    frames: u64,
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
}

enum Next {
    Finished,
    Failover(String),
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
        let (frames_tx, frames): (_, Receiver<std::result::Result<(Received, usize), String>>) =
            unbounded();
        std::thread::Builder::new()
            .name("standby-reader".into())
            .spawn(move || loop {
                let r = rx.recv().map_err(|e| e.to_string()).map(|m| {
                    let n = match &m {
                        Received::Pages(p) => p.iter().map(|r| r.payload.len()).sum(),
                        _ => 0,
                    };
                    (m, n)
                });
                let end = r.is_err();
                if frames_tx.send(r).is_err() || end {
                    break;
                }
            })
            .map_err(|e| Error::Sink(format!("thread: {e}")))?;

        let dead_after = self.cfg.interval * 4;
        let mut c = Counters::default();
        let mut vmx: Option<Vmx> = None;
        let mut replica: Option<Replica> = None;
        let mut shape: Option<(u64, u32)> = None;
        let mut generation: Option<u64> = None;
        let mut staging: Option<Staging> = None;
        // A full sync by pre-copy: the image so far and the round being received.
        let mut base: Option<Base> = None;
        let mut round: Option<(u32, Staging)> = None;
        let mut poisoned: Option<(Fence, String)> = None;
        let mut bad_full: Option<String> = None;
        let mut last_frame = Instant::now();
        let status = |c: &Counters, r: &Option<Replica>, g: Option<u64>| {
            let phase = if r.is_some() {
                "protecting".to_string()
            } else if c.precopy_rounds > 0 {
                format!(
                    "full sync: {} pre-copy rounds received ({} MiB)",
                    c.precopy_rounds,
                    (c.precopy_pages * 4096) >> 20
                )
            } else {
                "waiting for the full sync".to_string()
            };
            json!({
                "role": "standby",
                "phase": phase,
                "generation": g,
                "committed_epoch": r.as_ref().map(|r| r.fence.epoch.0),
                "counters": c,
            })
        };
        let next = loop {
            let bytes_at = t0 + Duration::from_millis(last_bytes.load(Ordering::Relaxed));
            let waited = last_frame.elapsed().min(bytes_at.elapsed());
            // Before the first commit the primary may take a while to copy its memory.
            let limit = if replica.is_some() {
                dead_after
            } else {
                dead_after.max(Duration::from_secs(30))
            };
            if waited >= limit {
                break Next::Failover(format!(
                    "nothing from the primary for {} ms (4 × interval)",
                    waited.as_millis()
                ));
            }
            let poll = (limit - waited).min(Duration::from_millis(100));
            let item = match frames.recv_timeout(poll) {
                Ok(item) => item,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if let Some(v) = &mut vmx {
                        v.poll_control(&status(&c, &replica, generation));
                    }
                    continue;
                }
                Err(_) => Err("the reader stopped".into()),
            };
            let (msg, bytes) = match item {
                Ok(x) => x,
                Err(e) => {
                    if staging.is_some() {
                        c.partial_epochs_discarded += 1;
                        log::warn!("the primary vanished in the middle of an epoch: discarded");
                    }
                    break Next::Failover(format!("connection to the primary lost: {e}"));
                }
            };
            last_frame = Instant::now();
            c.frames += 1;
            c.bytes_received += bytes as u64;
            let nack = |tx: &mut Channel<TcpStream>, fence, code, message: String| {
                log::warn!("refusing epoch {fence:?}: {message}");
                let _ = tx.send(&Message::Nack {
                    fence,
                    code,
                    message,
                });
            };
            let m = match msg {
                Received::Message(m) => m,
                Received::Pages(batch) => {
                    if poisoned.is_some() {
                        continue;
                    }
                    match (&mut staging, &mut round) {
                        (Some(st), _) => {
                            if let Err(e) = st.pages(&batch) {
                                poisoned = Some((st.fence(), e.to_string()));
                                staging = None;
                            }
                        }
                        (None, Some((_, st))) => {
                            if let Err(e) = st.pages(&batch) {
                                bad_full = Some(format!("pre-copy: {e}"));
                                base = None;
                                round = None;
                            }
                        }
                        (None, None) => log::warn!("pages outside an epoch: ignored"),
                    }
                    continue;
                }
                Received::End => break Next::Finished,
                Received::Cancelled(why) => {
                    log::warn!("the primary cancelled the stream: {why}");
                    break Next::Finished;
                }
            };
            if let Some(f) = m.fence() {
                if generation.is_some_and(|g| f.generation.0 < g) {
                    nack(
                        &mut tx,
                        f,
                        NackCode::Stale,
                        format!("generation {} is stale", f.generation.0),
                    );
                    continue;
                }
            }
            match m {
                Message::FullSync {
                    fence,
                    mem_bytes,
                    vcpus,
                } => {
                    let ok = (1..=256).contains(&vcpus)
                        && mem_bytes % (1 << 20) == 0
                        && mem_bytes > 0
                        && mem_bytes <= 1 << 40
                        && shape.is_none_or(|s| s == (mem_bytes, vcpus));
                    if !ok {
                        bad_full = Some(format!(
                            "full sync of {mem_bytes} bytes, {vcpus} vCPUs does not fit this standby"
                        ));
                        continue;
                    }
                    bad_full = None;
                    shape = Some((mem_bytes, vcpus));
                    generation = Some(fence.generation.0);
                    base = Some(Base::new(mem_bytes));
                    round = None;
                }
                Message::PreCopy {
                    fence,
                    round: r,
                    pages,
                } => {
                    let (Some((mem_bytes, _)), Some(b), None) = (shape, &base, &bad_full) else {
                        bad_full.get_or_insert_with(|| "pre-copy without a full sync".into());
                        continue;
                    };
                    if r != b.rounds {
                        bad_full = Some(format!("pre-copy round {r}, expected {}", b.rounds));
                        continue;
                    }
                    match Staging::begin(fence, pages, mem_bytes) {
                        Ok(st) => round = Some((r, st)),
                        Err(e) => bad_full = Some(format!("pre-copy: {e}")),
                    }
                }
                Message::PreCopyEnd {
                    fence,
                    round: r,
                    ranges,
                    digest,
                } => {
                    let Some((expect, st)) = round.take() else {
                        bad_full.get_or_insert_with(|| "a pre-copy end without its round".into());
                        continue;
                    };
                    let applied = if expect != r {
                        Err(Error::Epoch(format!(
                            "pre-copy round {r} ends round {expect}"
                        )))
                    } else {
                        st.end_pages(fence, ranges, digest).and_then(|pages| {
                            let n = pages.iter().map(|p| p.1.len() as u64 / 4096).sum::<u64>();
                            base.as_mut().map_or(Ok(()), |b| b.apply(pages))?;
                            Ok(n)
                        })
                    };
                    match applied {
                        Ok(n) => {
                            c.precopy_rounds += 1;
                            c.precopy_pages += n;
                            log::info!("pre-copy round {r}: {n} pages received and verified");
                        }
                        Err(e) => {
                            log::warn!("pre-copy round {r} refused: {e}");
                            bad_full = Some(format!("pre-copy: {e}"));
                            base = None;
                        }
                    }
                }
                Message::EpochBegin { fence, pages } => {
                    poisoned = None;
                    if staging.take().is_some() {
                        c.partial_epochs_discarded += 1;
                    }
                    let Some((mem_bytes, _)) = shape.filter(|_| bad_full.is_none()) else {
                        let why = bad_full
                            .clone()
                            .unwrap_or_else(|| "an epoch before the full sync".into());
                        poisoned = Some((fence, why));
                        continue;
                    };
                    let expected = replica
                        .as_ref()
                        .map_or(fence.epoch.0, |r| r.fence.epoch.0 + 1);
                    if replica.is_some() && fence.epoch.0 != expected {
                        poisoned = Some((
                            fence,
                            format!("epoch {} out of order (expected {expected})", fence.epoch.0),
                        ));
                        continue;
                    }
                    match Staging::begin(fence, pages, mem_bytes) {
                        Ok(st) => staging = Some(st),
                        Err(e) => poisoned = Some((fence, e.to_string())),
                    }
                }
                Message::VcpuState { vcpu, data, .. } => {
                    if let Some(st) = &mut staging {
                        if let Err(e) = st.section(&format!("vcpu/{vcpu}"), 1, data) {
                            poisoned = Some((st.fence(), e.to_string()));
                            staging = None;
                        }
                    }
                }
                Message::DeviceState {
                    name,
                    version,
                    data,
                    ..
                } => {
                    if let Some(st) = &mut staging {
                        if let Err(e) = st.section(&name, version, data) {
                            poisoned = Some((st.fence(), e.to_string()));
                            staging = None;
                        }
                    }
                }
                Message::EpochEnd {
                    fence,
                    ranges,
                    digest,
                } => {
                    if let Some((f, why)) = poisoned.take() {
                        c.nacks += 1;
                        nack(&mut tx, f, NackCode::Malformed, why);
                        continue;
                    }
                    let Some(st) = staging.take() else {
                        c.nacks += 1;
                        nack(
                            &mut tx,
                            fence,
                            NackCode::OutOfOrder,
                            "an epoch end without its beginning".into(),
                        );
                        continue;
                    };
                    let (_, vcpus) = shape.expect("staging needs the shape");
                    let staged = match st.end(fence, ranges, digest, vcpus) {
                        Ok(s) => s,
                        Err(e) => {
                            c.nacks += 1;
                            nack(&mut tx, fence, NackCode::Malformed, e.to_string());
                            continue;
                        }
                    };
                    if vmx.is_none() {
                        match self.build(&staged.sections, shape.expect("shape")) {
                            Ok(v) => {
                                replica = Some(Replica::new(v.vm().memory().clone()));
                                vmx = Some(v);
                            }
                            Err(e) => {
                                c.nacks += 1;
                                nack(&mut tx, fence, NackCode::Internal, e.to_string());
                                continue;
                            }
                        }
                    }
                    if let (Some(b), Some(v)) = (base.take(), &vmx) {
                        // The pre-copied image goes in with the epoch that completes it.
                        if let Err(e) = b.write_into(v.vm().memory()) {
                            nack(&mut tx, fence, NackCode::Internal, e.to_string());
                            return Err(e);
                        }
                        log::info!(
                            "pre-copied image of {} rounds, {} pages, written into the replica",
                            b.rounds,
                            b.pages
                        );
                    }
                    let r = replica.as_mut().expect("built with the VM");
                    if let Err(e) = r.commit(staged) {
                        // Bounds were checked; a failure here means the replica is unusable.
                        nack(&mut tx, fence, NackCode::Internal, e.to_string());
                        return Err(e);
                    }
                    c.commits += 1;
                    if let Err(e) = tx.send(&Message::Ack { fence }) {
                        log::warn!("cannot acknowledge epoch {}: {e}", fence.epoch.0);
                    }
                    if c.commits == 1 {
                        log::info!(
                            "full sync committed (epoch {}): the primary is protected",
                            fence.epoch.0
                        );
                    }
                }
                Message::Heartbeat { .. } => {}
                Message::Goodbye => break Next::Finished,
                other => log::warn!("unexpected {other:?} from the primary: ignored"),
            }
            if let Some(v) = &mut vmx {
                v.poll_control(&status(&c, &replica, generation));
            }
            // Time spent here (building the VM, committing) is not the primary's silence.
            last_frame = Instant::now();
        };
        let _ = tx.get_ref().shutdown(std::net::Shutdown::Both);
        let stats = status(&c, &replica, generation);
        match next {
            Next::Finished => {
                log::info!(
                    "the primary finished and said goodbye after {} commits; nothing to take over",
                    c.commits
                );
                Ok(StandbyOutcome::PrimaryFinished {
                    commits: c.commits,
                    stats,
                })
            }
            Next::Failover(reason) => {
                let silence = last_frame.elapsed();
                let detected = Instant::now();
                let (Some(mut vmx), Some(replica)) = (vmx, replica) else {
                    return Err(Error::Epoch(format!(
                        "{reason}, before the first full sync was committed: nothing to take over"
                    )));
                };
                let generation = replica.fence.generation.0 + 1;
                if let Some(arb) = &self.cfg.arbiter {
                    let who = format!("standby pid {}", std::process::id());
                    if !arb.claim(generation, &who)? {
                        let why = format!(
                            "{reason}, but generation {generation} was claimed first at the {}: \
                             the primary is alive; standing down",
                            arb.describe()
                        );
                        log::warn!("{why}");
                        return Ok(StandbyOutcome::StoodDown { reason: why, stats });
                    }
                    log::info!("won generation {generation} at the {}", arb.describe());
                }
                log::warn!(
                    "FAILOVER: {reason}. Taking over as primary, generation {generation}, from \
                     committed epoch {}",
                    replica.fence.epoch.0
                );
                let vcpus = vmx.vm().vcpu_count();
                let sink = match &self.cfg.sink {
                    Some(a) => Some(SinkClient::connect(
                        a,
                        generation,
                        vcpus,
                        Duration::from_secs(5),
                    )?),
                    None => None,
                };
                let mut ft = Protector::new(generation, self.cfg.interval, sink);
                if let Some(arb) = &self.cfg.arbiter {
                    ft = ft.with_arbiter(arb.clone(), self.cfg.sink.clone());
                }
                vmx.hold_output(true);
                let inherited = replica.inherited_output(vcpus);
                let before = ft.stats.released;
                ft.release_inherited(&mut vmx, inherited)?;
                vmx.activate(replica.state.clone())?;
                let failover = FailoverReport {
                    reason,
                    silence_ms: silence.as_secs_f64() * 1e3,
                    activation_ms: detected.elapsed().as_secs_f64() * 1e3,
                    resumed_unix_ms: unix_ms(),
                    generation,
                    from_epoch: replica.fence.epoch.0,
                    inherited_released: ft.stats.released - before,
                };
                log::warn!(
                    "role: primary (generation {generation}, UNPROTECTED): guest running again \
                     {:.1} ms after the primary was declared dead",
                    failover.activation_ms
                );
                ft.notes = json!({"failover": &failover});
                if let Some(l) = self.listener.take() {
                    ft.accept_joins(l, self.cfg.psk.clone());
                }
                let outcome = vmx.run_with(Some(&mut ft))?;
                Ok(StandbyOutcome::TookOver {
                    failover,
                    outcome: Box::new(outcome),
                    stats,
                    primary: ft.status(),
                })
            }
        }
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
        let opts = Options {
            paused: true,
            ..self.cfg.opts.clone()
        };
        power_on(Boot::Replica { config }, &opts)
    }
}
