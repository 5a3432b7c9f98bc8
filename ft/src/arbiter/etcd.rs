//! The etcd arbiter, [`EtcdArbiter`]: claims are etcd transactions, the claimant keeps a lease
//! alive, and a primary whose lease is lost or unconfirmed fences itself. The design, and why
//! the generation keys are not bound to the lease, is in the parent module's docs.
//!
//! etcd is reached through its JSON gateway (`POST /v3/...` on the client URL, etcd 3.4 and
//! later) over plain HTTP, endpoint after endpoint: no gRPC, no `protoc`, no async runtime.
//! Every reply is read to at most [`MAX_REPLY`] bytes and decoded strictly enough to refuse
//! what etcd would not send; nothing here panics on a reply.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::Arbiter;
use crate::{Error, Result};

/// The lease TTL when `--arbiter etcd://…` says none (`?ttl=SECS`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// How long one request to one endpoint may take before the next endpoint is tried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// The most of a reply that is read; a longer one is refused.
pub const MAX_REPLY: u64 = 1 << 20;
/// The longest lease TTL accepted (seconds).
const MAX_TTL_SECS: u64 = 600;
/// Sleep between rounds over all endpoints while none answers.
const ROUND_PAUSE: Duration = Duration::from_millis(50);
/// How soon the keep-alive thread tries again after a failed renewal.
const RETRY_RENEWAL: Duration = Duration::from_millis(100);

/// Where the etcd arbiter is: `etcd://HOST:PORT[,HOST:PORT…]/PREFIX[?ttl=SECS]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdSpec {
    /// The client endpoints, `HOST:PORT` each, tried in turn.
    pub endpoints: Vec<String>,
    /// The key prefix of this VM (`/tandem/vm1`: starts with `/`, no trailing `/`).
    pub prefix: String,
    /// The lease TTL (whole seconds).
    pub ttl: Duration,
}

const SCHEME: &str = "etcd://";
const FORM: &str = "etcd://HOST:PORT[,HOST:PORT…]/PREFIX[?ttl=SECS]";

impl FromStr for EtcdSpec {
    type Err = Error;

    fn from_str(arg: &str) -> Result<Self> {
        let bad = |why: String| Error::ArbiterSpec {
            arg: arg.to_string(),
            why: format!("{why} (the form is {FORM})"),
        };
        let rest = arg
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("an etcd arbiter starts with etcd://".into()))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (hosts, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            endpoints.push(endpoint(h).map_err(bad)?);
        }
        let prefix = path.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(bad(
                "no key prefix: give each protected VM its own, e.g. etcd://127.0.0.1:2379/tandem/vm1"
                    .into(),
            ));
        }
        if prefix.contains("//") || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(format!(
                "the key prefix {prefix:?} has an empty segment or a space"
            )));
        }
        let mut ttl = DEFAULT_TTL;
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|kv| !kv.is_empty())
        {
            match kv.split_once('=') {
                Some(("ttl", v)) => {
                    let secs: u64 = v.parse().map_err(|_| {
                        bad(format!(
                            "ttl={v}: the lease TTL is whole seconds, e.g. ttl=5"
                        ))
                    })?;
                    if !(1..=MAX_TTL_SECS).contains(&secs) {
                        return Err(bad(format!(
                            "ttl={secs}: the lease TTL is 1 to {MAX_TTL_SECS} seconds"
                        )));
                    }
                    ttl = Duration::from_secs(secs);
                }
                _ => return Err(bad(format!("unknown option {kv:?} (only ttl=SECS is)"))),
            }
        }
        Ok(EtcdSpec {
            endpoints,
            prefix: prefix.to_string(),
            ttl,
        })
    }
}

/// Checks one `HOST:PORT` (`[v6]:PORT` too).
fn endpoint(h: &str) -> std::result::Result<String, String> {
    if h.is_empty() {
        return Err("an empty endpoint: give HOST:PORT, several separated by commas".into());
    }
    let Some((host, port)) = h.rsplit_once(':') else {
        return Err(format!(
            "endpoint {h:?} has no port: give HOST:PORT, e.g. 127.0.0.1:2379"
        ));
    };
    let bad_host = host.is_empty()
        || host.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '@' | ',')
        })
        || (host.contains(':') && !(host.starts_with('[') && host.ends_with(']')));
    if bad_host {
        return Err(format!(
            "endpoint {h:?}: {host:?} is not a host name or address (an IPv6 one goes in brackets)"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(h.to_string()),
        _ => Err(format!("endpoint {h:?}: {port:?} is not a port (1-65535)")),
    }
}

impl fmt::Display for EtcdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.endpoints.join(","), self.prefix)?;
        if self.ttl != DEFAULT_TTL {
            write!(f, "?ttl={}", self.ttl.as_secs())?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Replies. proto3's JSON leaves out zero values (an absent TTL is 0, an absent `succeeded` is
// false, absent `kvs` are none), int64s come as strings, bytes as base64.

/// An int64 as etcd's gateway writes it: a string (or, leniently, a number).
fn de_i64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum I {
        S(String),
        N(i64),
    }
    match I::deserialize(d)? {
        I::N(n) => Ok(n),
        I::S(s) => s
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an int64"))),
    }
}

