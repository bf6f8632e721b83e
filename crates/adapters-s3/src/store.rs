//! [`S3Store`]: backups in an S3-compatible bucket.
//!
//! Same layout as the local store under the configured prefix. An object
//! smaller than `part_size` is one PUT; a larger one is a multipart upload
//! of `part_size` parts (all equal but the last), at most
//! [`PARTS_IN_FLIGHT`] in flight, so memory stays bounded. S3 makes a
//! completed object visible atomically, so no temp names are needed; the
//! sidecar manifest is put last and is the commit point.
//!
//! No multipart upload stays billed: a failed or cancelled upload is
//! aborted, and every upload is recorded in an upload marker
//! (`_uploads/<id>/<sha256 of the key>.json`: key and upload id) right after
//! it is created and until it is completed or aborted, so that after a
//! SIGKILL [`cleanup_incomplete`](BackupStore::cleanup_incomplete) aborts
//! it. (The S3 API call ListMultipartUploads would find them too, but
//! object_store does not offer it.) The multipart machinery is in
//! `store/multipart.rs`.

use std::sync::Arc;

use async_trait::async_trait;
use backup_core::manifest::{Found, MAX_MANIFEST_BYTES};
use backup_core::path::MANIFEST_FILE;
use backup_core::ports::{BackupStore, ByteStream, Listed, ObjectName};
use backup_core::{BackupId, Compression, Error, Manifest, ManifestError, Result, Summary};
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStore, ObjectStoreExt, PutPayload, PutPayloadMut};
use serde::{Deserialize, Serialize};

use crate::errors::{map_err, store_err};

mod multipart;

/// Parts uploaded concurrently per object.
pub const PARTS_IN_FLIGHT: usize = 2;
/// Sidecars fetched concurrently when listing.
const LIST_CONCURRENCY: usize = 16;
const SIDECAR_SUFFIX: &str = ".manifest.json";
const SUMMARY_SUFFIX: &str = ".summary.json";
/// Where upload markers live, under the prefix.
const UPLOADS_DIR: &str = "_uploads";
/// The summaries of all published backups in one object, so that listing
/// is a LIST and one GET rather than a GET per backup. Derived data: the
/// sidecars decide what is listed; a backup missing from the index is read
/// from its own summary.
const INDEX_KEY: &str = "_index.json";
/// The status record (see `backup_core::status`).
const STATUS_KEY: &str = "_status.json";

/// A [`BackupStore`] on an S3-compatible bucket.
#[derive(Clone)]
pub struct S3Store {
    pub(crate) store: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    pub(crate) location: String,
    prefix: Vec<String>,
    part_size: usize,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// A store over `store` (already configured for the bucket), under
    /// `prefix` (e.g. `prod/`), uploading parts of `part_size` bytes.
    /// `location` names it in messages, e.g. `s3://bucket/prod/`.
    pub fn new<S: ObjectStore + MultipartStore>(
        store: Arc<S>,
        location: String,
        prefix: &str,
        part_size: usize,
    ) -> S3Store {
        S3Store {
            store: Arc::clone(&store) as Arc<dyn ObjectStore>,
            multipart: store,
            location,
            prefix: prefix
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            part_size: part_size.max(5 << 20),
        }
    }

    /// The key of `name` (which may contain `/`) under the prefix.
    pub(crate) fn key(&self, name: &str) -> Path {
        Path::from_iter(
            self.prefix
                .iter()
                .map(String::as_str)
                .chain(name.split('/')),
        )
    }

    fn prefix_path(&self) -> Option<Path> {
        (!self.prefix.is_empty()).then(|| Path::from_iter(self.prefix.iter().map(String::as_str)))
    }

    fn summary_key(&self, id: &BackupId) -> Path {
        self.key(&format!("{id}{SUMMARY_SUFFIX}"))
    }

    /// The summary object, or (missing or unreadable) the sidecar's summary.
    async fn read_summary(&self, id: &BackupId) -> Result<Summary> {
        if let Ok(bytes) = self
            .read_capped(&self.summary_key(id), MAX_MANIFEST_BYTES)
            .await
            && let Ok(summary) = Summary::from_json(&bytes, id)
        {
            return Ok(summary);
        }
        self.read_sidecar(id).await.map(|m| Summary::from(&m))
    }

