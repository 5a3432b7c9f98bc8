//! The files of one snapshot, their names, and the order a save writes them in.
//!
//! ```text
//!  DIR/FILE                  state file (checkpoint::snapshot): names every other file; the
//!                            rename that puts it in place is the commit point of a save
//!  DIR/FILE.mem-<nonce>      sparse memory (checkpoint::memfile), named in module/MainMem v2
//!  DIR/FILE.disk<i>-<nonce>  copy of writable disk i, named in group/virtio
//!  DIR/FILE.mem              memory of a version-1 snapshot (MainMem v1 names no file)
//!  DIR/<name>.tmp-<pid>      being written by process <pid>; never named by a state file
//!
//!  <nonce>: 16 hex digits, random, new for every save, so a save never writes a name that
//!  an existing state file names.
//!
//!  save to FILE (nonce n)                               a SIGKILL or power loss here leaves
//!   1  FILE.mem-n.tmp-<pid>: write, fsync ─ rename ─▶ FILE.mem-n, fsync DIR │ FILE = the old
//!   2  FILE.diskI-n.tmp-<pid>: copy, fsync ─ rename ─▶ FILE.diskI-n,        │ snapshot, its
//!      fsync DIR                                                            │ files untouched;
//!   3  FILE.tmp-<pid>: write, fsync ─ rename ─▶ FILE, fsync DIR   ◀ commit  ┘ orphans of n
//!   4  sweep: delete FILE.mem*, FILE.disk* not of nonce n, and the        FILE = the new one,
//!      temporaries of processes that are gone                             complete
//! ```
//!
//! A reader opens only the files the state file names, checks each one's size against the
//! state (and, with `verify`, every memory chunk's checksum), so a file of an unfinished save
//! is never taken for part of a snapshot. Orphans of a killed save are deleted by the next
//! save to the same `FILE`. One process saves to a given `FILE` at a time; a copy of a
//! snapshot is its state file together with the files it names, in one directory.

use std::path::{Path, PathBuf};

use crate::Error;

/// A fresh nonce for one save's data files (64 random bits, as 16 hex digits).
pub fn new_nonce() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// `FILE.<kind>-<nonce>`: a data file of the save with `nonce` of state file `state`.
pub fn data_path(state: &Path, kind: &str, nonce: &str) -> PathBuf {
    let mut name = state
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{kind}-{nonce}"));
    state.with_file_name(name)
}

/// The file name a state file records for `path` (its last component).
pub fn name_of(path: &Path) -> Result<String, Error> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| Error::Encode {
            section: "files".into(),
            msg: format!("{} has no UTF-8 file name", path.display()),
        })
}

/// Longest file name a state file may name.
pub const MAX_NAME: usize = 255;

/// Where the file `name` recorded in state file `state` is: beside it. A name that is not a
/// plain file name (empty, too long, `.`/`..`, with a `/` or NUL) is refused.
pub fn resolve(state: &Path, name: &str) -> Result<PathBuf, Error> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || name == "."
        || name == ".."
        || name.contains(['/', '\0'])
    {
        return Err(Error::Corrupt(format!(
            "the state file names the data file {name:?}, which is not a plain file name"
        )));
    }
    Ok(state.with_file_name(name))
}

/// fsyncs the directory that holds `path`, so the renames done in it are on disk.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// What a file beside state file `FILE` is, going by its name.
#[derive(Debug, PartialEq, Eq)]
enum Kind<'a> {
    /// `FILE.mem-<nonce>` / `FILE.disk<i>-<nonce>` (`Some(nonce)`), or the version-1
    /// `FILE.mem` / `FILE.disk<i>` (`None`).
    Data(Option<&'a str>),
    /// A temporary of process `pid`.
    Temp(u32),
}

fn classify<'a>(base: &str, name: &'a str) -> Option<Kind<'a>> {
    let rest = name.strip_prefix(base)?.strip_prefix('.')?;
    let pid_of = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if let Some(pid) = rest.strip_prefix("tmp-").and_then(pid_of) {
        return Some(Kind::Temp(pid)); // FILE.tmp-<pid>
    }
    if let Some((core, pid)) = rest.rsplit_once(".tmp-") {
        let pid = pid_of(pid)?;
        return data_kind(core).map(|_| Kind::Temp(pid));
    }
    data_kind(rest).map(Kind::Data)
}

/// `mem`, `mem-<nonce>`, `disk<i>`, `disk<i>-<nonce>` → `Some(nonce or None)`.
fn data_kind(s: &str) -> Option<Option<&str>> {
    let (kind, nonce) = match s.split_once('-') {
        Some((k, n)) => (k, Some(n)),
        None => (s, None),
    };
    let kind_ok = kind == "mem"
        || kind.strip_prefix("disk").is_some_and(|i| {
            !i.is_empty() && i.len() <= 3 && i.bytes().all(|b| b.is_ascii_digit())
        });
    let nonce_ok = nonce.is_none_or(|n| n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit()));
    (kind_ok && nonce_ok).then_some(nonce)
}

