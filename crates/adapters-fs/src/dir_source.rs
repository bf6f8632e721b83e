//! [`DirSource`]: the memory, config and checkpoints components, read from
//! the live data directory.
//!
//! - The walk is in sorted (byte) order; regular files are stored with mode
//!   and mtime, directories too (so empty ones survive).
//! - Symlinks are never followed: a link whose relative target stays inside
//!   the component is stored as a link, any other is skipped with a WARN.
//!   Sockets, FIFOs and devices are skipped with a WARN.
//! - Files that a [`FileSnapshotter`] handles (SQLite databases, recognised
//!   by header) are copied consistently into a scratch directory first.
//! - A file that changes while it is read (size, mtime or inode differ
//!   before and after) is read again once (files up to 4 MiB, which are
//!   buffered), then the backup fails naming the file: memory is meant to be
//!   snapshotted while its writer is paused.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component as PathPart, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use backup_core::ports::{
    ComponentSource, EntryKind, FileSnapshotter, Opened, Snapshot, SnapshotEntry,
};
use backup_core::{ArchivePath, Component, Error, Result};
use bytes::Bytes;
use futures::StreamExt;

/// What SQLite keeps next to a database file.
pub(crate) const SQLITE_COMPANIONS: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Files up to this size are buffered, which allows one re-read when they
/// change while being read.
const BUFFERED_MAX: u64 = 1024 * 1024;

/// What the source reads: a directory tree or a single file.
#[derive(Debug, Clone)]
enum Shape {
    Dir,
    File,
}

/// A directory (memory, checkpoints) or single-file (config) component.
#[derive(Debug, Clone)]
pub struct DirSource {
    component: Component,
    path: PathBuf,
    shape: Shape,
    snapshotter: Option<Arc<dyn FileSnapshotter>>,
}

impl DirSource {
    /// A component stored as a directory tree, e.g. memory at `data/memory`
    /// becomes `memory/...` in the backup.
    pub fn dir(component: Component, path: impl Into<PathBuf>) -> DirSource {
        DirSource {
            component,
            path: path.into(),
            shape: Shape::Dir,
            snapshotter: None,
        }
    }

    /// A component that is one file, e.g. `company.yaml` becomes
    /// `config/company.yaml` in the backup.
    pub fn file(component: Component, path: impl Into<PathBuf>) -> DirSource {
        DirSource {
            component,
            path: path.into(),
            shape: Shape::File,
            snapshotter: None,
        }
    }

    /// Copies files it handles (e.g. SQLite databases) consistently instead
    /// of byte by byte.
    pub fn with_snapshotter(mut self, snapshotter: Arc<dyn FileSnapshotter>) -> DirSource {
        self.snapshotter = Some(snapshotter);
        self
    }

    fn source_err(&self, path: &Path, reason: impl Into<String>, e: Option<io::Error>) -> Error {
        Error::Source {
            component: self.component,
            path: path.display().to_string(),
            reason: reason.into(),
            source: e.map(|e| Box::new(e) as _),
        }
    }

    fn io_err(&self, path: &Path, e: io::Error) -> Error {
        self.source_err(path, crate::fsio::describe(&e), Some(e))
    }

