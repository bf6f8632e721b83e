//! Finding processes that hold live files open.
//!
//! A restore renames the live database aside and deletes it afterwards. A
//! process that still has it open keeps writing into the renamed file, and
//! every row it commits from then on is lost with it. So before staging and
//! again right before the swap, the restore looks for such a process:
//! every `/proc/<pid>/fd/*` link is resolved with `stat` and compared by
//! device and inode with the live files (our own process included: an
//! embedding host must close its pools first). Processes whose `fd`
//! directory we may not read (other users, when not root) are invisible;
//! without `/proc` (not Linux) nothing is found.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A process holding one of the files open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    /// The file it holds.
    pub(crate) path: PathBuf,
    /// Its pid.
    pub(crate) pid: u32,
    /// Its command name (`/proc/<pid>/comm`), if readable.
    pub(crate) name: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "pid {} ({name})", self.pid),
            None => write!(f, "pid {}", self.pid),
        }
    }
}

/// The first process found holding one of `files` open (missing files are
/// skipped).
pub(crate) fn find_holder(files: &[PathBuf]) -> Option<Holder> {
    let wanted: Vec<((u64, u64), &Path)> = files
        .iter()
        .filter_map(|p| {
            let meta = std::fs::metadata(p).ok()?;
            Some(((meta.dev(), meta.ino()), p.as_path()))
        })
        .collect();
    if wanted.is_empty() {
        return None;
    }
    let keys: HashSet<(u64, u64)> = wanted.iter().map(|(k, _)| *k).collect();
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(meta) = std::fs::metadata(fd.path()) else {
                continue;
            };
            let key = (meta.dev(), meta.ino());
            if !keys.contains(&key) {
                continue;
            }
            let path = wanted
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, p)| p.to_path_buf())
                .unwrap_or_default();
            let name = std::fs::read_to_string(entry.path().join("comm"))
                .ok()
                .map(|s| s.trim().to_owned());
            return Some(Holder { path, pid, name });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_own_open_file_and_not_a_closed_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, b"x").unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"y").unwrap();
        assert_eq!(find_holder(std::slice::from_ref(&path)), None);
        let open = std::fs::File::open(&path).unwrap();
        let holder = find_holder(&[other.clone(), path.clone()]).unwrap();
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(holder.path, path);
        drop(open);
        assert_eq!(find_holder(&[other, path]), None);
        assert_eq!(find_holder(&[dir.path().join("missing")]), None);
    }
}