fn alive(pid: u32) -> bool {
    pid != std::process::id() && Path::new("/proc").join(pid.to_string()).exists()
}

/// Deletes the files beside state file `state` that its save with `keep` (the nonce of the
/// snapshot just committed) does not use: data files of other saves (earlier snapshots, saves
/// that were killed) and temporaries of processes that are gone. Returns what it deleted.
/// Call it only after the state file of `keep` is in place (step 4 above).
pub fn sweep(state: &Path, keep: &str) -> Vec<PathBuf> {
    remove_matching(state, |k| match k {
        Kind::Data(nonce) => nonce != Some(keep),
        Kind::Temp(pid) => !alive(pid),
    })
}

/// Deletes the data files of the save with `nonce` (a save that failed: its state file was
/// never written). Returns what it deleted.
pub fn remove_save(state: &Path, nonce: &str) -> Vec<PathBuf> {
    remove_matching(state, |k| k == Kind::Data(Some(nonce)))
}

/// Deletes the snapshot at `state`: the state file and every data file beside it of any save
/// (benchmarks and tests clean up with it). Returns what it deleted.
pub fn remove_snapshot(state: &Path) -> Vec<PathBuf> {
    let mut removed = remove_matching(state, |k| matches!(k, Kind::Data(_)));
    if std::fs::remove_file(state).is_ok() {
        removed.push(state.to_path_buf());
    }
    removed
}

fn remove_matching(state: &Path, doomed: impl Fn(Kind) -> bool) -> Vec<PathBuf> {
    let Some(base) = state.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let dir = match state.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !classify(base, name).is_some_and(&doomed) {
            continue;
        }
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(err) => log::warn!("cannot delete {}: {err}", p.display()),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified_strictly() {
        let n = "0123456789abcdef";
        assert_eq!(classify("s", "s.mem"), Some(Kind::Data(None)));
        assert_eq!(
            classify("s", &format!("s.mem-{n}")),
            Some(Kind::Data(Some(n)))
        );
        assert_eq!(
            classify("s", &format!("s.disk12-{n}")),
            Some(Kind::Data(Some(n)))
        );
        assert_eq!(classify("s", "s.disk0"), Some(Kind::Data(None)));
        assert_eq!(classify("s", "s.tmp-42"), Some(Kind::Temp(42)));
        assert_eq!(
            classify("s", &format!("s.mem-{n}.tmp-7")),
            Some(Kind::Temp(7))
        );
        for other in [
            "s",
            "s.txt",
            "s.mem-xyz",
            "s.memory",
            "s.disk",
            "s.diskx-0123456789abcdef",
            "s2.mem",
            "t.mem",
            "s.tmp-",
            "s.tmp-4x",
            "s.txt.tmp-4",
        ] {
            assert_eq!(classify("s", other), None, "{other}");
        }
    }

    #[test]
    fn sweep_keeps_the_committed_save_and_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("snap");
        let (keep, old) = (new_nonce(), new_nonce());
        let mut alive_pid = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let live_tmp = format!("snap.mem-{old}.tmp-{}", alive_pid.id());
        let files = [
            "snap".to_string(),
            format!("snap.mem-{keep}"),
            format!("snap.disk0-{keep}"),
            format!("snap.mem-{old}"),
            format!("snap.disk0-{old}"),
            "snap.mem".into(),
            "snap.tmp-999999999".into(),
            live_tmp.clone(),
            "snap.txt".into(),
            "other.mem".into(),
        ];
        for f in &files {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let mut gone: Vec<String> = sweep(&state, &keep)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        gone.sort();
        let mut want = vec![
            format!("snap.mem-{old}"),
            format!("snap.disk0-{old}"),
            "snap.mem".to_string(),
            "snap.tmp-999999999".into(),
        ];
        want.sort();
        assert_eq!(gone, want);
        assert!(d.path().join(&live_tmp).exists(), "a live writer's file");
        assert_eq!(
            remove_save(&state, &keep).len(),
            2,
            "a failed save's own data files"
        );
        let _ = alive_pid.kill();
        let _ = alive_pid.wait();
    }

    #[test]
    fn only_plain_names_resolve() {
        let s = Path::new("/d/snap");
        assert_eq!(
            resolve(s, "snap.mem-1").unwrap(),
            Path::new("/d/snap.mem-1")
        );
        for bad in ["", ".", "..", "../x", "a/b", "x\0", &"a".repeat(256)] {
            assert!(resolve(s, bad).is_err(), "{bad:?}");
        }
    }
}
