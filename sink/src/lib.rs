//! The output sink: the "outside world" of a protected VM, and the client that releases
//! output to it.
//!
//! Wire: the replication link's handshake and sealing (`transport`: PSK challenge-response,
//! HKDF session keys, AES-256-GCM per frame with counter nonces), with the sink's own key
//! (`tandem sink --key-file`, given to primaries and standbys as `--sink-key-file`). Each
//! payload is one postcard message in a sealed control frame:
//!
//! ```text
//!  frame:  transport frame header ‖ seal(postcard(SinkMsg | SinkReply))   (≤ 4 MiB)
//!
//!  releaser (primary)                         sink
//!    │ ── handshake (both prove the key) ─────▶ │ no key, wrong key, replay → dropped, nothing
//!    │                                          │ changes (at most 128 handshakes pending, 5 s)
//!    │ Hello{generation, vcpus} ──────────────▶ │ generation < newest seen → Refused (stale);
//!    │                                          │ with --arbiter: g not granted → Refused
//!    │ ◀──────────────── Welcome{cursor} ────── │ cursor[v] = next record seq of vCPU v
//!    │ Records{generation, vcpu, records} ────▶ │ stale generation → refused, counted, closed
//!    │ Records ... (one way)                    │ seq == next → accepted; < next → duplicate;
//!    │                                          │ > next → gap (accepted, counted)
//! ```
//!
//! Files, and what a crash of the sink leaves in them:
//!
//! ```text
//!  out     one line per accepted record, "generation vcpu seq kind value(hex) aux\n",
//!          appended and flushed after every batch. A kill mid-batch can leave the last line
//!          torn (no '\n'): `parse_output` reads only whole lines, so a torn line is never
//!          taken for a record.
//!  report  SinkReport as JSON, rewritten after every batch through report.tmp-<pid> and a
//!          rename: always one whole report (of some batch). Not fsynced per batch (that would
//!          put a disk flush on every batch): after a power loss it may be older than `out`.
//! ```
//!
//! Without a key (`--insecure-plaintext` on every side) the same frames go unsealed and anyone
//! who reaches the port can speak: testing only.
//!
//! A standby that takes over says Hello with a newer generation; from then on the sink refuses
//! every batch of an older generation (an old primary that is still alive cannot be heard).
//! The cursor in Welcome lets the new primary release exactly the records the sink has not
//! received yet (the records of the epochs it committed last), the way a TCP peer's
//! acknowledged sequence number does.
#![forbid(unsafe_code)]

use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_abi::Record;
use serde::{Deserialize, Serialize};
use transport::{Channel, Psk};

/// Everything that can go wrong at the sink or when releasing to it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sink is unreachable or broke the connection.
    #[error("output sink: {0} (is `tandem sink` running at that address?)")]
    Unreachable(String),
    /// The sink refused this releaser: a newer generation has spoken.
    #[error("the sink refused generation {generation}: {reason}")]
    Refused {
        /// The releaser's generation.
        generation: u64,
        /// What the sink said.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A sink thread could not be started.
    #[error("cannot start a sink thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Largest sink frame.
pub const MAX_SINK_FRAME: usize = 4 << 20;
/// Most vCPUs a sink keeps cursors for.
pub const MAX_SINK_VCPUS: u32 = 256;

/// Releaser → sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SinkMsg {
    /// A releaser of `generation` for a VM of `vcpus` vCPUs.
    Hello {
        /// The sender's generation.
        generation: u64,
        /// vCPUs (one record stream each).
        vcpus: u32,
    },
    /// Records of one vCPU, in order.
    Records {
        /// The sender's generation.
        generation: u64,
        /// The stream.
        vcpu: u32,
        /// The records.
        records: Vec<Record>,
    },
}

/// Sink → releaser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SinkReply {
    /// Accepted; the next sequence number the sink expects from each vCPU.
    Welcome {
        /// Per vCPU.
        cursor: Vec<u64>,
    },
    /// Refused (a stale generation).
    Refused {
        /// Why.
        reason: String,
    },
}