    /// Walks the source; returns entries and the fs path of each file entry.
    fn walk(&self) -> Result<Walked> {
        let root = ArchivePath::parse(self.component.archive_root())
            .map_err(|e| self.source_err(&self.path, e.to_string(), None))?;
        let mut walked = Walked::default();
        // A component root that is a symlink (to another disk, say) is
        // followed: the data is what it points to.
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(component = %self.component, path = %self.path.display(),
                    "component source does not exist; the backup records it as absent");
                walked.absent = true;
                return Ok(walked);
            }
            Err(e) => return Err(self.io_err(&self.path, e)),
        };
        let root_path = if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.is_symlink()) {
            std::fs::canonicalize(&self.path).map_err(|e| self.io_err(&self.path, e))?
        } else {
            self.path.clone()
        };
        match self.shape {
            Shape::File => {
                if !meta.is_file() {
                    return Err(self.source_err(&self.path, "is not a regular file", None));
                }
                walked.push_dir(root.clone(), 0o755, &meta);
                let name = self
                    .path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| self.source_err(&self.path, "file name is not UTF-8", None))?;
                let path = root
                    .join(name)
                    .map_err(|e| self.source_err(&self.path, e.to_string(), None))?;
                walked.push_file(path, root_path, &meta);
            }
            Shape::Dir => {
                if !meta.is_dir() {
                    return Err(self.source_err(&self.path, "is not a directory", None));
                }
                walked.push_dir(root.clone(), meta.permissions().mode() & 0o7777, &meta);
                self.walk_dir(&root_path, &root, &mut walked)?;
            }
        }
        Ok(walked)
    }

    /// The walk, its entries sorted, and the position and path of each
    /// file whose header the snapshotter handles (it gets a consistent
    /// copy). All on the blocking pool: opening each of thousands of files
    /// on a runtime thread would stall whatever else it serves (the API)
    /// while the memory writer is paused.
    fn walk_sorted(&self) -> Result<(Walked, Vec<(usize, PathBuf)>)> {
        let mut walked = self.walk()?;
        walked.entries.sort_by(|a, b| a.path.cmp(&b.path));
        let handled = match &self.snapshotter {
            Some(snapshotter) => walked
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.kind == EntryKind::File && e.size > 0)
                .filter_map(|(n, e)| Some((n, walked.files.get(&e.path)?)))
                .filter(|(_, fs_path)| {
                    snapshotter.handles(&read_header(fs_path).unwrap_or_default())
                })
                .map(|(n, fs_path)| (n, fs_path.clone()))
                .collect(),
            None => Vec::new(),
        };
        Ok((walked, handled))
    }

    /// The entries of the source (which exists), sorted, and the path of
    /// each file.
    pub(crate) fn walk_present(
        &self,
    ) -> Result<(Vec<SnapshotEntry>, HashMap<ArchivePath, PathBuf>)> {
        let mut walked = self.walk()?;
        if walked.absent {
            return Err(self.source_err(&self.path, "does not exist", None));
        }
        walked.entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok((walked.entries, walked.files))
    }

    fn walk_dir(&self, dir: &Path, at: &ArchivePath, walked: &mut Walked) -> Result<()> {
        let mut children = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| self.io_err(dir, e))? {
            let entry = entry.map_err(|e| self.io_err(dir, e))?;
            let name = entry.file_name();
            let fs_path = entry.path();
            let name = name
                .to_str()
                .ok_or_else(|| self.source_err(&fs_path, "file name is not UTF-8", None))?
                .to_owned();
            children.push((name, fs_path));
        }
        children.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (name, fs_path) in children {
            let path = at
                .join(&name)
                .map_err(|e| self.source_err(&fs_path, e.to_string(), None))?;
            let meta = std::fs::symlink_metadata(&fs_path).map_err(|e| self.io_err(&fs_path, e))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                walked.push_dir(path.clone(), meta.permissions().mode() & 0o7777, &meta);
                self.walk_dir(&fs_path, &path, walked)?;
            } else if ft.is_file() {
                walked.push_file(path, fs_path, &meta);
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&fs_path).map_err(|e| self.io_err(&fs_path, e))?;
                match contained_target(&path, &target) {
                    Some(t) => walked.entries.push(SnapshotEntry {
                        path,
                        kind: EntryKind::Symlink(t),
                        size: 0,
                        mode: 0o777,
                        mtime: mtime(&meta),
                        owner: Some((meta.uid(), meta.gid())),
                    }),
                    None => tracing::warn!(path = %fs_path.display(), target = %target.display(),
                        "skipping symlink that points outside its component"),
                }
            } else {
                tracing::warn!(path = %fs_path.display(), "skipping special file (socket, FIFO or device)");
            }
        }
        Ok(())
    }
}

