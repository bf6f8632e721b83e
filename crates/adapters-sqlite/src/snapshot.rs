//! Snapshots with `VACUUM INTO`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backup_core::ports::{
    ComponentSource, DatabaseVerifier, EntryKind, FileSnapshotter, Opened, SCRATCH_PREFIX,
    Snapshot, SnapshotEntry,
};
use backup_core::{ArchivePath, Component, Error, Result};
use sqlx::Connection;

use crate::{
    DEFAULT_BUSY_TIMEOUT, SQLITE_HEADER, check_header, connect, sqlx_error, user_version,
    verify_database,
};

/// Copies the live database at `source` to `dest` with `VACUUM INTO` on a
/// connection of its own, and returns how long that took.
async fn vacuum_into(
    component: Component,
    source: &Path,
    dest: &Path,
    busy_timeout: Duration,
) -> Result<Duration> {
    check_header(component, source).await?;
    let dest_text = dest.to_str().ok_or_else(|| Error::Source {
        component,
        path: dest.display().to_string(),
        reason: "scratch path is not UTF-8".into(),
        source: None,
    })?;
    let started = Instant::now();
    let mut conn = connect(component, source, false, busy_timeout).await?;
    // The scratch copy is read once and removed, never needed after a
    // crash: `VACUUM INTO` follows the connection's `synchronous`, and with
    // it off does not fsync the copy, whose hundreds of megabytes would
    // otherwise queue at the disk ahead of the app's own commits (a
    // synchronous=FULL writer waited up to 281 ms behind a bare VACUUM
    // INTO, bench/run). Put back before anything else can run on this
    // connection (closing it may checkpoint the live database).
    let result = match sqlx::query("PRAGMA synchronous = OFF")
        .execute(&mut conn)
        .await
    {
        Ok(_) => {
            // The path is ours (a scratch file), quoted as an SQL string literal.
            let sql = format!("VACUUM INTO '{}'", dest_text.replace('\'', "''"));
            let vacuumed = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await;
            let reset = sqlx::query("PRAGMA synchronous = FULL")
                .execute(&mut conn)
                .await;
            vacuumed.and(reset)
        }
        Err(e) => Err(e),
    };
    let _ = conn.close().await;
    result.map_err(|e| sqlx_error(component, source, &e))?;
    Ok(started.elapsed())
}

/// `PRAGMA quick_check` of a fresh snapshot copy (O(N), a fraction of
/// `VACUUM INTO`'s time, the copy still in the page cache): a copy that
/// fails it is never published in a backup. The full `integrity_check`
/// runs when the backup is verified or restored.
async fn quick_check(
    conn: &mut sqlx::SqliteConnection,
    component: Component,
    live: &Path,
) -> Result<()> {
    let rows: Vec<String> = sqlx::query_scalar("PRAGMA quick_check(20)")
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| sqlx_error(component, live, &e))?;
    if rows != ["ok"] {
        return Err(crate::db_error(
            component,
            live,
            crate::DbProblem::Corrupt,
            Some(format!(
                "the snapshot copy fails SQLite's quick_check ({}); nothing was published",
                rows.join("; ")
            )),
        ));
    }
    Ok(())
}

/// A scratch directory next to `near` (same filesystem as the live data).
pub(crate) fn scratch_dir(component: Component, near: &Path) -> Result<tempfile::TempDir> {
    let parent = near
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(SCRATCH_PREFIX)
        .tempdir_in(parent)
        .map_err(|e| Error::Source {
            component,
            path: parent.display().to_string(),
            reason: format!("cannot create a scratch directory: {e}"),
            source: Some(Box::new(e)),
        })
}

/// The persistence component: `synthorg.db`.
#[derive(Debug, Clone)]
pub struct SqliteSource {
    path: PathBuf,
    busy_timeout: Duration,
}

impl SqliteSource {
    /// Where the database goes in a backup.
    fn archive_path(&self) -> Result<ArchivePath> {
        let component = Component::Persistence;
        ArchivePath::parse(component.archive_root()).map_err(|e| Error::Source {
            component,
            path: self.path.display().to_string(),
            reason: e.to_string(),
            source: None,
        })
    }

    /// The live database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> SqliteSource {
        SqliteSource {
            path: path.into(),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
        }
    }

    /// How long to wait for a lock held by another process before failing
    /// with a "locked" error.
    pub fn with_busy_timeout(mut self, timeout: Duration) -> SqliteSource {
        self.busy_timeout = timeout;
        self
    }
}

