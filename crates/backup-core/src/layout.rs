//! [`Layout`]: the store layout and its commit protocol, once, over any
//! [`ObjectSpace`] (a local directory, an S3 prefix, memory).
//!
//! Object names (docs/ARCHITECTURE.md "Store layout"):
//! ```text
//! <id>.tar.gz | <id>.tar.zst   archive of a compressed backup
//! <id>.tar.gz.age | <id>.tar.zst.age | <id>.tar.age   encrypted archive
//! <id>/<path>, <id>/manifest.json   directory form (compression none)
//! <id>.summary.json            small summary (listing reads this; clear)
//! <id>.manifest.json           sidecar manifest, written last = commit point
//! <id>.manifest.json.age       the same, encrypted (encrypted backups)
//! _status.json                 status record (see `status`)
//! _index.json                  listing cache, when the space asks for it
//! ```
//! Publish writes the summary, then the sidecar; a backup exists exactly
//! when its sidecar does. Listing reads summaries (falling back to the
//! sidecar), marks a backup whose data is missing or of another size as
//! damaged, and ignores foreign names. Delete removes the sidecar first.
//! Cleanup removes data without a sidecar and the space's own partial
//! writes. Each space keeps only what is its own: atomic writes (local
//! fsync + rename; S3 multipart uploads and their markers).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};

use crate::config::Compression;
use crate::crypt::Recipients;
use crate::error::{Error, Result};
use crate::id::BackupId;
use crate::manifest::{Found, MAX_MANIFEST_BYTES, Manifest, ManifestError, Summary};
use crate::path::MANIFEST_FILE;
use crate::ports::{
    BackupStore, ByteStream, Listed, ObjectName, ObjectSpace, RootListing, Sidecar, Small,
};

/// Suffix of the sidecar manifest, the commit point.
pub const SIDECAR_SUFFIX: &str = ".manifest.json";
/// Suffix of the sidecar of an encrypted backup (an age file).
pub const SEALED_SIDECAR_SUFFIX: &str = ".manifest.json.age";
/// Suffix of the summary object.
pub const SUMMARY_SUFFIX: &str = ".summary.json";
/// Suffix of the pieces object (an archive's member digests).
pub const PIECES_SUFFIX: &str = ".pieces";
/// The status record.
pub const STATUS_NAME: &str = "_status.json";
/// The listing cache: the summaries of all published backups in one
/// object, so that listing is one LIST and one GET. Derived data: the
/// sidecars decide what is listed; a backup missing from it is read from
/// its own summary, and every publish/delete rewrites it whole.
pub const INDEX_NAME: &str = "_index.json";
/// Summaries read concurrently when listing.
const LIST_CONCURRENCY: usize = 16;

/// The object name of `object` of backup `id`.
pub fn object_name(id: &BackupId, object: &ObjectName) -> String {
    match object {
        ObjectName::Archive(Compression::Zstd) => format!("{id}.tar.zst"),
        ObjectName::Archive(_) => format!("{id}.tar.gz"),
        ObjectName::SealedArchive(Compression::Zstd) => format!("{id}.tar.zst.age"),
        ObjectName::SealedArchive(Compression::Gzip) => format!("{id}.tar.gz.age"),
        ObjectName::SealedArchive(Compression::None) => format!("{id}.tar.age"),
        ObjectName::File(path) => format!("{id}/{path}"),
        ObjectName::InnerManifest => format!("{id}/{MANIFEST_FILE}"),
        ObjectName::Pieces => format!("{id}{PIECES_SUFFIX}"),
    }
}

/// The backup a data name (archive, summary, directory or an object in
/// it) belongs to; `None` for sidecars and foreign names.
pub fn data_owner(name: &str) -> Option<BackupId> {
    let (top, nested) = match name.split_once('/') {
        Some((top, _)) => (top, true),
        None => (name, false),
    };
    let stem = if nested {
        top
    } else {
        DATA_SUFFIXES
            .iter()
            .find_map(|s| top.strip_suffix(s))
            .unwrap_or(top)
    };
    BackupId::parse(stem).ok()
}

