//! Mutual authentication from a pre-shared key, and session keys.
//!
//! ```text
//!  K_auth      = HKDF-SHA256(ikm = PSK, salt = "tandem", info = "auth v1")
//!  transcript  = SHA-256(Hello bytes ‖ HelloReply version ‖ nonce_s)
//!  proof_s     = HMAC-SHA256(K_auth, "server" ‖ transcript)     sent by the server
//!  proof_c     = HMAC-SHA256(K_auth, "client" ‖ transcript)     sent by the client
//!  K_c2s, K_s2c = HKDF-SHA256(ikm = PSK, salt = nonce_c ‖ nonce_s, info = "c2s v1" | "s2c v1")
//! ```
//!
//! Proofs are compared in constant time. Both nonces are fresh (OS randomness), so a recorded
//! handshake replayed to either side fails its proof.

use std::io::{Read, Write};
use std::path::Path;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::channel::{Channel, Received};
use crate::message::Message;
use crate::{Error, Result, OLDEST_ACCEPTED_VERSION, PROTOCOL_VERSION};

/// A 256-bit pre-shared key.
#[derive(Clone)]
pub struct Psk([u8; 32]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Psk {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Psk(k)
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(
                "must hold 64 hex digits (a 256-bit key; make one with `tandem keygen`)".into(),
            );
        }
        let mut k = [0u8; 32];
        for (i, k) in k.iter_mut().enumerate() {
            *k = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Psk(k))
    }

    /// Reads a key file, refusing one that group or others may read or write (as ssh does).
    pub fn from_file(path: &Path) -> Result<Self> {
        Psk::from_file_with(path, false)
    }

    /// Reads a key file; with `allow_open`, a key file that group or others may access is
    /// used with a warning instead of refused.
    pub fn from_file_with(path: &Path, allow_open: bool) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let key_err = |msg: String| Error::Key {
            path: path.display().to_string(),
            msg,
        };
        let meta = std::fs::metadata(path).map_err(|e| key_err(e.to_string()))?;
        if !meta.is_file() {
            return Err(key_err("is not a regular file".into()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            let why = format!(
                "has mode {mode:03o}: group or others may read it. Run `chmod 600 {}` (or pass \
                 --allow-open-key-file to use it anyway)",
                path.display()
            );
            if !allow_open {
                return Err(key_err(why));
            }
            log::warn!("key file {} {why}", path.display());
        }
        if meta.len() > 1024 {
            return Err(key_err("is too large to be a key file".into()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| key_err(e.to_string()))?;
        Psk::from_hex(&text).map_err(key_err)
    }

    /// Writes a key file readable by its owner only.
    pub fn write_file(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let key_err = |e: std::io::Error| Error::Key {
            path: path.display().to_string(),
            msg: e.to_string(),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(key_err)?;
        writeln!(f, "{}", self.to_hex()).map_err(key_err)
    }

    fn auth_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        Hkdf::<Sha256>::new(Some(b"tandem"), &self.0)
            .expand(b"auth v1", &mut k)
            .expect("32 bytes");
        k
    }

    fn session_key(&self, nonce_c: &[u8; 32], nonce_s: &[u8; 32], info: &[u8]) -> [u8; 32] {
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(nonce_c);
        salt[32..].copy_from_slice(nonce_s);
        let mut k = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&salt), &self.0)
            .expand(info, &mut k)
            .expect("32 bytes");
        k
    }
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn transcript(hello: &[u8], version: u16, nonce_s: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(hello);
    h.update(version.to_le_bytes());
    h.update(nonce_s);
    h.finalize().into()
}

fn proof(psk: &Psk, role: &[u8], transcript: &[u8; 32]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&psk.auth_key()).expect("any key length");
    m.update(role);
    m.update(transcript);
    m.finalize().into_bytes().into()
}

fn expect_message<S: Read + Write>(ch: &mut Channel<S>, what: &str) -> Result<Message> {
    match ch.recv() {
        Ok(Received::Message(m)) => Ok(m),
        Ok(other) => Err(Error::Handshake(format!("expected {what}, got {other:?}"))),
        Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(
            Error::Handshake(format!("the peer closed the connection before {what}")),
        ),
        Err(e) => Err(e),
    }
}

