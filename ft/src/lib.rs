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
//! * [`standby`] runs the other side; the `sink` crate is the outside world.
//! * Protection and re-protection: an unprotected primary takes a new standby (the one it
//!   connects to at start, [`Protector::protect`], one that joins through
//!   [`Protector::accept_joins`], or one found by [`Protector::redial`]) and syncs it by
//!   [`precopy`] while the guest runs; the first epoch after the rounds completes the sync, and
//!   it is the guest's only stop.
//! * Planned migration ([`migrate`], `tandem ctl SOCK migrate ADDR`): the receiver is synced
//!   like a new standby (or is the standby already: a switchover), epochs converge with the
//!   guest throttled, the last one is taken with the guest frozen, and the receiver takes
//!   over as the next generation through the arbiter; the primary's run ends
//!   (`vmx::Outcome::Moved`).
//! * [`arbiter`] decides role changes (no split brain). The `testkit` crate runs whole pairs of
//!   processes for tests, `cargo xtask run-pair`, `soak` and the benchmarks.
#![forbid(unsafe_code)]

pub mod arbiter;
pub mod epoch;
pub mod inputs;
pub mod link;
pub mod metrics;
pub mod migrate;
pub mod precopy;
pub mod primary;
pub mod standby;
pub mod status;

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use transport::{Channel, Fence, Intent, Message, Psk, Received};

use ::sink::SinkClient;
use arbiter::Arbiter;
use vmx::machine::{power_on, Boot, Options, Outcome};

pub use primary::{Aux, FtStats, Protector};
pub use status::FtStatus;

/// Everything that can go wrong in fault tolerance.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM (monitor, devices, checkpoint engine) failed.
    #[error(transparent)]
    Vmx(vmx::Error),
    /// A replication epoch was refused (malformed, truncated, out of order).
    #[error("epoch refused: {0}")]
    Epoch(String),
    /// The replication link failed.
    #[error("replication link: {0}")]
    Link(#[from] transport::Error),
    /// The output sink failed.
    #[error(transparent)]
    Sink(::sink::Error),
    /// This VM lost its claim to be primary and stopped without releasing anything.
    #[error("fenced: {0}")]
    Fenced(String),
    /// A file or socket could not be opened.
    #[error("{path}: {source}")]
    Io {
        /// The file or address.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// `--arbiter` names no arbiter this build knows, or names one badly.
    #[error("--arbiter {arg:?}: {why}")]
    ArbiterSpec {
        /// The argument.
        arg: String,
        /// What is wrong with it.
        why: String,
    },
    /// No etcd endpoint answered in time.
    #[error(
        "etcd at {endpoints} did not answer {what} within {waited_ms} ms (last: {detail}): is \
         etcd running and reachable from this host? check the endpoints in --arbiter"
    )]
    EtcdUnreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The request.
        what: &'static str,
        /// How long it was tried.
        waited_ms: u64,
        /// The last endpoint's failure.
        detail: String,
    },
    /// etcd answered something that cannot be used.
    #[error(
        "etcd at {endpoint} answered {what} unexpectedly: {detail} (tandem needs etcd 3.4 or \
         later, whose JSON gateway serves the client URL given in --arbiter)"
    )]
    EtcdReply {
        /// The endpoint that answered.
        endpoint: String,
        /// The request.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The etcd lease a generation was won with is lost or unconfirmed: this process may no
    /// longer act as that generation's primary.
    #[error("the etcd lease of generation {generation} {why}")]
    EtcdLease {
        /// The generation.
        generation: u64,
        /// Why.
        why: String,
    },
    /// A replication thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl From<vmx::Error> for Error {
    fn from(e: vmx::Error) -> Self {
        match e {
            // Our own error, passed through the run loop: keep its kind (a fence stays a fence).
            vmx::Error::Replication(inner) => match inner.downcast::<Error>() {
                Ok(ours) => *ours,
                Err(other) => Error::Vmx(vmx::Error::Replication(other)),
            },
            e => Error::Vmx(e),
        }
    }
}

impl From<checkpoint::Error> for Error {
    fn from(e: checkpoint::Error) -> Self {
        Error::Vmx(e.into())
    }
}

impl From<::sink::Error> for Error {
    fn from(e: ::sink::Error) -> Self {
        match e {
            // A newer generation has spoken: this VM must not release anything more.
            ::sink::Error::Refused { .. } => Error::Fenced(e.to_string()),
            e => Error::Sink(e),
        }
    }
}

