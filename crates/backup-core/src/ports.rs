//! Ports: the traits through which the core reaches the outside world.
//!
//! Adapters implement them (`adapters-fs`, `adapters-sqlite`, `adapters-s3`);
//! the host picks the implementations at start-up. Every port is usable as a
//! trait object (`Arc<dyn BackupStore>`), since targets are chosen at run
//! time. Data moves as [`ByteStream`]s with bounded buffers: no port hands
//! a whole archive to memory.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::config::Compression;
use crate::error::{Error, Result};
use crate::id::{BackupId, Component};
use crate::manifest::{DirEntry, FileEntry, Manifest, Summary, SymlinkEntry};
use crate::path::ArchivePath;

/// Name prefix of the scratch directories that sources create next to the
/// live data for consistent copies; `recover` removes leftovers by it.
pub const SCRATCH_PREFIX: &str = ".synthorg-snapshot-";

/// A stream of byte chunks; an `Err` item ends it.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// One object of a backup in a store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ObjectName {
    /// The archive of a compressed backup (`<id>.tar.gz` / `<id>.tar.zst`).
    Archive(Compression),
    /// The age-encrypted archive of an encrypted backup (`<id>.tar.gz.age`,
    /// `<id>.tar.zst.age`, `<id>.tar.age` uncompressed).
    SealedArchive(Compression),
    /// A file of a directory-form backup (`<id>/<path>`).
    File(ArchivePath),
    /// `manifest.json` inside a directory-form backup (`<id>/manifest.json`).
    InnerManifest,
    /// The digests of an archive's members (`<id>.pieces`, see
    /// [`PieceDigest`](crate::manifest::PieceDigest)).
    Pieces,
}

impl ObjectName {
    /// The archive object of a backup stored as `compression`, encrypted
    /// or not.
    pub fn archive(compression: Compression, encrypted: bool) -> ObjectName {
        if encrypted {
            ObjectName::SealedArchive(compression)
        } else {
            ObjectName::Archive(compression)
        }
    }
}

/// A backup's sidecar manifest as the store holds it.
#[derive(Debug, Clone)]
pub enum Sidecar {
    /// In the clear, parsed and validated.
    Clear(Box<Manifest>),
    /// Encrypted (`<id>.manifest.json.age`): the age file, and the
    /// recipients its summary names (for messages).
    Sealed {
        /// The age file.
        bytes: Vec<u8>,
        /// Who it was encrypted to, as far as the summary says.
        recipients: Vec<String>,
    },
}

/// One entry of [`BackupStore::list`].
#[derive(Debug, Clone)]
pub enum Listed {
    /// A published backup, as its summary.
    Complete(Box<Summary>),
    /// A sidecar that exists but cannot be read or validated.
    Damaged {
        /// The id from the sidecar's name.
        id: BackupId,
        /// Why it is damaged.
        reason: String,
    },
}

impl Listed {
    /// The backup's id.
    pub fn id(&self) -> &BackupId {
        match self {
            Listed::Complete(m) => &m.id,
            Listed::Damaged { id, .. } => id,
        }
    }

    /// The backup's summary when it is one that a backup run took: complete,
    /// and not a restore's safety backup, which holds the state the restore
    /// replaced (counted as a success, it would hide failing or overdue
    /// backups behind a restore, and postpone the next scheduled one).
    pub fn succeeded(&self) -> Option<&Summary> {
        match self {
            Listed::Complete(s) if s.id.trigger() != crate::id::Trigger::PreRestore => Some(s),
            _ => None,
        }
    }
}

