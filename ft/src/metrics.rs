//! Prometheus metrics of a primary or a standby (`tandem primary|standby --metrics ADDR`):
//! `GET /metrics` in the Prometheus text format (version 0.0.4), from a background thread.
//!
//! ```text
//!  scrape ─▶ metrics thread ──ask──▶ replication loop (Protector::on_aux / the standby's loop)
//!                  │        ◀─FtStatus─┘   the same FtStatus `tandem ctl SOCK status` shows
//!                  ├─ counters, gauges: computed from that status, at scrape time
//!                  └─ tandem_epoch_pause_seconds: observed by the primary at every capture
//! ```
//!
//! Everything but the pause histogram is read from a status snapshot taken for the scrape
//! (the [`FtStatus`] the control socket's `status` answers with), so the two cannot disagree.
//! The histogram needs every pause, not the status's window of the last 8,192: the
//! [`crate::Protector`] observes it where it records the pause for the status.
//!
//! If the replication loop does not answer within [`ASK_TIMEOUT`] (it is busy, e.g. with a
//! full sync, or not running yet), the scrape shows the last snapshot it got, and
//! `tandem_status_fresh` is 0.
//!
//! The output sink's counters (stale generations refused, refused connections, gaps,
//! duplicates) are the sink process's own: its `--report` file has them.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::status::{Counters, FtStatus, Role};
use crate::{Error, Result};

/// The `Content-Type` of a scrape's answer (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the epoch-pause histogram's buckets, seconds (50 µs to 100 ms; `+Inf`
/// is added).
pub const PAUSE_BUCKETS: [f64; 11] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
];

/// How long a scrape waits for the replication loop's status.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Asks the replication loop for its status: sends the reply channel there; false if the
/// loop is gone.
type Ask = Box<dyn Fn(Sender<FtStatus>) -> bool + Send>;

/// The status requests of a loop that answers them itself (the standby's): each is a channel
/// to send the status on. See [`answer`].
pub type StatusRequests = Receiver<Sender<FtStatus>>;

/// The process's metrics: cheap to clone (every clone is the same metrics).
#[derive(Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
}

struct Shared {
    /// The role until a status says (a standby waiting for its primary has none yet).
    role: Mutex<Role>,
    /// How to ask the replication loop (None: nothing to ask yet).
    ask: Mutex<Option<Ask>>,
    /// The last status the loop answered with.
    last: Mutex<Option<FtStatus>>,
    pause: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("role", &*lock(&self.shared.role))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// The status for a scrape: a fresh one from the replication loop (true), or the last it
    /// got (false); and the role.
    fn snapshot(&self) -> (Role, Option<FtStatus>, bool) {
        let asked = {
            let ask = lock(&self.ask);
            ask.as_ref().and_then(|ask| {
                let (tx, rx) = bounded(1);
                ask(tx).then_some(rx)
            })
        };
        if let Some(st) = asked.and_then(|rx| rx.recv_timeout(ASK_TIMEOUT).ok()) {
            *lock(&self.role) = st.role;
            *lock(&self.last) = Some(st.clone());
            return (st.role, Some(st), true);
        }
        (*lock(&self.role), lock(&self.last).clone(), false)
    }
}