fn write_frame<T: Serialize>(ch: &mut Channel<TcpStream>, m: &T) -> std::io::Result<()> {
    let b = postcard::to_stdvec(m).map_err(std::io::Error::other)?;
    ch.send_blob(&b).map_err(std::io::Error::other)
}

fn read_frame<T: for<'a> Deserialize<'a>>(ch: &mut Channel<TcpStream>) -> std::io::Result<T> {
    let b = ch.recv_blob().map_err(std::io::Error::other)?;
    if b.len() > MAX_SINK_FRAME {
        return Err(std::io::Error::other(format!(
            "sink frame of {} bytes (limit {MAX_SINK_FRAME})",
            b.len()
        )));
    }
    postcard::from_bytes(&b).map_err(|e| std::io::Error::other(format!("bad sink frame: {e}")))
}

/// Most connections waiting in the handshake at once; more are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 128;
/// How long a connection may take to authenticate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Decides whether a generation was granted (by the arbiter) before the sink hears it.
pub type GenerationCheck = Arc<dyn Fn(u64) -> std::result::Result<bool, String> + Send + Sync>;

/// Who may speak to the sink.
#[derive(Clone, Default)]
pub struct SinkAuth {
    /// The sink key (None: plaintext, anyone may speak — testing only).
    pub key: Option<Psk>,
    /// Checked before a Hello is accepted (None: any authenticated releaser's generation).
    pub granted: Option<GenerationCheck>,
}

/// What the sink has seen (written to its report file after every batch).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkReport {
    /// Records that arrived (accepted or not).
    pub received: u64,
    /// Records accepted into the stream.
    pub accepted: u64,
    /// Times a record's sequence number skipped ahead (records missing).
    pub gaps: u64,
    /// Records whose sequence number the stream already had.
    pub duplicates: u64,
    /// Records (and hellos) refused for carrying an older generation than the newest seen.
    pub stale_rejections: u64,
    /// The newest generation seen.
    pub generation: u64,
    /// Records accepted per generation: (generation, records).
    pub by_generation: Vec<(u64, u64)>,
    /// Next expected sequence number per vCPU.
    pub cursor: Vec<u64>,
    /// Connections accepted.
    pub connections: u64,
    /// Connections dropped because they did not authenticate (no key, wrong key, replay,
    /// garbage, or idle past the handshake timeout).
    #[serde(default)]
    pub unauthenticated: u64,
    /// Hellos refused because the arbiter had not granted their generation.
    #[serde(default)]
    pub ungranted: u64,
}

impl SinkReport {
    /// The verdict for people: "continuous" or what broke.
    pub fn verdict(&self) -> String {
        if self.gaps == 0 && self.duplicates == 0 {
            format!(
                "continuous: {} records, no gap, no duplicate, {} stale-generation rejections",
                self.accepted, self.stale_rejections
            )
        } else {
            format!(
                "BROKEN: {} gaps, {} duplicates in {} records",
                self.gaps, self.duplicates, self.received
            )
        }
    }
}

struct SinkState {
    report: SinkReport,
    out: BufWriter<std::fs::File>,
    report_path: PathBuf,
}

impl SinkState {
    fn hello(&mut self, generation: u64, vcpus: u32) -> SinkReply {
        if generation < self.report.generation {
            self.report.stale_rejections += 1;
            return SinkReply::Refused {
                reason: format!(
                    "generation {generation} is stale: generation {} has spoken",
                    self.report.generation
                ),
            };
        }
        self.report.generation = generation;
        let n = vcpus.min(MAX_SINK_VCPUS) as usize;
        if self.report.cursor.len() < n {
            self.report.cursor.resize(n, 0);
        }
        SinkReply::Welcome {
            cursor: self.report.cursor.clone(),
        }
    }

