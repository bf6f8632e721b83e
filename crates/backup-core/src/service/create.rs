//! Creating a backup: snapshot each component, stream it as tar through
//! compression into the store while hashing, then publish the manifest.
//!
//! Stages run concurrently: the producer (snapshots → tar) feeds a bounded
//! channel; compression runs on the blocking pool; the store consumes the
//! compressed stream. Memory use is bounded by the channel and the number of
//! compression blocks in flight, whatever the data size.

use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{BackupService, CreateOptions, Phase, Progress, with_timeout};
use crate::archive::{self, TarKind};
use crate::config::Compression;
use crate::digest::{Blake3Digest, Sha256Digest, Sha256Hasher};
use crate::error::{Error, Result};
use crate::id::{BackupId, Component, Trigger};
use crate::manifest::{
    ArchiveInfo, DirEntry, FileEntry, Manifest, ManifestVersion, PieceDigest, SymlinkEntry,
    tree_checksum,
};
use crate::path::{ArchivePath, MANIFEST_FILE};
use crate::ports::{
    BackupStore, ByteStream, ComponentSource, EntryKind, Listed, ObjectName, Opened, Quiesce,
    SnapshotEntry,
};

/// Chunks of tar stream in flight between the producer and compression.
const CHANNEL_DEPTH: usize = 4;

/// Everything the producer learned, to build the manifest.
#[derive(Debug, Default)]
pub(super) struct Produced {
    pub(super) files: Vec<FileEntry>,
    pub(super) dirs: Vec<DirEntry>,
    pub(super) symlinks: Vec<SymlinkEntry>,
    pub(super) db_schema_version: Option<i64>,
    /// Components whose source does not exist.
    pub(super) absent: Vec<Component>,
}

/// Where the producer sends entries: a tar stream, or the store file by file.
enum Sink<'a> {
    Tar(mpsc::Sender<io::Result<Bytes>>),
    Dir {
        store: &'a dyn BackupStore,
        id: &'a BackupId,
    },
}

/// Resumes the paused writer when dropped: after success, errors, panics
/// and cancellation alike.
struct ResumeOnDrop<'a>(&'a dyn Quiesce);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

impl Sink<'_> {
    async fn send(&self, bytes: Bytes) -> Result<()> {
        match self {
            Sink::Tar(tx) => tx
                .send(Ok(bytes))
                .await
                .map_err(|_| Error::Cancelled("archive stream (the store stopped reading)".into())),
            Sink::Dir { .. } => Ok(()),
        }
    }

    /// Stores one file and returns its size and hash.
    async fn file(
        &self,
        entry: &SnapshotEntry,
        opened: Opened,
        component: Component,
    ) -> Result<(u64, Sha256Digest)> {
        let declared = opened.size;
        let changed = |done: u64| Error::Source {
            component,
            path: entry.path.to_string(),
            reason: format!(
                "file changed while being read ({done} bytes read, {declared} expected)"
            ),
            source: None,
        };
        match self {
            Sink::Tar(_) => {
                let header = archive::entry_header(
                    entry.path.as_str(),
                    &TarKind::File,
                    declared,
                    entry.mode,
                    entry.mtime,
                )
                .map_err(|e| source_err(component, &entry.path, e))?;
                self.send(Bytes::from(header)).await?;
                let mut hasher = Sha256Hasher::new();
                let mut done = 0u64;
                let mut stream = opened.stream;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| source_err(component, &entry.path, e))?;
                    done += chunk.len() as u64;
                    if done > declared {
                        return Err(changed(done));
                    }
                    hasher.update(&chunk);
                    self.send(chunk).await?;
                }
                if done != declared {
                    return Err(changed(done));
                }
                self.send(Bytes::from_static(archive::padding(declared)))
                    .await?;
                Ok((declared, hasher.finish()))
            }
            Sink::Dir { store, id } => {
                let state = Arc::new(Mutex::new((Sha256Hasher::new(), 0u64)));
                let tap = Arc::clone(&state);
                let stream: ByteStream = opened
                    .stream
                    .inspect(move |chunk| {
                        if let (Ok(chunk), Ok(mut s)) = (chunk, tap.lock()) {
                            s.0.update(chunk);
                            s.1 += chunk.len() as u64;
                        }
                    })
                    .boxed();
                let written = store
                    .put(id, &ObjectName::File(entry.path.clone()), stream)
                    .await?;
                let (hasher, done) = state
                    .lock()
                    .map(|s| (s.0.clone(), s.1))
                    .map_err(|_| Error::Internal("hashing state poisoned".into()))?;
                if done != declared || written != declared {
                    return Err(changed(done));
                }
                Ok((declared, hasher.finish()))
            }
        }
    }

    async fn dir_or_link(
        &self,
        entry: &SnapshotEntry,
        kind: TarKind,
        component: Component,
    ) -> Result<()> {
        if let Sink::Tar(_) = self {
            let header =
                archive::entry_header(entry.path.as_str(), &kind, 0, entry.mode, entry.mtime)
                    .map_err(|e| source_err(component, &entry.path, e))?;
            self.send(Bytes::from(header)).await?;
        }
        Ok(())
    }
}