/// A poisoned lock still holds usable data (each is a plain value, replaced whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// The metrics of a process that starts in `role`.
    pub fn new(role: Role) -> Metrics {
        let shared = Arc::new(Shared {
            role: Mutex::new(role),
            ask: Mutex::new(None),
            last: Mutex::new(None),
            pause: Histogram::new(PAUSE_BUCKETS),
        });
        let mut registry = Registry::with_prefix("tandem");
        registry.register_with_unit(
            "epoch_pause",
            "Guest-visible pause of each epoch (the guest stunned for the capture; full syncs \
             not counted)",
            Unit::Seconds,
            shared.pause.clone(),
        );
        registry.register_collector(Box::new(StatusCollector {
            shared: shared.clone(),
        }));
        Metrics {
            shared,
            registry: Arc::new(registry),
        }
    }

    /// Serves `GET /metrics` on `addr` (HOST:PORT; port 0 picks one) from a background
    /// thread, for the life of the process; other paths get 404. Returns the address bound.
    /// A bind failure is [`Error::Io`] with `addr` as its path and what to do as its reason.
    pub fn serve(&self, addr: &str) -> Result<SocketAddr> {
        let io = |source| Error::Io {
            path: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(|e| io(bind_error(e)))?;
        let local = listener.local_addr().map_err(io)?;
        let server = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for rq in server.incoming_requests() {
                    me.respond(rq);
                }
            })
            .map_err(|source| Error::Thread {
                what: "metrics",
                source,
            })?;
        log::info!("metrics at http://{local}/metrics");
        Ok(local)
    }

    fn respond(&self, rq: tiny_http::Request) {
        use tiny_http::{Header, Method, Response, StatusCode};
        let path = rq.url().split('?').next().unwrap_or_default();
        let head = *rq.method() == Method::Head;
        let r = if path != "/metrics" {
            rq.respond(
                Response::from_string("not found: the metrics are at /metrics\n")
                    .with_status_code(StatusCode(404)),
            )
        } else if *rq.method() != Method::Get && !head {
            let allow = Header::from_bytes("Allow", "GET, HEAD").expect("a valid header");
            rq.respond(
                Response::from_string("use GET\n")
                    .with_status_code(StatusCode(405))
                    .with_header(allow),
            )
        } else {
            let body = self.encode();
            let ct = Header::from_bytes("Content-Type", CONTENT_TYPE).expect("a valid header");
            let resp = Response::from_string(if head { String::new() } else { body });
            rq.respond(resp.with_header(ct))
        };
        if let Err(e) = r {
            log::debug!("metrics: answering a scrape: {e}");
        }
    }

    /// The metrics now, in the Prometheus text format (what `GET /metrics` answers).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            // Writing to a String does not fail; say so in the text if it ever does.
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }

    /// Records one epoch's guest-visible pause.
    pub fn observe_pause(&self, pause: Duration) {
        self.shared.pause.observe(pause.as_secs_f64());
    }

    /// From now on scrapes ask `ask` for the status of a process in `role` (a standby that
    /// took over installs its protector: the standby's snapshot is forgotten).
    pub(crate) fn set_source(&self, role: Role, ask: Ask) {
        *lock(&self.shared.role) = role;
        *lock(&self.shared.last) = None;
        *lock(&self.shared.ask) = Some(ask);
    }

    /// From now on scrapes send their requests to the returned channel, for a loop that
    /// answers them itself ([`answer`]) as a process in `role`.
    pub fn requests(&self, role: Role) -> StatusRequests {
        let (tx, rx) = unbounded();
        self.set_source(role, Box::new(move |reply| tx.send(reply).is_ok()));
        rx
    }
}

/// Answers every pending request of `requests` with `status()` (computed once, only if one
/// waits).
pub fn answer(requests: &StatusRequests, status: impl FnOnce() -> FtStatus) {
    let waiting: Vec<_> = requests.try_iter().collect();
    if waiting.is_empty() {
        return;
    }
    let st = status();
    for reply in waiting {
        let _ = reply.send(st.clone());
    }
}

/// What a bind failure means for the operator.
fn bind_error(e: std::io::Error) -> std::io::Error {
    use std::io::ErrorKind;
    let why = match e.kind() {
        ErrorKind::AddrInUse => "address in use: choose another port".to_string(),
        ErrorKind::AddrNotAvailable => "no such address on this host".to_string(),
        ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need privileges): choose another port".into()
        }
        _ => format!("cannot listen: {e}"),
    };
    std::io::Error::new(e.kind(), why)
}

/// Encodes the status-derived metrics at every scrape.
#[derive(Debug)]
struct StatusCollector {
    shared: Arc<Shared>,
}

impl Collector for StatusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        let (role, st, fresh) = self.shared.snapshot();
        encode_status(&mut enc, role, st.as_ref(), fresh)
    }
}

