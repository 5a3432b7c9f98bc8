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
//! ## A coordination service (etcd)
//! The trait admits one without changing callers: `claim(g)` is an etcd transaction
//! `If(Version(key "/tandem/<vm>/generation/<g>") == 0) Then(Put(key, who, lease))` — it
//! succeeds for exactly one client; `current()` is a range read of `/tandem/<vm>/generation/`
//! with `sort(key, descend), limit 1`. The winner keeps its lease alive (KeepAlive at a third
//! of the TTL) and uses the key's `create_revision` as its fencing token: the output sink, or
//! any storage the VM writes, rejects tokens older than the newest it has seen, exactly as the
//! sink here rejects older generations. Tandem does not build consensus of its own.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

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