/// Where backups are kept: a local directory or an S3 prefix.
///
/// # Contract
/// - A backup is *published* once its sidecar `<id>.manifest.json` exists:
///   [`publish`](BackupStore::publish) is the commit point and must be
///   atomic (a reader sees the whole sidecar or none). Before that, the
///   backup's objects are invisible to [`list`](BackupStore::list) and
///   [`manifest`](BackupStore::manifest).
/// - Objects written with [`put`](BackupStore::put) are durable when `put`
///   returns (fsynced, or acknowledged by the server).
/// - Keys are derived only from validated [`BackupId`]s and
///   [`ArchivePath`]s; foreign keys under the location are ignored.
/// - Error messages never contain credentials.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait BackupStore: Debug + Send + Sync + 'static {
    /// Where this store is, for messages and logs, e.g. `/var/backups` or
    /// `s3://bucket/prefix`. Never contains secrets.
    fn location(&self) -> String;

    /// All published backups, newest first: every backup with a sidecar,
    /// described by its small summary object (or, when that is missing,
    /// by the sidecar itself). One that cannot be read is returned as
    /// [`Listed::Damaged`] instead of failing the listing; foreign and
    /// incomplete entries are skipped.
    ///
    /// # Errors
    /// Only when the location itself cannot be listed (missing bucket,
    /// permission denied, unreachable).
    async fn list(&self) -> Result<Vec<Listed>>;

    /// The sidecar manifest of a published backup: parsed and validated
    /// when in the clear, the age file when encrypted (the service
    /// decrypts it).
    ///
    /// # Errors
    /// `NotFound` when there is no sidecar; `Manifest` when it is invalid.
    async fn sidecar(&self, id: &BackupId) -> Result<Sidecar>;

    /// The sidecar manifest of a published backup in the clear.
    ///
    /// # Errors
    /// As [`sidecar`](BackupStore::sidecar); `Key` for an encrypted one.
    async fn manifest(&self, id: &BackupId) -> Result<Manifest> {
        match self.sidecar(id).await? {
            Sidecar::Clear(m) => Ok(*m),
            Sidecar::Sealed { .. } => Err(Error::Key {
                id: id.to_string(),
                reason: "its manifest is encrypted".into(),
            }),
        }
    }

    /// Writes one object of an unpublished backup, streaming, and returns
    /// the number of bytes written. Overwrites an object of the same name.
    /// On error or when the returned future is dropped, no partial object
    /// remains under the final name.
    ///
    /// # Errors
    /// `Store` naming the key (disk full, permission denied, network).
    async fn put(&self, id: &BackupId, object: &ObjectName, data: ByteStream) -> Result<u64>;

    /// Reads one object, streaming.
    ///
    /// # Errors
    /// `NotFound` when the object does not exist; `Store` otherwise.
    async fn get(&self, id: &BackupId, object: &ObjectName) -> Result<ByteStream>;

    /// Publishes the backup: writes its summary (`<id>.summary.json`), then
    /// the sidecar manifest, the commit point. Each write is atomic.
    ///
    /// # Errors
    /// `Store` naming the key; the backup then stays unpublished.
    async fn publish(&self, manifest: &Manifest) -> Result<()>;

    /// Deletes a backup: the sidecar first (so it stops being listed), then
    /// its data. Idempotent for the data part.
    ///
    /// # Errors
    /// `NotFound` when no sidecar and no data exist for `id`; `Store` on failure.
    async fn delete(&self, id: &BackupId) -> Result<()>;

    /// Removes every object of an unpublished backup (abort path). Missing
    /// objects are not an error.
    ///
    /// # Errors
    /// `Store` when objects exist but cannot be removed.
    async fn discard(&self, id: &BackupId) -> Result<()>;

    /// The status record (`_status.json` at the location), if any.
    ///
    /// # Errors
    /// `Store` when it exists but cannot be read.
    async fn read_status(&self) -> Result<Option<Vec<u8>>>;

    /// Replaces the status record atomically. Callers hold the lock.
    ///
    /// # Errors
    /// `Store` naming the key.
    async fn write_status(&self, bytes: Vec<u8>) -> Result<()>;

    /// Removes leftovers of interrupted backups (objects without a sidecar,
    /// temp files) and returns what was removed. Must not remove objects of
    /// a backup that is being written by a lock holder: callers hold the
    /// [`OperationLock`].
    ///
    /// # Errors
    /// `Store` when the location cannot be listed.
    async fn cleanup_incomplete(&self) -> Result<Vec<String>>;

    /// The local directory that holds the directory form of backup `id`,
    /// when this store keeps backups on a local filesystem; `None`
    /// otherwise. A restore target may fill it directly
    /// ([`RestoreTarget::preserve`]); the backup is then finished with
    /// `put(InnerManifest)` and [`publish`](BackupStore::publish) as usual,
    /// or [`discard`](BackupStore::discard)ed.
    fn local_dir(&self, _id: &BackupId) -> Option<std::path::PathBuf> {
        None
    }

    /// Positional reads of `object` of backup `id`, where this store can
    /// do them cheaply (a local file): a later backup copies unchanged
    /// compressed members from it. `None` where it cannot, or when the
    /// object is not there.
    async fn open_ranges(&self, _id: &BackupId, _object: &ObjectName) -> Option<Box<dyn ReadAt>> {
        None
    }

    /// Whether [`open_ranges`](BackupStore::open_ranges) can serve this
    /// store's archives. Only then does a backup record the digests of its
    /// members (hashing every piece twice and writing the pieces object):
    /// elsewhere no later backup could copy them.
    fn reads_ranges(&self) -> bool {
        false
    }
}

