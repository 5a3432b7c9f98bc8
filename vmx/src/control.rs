//! The control socket: JSON lines over a Unix socket.
//!
//! ```text
//!  client                                   tandem (vmx main loop)
//!    │ {"cmd":"pause"}\n ─────────────────▶ │ stun
//!    │ ◀──────────────────── {"ok":true}\n  │
//!    │ {"cmd":"snapshot","path":"/s","stop":false}\n ─▶ checkpoint state machine
//!    │ ◀── {"ok":true,"path":"/s","ms":3.2,...}\n
//!    │ {"cmd":"status"}\n ──────────────────▶ │
//!    │ ◀── {"ok":true,"state":"running",...}\n
//! ```
//!
//! Commands: `pause`, `resume`, `status`, `snapshot {path, stop}` (`stop: true` powers the VM
//! off after the save: suspend), `migrate {addr, max_downtime_ms}` (a `tandem primary` moves
//! its VM to the `tandem standby` listening at `addr`; answered when it is done or failed). A
//! request line is at most 64 KiB; anything else gets `{"ok":false,"error":"…"}` and changes
//! nothing.
//!
//! Every answer is one of the typed replies here, as one JSON object per line:
//!
//! ```text
//!  any refusal      Answer      {"ok":false,"error":"…"}
//!  pause, resume    Answer      {"ok":true}
//!  status           VmStatus    {"ok":true,"state":"running"|"paused"|"standby","checkpoint":"None",
//!                                "checkpoints":N,"uptime_ms":N,"records":N,
//!                                "vcpus":[{"state":"Running","records":N,"exits":N},…],
//!                                "ft":{…}}   ft: the replication layer's status, if it has one
//!  snapshot         SnapshotDone {"ok":true,"path":"/s","ms":3.2,"state_bytes":N,"stopped":false}
//!  migrate          the replication layer's (`ft::status::MigrationDone`):
//!                   {"ok":true,"to":ADDR,"generation":N,"downtime_ms":…,"total_ms":…,…}
//! ```
//!
//! The socket's file is removed when the VM stops, after the answers under way are written
//! (a `migrate` is answered just before its VM ends).
//!
//! A client reads an answer with [`request_as`] (a refusal becomes [`Error::Refused`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// Longest request line.
pub const MAX_REQUEST: usize = 64 << 10;

/// A control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Stun the VM and keep it stopped.
    Pause,
    /// Let it run again.
    Resume,
    /// Report state and counters.
    Status,
    /// Save a snapshot to `path` (and `path.mem`); with `stop`, power off afterwards.
    Snapshot {
        /// The state file.
        path: PathBuf,
        /// Power off after saving.
        #[serde(default)]
        stop: bool,
        /// Memory as zstd chunks inside the state file instead of a sparse `.mem` file.
        #[serde(default)]
        compress: bool,
    },
    /// Move the VM to the `tandem standby` listening at `addr` (planned migration); answered
    /// when the VM runs there (or the migration failed and it runs on here).
    Migrate {
        /// The receiver's address (HOST:PORT).
        addr: String,
        /// The longest the guest may stay stopped for the switch, ms (default 5).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_downtime_ms: Option<u64>,
    },
}

/// The head of every answer; alone, the answer to `pause` and `resume`, and every refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The request was done.
    pub ok: bool,
    /// Why not (refusals only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Answer {
    /// `{"ok":true}`.
    pub fn done() -> Value {
        reply(&Answer {
            ok: true,
            error: None,
        })
    }

    /// `{"ok":false,"error":why}`.
    pub fn refused(why: impl std::fmt::Display) -> Value {
        reply(&Answer {
            ok: false,
            error: Some(why.to_string()),
        })
    }
}

/// What the VM is doing, in a `status` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// The guest runs.
    Running,
    /// Paused by `pause` (or powered on paused).
    Paused,
    /// A standby: no guest runs until it takes over.
    Standby,
}

/// One vCPU in a `status` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStatus {
    /// The monitor's vCPU state (`Running`, `Stunned`, `Done`, …).
    pub state: String,
    /// Output records drained from it.
    pub records: u64,
    /// KVM_RUN returns.
    pub exits: u64,
}

/// The answer to `status`.
///
/// `F` is the replication layer's status, the `ft` member (`ft::status::FtStatus` for a
/// replicated VM; absent for a VM that runs alone). vmx builds it as JSON ([`Value`]), since
/// the layer above owns its type; a client names the type it expects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus<F = Value> {
    /// Always true (a refusal is an [`Answer`]).
    pub ok: bool,
    /// What the VM is doing.
    pub state: RunState,
    /// The checkpoint state machine's state (`None` between saves).
    pub checkpoint: String,
    /// Snapshots saved.
    pub checkpoints: u64,
    /// Since power-on, ms.
    pub uptime_ms: u64,
    /// Output records drained, all vCPUs.
    pub records: u64,
    /// Per vCPU.
    pub vcpus: Vec<VcpuStatus>,
    /// The replication layer's status.
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub ft: Option<F>,
}

