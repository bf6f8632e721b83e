//! [`RestoreTarget::preserve`] for [`LiveData`]: the live items a restore
//! replaces become a directory-form backup, renamed into it by the swap
//! (copied where a rename cannot reach), so the pre-restore safety backup
//! costs a hash of the live data, not a recompression of it.

use std::collections::HashMap;

use backup_core::Sha256Hasher;
use backup_core::ports::{EntryKind, Preserved, SnapshotEntry};

use super::*;
use crate::dir_source::{DirSource, SQLITE_COMPANIONS, file_entry};

/// Read buffer for hashing.
const HASH_CHUNK: usize = 1024 * 1024;

/// Bytes of a live file hashed between two [`fsio::release_cached`] calls.
const RELEASE_EVERY: u64 = 8 * 1024 * 1024;

impl LiveData {
    /// Settles the SQLite databases of `components` (see
    /// `DatabaseVerifier::settle`); returns the main database's schema
    /// version and the databases settled, or `None` when a WAL is left
    /// over (the files alone would then not be the data).
    pub(super) async fn settle_databases(
        &self,
        verifier: &Arc<dyn DatabaseVerifier>,
        components: &[Component],
    ) -> Result<Option<(Option<i64>, Vec<PathBuf>)>> {
        let mut schema = None;
        let mut settled = Vec::new();
        for &c in components {
            let live = self.live(c);
            let databases = match c {
                Component::Persistence if exists(&live) => vec![live],
                Component::Memory if live.is_dir() => {
                    let root = live.clone();
                    let candidates = blocking(move || {
                        sqlite_candidates(&root).map_err(|e| source_err(c, &root, e))
                    })
                    .await?;
                    candidates
                        .into_iter()
                        .filter(|f| read_header(f).is_ok_and(|h| verifier.handles(&h)))
                        .collect()
                }
                _ => Vec::new(),
            };
            for db in databases {
                let version = verifier.settle(c, &db).await?;
                if c == Component::Persistence {
                    schema = Some(version);
                }
                let wal = with_companions(&db).into_iter().nth(1);
                if wal.is_some_and(|w| std::fs::metadata(&w).is_ok_and(|m| m.len() > 0)) {
                    tracing::warn!(file = %db.display(), "the WAL is still there after a checkpoint; taking a regular safety backup");
                    return Ok(None);
                }
                settled.push(db);
            }
        }
        Ok(Some((schema, settled)))
    }
}

/// The entries of one live component and the live path of each file.
fn walk(
    live: &LiveData,
    c: Component,
) -> Result<(Vec<SnapshotEntry>, HashMap<ArchivePath, PathBuf>)> {
    let path = live.live(c);
    match c {
        Component::Persistence => {
            let meta = std::fs::metadata(&path).map_err(|e| source_err(c, &path, e))?;
            let archive = ArchivePath::parse(c.archive_root())
                .map_err(|e| Error::Internal(format!("archive root: {e}")))?;
            let entry = file_entry(archive.clone(), &meta);
            Ok((vec![entry], HashMap::from([(archive, path)])))
        }
        Component::Config => DirSource::file(c, path).walk_present(),
        Component::Memory | Component::Checkpoints => DirSource::dir(c, path).walk_present(),
    }
}

/// Copies `from` to `to` (0600, durably), for an item the swap cannot
/// rename into the backup (another filesystem, a mount point; a hard link
/// cannot cross either, and would share the live inode anyway).
fn copy_durably(from: &Path, to: &Path) -> io::Result<()> {
    let temp = fsio::temp_path_for(to);
    let guard = fsio::RemoveOnDrop::new(temp.clone());
    std::fs::copy(from, &temp)?;
    let file = std::fs::File::open(&temp)?;
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    file.sync_all()?;
    std::fs::rename(&temp, to)?;
    guard.disarm();
    Ok(())
}