/// Reads at any offset of an object, from any thread (blocking).
pub trait ReadAt: Debug + Send + Sync {
    /// Fills `buf` from `offset`.
    ///
    /// # Errors
    /// The read failed or the object ends before `offset + buf.len()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// Where the swap puts the live items it replaces: a safety backup's
/// directory, for the components [`Preserved::moved`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The backup's directory (`<dir>/<archive path>`).
    pub dir: std::path::PathBuf,
    /// The components whose live items are renamed into it.
    pub components: Vec<Component>,
}

/// What [`RestoreTarget::preserve`] made: the entries of a directory-form
/// backup of the live data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preserved {
    /// Components whose live items the swap renames into the backup's
    /// directory (same filesystem): their entries are described (hashed in
    /// place) but not there yet. The others were copied in already.
    pub moved: Vec<Component>,
    /// Regular files, hashed.
    pub files: Vec<FileEntry>,
    /// Directories.
    pub dirs: Vec<DirEntry>,
    /// Symlinks (inside their component).
    pub symlinks: Vec<SymlinkEntry>,
    /// `user_version` of the database, when it is among the components.
    pub db_schema_version: Option<i64>,
}

/// One listing of an [`ObjectSpace`]'s root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootListing {
    /// Objects directly at the root, with their sizes in bytes.
    pub objects: Vec<(String, u64)>,
    /// Directories (common prefixes) directly at the root.
    pub dirs: Vec<String>,
}

/// The answer of [`ObjectSpace::read_small`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Small {
    /// The object's bytes.
    Found(Vec<u8>),
    /// No such object.
    Missing,
    /// The object is larger than the limit (its size).
    TooLarge(u64),
}