    /// Takes a batch; false if it was refused (stale).
    fn records(&mut self, generation: u64, vcpu: u32, records: &[Record]) -> std::io::Result<bool> {
        let r = &mut self.report;
        r.received += records.len() as u64;
        if generation < r.generation {
            r.stale_rejections += records.len() as u64;
            return Ok(false);
        }
        if vcpu >= MAX_SINK_VCPUS {
            return Err(std::io::Error::other(format!("vCPU {vcpu} out of range")));
        }
        r.generation = generation;
        if r.cursor.len() <= vcpu as usize {
            r.cursor.resize(vcpu as usize + 1, 0);
        }
        let mut accepted = 0;
        for rec in records {
            let next = &mut r.cursor[vcpu as usize];
            if rec.seq < *next {
                r.duplicates += 1;
                continue;
            }
            if rec.seq > *next {
                r.gaps += 1;
            }
            *next = rec.seq + 1;
            accepted += 1;
            writeln!(
                self.out,
                "{generation} {vcpu} {} {} {:016x} {}",
                rec.seq, rec.kind, rec.value, rec.aux
            )?;
        }
        r.accepted += accepted;
        match r.by_generation.iter_mut().find(|(g, _)| *g == generation) {
            Some((_, n)) => *n += accepted,
            None => r.by_generation.push((generation, accepted)),
        }
        self.out.flush()?;
        Ok(true)
    }

    fn save_report(&self) {
        let mut name = self
            .report_path
            .file_name()
            .unwrap_or_default()
            .to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        let tmp = self.report_path.with_file_name(name);
        let text = serde_json::to_string_pretty(&self.report).expect("report serialises");
        if std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &self.report_path))
            .is_err()
        {
            log::warn!("cannot write {}", self.report_path.display());
        }
    }
}

/// A running sink.
pub struct Sink {
    addr: SocketAddr,
    state: Arc<Mutex<SinkState>>,
}

/// Parses a record line the sink wrote: (generation, vCPU, record).
pub fn parse_line(line: &str) -> Option<(u64, u32, Record)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 6 {
        return None;
    }
    let vcpu: u32 = f[1].parse().ok()?;
    Some((
        f[0].parse().ok()?,
        vcpu,
        Record {
            vcpu,
            seq: f[2].parse().ok()?,
            kind: f[3].parse().ok()?,
            value: u64::from_str_radix(f[4], 16).ok()?,
            aux: f[5].parse().ok()?,
        },
    ))
}

/// The records of a sink's output file: whole lines only (a last line without its newline is
/// what a crash in the middle of a write leaves, and is not a record).
pub fn parse_output(text: &str) -> Vec<(u64, u32, Record)> {
    text.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .filter_map(parse_line)
        .collect()
}

impl Sink {
    /// Listens on `addr`; accepted records go to `out` as lines
    /// `generation vcpu seq kind value(hex) aux`, and the report to `report` (JSON, rewritten
    /// after every batch).
    pub fn bind(addr: &str, out: &Path, report: &Path, auth: SinkAuth) -> Result<Sink> {
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| Error::Io { path: p, source }
        };
        let listener = TcpListener::bind(addr).map_err(io(Path::new(addr)))?;
        let addr = listener.local_addr().map_err(io(Path::new("sink")))?;
        let file = std::fs::File::create(out).map_err(io(out))?;
        let state = Arc::new(Mutex::new(SinkState {
            report: SinkReport::default(),
            out: BufWriter::new(file),
            report_path: report.to_path_buf(),
        }));
        state.lock().expect("fresh").save_report();
        if auth.key.is_none() {
            log::warn!(
                "the sink runs WITHOUT a key: anyone who reaches {addr} can speak for any \
                 generation (testing only; give --key-file)"
            );
        }
        let st = state.clone();
        let pending = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("sink-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if pending.load(Ordering::Acquire) >= MAX_PENDING_HANDSHAKES {
                        // A flood of idle connections: drop the newcomer at once.
                        continue;
                    }
                    pending.fetch_add(1, Ordering::AcqRel);
                    let (st, auth, waiting) = (st.clone(), auth.clone(), pending.clone());
                    let spawned =
                        std::thread::Builder::new()
                            .name("sink-conn".into())
                            .spawn(move || {
                                let peer = conn.peer_addr().ok();
                                if let Err(e) = serve(conn, &st, &auth, &waiting) {
                                    log::info!("sink: connection from {peer:?} ended: {e}");
                                }
                            });
                    if spawned.is_err() {
                        pending.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            })
            .map_err(Error::Thread)?;
        Ok(Sink { addr, state })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it has seen so far.
    pub fn report(&self) -> SinkReport {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report
            .clone()
    }
}

