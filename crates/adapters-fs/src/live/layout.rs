//! Where live data really is and who owns it: symlinked roots, mount
//! points, SQLite companions, owners of restored items.

use super::*;

/// A staged SQLite file is a consistent copy taken through SQLite, complete
/// by itself. Backups made before 1.1 also stored the live file's `-wal`,
/// `-shm` and `-journal` raw next to it; SQLite would replay those over
/// the copy and corrupt it, so they are removed from staging (the copy is
/// the backed-up state).
pub(super) fn drop_stale_companions(c: Component, file: &Path) -> Result<()> {
    for stale in with_companions(file).into_iter().skip(1) {
        if exists(&stale) {
            fsio::remove_any(&stale).map_err(|e| source_err(c, &stale, e))?;
            tracing::warn!(path = %stale.display(),
                "removed a stale SQLite companion stored next to its consistent copy");
        }
    }
    Ok(())
}

/// A SQLite file and its `-wal`, `-shm` and `-journal` companions.
pub(super) fn with_companions(main: &Path) -> Vec<PathBuf> {
    let mut items = vec![main.to_path_buf()];
    for suffix in crate::dir_source::SQLITE_COMPANIONS {
        let mut p = main.as_os_str().to_owned();
        p.push(suffix);
        items.push(PathBuf::from(p));
    }
    items
}

/// `path`, or what it points to when it is a symlink (followed to the end;
/// a dangling link resolves to its target's path).
pub(super) fn resolve_link(path: &Path) -> PathBuf {
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) {
        return path.to_path_buf();
    }
    std::fs::canonicalize(path).unwrap_or_else(|_| match std::fs::read_link(path) {
        Ok(target) => parent_of(path).join(target),
        Err(_) => path.to_path_buf(),
    })
}

pub(super) fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `<dir>/.<name><suffix>`.
pub(super) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}{suffix}"))
}

/// Whether `path` is a mount point: on another device than its parent, or
/// listed in `/proc/self/mountinfo` (bind mounts of the same device).
pub(super) fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let parent = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    if let Some(parent) = &parent
        && std::fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev())
    {
        return true;
    }
    let Ok(canonical) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount| Path::new(&unescape_mountinfo(mount)) == canonical)
}

/// Mount points in mountinfo escape space, tab, newline and backslash as
/// three octal digits.
pub(super) fn unescape_mountinfo(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The owner the manifest recorded for a component's root item.
pub(super) fn recorded_owner(manifest: &Manifest, c: Component) -> Option<(u32, u32)> {
    let root = c.archive_root();
    let file = manifest
        .files
        .iter()
        .find(|f| {
            f.path.component() == Some(c) && (f.path.as_str() == root || c == Component::Config)
        })
        .and_then(|f| f.uid.zip(f.gid));
    let dir = manifest
        .dirs
        .iter()
        .find(|d| d.path.as_str() == root.trim_end_matches('/'))
        .and_then(|d| d.uid.zip(d.gid));
    file.or(dir)
}

/// Gives `path` the owner `owner` when it has another one. Without the
/// right to (not root), the item stays ours: the only owner we can give.
pub(super) fn set_owner(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    give_owner(path, owner, std::fs::symlink_metadata(path), |uid, gid| {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    })
}

/// [`set_owner`] for an open file (no path lookups: a restore does this
/// for each of thousands of files).
pub(super) fn set_file_owner(
    file: &std::fs::File,
    path: &Path,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    give_owner(path, owner, file.metadata(), |uid, gid| {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))
    })
}

/// Changes the owner of the item at `path` (now `meta`) to `owner` with
/// `chown`, unless it has it; not being allowed to is not an error.
fn give_owner(
    path: &Path,
    owner: Option<(u32, u32)>,
    meta: io::Result<std::fs::Metadata>,
    chown: impl FnOnce(u32, u32) -> io::Result<()>,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    let meta = meta?;
    if (meta.uid(), meta.gid()) == (uid, gid) {
        return Ok(());
    }
    match chown(uid, gid) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            tracing::debug!(path = %path.display(), uid, gid, "cannot give the restored item its owner (not root)");
            Ok(())
        }
        other => other,
    }
}

/// Bytes of a file's start that tell a SQLite database (its header).
pub(super) const HEADER_LEN: usize = 100;

