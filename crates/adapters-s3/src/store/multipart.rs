//! Multipart uploads of [`S3Prefix`](super::S3Prefix): equal-size parts, a
//! bounded number in flight, and an upload marker per upload from its
//! creation until it is completed or aborted, so that the uploads of a
//! killed process are aborted by the next `cleanup_incomplete`.

use super::*;

/// What an upload marker records.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct UploadMarker {
    key: String,
    upload_id: String,
}

/// A multipart upload in progress. Dropped before [`finish`](Upload::finish)
/// or [`abort`](Upload::abort) (the put was cancelled), it aborts the upload
/// and removes its marker in the background.
pub(super) struct Upload {
    store: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    key: Path,
    id: MultipartId,
    marker: Path,
    done: bool,
}

impl Upload {
    pub(super) async fn finish(
        mut self,
        parts: Vec<PartId>,
    ) -> std::result::Result<(), object_store::Error> {
        self.done = true;
        self.multipart
            .complete_multipart(&self.key, &self.id, parts)
            .await?;
        remove_marker(self.store.as_ref(), &self.marker).await;
        Ok(())
    }

    pub(super) async fn abort(mut self) {
        self.done = true;
        self.abort_task().await;
    }

    /// Aborts the upload, then removes its marker (kept when the abort
    /// failed, so that the next cleanup tries again). Owns what it needs, so
    /// that `Drop` can spawn it.
    pub(super) fn abort_task(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (store, multipart) = (Arc::clone(&self.store), Arc::clone(&self.multipart));
        let (key, id, marker) = (self.key.clone(), self.id.clone(), self.marker.clone());
        async move {
            match multipart.abort_multipart(&key, &id).await {
                Ok(()) => remove_marker(store.as_ref(), &marker).await,
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "aborting a multipart upload failed");
                }
            }
        }
    }
}

/// Deletes an upload marker; a failure is harmless (the next cleanup finds
/// nothing to abort and removes it), so it is only logged.
pub(super) async fn remove_marker(store: &dyn ObjectStore, marker: &Path) {
    if let Err(e) = store.delete(marker).await {
        tracing::warn!(key = %marker, error = %e, "removing an upload marker failed");
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(self.abort_task());
        }
    }
}

impl S3Prefix {
    /// The marker of an upload of object `name` (stored at `key`), under
    /// the backup it belongs to.
    pub(super) fn marker_key(&self, name: &str, key: &Path) -> Path {
        let digest = backup_core::Sha256Digest::of(key.as_ref().as_bytes());
        let owner = backup_core::layout::data_owner(name)
            .map_or_else(|| "other".to_owned(), |id| id.to_string());
        self.key(&format!("{UPLOADS_DIR}/{owner}/{digest}.json"))
    }

    /// Reads up to `part_size` bytes of `data` into one payload; `true`
    /// when the stream ended.
    pub(super) async fn next_part(
        &self,
        data: &mut ByteStream,
        carry: &mut Option<bytes::Bytes>,
        key: &Path,
    ) -> Result<(PutPayload, bool)> {
        let mut part = PutPayloadMut::new();
        loop {
            let chunk = match carry.take() {
                Some(c) => c,
                None => match data.next().await {
                    Some(chunk) => chunk.map_err(|e| {
                        store_err(&self.location, key, format!("source stream failed: {e}"))
                    })?,
                    None => return Ok((part.freeze(), true)),
                },
            };
            let room = self.part_size - part.content_length();
            if chunk.len() >= room {
                let mut chunk = chunk;
                let rest = chunk.split_off(room);
                part.push(chunk);
                *carry = (!rest.is_empty()).then_some(rest);
                return Ok((part.freeze(), false));
            }
            part.push(chunk);
        }
    }