    /// The summaries in the index object, by id; empty when it is missing
    /// or unreadable (listing then reads each summary).
    async fn read_index(&self) -> std::collections::HashMap<BackupId, Summary> {
        let key = self.key(INDEX_KEY);
        let bytes = match self.read_capped(&key, MAX_MANIFEST_BYTES).await {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Default::default(),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "backup index unreadable; reading summaries one by one");
                return Default::default();
            }
        };
        let Ok(entries) = serde_json::from_slice::<Vec<Summary>>(&bytes) else {
            tracing::warn!(key = %key, "backup index is not valid; reading summaries one by one");
            return Default::default();
        };
        entries
            .into_iter()
            // The same rules as a summary object of its own.
            .filter(|s| s.check(&s.id).is_ok())
            .map(|s| (s.id.clone(), s))
            .collect()
    }

    /// Rewrites the index: the entries of published backups, `change`d;
    /// published backups missing from it (a bucket from before the index,
    /// a lost update) are read and added, so the index heals itself.
    /// Called under the operation lock by publish and delete; a failure
    /// only makes listing slower, so it is logged, not returned.
    async fn update_index(
        &self,
        change: impl FnOnce(&mut std::collections::HashMap<BackupId, Summary>),
    ) {
        let mut index = self.read_index().await;
        change(&mut index);
        match self.published_ids().await {
            Ok((ids, _)) => {
                let missing: Vec<BackupId> = ids
                    .iter()
                    .filter(|id| !index.contains_key(*id))
                    .cloned()
                    .collect();
                let ids: std::collections::HashSet<BackupId> = ids.into_iter().collect();
                index.retain(|id, _| ids.contains(id));
                let found: Vec<Summary> = futures::stream::iter(missing)
                    .map(|id| async move { self.read_summary(&id).await.ok() })
                    .buffer_unordered(LIST_CONCURRENCY)
                    .filter_map(|s| async move { s })
                    .collect()
                    .await;
                index.extend(found.into_iter().map(|s| (s.id.clone(), s)));
            }
            Err(e) => {
                tracing::warn!(store = %self.location, error = %e, "cannot update the backup index");
                return;
            }
        }
        let mut entries: Vec<&Summary> = index.values().collect();
        entries.sort_by(|a, b| b.id.cmp(&a.id));
        let key = self.key(INDEX_KEY);
        let result = match serde_json::to_vec(&entries) {
            Ok(json) => self.store.put(&key, json.into()).await.map(|_| ()),
            Err(e) => Err(object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            }),
        };
        if let Err(e) = result {
            tracing::warn!(key = %key, error = %e, "cannot update the backup index");
        }
    }

    /// Ids that have a sidecar (published backups).
    /// The published ids, and what the same listing shows of each
    /// backup's data (archive sizes, directories): no extra request.
    async fn published_ids(&self) -> Result<(Vec<BackupId>, TopLevel)> {
        let top = self.top_level().await?;
        let ids = top
            .objects
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(SIDECAR_SUFFIX))
            .filter_map(|stem| BackupId::parse(stem).ok())
            .collect();
        Ok((ids, top))
    }

    fn sidecar_key(&self, id: &BackupId) -> Path {
        self.key(&format!("{id}{SIDECAR_SUFFIX}"))
    }

    fn object_key(&self, id: &BackupId, object: &ObjectName) -> Path {
        match object {
            ObjectName::Archive(Compression::Zstd) => self.key(&format!("{id}.tar.zst")),
            ObjectName::Archive(_) => self.key(&format!("{id}.tar.gz")),
            ObjectName::File(path) => self.key(&format!("{id}/{path}")),
            ObjectName::InnerManifest => self.key(&format!("{id}/{MANIFEST_FILE}")),
        }
    }

    fn not_found(&self, id: &BackupId) -> Error {
        Error::NotFound {
            id: id.to_string(),
            location: self.location.clone(),
        }
    }

    /// Reads a small object, refusing more than `limit` bytes.
    async fn read_capped(
        &self,
        key: &Path,
        limit: usize,
    ) -> std::result::Result<Vec<u8>, object_store::Error> {
        let result = self.store.get(key).await?;
        if result.meta.size > limit as u64 {
            return Err(object_store::Error::Generic {
                store: "S3",
                source: format!("object is {} bytes, more than {limit}", result.meta.size).into(),
            });
        }
        Ok(result.bytes().await?.to_vec())
    }

    async fn read_sidecar(&self, id: &BackupId) -> Result<Manifest> {
        let key = self.sidecar_key(id);
        let bytes = match self.read_capped(&key, MAX_MANIFEST_BYTES).await {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Err(self.not_found(id)),
            Err(object_store::Error::Generic { source, .. })
                if source.to_string().contains("more than") =>
            {
                return Err(Error::Manifest {
                    id: id.to_string(),
                    source: ManifestError::TooLarge {
                        size: MAX_MANIFEST_BYTES as u64 + 1,
                    },
                });
            }
            Err(e) => return Err(map_err(&self.location, &key, e)),
        };
        Manifest::from_sidecar(&bytes, id)
    }

    /// Names directly under the prefix: objects and "directories".
    async fn top_level(&self) -> Result<TopLevel> {
        let prefix = self.prefix_path();
        let listing = self
            .store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map_err(|e| map_err(&self.location, &prefix.clone().unwrap_or_default(), e))?;
        let name = |p: &Path| p.filename().map(str::to_owned);
        let objects = listing
            .objects
            .iter()
            .filter_map(|o| Some((name(&o.location)?, o.size)))
            .collect();
        let dirs = listing.common_prefixes.iter().filter_map(name).collect();
        Ok(TopLevel { objects, dirs })
    }

    /// Deletes every object under `<id>/` and the archives of `id`;
    /// returns whether anything existed.
    async fn delete_data(&self, id: &BackupId) -> Result<bool> {
        let mut existed = false;
        for ext in [".tar.gz", ".tar.zst", SUMMARY_SUFFIX] {
            let key = self.key(&format!("{id}{ext}"));
            // S3 deletes succeed for missing keys: ask first.
            if !self.exists(&key).await? {
                continue;
            }
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => existed = true,
                Err(e) => return Err(map_err(&self.location, &key, e)),
            }
        }
        let dir = self.key(&id.to_string());
        let keys = self.keys_under(&dir).await?;
        existed |= !keys.is_empty();
        for key in keys {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(map_err(&self.location, &key, e)),
            }
        }
        Ok(existed)
    }

    /// Every key under `dir`.
    async fn keys_under(&self, dir: &Path) -> Result<Vec<Path>> {
        self.store
            .list(Some(dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| map_err(&self.location, dir, e))
    }

    async fn exists(&self, key: &Path) -> Result<bool> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(map_err(&self.location, key, e)),
        }
    }
}