/// `target` as a string if it is relative and, resolved lexically from the
/// link's directory, stays inside the link's component.
pub(crate) fn contained_target(link: &ArchivePath, target: &Path) -> Option<String> {
    let text = target.to_str()?;
    if target.is_absolute() || text.is_empty() || text.chars().any(char::is_control) {
        return None;
    }
    let mut stack: Vec<&str> = link.segments().collect();
    stack.pop(); // the link's own name
    for part in target.components() {
        match part {
            PathPart::Normal(p) => stack.push(p.to_str()?),
            // Never step out of the component, not even to come back:
            // the component's directory may have another name on restore.
            PathPart::ParentDir if stack.len() > 1 => {
                stack.pop();
            }
            PathPart::CurDir => {}
            _ => return None,
        }
    }
    // Still below the component root (which is the first segment).
    (stack.len() >= 2 && Some(stack[0]) == link.segments().next()).then(|| text.to_owned())
}

fn mtime(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
}

/// The entry of a regular file at `path` with `meta`.
pub(crate) fn file_entry(path: ArchivePath, meta: &std::fs::Metadata) -> SnapshotEntry {
    SnapshotEntry {
        path,
        kind: EntryKind::File,
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
        mtime: meta.mtime(),
        owner: Some((meta.uid(), meta.gid())),
    }
}

#[derive(Default)]
struct Walked {
    entries: Vec<SnapshotEntry>,
    files: HashMap<ArchivePath, PathBuf>,
    /// The source does not exist.
    absent: bool,
}

impl Walked {
    fn push_dir(&mut self, path: ArchivePath, mode: u32, meta: &std::fs::Metadata) {
        self.entries.push(SnapshotEntry {
            path,
            kind: EntryKind::Dir,
            size: 0,
            mode,
            mtime: meta.mtime(),
            owner: Some((meta.uid(), meta.gid())),
        });
    }

    fn push_file(&mut self, path: ArchivePath, fs_path: PathBuf, meta: &std::fs::Metadata) {
        self.entries.push(file_entry(path.clone(), meta));
        self.files.insert(path, fs_path);
    }
}

#[async_trait]
impl ComponentSource for DirSource {
    fn component(&self) -> Component {
        self.component
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>> {
        let me = self.clone();
        let (mut walked, handled) = tokio::task::spawn_blocking(move || me.walk_sorted())
            .await
            .map_err(|e| self.source_err(&self.path, format!("walk task failed: {e}"), None))??;
        let mut scratch = None;
        let mut snapshotted = Vec::new();
        if let Some(snapshotter) = &self.snapshotter {
            for (n, fs_path) in handled {
                let Some(entry) = walked.entries.get_mut(n) else {
                    continue;
                };
                if scratch.is_none() {
                    scratch = Some(self.scratch_dir()?);
                }
                let Some(dir) = scratch.as_ref() else {
                    continue;
                };
                let copy = dir.path().join(format!("{n}.copy"));
                snapshotter
                    .copy_consistent(self.component, &fs_path, &copy)
                    .await?;
                let meta = std::fs::metadata(&copy).map_err(|e| self.io_err(&copy, e))?;
                entry.size = meta.len();
                walked.files.insert(entry.path.clone(), copy);
                snapshotted.push(entry.path.as_str().to_owned());
            }
        }
        // A consistent copy is complete by itself: its live -wal, -shm and
        // -journal belong to the live file and would be replayed over the
        // copy on restore (a hot journal may even be gone by now, rolled
        // back by the copy's own read).
        let companion = |path: &ArchivePath| {
            SQLITE_COMPANIONS.iter().any(|suffix| {
                path.as_str()
                    .strip_suffix(suffix)
                    .is_some_and(|main| snapshotted.iter().any(|s| s == main))
            })
        };
        walked.entries.retain(|e| !companion(&e.path));
        walked.files.retain(|p, _| !companion(p));
        let position = walked
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| walked.files.contains_key(&e.path))
            .map(|(i, e)| (e.path.clone(), i))
            .collect();
        Ok(Box::new(DirSnapshot {
            absent: walked.absent,
            component: self.component,
            entries: walked.entries,
            files: walked.files,
            position,
            read_ahead: std::sync::Mutex::new(HashMap::new()),
            _scratch: scratch,
        }))
    }
}