/// Raw named objects: what a store medium offers, under which
/// [`Layout`](crate::layout::Layout) implements the store layout and its
/// commit protocol once. Names are `/`-separated and come only from the
/// layout (validated ids and archive paths).
#[async_trait]
pub trait ObjectSpace: Debug + Send + Sync + 'static {
    /// Where the objects are, for messages; never contains secrets.
    fn location(&self) -> String;

    /// What is directly at the root.
    ///
    /// # Errors
    /// `Store` when the root cannot be listed.
    async fn list_root(&self) -> Result<RootListing>;

    /// A small object, refused above `limit` bytes.
    ///
    /// # Errors
    /// `Store` when it exists but cannot be read.
    async fn read_small(&self, name: &str, limit: usize) -> Result<Small>;

    /// Replaces a small object atomically; durable when it returns.
    ///
    /// # Errors
    /// `Store` naming the object.
    async fn write_small(&self, name: &str, bytes: Vec<u8>) -> Result<()>;

    /// Writes an object from a stream, atomically (no partial object under
    /// `name`, even when the future is dropped) and durably; returns the
    /// bytes written.
    ///
    /// # Errors
    /// `Store` naming the object.
    async fn put(&self, name: &str, data: ByteStream) -> Result<u64>;

    /// Writes an object like [`put`](ObjectSpace::put), atomically, but
    /// durable only after the next [`settle`](ObjectSpace::settle): the
    /// thousands of files of a directory-form backup, whose one commit
    /// point is its publication (an fsync of each file and its directory
    /// was most of such a backup's time).
    ///
    /// # Errors
    /// `Store` naming the object.
    async fn put_unsettled(&self, name: &str, data: ByteStream) -> Result<u64> {
        self.put(name, data).await
    }

    /// Makes every object written with
    /// [`put_unsettled`](ObjectSpace::put_unsettled) durable.
    ///
    /// # Errors
    /// `Store` when that cannot be done.
    async fn settle(&self) -> Result<()> {
        Ok(())
    }

    /// Reads an object; `None` when it does not exist.
    ///
    /// # Errors
    /// `Store` when it exists but cannot be opened.
    async fn get(&self, name: &str) -> Result<Option<ByteStream>>;

    /// Removes an object, or a directory and everything under it; whether
    /// anything existed. Durable when it returns.
    ///
    /// # Errors
    /// `Store` naming the object.
    async fn remove(&self, name: &str) -> Result<bool>;

    /// Removes what interrupted writes of this space left (temp files,
    /// unfinished uploads): those of backup `id`, or all when `None`;
    /// returns what was removed.
    ///
    /// # Errors
    /// `Store` when leftovers exist but cannot be removed.
    async fn remove_partial(&self, id: Option<&BackupId>) -> Result<Vec<String>>;

    /// The local path of object (or directory) `name`, for a space on a
    /// local filesystem.
    fn local_path(&self, _name: &str) -> Option<std::path::PathBuf> {
        None
    }

    /// Positional reads of object `name`, where cheap (see
    /// [`BackupStore::open_ranges`]).
    async fn open_ranges(&self, _name: &str) -> Option<Box<dyn ReadAt>> {
        None
    }

    /// Whether [`open_ranges`](ObjectSpace::open_ranges) can succeed here.
    fn reads_ranges(&self) -> bool {
        false
    }

    /// Whether the layout keeps its listing cache (`_index.json`) here:
    /// worth it where reading one object per backup is slow (S3).
    fn keeps_index(&self) -> bool {
        false
    }
}

/// What a mutating operation is, for lock holders and `Busy` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Creating a backup.
    Backup,
    /// Restoring a backup.
    Restore,
    /// Deleting a backup.
    Delete,
    /// Running retention.
    Prune,
    /// Recovering after a crash.
    Recover,
}

impl Operation {
    /// Lower-case verb, e.g. `restore`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Backup => "backup",
            Operation::Restore => "restore",
            Operation::Delete => "delete",
            Operation::Prune => "prune",
            Operation::Recover => "recover",
        }
    }
}

/// A held lock. Dropping it releases the lock too (best effort); call
/// [`release`](LockGuard::release) to learn whether that worked.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait LockGuard: Debug + Send + Sync {
    /// Releases the lock.
    ///
    /// # Errors
    /// `Store` when the release could not be recorded (the lock then expires
    /// or is found stale).
    async fn release(self: Box<Self>) -> Result<()>;
}

/// One mutating operation at a time per target, across processes.
///
/// # Contract
/// [`try_acquire`](OperationLock::try_acquire) never waits for another
/// holder: it succeeds at once or fails with `Busy` naming the holder. A
/// lock left by a dead process is released by the OS (flock) or is
/// detectably stale (expired lease) and taken over.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait OperationLock: Debug + Send + Sync + 'static {
    /// Takes the lock for `operation`.
    ///
    /// # Errors
    /// `Busy` when held by someone else; `Store` when the lock cannot be
    /// read or written.
    async fn try_acquire(&self, operation: Operation) -> Result<Box<dyn LockGuard>>;
}

/// What kind of entry a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file of `size` bytes.
    File,
    /// A directory.
    Dir,
    /// A symbolic link with a relative target inside its component.
    Symlink(String),
}