/// Hashes the file at `path` through `buf` (one per thread: a fresh
/// buffer per file is a fresh mapping, faulted in, for each of thousands).
fn hash_file(path: &Path, buf: &mut [u8]) -> io::Result<(u64, backup_core::Sha256Digest)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256Hasher::new();
    let (mut size, mut released) = (0u64, 0u64);
    loop {
        let n = file.read(buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        if size - released >= RELEASE_EVERY {
            fsio::release_cached(&file, released, size - released);
            released = size;
        }
    }
    fsio::release_cached(&file, released, size - released);
    Ok((size, hasher.finish()))
}

/// Hashes `files` (path in the backup, file) on every allowed core, each
/// thread taking the next file as it is done (the database alone is most
/// of the bytes: fixed shares would leave a thread idle). The threads run
/// at a lower priority: the restore's critical path is staging the backup
/// and checking the staged database, and this hashing (of the live files
/// the swap moves into the safety backup) only has to be done by the swap,
/// so it takes the CPU time they leave.
async fn hash_all(
    files: Vec<(ArchivePath, Component, PathBuf)>,
) -> Result<HashMap<ArchivePath, (u64, backup_core::Sha256Digest)>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    type Hashed = Vec<(ArchivePath, (u64, backup_core::Sha256Digest))>;
    let workers = backup_core::compress::parallelism().max(1);
    let files = Arc::new(files);
    let next = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (files, next) = (Arc::clone(&files), Arc::clone(&next));
        let thread = std::thread::Builder::new()
            .name("synthorg-safety".into())
            .spawn(move || -> Result<Hashed> {
                fsio::lower_thread_priority();
                let mut out = Vec::new();
                let mut buf = vec![0u8; HASH_CHUNK];
                while let Some((path, c, file)) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let hashed = hash_file(file, &mut buf).map_err(|e| source_err(*c, file, e))?;
                    out.push((path.clone(), hashed));
                }
                Ok(out)
            })
            .map_err(|e| Error::Internal(format!("cannot start a hashing thread: {e}")))?;
        threads.push(thread);
    }
    blocking(move || {
        let mut all = HashMap::new();
        for thread in threads {
            let done = thread
                .join()
                .map_err(|_| Error::Internal("a hashing thread panicked".into()))?;
            all.extend(done?);
        }
        Ok(all)
    })
    .await
}

