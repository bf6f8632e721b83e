//! [`S3Prefix`]: the raw objects under a bucket prefix, under which
//! `backup_core::layout::Layout` keeps the store layout and its commit
//! protocol ([`S3Store`]). S3 makes a completed object visible atomically,
//! so no temp names are needed. What is S3's own is here: an object
//! smaller than `part_size` is one PUT; a larger one is a multipart upload
//! of `part_size` parts (all equal but the last), at most
//! [`PARTS_IN_FLIGHT`] in memory (the one being filled included), so
//! memory stays bounded. The layout's
//! listing cache (`_index.json`) is kept here, where one GET per backup
//! would make listing slow.
//!
//! No multipart upload stays billed: a failed or cancelled upload is
//! aborted, and every upload is recorded in an upload marker
//! (`_uploads/<id>/<sha256 of the key>.json`: key and upload id) right after
//! it is created and until it is completed or aborted, so that after a
//! SIGKILL [`remove_partial`](ObjectSpace::remove_partial) aborts it. (The
//! S3 API call ListMultipartUploads would find them too, but object_store
//! does not offer it.) The multipart machinery is in `store/multipart.rs`.

use std::sync::Arc;

use async_trait::async_trait;
use backup_core::layout::Layout;
use backup_core::ports::{ByteStream, ObjectSpace, RootListing, Small};
use backup_core::{BackupId, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStore, ObjectStoreExt, PutPayload, PutPayloadMut};
use serde::{Deserialize, Serialize};

use crate::errors::{map_err, store_err};

mod multipart;

/// Parts of one object in memory at once: uploading, or being filled
/// while the others upload.
pub const PARTS_IN_FLIGHT: usize = 2;
/// Where upload markers live, under the prefix.
const UPLOADS_DIR: &str = "_uploads";

/// The backup store on an S3 prefix.
pub type S3Store = Layout<S3Prefix>;

/// The objects under a bucket prefix, as an [`ObjectSpace`].
#[derive(Clone)]
pub struct S3Prefix {
    pub(crate) store: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    pub(crate) location: String,
    prefix: Vec<String>,
    part_size: usize,
}

impl std::fmt::Debug for S3Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Prefix")
            .field("location", &self.location)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

impl S3Prefix {
    /// The objects of `store` (already configured for the bucket) under
    /// `prefix` (e.g. `prod/`), uploading parts of `part_size` bytes.
    /// `location` names it in messages, e.g. `s3://bucket/prod/`.
    pub fn new<S: ObjectStore + MultipartStore>(
        store: Arc<S>,
        location: String,
        prefix: &str,
        part_size: usize,
    ) -> S3Prefix {
        S3Prefix {
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
    pub fn key(&self, name: &str) -> Path {
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

    /// Reads a small object, refusing more than `limit` bytes.
    async fn read_capped(
        &self,
        key: &Path,
        limit: usize,
    ) -> std::result::Result<Small, object_store::Error> {
        let result = match self.store.get(key).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(Small::Missing),
            Err(e) => return Err(e),
        };
        if result.meta.size > limit as u64 {
            return Ok(Small::TooLarge(result.meta.size));
        }
        Ok(Small::Found(result.bytes().await?.to_vec()))
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

    /// Deletes `key`; a missing key is fine.
    async fn delete_key(&self, key: &Path) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err(&self.location, key, e)),
        }
    }
}

#[async_trait]
impl ObjectSpace for S3Prefix {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn list_root(&self) -> Result<RootListing> {
        let prefix = self.prefix_path();
        let listing = self
            .store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map_err(|e| map_err(&self.location, &prefix.clone().unwrap_or_default(), e))?;
        let name = |p: &Path| p.filename().map(str::to_owned);
        Ok(RootListing {
            objects: listing
                .objects
                .iter()
                .filter_map(|o| Some((name(&o.location)?, o.size)))
                .collect(),
            dirs: listing.common_prefixes.iter().filter_map(name).collect(),
        })
    }

    async fn read_small(&self, name: &str, limit: usize) -> Result<Small> {
        let key = self.key(name);
        self.read_capped(&key, limit)
            .await
            .map_err(|e| map_err(&self.location, &key, e))
    }

    async fn write_small(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let key = self.key(name);
        self.store
            .put(&key, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| map_err(&self.location, &key, e))
    }

    async fn put(&self, name: &str, data: ByteStream) -> Result<u64> {
        let key = self.key(name);
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
        let upload = self.start_upload(name, &key).await?;
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

    async fn get(&self, name: &str) -> Result<Option<ByteStream>> {
        let key = self.key(name);
        match self.store.get(&key).await {
            Ok(result) => {
                let location = self.location.clone();
                Ok(Some(
                    result
                        .into_stream()
                        .map_err(move |e| std::io::Error::other(format!("{location}: {e}")))
                        .boxed(),
                ))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(map_err(&self.location, &key, e)),
        }
    }

    async fn remove(&self, name: &str) -> Result<bool> {
        let key = self.key(name);
        // A "directory" first (a HEAD of a directory name is an error on
        // some servers); objects and directories never share a name here.
        let keys = self.keys_under(&key).await?;
        for key in &keys {
            self.delete_key(key).await?;
        }
        if !keys.is_empty() {
            return Ok(true);
        }
        // S3 deletes succeed for missing keys: ask first.
        match self.store.head(&key).await {
            Ok(_) => self.delete_key(&key).await.map(|()| true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(map_err(&self.location, &key, e)),
        }
    }

    async fn remove_partial(&self, id: Option<&BackupId>) -> Result<Vec<String>> {
        match id {
            // A failed put aborts its own upload; only a killed process
            // leaves one, for the next cleanup.
            Some(_) => Ok(Vec::new()),
            None => self.abort_recorded_uploads().await,
        }
    }

    fn keeps_index(&self) -> bool {
        true
    }
}