/// Bytes as etcd's gateway writes them: base64.
fn de_b64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    B64.decode(s.as_bytes())
        .map_err(|e| serde::de::Error::custom(format!("bad base64: {e}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Header {
    #[serde(deserialize_with = "de_i64")]
    revision: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Kv {
    #[serde(deserialize_with = "de_b64")]
    key: Vec<u8>,
    #[serde(deserialize_with = "de_b64")]
    value: Vec<u8>,
    #[serde(deserialize_with = "de_i64")]
    create_revision: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RangeReply {
    kvs: Vec<Kv>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GrantReply {
    #[serde(rename = "ID", deserialize_with = "de_i64")]
    id: i64,
    #[serde(rename = "TTL", deserialize_with = "de_i64")]
    ttl: i64,
    error: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TxnResponse {
    #[serde(alias = "responseRange")]
    response_range: Option<RangeReply>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TxnReply {
    header: Header,
    succeeded: bool,
    responses: Vec<TxnResponse>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KeepAliveResult {
    #[serde(rename = "TTL", deserialize_with = "de_i64")]
    ttl: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KeepAliveReply {
    result: Option<KeepAliveResult>,
    error: Option<Value>,
}

/// What a claimant writes into its generation key (for people, and to recognise its own
/// claim when a retried transaction finds the key created by its first try).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ClaimValue {
    lease: String,
}

/// Decodes `body`, a reply of `endpoint` to `what`.
fn decode<T: DeserializeOwned>(endpoint: &str, what: &'static str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::EtcdReply {
        endpoint: endpoint.to_string(),
        what,
        detail: format!("not the JSON etcd sends ({e}): {}", excerpt(body)),
    })
}

/// The start of `body`, for error messages.
fn excerpt(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]);
    format!("{:?}{}", s, if body.len() > 200 { "…" } else { "" })
}

// ---------------------------------------------------------------------------------------------
// The HTTP side.

/// An answer from one endpoint.
enum Answer {
    /// 200 OK and the body.
    Ok { endpoint: String, body: Vec<u8> },
    /// etcd refused the request (gRPC status `code`, or -1 for a non-etcd HTTP error).
    Status {
        endpoint: String,
        code: i64,
        message: String,
    },
}

/// gRPC codes worth another endpoint (or another round): Unknown, DeadlineExceeded,
/// ResourceExhausted, Aborted, Unavailable (no leader, leader changed, request timed out).
fn retryable(code: i64) -> bool {
    matches!(code, 2 | 4 | 8 | 10 | 14)
}

/// Endpoints, one HTTP agent (connection pool), and which endpoint answered last.
struct Client {
    agent: ureq::Agent,
    endpoints: Vec<String>,
    preferred: AtomicUsize,
}

impl Client {
    fn new(endpoints: Vec<String>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // etcd is reached directly, never through an HTTP proxy from the environment.
            .proxy(None)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .max_response_header_size(64 * 1024)
            .build()
            .into();
        Client {
            agent,
            endpoints,
            preferred: AtomicUsize::new(0),
        }
    }

    fn all(&self) -> String {
        self.endpoints.join(",")
    }

    /// POSTs `body` to `path`, endpoint after endpoint (starting with the one that answered
    /// last), round after round, until one answers or `deadline` passes; always one round.
    fn post(
        &self,
        path: &str,
        what: &'static str,
        body: &Value,
        deadline: Instant,
    ) -> Result<Answer> {
        let started = Instant::now();
        let body = body.to_string();
        let n = self.endpoints.len();
        let mut last = String::from("no endpoint");
        loop {
            let first = self.preferred.load(Ordering::Relaxed);
            for i in 0..n {
                let idx = (first + i) % n;
                let ep = &self.endpoints[idx];
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = left.clamp(Duration::from_millis(50), REQUEST_TIMEOUT);
                match self.once(ep, path, what, &body, timeout) {
                    Ok(Answer::Status { code, message, .. }) if retryable(code) => {
                        last = format!("{ep}: {message}");
                    }
                    Ok(a) => {
                        self.preferred.store(idx, Ordering::Relaxed);
                        return Ok(a);
                    }
                    Err(Attempt::Retry(why)) => last = format!("{ep}: {why}"),
                    Err(Attempt::Fatal(e)) => return Err(e),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::EtcdUnreachable {
                    endpoints: self.all(),
                    what,
                    waited_ms: started.elapsed().as_millis() as u64,
                    detail: last,
                });
            }
            std::thread::sleep(ROUND_PAUSE.min(left));
        }
    }

    /// One POST to one endpoint.
    fn once(
        &self,
        ep: &str,
        path: &str,
        what: &'static str,
        body: &str,
        timeout: Duration,
    ) -> std::result::Result<Answer, Attempt> {
        let url = format!("http://{ep}{path}");
        let mut resp = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("content-type", "application/json")
            .send(body)
            .map_err(|e| Attempt::from_http(ep, what, e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_REPLY)
            .read_to_vec()
            .map_err(|e| Attempt::from_http(ep, what, e))?;
        if status == 200 {
            return Ok(Answer::Ok {
                endpoint: ep.to_string(),
                body: bytes,
            });
        }
        // etcd's gateway answers errors as {"error": …, "code": N, "message": …}.
        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct Status {
            code: Option<i64>,
            message: String,
        }
        let (code, message) = match serde_json::from_slice::<Status>(&bytes) {
            Ok(Status {
                code: Some(code),
                message,
            }) => (code, message),
            // Not etcd's error: a proxy's or another server's. 5xx may pass; others will not.
            _ if status >= 500 => (14, format!("HTTP {status}: {}", excerpt(&bytes))),
            _ => (-1, format!("HTTP {status}: {}", excerpt(&bytes))),
        };
        Ok(Answer::Status {
            endpoint: ep.to_string(),
            code,
            message,
        })
    }
}

/// Why one POST failed.
enum Attempt {
    /// Try the next endpoint (connection refused or reset, timeout, …).
    Retry(String),
    /// Give up: the answer cannot be used.
    Fatal(Error),
}

impl Attempt {
    fn from_http(ep: &str, what: &'static str, e: ureq::Error) -> Attempt {
        match e {
            ureq::Error::BodyExceedsLimit(_) => Attempt::Fatal(Error::EtcdReply {
                endpoint: ep.to_string(),
                what,
                detail: format!("a reply longer than {MAX_REPLY} bytes"),
            }),
            ureq::Error::BadUri(u) => Attempt::Fatal(Error::EtcdReply {
                endpoint: ep.to_string(),
                what,
                detail: format!("{u:?} is not a URL: check the endpoints in --arbiter"),
            }),
            ureq::Error::Timeout(t) => Attempt::Retry(format!("no answer in time ({t})")),
            e => Attempt::Retry(e.to_string()),
        }
    }
}

impl Answer {
    /// The body of a 200, decoded; etcd's refusal as an error.
    fn decode<T: DeserializeOwned>(self, what: &'static str) -> Result<T> {
        match self {
            Answer::Ok { endpoint, body } => decode(&endpoint, what, &body),
            Answer::Status {
                endpoint,
                code,
                message,
            } => Err(Error::EtcdReply {
                endpoint,
                what,
                detail: format!("refused (code {code}): {message}"),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The arbiter.

/// The lease this process won a generation with.
#[derive(Clone, Debug)]
struct Held {
    generation: u64,
    lease: i64,
    /// The generation key's create revision: the fencing token.
    token: i64,
    /// When the last renewal that etcd accepted was sent: the lease lives at least until this
    /// plus the TTL.
    confirmed: Instant,
    /// Why the lease is gone (etcd said so).
    lost: Option<String>,
}

struct Inner {
    spec: EtcdSpec,
    client: Client,
    held: Mutex<Option<Held>>,
    keepalive: AtomicBool,
}

/// Arbitration through etcd (see the module docs).
pub struct EtcdArbiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdArbiter")
            .field("spec", &self.inner.spec.to_string())
            .field("held", &*self.inner.held())
            .finish()
    }
}

impl EtcdArbiter {
    /// An arbiter at `spec`. Nothing is asked of etcd until the first call.
    pub fn new(spec: EtcdSpec) -> Self {
        let client = Client::new(spec.endpoints.clone());
        EtcdArbiter {
            inner: Arc::new(Inner {
                spec,
                client,
                held: Mutex::new(None),
                keepalive: AtomicBool::new(false),
            }),
        }
    }

    /// Where it is.
    pub fn spec(&self) -> &EtcdSpec {
        &self.inner.spec
    }

    /// The fencing token of the generation this process won last: its key's create revision
    /// (grows with every claim; storage or a sink can refuse writers showing an older one).
    /// None before a claim is won.
    pub fn token(&self) -> Option<i64> {
        self.inner.held().as_ref().map(|h| h.token)
    }

    /// The generation whose lease this process holds (None: none, or it is lost).
    pub fn holds(&self) -> Option<u64> {
        self.inner
            .held()
            .as_ref()
            .filter(|h| h.lost.is_none())
            .map(|h| h.generation)
    }

    fn key(&self, kind: &str, generation: u64) -> String {
        format!("{}/{kind}/{generation:020}", self.inner.spec.prefix)
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.spec.ttl
    }

    /// The newest generation, asking until `deadline`.
    fn newest(&self, deadline: Instant) -> Result<u64> {
        let base = format!("{}/generation/", self.inner.spec.prefix);
        // Only keys whose name starts with a digit: [base + "0", base + ":").
        let req = json!({
            "key": b64(&format!("{base}0")),
            "range_end": b64(&format!("{base}:")),
            "sort_order": "DESCEND",
            "sort_target": "KEY",
            "limit": "1",
        });
        let what = "a read of the newest generation";
        let answer = self
            .inner
            .client
            .post("/v3/kv/range", what, &req, deadline)?;
        let endpoint = answer.endpoint().to_string();
        let r: RangeReply = answer.decode(what)?;
        let Some(kv) = r.kvs.first() else {
            return Ok(0);
        };
        let key = String::from_utf8_lossy(&kv.key);
        key.strip_prefix(&base)
            .and_then(|g| g.parse::<u64>().ok())
            .ok_or_else(|| Error::EtcdReply {
                endpoint,
                what,
                detail: format!(
                    "the key {key:?} is no generation of tandem's: remove it (etcdctl del) or \
                     give this VM a prefix of its own"
                ),
            })
    }

    /// Whether `generation`'s key exists.
    fn exists(&self, generation: u64, deadline: Instant) -> Result<bool> {
        let what = "a read of a generation key";
        let req = json!({ "key": b64(&self.key("generation", generation)) });
        let r: RangeReply = self
            .inner
            .client
            .post("/v3/kv/range", what, &req, deadline)?
            .decode(what)?;
        Ok(!r.kvs.is_empty())
    }

    /// Grants a lease of the TTL.
    fn grant(&self, deadline: Instant) -> Result<i64> {
        let what = "a lease grant";
        let req = json!({ "TTL": self.inner.spec.ttl.as_secs() });
        let answer = self
            .inner
            .client
            .post("/v3/lease/grant", what, &req, deadline)?;
        let endpoint = answer.endpoint().to_string();
        let g: GrantReply = answer.decode(what)?;
        if !g.error.is_empty() || g.id == 0 || g.ttl <= 0 {
            return Err(Error::EtcdReply {
                endpoint,
                what,
                detail: format!("no lease (ID {}, TTL {}): {}", g.id, g.ttl, g.error),
            });
        }
        Ok(g.id)
    }
}

impl Inner {
    fn held(&self) -> MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews `lease` once; its remaining TTL (0: etcd no longer has it).
    fn renew(&self, lease: i64, deadline: Instant) -> Result<i64> {
        let what = "a lease renewal";
        let req = json!({ "ID": lease.to_string() });
        let answer = self
            .client
            .post("/v3/lease/keepalive", what, &req, deadline)?;
        let endpoint = answer.endpoint().to_string();
        let r: KeepAliveReply = answer.decode(what)?;
        match (r.result, r.error) {
            (Some(res), _) => Ok(res.ttl.max(0)),
            (None, Some(e)) => Err(Error::EtcdReply {
                endpoint,
                what,
                detail: format!("refused: {e}"),
            }),
            (None, None) => Err(Error::EtcdReply {
                endpoint,
                what,
                detail: "neither a result nor an error".into(),
            }),
        }
    }

    /// Revokes `lease`, once round the endpoints, ignoring failure (it expires anyway).
    fn revoke(&self, lease: i64) {
        let req = json!({ "ID": lease.to_string() });
        let r = self.client.post(
            "/v3/lease/revoke",
            "a lease revocation",
            &req,
            Instant::now() + REQUEST_TIMEOUT,
        );
        if let Err(e) = r {
            log::debug!("lease {lease:x} not revoked ({e}); it expires by itself");
        }
    }

    /// Records a renewal of `lease` sent at `sent` that etcd accepted.
    fn confirm(&self, lease: i64, sent: Instant) {
        if let Some(h) = self.held().as_mut().filter(|h| h.lease == lease) {
            h.confirmed = h.confirmed.max(sent);
        }
    }

    /// Records that etcd no longer has `lease`.
    fn lose(&self, lease: i64, why: String) {
        if let Some(h) = self.held().as_mut().filter(|h| h.lease == lease) {
            if h.lost.is_none() {
                log::error!(
                    "the etcd lease of generation {} {why}: this process may no longer act as \
                     its primary",
                    h.generation
                );
                h.lost = Some(why);
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let held = self.held().take();
        if let Some(h) = held.filter(|h| h.lost.is_none()) {
            self.revoke(h.lease);
        }
    }
}

impl Answer {
    fn endpoint(&self) -> &str {
        match self {
            Answer::Ok { endpoint, .. } | Answer::Status { endpoint, .. } => endpoint,
        }
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

impl EtcdArbiter {
    /// Starts the thread that renews the held lease every third of the TTL (once).
    fn start_keepalive(&self) {
        if self.inner.keepalive.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let ttl = self.inner.spec.ttl;
        let period = ttl / 3;
        let r = std::thread::Builder::new()
            .name("etcd-lease".into())
            .spawn(move || keep_alive(weak, ttl, period));
        if let Err(e) = r {
            // Without the thread, check_lease renews whenever the last renewal is a TTL old.
            log::error!("cannot start the etcd lease keep-alive thread: {e}");
            self.inner.keepalive.store(false, Ordering::SeqCst);
        }
    }
}

/// The keep-alive loop: renews the held lease every `period` (sooner again after a failure)
/// until the arbiter is dropped.
fn keep_alive(weak: Weak<Inner>, ttl: Duration, period: Duration) {
    let mut wait = period;
    let mut failing = false;
    loop {
        std::thread::sleep(wait);
        let Some(inner) = weak.upgrade() else {
            return;
        };
        wait = period;
        let held = inner.held().clone();
        let Some(h) = held.filter(|h| h.lost.is_none()) else {
            continue;
        };
        let sent = Instant::now();
        match inner.renew(h.lease, sent + period) {
            Ok(left) if left > 0 => {
                inner.confirm(h.lease, sent);
                if failing {
                    log::info!(
                        "the etcd lease of generation {} is renewed again",
                        h.generation
                    );
                    failing = false;
                }
            }
            Ok(_) => inner.lose(
                h.lease,
                "expired: etcd no longer has it (it was not renewed within its TTL)".into(),
            ),
            Err(e) => {
                if !failing {
                    log::warn!(
                        "cannot renew the etcd lease of generation {} ({e}); unless a renewal \
                         gets through within {} s of the last, this primary fences itself",
                        h.generation,
                        ttl.as_secs()
                    );
                    failing = true;
                }
                wait = RETRY_RENEWAL;
            }
        }
    }
}

impl Arbiter for EtcdArbiter {
    fn claim(&self, generation: u64, who: &str) -> Result<bool> {
        let deadline = self.deadline();
        let sent = Instant::now();
        let lease = self.grant(deadline)?;
        let key = self.key("generation", generation);
        let value = json!({
            "who": who,
            "lease": lease.to_string(),
            "unix_ms": crate::unix_ms() as u64,
        })
        .to_string();
        let req = json!({
            "compare": [{ "key": b64(&key), "target": "CREATE", "create_revision": "0" }],
            "success": [
                // The claim: never bound to the lease, so it stays (see the module docs).
                { "requestPut": { "key": b64(&key), "value": b64(&value) } },
                // Who holds it, for as long as the holder keeps its lease alive.
                { "requestPut": {
                    "key": b64(&self.key("holder", generation)),
                    "value": b64(who),
                    "lease": lease.to_string(),
                } },
            ],
            "failure": [{ "requestRange": { "key": b64(&key) } }],
        });
        let what = "the claim transaction";
        let answer = self.inner.client.post("/v3/kv/txn", what, &req, deadline)?;
        if let Answer::Status { code: 5, .. } = answer {
            return Err(Error::EtcdLease {
                generation,
                why: format!(
                    "expired before the claim reached etcd (more than {} s): etcd is too slow \
                     for this TTL",
                    self.inner.spec.ttl.as_secs()
                ),
            });
        }
        let reply: TxnReply = answer.decode(what)?;
        let token = if reply.succeeded {
            reply.header.revision
        } else {
            let existing = reply
                .responses
                .into_iter()
                .filter_map(|r| r.response_range)
                .flat_map(|r| r.kvs)
                .next();
            // A retried transaction finds the key its own first try created.
            match existing {
                Some(kv)
                    if serde_json::from_slice::<ClaimValue>(&kv.value)
                        .is_ok_and(|v| v.lease == lease.to_string()) =>
                {
                    kv.create_revision
                }
                _ => {
                    self.inner.revoke(lease);
                    return Ok(false);
                }
            }
        };
        // A newer generation may exist already (claimed by someone who saw more); then this
        // claim is worthless.
        let newest = self.newest(deadline)?;
        if newest != generation {
            self.inner.revoke(lease);
            log::warn!(
                "claimed generation {generation} at the {}, but {newest} is newer",
                self.describe()
            );
            return Ok(false);
        }
        let old = self.inner.held().replace(Held {
            generation,
            lease,
            token,
            confirmed: sent,
            lost: None,
        });
        if let Some(old) = old.filter(|o| o.lease != lease && o.lost.is_none()) {
            self.inner.revoke(old.lease);
        }
        self.start_keepalive();
        log::info!(
            "won generation {generation} at the {}: fencing token {token} (the key's create \
             revision), lease {lease:x} of {} s renewed every {:.1} s",
            self.describe(),
            self.inner.spec.ttl.as_secs(),
            (self.inner.spec.ttl / 3).as_secs_f64()
        );
        Ok(true)
    }

    fn current(&self) -> Result<u64> {
        self.newest(self.deadline())
    }

    fn still(&self, generation: u64) -> Result<bool> {
        let holds = self
            .inner
            .held()
            .as_ref()
            .is_some_and(|h| h.generation == generation);
        if holds {
            self.check_lease(generation)?;
        }
        Ok(self.newest(self.deadline())? == generation)
    }

    fn granted(&self, generation: u64) -> Result<bool> {
        let deadline = self.deadline();
        if generation == 0 {
            return Ok(false);
        }
        Ok(self.exists(generation, deadline)? || generation <= self.newest(deadline)?)
    }

    fn check_lease(&self, generation: u64) -> Result<()> {
        let ttl = self.inner.spec.ttl;
        let held = self.inner.held().clone();
        let h = match held {
            Some(h) if h.generation == generation => h,
            Some(h) => {
                return Err(Error::EtcdLease {
                    generation,
                    why: format!(
                        "is not held here (this process holds generation {})",
                        h.generation
                    ),
                })
            }
            None => {
                return Err(Error::EtcdLease {
                    generation,
                    why: "was never won by this process".into(),
                })
            }
        };
        if let Some(why) = h.lost {
            return Err(Error::EtcdLease { generation, why });
        }
        let age = h.confirmed.elapsed();
        if age < ttl {
            return Ok(());
        }
        // The renewals stopped getting through (or the thread was starved): ask once more.
        let sent = Instant::now();
        match self.inner.renew(h.lease, sent + REQUEST_TIMEOUT) {
            Ok(left) if left > 0 => {
                self.inner.confirm(h.lease, sent);
                Ok(())
            }
            Ok(_) => {
                let why = "expired: etcd no longer has it (it was not renewed within its TTL)";
                self.inner.lose(h.lease, why.into());
                Err(Error::EtcdLease {
                    generation,
                    why: why.into(),
                })
            }
            Err(e) => Err(Error::EtcdLease {
                generation,
                why: format!(
                    "was last renewed {:.1} s ago, longer than its TTL of {} s, and cannot be \
                     renewed now ({e})",
                    age.as_secs_f64(),
                    ttl.as_secs()
                ),
            }),
        }
    }

    fn describe(&self) -> String {
        format!("etcd arbiter {}", self.inner.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn arbiter_urls_parse_or_say_what_is_wrong() {
        let s: EtcdSpec = "etcd://127.0.0.1:2379,h2:2380,[::1]:2381/tandem/vm1/?ttl=2"
            .parse()
            .unwrap();
        assert_eq!(s.endpoints, ["127.0.0.1:2379", "h2:2380", "[::1]:2381"]);
        assert_eq!(s.prefix, "/tandem/vm1");
        assert_eq!(s.ttl, Duration::from_secs(2));
        assert_eq!(
            s.to_string(),
            "etcd://127.0.0.1:2379,h2:2380,[::1]:2381/tandem/vm1?ttl=2"
        );
        let d: EtcdSpec = "etcd://e:2379/x?".parse().unwrap();
        assert_eq!(d.ttl, DEFAULT_TTL);
        assert_eq!(d.to_string(), "etcd://e:2379/x");
        for (arg, says) in [
            ("etcd://127.0.0.1:2379", "no key prefix"),
            ("etcd://127.0.0.1:2379/", "no key prefix"),
            ("etcd:///vm", "empty endpoint"),
            ("etcd://a:1,,b:2/vm", "empty endpoint"),
            ("etcd://localhost/vm", "no port"),
            ("etcd://h:0/vm", "not a port"),
            ("etcd://h:99999/vm", "not a port"),
            ("etcd://h:x/vm", "not a port"),
            ("etcd://::1:2379/vm", "brackets"),
            ("etcd://u@h:1/vm", "not a host"),
            ("etcd://h:1/a//b", "empty segment"),
            ("etcd://h:1/a b", "a space"),
            ("etcd://h:1/vm?ttl=0", "1 to 600"),
            ("etcd://h:1/vm?ttl=2s", "whole seconds"),
            ("etcd://h:1/vm?tls=1", "unknown option"),
            ("http://h:1/vm", "starts with etcd://"),
        ] {
            let e = arg.parse::<EtcdSpec>().unwrap_err().to_string();
            assert!(e.contains(says), "{arg}: {e}");
            assert!(e.contains("etcd://HOST:PORT"), "{arg}: {e}");
        }
        // --arbiter: etcd://, a directory, or a clear refusal.
        let e = super::super::from_arg("zk://h:1/vm").unwrap_err();
        assert!(e.to_string().contains("zk:// is no arbiter"), "{e}");
        assert_eq!(e.exit_code(), 2);
        let a = super::super::from_arg("etcd://h:1/vm").unwrap();
        assert_eq!(a.describe(), "etcd arbiter etcd://h:1/vm");
    }

    #[test]
    fn replies_are_decoded_strictly() {
        let r: RangeReply = decode(
            "e",
            "r",
            br#"{"header":{"revision":"7"},"kvs":[{"key":"YQ==","value":"Yg==","create_revision":"5"}],"count":"1"}"#,
        )
        .unwrap();
        assert_eq!(r.kvs[0].key, b"a");
        assert_eq!(r.kvs[0].value, b"b");
        assert_eq!(r.kvs[0].create_revision, 5);
        // proto3 leaves out zero values.
        let r: RangeReply = decode("e", "r", br#"{"header":{"revision":"7"}}"#).unwrap();
        assert!(r.kvs.is_empty());
        let t: TxnReply = decode("e", "t", br#"{"header":{"revision":"3"}}"#).unwrap();
        assert!(!t.succeeded);
        let k: KeepAliveReply = decode("e", "k", br#"{"result":{"ID":"1"}}"#).unwrap();
        assert_eq!(k.result.unwrap().ttl, 0);
        for bad in [
            &br#"{"kvs":[{"key":"not base64!"}]}"#[..],
            br#"{"kvs":[{"create_revision":"12x"}]}"#,
            br#"{"kvs":{}}"#,
            br#"<html>nginx</html>"#,
            b"",
            br#"{"kvs":[{"key":"YQ==""#,
        ] {
            let e = decode::<RangeReply>("h:1", "a read", bad).unwrap_err();
            let m = e.to_string();
            assert!(
                m.contains("etcd at h:1 answered a read unexpectedly"),
                "{m}"
            );
            assert!(m.contains("not the JSON etcd sends"), "{m}");
        }
    }

    /// A fake etcd: answers each POST with `answer(path, body)`, counting requests.
    struct Fake {
        addr: String,
        hits: Arc<AtomicU64>,
    }

    impl Fake {
        fn start(answer: impl Fn(&str, &str) -> (u16, String) + Send + Sync + 'static) -> Fake {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let hits = Arc::new(AtomicU64::new(0));
            let h = hits.clone();
            let answer = Arc::new(answer);
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { return };
                    let answer = answer.clone();
                    let h = h.clone();
                    std::thread::spawn(move || serve(conn, &*answer, &h));
                }
            });
            Fake { addr, hits }
        }
    }

    fn serve(
        conn: std::net::TcpStream,
        answer: &(dyn Fn(&str, &str) -> (u16, String) + Send + Sync),
        hits: &AtomicU64,
    ) {
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut len = 0;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                if h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            hits.fetch_add(1, Ordering::SeqCst);
            let (status, text) = answer(&path, &String::from_utf8_lossy(&body));
            let _ = write!(
                w,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
                text.len()
            );
        }
    }

    fn spec(endpoints: &[&str], ttl: u64) -> EtcdSpec {
        EtcdSpec {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            prefix: "/t/vm".into(),
            ttl: Duration::from_secs(ttl),
        }
    }

    /// A port nobody listens on.
    fn closed_port() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[test]
    fn an_unreachable_etcd_is_an_error_within_the_ttl_naming_the_endpoints() {
        let (a, b) = (closed_port(), closed_port());
        let arb = EtcdArbiter::new(spec(&[&a, &b], 1));
        let t = Instant::now();
        let e = arb.current().unwrap_err();
        let took = t.elapsed();
        let m = e.to_string();
        assert!(matches!(e, Error::EtcdUnreachable { .. }), "{m}");
        assert!(
            m.contains(&format!("{a},{b}")) && m.contains("is etcd running"),
            "{m}"
        );
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // A claim too, before anything is held.
        assert!(matches!(
            arb.claim(1, "x"),
            Err(Error::EtcdUnreachable { .. })
        ));
        assert_eq!(arb.token(), None);
    }

    /// What the fake answers a claimant: lease 7 (TTL 1), the claim succeeds at revision 9,
    /// generation 1 is the newest; renewals say `renew_ttl`.
    fn claimant(renew_ttl: &'static AtomicU64) -> impl Fn(&str, &str) -> (u16, String) {
        move |path, body| {
            let key = b64("/t/vm/generation/00000000000000000001");
            match path {
                "/v3/lease/grant" => (200, r#"{"ID":"7","TTL":"1"}"#.into()),
                "/v3/kv/txn" => {
                    assert!(body.contains(r#""lease":"7""#), "{body}");
                    (
                        200,
                        r#"{"header":{"revision":"9"},"succeeded":true}"#.into(),
                    )
                }
                "/v3/kv/range" => (
                    200,
                    format!(r#"{{"kvs":[{{"key":"{key}","create_revision":"9"}}]}}"#),
                ),
                "/v3/lease/keepalive" => (
                    200,
                    format!(
                        r#"{{"result":{{"ID":"7","TTL":"{}"}}}}"#,
                        renew_ttl.load(Ordering::SeqCst)
                    ),
                ),
                "/v3/lease/revoke" => (200, "{}".into()),
                _ => (404, "no".into()),
            }
        }
    }

    #[test]
    fn a_lost_lease_makes_check_lease_and_still_fail() {
        static TTL: AtomicU64 = AtomicU64::new(1);
        let fake = Fake::start(claimant(&TTL));
        let arb = EtcdArbiter::new(spec(&[&fake.addr], 1));
        assert!(arb.claim(1, "me").unwrap());
        assert_eq!(arb.token(), Some(9));
        assert_eq!(arb.holds(), Some(1));
        assert!(arb.still(1).unwrap());
        arb.check_lease(1).unwrap();
        assert!(matches!(arb.check_lease(2), Err(Error::EtcdLease { .. })));
        // Renewals go on (every TTL/3) while etcd says the lease lives …
        std::thread::sleep(Duration::from_millis(1500));
        arb.check_lease(1).unwrap();
        // … and once etcd says it is gone, the primary may release nothing more.
        TTL.store(0, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(800));
        let e = arb.check_lease(1).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
        assert!(arb.still(1).is_err());
        assert_eq!(arb.holds(), None);
    }

    #[test]
    fn an_unrenewed_lease_fails_after_the_ttl() {
        static TTL: AtomicU64 = AtomicU64::new(1);
        static DOWN: AtomicBool = AtomicBool::new(false);
        let up = claimant(&TTL);
        let fake = Fake::start(move |path, body| {
            if DOWN.load(Ordering::SeqCst) {
                (
                    503,
                    r#"{"code":14,"message":"etcdserver: no leader"}"#.into(),
                )
            } else {
                up(path, body)
            }
        });
        let arb = EtcdArbiter::new(spec(&[&fake.addr], 1));
        assert!(arb.claim(1, "me").unwrap());
        // etcd stops answering: within the TTL of the last renewal the lease still counts
        // (nothing is asked), after it check_lease tries once more and refuses.
        DOWN.store(true, Ordering::SeqCst);
        let cut = Instant::now();
        arb.check_lease(1).unwrap();
        let fenced = loop {
            if let Err(e) = arb.check_lease(1) {
                break e.to_string();
            }
            assert!(cut.elapsed() < Duration::from_secs(2), "never refused");
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = cut.elapsed();
        assert!(fenced.contains("longer than its TTL of 1 s"), "{fenced}");
        assert!(fenced.contains("no leader"), "{fenced}");
        // The TTL, then the last try (at most REQUEST_TIMEOUT, releasing nothing meanwhile).
        assert!(took <= Duration::from_millis(1000 + 500 + 150), "{took:?}");
        assert!(arb.still(1).is_err());
        // etcd back, the lease not expired there: renewed, and usable again.
        DOWN.store(false, Ordering::SeqCst);
        arb.check_lease(1).unwrap();
    }

    #[test]
    fn a_claim_whose_answer_was_lost_is_recognised_and_a_taken_one_is_not_won() {
        // The txn is "lost" once (HTTP 503), then the retry finds the key with our lease.
        let tries = Arc::new(AtomicU64::new(0));
        let t = tries.clone();
        let key = b64("/t/vm/generation/00000000000000000001");
        let fake = Fake::start(move |path, body| match path {
            "/v3/lease/grant" => (200, r#"{"ID":"42","TTL":"2"}"#.into()),
            "/v3/kv/txn" if t.fetch_add(1, Ordering::SeqCst) == 0 => (503, "busy".into()),
            "/v3/kv/txn" => {
                let mine = body.contains(r#""lease":"42""#);
                assert!(mine);
                let v = b64(r#"{"who":"me","lease":"42"}"#);
                (
                    200,
                    format!(
                        r#"{{"responses":[{{"response_range":{{"kvs":[{{"key":"{key}","value":"{v}","create_revision":"11"}}]}}}}]}}"#
                    ),
                )
            }
            "/v3/kv/range" => (
                200,
                format!(r#"{{"kvs":[{{"key":"{key}","create_revision":"11"}}]}}"#),
            ),
            _ => (200, r#"{"result":{"TTL":"2"}}"#.into()),
        });
        let arb = EtcdArbiter::new(spec(&[&fake.addr], 2));
        assert!(arb.claim(1, "me").unwrap());
        assert_eq!(arb.token(), Some(11));
        assert_eq!(tries.load(Ordering::SeqCst), 2);

        // Someone else's claim: lost, nothing held.
        let other = Fake::start(move |path, _| match path {
            "/v3/lease/grant" => (200, r#"{"ID":"43","TTL":"2"}"#.into()),
            "/v3/kv/txn" => {
                let v = b64(r#"{"who":"them","lease":"41"}"#);
                (
                    200,
                    format!(
                        r#"{{"responses":[{{"response_range":{{"kvs":[{{"value":"{v}","create_revision":"5"}}]}}}}]}}"#
                    ),
                )
            }
            _ => (200, "{}".into()),
        });
        let arb = EtcdArbiter::new(spec(&[&other.addr], 2));
        assert!(!arb.claim(1, "me").unwrap());
        assert_eq!(arb.token(), None);
    }

    #[test]
    fn refusals_and_oversized_or_foreign_replies_are_clear_errors() {
        let big = "x".repeat(MAX_REPLY as usize + 10);
        let fake = Fake::start(move |path, _| match path {
            "/v3/lease/grant" => (
                400,
                r#"{"error":"bad","code":3,"message":"etcdserver: bad TTL"}"#.into(),
            ),
            "/v3/kv/txn" => (404, "<html>not found</html>".into()),
            "/v3/kv/range" => (200, format!(r#"{{"kvs":[],"pad":"{big}"}}"#)),
            _ => (200, "{}".into()),
        });
        let arb = EtcdArbiter::new(spec(&[&fake.addr], 1));
        let e = arb.claim(1, "me").unwrap_err().to_string();
        assert!(e.contains("refused (code 3): etcdserver: bad TTL"), "{e}");
        let e = arb.current().unwrap_err().to_string();
        assert!(e.contains("longer than 1048576 bytes"), "{e}");
        // A foreign key under the prefix is named, with what to do.
        let odd = Fake::start(|_, _| {
            let k = b64("/t/vm/generation/9x");
            (200, format!(r#"{{"kvs":[{{"key":"{k}"}}]}}"#))
        });
        let e = EtcdArbiter::new(spec(&[&odd.addr], 1))
            .current()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no generation of tandem's"), "{e}");
        // Unavailable (no leader) moves on to the next endpoint.
        let sick = Fake::start(|_, _| {
            (
                503,
                r#"{"error":"x","code":14,"message":"etcdserver: no leader"}"#.into(),
            )
        });
        let fine = Fake::start(|_, _| (200, "{}".into()));
        let arb = EtcdArbiter::new(spec(&[&sick.addr, &fine.addr], 1));
        assert_eq!(arb.current().unwrap(), 0);
        assert_eq!(arb.current().unwrap(), 0);
        // The endpoint that answered is asked first from then on.
        assert_eq!(sick.hits.load(Ordering::SeqCst), 1);
        assert_eq!(fine.hits.load(Ordering::SeqCst), 2);
    }
}