impl DirSource {
    /// A scratch directory for consistent copies, next to the source (same
    /// filesystem as the live data, not a possibly small tmpfs).
    fn scratch_dir(&self) -> Result<tempfile::TempDir> {
        let parent = match self.shape {
            Shape::Dir => self.path.parent(),
            Shape::File => self.path.parent().and_then(Path::parent),
        }
        .unwrap_or_else(|| Path::new("."));
        tempfile::Builder::new()
            .prefix(backup_core::ports::SCRATCH_PREFIX)
            .tempdir_in(parent)
            .map_err(|e| self.io_err(parent, e))
    }
}

fn read_header(path: &Path) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 100];
    let mut file = std::fs::File::open(path)?;
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}

struct DirSnapshot {
    absent: bool,
    component: Component,
    entries: Vec<SnapshotEntry>,
    files: HashMap<ArchivePath, PathBuf>,
    /// Position of each file in `entries`, for reading ahead.
    position: HashMap<ArchivePath, usize>,
    /// Small files read ahead of their `open`, at most
    /// [`READ_AHEAD_BYTES`] in all.
    read_ahead: std::sync::Mutex<HashMap<ArchivePath, Vec<u8>>>,
    _scratch: Option<tempfile::TempDir>,
}

/// Small files read in one blocking call: the one opened and up to this
/// many bytes / files of those that follow it (the archive writer opens
/// them in entry order).
const READ_AHEAD_BYTES: u64 = 2 * 1024 * 1024;
const READ_AHEAD_FILES: usize = 64;

/// What [`DirSnapshot::read_small_blocking`] found.
enum SmallRead {
    Data(Vec<u8>),
    Large,
    Changed,
}

/// What identifies a file's version: if any of it differs after reading,
/// the file changed while it was read.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Stamp {
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
    ino: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            len: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ino: meta.ino(),
        }
    }
}

impl DirSnapshot {
    fn changed(&self, path: &Path) -> Error {
        Error::Source {
            component: self.component,
            path: path.display().to_string(),
            reason: "file changed while being read (also on retry); pause its writer with the quiesce hook during backups".into(),
            source: None,
        }
    }

    fn io_err(&self, path: &Path, e: io::Error) -> Error {
        Error::Source {
            component: self.component,
            path: path.display().to_string(),
            reason: crate::fsio::describe(&e),
            source: Some(Box::new(e)),
        }
    }

    /// Reads `path` (see [`read_small_blocking`](Self::read_small_blocking))
    /// and, in the same blocking call, the small files after it, keeping
    /// those in `read_ahead`. A follower that fails or changed is left to
    /// its own `open`, which reports it.
    async fn read_with_followers(&self, path: &ArchivePath, fs_path: &Path) -> Result<SmallRead> {
        let start = self
            .position
            .get(path)
            .copied()
            .unwrap_or(self.entries.len());
        let mut budget = READ_AHEAD_BYTES;
        let followers: Vec<(ArchivePath, PathBuf)> = self
            .entries
            .iter()
            .skip(start + 1)
            .filter_map(|e| Some((e, self.files.get(&e.path)?)))
            .take_while(|(e, _)| {
                let fits = e.size <= BUFFERED_MAX && e.size <= budget;
                budget = budget.saturating_sub(e.size);
                fits
            })
            .take(READ_AHEAD_FILES)
            .map(|(e, p)| (e.path.clone(), p.clone()))
            .collect();
        let first = fs_path.to_path_buf();
        let (read, ahead) = tokio::task::spawn_blocking(move || {
            let read = DirSnapshot::read_small_blocking(&first);
            let ahead: Vec<(ArchivePath, Vec<u8>)> = followers
                .into_iter()
                .filter_map(|(path, fs)| match DirSnapshot::read_small_blocking(&fs) {
                    Ok(SmallRead::Data(data)) => Some((path, data)),
                    _ => None,
                })
                .collect();
            (read, ahead)
        })
        .await
        .map_err(|e| self.io_err(fs_path, io::Error::other(e)))?;
        if !ahead.is_empty() {
            let mut cache = self.read_ahead.lock().unwrap_or_else(|e| e.into_inner());
            cache.clear();
            cache.extend(ahead);
        }
        read.map_err(|e| self.io_err(fs_path, e))
    }