/// Suffixes of a backup's top-level data objects: its archive, encrypted
/// or not, its summary and its pieces object.
const DATA_SUFFIXES: [&str; 7] = [
    ".tar.gz",
    ".tar.zst",
    ".tar.gz.age",
    ".tar.zst.age",
    ".tar.age",
    SUMMARY_SUFFIX,
    PIECES_SUFFIX,
];

/// The top-level names a backup's data may occupy (the directory form as
/// its directory name).
fn data_names(id: &BackupId) -> impl Iterator<Item = String> + '_ {
    DATA_SUFFIXES
        .iter()
        .map(move |s| format!("{id}{s}"))
        .chain(std::iter::once(id.to_string()))
}

impl RootListing {
    /// The ids that have a sidecar.
    fn published(&self) -> Vec<BackupId> {
        let mut ids: Vec<BackupId> = self
            .objects
            .iter()
            .filter_map(|(n, _)| {
                n.strip_suffix(SIDECAR_SUFFIX)
                    .or_else(|| n.strip_suffix(SEALED_SIDECAR_SUFFIX))
            })
            .filter_map(|stem| BackupId::parse(stem).ok())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// What the listing holds of a backup's data.
    fn found(&self, summary: &Summary) -> Found {
        let id = &summary.id;
        match (summary.compression, summary.encrypted) {
            (Compression::None, false) if self.dirs.contains(&id.to_string()) => Found::Directory,
            (Compression::None, false) => Found::Nothing,
            (c, encrypted) => {
                let name = object_name(id, &ObjectName::archive(c, encrypted));
                self.objects
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(Found::Nothing, |(_, size)| Found::Archive { size: *size })
            }
        }
    }
}

/// A [`BackupStore`]: the layout and protocol over an [`ObjectSpace`].
#[derive(Debug, Clone, Default)]
pub struct Layout<S> {
    space: S,
    /// Backups with files written unsettled, to settle when published.
    unsettled: std::sync::Arc<std::sync::Mutex<HashSet<BackupId>>>,
}

impl<S: ObjectSpace> Layout<S> {
    /// The store over `space`.
    pub fn new(space: S) -> Layout<S> {
        Layout {
            space,
            unsettled: Default::default(),
        }
    }

    fn unsettled(&self) -> std::sync::MutexGuard<'_, HashSet<BackupId>> {
        self.unsettled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The object space underneath.
    pub fn space(&self) -> &S {
        &self.space
    }

    fn not_found(&self, id: String) -> Error {
        Error::NotFound {
            id,
            location: self.space.location(),
        }
    }

    /// The sidecar: parsed and validated, or the encrypted one.
    /// Publishes a `pre-restore` backup in directory form that a restore's
    /// swap completed but that was not published (the process died in
    /// between): its manifest was written before the swap, and every file
    /// and directory it lists is there only if the swap committed (it
    /// renamed the replaced live items in; a swap that recovery rolled back
    /// took them out again, and recovery runs before this). Whether it was.
    async fn finish_safety(&self, id: &BackupId) -> Result<bool> {
        if id.trigger() != crate::id::Trigger::PreRestore {
            return Ok(false);
        }
        let inner = format!("{id}/{MANIFEST_FILE}");
        let Small::Found(bytes) = self.space.read_small(&inner, MAX_MANIFEST_BYTES).await? else {
            return Ok(false);
        };
        let Ok(m) = Manifest::from_sidecar(&bytes, id) else {
            return Ok(false);
        };
        if m.is_archive() || m.encrypted {
            return Ok(false);
        }
        let paths = m
            .files
            .iter()
            .map(|f| &f.path)
            .chain(m.dirs.iter().map(|d| &d.path));
        for path in paths {
            if self
                .space
                .get(&format!("{id}/{}", path.as_str()))
                .await?
                .is_none()
            {
                return Ok(false);
            }
        }
        self.publish(&m).await?;
        Ok(true)
    }