impl Error {
    /// The process exit code: 3 for a fenced primary, 2 for a bad `--arbiter`, otherwise what
    /// [`vmx::Error::exit_code`] says (2 for usage errors), 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Fenced(_) => 3,
            Error::ArbiterSpec { .. } => 2,
            Error::Vmx(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Default epoch interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

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
    /// Faults to inject into the link (tests only; default: none).
    pub hooks: link::TestHooks,
    /// The output sink's key (None: a plaintext sink, testing only).
    pub sink_key: Option<transport::Psk>,
    /// Metrics to feed (`--metrics`; None: none served).
    pub metrics: Option<metrics::Metrics>,
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
                return Err(Error::Link(transport::Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot reach the {what} at {addr}: {e}"),
                ))))
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
pub fn run_primary(cfg: PrimaryConfig) -> Result<(Outcome, status::FtStatus)> {
    let generation = match &cfg.arbiter {
        Some(arb) => {
            let g = arb.current()? + 1;
            if !arb.claim(g, &format!("primary pid {}", std::process::id()))? {
                return Err(Error::Fenced(format!(
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
    let sink = match &cfg.sink {
        Some(a) => Some(SinkClient::connect(
            a,
            cfg.sink_key.as_ref(),
            generation,
            vcpus,
            cfg.connect_patience,
        )?),
        None => None,
    };
    let mut ft = Protector::new(generation, cfg.interval, sink);
    ft.hooks = cfg.hooks.clone();
    ft.sink_key = cfg.sink_key.clone();
    ft.psk = cfg.psk.clone();
    if let Some(m) = &cfg.metrics {
        ft.set_metrics(m);
    }
    if let Some(arb) = &cfg.arbiter {
        ft = ft.with_arbiter(arb.clone(), cfg.sink.clone());
    }
    vmx.hold_output(true);
    ft.cards = vmx.has_cards();
    if let Some(peer) = &cfg.peer {
        // The guest starts at once; the standby is synced by pre-copy while it runs.
        match connect(peer, cfg.psk.as_ref(), cfg.connect_patience) {
            Ok(ch) => ft.protect(&mut vmx, ch, peer.clone())?,
            Err(e) => log::error!("{e}: running UNPROTECTED"),
        }
    } else if cfg.listen.is_none() {
        log::warn!("no --peer: running UNPROTECTED (output is released at once)");
    }
    if let Some(peer) = &cfg.peer {
        ft.redial(peer.clone(), cfg.psk.clone());
    }
    if let Some(addr) = &cfg.listen {
        let l = TcpListener::bind(addr).map_err(|source| Error::Io {
            path: addr.clone(),
            source,
        })?;
        ft.accept_joins(l, cfg.psk.clone());
    }
    if !cfg.opts.paused {
        vmx.resume()?;
    }
    let outcome = vmx.run_with(&mut ft)?;
    Ok((outcome, ft.ft_status()))
}

/// A thread pool for pre-copy rounds, which read and code all of memory while the guest runs:
/// the host's CPUs less the guest's vCPUs, at least one. Epochs keep rayon's global pool:
/// confining their coding and apply to such a pool was measured and rejected (BENCHMARKS.md,
/// "Epoch coding on the CPUs the vCPUs leave free": no change in the 1-vCPU probe's stalls,
/// and `run-pair`'s 2-vCPU guest on two CPUs, left one thread, was throttled once a run).
pub(crate) fn guest_side_pool(vcpus: u32, name: &'static str) -> Option<rayon::ThreadPool> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cpus.saturating_sub(vcpus as usize).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|e| log::warn!("{name} work on the shared pool (no pool of its own: {e})"))
        .ok()
}

/// Runs `f` in `pool` (its parallel iterators use that pool's threads), or on the caller's
/// pool when there is none.
pub(crate) fn in_pool<R: Send>(
    pool: Option<&rayon::ThreadPool>,
    f: impl FnOnce() -> R + Send,
) -> R {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// The process's user + system time (`/proc/self/stat`, in clock ticks of 10 ms), for the
/// CPU measurements run by hand (`sender_coding_cpu`, `standby_apply_cpu`: their epochs are
/// many enough for that resolution). It counts every thread of the process: run one
/// measurement at a time (by its full name), not both in one `cargo test`.
#[cfg(test)]
pub(crate) fn process_cpu() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after = &stat[stat.rfind(')').expect("comm ends with ')'") + 2..];
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    std::time::Duration::from_millis((f[11] + f[12]) * 10)
}