fn source_err(component: Component, path: &ArchivePath, e: io::Error) -> Error {
    Error::Source {
        component,
        path: path.to_string(),
        reason: e.to_string(),
        source: Some(Box::new(e)),
    }
}

/// What passed through a tap: its size, and (per tap) its sha256 or the
/// offsets of its chunks (each chunk of a compressed stream is one member).
#[derive(Debug, Default)]
struct ArchiveStats {
    hasher: Option<Sha256Hasher>,
    size: u64,
    members: Option<Vec<u64>>,
}

/// Counts a stream as it passes, hashing it (the stored object) or
/// recording its member offsets (the compressed stream).
fn tap(input: ByteStream, hash: bool, members: bool) -> (ByteStream, Arc<Mutex<ArchiveStats>>) {
    let stats = Arc::new(Mutex::new(ArchiveStats {
        hasher: hash.then(Sha256Hasher::default),
        size: 0,
        members: members.then(Vec::new),
    }));
    let tapped = Arc::clone(&stats);
    let stream = input
        .inspect(move |item| {
            if let (Ok(chunk), Ok(mut s)) = (item, tapped.lock()) {
                let offset = s.size;
                if let Some(m) = s.members.as_mut() {
                    m.push(offset);
                }
                if let Some(h) = s.hasher.as_mut() {
                    h.update(chunk);
                }
                s.size += chunk.len() as u64;
            }
        })
        .boxed();
    (stream, stats)
}

fn taken(stats: &Mutex<ArchiveStats>) -> Result<ArchiveStats> {
    stats
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .map_err(|_| Error::Internal("archive statistics poisoned".into()))
}

impl BackupService {
    pub(super) async fn create_locked(
        &self,
        trigger: Trigger,
        options: &CreateOptions,
    ) -> Result<Manifest> {
        let timestamp = self.ports.clock.now();
        let (id, sequence) = self.next_id(trigger, timestamp).await?;
        self.create_as(&id, sequence, timestamp, options).await
    }

    /// Creates the backup `id` (the caller holds the lock).
    pub(super) async fn create_as(
        &self,
        id: &BackupId,
        sequence: u64,
        timestamp: chrono::DateTime<chrono::Utc>,
        options: &CreateOptions,
    ) -> Result<Manifest> {
        let id = id.clone();
        let store = self.ports.store.as_ref();
        // A crashed earlier run may have left objects under this id.
        store.discard(&id).await?;
        tracing::info!(backup_id = %id, store = %store.location(), compression = %self.settings.compression, "backup started");
        let result = self
            .build_and_publish(&id, sequence, timestamp, options)
            .await;
        match &result {
            Ok(m) => tracing::info!(backup_id = %id, size_bytes = m.size_bytes,
                archive_bytes = m.stored_bytes(), "backup published"),
            Err(e) => {
                tracing::error!(backup_id = %id, error = %e, "backup failed");
                if let Err(d) = store.discard(&id).await {
                    tracing::error!(backup_id = %id, error = %d, "removing the partial backup failed; the next run removes it");
                }
            }
        }
        result
    }