    async fn read_sidecar(&self, id: &BackupId) -> Result<Sidecar> {
        let too_large = |size| Error::Manifest {
            id: id.to_string(),
            source: ManifestError::TooLarge { size },
        };
        let name = format!("{id}{SIDECAR_SUFFIX}");
        match self.space.read_small(&name, MAX_MANIFEST_BYTES).await? {
            Small::Found(bytes) => {
                return Manifest::from_sidecar(&bytes, id).map(|m| Sidecar::Clear(Box::new(m)));
            }
            Small::TooLarge(size) => return Err(too_large(size)),
            Small::Missing => {}
        }
        let sealed = format!("{id}{SEALED_SIDECAR_SUFFIX}");
        match self.space.read_small(&sealed, MAX_MANIFEST_BYTES).await? {
            Small::Found(bytes) => Ok(Sidecar::Sealed {
                bytes,
                recipients: self
                    .read_own_summary(id)
                    .await
                    .map(|s| s.recipients)
                    .unwrap_or_default(),
            }),
            Small::TooLarge(size) => Err(too_large(size)),
            Small::Missing => Err(self.not_found(id.to_string())),
        }
    }

    /// The summary object, if it exists and is valid.
    async fn read_own_summary(&self, id: &BackupId) -> Option<Summary> {
        let name = format!("{id}{SUMMARY_SUFFIX}");
        match self.space.read_small(&name, MAX_MANIFEST_BYTES).await {
            Ok(Small::Found(bytes)) => Summary::from_json(&bytes, id).ok(),
            _ => None,
        }
    }

    /// The summary object, or (missing or unreadable) the clear sidecar's.
    async fn read_summary(&self, id: &BackupId) -> Result<Summary> {
        if let Some(summary) = self.read_own_summary(id).await {
            return Ok(summary);
        }
        match self.read_sidecar(id).await? {
            Sidecar::Clear(m) => Ok(Summary::from(m.as_ref())),
            Sidecar::Sealed { .. } => Err(Error::Manifest {
                id: id.to_string(),
                source: ManifestError::Inconsistent(
                    "its summary is missing or unreadable and its manifest is encrypted".into(),
                ),
            }),
        }
    }

    /// The summaries in the listing cache, by id; empty when the space
    /// keeps none or it is missing or unreadable.
    async fn read_index(&self) -> HashMap<BackupId, Summary> {
        if !self.space.keeps_index() {
            return HashMap::new();
        }
        let bytes = match self.space.read_small(INDEX_NAME, MAX_MANIFEST_BYTES).await {
            Ok(Small::Found(b)) => b,
            Ok(_) => return HashMap::new(),
            Err(e) => {
                tracing::warn!(error = %e, "backup index unreadable; reading summaries one by one");
                return HashMap::new();
            }
        };
        let Ok(entries) = serde_json::from_slice::<Vec<Summary>>(&bytes) else {
            tracing::warn!(store = %self.space.location(), "backup index is not valid; reading summaries one by one");
            return HashMap::new();
        };
        entries
            .into_iter()
            // The same rules as a summary object of its own.
            .filter(|s| s.check(&s.id).is_ok())
            .map(|s| (s.id.clone(), s))
            .collect()
    }