#[async_trait]
impl BackupStore for S3Store {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn list(&self) -> Result<Vec<Listed>> {
        let (ids, top) = self.published_ids().await?;
        let mut index = self.read_index().await;
        let mut out: Vec<Listed> = Vec::with_capacity(ids.len());
        let mut unindexed = Vec::new();
        for id in ids {
            match index.remove(&id) {
                Some(summary) => out.push(Listed::Complete(Box::new(summary))),
                None => unindexed.push(id),
            }
        }
        let read: Vec<Listed> = futures::stream::iter(unindexed)
            .map(|id| async move {
                match self.read_summary(&id).await {
                    Ok(m) => Ok(Some(Listed::Complete(Box::new(m)))),
                    Err(Error::NotFound { .. }) => Ok(None),
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
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
        out.extend(read);
        let out = out.into_iter().map(|l| match l {
            Listed::Complete(summary) => match summary.damage(top.found(&summary)) {
                None => Listed::Complete(summary),
                Some(reason) => {
                    tracing::warn!(backup_id = %summary.id, reason = %reason, "damaged backup");
                    Listed::Damaged {
                        id: summary.id,
                        reason,
                    }
                }
            },
            damaged => damaged,
        });
        let mut out: Vec<Listed> = out.collect();
        out.sort_by(|a, b| b.id().cmp(a.id()));
        Ok(out)
    }

    async fn manifest(&self, id: &BackupId) -> Result<Manifest> {
        self.read_sidecar(id).await
    }

    async fn put(&self, id: &BackupId, object: &ObjectName, data: ByteStream) -> Result<u64> {
        let key = self.object_key(id, object);
        let mut data = data;
        let mut carry = None;
        let (first, ended) = self.next_part(&mut data, &mut carry, &key).await?;
        if ended {
            let size = first.content_length() as u64;
            self.store
                .put(&key, first)
                .await
                .map_err(|e| map_err(&self.location, &key, e))?;
            return Ok(size);
        }
        let upload = self.start_upload(id, &key).await?;
        match self
            .upload_parts(&upload, first, &mut data, &mut carry)
            .await
        {
            Ok((parts, written)) => {
                upload
                    .finish(parts)
                    .await
                    .map_err(|e| map_err(&self.location, &key, e))?;
                Ok(written)
            }
            Err(e) => {
                upload.abort().await;
                Err(e)
            }
        }
    }

    async fn get(&self, id: &BackupId, object: &ObjectName) -> Result<ByteStream> {
        let key = self.object_key(id, object);
        match self.store.get(&key).await {
            Ok(result) => {
                let location = self.location.clone();
                Ok(result
                    .into_stream()
                    .map_err(move |e| std::io::Error::other(format!("{location}: {e}")))
                    .boxed())
            }
            Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound {
                id: format!("{id} ({key})"),
                location: self.location.clone(),
            }),
            Err(e) => Err(map_err(&self.location, &key, e)),
        }
    }

    async fn publish(&self, manifest: &Manifest) -> Result<()> {
        let summary_key = self.summary_key(&manifest.id);
        let summary =
            serde_json::to_vec(&Summary::from(manifest)).map_err(|e| Error::Manifest {
                id: manifest.id.to_string(),
                source: e.into(),
            })?;
        self.store
            .put(&summary_key, summary.into())
            .await
            .map_err(|e| map_err(&self.location, &summary_key, e))?;
        let key = self.sidecar_key(&manifest.id);
        let json = manifest.to_json().map_err(|source| Error::Manifest {
            id: manifest.id.to_string(),
            source,
        })?;
        self.store
            .put(&key, json.into())
            .await
            .map_err(|e| map_err(&self.location, &key, e))?;
        let summary = Summary::from(manifest);
        self.update_index(|index| {
            index.insert(summary.id.clone(), summary);
        })
        .await;
        Ok(())
    }

    async fn delete(&self, id: &BackupId) -> Result<()> {
        let sidecar = self.sidecar_key(id);
        let had_sidecar = self.exists(&sidecar).await?;
        if had_sidecar {
            self.store
                .delete(&sidecar)
                .await
                .map_err(|e| map_err(&self.location, &sidecar, e))?;
        }
        let had_data = self.delete_data(id).await?;
        if had_sidecar {
            self.update_index(|index| {
                index.remove(id);
            })
            .await;
        }
        if had_sidecar || had_data {
            Ok(())
        } else {
            Err(self.not_found(id))
        }
    }

    async fn discard(&self, id: &BackupId) -> Result<()> {
        self.delete_data(id).await.map(|_| ())
    }

    async fn read_status(&self) -> Result<Option<Vec<u8>>> {
        let key = self.key(STATUS_KEY);
        match self.read_capped(&key, MAX_MANIFEST_BYTES).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(map_err(&self.location, &key, e)),
        }
    }

