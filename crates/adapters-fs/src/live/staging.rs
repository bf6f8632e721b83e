//! [`FsStaging`]: a staging area next to the live data (or inside a
//! mounted component), filled with a backup's verified content.

use super::writer::{Flusher, Job};
use super::*;

/// A staging area being filled.
pub(super) struct FsStaging {
    pub(super) live: LiveData,
    pub(super) manifest: Manifest,
    pub(super) roots: Vec<(Component, PathBuf)>,
    /// The live location of each component restored, symlinks resolved
    /// once (not for each of its files).
    pub(super) live_roots: Vec<(Component, PathBuf)>,
    /// Components swapped inside their mount point, entry by entry.
    pub(super) inside: Vec<Component>,
    pub(super) dir_modes: Vec<(PathBuf, u32)>,
    /// The staging database a server database was restored into.
    pub(super) db_staging: Option<String>,
    /// Create, write and finish the staged items: each file whole on one
    /// of them, in turn (file creation is kernel work that two threads do
    /// side by side).
    pub(super) writers: Vec<StageWriter>,
    /// The file being staged.
    pub(super) current: Option<Current>,
    /// The staged SQLite database's checks, started as soon as it is
    /// written (it comes first), so they overlap the rest of the staging.
    pub(super) db_check: Option<tokio::task::JoinHandle<Result<()>>>,
    /// The filesystems staged on, each once: a directory on it and the
    /// component first staged there (`layout::staging_filesystems`).
    pub(super) filesystems: Vec<(Component, PathBuf)>,
    /// Writeback of the staged files as they are written.
    pub(super) flusher: Option<Flusher>,
    /// Its last round, started once they are all written (see `verify`);
    /// awaited, errors and all, by `commit`.
    pub(super) flushing: Option<tokio::task::JoinHandle<Result<()>>>,
    /// The staged memory files that are SQLite databases (known from their
    /// first bytes as they are staged: no walk of thousands of segments to
    /// find them).
    pub(super) memory_dbs: Vec<PathBuf>,
}

/// Data gathered for one file before its writer gets it whole: a small
/// file (most of a restore's thousands) is then created, written and
/// finished by a single job, one hand-off instead of three.
const GATHER: usize = 256 * 1024;

/// The file being staged.
pub(super) struct Current {
    c: Component,
    path: PathBuf,
    /// Its path in the backup.
    archive: String,
    /// The owner it gets (looked up once per file).
    owner: Option<(u32, u32)>,
    writer: usize,
    /// Its data so far, while it is gathered; `None` once its writer has
    /// created it and gets the rest as it comes.
    gathered: Option<Vec<u8>>,
    /// Its first [`HEADER_LEN`] bytes, for a memory file.
    head: Option<Vec<u8>>,
}

impl FsStaging {
    /// Waits for every writer; the first error.
    async fn finish_writers(&mut self) -> Result<()> {
        let mut first = Ok(());
        for w in &mut self.writers {
            let done = w.finish().await;
            if first.is_ok() {
                first = done;
            }
        }
        first
    }

    /// The writer for a file at `path`: the one of its directory, so that
    /// two writers do not contend for one directory's lock (creating
    /// entries in one directory is serialised by the kernel anyway).
    fn writer_for(&self, path: &Path) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        path.parent().hash(&mut h);
        (h.finish() % self.writers.len().max(1) as u64) as usize
    }

    fn writer(&mut self, i: usize) -> Result<&mut StageWriter> {
        self.writers
            .get_mut(i)
            .ok_or_else(|| Error::Internal("no staging writer".into()))
    }
}

impl FsStaging {
    /// For the SQLite database (`c` persistence, staged at `staged`):
    /// starts its checks once the writer hands over the finished file, and
    /// its writeback meanwhile, so that the `syncfs` before the swap finds
    /// it on disk already. The sender to hand the file over with, when it
    /// started them.
    fn start_db_check(
        &mut self,
        c: Component,
        staged: PathBuf,
    ) -> Option<tokio::sync::oneshot::Sender<std::fs::File>> {
        if c != Component::Persistence || self.live.server.is_some() || self.db_check.is_some() {
            return None;
        }
        let verifier = self.live.verifier.clone()?;
        let expected = self.manifest.db_schema_version;
        let (written, finished) = tokio::sync::oneshot::channel::<std::fs::File>();
        self.db_check = Some(tokio::spawn(async move {
            let file = finished
                .await
                .map_err(|_| Error::Internal("the staged database was not finished".into()))?;
            // Its errors surface at the syncfs before the swap.
            let flushing = tokio::task::spawn_blocking(move || file.sync_data());
            let checked = verifier.verify(c, &staged, expected).await;
            tracing::debug!(path = %staged.display(), ok = checked.is_ok(), "staged database checked");
            let _ = flushing.await;
            checked.map(|_| ())
        }));
        Some(written)
    }