fn none<F>() -> Option<F> {
    None
}

/// The answer to `snapshot`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDone {
    /// Always true (a refusal is an [`Answer`]).
    pub ok: bool,
    /// The state file written.
    pub path: PathBuf,
    /// How long the save took (the guest stunned), ms.
    pub ms: f64,
    /// Size of the state file's contents.
    pub state_bytes: u64,
    /// The VM powered off after the save (`stop`).
    pub stopped: bool,
}

/// A typed answer as the JSON line it travels as.
pub fn reply(answer: &impl Serialize) -> Value {
    serde_json::to_value(answer).expect("answers serialise")
}

/// A request with the channel its answer goes back on.
pub type Envelope = (Request, Sender<Value>);

/// Removes the socket file when dropped, after the answers under way are written (at most
/// [`ANSWER_GRACE`] is waited for them).
pub struct ControlSocket {
    path: PathBuf,
    busy: Arc<AtomicUsize>,
}

/// How long a stopping VM waits for its control connections to write their last answers.
pub const ANSWER_GRACE: Duration = Duration::from_secs(1);

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let until = std::time::Instant::now() + ANSWER_GRACE;
        while self.busy.load(Ordering::Acquire) > 0 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Parses one request line.
pub fn parse(line: &[u8]) -> std::result::Result<Request, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| usage(&e))?;
    if let Some(obj) = value.as_object() {
        let allowed: &[&str] = match obj.get("cmd").and_then(Value::as_str) {
            Some("snapshot") => &["cmd", "path", "stop", "compress"],
            Some("migrate") => &["cmd", "addr", "max_downtime_ms"],
            _ => &["cmd"],
        };
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(usage(&format!("unknown field {k:?}")));
        }
    }
    serde_json::from_value(value).map_err(|e| usage(&e))
}

fn usage(e: &dyn std::fmt::Display) -> String {
    format!(
        "bad request ({e}): send one JSON object per line, e.g. {{\"cmd\":\"status\"}}; \
         commands: pause, resume, status, snapshot {{path, stop, compress}}, migrate {{addr, \
         max_downtime_ms}}"
    )
}

fn serve_conn(stream: UnixStream, tx: Sender<Envelope>, busy: &AtomicUsize) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = write_half;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match reader
            .by_ref()
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // Counted from the request's hand-over to its answer's write.
        let mut counted = false;
        let reply = if line.len() > MAX_REQUEST {
            Answer::refused(format!("request longer than {MAX_REQUEST} bytes"))
        } else {
            match parse(line.trim_ascii()) {
                Err(e) => Answer::refused(e),
                Ok(req) => {
                    let (rtx, rrx) = bounded(1);
                    busy.fetch_add(1, Ordering::AcqRel);
                    counted = true;
                    if tx.send((req, rtx)).is_err() {
                        Answer::refused("the VM has stopped")
                    } else {
                        rrx.recv()
                            .unwrap_or_else(|_| Answer::refused("the VM has stopped"))
                    }
                }
            }
        };
        let too_long = line.len() > MAX_REQUEST;
        let written = writeln!(out, "{reply}").and_then(|()| out.flush());
        if counted {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
        if written.is_err() || too_long {
            return;
        }
    }
}

/// Listens on `path`; requests arrive on the returned channel.
///
/// Who may connect: the socket is mode 0600 whatever the umask, so only its owner (and root).
/// It is bound under a temporary name, made 0600, anything that connected meanwhile is
/// dropped, and only then renamed into place. A stale socket at `path` (nobody listening) is
/// replaced; a live one, or anything that is not a socket, is an error and left alone.
pub fn listen(path: &Path) -> Result<(Receiver<Envelope>, ControlSocket)> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::Usage(format!(
                "{} exists and is not a socket: refusing to replace it (choose another \
                 --control path)",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Usage(format!(
                "{} is in use by another tandem",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    let ready = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| {
            // Drop whoever connected before the mode was set.
            listener.set_nonblocking(true)?;
            while listener.accept().is_ok() {}
            listener.set_nonblocking(false)
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = ready {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let busy = Arc::new(AtomicUsize::new(0));
    let counting = busy.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let tx = tx.clone();
                let busy = counting.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_conn(conn, tx, &busy));
            }
        })
        .map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
    Ok((
        rx,
        ControlSocket {
            path: path.to_path_buf(),
            busy,
        },
    ))
}

/// Sends one request and returns the reply (the client side of `tandem ctl`).
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Value> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let line = serde_json::to_string(req).expect("requests serialise");
    writeln!(s, "{line}").map_err(io)?;
    let mut reply = String::new();
    BufReader::new(s.take(1 << 20))
        .read_line(&mut reply)
        .map_err(io)?;
    serde_json::from_str(&reply)
        .map_err(|e| Error::Usage(format!("bad reply from {}: {e}", path.display())))
}