/// One entry of a component snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Path inside the backup, e.g. `memory/vectors/seg-1.bin`.
    pub path: ArchivePath,
    /// File, directory or link.
    pub kind: EntryKind,
    /// Size in bytes (files only; 0 otherwise).
    pub size: u64,
    /// Unix permission bits.
    pub mode: u32,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    /// Owner (uid, gid) of the live item, when known.
    pub owner: Option<(u32, u32)>,
}

/// A file of a snapshot, opened for reading.
pub struct Opened {
    /// Exactly how many bytes `stream` yields (may differ from the entry's
    /// size when the file legitimately changed between listing and opening).
    pub size: u64,
    /// The content.
    pub stream: ByteStream,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// A consistent snapshot of one component, ready to be streamed into a backup.
///
/// # Contract
/// `entries` are sorted by path and cover the whole component (the entry
/// sizes are for progress totals). A file opened with
/// [`open`](Snapshot::open) yields exactly [`Opened::size`] bytes; if the
/// source changes while it is read, the stream ends with an error naming
/// the file. [`finish`](Snapshot::finish) removes temp copies; it also
/// happens on drop, best effort.
#[async_trait]
pub trait Snapshot: Send + Sync {
    /// Entries in path order.
    fn entries(&self) -> &[SnapshotEntry];

    /// `PRAGMA user_version` of the snapshotted database (persistence only).
    fn db_schema_version(&self) -> Option<i64>;

    /// The component's source does not exist (a directory never created):
    /// the backup records it as absent instead of as an empty component.
    fn absent(&self) -> bool {
        false
    }

    /// The content of a file entry.
    ///
    /// # Errors
    /// `Source` naming the file when it cannot be opened.
    async fn open(&self, path: &ArchivePath) -> Result<Opened>;

    /// Releases temp files.
    ///
    /// # Errors
    /// `Source` when cleanup fails (logged by callers, never fatal).
    async fn finish(self: Box<Self>) -> Result<()>;
}

/// Reads one component of the live data consistently.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait ComponentSource: Debug + Send + Sync + 'static {
    /// Which component this is.
    fn component(&self) -> Component;

    /// Whether the component must be snapshotted while its writer is paused
    /// through [`Quiesce`] (memory).
    fn needs_quiesce(&self) -> bool {
        self.component() == Component::Memory
    }

    /// Takes a consistent snapshot.
    ///
    /// # Errors
    /// `Source` naming the path: missing database, not SQLite, locked or
    /// corrupt, permission denied.
    async fn snapshot(&self) -> Result<Box<dyn Snapshot>>;

    /// A snapshot of a source no one writes now (the caller made sure, as a
    /// restore does before its safety backup: no process holds the live
    /// files, the operation lock is held): it may read the live files in
    /// place instead of copying them first, and fails when they change
    /// while it is read. The same as [`snapshot`](Self::snapshot) unless a
    /// source knows better.
    ///
    /// # Errors
    /// As `snapshot`; `Source` when the files changed while they were read.
    async fn snapshot_settled(&self) -> Result<Box<dyn Snapshot>> {
        self.snapshot().await
    }
}

/// Makes a consistent copy of a live file that a byte copy could tear, such
/// as a SQLite database inside `memory/`. Directory sources ask it about
/// every regular file (by header, not by name).
#[async_trait]
pub trait FileSnapshotter: Debug + Send + Sync + 'static {
    /// Whether a file starting with `header` (up to its first 100 bytes)
    /// needs this snapshotter.
    fn handles(&self, header: &[u8]) -> bool;

    /// Writes a consistent copy of `source` to `dest` (which must not exist).
    ///
    /// # Errors
    /// `Source` naming `source` (locked, corrupt, unreadable).
    async fn copy_consistent(
        &self,
        component: Component,
        source: &std::path::Path,
        dest: &std::path::Path,
    ) -> Result<()>;
}