    /// Rewrites the listing cache: its entries `change`d, entries of
    /// backups that are gone dropped, published backups missing from it
    /// read and added (it heals itself). Called under the operation lock;
    /// a failure only makes listing slower, so it is logged.
    async fn update_index(&self, change: impl FnOnce(&mut HashMap<BackupId, Summary>)) {
        if !self.space.keeps_index() {
            return;
        }
        let mut index = self.read_index().await;
        change(&mut index);
        let published: HashSet<BackupId> = match self.space.list_root().await {
            Ok(listing) => listing.published().into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot update the backup index");
                return;
            }
        };
        index.retain(|id, _| published.contains(id));
        let missing: Vec<BackupId> = published
            .iter()
            .filter(|id| !index.contains_key(*id))
            .cloned()
            .collect();
        let found: Vec<Summary> = futures::stream::iter(missing)
            .map(|id| async move { self.read_summary(&id).await.ok() })
            .buffer_unordered(LIST_CONCURRENCY)
            .filter_map(|s| async move { s })
            .collect()
            .await;
        index.extend(found.into_iter().map(|s| (s.id.clone(), s)));
        let mut entries: Vec<&Summary> = index.values().collect();
        entries.sort_by(|a, b| b.id.cmp(&a.id));
        let written = match serde_json::to_vec(&entries) {
            Ok(json) => self.space.write_small(INDEX_NAME, json).await,
            Err(e) => Err(Error::Internal(format!(
                "serializing the backup index: {e}"
            ))),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot update the backup index");
        }
    }

    /// Removes `id`'s data; whether any existed.
    async fn remove_data(&self, id: &BackupId) -> Result<bool> {
        let mut existed = false;
        for name in data_names(id) {
            existed |= self.space.remove(&name).await?;
        }
        Ok(existed)
    }

    /// One listed entry: the summary, damaged when its data is not what it
    /// records.
    fn judge(&self, summary: Summary, listing: &RootListing) -> Listed {
        match summary.damage(listing.found(&summary)) {
            None => Listed::Complete(Box::new(summary)),
            Some(reason) => {
                tracing::warn!(backup_id = %summary.id, reason = %reason, "damaged backup");
                Listed::Damaged {
                    id: summary.id,
                    reason,
                }
            }
        }
    }
}

/// A serialization failure of our own types (never input).
fn manifest_err(id: &BackupId, e: serde_json::Error) -> Error {
    Error::Manifest {
        id: id.to_string(),
        source: e.into(),
    }
}

#[async_trait]
impl<S: ObjectSpace> BackupStore for Layout<S> {
    fn location(&self) -> String {
        self.space.location()
    }

