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
//! off after the save: suspend). A request line is at most 64 KiB; anything else gets
//! `{"ok":false,"error":"…"}` and changes nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

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
}

/// A request with the channel its answer goes back on.
pub type Envelope = (Request, Sender<Value>);

/// Removes the socket file when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Parses one request line.
pub fn parse(line: &[u8]) -> std::result::Result<Request, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| usage(&e))?;
    if let Some(obj) = value.as_object() {
        let allowed: &[&str] = match obj.get("cmd").and_then(Value::as_str) {
            Some("snapshot") => &["cmd", "path", "stop", "compress"],
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
         commands: pause, resume, status, snapshot {{path, stop, compress}}"
    )
}

fn serve_conn(stream: UnixStream, tx: Sender<Envelope>) {
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
        let reply = if line.len() > MAX_REQUEST {
            json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes")})
        } else {
            match parse(line.trim_ascii()) {
                Err(e) => json!({"ok": false, "error": e}),
                Ok(req) => {
                    let (rtx, rrx) = bounded(1);
                    if tx.send((req, rtx)).is_err() {
                        json!({"ok": false, "error": "the VM has stopped"})
                    } else {
                        rrx.recv()
                            .unwrap_or_else(|_| json!({"ok": false, "error": "the VM has stopped"}))
                    }
                }
            }
        };
        let too_long = line.len() > MAX_REQUEST;
        if writeln!(out, "{reply}").is_err() || too_long {
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
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let tx = tx.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_conn(conn, tx));
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

#[cfg(test)]
mod tests {
    use super::*;

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
        for bad in [
            &b"{}"[..],
            b"pause",
            br#"{"cmd":"reboot"}"#,
            br#"{"cmd":"pause","x":1}"#,
            b"\xff\xfe",
        ] {
            assert!(parse(bad).unwrap_err().contains("commands:"));
        }
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
                let _ = reply.send(json!({"ok": true, "echo": format!("{req:?}")}));
            }
        });
        let v = request(&sock, &Request::Status, Duration::from_secs(5)).unwrap();
        assert_eq!(v["echo"], "Status");
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        assert!(reply.contains("longer than"), "{reply}");
        assert!(listen(&sock).is_err(), "a live socket is not taken over");
    }
}