/// Pauses and resumes the writer of a component (memory) around its snapshot.
///
/// # Contract
/// [`pause`](Quiesce::pause) returns once the writer is at a safe point and
/// stays paused until [`resume`](Quiesce::resume). `resume` is synchronous,
/// never blocks and is idempotent, so that a guard can call it on drop:
/// after an error, a panic or a cancellation alike.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait Quiesce: Debug + Send + Sync + 'static {
    /// Pauses the writer.
    ///
    /// # Errors
    /// `Source` when the writer cannot be paused.
    async fn pause(&self) -> Result<()>;

    /// Resumes the writer.
    fn resume(&self);
}

/// A [`Quiesce`] for hosts without a memory writer to pause.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoQuiesce;

#[async_trait]
impl Quiesce for NoQuiesce {
    async fn pause(&self) -> Result<()> {
        Ok(())
    }

    fn resume(&self) {}
}

/// Delivers events (webhooks, a command). Never fails and never fails the
/// operation: delivery problems are the notifier's to log. Bounded in time
/// by the notifier's own timeouts and retries.
#[async_trait]
pub trait Notifier: Debug + Send + Sync + 'static {
    /// Delivers `event` to every configured receiver that wants it.
    async fn notify(&self, event: &crate::status::Event);
}

/// A [`Notifier`] that sends nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoNotifier;

#[async_trait]
impl Notifier for NoNotifier {
    async fn notify(&self, _: &crate::status::Event) {}
}

/// Time, so that the domain never reads the clock itself.
#[async_trait]
pub trait Clock: Debug + Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;

    /// Completes after `duration` (used for timeouts and the scheduler).
    async fn sleep(&self, duration: Duration);
}

/// Receives the content of a backup as it is read and verified (restore
/// staging, export, or nothing for `verify`).
///
/// # Contract
/// Calls come in archive order: for a file, `file_start`, any number of
/// `file_data`, then `file_end` only once its size and sha256 matched the
/// manifest. When the read fails midway, no further call comes and the
/// caller discards what the sink received.
#[async_trait]
pub trait EntrySink: Send {
    /// A directory.
    ///
    /// # Errors
    /// `Store`/`Source` when it cannot be created.
    async fn dir(&mut self, entry: &DirEntry) -> Result<()>;

    /// A symlink, whose target stays inside its component.
    ///
    /// # Errors
    /// `Store`/`Source` when it cannot be created.
    async fn symlink(&mut self, entry: &SymlinkEntry) -> Result<()>;

    /// A file begins.
    ///
    /// # Errors
    /// `Store`/`Source` when it cannot be created.
    async fn file_start(&mut self, entry: &FileEntry) -> Result<()>;

    /// Bytes of the current file.
    ///
    /// # Errors
    /// `Store`/`Source` when they cannot be written (e.g. disk full).
    async fn file_data(&mut self, data: &[u8]) -> Result<()>;

    /// Bytes of the current file, owned: a large file's chunks come this
    /// way (the same chunk is hashed on another thread), so a sink that
    /// hands data to a thread of its own takes it without a copy.
    ///
    /// # Errors
    /// As [`EntrySink::file_data`], which it defaults to.
    async fn file_bytes(&mut self, data: bytes::Bytes) -> Result<()> {
        self.file_data(&data).await
    }

    /// The current file is complete and verified.
    ///
    /// # Errors
    /// `Store`/`Source` when it cannot be finished.
    async fn file_end(&mut self, entry: &FileEntry) -> Result<()>;
}

/// An [`EntrySink`] that keeps nothing (verification only).
#[derive(Debug, Default, Clone, Copy)]
pub struct DiscardSink;

#[async_trait]
impl EntrySink for DiscardSink {
    async fn dir(&mut self, _: &DirEntry) -> Result<()> {
        Ok(())
    }

    async fn symlink(&mut self, _: &SymlinkEntry) -> Result<()> {
        Ok(())
    }

    async fn file_start(&mut self, _: &FileEntry) -> Result<()> {
        Ok(())
    }

    async fn file_data(&mut self, _: &[u8]) -> Result<()> {
        Ok(())
    }

