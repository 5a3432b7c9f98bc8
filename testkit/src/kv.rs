//! Clients of the `kv` guest that keep the history a failover check needs, for the tests and
//! `cargo xtask run-pair --guest kv`.
//!
//! ```text
//!  each client (one connection, its own keys):            after `stop`:
//!    INCR counter:<id>   → :n        n = previous + 1       LRANGE list:<id> 0 -1
//!    RPUSH list:<id> c<id>-<i>                                 = exactly what was pushed,
//!    SET key:<id> c<id>-<i>  → +OK                             in acknowledgement order
//!    GET key:<id>        → the value just SET
//! ```
//!
//! A client never reconnects: an EOF, a reset or a timeout ends it with the error recorded
//! ([`History::error`]), which a check counts as a reset connection. [`replay_disk`] reads the
//! guest's append-only log from a disk image on the host and compares it with the histories.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvstore::resp::{encode_request, reply_len, split_args};

/// One connection that reads replies one at a time (pipelined replies stay buffered).
pub struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(s: TcpStream) -> Conn {
        Conn { s, buf: Vec::new() }
    }

    /// The connection, for writing raw bytes.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.s
    }

    /// The connection (replies buffered but not yet read are dropped).
    pub fn into_stream(self) -> TcpStream {
        self.s
    }

    /// Sends one request (inline syntax, sent as RESP2) and reads its whole reply.
    pub fn request(&mut self, line: &str) -> Result<Vec<u8>, String> {
        let args =
            split_args(line.as_bytes()).ok_or_else(|| format!("{line:?} is not a request line"))?;
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        let mut req = Vec::new();
        encode_request(&refs, &mut req);
        self.s.write_all(&req).map_err(|e| format!("send: {e}"))?;
        self.reply()
    }

    /// Reads one whole reply.
    pub fn reply(&mut self) -> Result<Vec<u8>, String> {
        let mut chunk = [0u8; 4096];
        loop {
            match reply_len(&self.buf) {
                Ok(Some(n)) => return Ok(self.buf.drain(..n).collect()),
                Ok(None) => {}
                Err(e) => return Err(format!("not a RESP2 reply: {e:?}")),
            }
            match self.s.read(&mut chunk) {
                Ok(0) => return Err("kv closed the connection (EOF)".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read a reply: {e}")),
            }
        }
    }
}

/// Reply gaps longer than this are kept, with their start, in [`History::gaps`]: longer than
/// a reply of an unprotected server here takes (1–5 ms), shorter than a protected one's wait
/// for its epoch's acknowledgement (about the epoch interval), so the gap across a failover
/// is always among them.
pub const GAP_KEPT: Duration = Duration::from_millis(10);

/// One client connection's view: every reply it got, in order.
#[derive(Debug, Default)]
pub struct History {
    /// INCR replies, in order.
    pub counter: Vec<i64>,
    /// Items RPUSHed and acknowledged, in order.
    pub pushed: Vec<String>,
    /// The last value SET and acknowledged (and read back by GET).
    pub last_set: Option<String>,
    /// The longest time between two replies.
    pub longest_gap: Duration,
    /// Gaps between two replies longer than [`GAP_KEPT`]: (start, length).
    pub gaps: Vec<(Instant, Duration)>,
    /// What ended the connection early (EOF, reset, timeout, a wrong reply), if anything.
    pub error: Option<String>,
    /// The list read back after `stop` differs from what was pushed (how), if it does.
    pub list_mismatch: Option<String>,
}

impl History {
    /// Acknowledged writes not found where they must be: INCR replies that do not rise by
    /// exactly one, and the list's difference from what was pushed (counted as the pushes
    /// missing or out of place).
    pub fn lost(&self) -> usize {
        let incr_wrong = self
            .counter
            .iter()
            .enumerate()
            .filter(|(i, v)| **v != *i as i64 + 1)
            .count();
        incr_wrong + usize::from(self.list_mismatch.is_some())
    }

