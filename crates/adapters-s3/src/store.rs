//! [`S3Store`]: backups in an S3-compatible bucket.
//!
//! Same layout as the local store under the configured prefix. Objects are
//! uploaded with multipart uploads of `part_size` bytes, at most
//! [`PARTS_IN_FLIGHT`] at a time, so memory stays bounded; a failed or
//! cancelled upload is aborted so that no parts stay behind. S3 makes a
//! completed object visible atomically, so no temp names are needed; the
//! sidecar manifest is put last and is the commit point.

use std::sync::Arc;

use async_trait::async_trait;
use backup_core::manifest::MAX_MANIFEST_BYTES;
use backup_core::path::MANIFEST_FILE;
use backup_core::ports::{BackupStore, ByteStream, Listed, ObjectName};
use backup_core::{BackupId, Compression, Error, Manifest, ManifestError, Result, Summary};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

use crate::errors::{map_err, store_err};

/// Parts uploaded concurrently per object.
pub const PARTS_IN_FLIGHT: usize = 2;
/// Sidecars fetched concurrently when listing.
const LIST_CONCURRENCY: usize = 16;
const SIDECAR_SUFFIX: &str = ".manifest.json";
const SUMMARY_SUFFIX: &str = ".summary.json";

/// A [`BackupStore`] on an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) location: String,
    prefix: Vec<String>,
    part_size: usize,
}

impl S3Store {
    /// A store over `store` (already configured for the bucket), under
    /// `prefix` (e.g. `prod/`), uploading parts of `part_size` bytes.
    /// `location` names it in messages, e.g. `s3://bucket/prod/`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        location: String,
        prefix: &str,
        part_size: usize,
    ) -> S3Store {
        S3Store {
            store,
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
    async fn top_level(&self) -> Result<(Vec<String>, Vec<String>)> {
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
            .filter_map(|o| name(&o.location))
            .collect();
        let dirs = listing.common_prefixes.iter().filter_map(name).collect();
        Ok((objects, dirs))
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
        let keys: Vec<Path> = self
            .store
            .list(Some(&dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| map_err(&self.location, &dir, e))?;
        existed |= !keys.is_empty();
        for key in keys {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(map_err(&self.location, &key, e)),
            }
        }
        Ok(existed)
    }

    async fn exists(&self, key: &Path) -> Result<bool> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(map_err(&self.location, key, e)),
        }
    }
}

/// Aborts a multipart upload that was neither finished nor aborted, so
/// that a cancelled upload leaves no billed parts behind.
struct AbortOnDrop(Option<WriteMultipart>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(upload) = self.0.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                if let Err(e) = upload.abort().await {
                    tracing::warn!(error = %e, "aborting a cancelled multipart upload failed");
                }
            });
        }
    }
}

#[async_trait]
impl BackupStore for S3Store {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn list(&self) -> Result<Vec<Listed>> {
        let (objects, _) = self.top_level().await?;
        let ids: Vec<BackupId> = objects
            .iter()
            .filter_map(|n| n.strip_suffix(SIDECAR_SUFFIX))
            .filter_map(|stem| BackupId::parse(stem).ok())
            .collect();
        let mut out: Vec<Listed> = futures::stream::iter(ids)
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
        out.sort_by(|a, b| b.id().cmp(a.id()));
        Ok(out)
    }

    async fn manifest(&self, id: &BackupId) -> Result<Manifest> {
        self.read_sidecar(id).await
    }

    async fn put(&self, id: &BackupId, object: &ObjectName, data: ByteStream) -> Result<u64> {
        let key = self.object_key(id, object);
        let upload = self
            .store
            .put_multipart(&key)
            .await
            .map_err(|e| map_err(&self.location, &key, e))?;
        let mut guard = AbortOnDrop(Some(WriteMultipart::new_with_chunk_size(
            upload,
            self.part_size,
        )));
        let mut data = data;
        let mut written = 0u64;
        let result: Result<()> = async {
            while let Some(chunk) = data.next().await {
                let chunk = chunk.map_err(|e| {
                    store_err(&self.location, &key, format!("source stream failed: {e}"))
                })?;
                let Some(writer) = guard.0.as_mut() else {
                    break;
                };
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| map_err(&self.location, &key, e))?;
                written += chunk.len() as u64;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        let Some(writer) = guard.0.take() else {
            return Err(store_err(&self.location, &key, "upload state lost".into()));
        };
        match result {
            Ok(()) => {
                if let Err(e) = writer.finish().await {
                    return Err(map_err(&self.location, &key, e));
                }
                Ok(written)
            }
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(key = %key, error = %abort, "aborting the failed multipart upload failed");
                }
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
        if had_sidecar || had_data {
            Ok(())
        } else {
            Err(self.not_found(id))
        }
    }

    async fn discard(&self, id: &BackupId) -> Result<()> {
        self.delete_data(id).await.map(|_| ())
    }

    async fn cleanup_incomplete(&self) -> Result<Vec<String>> {
        let (objects, dirs) = self.top_level().await?;
        let published: std::collections::HashSet<&str> = objects
            .iter()
            .filter_map(|n| n.strip_suffix(SIDECAR_SUFFIX))
            .collect();
        let mut removed = Vec::new();
        let candidates = objects
            .iter()
            .filter_map(|n| {
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
        Ok(removed)
    }
}