/// Authenticates a connection (within [`HANDSHAKE_TIMEOUT`]), then serves it.
fn serve(
    conn: TcpStream,
    st: &Mutex<SinkState>,
    auth: &SinkAuth,
    pending: &AtomicUsize,
) -> std::io::Result<()> {
    let shake = (|| {
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let ch =
            transport::handshake::server(conn, auth.key.as_ref()).map_err(std::io::Error::other)?;
        ch.get_ref().set_read_timeout(None)?;
        Ok::<_, std::io::Error>(ch)
    })();
    pending.fetch_sub(1, Ordering::AcqRel);
    let mut ch = match shake {
        Ok(ch) => ch,
        Err(e) => {
            st.lock()
                .unwrap_or_else(|p| p.into_inner())
                .report
                .unauthenticated += 1;
            return Err(std::io::Error::other(format!("not authenticated: {e}")));
        }
    };
    let conn = &mut ch;
    let lock = || st.lock().unwrap_or_else(|p| p.into_inner());
    let generation = match read_frame::<SinkMsg>(conn)? {
        SinkMsg::Hello { generation, vcpus } => {
            let granted = match &auth.granted {
                None => Ok(()),
                Some(check) => match check(generation) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "generation {generation} was not granted by the arbiter"
                    )),
                    Err(e) => Err(format!(
                        "cannot ask the arbiter about generation {generation}: {e}"
                    )),
                },
            };
            let reply = {
                let mut s = lock();
                s.report.connections += 1;
                let r = match granted {
                    Ok(()) => s.hello(generation, vcpus),
                    Err(reason) => {
                        s.report.ungranted += 1;
                        SinkReply::Refused { reason }
                    }
                };
                s.save_report();
                r
            };
            log::info!("sink: generation {generation} says hello: {reply:?}");
            let refused = matches!(reply, SinkReply::Refused { .. });
            write_frame(conn, &reply)?;
            if refused {
                return Ok(());
            }
            generation
        }
        other => {
            return Err(std::io::Error::other(format!(
                "expected Hello, got {other:?}"
            )))
        }
    };
    loop {
        match read_frame::<SinkMsg>(conn)? {
            SinkMsg::Records {
                generation: g,
                vcpu,
                records,
            } => {
                if g != generation {
                    return Err(std::io::Error::other("generation changed mid-connection"));
                }
                let mut s = lock();
                let ok = s.records(g, vcpu, &records)?;
                s.save_report();
                if !ok {
                    log::warn!(
                        "sink: refused {} records of stale generation {g} (newest is {})",
                        records.len(),
                        s.report.generation
                    );
                    return Ok(());
                }
            }
            SinkMsg::Hello { .. } => return Err(std::io::Error::other("a second Hello")),
        }
    }
}

/// The releasing end: a primary's connection to the sink.
pub struct SinkClient {
    stream: Channel<TcpStream>,
    generation: u64,
    /// What the sink expected from each vCPU when it welcomed us.
    pub cursor: Vec<u64>,
    /// Records sent.
    pub released: u64,
}

/// A connection to the sink that is authenticated and has not said hello yet: a standby
/// keeps one ready, so that taking over costs one round trip to the sink, not a handshake.
/// The sink waits for its hello as long as it takes.
pub struct Authenticated {
    stream: Channel<TcpStream>,
    addr: String,
}