    fn root(&self, c: Component) -> Result<&Path> {
        self.roots
            .iter()
            .find(|(rc, _)| *rc == c)
            .map(|(_, p)| p.as_path())
            .ok_or_else(|| self.refuse(c.archive_root(), "component is not being restored"))
    }

    fn refuse(&self, path: &str, reason: &str) -> Error {
        refusal(&self.manifest, path, reason)
    }

    /// The owner a restored item gets: that of the live item it replaces,
    /// else the one recorded in the backup, else that of the live
    /// component. Restoring as root must not leave the app (running as
    /// its own user) unable to write its data.
    fn owner_for(
        &self,
        c: Component,
        path: &ArchivePath,
        recorded: Option<(u32, u32)>,
    ) -> Option<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        let root = self.live_root(c);
        let live = self.live_counterpart(c, path);
        let owner_of = |p: &Path| {
            std::fs::symlink_metadata(p)
                .ok()
                .map(|m| (m.uid(), m.gid()))
        };
        owner_of(&live).or(recorded).or_else(|| owner_of(&root))
    }

    /// Where component `c` lives.
    fn live_root(&self, c: Component) -> PathBuf {
        self.live_roots
            .iter()
            .find(|(rc, _)| *rc == c)
            .map_or_else(|| self.live.live(c), |(_, p)| p.clone())
    }

    /// The live item an archive path of component `c` replaces.
    fn live_counterpart(&self, c: Component, path: &ArchivePath) -> PathBuf {
        let mut live = self.live_root(c);
        if matches!(c, Component::Memory | Component::Checkpoints) {
            live.extend(path.segments().skip(1));
        }
        live
    }

    /// Where an archive path goes in staging.
    fn staged_path(&self, path: &ArchivePath) -> Result<(Component, PathBuf)> {
        let c = path
            .component()
            .ok_or_else(|| self.refuse(path.as_str(), "outside every component"))?;
        let root = self.root(c)?.to_path_buf();
        let mut segments = path.segments().skip(1);
        match c {
            Component::Persistence => Ok((c, root)),
            Component::Config => match (segments.next(), segments.next()) {
                (Some(_name), None) => Ok((c, root)),
                _ => Err(self.refuse(
                    path.as_str(),
                    "config/ must hold exactly one file, the company config",
                )),
            },
            Component::Memory | Component::Checkpoints => {
                let mut p = root;
                p.extend(segments);
                Ok((c, p))
            }
        }
    }
}

/// Bytes of the file being staged, as the reader has them.
enum Chunk<'a> {
    Borrowed(&'a [u8]),
    /// Handed to the writer as they are (no copy).
    Owned(bytes::Bytes),
}

impl Chunk<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Borrowed(data) => data,
            Chunk::Owned(data) => data,
        }
    }
}