    /// Every check of this history, as one result.
    pub fn check(&self, id: usize) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(format!("client {id}: connection ended: {e}"));
        }
        let want: Vec<i64> = (1..=self.counter.len() as i64).collect();
        if self.counter != want {
            return Err(format!(
                "client {id}: INCR did not rise by one at each reply: {:?}",
                self.counter
            ));
        }
        if let Some(m) = &self.list_mismatch {
            return Err(format!("client {id}: {m}"));
        }
        Ok(())
    }
}

/// Counters a running client bumps (for progress displays and kill pacing).
#[derive(Debug, Default)]
pub struct Progress {
    /// Whole rounds (INCR, RPUSH, SET, GET) answered.
    pub rounds: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Per-request latencies since the last drain, when collected.
    pub latencies: Mutex<Vec<Duration>>,
    /// Whether to collect latencies.
    pub collect_latencies: AtomicBool,
}

/// Issues INCR, RPUSH, SET and GET on keys of its own without pause on `s` until `stop`, then
/// reads its list back; records what was acknowledged. Never panics: an error ends the run and
/// is kept in the history.
pub fn run_client(s: TcpStream, id: usize, stop: &AtomicBool, progress: &Progress) -> History {
    let mut h = History::default();
    if let Err(e) = s.set_read_timeout(Some(Duration::from_secs(20))) {
        h.error = Some(format!("set a read timeout: {e}"));
        return h;
    }
    let mut c = Conn::new(s);
    if let Err(e) = rounds(&mut c, id, stop, progress, &mut h) {
        h.error = Some(e);
        return h;
    }
    // After the run: the list holds exactly what was acknowledged, in order.
    match c.request(&format!("LRANGE list:{id} 0 -1")) {
        Ok(all) => {
            let mut want = format!("*{}\r\n", h.pushed.len()).into_bytes();
            for p in &h.pushed {
                want.extend_from_slice(format!("${}\r\n{p}\r\n", p.len()).as_bytes());
            }
            if all != want {
                h.list_mismatch = Some(format!(
                    "the list read back is {:?}, but {} pushes were acknowledged",
                    String::from_utf8_lossy(&all[..all.len().min(200)]),
                    h.pushed.len()
                ));
            }
        }
        Err(e) => h.error = Some(format!("LRANGE: {e}")),
    }
    h
}

fn rounds(
    c: &mut Conn,
    id: usize,
    stop: &AtomicBool,
    progress: &Progress,
    h: &mut History,
) -> Result<(), String> {
    let mut last = Instant::now();
    let mut i = 0u64;
    let collect = progress.collect_latencies.load(Ordering::Relaxed);
    let mut lat = Vec::with_capacity(4);
    // One request: its latency, and the gap since the previous reply.
    let mut timed = |c: &mut Conn, line: &str, lat: &mut Vec<Duration>, h: &mut History| {
        let t = Instant::now();
        let r = c.request(line)?;
        let now = Instant::now();
        lat.push(now - t);
        let gap = now - last;
        h.longest_gap = h.longest_gap.max(gap);
        if gap > GAP_KEPT {
            h.gaps.push((last, gap));
        }
        last = now;
        Ok::<_, String>(r)
    };
    while !stop.load(Ordering::Relaxed) {
        lat.clear();
        let r = timed(c, &format!("INCR counter:{id}"), &mut lat, h)?;
        let text = String::from_utf8_lossy(&r).into_owned();
        let v: i64 = text
            .strip_prefix(':')
            .and_then(|t| t.trim_end().parse().ok())
            .ok_or_else(|| format!("INCR answered {text:?}"))?;
        h.counter.push(v);
        let item = format!("c{id}-{i}");
        let r = timed(c, &format!("RPUSH list:{id} {item}"), &mut lat, h)?;
        if !r.starts_with(b":") {
            return Err(format!("RPUSH answered {:?}", String::from_utf8_lossy(&r)));
        }
        h.pushed.push(item.clone());
        let r = timed(c, &format!("SET key:{id} {item}"), &mut lat, h)?;
        if r != b"+OK\r\n" {
            return Err(format!("SET answered {:?}", String::from_utf8_lossy(&r)));
        }
        h.last_set = Some(item.clone());
        let r = timed(c, &format!("GET key:{id}"), &mut lat, h)?;
        let want = format!("${}\r\n{item}\r\n", item.len());
        if r != want.as_bytes() {
            return Err(format!(
                "GET returned {:?}, not the value just acknowledged ({item})",
                String::from_utf8_lossy(&r)
            ));
        }
        i += 1;
        progress.rounds.fetch_add(1, Ordering::Relaxed);
        progress.requests.fetch_add(4, Ordering::Relaxed);
        if collect {
            if let Ok(mut l) = progress.latencies.lock() {
                l.extend_from_slice(&lat);
            }
        }
    }
    Ok(())
}