    async fn list(&self) -> Result<Vec<Listed>> {
        let listing = self.space.list_root().await?;
        let mut index = self.read_index().await;
        let mut out = Vec::new();
        let mut unindexed = Vec::new();
        for id in listing.published() {
            match index.remove(&id) {
                Some(summary) => out.push(self.judge(summary, &listing)),
                None => unindexed.push(id),
            }
        }
        let listing = &listing;
        let read: Vec<Option<Listed>> = futures::stream::iter(unindexed)
            .map(|id| async move {
                match self.read_summary(&id).await {
                    Ok(summary) => Ok(Some(self.judge(summary, listing))),
                    Err(Error::NotFound { .. }) => Ok(None), // deleted meanwhile
                    Err(e @ Error::Manifest { .. }) => {
                        tracing::warn!(backup_id = %id, error = %e, "damaged backup sidecar");
                        Ok(Some(Listed::Damaged {
                            id,
                            reason: e.to_string(),
                        }))
                    }
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        out.extend(read.into_iter().flatten());
        out.sort_by(|a, b| b.id().cmp(a.id()));
        Ok(out)
    }

    async fn sidecar(&self, id: &BackupId) -> Result<Sidecar> {
        self.read_sidecar(id).await
    }

    async fn put(&self, id: &BackupId, object: &ObjectName, data: ByteStream) -> Result<u64> {
        let name = object_name(id, object);
        match object {
            // Made durable together when the backup is published.
            ObjectName::File(_) => {
                self.unsettled().insert(id.clone());
                self.space.put_unsettled(&name, data).await
            }
            _ => self.space.put(&name, data).await,
        }
    }

    async fn get(&self, id: &BackupId, object: &ObjectName) -> Result<ByteStream> {
        let name = object_name(id, object);
        self.space
            .get(&name)
            .await?
            .ok_or_else(|| self.not_found(format!("{id} ({name})")))
    }

    async fn publish(&self, manifest: &Manifest) -> Result<()> {
        let id = &manifest.id;
        if self.unsettled().contains(id) {
            // Directory-form files were written unsettled: durable before
            // the sidecar that makes them a backup. (A restore's safety
            // backup has its files moved in by the swap, which makes them
            // durable itself.)
            self.space.settle().await?;
            self.unsettled().remove(id);
        }
        let summary = Summary::from(manifest);
        let json = serde_json::to_vec(&summary).map_err(|e| manifest_err(id, e))?;
        self.space
            .write_small(&format!("{id}{SUMMARY_SUFFIX}"), json)
            .await?;
        let sidecar = manifest.to_json().map_err(|source| Error::Manifest {
            id: id.to_string(),
            source,
        })?;
        if manifest.encrypted {
            let recipients = Recipients::parse(&manifest.recipients).map_err(|(_, reason)| {
                Error::Config(crate::config::ConfigError::Invalid {
                    key: "backup.encryption.recipients".into(),
                    reason,
                })
            })?;
            let sealed = crate::crypt::seal(&sidecar, &recipients)
                .map_err(|e| Error::Internal(format!("encrypting the manifest of {id}: {e}")))?;
            self.space
                .write_small(&format!("{id}{SEALED_SIDECAR_SUFFIX}"), sealed)
                .await?;
        } else {
            self.space
                .write_small(&format!("{id}{SIDECAR_SUFFIX}"), sidecar)
                .await?;
        }
        self.update_index(|index| {
            index.insert(summary.id.clone(), summary);
        })
        .await;
        Ok(())
    }

    async fn delete(&self, id: &BackupId) -> Result<()> {
        let had_sidecar = self.space.remove(&format!("{id}{SIDECAR_SUFFIX}")).await?
            | self
                .space
                .remove(&format!("{id}{SEALED_SIDECAR_SUFFIX}"))
                .await?;
        let had_data = self.remove_data(id).await?;
        if had_sidecar {
            self.update_index(|index| {
                index.remove(id);
            })
            .await;
        }
        if had_sidecar || had_data {
            Ok(())
        } else {
            Err(self.not_found(id.to_string()))
        }
    }

    async fn discard(&self, id: &BackupId) -> Result<()> {
        self.unsettled().remove(id);
        self.remove_data(id).await?;
        self.space.remove_partial(Some(id)).await.map(|_| ())
    }

    async fn read_status(&self) -> Result<Option<Vec<u8>>> {
        match self
            .space
            .read_small(STATUS_NAME, MAX_MANIFEST_BYTES)
            .await?
        {
            Small::Found(bytes) => Ok(Some(bytes)),
            Small::Missing => Ok(None),
            Small::TooLarge(size) => Err(Error::Store {
                location: self.space.location(),
                key: STATUS_NAME.to_owned(),
                reason: format!("{size} bytes, more than {MAX_MANIFEST_BYTES}"),
                source: None,
            }),
        }
    }

    async fn write_status(&self, bytes: Vec<u8>) -> Result<()> {
        self.space.write_small(STATUS_NAME, bytes).await
    }

    fn local_dir(&self, id: &BackupId) -> Option<std::path::PathBuf> {
        self.space.local_path(&id.to_string())
    }

    async fn open_ranges(
        &self,
        id: &BackupId,
        object: &ObjectName,
    ) -> Option<Box<dyn crate::ports::ReadAt>> {
        self.space.open_ranges(&object_name(id, object)).await
    }

    fn reads_ranges(&self) -> bool {
        self.space.reads_ranges()
    }

    async fn cleanup_incomplete(&self) -> Result<Vec<String>> {
        let mut removed = self.space.remove_partial(None).await?;
        let listing = self.space.list_root().await?;
        let published: HashSet<BackupId> = listing.published().into_iter().collect();
        let names = listing
            .objects
            .iter()
            .map(|(n, _)| n)
            .chain(listing.dirs.iter());
        for name in names {
            let Some(id) = data_owner(name) else { continue };
            if published.contains(&id) {
                continue;
            }
            if *name == id.to_string() && self.finish_safety(&id).await? {
                tracing::warn!(store = %self.space.location(), safety_backup = %id,
                    "published the safety backup of a restore interrupted after its swap");
                removed.push(format!("published {id}"));
                continue;
            }
            if self.space.remove(name).await? {
                tracing::warn!(store = %self.space.location(), leftover = %name, "removed incomplete backup leftover");
                removed.push(name.clone());
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Trigger;
    use crate::path::ArchivePath;
    use bytes::Bytes;
    use chrono::TimeZone;

    fn one_chunk(bytes: &'static [u8]) -> ByteStream {
        futures::stream::once(async move { Ok(Bytes::from_static(bytes)) }).boxed()
    }

    /// A directory-form backup's files are written unsettled (no fsync
    /// each) and made durable by its publication, before its sidecar: a
    /// power cut before it loses them (the backup was never published), one
    /// after it loses nothing. Archives and the inner manifest are durable
    /// when written.
    #[tokio::test]
    async fn a_directory_form_backup_is_durable_once_published_and_not_before() {
        let space = crate::memory::InMemoryObjects::default();
        let store = Layout::new(space.clone());
        let ts = chrono::Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let id = BackupId::new(ts, Trigger::Manual, 1);
        let file = ObjectName::File(ArchivePath::parse("config/company.yaml").unwrap());
        let name = format!("{id}/config/company.yaml");
        store
            .put(&id, &file, one_chunk(b"name: x\n"))
            .await
            .unwrap();
        store
            .put(&id, &ObjectName::InnerManifest, one_chunk(b"{}"))
            .await
            .unwrap();
        space.crash();
        assert_eq!(space.get_raw(&name), None, "not settled before publish");
        assert!(
            space
                .get_raw(&object_name(&id, &ObjectName::InnerManifest))
                .is_some()
        );

        store
            .put(&id, &file, one_chunk(b"name: x\n"))
            .await
            .unwrap();
        let manifest = crate::conformance::manifest_for(&id, None, b"name: x\n");
        store.publish(&manifest).await.unwrap();
        space.crash();
        assert_eq!(space.get_raw(&name).as_deref(), Some(&b"name: x\n"[..]));
        assert!(matches!(
            &store.list().await.unwrap()[..],
            [Listed::Complete(_)]
        ));

        // An archive is durable when written: publishing it settles nothing
        // it needs.
        let other = BackupId::new(ts, Trigger::Manual, 2);
        let gz = ObjectName::Archive(Compression::Gzip);
        store.put(&other, &gz, one_chunk(b"archive")).await.unwrap();
        space.crash();
        assert!(space.get_raw(&object_name(&other, &gz)).is_some());
    }

    #[test]
    fn data_names_belong_to_their_backup_and_sidecars_do_not() {
        let ts = chrono::Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let id = BackupId::new(ts, Trigger::Manual, 1);
        for name in [
            format!("{id}.tar.gz"),
            format!("{id}.tar.zst"),
            format!("{id}.tar.gz.age"),
            format!("{id}.tar.zst.age"),
            format!("{id}.tar.age"),
            format!("{id}{SUMMARY_SUFFIX}"),
            format!("{id}{PIECES_SUFFIX}"),
            id.to_string(),
            format!("{id}/db/synthorg.db"),
        ] {
            assert_eq!(data_owner(&name), Some(id.clone()), "{name}");
        }
        for name in [
            format!("{id}{SIDECAR_SUFFIX}"),
            format!("{id}{SEALED_SIDECAR_SUFFIX}"),
            "README.txt".to_owned(),
            STATUS_NAME.to_owned(),
            format!("{id}.tar.gz.tmp"),
        ] {
            assert_eq!(data_owner(&name), None, "{name}");
        }
    }
}
