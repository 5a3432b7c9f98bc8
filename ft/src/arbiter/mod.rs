//! Arbitration: which VM is primary, decided outside both of them.
//!
//! Heartbeats cannot tell a dead primary from a paused or partitioned one, so every role change
//! goes through an [`Arbiter`]: "claim generation g as primary" succeeds for exactly one
//! claimant, and "which generation is current?" is answered by the arbiter, not from memory.
//!
//! ```text
//!   primary (gen g)            arbiter               standby (committed gen g)
//!     │ loses its standby        │                      │ primary silent / gone
//!     │ holds output ──claim(g+1)▶│◀──claim(g+1)──────── │ holds everything
//!     │                          │ exactly one wins     │
//!     │ won: release, run on     │                      │ won: activate, release
//!     │ lost: FENCE (stop guest, │                      │ lost: stand down (the
//!     │ release nothing, exit)   │                      │ primary is alive)
//! ```
//!
//! ## The file arbiter
//! [`FileArbiter`] keeps one file per generation in a directory both hosts share:
//! `generation-<g>`, created with `O_CREAT | O_EXCL` (so only one claimant can create it), its
//! contents (who claimed it) written and `fsync`ed, then the directory `fsync`ed. The current
//! generation is the largest that exists. A claim is the file's existence, never its
//! contents: a claimant killed between the create and the fsync leaves a generation that is
//! claimed (by a process that is gone, so nobody acts as it) and the next claim takes the one
//! after it; the contents ("who") are for people. This needs a file system where exclusive create is
//! atomic across clients: a local file system (both processes on one host, as `run-pair`
//! does), NFSv3 and later (exclusive create is atomic on the server), CephFS, GlusterFS, or
//! a cluster file system (GFS2, OCFS2). It is **not** safe on NFSv2, on SMB with client-side
//! caching of opens (oplocks/leases) or on eventually consistent object-store mounts (s3fs,
//! gcsfuse), where two clients can both "create" the same name.
//!
//! ## The etcd arbiter
//! [`EtcdArbiter`] (`--arbiter etcd://HOST:PORT[,HOST:PORT…]/PREFIX[?ttl=SECS]`) keeps the
//! claims in an etcd cluster, so that no shared file system is needed and the arbiter
//! survives the loss of a minority of its members. Tandem builds no consensus of its own.
//!
//! ```text
//!  claimant (primary or standby)                      etcd (Raft: a majority decides)
//!    │ claim(g)                                          │
//!    │── lease/grant {TTL} ─────────────────────────────▶│ lease L
//!    │── kv/txn  If CreateRevision(P/generation/<g>)==0 ▶│ exactly one txn succeeds
//!    │           Then Put(P/generation/<g>, {who, L})    │   (the claim: no lease, it stays)
//!    │                Put(P/holder/<g>, who, lease L)    │   (the holder: gone with L)
//!    │           Else Range(P/generation/<g>)            │
//!    │◀── succeeded; header.revision = fencing token ────│ = the key's create revision
//!    │── kv/range P/generation/ desc, limit 1 ──────────▶│ won only if nothing newer exists
//!    │                                                   │
//!    │ keep-alive thread, every TTL/3:                   │
//!    │── lease/keepalive {L} ───────────────────────────▶│ TTL left (0: L expired)
//!    │                                                   │
//!    │ primary, before releasing any output:             │
//!    │   check_lease(g): L renewed less than TTL ago?    │   no, and no renewal now
//!    │   (unprotected) still(g): ── kv/range ───────────▶│   gets through: FENCE
//!    │      newest == g? ◀───────────────────────────────│
//! ```
//!
//! * `claim(g)`: a lease of the TTL (default [`etcd::DEFAULT_TTL`]), then one transaction:
//!   create `PREFIX/generation/<g as %020>` only if its create revision is 0. It succeeds
//!   for exactly one client, whichever endpoint each asked. A claimant whose transaction
//!   went through but whose answer was lost retries; the retry's `Else` branch reads the key
//!   and recognises the claimant's own lease in it. The claim is won only if no newer
//!   generation exists (as for the file arbiter). The key's create revision is the fencing
//!   token ([`EtcdArbiter::token`], logged): it grows with every claim, so storage or a sink
//!   can refuse writers with an older one, as the sink here refuses older generations.
//! * The generation key is *not* bound to the lease: a key deleted at the lease's expiry
//!   could be claimed again, by a second claimant of the same generation, and `current()`
//!   would go back. The holder's liveness is the second key, `PREFIX/holder/<g>`, put in
//!   the same transaction and bound to the lease (`etcdctl get --prefix PREFIX/holder/`
//!   shows who holds what, for as long as it keeps its lease).
//! * Lease: a thread renews it every third of the TTL. **Self-fencing**: the primary asks
//!   [`Arbiter::check_lease`] before it releases any output (protected or not); once etcd
//!   says the lease expired, or no renewal has got through for a whole TTL and one more try
//!   fails, the answer is an error and the primary fences (stops the guest, releases nothing,
//!   exits 3). A primary cut off from etcd (or paused, or starved) therefore stops releasing
//!   within about a TTL. An unprotected primary also asks `still(g)`, a linearizable read,
//!   before each release; an error there fences it too: it cannot tell whether a standby won.
//! * `current()`: a range read of `PREFIX/generation/` sorted by key, descending, limit 1.
//!   `granted(g)`: the key for `g` exists, or `g` ≤ current.
//! * Every request goes to one endpoint at a time, with a
//!   [`etcd::REQUEST_TIMEOUT`] (500 ms); a refused connection, a timeout or a "no leader"
//!   moves on to the next endpoint, round after round, until the TTL has passed (then the
//!   error says which endpoints did not answer). Replies are read to at most 1 MiB.
//! * The TTL trades how long a primary cut off from etcd goes on releasing against false
//!   fencing: it must cover an etcd leader election (etcd's default election timeout is
//!   1 s) with room to spare, hence 5 s by default; `?ttl=2` fences faster on a cluster
//!   with short elections. The price of self-fencing: while etcd has no majority for longer
//!   than the TTL, a primary fences even if its standby is healthy, and the standby cannot
//!   claim its generation either; the pair is then down until etcd is back.
//!
//! etcd is reached through its JSON gateway over plain HTTP (etcd 3.4 and later serve it on
//! the client URL): no gRPC stack, no `protoc` at build time. Use it on a trusted network,
//! or put the etcd client port behind a TLS proxy on each host; TLS and etcd authentication
//! are not supported yet.