    /// Reads a file of at most [`BUFFERED_MAX`] bytes whole, checking that
    /// it did not change meanwhile (one more try if it did). `None`: the
    /// file is larger, stream it. All of it in one blocking call: a backup
    /// of thousands of small files would otherwise hand each file back and
    /// forth between threads four times (bench/run: a third of the CPU
    /// went to thread wake-ups).
    fn read_small_blocking(path: &Path) -> io::Result<SmallRead> {
        for _attempt in 0..2 {
            let before = std::fs::symlink_metadata(path)?;
            if before.len() > BUFFERED_MAX {
                return Ok(SmallRead::Large);
            }
            let data = std::fs::read(path)?;
            let after = std::fs::symlink_metadata(path)?;
            if Stamp::of(&before) == Stamp::of(&after) && data.len() as u64 == after.len() {
                return Ok(SmallRead::Data(data));
            }
            tracing::debug!(path = %path.display(), "file changed while being read; reading again");
        }
        Ok(SmallRead::Changed)
    }

    async fn stream_large(&self, path: &Path) -> Result<Opened> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| self.io_err(path, e))?;
        let before = Stamp::of(&file.metadata().await.map_err(|e| self.io_err(path, e))?);
        let size = before.len;
        let path = path.to_path_buf();
        let changed = self.changed(&path).to_string();
        let file = file.into_std().await;
        let verify_with = file.try_clone().map_err(|e| self.io_err(&path, e))?;
        // After the last byte: the whole size was read, and the file still
        // has the same size, mtime and inode, by descriptor and by path.
        let verify = futures::stream::once(async move {
            let meta_now = tokio::task::spawn_blocking(move || verify_with.metadata())
                .await
                .map_err(io::Error::other)??;
            let path_now = tokio::fs::symlink_metadata(&path).await?;
            if Stamp::of(&meta_now) != before || Stamp::of(&path_now) != before {
                return Err(io::Error::other(changed));
            }
            Ok(())
        })
        .filter_map(|checked: io::Result<()>| futures::future::ready(checked.err().map(Err)));
        // A file that ends early gives fewer bytes than its size, which the
        // consumer reports as a change.
        let stream = backup_core::buffers::read_chunks(file, size)
            .chain(verify)
            .boxed();
        Ok(Opened { size, stream })
    }
}

#[async_trait]
impl Snapshot for DirSnapshot {
    fn entries(&self) -> &[SnapshotEntry] {
        &self.entries
    }

    fn db_schema_version(&self) -> Option<i64> {
        None
    }

    fn absent(&self) -> bool {
        self.absent
    }

    async fn open(&self, path: &ArchivePath) -> Result<Opened> {
        let fs_path = self.files.get(path).ok_or_else(|| Error::Source {
            component: self.component,
            path: path.to_string(),
            reason: "not a file of this snapshot".into(),
            source: None,
        })?;
        let ready = self
            .read_ahead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
        let read = match ready {
            Some(data) => SmallRead::Data(data),
            None => self.read_with_followers(path, fs_path).await?,
        };
        match read {
            SmallRead::Data(data) => {
                let size = data.len() as u64;
                let bytes = Bytes::from(data);
                Ok(Opened {
                    size,
                    stream: futures::stream::once(async move { Ok(bytes) }).boxed(),
                })
            }
            SmallRead::Large => self.stream_large(fs_path).await,
            SmallRead::Changed => Err(self.changed(fs_path)),
        }
    }

    async fn finish(self: Box<Self>) -> Result<()> {
        if let Some(dir) = self._scratch {
            let path = dir.path().to_path_buf();
            dir.close().map_err(|e| Error::Source {
                component: self.component,
                path: path.display().to_string(),
                reason: format!("cannot remove scratch directory: {e}"),
                source: None,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets_must_stay_inside_the_component() {
        let link = ArchivePath::parse("memory/a/link").unwrap();
        assert_eq!(contained_target(&link, Path::new("b")), Some("b".into()));
        assert_eq!(
            contained_target(&link, Path::new("../c")),
            Some("../c".into())
        );
        assert_eq!(contained_target(&link, Path::new("../../x")), None);
        assert_eq!(contained_target(&link, Path::new("/etc/passwd")), None);
        assert_eq!(contained_target(&link, Path::new("../../memory/x")), None);
    }
}