/// Sends one request and reads the answer as `T` (e.g. [`VmStatus`] for `status`,
/// [`SnapshotDone`] for `snapshot`, [`Answer`] for `pause`). A refusal is
/// [`Error::Refused`] with its reason; an answer that is not a `T` is [`Error::Usage`].
pub fn request_as<T: DeserializeOwned>(path: &Path, req: &Request, timeout: Duration) -> Result<T> {
    let v = request(path, req, timeout)?;
    let bad = |e: serde_json::Error| {
        Error::Usage(format!(
            "unexpected reply from {} to {req:?} ({e}): is it a tandem of this version?",
            path.display()
        ))
    };
    let head: Answer = serde_json::from_value(v.clone()).map_err(bad)?;
    if !head.ok {
        return Err(Error::Refused(head.error.unwrap_or_default()));
    }
    serde_json::from_value(v).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_requests_and_refuses_the_rest() {
        assert_eq!(parse(br#"{"cmd":"pause"}"#), Ok(Request::Pause));
        assert_eq!(
            parse(br#"{"cmd":"snapshot","path":"/tmp/s"}"#),
            Ok(Request::Snapshot {
                path: "/tmp/s".into(),
                stop: false,
                compress: false
            })
        );
        assert_eq!(
            parse(br#"{"cmd":"migrate","addr":"10.0.0.2:7001"}"#),
            Ok(Request::Migrate {
                addr: "10.0.0.2:7001".into(),
                max_downtime_ms: None
            })
        );
        assert_eq!(
            parse(br#"{"cmd":"migrate","addr":"h:1","max_downtime_ms":9}"#),
            Ok(Request::Migrate {
                addr: "h:1".into(),
                max_downtime_ms: Some(9)
            })
        );
        for bad in [
            &b"{}"[..],
            br#"{"cmd":"migrate"}"#,
            br#"{"cmd":"migrate","addr":"h:1","path":"/x"}"#,
            b"pause",
            br#"{"cmd":"reboot"}"#,
            br#"{"cmd":"pause","x":1}"#,
            b"\xff\xfe",
        ] {
            assert!(parse(bad).unwrap_err().contains("commands:"));
        }
    }

    #[test]
    fn a_status_reads_back_with_or_without_its_ft_member() {
        let v = json!({"ok": true, "state": "standby", "checkpoint": "None", "checkpoints": 0,
                       "uptime_ms": 5, "records": 2,
                       "vcpus": [{"state": "Parked", "records": 2, "exits": 9}],
                       "ft": {"role": "standby"}});
        let s: VmStatus = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(s.state, RunState::Standby);
        assert_eq!(s.vcpus[0].exits, 9);
        assert_eq!(reply(&s), v);
        let mut alone = s.clone();
        alone.ft = None;
        let back = reply(&alone);
        assert!(back.get("ft").is_none());
        assert_eq!(serde_json::from_value::<VmStatus>(back).unwrap(), alone);
    }

    #[test]
    fn the_socket_is_private_and_nothing_else_is_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl");
        let (_rx, guard) = listen(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the control socket must be owner-only");
        // A live socket is not taken over.
        let e = listen(&sock).err().expect("refused").to_string();
        assert!(e.contains("in use"), "{e}");
        drop(guard);
        // A regular file at the path is left alone, with a reason.
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        let e = listen(&file).err().expect("refused").to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        // A stale socket (nobody listening) is replaced.
        let stale = dir.path().join("stale");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let (_rx2, _g2) = listen(&stale).unwrap();
        assert!(UnixStream::connect(&stale).is_ok());
    }

    #[test]
    fn serves_lines_and_bounds_them() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl");
        let (rx, _guard) = listen(&sock).unwrap();
        std::thread::spawn(move || {
            for (req, reply) in rx.iter() {
                let _ = reply.send(match req {
                    Request::Resume => Answer::refused("not paused"),
                    req => json!({"ok": true, "echo": format!("{req:?}")}),
                });
            }
        });
        let v = request(&sock, &Request::Status, Duration::from_secs(5)).unwrap();
        assert_eq!(v["echo"], "Status");
        // A typed read: the echo is not a status, and a refusal carries its reason.
        let e = request_as::<VmStatus>(&sock, &Request::Status, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unexpected reply"), "{e}");
        let a: Answer = request_as(&sock, &Request::Pause, Duration::from_secs(5)).unwrap();
        assert!(a.ok);
        match request_as::<Answer>(&sock, &Request::Resume, Duration::from_secs(5)) {
            Err(Error::Refused(why)) => assert_eq!(why, "not paused"),
            other => panic!("{other:?}"),
        }
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        assert!(reply.contains("longer than"), "{reply}");
        assert!(listen(&sock).is_err(), "a live socket is not taken over");
    }
}