    async fn file_end(&mut self, _: &FileEntry) -> Result<()> {
        Ok(())
    }
}

/// Checks nothing: for hosts without checks of their own (the content is
/// still verified against the manifest by the reader).
#[async_trait]
impl ContentCheck for DiscardSink {
    async fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Live data that a restore replaces: staging next to it, an all-or-nothing
/// swap, and recovery of an interrupted swap.
///
/// # Contract
/// Staging lives on the same filesystem as each live component, so the swap
/// is a handful of renames. [`Staging::commit`] writes a fsynced journal
/// first; whenever the process dies, [`recover`](RestoreTarget::recover)
/// leaves the live data exactly as before the swap or exactly as restored,
/// never a mix.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait RestoreTarget: Debug + Send + Sync + 'static {
    /// Where a component lives, for reports.
    fn live_path(&self, component: Component) -> String;

    /// Whether a component has live data now (a fresh install has none, and
    /// its safety backup then covers only what exists).
    async fn is_present(&self, component: Component) -> bool;

    /// Refuses when another process (or this one) holds a live SQLite file
    /// of `components` open: the database, its `-wal`/`-shm`/`-journal`,
    /// and the SQLite files under `memory/`. A restore swapping them would
    /// lose every later commit of that process. Called before staging and
    /// again right before the swap.
    ///
    /// # Errors
    /// `InUse` naming the file and, where known, the pid.
    async fn check_not_in_use(&self, components: &[Component]) -> Result<()>;

    /// A sink that runs the checks a restore's staging runs (each SQLite
    /// file's `integrity_check`, the database's schema, the config's YAML)
    /// on a backup's content as it is read, in a scratch place, without
    /// touching live data: `verify` and `restore --dry-run` use it, so that
    /// "intact" means "would restore".
    ///
    /// # Errors
    /// `Source` when the scratch place cannot be created.
    async fn content_check(&self, manifest: &Manifest) -> Result<Box<dyn ContentCheck>>;

    /// Creates an empty staging area for `components` of `manifest`'s backup.
    ///
    /// # Errors
    /// `Source` when it cannot be created (permissions, disk full).
    async fn stage(
        &self,
        manifest: &Manifest,
        components: &[Component],
    ) -> Result<Box<dyn Staging>>;

    /// Rolls back (or finishes, if it had committed) an interrupted swap and
    /// removes staging and aside leftovers. Returns what it did.
    ///
    /// # Errors
    /// `Source` when the journal cannot be read or a rename fails.
    async fn recover(&self) -> Result<Vec<String>>;

    /// Prepares the live items of `components` to become the content of a
    /// directory-form backup in `dest` (`dest/<archive path>`, created
    /// 0700) without copying data: SQLite databases are settled first
    /// (see [`DatabaseVerifier::settle`]) so that each file alone is
    /// consistent, and every file is hashed where it is; a component on
    /// the same filesystem as `dest` is then renamed into it by the swap
    /// ([`Staging::commit`] with [`Kept`]), any other is copied in now.
    /// Called under the lock, after
    /// [`check_not_in_use`](RestoreTarget::check_not_in_use), with the app
    /// stopped. The caller publishes the backup once the swap committed
    /// (or discards it). `None` when this target cannot (no database
    /// checker, a WAL that would not fold): the caller takes a regular
    /// backup instead.
    ///
    /// # Errors
    /// `Source` naming the item that could not be settled, linked or read.
    async fn preserve(
        &self,
        _components: &[Component],
        _dest: &std::path::Path,
    ) -> Result<Option<Preserved>> {
        Ok(None)
    }
}

/// Checks a backup's content as it streams past (see
/// [`RestoreTarget::content_check`]). A failing check is an `Integrity`
/// error naming the file in the backup.
#[async_trait]
pub trait ContentCheck: EntrySink + Send {
    /// Ends the check and removes the scratch place.
    ///
    /// # Errors
    /// `Integrity` for a check that could only fail at the end.
    async fn finish(self: Box<Self>) -> Result<()>;
}