/// The client-visible outage of a fault at `at`: the longest gap between two replies, over
/// all clients, that spans it.
pub fn outage_at(histories: &[History], at: Instant) -> Duration {
    histories
        .iter()
        .flat_map(|h| h.gaps.iter())
        .filter(|(start, len)| *start <= at && at <= *start + *len)
        .map(|(_, len)| *len)
        .max()
        .unwrap_or_default()
}

/// A disk image file, read-only (`Log::open` writes only to cut a torn tail, which a flushed
/// log does not have).
struct FileDisk(std::fs::File);

impl kvstore::Disk for FileDisk {
    type Error = std::io::Error;
    fn sectors(&self) -> u64 {
        self.0.metadata().map(|m| m.len() / 512).unwrap_or(0)
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(buf, sector * 512)
    }
    fn write(&mut self, _sector: u64, _buf: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other(
            "the disk image is read, not written, by the check",
        ))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Replays the kv log on the disk image at `path` (log id 1, as the guest writes it) and
/// checks it holds exactly the clients' acknowledged history: each client's counter, list and
/// last SET, and no other key. Returns the number of log records replayed.
pub fn replay_disk(path: &Path, histories: &[History]) -> Result<u64, String> {
    let mut store = kvstore::Store::new(1 << 30);
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut disk = FileDisk(f);
    let (_, opened) = kvstore::Log::open(&mut disk, 1, |args| {
        let mut out = Vec::new();
        store.execute(args, &kvstore::ServerInfo::default(), &mut out);
    })
    .map_err(|e| format!("{}: no kv log: {e:?}", path.display()))?;
    if opened.created {
        return Err(format!("{}: holds no kv log", path.display()));
    }
    for (id, h) in histories.iter().enumerate() {
        let counter = store.get(format!("counter:{id}").as_bytes());
        let want = (!h.counter.is_empty())
            .then(|| kvstore::Value::Str(h.counter.len().to_string().into_bytes()));
        if counter != want.as_ref() {
            return Err(format!(
                "client {id}: the disk's counter is {counter:?}, {} INCRs were acknowledged",
                h.counter.len()
            ));
        }
        let list: Vec<Vec<u8>> = match store.get(format!("list:{id}").as_bytes()) {
            Some(kvstore::Value::List(l)) => l.iter().cloned().collect(),
            None if h.pushed.is_empty() => Vec::new(),
            other => return Err(format!("client {id}: the disk's list is {other:?}")),
        };
        let want: Vec<Vec<u8>> = h.pushed.iter().map(|p| p.clone().into_bytes()).collect();
        if list != want {
            return Err(format!(
                "client {id}: the disk's list has {} items, {} pushes were acknowledged",
                list.len(),
                want.len()
            ));
        }
        let set = store.get(format!("key:{id}").as_bytes());
        let want = h
            .last_set
            .as_ref()
            .map(|v| kvstore::Value::Str(v.clone().into_bytes()));
        if set != want.as_ref() {
            return Err(format!(
                "client {id}: the disk's last SET is {set:?}, the last acknowledged {want:?}"
            ));
        }
    }
    let keys = histories
        .iter()
        .map(|h| {
            usize::from(!h.counter.is_empty())
                + usize::from(!h.pushed.is_empty())
                + usize::from(h.last_set.is_some())
        })
        .sum::<usize>();
    if store.len() != keys {
        return Err(format!(
            "the disk holds {} keys, the clients wrote {keys}: something never sent is there",
            store.len()
        ));
    }
    Ok(opened.records)
}