impl FsStaging {
    /// Gathers a small file's data for one job, else passes it to the
    /// file's writer.
    async fn data(&mut self, data: Chunk<'_>) -> Result<()> {
        let Some(current) = self.current.as_mut() else {
            return Err(Error::Internal("file data outside a file".into()));
        };
        let writer = current.writer;
        if let Some(head) = current.head.as_mut()
            && head.len() < HEADER_LEN
        {
            let slice = data.as_slice();
            head.extend_from_slice(&slice[..slice.len().min(HEADER_LEN - head.len())]);
        }
        let job: Job = match current.gathered.as_mut() {
            Some(gathered) if gathered.len() + data.as_slice().len() <= GATHER => {
                gathered.extend_from_slice(data.as_slice());
                return Ok(());
            }
            // Too large to gather: its writer creates it now and writes
            // the rest as it comes.
            Some(gathered) => {
                let mut first = std::mem::take(gathered);
                first.extend_from_slice(data.as_slice());
                current.gathered = None;
                let (c, path) = (current.c, current.path.clone());
                let twice = refusal(&self.manifest, &current.archive, "written twice");
                Box::new(move |open| {
                    use std::io::Write;
                    let mut file = create_staged(c, &path, twice)?;
                    file.write_all(&first)
                        .map_err(|e| source_err(c, &path, e))?;
                    open.file = Some((file, path, c));
                    Ok(())
                })
            }
            None => {
                let data = match data {
                    Chunk::Borrowed(data) => bytes::Bytes::copy_from_slice(data),
                    Chunk::Owned(data) => data,
                };
                Box::new(move |open| {
                    use std::io::Write;
                    let Some((file, path, c)) = open.file.as_mut() else {
                        return Err(Error::Internal("file data outside a file".into()));
                    };
                    file.write_all(&data).map_err(|e| source_err(*c, path, e))
                })
            }
        };
        self.writer(writer)?.run(job).await
    }
}

#[async_trait]
impl EntrySink for FsStaging {
    async fn dir(&mut self, entry: &DirEntry) -> Result<()> {
        if entry.path.component() == Some(Component::Config) {
            return Ok(()); // the config component is staged as its one file
        }
        let (c, path) = self.staged_path(&entry.path)?;
        let owner = self.owner_for(c, &entry.path, entry.uid.zip(entry.gid));
        self.dir_modes
            .push((path.clone(), entry.mode.unwrap_or(DIR_MODE)));
        self.writer(0)?
            .run(Box::new(move |_| {
                std::fs::create_dir_all(&path)
                    .and_then(|()| set_owner(&path, owner))
                    .map_err(|e| source_err(c, &path, e))
            }))
            .await
    }

    async fn symlink(&mut self, entry: &SymlinkEntry) -> Result<()> {
        let (c, path) = self.staged_path(&entry.path)?;
        if contained_target(&entry.path, Path::new(&entry.target)).is_none() {
            return Err(self.refuse(entry.path.as_str(), "symlink points outside its component"));
        }
        let target = entry.target.clone();
        self.writer(0)?
            .run(Box::new(move |_| {
                fsio::create_symlink_blocking(&target, &path).map_err(|e| source_err(c, &path, e))
            }))
            .await
    }

    async fn file_start(&mut self, entry: &FileEntry) -> Result<()> {
        let (c, path) = self.staged_path(&entry.path)?;
        let owner = self.owner_for(c, &entry.path, entry.uid.zip(entry.gid));
        self.current = Some(Current {
            c,
            archive: entry.path.as_str().to_owned(),
            writer: self.writer_for(&path),
            path,
            owner,
            // Sized once: grown by doubling, the last step of a file near
            // GATHER would be a fresh mapping above malloc's threshold.
            gathered: Some(Vec::with_capacity(
                usize::try_from(entry.size).map_or(GATHER, |n| n.min(GATHER)),
            )),
            head: (c == Component::Memory).then(|| Vec::with_capacity(HEADER_LEN)),
        });
        Ok(())
    }

    async fn file_data(&mut self, data: &[u8]) -> Result<()> {
        self.data(Chunk::Borrowed(data)).await
    }

    async fn file_bytes(&mut self, data: bytes::Bytes) -> Result<()> {
        self.data(Chunk::Owned(data)).await
    }

    async fn file_end(&mut self, entry: &FileEntry) -> Result<()> {
        let Some(current) = self.current.take() else {
            return Err(Error::Internal("file end outside a file".into()));
        };
        let Current {
            c,
            path,
            owner,
            writer,
            gathered,
            head,
            ..
        } = current;
        if let (Some(head), Some(v)) = (head, &self.live.verifier)
            && v.handles(&head)
        {
            self.memory_dbs.push(path.clone());
        }
        if let Some(flusher) = self.flusher.as_mut() {
            flusher.finished(entry.size);
        }
        let (mode, mtime) = (entry.mode, entry.mtime);
        let early = self.start_db_check(c, path.clone());
        let twice = self.refuse(entry.path.as_str(), "written twice");
        self.writer(writer)?
            .run(Box::new(move |open| {
                let (file, path, c) = match gathered {
                    Some(data) => {
                        use std::io::Write;
                        let mut file = create_staged(c, &path, twice)?;
                        file.write_all(&data).map_err(|e| source_err(c, &path, e))?;
                        (file, path, c)
                    }
                    None => open
                        .file
                        .take()
                        .ok_or_else(|| Error::Internal("file end outside a file".into()))?,
                };
                // Made durable all at once before the swap (see `commit`).
                fsio::finish_file_blocking(&file, mode, mtime)
                    .and_then(|()| set_file_owner(&file, &path, owner))
                    .map_err(|e| source_err(c, &path, e))?;
                if let Some(written) = early {
                    tracing::debug!(path = %path.display(), "staged database written; checking it");
                    let _ = written.send(file);
                }
                Ok(())
            }))
            .await
    }
}