    async fn write_status(&self, bytes: Vec<u8>) -> Result<()> {
        let key = self.key(STATUS_KEY);
        self.store
            .put(&key, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| map_err(&self.location, &key, e))
    }

    async fn cleanup_incomplete(&self) -> Result<Vec<String>> {
        let aborted = self.abort_recorded_uploads().await?;
        let TopLevel { objects, dirs } = self.top_level().await?;
        let published: std::collections::HashSet<&str> = objects
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(SIDECAR_SUFFIX))
            .collect();
        let mut removed = Vec::new();
        let candidates = objects
            .iter()
            .filter_map(|(n, _)| {
                n.strip_suffix(".tar.gz")
                    .or_else(|| n.strip_suffix(".tar.zst"))
                    .or_else(|| n.strip_suffix(SUMMARY_SUFFIX))
            })
            .chain(dirs.iter().map(String::as_str));
        let mut seen = std::collections::HashSet::new();
        for stem in candidates {
            let Ok(id) = BackupId::parse(stem) else {
                continue;
            };
            if published.contains(stem) || !seen.insert(id.clone()) {
                continue;
            }
            self.delete_data(&id).await?;
            tracing::warn!(store = %self.location, backup_id = %id, "removed incomplete backup leftover");
            removed.push(id.to_string());
        }
        removed.extend(aborted);
        Ok(removed)
    }
}

/// One listing of the prefix: object names with sizes, and "directories".
#[derive(Debug, Default)]
struct TopLevel {
    objects: Vec<(String, u64)>,
    dirs: Vec<String>,
}

impl TopLevel {
    /// What the listing holds of a backup's data.
    fn found(&self, summary: &Summary) -> Found {
        let id = summary.id.to_string();
        let archive = match summary.compression {
            Compression::None => {
                return if self.dirs.contains(&id) {
                    Found::Directory
                } else {
                    Found::Nothing
                };
            }
            Compression::Zstd => format!("{id}.tar.zst"),
            Compression::Gzip => format!("{id}.tar.gz"),
        };
        self.objects
            .iter()
            .find(|(n, _)| *n == archive)
            .map_or(Found::Nothing, |(_, size)| Found::Archive { size: *size })
    }
}