/// The descriptor of a metric (HELP and TYPE); HELP ends with a full stop, as the
/// registry writes it for registered metrics.
fn describe<'s>(
    enc: &'s mut DescriptorEncoder,
    name: &'s str,
    help: &str,
    metric_type: MetricType,
) -> std::result::Result<MetricEncoder<'s>, std::fmt::Error> {
    enc.encode_descriptor(name, &format!("{help}."), None, metric_type)
}

/// Writes one metric without labels.
fn one(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    m: &impl EncodeMetric,
) -> std::result::Result<(), std::fmt::Error> {
    m.encode(describe(enc, name, help, m.metric_type())?)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> std::result::Result<(), std::fmt::Error> {
    one(enc, name, help, &ConstCounter::new(v))
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> std::result::Result<(), std::fmt::Error> {
    one(enc, name, help, &ConstGauge::new(v))
}

/// A gauge of a whole number (an epoch, a generation, a flag).
fn whole(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> std::result::Result<(), std::fmt::Error> {
    one(enc, name, help, &ConstGauge::new(v as i64))
}

/// The metrics of a status (names without the `tandem_` prefix the registry adds; counters
/// get `_total`).
fn encode_status(
    enc: &mut DescriptorEncoder,
    role: Role,
    st: Option<&FtStatus>,
    fresh: bool,
) -> std::result::Result<(), std::fmt::Error> {
    {
        let mut fam = describe(
            enc,
            "role",
            "The process's role: 1 for the role it has now, 0 for the other",
            MetricType::Gauge,
        )?;
        for (name, r) in [("primary", Role::Primary), ("standby", Role::Standby)] {
            let v = i64::from(r == role);
            ConstGauge::new(v).encode(fam.encode_family(&[("role", name)])?)?;
        }
    }
    whole(
        enc,
        "status_fresh",
        "1 if this scrape's status came from the replication loop now, 0 if it is an older \
         one (the loop was busy or not started)",
        u64::from(fresh),
    )?;
    let failovers = st.and_then(FtStatus::failover);
    counter(
        enc,
        "failovers",
        "Failovers this process carried out (a standby that took over: 1)",
        u64::from(failovers.is_some()),
    )?;
    let Some(st) = st else {
        return Ok(());
    };
    if let Some(g) = st.generation {
        whole(
            enc,
            "generation",
            "The generation (a new primary takes the next one)",
            g,
        )?;
    }
    if let Some(f) = failovers {
        gauge(
            enc,
            "failover_activation_seconds",
            "The failover that made this primary: primary declared dead to guest running",
            f.activation_ms / 1e3,
        )?;
    }
    let protected = match &st.counters {
        Counters::Primary(_) => st.protected == Some(true),
        Counters::Standby(_) => st.committed_epoch.is_some(),
    };
    whole(
        enc,
        "protected",
        "1 while the VM is protected: on a primary, a standby protects it; on a standby, it \
         holds a committed replica to take over from",
        u64::from(protected),
    )?;
    match &st.counters {
        Counters::Primary(c) => {
            let epoch = st.epoch.unwrap_or(0);
            let acked = st.last_ack.unwrap_or(0);
            whole(enc, "epoch", "The last epoch captured", epoch)?;
            whole(
                enc,
                "acked_epoch",
                "The last epoch the standby acknowledged",
                acked,
            )?;
            whole(
                enc,
                "replication_lag_epochs",
                "Epochs captured and not yet acknowledged by the standby",
                epoch.saturating_sub(acked),
            )?;
            if let Some(ms) = st.lag_ms {
                gauge(
                    enc,
                    "replication_lag_seconds",
                    "Capture to acknowledgement of the last epoch acknowledged",
                    ms / 1e3,
                )?;
            }
            if let Some(ms) = st.interval_ms {
                gauge(
                    enc,
                    "epoch_interval_seconds",
                    "The epoch interval",
                    ms / 1e3,
                )?;
            }
            counter(
                enc,
                "epochs_committed",
                "Epochs committed: on a primary, epochs its standby acknowledged; on a \
                 standby, epochs it committed",
                c.epochs,
            )?;
            counter(
                enc,
                "full_syncs",
                "Full syncs sent (the first, and one per re-sync)",
                c.full_syncs,
            )?;
            counter(
                enc,
                "dirty_bytes",
                "Dirty page bytes captured by epochs (full syncs not counted)",
                c.mem_bytes,
            )?;
            counter(
                enc,
                "full_sync_bytes",
                "Page bytes captured by full syncs",
                c.full_sync_bytes,
            )?;
            if let Some(b) = &st.bytes_sent {
                let mut fam = describe(
                    enc,
                    "sent_bytes",
                    "Bytes sent to the standby, by kind: pages (on the wire, after \
                     compression), state (vCPU and device), records (held output)",
                    MetricType::Counter,
                )?;
                for (kind, v) in [
                    ("pages", b.pages),
                    ("state", b.state),
                    ("records", b.records),
                ] {
                    ConstCounter::new(v).encode(fam.encode_family(&[("kind", kind)])?)?;
                }
            }
            counter(
                enc,
                "nacks",
                "Epochs refused: on a primary, NACKs of epochs then acknowledged; on a \
                 standby, epochs it refused",
                c.nacks,
            )?;
            counter(
                enc,
                "throttles",
                "Times the guest was stunned to wait for a standby that fell behind",
                c.throttles,
            )?;
            counter(
                enc,
                "late_epochs",
                "Epochs acknowledged after the next tick; the next epoch waited for the Ack \
                 while the guest ran on",
                c.late_epochs,
            )?;
            one(
                enc,
                "throttled_seconds",
                "Time the guest spent stunned waiting for the standby",
                &ConstCounter::new(c.throttled_ms / 1e3),
            )?;
            counter(
                enc,
                "released_records",
                "Output records released to the outside",
                c.released_records,
            )?;
            counter(
                enc,
                "xor_ranges",
                "Page ranges sent as XOR deltas against the copy sent before",
                c.xor_ranges,
            )?;
            whole(
                enc,
                "xor_cache_bytes",
                "Bytes of page copies kept as XOR bases",
                c.xor_cache_bytes,
            )?;
            counter(
                enc,
                "reprotections",
                "Times a joined standby completed its full sync (the VM protected again)",
                st.reprotections.unwrap_or(0),
            )?;
            whole(
                enc,
                "resync_in_progress",
                "1 while a joined standby is being synced",
                u64::from(st.sync.is_some()),
            )?;
            if let Some(s) = &st.last_sync {
                gauge(
                    enc,
                    "last_resync_seconds",
                    "The last re-sync: join to the standby's commit of the completing epoch",
                    s.joined_to_protected_ms / 1e3,
                )?;
            }
        }
        Counters::Standby(c) => {
            if let Some(e) = st.committed_epoch {
                whole(enc, "committed_epoch", "The last epoch committed", e)?;
            }
            counter(
                enc,
                "epochs_committed",
                "Epochs committed: on a primary, epochs its standby acknowledged; on a \
                 standby, epochs it committed",
                c.commits,
            )?;
            counter(
                enc,
                "nacks",
                "Epochs refused: on a primary, NACKs of epochs then acknowledged; on a \
                 standby, epochs it refused",
                c.nacks,
            )?;
            counter(
                enc,
                "partial_epochs_discarded",
                "Epochs dropped incomplete (the primary died while sending)",
                c.partial_epochs_discarded,
            )?;
            counter(
                enc,
                "precopy_rounds",
                "Pre-copy rounds received and verified",
                c.precopy_rounds,
            )?;
            counter(
                enc,
                "precopy_pages",
                "Pages in the pre-copy rounds",
                c.precopy_pages,
            )?;
            counter(
                enc,
                "received_bytes",
                "Page payload bytes received",
                c.bytes_received,
            )?;
            counter(
                enc,
                "received_frames",
                "Frames received from the primary",
                c.frames,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BytesSent, Notes, PauseMs, PrimaryCounters, StandbyCounters};
    use std::collections::HashMap;
    use std::io::{Read, Write};

    fn primary_status() -> FtStatus {
        FtStatus {
            role: Role::Primary,
            protected: Some(true),
            unprotected_because: None,
            generation: Some(3),
            phase: None,
            committed_epoch: None,
            epoch: Some(42),
            last_ack: Some(41),
            in_flight: Some(42),
            lag_ms: Some(12.5),
            interval_ms: Some(50.0),
            pause_ms: Some(PauseMs::default()),
            bytes_sent: Some(BytesSent {
                pages: 4096,
                state: 700,
                records: 64,
            }),
            counters: Counters::Primary(PrimaryCounters {
                full_syncs: 1,
                epochs: 41,
                mem_bytes: 81920,
                throttles: 2,
                throttled_ms: 250.0,
                released_records: 9,
                ..Default::default()
            }),
            notes: None,
            sync: None,
            last_sync: None,
            reprotections: Some(1),
            migration: None,
        }
    }

    /// `name{labels}` → value, checking that every sample's family has HELP and TYPE.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut helped = Vec::new();
        let mut typed = Vec::new();
        let mut samples = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(!help.is_empty() && name.starts_with("tandem_"), "{line}");
                helped.push(name.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split_once(' ').expect("TYPE name type").0.to_string());
            } else if !line.is_empty() {
                let (key, value) = line.rsplit_once(' ').expect("a sample");
                let family = key.split('{').next().unwrap();
                assert!(
                    typed.iter().any(|t| family.starts_with(t.as_str())),
                    "{line}: no TYPE before it"
                );
                samples.insert(key.to_string(), value.parse().expect("a number"));
            }
        }
        assert_eq!(helped, typed, "every family has HELP and TYPE, in order");
        samples
    }

    #[test]
    fn a_primary_status_and_its_pauses_encode() {
        let m = Metrics::new(Role::Primary);
        let st = primary_status();
        m.set_source(
            Role::Primary,
            Box::new(move |reply| reply.send(st.clone()).is_ok()),
        );
        m.observe_pause(Duration::from_micros(80));
        m.observe_pause(Duration::from_millis(3));
        m.observe_pause(Duration::from_millis(500));
        let text = m.encode();
        let s = parse(&text);
        let want = [
            ("tandem_role{role=\"primary\"}", 1.0),
            ("tandem_role{role=\"standby\"}", 0.0),
            ("tandem_status_fresh", 1.0),
            ("tandem_generation", 3.0),
            ("tandem_protected", 1.0),
            ("tandem_epoch", 42.0),
            ("tandem_acked_epoch", 41.0),
            ("tandem_replication_lag_epochs", 1.0),
            ("tandem_replication_lag_seconds", 0.0125),
            ("tandem_epoch_interval_seconds", 0.05),
            ("tandem_epochs_committed_total", 41.0),
            ("tandem_full_syncs_total", 1.0),
            ("tandem_dirty_bytes_total", 81920.0),
            ("tandem_sent_bytes_total{kind=\"pages\"}", 4096.0),
            ("tandem_sent_bytes_total{kind=\"state\"}", 700.0),
            ("tandem_sent_bytes_total{kind=\"records\"}", 64.0),
            ("tandem_throttles_total", 2.0),
            ("tandem_throttled_seconds_total", 0.25),
            ("tandem_released_records_total", 9.0),
            ("tandem_reprotections_total", 1.0),
            ("tandem_failovers_total", 0.0),
            ("tandem_resync_in_progress", 0.0),
            ("tandem_epoch_pause_seconds_count", 3.0),
            ("tandem_epoch_pause_seconds_bucket{le=\"5e-05\"}", 0.0),
            ("tandem_epoch_pause_seconds_bucket{le=\"0.0001\"}", 1.0),
            ("tandem_epoch_pause_seconds_bucket{le=\"0.005\"}", 2.0),
            ("tandem_epoch_pause_seconds_bucket{le=\"0.1\"}", 2.0),
            ("tandem_epoch_pause_seconds_bucket{le=\"+Inf\"}", 3.0),
        ];
        for (k, v) in want {
            assert_eq!(s.get(k), Some(&v), "{k} in\n{text}");
        }
        assert!(text.contains("# TYPE tandem_epochs_committed_total counter\n"));
        assert!(text.contains("# TYPE tandem_epoch_pause_seconds histogram\n"));
        // A standby's counters are not a primary's.
        assert!(!s.contains_key("tandem_received_frames_total"), "{text}");
    }

    #[test]
    fn a_standby_answers_from_its_loop_and_a_takeover_makes_it_primary() {
        let m = Metrics::new(Role::Standby);
        // Before the loop runs: the role, nothing stale.
        let s = parse(&m.encode());
        assert_eq!(s["tandem_role{role=\"standby\"}"], 1.0);
        assert_eq!(s["tandem_status_fresh"], 0.0);
        assert!(!s.contains_key("tandem_epochs_committed_total"));

        let requests = m.requests(Role::Standby);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looping = stop.clone();
        let standby = FtStatus {
            role: Role::Standby,
            generation: Some(2),
            phase: Some("protecting".into()),
            committed_epoch: Some(17),
            epoch: None,
            last_ack: None,
            in_flight: None,
            lag_ms: None,
            interval_ms: None,
            pause_ms: None,
            bytes_sent: None,
            protected: None,
            counters: Counters::Standby(StandbyCounters {
                commits: 17,
                frames: 99,
                ..Default::default()
            }),
            unprotected_because: None,
            notes: None,
            sync: None,
            last_sync: None,
            reprotections: None,
            migration: None,
        };
        let t = std::thread::spawn(move || {
            while !looping.load(std::sync::atomic::Ordering::Relaxed) {
                answer(&requests, || standby.clone());
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let s = parse(&m.encode());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        assert_eq!(s["tandem_role{role=\"standby\"}"], 1.0);
        assert_eq!(s["tandem_status_fresh"], 1.0);
        assert_eq!(s["tandem_epochs_committed_total"], 17.0);
        assert_eq!(s["tandem_committed_epoch"], 17.0);
        assert_eq!(s["tandem_received_frames_total"], 99.0);
        assert_eq!(s["tandem_protected"], 1.0);
        assert!(!s.contains_key("tandem_throttles_total"));

        // The loop is gone: the last status, marked stale.
        let s = parse(&m.encode());
        assert_eq!(s["tandem_status_fresh"], 0.0);
        assert_eq!(s["tandem_epochs_committed_total"], 17.0);

        // It took over: the protector's status, with the failover.
        let mut p = primary_status();
        p.notes = Some(Notes {
            failover: Some(crate::status::FailoverReport {
                reason: "silence".into(),
                silence_ms: 200.0,
                activation_ms: 4.0,
                resumed_unix_ms: 0.0,
                generation: 3,
                from_epoch: 17,
                inherited_released: 0,
                ..Default::default()
            }),
        });
        m.set_source(
            Role::Primary,
            Box::new(move |reply| reply.send(p.clone()).is_ok()),
        );
        let s = parse(&m.encode());
        assert_eq!(s["tandem_role{role=\"primary\"}"], 1.0);
        assert_eq!(s["tandem_role{role=\"standby\"}"], 0.0);
        assert_eq!(s["tandem_failovers_total"], 1.0);
        assert_eq!(s["tandem_failover_activation_seconds"], 0.004);
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_over_http_and_says_when_the_port_is_taken() {
        let m = Metrics::new(Role::Primary);
        let addr = m.serve("127.0.0.1:0").unwrap();
        let ok = get(addr, "/metrics");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("tandem_role{role=\"primary\"} 1\n"), "{ok}");
        let missing = get(addr, "/");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let e = Metrics::new(Role::Primary)
            .serve(&addr.to_string())
            .unwrap_err()
            .to_string();
        assert_eq!(e, format!("{addr}: address in use: choose another port"));
    }
}