/// A staging area being filled with a backup's content.
#[async_trait]
pub trait Staging: EntrySink + Send {
    /// Checks the staged components: SQLite `integrity_check` and schema
    /// version, YAML parses, expected layout. Applies modes and mtimes.
    ///
    /// # Errors
    /// `Integrity`/`Source` naming the staged file that fails.
    async fn verify(&mut self) -> Result<()>;

    /// Swaps the staged components into place, all or nothing. With
    /// `keep`, the replaced live items of its components go into its
    /// directory (the safety backup [`RestoreTarget::preserve`] prepared)
    /// instead of being deleted.
    ///
    /// # Errors
    /// `Source` when a step fails; everything done so far is rolled back
    /// before returning.
    async fn commit(self: Box<Self>, keep: Option<&Kept>) -> Result<()>;

    /// Removes the staging area; live data is untouched.
    ///
    /// # Errors
    /// `Source` when files cannot be removed (the next `recover` retries).
    async fn discard(self: Box<Self>) -> Result<()>;
}

/// A database on a server (PostgreSQL) that a restore replaces by renaming
/// databases, in the same journal as the file moves.
///
/// # Contract
/// Every method blocks: the restore target calls them from blocking
/// threads (the journaled swap is synchronous), never from an async task.
/// `rename` and `drop_database` act on names the journal recorded; the
/// journal checks `exists` first, so each step can be repeated.
pub trait ServerDatabase: Debug + Send + Sync + 'static {
    /// The live database's name.
    fn name(&self) -> &str;

    /// Whether a restore may replace the live database now.
    ///
    /// # Errors
    /// `InUse` naming the other sessions connected to it; `Source` when
    /// this role may not create databases (nothing is downloaded then) or
    /// the server cannot be reached.
    fn check_restorable(&self) -> Result<()>;

    /// Creates database `staging` and restores the dump file `dump` into
    /// it (`pg_restore`), then checks that its schema version is
    /// `expected_schema` (when given).
    ///
    /// # Errors
    /// `Source` naming the tool, the database and what failed.
    fn restore_into(
        &self,
        staging: &str,
        dump: &std::path::Path,
        expected_schema: Option<i64>,
    ) -> Result<()>;

    /// Whether database `name` exists.
    ///
    /// # Errors
    /// When the server cannot be asked.
    fn exists(&self, name: &str) -> std::io::Result<bool>;

    /// Renames database `from` to `to`.
    ///
    /// # Errors
    /// When the server refuses (e.g. a session is connected to `from`).
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()>;

    /// Drops database `name` if it exists.
    ///
    /// # Errors
    /// When the server refuses.
    fn drop_database(&self, name: &str) -> std::io::Result<()>;

    /// Databases a restore staged and never swapped in
    /// (`<name>__restore_…`): leftovers of an interrupted restore.
    ///
    /// # Errors
    /// When the server cannot be asked.
    fn staging_leftovers(&self) -> std::io::Result<Vec<String>>;
}

/// Checks a staged SQLite database (implemented by the SQLite adapter).
#[async_trait]
pub trait DatabaseVerifier: Debug + Send + Sync + 'static {
    /// Whether a file starting with `header` is a database to check.
    fn handles(&self, header: &[u8]) -> bool;

    /// Makes a live database's main file the whole database (its WAL
    /// checkpointed into it and removed, a hot journal rolled back), as
    /// the app does when it opens it; returns its `user_version`. Only
    /// while no other process has it open.
    ///
    /// # Errors
    /// `Source` naming the file (not SQLite, locked, corrupt).
    async fn settle(&self, component: Component, path: &std::path::Path) -> Result<i64>;

    /// `PRAGMA integrity_check` = ok and, when given, `user_version` equal
    /// to `expected_schema`. Returns the schema version.
    ///
    /// # Errors
    /// `Source` naming the file and the problem.
    async fn verify(
        &self,
        component: Component,
        path: &std::path::Path,
        expected_schema: Option<i64>,
    ) -> Result<i64>;
}