pub(super) fn read_header(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(HEADER_LEN);
    std::fs::File::open(path)?
        .take(HEADER_LEN as u64)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

/// A process holding a SQLite database under `dir` open, or its `-wal`,
/// `-shm` or `-journal`: only the headers of files someone holds are read
/// (not those of thousands of memory segments, twice per restore).
pub(super) fn sqlite_holder(
    dir: &Path,
    open: &crate::in_use::OpenFiles,
) -> io::Result<Option<crate::in_use::Holder>> {
    for file in sqlite_candidates(dir)? {
        let Ok(meta) = std::fs::symlink_metadata(&file) else {
            continue; // gone since the listing
        };
        let Some(holder) = open.holder(&file, &meta) else {
            continue;
        };
        use std::os::unix::ffi::OsStrExt;
        let name = file.as_os_str().as_bytes();
        let main = crate::dir_source::SQLITE_COMPANIONS
            .iter()
            .find_map(|s| name.strip_suffix(s.as_bytes()))
            .map_or_else(
                || file.clone(),
                |m| PathBuf::from(std::ffi::OsStr::from_bytes(m)),
            );
        if read_header(&main).is_ok_and(|h| h.starts_with(b"SQLite format 3\0")) {
            return Ok(Some(holder));
        }
    }
    Ok(None)
}

/// Regular files under `root`.
pub(super) fn sqlite_candidates(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}

/// A filesystem a restore stages on.
pub(super) struct StagingFs {
    /// The component first staged there, for errors.
    pub(super) component: Component,
    /// A directory on it: that component's staging parent (a staged
    /// server-database dump is gone by the swap; its parent is not).
    pub(super) dir: PathBuf,
    /// Every component staged there.
    pub(super) staged: Vec<Component>,
}

/// The filesystems the staged `roots` are on, each once (usually one: the
/// data directory's).
pub(super) fn staging_filesystems(roots: &[(Component, PathBuf)]) -> Result<Vec<StagingFs>> {
    use std::os::unix::fs::MetadataExt;
    let mut found: Vec<(u64, StagingFs)> = Vec::new();
    for (c, staged) in roots {
        let dir = parent_of(staged);
        let dev = std::fs::metadata(dir)
            .map_err(|e| source_err(*c, dir, e))?
            .dev();
        match found.iter_mut().find(|(d, _)| *d == dev) {
            Some((_, fs)) => fs.staged.push(*c),
            None => found.push((
                dev,
                StagingFs {
                    component: *c,
                    dir: dir.to_path_buf(),
                    staged: vec![*c],
                },
            )),
        }
    }
    Ok(found.into_iter().map(|(_, fs)| fs).collect())
}

/// Refuses a restore whose files alone do not fit in the free space of
/// the filesystems they are staged on, before anything is written (staging
/// would only fail later with the disk full). Only the files' sizes count
/// (block rounding and metadata come on top), so a restore that could fit
/// is never refused.
pub(super) fn check_room(manifest: &Manifest, filesystems: &[StagingFs]) -> Result<()> {
    // Root may fill the blocks reserved for it; others may not.
    let root = rustix::process::geteuid().is_root();
    for StagingFs {
        component: c,
        dir,
        staged,
    } in filesystems
    {
        let c = *c;
        let bytes: u64 = manifest
            .files
            .iter()
            .filter(|f| f.path.component().is_some_and(|fc| staged.contains(&fc)))
            .map(|f| f.size)
            .sum();
        let fs = rustix::fs::statvfs(dir).map_err(|e| source_err(c, dir, e.into()))?;
        let blocks = if root { fs.f_bfree } else { fs.f_bavail };
        let free = blocks.saturating_mul(fs.f_frsize);
        if bytes > free {
            let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
            return Err(Error::Source {
                component: c,
                path: dir.display().to_string(),
                reason: format!(
                    "not enough free space to stage the restore (disk full): its files need {:.1} MiB, {:.1} MiB is free on this filesystem; nothing was changed (free space, e.g. `synthorg backup prune` trims the safety backups of earlier restores)",
                    mib(bytes),
                    mib(free)
                ),
                source: None,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_use::OpenFiles;

    #[test]
    fn a_held_sqlite_database_or_companion_counts_and_a_held_segment_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents");
        std::fs::create_dir_all(&agents).unwrap();
        let db = agents.join("mem.db");
        let mut header = b"SQLite format 3\0".to_vec();
        header.resize(4096, 0);
        std::fs::write(&db, &header).unwrap();
        let wal = agents.join("mem.db-wal");
        std::fs::write(&wal, b"frames").unwrap();
        let segment = agents.join("segment-0001.bin");
        std::fs::write(&segment, b"vectors").unwrap();
        let holder = || sqlite_holder(dir.path(), &OpenFiles::scan()).unwrap();
        assert_eq!(holder(), None);

        let held = std::fs::File::open(&segment).unwrap();
        assert_eq!(holder(), None, "a segment file is not a database");
        drop(held);
        let held = std::fs::File::open(&wal).unwrap();
        assert_eq!(holder().map(|h| h.path), Some(wal.clone()));
        drop(held);
        let held = std::fs::File::open(&db).unwrap();
        let found = holder().unwrap();
        assert_eq!((found.path, found.pid), (db.clone(), std::process::id()));
        drop(held);

        // A -wal beside a file that is not SQLite does not count.
        std::fs::write(&db, b"not a database").unwrap();
        let _held = std::fs::File::open(&wal).unwrap();
        assert_eq!(holder(), None);
    }
}