#[async_trait]
impl ComponentSource for SqliteSource {
    fn component(&self) -> Component {
        Component::Persistence
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>> {
        let component = Component::Persistence;
        let scratch = scratch_dir(component, &self.path)?;
        let copy = scratch.path().join("synthorg.db");
        let took = vacuum_into(component, &self.path, &copy, self.busy_timeout).await?;
        let mut conn = connect(component, &copy, true, DEFAULT_BUSY_TIMEOUT).await?;
        let checked = quick_check(&mut conn, component, &self.path).await;
        let schema = match checked {
            Ok(()) => user_version(&mut conn, component, &copy).await,
            Err(e) => Err(e),
        };
        let _ = conn.close().await;
        let schema = schema?;
        let meta = tokio::fs::metadata(&copy)
            .await
            .map_err(|e| Error::Source {
                component,
                path: copy.display().to_string(),
                reason: e.to_string(),
                source: Some(Box::new(e)),
            })?;
        let live = tokio::fs::metadata(&self.path).await.ok();
        let live_mode = live.as_ref().map_or(0o600, |m| {
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777
        });
        let owner = live.as_ref().map(|m| {
            (
                std::os::unix::fs::MetadataExt::uid(m),
                std::os::unix::fs::MetadataExt::gid(m),
            )
        });
        tracing::info!(
            database = %self.path.display(),
            snapshot_bytes = meta.len(),
            vacuum_ms = took.as_millis() as u64,
            schema_version = schema,
            "database snapshot taken with VACUUM INTO (one read transaction; WAL writers were not blocked)"
        );
        let path = self.archive_path()?;
        Ok(Box::new(FileSnapshot::one(
            path,
            copy,
            (meta.len(), live_mode, owner),
            schema,
            scratch,
        )))
    }

    /// The live database itself, once its WAL is folded in: no one writes
    /// it (see the trait), so the copy `VACUUM INTO` makes for a running
    /// app (a full write and read of the database, its B-trees rebuilt) is
    /// not needed. A change while it is read fails the snapshot.
    async fn snapshot_settled(&self) -> Result<Box<dyn Snapshot>> {
        let component = Component::Persistence;
        if tokio::fs::symlink_metadata(&self.path).await.is_err() {
            return self.snapshot().await; // reports what is missing
        }
        let schema = crate::settle_database(component, &self.path).await?;
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        if tokio::fs::metadata(&wal).await.is_ok_and(|m| m.len() > 0) {
            tracing::warn!(database = %self.path.display(), "the WAL is still there after a checkpoint; copying the database with VACUUM INTO");
            return self.snapshot().await;
        }
        let meta = tokio::fs::metadata(&self.path)
            .await
            .map_err(|e| Error::Source {
                component,
                path: self.path.display().to_string(),
                reason: e.to_string(),
                source: Some(Box::new(e)),
            })?;
        let path = self.archive_path()?;
        tracing::info!(database = %self.path.display(), bytes = meta.len(), schema_version = schema,
            "database read in place (settled: no process has it open)");
        Ok(Box::new(FileSnapshot::in_place(
            path,
            self.path.clone(),
            &meta,
            schema,
        )))
    }
}

/// What tells that a file was written to: a writer changes its size, its
/// mtime or (always, even when it sets the mtime back) its ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileState {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileState {
    fn of(meta: &std::fs::Metadata) -> FileState {
        use std::os::unix::fs::MetadataExt;
        FileState {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A snapshot consisting of one file: a scratch copy, or the settled live
/// database read in place.
pub(crate) struct FileSnapshot {
    entries: Vec<SnapshotEntry>,
    file: PathBuf,
    schema: Option<i64>,
    scratch: Option<tempfile::TempDir>,
    /// Read in place: the file's state when the snapshot was taken, which
    /// must still be its state when it has been read.
    in_place: Option<FileState>,
}

impl FileSnapshot {
    /// The database copy `file` in `scratch`, served as `path` with
    /// (size, mode, owner), dated now, of schema version `schema`.
    pub(crate) fn one(
        path: ArchivePath,
        file: PathBuf,
        (size, mode, owner): (u64, u32, Option<(u32, u32)>),
        schema: i64,
        scratch: tempfile::TempDir,
    ) -> FileSnapshot {
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        FileSnapshot {
            entries: vec![SnapshotEntry {
                path,
                kind: EntryKind::File,
                size,
                mode,
                mtime,
                owner,
            }],
            file,
            schema: Some(schema),
            scratch: Some(scratch),
            in_place: None,
        }
    }

    /// The settled live database `file` (described by `meta`), served in
    /// place as `path` with its own mode, owner and mtime.
    fn in_place(path: ArchivePath, file: PathBuf, meta: &std::fs::Metadata, schema: i64) -> Self {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        FileSnapshot {
            entries: vec![SnapshotEntry {
                path,
                kind: EntryKind::File,
                size: meta.len(),
                mode: meta.permissions().mode() & 0o7777,
                mtime: meta.mtime(),
                owner: Some((meta.uid(), meta.gid())),
            }],
            file,
            schema: Some(schema),
            scratch: None,
            in_place: Some(FileState::of(meta)),
        }
    }
}

#[async_trait]
impl Snapshot for FileSnapshot {
    fn entries(&self) -> &[SnapshotEntry] {
        &self.entries
    }

    fn db_schema_version(&self) -> Option<i64> {
        self.schema
    }

    async fn open(&self, path: &ArchivePath) -> Result<Opened> {
        let err = |e: std::io::Error| Error::Source {
            component: Component::Persistence,
            path: path.to_string(),
            reason: e.to_string(),
            source: Some(Box::new(e)),
        };
        let file = tokio::fs::File::open(&self.file).await.map_err(err)?;
        let size = file.metadata().await.map_err(err)?.len();
        let file = file.into_std().await;
        // To the end: a file longer than its size is reported as changed.
        let stream = backup_core::buffers::read_chunks(file, u64::MAX);
        Ok(Opened { size, stream })
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        if let Some(before) = self.in_place {
            let now = tokio::fs::metadata(&self.file).await.ok();
            if now.as_ref().map(FileState::of) != Some(before) {
                return Err(Error::Source {
                    component: Component::Persistence,
                    path: self.file.display().to_string(),
                    reason: "the database changed while it was read in place: a process is writing it; stop the app and retry".into(),
                    source: None,
                });
            }
        }
        if let Some(dir) = self.scratch.take() {
            let path = dir.path().display().to_string();
            dir.close().map_err(|e| Error::Source {
                component: Component::Persistence,
                path,
                reason: format!("cannot remove scratch directory: {e}"),
                source: Some(Box::new(e)),
            })?;
        }
        Ok(())
    }
}

/// Consistent copies of SQLite files inside directory components.
#[derive(Debug, Clone, Copy, Default)]
pub struct SqliteSnapshotter;

#[async_trait]
impl FileSnapshotter for SqliteSnapshotter {
    fn handles(&self, header: &[u8]) -> bool {
        header.starts_with(SQLITE_HEADER)
    }

    async fn copy_consistent(
        &self,
        component: Component,
        source: &Path,
        dest: &Path,
    ) -> Result<()> {
        let took = vacuum_into(component, source, dest, DEFAULT_BUSY_TIMEOUT).await?;
        let mut conn = connect(component, dest, true, DEFAULT_BUSY_TIMEOUT).await?;
        let checked = quick_check(&mut conn, component, source).await;
        let _ = conn.close().await;
        checked?;
        tracing::debug!(file = %source.display(), vacuum_ms = took.as_millis() as u64, "SQLite file copied with VACUUM INTO");
        Ok(())
    }
}

#[async_trait]
impl DatabaseVerifier for SqliteSnapshotter {
    fn handles(&self, header: &[u8]) -> bool {
        header.starts_with(SQLITE_HEADER)
    }

    async fn settle(&self, component: Component, path: &Path) -> Result<i64> {
        crate::settle_database(component, path).await
    }

    async fn verify(
        &self,
        component: Component,
        path: &Path,
        expected_schema: Option<i64>,
    ) -> Result<i64> {
        // A PostgreSQL deployment's persistence is a pg_dump archive: it
        // is checked readable here; its schema when restored.
        if component == Component::Persistence && crate::file_starts_with(path, b"PGDMP").await {
            crate::postgres::check_dump(path).await?;
            return Ok(expected_schema.unwrap_or_default());
        }
        verify_database(component, path, expected_schema).await
    }
}
