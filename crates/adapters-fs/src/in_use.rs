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

use std::collections::HashMap;
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

/// Every file some process holds open, by device and inode: one pass over
/// `/proc/<pid>/fd`, then any number of cheap lookups.
#[derive(Debug, Default)]
pub(crate) struct OpenFiles {
    /// (device, inode) -> the first pid found holding it.
    held: HashMap<(u64, u64), u32>,
}

impl OpenFiles {
    /// Scans `/proc` (nothing is found without it).
    pub(crate) fn scan() -> OpenFiles {
        let mut held = HashMap::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return OpenFiles { held };
        };
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
                if let Ok(meta) = std::fs::metadata(fd.path()) {
                    held.entry((meta.dev(), meta.ino())).or_insert(pid);
                }
            }
        }
        OpenFiles { held }
    }

    /// Whether no process holds anything open that we can see.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The process holding the file at `path` (described by `meta`) open.
    pub(crate) fn holder(&self, path: &Path, meta: &std::fs::Metadata) -> Option<Holder> {
        let pid = *self.held.get(&(meta.dev(), meta.ino()))?;
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|s| s.trim().to_owned());
        Some(Holder {
            path: path.to_path_buf(),
            pid,
            name,
        })
    }

    /// The first process holding one of `files` open (missing files are
    /// skipped).
    pub(crate) fn holder_of(&self, files: &[PathBuf]) -> Option<Holder> {
        files.iter().find_map(|p| {
            let meta = std::fs::metadata(p).ok()?;
            self.holder(p, &meta)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_own_open_file_and_not_a_closed_one() {
        let find = |files: &[PathBuf]| OpenFiles::scan().holder_of(files);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, b"x").unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"y").unwrap();
        assert_eq!(find(std::slice::from_ref(&path)), None);
        let open = std::fs::File::open(&path).unwrap();
        let holder = find(&[other.clone(), path.clone()]).unwrap();
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(holder.path, path);
        drop(open);
        assert_eq!(find(&[other, path]), None);
        assert_eq!(find(&[dir.path().join("missing")]), None);
    }
}