impl Authenticated {
    /// Says hello as `generation` (see [`SinkClient::connect`]).
    pub fn hello(self, generation: u64, vcpus: u32) -> Result<SinkClient> {
        let Authenticated { mut stream, addr } = self;
        let err = |e: std::io::Error| Error::Unreachable(format!("{addr}: {e}"));
        write_frame(&mut stream, &SinkMsg::Hello { generation, vcpus }).map_err(err)?;
        match read_frame::<SinkReply>(&mut stream).map_err(err)? {
            SinkReply::Welcome { cursor } => Ok(SinkClient {
                stream,
                generation,
                cursor,
                released: 0,
            }),
            SinkReply::Refused { reason } => Err(Error::Refused { generation, reason }),
        }
    }
}

impl SinkClient {
    /// Connects (retrying for up to `patience`), authenticates with `key` (None: plaintext,
    /// testing only) and says hello as `generation`.
    pub fn connect(
        addr: &str,
        key: Option<&Psk>,
        generation: u64,
        vcpus: u32,
        patience: Duration,
    ) -> Result<Self> {
        SinkClient::authenticate(addr, key, patience)?.hello(generation, vcpus)
    }

    /// Connects (retrying for up to `patience`) and authenticates with `key`, without a
    /// hello yet.
    pub fn authenticate(
        addr: &str,
        key: Option<&Psk>,
        patience: Duration,
    ) -> Result<Authenticated> {
        let start = std::time::Instant::now();
        // Connect and authenticate, again and again for `patience` (the sink may not be up
        // yet, or may be shedding a flood of idle connections).
        let stream = loop {
            let attempt = TcpStream::connect(addr)
                .and_then(|s| {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    Ok(s)
                })
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    transport::handshake::client(s, key)
                        .map_err(|e| format!("the sink did not authenticate: {e}"))
                });
            match attempt {
                Ok(ch) => break ch,
                Err(e) if start.elapsed() < patience => {
                    log::debug!("sink {addr}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(Error::Unreachable(format!("{addr}: {e}"))),
            }
        };
        Ok(Authenticated {
            stream,
            addr: addr.to_string(),
        })
    }

    /// Sends records of vCPU `vcpu`.
    pub fn release(&mut self, vcpu: u32, records: &[Record]) -> Result<()> {
        for chunk in records.chunks(64 << 10) {
            write_frame(
                &mut self.stream,
                &SinkMsg::Records {
                    generation: self.generation,
                    vcpu,
                    records: chunk.to_vec(),
                },
            )
            .map_err(|e| Error::Unreachable(format!("releasing output: {e}")))?;
            self.released += chunk.len() as u64;
        }
        Ok(())
    }

    /// Sends only the records the sink has not received (seq at or past its cursor): used once,
    /// for the records a new primary inherited with the last committed epochs.
    pub fn release_inherited(&mut self, vcpu: u32, records: &[Record]) -> Result<usize> {
        let from = self.cursor.get(vcpu as usize).copied().unwrap_or(0);
        let fresh: Vec<Record> = records.iter().filter(|r| r.seq >= from).copied().collect();
        self.release(vcpu, &fresh)?;
        Ok(fresh.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_not_a_record() {
        let whole = "3 0 7 1 00000000000000ab 12\n3 1 0 2 0000000000000001 0\n";
        let got = parse_output(whole);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, got[0].1, got[0].2.aux), (3, 0, 12));
        // Every cut of the last line, including the one that still has six fields but a
        // shorter `aux` ("…01 0" cut from "…01 07"), leaves just the first record.
        let longer = "3 0 7 1 00000000000000ab 12\n3 1 0 2 0000000000000001 07\n";
        for cut in whole.find('\n').unwrap() + 1..longer.len() - 1 {
            assert_eq!(parse_output(&longer[..cut]).len(), 1, "cut at {cut}");
        }
    }
}