/// Makes the staging's `filesystems` durable (`syncfs`, each once).
fn sync_filesystems(filesystems: &[(Component, PathBuf)]) -> Result<()> {
    for (c, dir) in filesystems {
        fsio::sync_filesystem(dir).map_err(|e| source_err(*c, dir, e))?;
    }
    Ok(())
}

/// The error refusing the backup's entry at `path` for `reason`.
fn refusal(manifest: &Manifest, path: &str, reason: &str) -> Error {
    Error::Integrity {
        id: manifest.id.to_string(),
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Creates the staged file at `path`; `twice` when it exists already.
fn create_staged(c: Component, path: &Path, twice: Error) -> Result<std::fs::File> {
    fsio::create_new_file_blocking(path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => twice,
        _ => source_err(c, path, e),
    })
}

#[async_trait]
impl Staging for FsStaging {
    async fn verify(&mut self) -> Result<()> {
        // Everything queued is on disk (not yet durable) first.
        self.finish_writers().await?;
        // The last writeback starts now, while the staged database's checks
        // may still run: the `syncfs` before the swap then finds little to
        // do. Errors count: the swap's own `syncfs` would not report one
        // that happened before it opened the filesystem.
        self.flushing = self.flusher.take().map(Flusher::finish);
        for (c, root) in self.roots.clone() {
            match c {
                Component::Persistence if let Some(server) = self.live.server.clone() => {
                    if !exists(&root) {
                        return Err(
                            self.refuse(backup_core::path::PGDUMP_FILE, "missing from the backup")
                        );
                    }
                    let name = format!(
                        "{}__restore_{}",
                        server.name(),
                        self.manifest.timestamp.timestamp()
                    );
                    self.db_staging = Some(name.clone());
                    let expected = self.manifest.db_schema_version;
                    blocking(move || {
                        server.restore_into(&name, &root, expected)?;
                        // The staging database holds it now.
                        fsio::remove_any(&root).map_err(|e| source_err(c, &root, e))
                    })
                    .await?;
                }
                Component::Persistence => {
                    if !exists(&root) {
                        return Err(self.refuse("synthorg.db", "missing from the backup"));
                    }
                    if let Some(check) = self.db_check.take() {
                        check.await.map_err(|e| {
                            Error::Internal(format!("checking the staged database: {e}"))
                        })??;
                    } else if let Some(v) = &self.live.verifier {
                        v.verify(c, &root, self.manifest.db_schema_version).await?;
                    }
                }
                Component::Config => {
                    if !exists(&root) {
                        return Err(
                            self.refuse("config/", "the company config is missing from the backup")
                        );
                    }
                    let problem = crate::check::company_config_problem(&root)
                        .await
                        .map_err(|e| source_err(c, &root, e))?;
                    if let Some(reason) = problem {
                        return Err(self.refuse("config/", &reason));
                    }
                }
                Component::Memory => {
                    if let Some(v) = self.live.verifier.clone() {
                        for file in std::mem::take(&mut self.memory_dbs) {
                            drop_stale_companions(c, &file)?;
                            v.verify(c, &file, None).await?;
                        }
                    }
                }
                Component::Checkpoints => {}
            }
        }
        // Directory modes last (deepest first), so that read-only
        // directories did not stop their files from being written.
        let mut modes = std::mem::take(&mut self.dir_modes);
        modes.sort_by_key(|(dir, _)| std::cmp::Reverse(dir.components().count()));
        blocking(move || {
            for (dir, mode) in modes {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| source_err(Component::Memory, &dir, e))?;
            }
            Ok(())
        })
        .await
    }

    async fn commit(mut self: Box<Self>, keep: Option<&Kept>) -> Result<()> {
        if let Some(flushing) = self.flushing.take() {
            flushing
                .await
                .map_err(|e| Error::Internal(format!("writing the staging back: {e}")))??;
        }
        let keep = keep.cloned();
        let live = self.live.clone();
        let roots = self.roots.clone();
        let filesystems = self.filesystems.clone();
        let inside = self.inside.clone();
        let backup_id = self.manifest.id.to_string();
        let journal_path = live.journal_path();
        let fault = live.fault;
        let db_staging = self.db_staging.clone();
        let stamp = self.manifest.timestamp.timestamp();
        blocking(move || {
            // Staged files durable before the journal can make them live:
            // one syncfs per filesystem instead of an fsync per file.
            sync_filesystems(&filesystems)?;
            let mut journal = Journal {
                backup_id,
                state: JournalState::Swapping,
                moves: Vec::new(),
                cleanup: Vec::new(),
                db: None,
            };
            for (c, staged) in roots {
                if let (Component::Persistence, Some(server), Some(staged_db)) =
                    (c, live.server(), db_staging.clone())
                {
                    let name = server.name().to_owned();
                    let aside = format!("{name}__aside_{stamp}");
                    // Any database of that name is a leftover (we hold the
                    // lock): the journal must not mistake it for live data.
                    server
                        .drop_database(&aside)
                        .map_err(|e| source_err(c, Path::new(&aside), e))?;
                    journal.db = Some(DbMove {
                        live: name,
                        aside,
                        staged: staged_db,
                    });
                    continue;
                }
                if inside.contains(&c) {
                    let root = live.live(c);
                    let aside = root.join(INSIDE_ASIDE);
                    let err = |p: &Path, e| source_err(c, p, e);
                    fsio::remove_any(&aside).map_err(|e| err(&aside, e))?;
                    fsio::create_dir_private(&aside).map_err(|e| err(&aside, e))?;
                    journal.moves.extend(
                        inside_moves(c, &root, &staged, &aside).map_err(|e| err(&root, e))?,
                    );
                    journal.cleanup.extend([staged, aside]);
                    continue;
                }
                // The main item goes into the safety backup where one
                // takes it (see `preserve`), under its archive path.
                let kept_at =
                    keep.as_ref()
                        .filter(|k| k.components.contains(&c))
                        .map(|k| match c {
                            Component::Config => {
                                let name = live.configured(c).file_name().unwrap_or_default();
                                k.dir.join(c.archive_root()).join(name)
                            }
                            _ => k.dir.join(c.archive_root()),
                        });
                for (i, item) in live.live_items(c).into_iter().enumerate() {
                    let kept = kept_at.clone().filter(|_| i == 0);
                    journal.moves.push(Move {
                        component: c,
                        keep: kept.is_some() && exists(&item),
                        aside: exists(&item).then(|| kept.unwrap_or_else(|| sibling(&item, ASIDE))),
                        staged: (i == 0).then(|| staged.clone()),
                        live: item,
                    });
                }
            }
            swap(&journal_path, &journal, fault, live.server()).map_err(SwapError::into_error)?;
            SwapFault::abort_at(fault, SwapFault::AbortAfterCommit);
            Ok(())
        })
        .await
    }

    async fn discard(mut self: Box<Self>) -> Result<()> {
        let roots = self.roots.clone();
        let server = self.live.server.clone();
        let db_staging = self.db_staging.take();
        if let Some(check) = self.db_check.take() {
            check.abort();
        }
        if let Some(flusher) = self.flusher.take() {
            flusher.abandon().await; // before removing what it writes back
        }
        if let Some(flushing) = self.flushing.take() {
            let _ = flushing.await;
        }
        // Stop writing before removing (its error no longer matters).
        let _ = self.finish_writers().await;
        drop(self);
        blocking(move || {
            for (c, root) in roots {
                fsio::remove_any(&root).map_err(|e| source_err(c, &root, e))?;
            }
            if let (Some(server), Some(name)) = (server, db_staging) {
                server
                    .drop_database(&name)
                    .map_err(|e| source_err(Component::Persistence, Path::new(&name), e))?;
            }
            Ok(())
        })
        .await
    }
}