/// Runs the client side over `stream`. With `psk` None the link stays plaintext (benchmarks
/// only); both sides must agree.
pub fn client<S: Read + Write>(stream: S, psk: Option<&Psk>) -> Result<Channel<S>> {
    let mut ch = Channel::plain(stream);
    let nonce_c = nonce();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        nonce: nonce_c,
        plaintext: psk.is_none(),
    };
    let hello_bytes = hello.encode();
    ch.send(&hello)?;
    match expect_message(&mut ch, "HelloReply")? {
        Message::HelloReply {
            version,
            nonce: nonce_s,
            proof: proof_s,
        } => {
            if !(OLDEST_ACCEPTED_VERSION..=PROTOCOL_VERSION).contains(&version) {
                return Err(Error::Version {
                    offered: version,
                    ours: PROTOCOL_VERSION,
                    oldest: OLDEST_ACCEPTED_VERSION,
                });
            }
            let Some(psk) = psk else {
                log::warn!(
                    "the replication link is NOT authenticated or encrypted (--insecure-plaintext)"
                );
                return Ok(ch);
            };
            let t = transcript(&hello_bytes, version, &nonce_s);
            if !bool::from(proof(psk, b"server", &t).ct_eq(&proof_s)) {
                return Err(Error::Auth("the server's proof does not match our key"));
            }
            ch.send(&Message::Auth {
                proof: proof(psk, b"client", &t),
            })?;
            ch.seal(
                psk.session_key(&nonce_c, &nonce_s, b"c2s v1"),
                psk.session_key(&nonce_c, &nonce_s, b"s2c v1"),
            );
            Ok(ch)
        }
        Message::Nack { message, .. } => {
            Err(Error::Handshake(format!("the server refused: {message}")))
        }
        other => Err(Error::Handshake(format!(
            "expected HelloReply, got {other:?}"
        ))),
    }
}

/// Runs the server side over `stream`.
pub fn server<S: Read + Write>(stream: S, psk: Option<&Psk>) -> Result<Channel<S>> {
    let mut ch = Channel::plain(stream);
    let hello = expect_message(&mut ch, "Hello")?;
    let Message::Hello {
        version,
        nonce: nonce_c,
        plaintext,
    } = hello
    else {
        return Err(Error::Handshake(format!("expected Hello, got {hello:?}")));
    };
    let refuse = |ch: &mut Channel<S>, e: Error| {
        let _ = ch.send(&Message::Nack {
            fence: Default::default(),
            code: crate::message::NackCode::Malformed,
            message: e.to_string(),
        });
        Err(e)
    };
    if !(OLDEST_ACCEPTED_VERSION..=PROTOCOL_VERSION).contains(&version) {
        let e = Error::Version {
            offered: version,
            ours: PROTOCOL_VERSION,
            oldest: OLDEST_ACCEPTED_VERSION,
        };
        return refuse(&mut ch, e);
    }
    if plaintext != psk.is_none() {
        return refuse(&mut ch, Error::PlaintextMismatch);
    }
    let nonce_s = nonce();
    let Some(psk) = psk else {
        log::warn!("the replication link is NOT authenticated or encrypted (--insecure-plaintext)");
        ch.send(&Message::HelloReply {
            version,
            nonce: nonce_s,
            proof: [0; 32],
        })?;
        return Ok(ch);
    };
    let t = transcript(&hello.encode(), version, &nonce_s);
    ch.send(&Message::HelloReply {
        version,
        nonce: nonce_s,
        proof: proof(psk, b"server", &t),
    })?;
    match expect_message(&mut ch, "Auth")? {
        Message::Auth { proof: proof_c } => {
            if !bool::from(proof(psk, b"client", &t).ct_eq(&proof_c)) {
                return Err(Error::Auth("the client's proof does not match our key"));
            }
        }
        other => return Err(Error::Handshake(format!("expected Auth, got {other:?}"))),
    }
    ch.seal(
        psk.session_key(&nonce_c, &nonce_s, b"s2c v1"),
        psk.session_key(&nonce_c, &nonce_s, b"c2s v1"),
    );
    Ok(ch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_files_open_to_others_or_malformed_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        let k = Psk::generate();
        k.write_file(&key).unwrap();
        assert_eq!(Psk::from_file(&key).unwrap().to_hex(), k.to_hex());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Psk::from_file(&key).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        // With the flag it is used (and warned about).
        assert_eq!(
            Psk::from_file_with(&key, true).unwrap().to_hex(),
            k.to_hex()
        );
        for bad in ["abcd\n", "zz", &"0".repeat(63), &"g".repeat(64)] {
            let f = dir.path().join("bad");
            let _ = std::fs::remove_file(&f);
            std::fs::write(&f, bad).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = Psk::from_file(&f).unwrap_err().to_string();
            assert!(
                e.contains("64 hex digits") && e.contains("tandem keygen"),
                "{e}"
            );
        }
        let e = Psk::from_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