pub mod etcd;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Error, Result};
pub use etcd::{EtcdArbiter, EtcdSpec};

/// The arbiter that `--arbiter ARG` names: `etcd://HOST:PORT[,HOST:PORT…]/PREFIX[?ttl=SECS]`
/// is an [`EtcdArbiter`], a path is a [`FileArbiter`] in that directory (created if missing).
/// Neither asks anything of etcd or the directory's contents yet.
pub fn from_arg(arg: &str) -> Result<Arc<dyn Arbiter>> {
    if arg.starts_with("etcd://") {
        return Ok(Arc::new(EtcdArbiter::new(arg.parse()?)));
    }
    if let Some((scheme, _)) = arg.split_once("://") {
        if !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(Error::ArbiterSpec {
                arg: arg.into(),
                why: format!(
                    "{scheme}:// is no arbiter tandem knows: give etcd://HOST:PORT[,HOST:PORT…]/PREFIX \
                     or a directory both hosts share"
                ),
            });
        }
    }
    if arg.is_empty() {
        return Err(Error::ArbiterSpec {
            arg: arg.into(),
            why: "empty: give a directory both hosts share or etcd://HOST:PORT/PREFIX".into(),
        });
    }
    Ok(Arc::new(FileArbiter::new(Path::new(arg))?))
}

/// Decides which VM is primary.
pub trait Arbiter: Send + Sync + std::fmt::Debug {
    /// Claims `generation` for `who`. True for exactly one claimant of each generation.
    fn claim(&self, generation: u64, who: &str) -> Result<bool>;
    /// The newest generation claimed so far (0: none).
    fn current(&self) -> Result<u64>;
    /// Whether `generation` is still the newest (a primary asks before releasing output).
    fn still(&self, generation: u64) -> Result<bool> {
        Ok(self.current()? == generation)
    }
    /// Whether `generation` was ever granted to a claimant (the output sink asks before it
    /// hears a releaser of that generation). Default: it is not newer than the newest.
    fn granted(&self, generation: u64) -> Result<bool> {
        Ok(generation >= 1 && generation <= self.current()?)
    }
    /// Whether this process may still act as the primary of `generation` (its claim is not
    /// lost), asked before every release of output: an error means no, and the primary fences.
    /// An arbiter with leases ([`EtcdArbiter`]) says no once the lease it won `generation`
    /// with has expired, or has gone unrenewed for its TTL; this is cheap unless renewals are
    /// failing. Default (the file arbiter, no leases): yes.
    fn check_lease(&self, generation: u64) -> Result<()> {
        let _ = generation;
        Ok(())
    }
    /// For logs.
    fn describe(&self) -> String;
}

/// The file arbiter (see the module docs for where it is safe).
#[derive(Clone, Debug)]
pub struct FileArbiter {
    dir: PathBuf,
}

const PREFIX: &str = "generation-";

impl FileArbiter {
    /// An arbiter in `dir` (created if missing).
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(FileArbiter {
            dir: dir.to_path_buf(),
        })
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Io {
            path: self.dir.display().to_string(),
            source,
        }
    }
}

impl Arbiter for FileArbiter {
    fn claim(&self, generation: u64, who: &str) -> Result<bool> {
        let path = self.dir.join(format!("{PREFIX}{generation:020}"));
        let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(self.io(e)),
        };
        writeln!(f, "{who}").map_err(|e| self.io(e))?;
        f.sync_all().map_err(|e| self.io(e))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))?;
        // A newer generation may exist already (claimed by someone who saw more); then this
        // claim is worthless.
        Ok(self.current()? == generation)
    }

    fn current(&self) -> Result<u64> {
        let mut max = 0;
        for e in std::fs::read_dir(&self.dir).map_err(|e| self.io(e))? {
            let e = e.map_err(|e| self.io(e))?;
            if let Some(g) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|n| n.parse::<u64>().ok())
            {
                max = max.max(g);
            }
        }
        Ok(max)
    }

    fn granted(&self, generation: u64) -> Result<bool> {
        self.dir
            .join(format!("{PREFIX}{generation:020}"))
            .try_exists()
            .map_err(|e| self.io(e))
    }

    fn describe(&self) -> String {
        format!("file arbiter {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_claimant_wins_each_generation() {
        let d = std::env::temp_dir().join(format!("tandem-arbiter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let a = FileArbiter::new(&d).unwrap();
        assert_eq!(a.current().unwrap(), 0);
        assert!(a.claim(1, "p").unwrap());
        assert!(!a.claim(1, "q").unwrap());
        // Many threads race for generation 2: one wins.
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|i| {
                    let a = a.clone();
                    s.spawn(move || a.claim(2, &format!("t{i}")).unwrap() as usize)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        assert!(a.still(2).unwrap());
        assert!(!a.still(1).unwrap());
        // A claim of an older generation than the newest is worthless.
        assert!(a.claim(5, "x").unwrap());
        assert!(!a.claim(3, "y").unwrap());
        let _ = std::fs::remove_dir_all(&d);
    }
}