impl LiveData {
    /// See [`RestoreTarget::preserve`].
    pub(super) async fn preserve_into(
        &self,
        components: &[Component],
        dest: &Path,
    ) -> Result<Option<Preserved>> {
        let Some(verifier) = self.verifier.clone() else {
            return Ok(None); // databases cannot be settled
        };
        if self.server.is_some() && components.contains(&Component::Persistence) {
            return Ok(None); // a server database is dumped, not moved
        }
        let Some((db_schema_version, settled)) =
            self.settle_databases(&verifier, components).await?
        else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let me = self.clone();
        let comps = components.to_vec();
        let dest = dest.to_path_buf();
        let (entries, files, moved) = blocking(move || {
            use std::os::unix::fs::MetadataExt;
            let first = comps.first().copied().unwrap_or(Component::Persistence);
            fsio::create_dir_private(&dest).map_err(|e| source_err(first, &dest, e))?;
            let dest_dev = std::fs::metadata(&dest)
                .map_err(|e| source_err(first, &dest, e))?
                .dev();
            let (mut entries, mut files, mut moved) = (Vec::new(), Vec::new(), Vec::new());
            for &c in &comps {
                let live = me.live(c);
                // Renamed into the backup by the swap where a rename can:
                // the same filesystem, and not a mount point (swapped
                // entry by entry inside it).
                let movable = !is_mount_point(&live)
                    && std::fs::metadata(&live).is_ok_and(|m| m.dev() == dest_dev);
                if movable {
                    moved.push(c);
                    if c == Component::Config {
                        let config = dest.join(c.archive_root());
                        fsio::create_dir_private(&config).map_err(|e| source_err(c, &config, e))?;
                    }
                }
                let (walked, paths) = walk(&me, c)?;
                for entry in walked {
                    let Some(from) = paths.get(&entry.path) else {
                        entries.push(entry);
                        continue;
                    };
                    // The settled databases' -wal and -shm are empty or
                    // gone: not part of the data.
                    let companion = SQLITE_COMPANIONS.iter().any(|s| {
                        from.to_str()
                            .and_then(|p| p.strip_suffix(s))
                            .is_some_and(|main| settled.iter().any(|d| d.as_os_str() == main))
                    });
                    if companion {
                        continue;
                    }
                    if movable {
                        files.push((entry.path.clone(), c, from.clone()));
                    } else {
                        let mut to = dest.clone();
                        to.extend(entry.path.segments());
                        if let Some(parent) = to.parent() {
                            fsio::create_dir_private(parent)
                                .map_err(|e| source_err(c, parent, e))?;
                        }
                        copy_durably(from, &to).map_err(|e| source_err(c, from, e))?;
                        files.push((entry.path.clone(), c, to));
                    }
                    entries.push(entry);
                }
            }
            // Copies and the backup's directories durable before the swap.
            fsio::sync_filesystem(&dest).map_err(|e| source_err(first, &dest, e))?;
            Ok((entries, files, moved))
        })
        .await?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "safety backup: live items listed"
        );
        let hashes = hash_all(files).await?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            files = hashes.len(),
            "safety backup: live files hashed"
        );
        SwapFault::abort_at(self.fault, SwapFault::AbortAfterPreserve);
        let mut preserved = Preserved {
            moved,
            db_schema_version,
            ..Preserved::default()
        };
        for entry in entries {
            let owner = entry.owner;
            match entry.kind {
                EntryKind::File => {
                    let Some((size, sha256)) = hashes.get(&entry.path) else {
                        continue; // a companion left out above
                    };
                    preserved.files.push(FileEntry {
                        path: entry.path,
                        size: *size,
                        sha256: *sha256,
                        mode: Some(entry.mode),
                        mtime: Some(entry.mtime),
                        uid: owner.map(|o| o.0),
                        gid: owner.map(|o| o.1),
                    });
                }
                EntryKind::Dir => preserved.dirs.push(DirEntry {
                    path: entry.path,
                    mode: Some(entry.mode),
                    uid: owner.map(|o| o.0),
                    gid: owner.map(|o| o.1),
                }),
                EntryKind::Symlink(target) => preserved.symlinks.push(SymlinkEntry {
                    path: entry.path,
                    target,
                }),
            }
        }
        Ok(Some(preserved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of `path` in the page cache, as `fincore` (util-linux) sees them.
    fn resident(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
            .arg(path)
            .output()
            .expect("fincore (util-linux) runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    #[test]
    fn hashing_a_live_file_releases_its_cached_pages_and_hashes_every_byte() {
        // Beside the sources, not in /tmp: often a tmpfs.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("synthorg.db");
        let data: Vec<u8> = (0..20 * 1024 * 1024 + 12_345u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), data.len());
        // A tmpfs keeps its pages whatever the advice: they are the file.
        const TMPFS_MAGIC: u64 = 0x0102_1994;
        let on_tmpfs = rustix::fs::statfs(dir.path()).unwrap().f_type as u64 == TMPFS_MAGIC;
        assert!(resident(&path) > 0, "read, so cached");

        let mut buf = vec![0u8; HASH_CHUNK];
        let (size, sha256) = hash_file(&path, &mut buf).unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(sha256, backup_core::Sha256Digest::of(&data));
        // The old state moves into the safety backup: its pages are left
        // for the staged files to reuse instead of fresh ones.
        if !on_tmpfs {
            assert_eq!(resident(&path), 0, "every hashed page released");
        }
        assert_eq!(std::fs::read(&path).unwrap(), data, "nothing lost");
    }
}