    /// Starts a multipart upload of `key` and records it in its marker.
    pub(super) async fn start_upload(&self, name: &str, key: &Path) -> Result<Upload> {
        let upload_id = self
            .multipart
            .create_multipart(key)
            .await
            .map_err(|e| map_err(&self.location, key, e))?;
        let upload = Upload {
            store: Arc::clone(&self.store),
            multipart: Arc::clone(&self.multipart),
            key: key.clone(),
            id: upload_id.clone(),
            marker: self.marker_key(name, key),
            done: false,
        };
        let marker = serde_json::to_vec(&UploadMarker {
            key: key.to_string(),
            upload_id,
        })
        .map_err(|e| store_err(&self.location, key, format!("upload marker: {e}")))?;
        if let Err(e) = self.store.put(&upload.marker, marker.into()).await {
            let err = map_err(&self.location, &upload.marker, e);
            upload.abort().await;
            return Err(err);
        }
        Ok(upload)
    }

    /// Uploads `first` and the rest of `data` as parts of `upload`.
    pub(super) async fn upload_parts(
        &self,
        upload: &Upload,
        first: PutPayload,
        data: &mut ByteStream,
        carry: &mut Option<bytes::Bytes>,
    ) -> Result<(Vec<PartId>, u64)> {
        let put = |index: usize, payload: PutPayload| {
            self.multipart
                .put_part(&upload.key, &upload.id, index, payload)
        };
        let mut in_flight: futures::stream::FuturesOrdered<
            futures::future::BoxFuture<'_, object_store::Result<PartId>>,
        > = futures::stream::FuturesOrdered::new();
        let mut parts = Vec::new();
        let mut written = first.content_length() as u64;
        let mut next = Some(first);
        let mut index = 0;
        while let Some(payload) = next.take() {
            in_flight.push_back(put(index, payload));
            index += 1;
            // A slot is free before the next part is read: at most
            // PARTS_IN_FLIGHT parts in memory, the one being filled
            // included (one more, 8 MiB by default, pushed a restore from
            // S3, whose safety backup uploads while it stages, past 64 MiB).
            if in_flight.len() >= PARTS_IN_FLIGHT
                && let Some(part) = in_flight.next().await
            {
                parts.push(part.map_err(|e| map_err(&self.location, &upload.key, e))?);
            }
            let (payload, ended) = self.next_part(data, carry, &upload.key).await?;
            written += payload.content_length() as u64;
            if payload.content_length() > 0 {
                next = Some(payload);
            }
            if ended {
                break;
            }
        }
        if let Some(payload) = next {
            in_flight.push_back(put(index, payload));
        }
        while let Some(part) = in_flight.next().await {
            parts.push(part.map_err(|e| map_err(&self.location, &upload.key, e))?);
        }
        Ok((parts, written))
    }

    /// Aborts the multipart uploads recorded in markers (none is running:
    /// the caller holds the lock); returns the keys whose upload was aborted.
    pub(super) async fn abort_recorded_uploads(&self) -> Result<Vec<String>> {
        let dir = self.key(UPLOADS_DIR);
        let markers = self.keys_under(&dir).await?;
        let mut aborted = Vec::new();
        for marker in markers {
            let recorded = match self.read_capped(&marker, 64 * 1024).await {
                Ok(Small::Found(b)) => serde_json::from_slice::<UploadMarker>(&b).ok(),
                _ => None,
            };
            if let Some(m) = recorded {
                let key = Path::from(m.key.as_str());
                match self.multipart.abort_multipart(&key, &m.upload_id).await {
                    Ok(()) => {
                        tracing::warn!(store = %self.location, key = %key, "aborted an interrupted multipart upload");
                        aborted.push(format!("aborted the interrupted upload of {key}"));
                    }
                    // Gone already (completed, aborted or expired), or not
                    // ours to abort: nothing left to do but forget it.
                    Err(
                        object_store::Error::NotFound { .. }
                        | object_store::Error::PermissionDenied { .. },
                    ) => {}
                    Err(e) => return Err(map_err(&self.location, &key, e)),
                }
            }
            self.delete_key(&marker).await?;
        }
        Ok(aborted)
    }
}