    async fn build_and_publish(
        &self,
        id: &BackupId,
        sequence: u64,
        timestamp: chrono::DateTime<chrono::Utc>,
        options: &CreateOptions,
    ) -> Result<Manifest> {
        let compression = self.settings.compression;
        let store = self.ports.store.as_ref();
        let encrypt_to = self.settings.encrypt_to.clone().map_err(|(key, reason)| {
            Error::Config(crate::config::ConfigError::Invalid { key, reason })
        })?;
        let manifest = if compression == Compression::None && encrypt_to.is_none() {
            let sink = Sink::Dir { store, id };
            let produced = self.produce(id, &sink, options).await?;
            let manifest = self.manifest(id, sequence, timestamp, produced, options, None);
            self.put_inner_manifest(&manifest).await?;
            manifest
        } else {
            let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_DEPTH);
            let tar = crate::crypt::receiver_stream(rx);
            let level = options
                .compression_level
                .or(self.settings.compression_level);
            // Unencrypted archives in a store that reads them by ranges
            // (local disk) record each member's digests, and copy the
            // members of the newest earlier archive with the same content.
            // Elsewhere (S3) no later backup could copy them: neither the
            // digests (every piece hashed twice) nor the pieces object.
            let digests = (encrypt_to.is_none() && store.reads_ranges())
                .then(|| Arc::new(Mutex::new(Vec::new())));
            let reuse = match digests {
                Some(_) => self.reuse_source(compression).await.map(Arc::new),
                None => None,
            };
            let compressed =
                crate::compress::compress(tar, compression, level, reuse.clone(), digests.clone());
            // Member offsets refer to the compressed stream; the hash and
            // size to what is stored (after encryption, when encrypting).
            let members = compression != Compression::None;
            let (archive, stats, inner) = match &encrypt_to {
                None => {
                    let (archive, stats) = tap(compressed, true, members);
                    (archive, stats, None)
                }
                Some(recipients) => {
                    let (compressed, inner) = tap(compressed, false, members);
                    let sealed = crate::crypt::encrypt(compressed, recipients.clone());
                    let (archive, stats) = tap(sealed, true, false);
                    (archive, stats, Some(inner))
                }
            };
            let producer = async {
                let sink = Sink::Tar(tx);
                let result = self
                    .produce_archive(id, sequence, timestamp, &sink, options)
                    .await;
                if let (Err(e), Sink::Tar(tx)) = (&result, &sink) {
                    // Make the store abort instead of storing a truncated archive.
                    let _ = tx
                        .send(Err(io::Error::other(format!("backup aborted: {e}"))))
                        .await;
                }
                result
            };
            let object = ObjectName::archive(compression, encrypt_to.is_some());
            let upload = store.put(id, &object, archive);
            let (produced, uploaded) = futures::join!(producer, upload);
            match (produced, uploaded) {
                (Err(e), _) if !matches!(e, Error::Cancelled(_)) => return Err(e),
                (_, Err(e)) => return Err(e),
                (Err(e), Ok(_)) => return Err(e),
                (Ok(mut m), Ok(written)) => {
                    let stats = taken(&stats)?;
                    if written != stats.size {
                        return Err(Error::Store {
                            location: store.location(),
                            key: id.to_string(),
                            reason: format!(
                                "stored {written} bytes of a {}-byte archive",
                                stats.size
                            ),
                            source: None,
                        });
                    }
                    let inner = inner.as_deref().map(taken).transpose()?;
                    let members = inner.as_ref().map_or(stats.members, |i| i.members.clone());
                    let pieces = match &digests {
                        Some(list) => list
                            .lock()
                            .map(|mut l| std::mem::take(&mut *l))
                            .map_err(|_| Error::Internal("piece digests poisoned".into()))?,
                        None => Vec::new(),
                    };
                    if let Some(reuse) = &reuse {
                        let used = reuse.stats();
                        tracing::info!(backup_id = %id, reused_members = used.members,
                            reused_bytes = used.bytes, members = pieces.len(),
                            damaged_members = used.damaged,
                            "members copied from the earlier archive instead of compressed again");
                    }
                    let members = members.unwrap_or_default();
                    let pieces = match digests {
                        Some(_) => Some(self.put_pieces(id, &pieces, members.len()).await?),
                        None => None,
                    };
                    m.archive = Some(ArchiveInfo {
                        sha256: stats.hasher.unwrap_or_default().finish(),
                        size_bytes: stats.size,
                        members,
                        inner_size_bytes: inner.map(|i| i.size),
                        pieces,
                    });
                    m
                }
            }
        };
        manifest.validate().map_err(|source| Error::Manifest {
            id: id.to_string(),
            source,
        })?;
        self.report(options, id, Phase::Finish, 0, 0, 0, 0);
        store.publish(&manifest).await?;
        Ok(manifest)
    }

    /// Stores the digests of the archive's `members` members as the
    /// backup's pieces object; returns its BLAKE3 for the manifest.
    async fn put_pieces(
        &self,
        id: &BackupId,
        pieces: &[PieceDigest],
        members: usize,
    ) -> Result<Blake3Digest> {
        if pieces.len() != members {
            return Err(Error::Internal(format!(
                "{} piece digests for {members} members",
                pieces.len()
            )));
        }
        let bytes = Bytes::from(PieceDigest::encode(pieces));
        let digest = Blake3Digest::of(&bytes);
        let len = bytes.len() as u64;
        let written = self
            .ports
            .store
            .put(
                id,
                &ObjectName::Pieces,
                futures::stream::once(async move { Ok(bytes) }).boxed(),
            )
            .await?;
        if written != len {
            return Err(Error::Store {
                location: self.ports.store.location(),
                key: id.to_string(),
                reason: format!("stored {written} bytes of a {len}-byte pieces object"),
                source: None,
            });
        }
        Ok(digest)
    }

    /// The member digests of backup `id`'s archive, checked against the
    /// manifest's digest of them; `None` when missing, unreadable or not
    /// matching (then nothing is reused from it).
    async fn read_pieces(
        &self,
        id: &BackupId,
        expected: &Blake3Digest,
        members: usize,
    ) -> Option<Vec<PieceDigest>> {
        let mut stream = self.ports.store.get(id, &ObjectName::Pieces).await.ok()?;
        let want = members.checked_mul(PieceDigest::SIZE)?;
        let mut bytes = Vec::with_capacity(want);
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.ok()?);
            if bytes.len() > want {
                break;
            }
        }
        if bytes.len() != want || Blake3Digest::of(&bytes) != *expected {
            tracing::warn!(backup_id = %id, "the pieces object does not match its manifest; compressing everything");
            return None;
        }
        PieceDigest::decode(&bytes)
    }

    /// The members a new archive may copy: those of the latest complete
    /// unencrypted backup in the store with the same compression, when the
    /// store reads it by ranges (local disk). `None` (compress everything)
    /// when there is none or anything about it fails: reuse only saves
    /// work, it never decides whether a backup succeeds.
    async fn reuse_source(&self, compression: Compression) -> Option<crate::compress::Reuse> {
        let store = self.ports.store.as_ref();
        let listed = store.list().await.ok()?;
        let latest = listed
            .iter()
            .filter_map(|l| match l {
                Listed::Complete(s) if s.compression == compression && !s.encrypted => Some(s),
                _ => None,
            })
            .max_by_key(|s| (s.sequence, s.id.clone()))?;
        // First what a store without positional reads (S3) says no to,
        // before downloading the manifest.
        let source = store
            .open_ranges(&latest.id, &ObjectName::archive(compression, false))
            .await?;
        let manifest = store.manifest(&latest.id).await.ok()?;
        let info = manifest.archive.as_ref()?;
        let digest = info.pieces.as_ref()?;
        let pieces = self
            .read_pieces(&latest.id, digest, info.members.len())
            .await?;
        crate::compress::Reuse::new(latest.id.to_string(), info, &pieces, source)
    }

    /// Produces the whole tar stream: components, `manifest.json`, end marker.
    async fn produce_archive(
        &self,
        id: &BackupId,
        sequence: u64,
        timestamp: chrono::DateTime<chrono::Utc>,
        sink: &Sink<'_>,
        options: &CreateOptions,
    ) -> Result<Manifest> {
        let produced = self.produce(id, sink, options).await?;
        let manifest = self.manifest(id, sequence, timestamp, produced, options, None);
        let json = manifest.to_json().map_err(|source| Error::Manifest {
            id: id.to_string(),
            source,
        })?;
        let header = archive::entry_header(
            MANIFEST_FILE,
            &TarKind::File,
            json.len() as u64,
            0o600,
            timestamp.timestamp(),
        )
        .map_err(|e| Error::Internal(format!("manifest header: {e}")))?;
        let pad = archive::padding(json.len() as u64);
        sink.send(Bytes::from(header)).await?;
        sink.send(Bytes::from(json)).await?;
        sink.send(Bytes::from_static(pad)).await?;
        sink.send(Bytes::from_static(&archive::END_OF_ARCHIVE))
            .await?;
        Ok(manifest)
    }

    /// Snapshots every included component into the sink, in canonical order.
    async fn produce(
        &self,
        id: &BackupId,
        sink: &Sink<'_>,
        options: &CreateOptions,
    ) -> Result<Produced> {
        let mut produced = Produced::default();
        let components = self.components_for(options);
        for component in &components {
            let source = self
                .ports
                .sources
                .iter()
                .find(|s| s.component() == *component)
                .ok_or_else(|| Error::Internal(format!("no source for {component}")))?;
            if source.needs_quiesce() {
                let quiesce = self.ports.quiesce.as_ref();
                let limit = self.settings.quiesce_timeout;
                with_timeout(
                    self.ports.clock.as_ref(),
                    limit,
                    &format!("{component} snapshot while its writer is paused"),
                    async {
                        // Armed before pausing: a pause that fails or times
                        // out half-way is resumed too (resume is idempotent).
                        let _resume = ResumeOnDrop(quiesce);
                        quiesce.pause().await?;
                        self.produce_component(id, source.as_ref(), sink, options, &mut produced)
                            .await
                    },
                )
                .await?;
            } else {
                self.produce_component(id, source.as_ref(), sink, options, &mut produced)
                    .await?;
            }
        }
        if let Some(first) = components.first()
            && produced.absent.len() == components.len()
        {
            return Err(Error::Source {
                component: *first,
                path: "(every configured source)".into(),
                reason: format!(
                    "nothing to back up: no source of {} exists",
                    components
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                source: None,
            });
        }
        Ok(produced)
    }

    async fn produce_component(
        &self,
        id: &BackupId,
        source: &dyn ComponentSource,
        sink: &Sink<'_>,
        options: &CreateOptions,
        produced: &mut Produced,
    ) -> Result<()> {
        let component = source.component();
        let snapshot = if options.settled {
            source.snapshot_settled().await?
        } else {
            source.snapshot().await?
        };
        if snapshot.absent() {
            tracing::warn!(backup_id = %id, component = %component,
                "component source does not exist; the backup records it as absent");
            produced.absent.push(component);
            return snapshot.finish().await;
        }
        let result = async {
            if component == Component::Persistence {
                produced.db_schema_version = snapshot.db_schema_version();
            }
            let entries = snapshot.entries();
            let files_total = entries.iter().filter(|e| e.kind == EntryKind::File).count() as u64;
            let bytes_total: u64 = entries.iter().map(|e| e.size).sum();
            let (mut files_done, mut bytes_done) = (0u64, 0u64);
            for entry in entries {
                if entry.path.component() != Some(component) {
                    return Err(Error::Source {
                        component,
                        path: entry.path.to_string(),
                        reason: "snapshot entry outside its component".into(),
                        source: None,
                    });
                }
                match &entry.kind {
                    EntryKind::File => {
                        let opened = snapshot.open(&entry.path).await?;
                        let (size, sha256) = sink.file(entry, opened, component).await?;
                        produced.files.push(FileEntry {
                            path: entry.path.clone(),
                            size,
                            sha256,
                            mode: Some(entry.mode),
                            mtime: Some(entry.mtime),
                            uid: entry.owner.map(|o| o.0),
                            gid: entry.owner.map(|o| o.1),
                        });
                        files_done += 1;
                        bytes_done += size;
                        self.report(
                            options,
                            id,
                            Phase::Backup(component),
                            bytes_done,
                            bytes_total.max(bytes_done),
                            files_done,
                            files_total,
                        );
                    }
                    EntryKind::Dir => {
                        sink.dir_or_link(entry, TarKind::Dir, component).await?;
                        produced.dirs.push(DirEntry {
                            path: entry.path.clone(),
                            mode: Some(entry.mode),
                            uid: entry.owner.map(|o| o.0),
                            gid: entry.owner.map(|o| o.1),
                        });
                    }
                    EntryKind::Symlink(target) => {
                        sink.dir_or_link(entry, TarKind::Symlink(target.clone()), component)
                            .await?;
                        produced.symlinks.push(SymlinkEntry {
                            path: entry.path.clone(),
                            target: target.clone(),
                        });
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = snapshot.finish().await {
            tracing::warn!(backup_id = %id, component = %component, error = %e, "cleaning up the snapshot failed");
        }
        result
    }

    /// Writes `manifest` as the `manifest.json` of its directory-form
    /// backup.
    pub(super) async fn put_inner_manifest(&self, manifest: &Manifest) -> Result<()> {
        let json = manifest.to_json().map_err(|source| Error::Manifest {
            id: manifest.id.to_string(),
            source,
        })?;
        self.ports
            .store
            .put(&manifest.id, &ObjectName::InnerManifest, once(json))
            .await
            .map(|_| ())
    }

    pub(super) fn manifest(
        &self,
        id: &BackupId,
        sequence: u64,
        timestamp: chrono::DateTime<chrono::Utc>,
        mut produced: Produced,
        options: &CreateOptions,
        archive: Option<ArchiveInfo>,
    ) -> Manifest {
        let mut components = self.components_for(options);
        components.retain(|c| !produced.absent.contains(c));
        let labels = &options.labels;
        produced.files.sort_by(|a, b| a.path.cmp(&b.path));
        produced.dirs.sort_by(|a, b| a.path.cmp(&b.path));
        produced.symlinks.sort_by(|a, b| a.path.cmp(&b.path));
        let checksum = tree_checksum(&produced.files, &produced.dirs, &produced.symlinks);
        Manifest {
            version: ManifestVersion::CURRENT,
            id: id.clone(),
            synthorg_version: self.app.version.clone(),
            timestamp,
            trigger: id.trigger(),
            components,
            absent: produced.absent,
            sequence,
            db_schema_version: produced.db_schema_version,
            engine: if produced
                .files
                .iter()
                .any(|f| f.path.as_str() == crate::path::PGDUMP_FILE)
            {
                crate::manifest::Engine::Postgres
            } else {
                crate::manifest::Engine::Sqlite
            },
            size_bytes: produced.files.iter().map(|f| f.size).sum(),
            checksum,
            compression: self.settings.compression,
            archive,
            encrypted: matches!(self.settings.encrypt_to, Ok(Some(_))),
            recipients: match &self.settings.encrypt_to {
                Ok(Some(r)) => r.names().to_vec(),
                _ => Vec::new(),
            },
            files: produced.files,
            dirs: produced.dirs,
            symlinks: produced.symlinks,
            labels: labels.clone(),
        }
    }

    /// The components a backup holds: the options' subset, else `include`.
    fn components_for(&self, options: &CreateOptions) -> Vec<Component> {
        let mut list = options
            .components
            .clone()
            .unwrap_or_else(|| self.settings.include.clone());
        list.sort();
        list.dedup();
        list
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn report(
        &self,
        options: &CreateOptions,
        id: &BackupId,
        phase: Phase,
        bytes_done: u64,
        bytes_total: u64,
        files_done: u64,
        files_total: u64,
    ) {
        if let Some(progress) = &options.progress {
            progress(&Progress {
                id: id.clone(),
                phase,
                bytes_done,
                bytes_total,
                files_done,
                files_total,
            });
        }
    }
}

fn once(bytes: Vec<u8>) -> ByteStream {
    futures::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed()
}
