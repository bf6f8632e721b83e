//! [`InMemoryStore`] and [`InMemoryLock`]: the store and lock ports held in
//! memory (like object_store's `InMemory`), with the local store's object
//! names. They pass the conformance suite and let the core test reading,
//! verifying and restoring without a filesystem.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::config::Compression;
use crate::error::{Error, Result};
use crate::id::BackupId;
use crate::manifest::{Found, Manifest, Summary};
use crate::path::MANIFEST_FILE;
use crate::ports::{
    BackupStore, ByteStream, Listed, LockGuard, ObjectName, Operation, OperationLock,
};

const SIDECAR: &str = ".manifest.json";
const SUMMARY: &str = ".summary.json";
const STATUS: &str = "_status.json";
/// Chunk size of streams handed out by `get`.
const CHUNK: usize = 64 * 1024;

/// Objects by name, shared by the clones of a store.
type Objects = Arc<Mutex<BTreeMap<String, Bytes>>>;

/// A [`BackupStore`] in memory.
#[derive(Debug, Clone, Default)]
pub struct InMemoryStore {
    objects: Objects,
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> InMemoryStore {
        InMemoryStore::default()
    }

    /// Writes raw bytes under `name`, bypassing the protocol (tests: junk,
    /// damaged objects).
    pub fn put_raw(&self, name: &str, bytes: &[u8]) {
        self.map()
            .insert(name.to_owned(), Bytes::copy_from_slice(bytes));
    }

    /// The raw bytes under `name`.
    pub fn get_raw(&self, name: &str) -> Option<Bytes> {
        self.map().get(name).cloned()
    }

    /// Every object name.
    pub fn names(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn name(id: &BackupId, object: &ObjectName) -> String {
        match object {
            ObjectName::Archive(Compression::Zstd) => format!("{id}.tar.zst"),
            ObjectName::Archive(_) => format!("{id}.tar.gz"),
            ObjectName::File(path) => format!("{id}/{path}"),
            ObjectName::InnerManifest => format!("{id}/{MANIFEST_FILE}"),
        }
    }

    /// The names that belong to `id`'s data (not its sidecar).
    fn data_names(&self, id: &BackupId) -> Vec<String> {
        let id = id.to_string();
        let dir = format!("{id}/");
        self.map()
            .keys()
            .filter(|n| {
                n.starts_with(&dir)
                    || *n == &format!("{id}.tar.gz")
                    || *n == &format!("{id}.tar.zst")
                    || *n == &format!("{id}{SUMMARY}")
            })
            .cloned()
            .collect()
    }

    fn found(&self, summary: &Summary) -> Found {
        let map = self.map();
        match summary.compression {
            Compression::None => {
                let dir = format!("{}/", summary.id);
                if map.keys().any(|n| n.starts_with(&dir)) {
                    Found::Directory
                } else {
                    Found::Nothing
                }
            }
            c => map
                .get(&Self::name(&summary.id, &ObjectName::Archive(c)))
                .map_or(Found::Nothing, |b| Found::Archive {
                    size: b.len() as u64,
                }),
        }
    }

    fn read_summary(&self, id: &BackupId) -> Result<Summary> {
        let from_summary = self
            .get_raw(&format!("{id}{SUMMARY}"))
            .and_then(|b| Summary::from_json(&b, id).ok());
        match from_summary {
            Some(s) => Ok(s),
            None => self.read_sidecar(id).map(|m| Summary::from(&m)),
        }
    }

    fn read_sidecar(&self, id: &BackupId) -> Result<Manifest> {
        let bytes = self
            .get_raw(&format!("{id}{SIDECAR}"))
            .ok_or_else(|| Error::NotFound {
                id: id.to_string(),
                location: self.location(),
            })?;
        Manifest::from_sidecar(&bytes, id)
    }

    fn store_err(&self, key: &str, reason: String) -> Error {
        Error::Store {
            location: self.location(),
            key: key.to_owned(),
            reason,
            source: None,
        }
    }
}

/// The backup id of a top-level name, if it is one of ours.
fn id_of(name: &str) -> Option<BackupId> {
    let stem = name.split('/').next().unwrap_or(name);
    let stem = [".tar.gz", ".tar.zst", SUMMARY, SIDECAR]
        .iter()
        .find_map(|s| stem.strip_suffix(s))
        .unwrap_or(stem);
    BackupId::parse(stem).ok()
}

#[async_trait]
impl BackupStore for InMemoryStore {
    fn location(&self) -> String {
        "memory://".to_owned()
    }

    async fn list(&self) -> Result<Vec<Listed>> {
        let sidecars: Vec<BackupId> = self
            .map()
            .keys()
            .filter(|n| !n.contains('/'))
            .filter_map(|n| n.strip_suffix(SIDECAR))
            .filter_map(|stem| BackupId::parse(stem).ok())
            .collect();
        let mut out = Vec::new();
        for id in sidecars {
            match self.read_summary(&id) {
                Ok(s) => match s.damage(self.found(&s)) {
                    None => out.push(Listed::Complete(Box::new(s))),
                    Some(reason) => out.push(Listed::Damaged { id, reason }),
                },
                Err(Error::NotFound { .. }) => {}
                Err(e) => out.push(Listed::Damaged {
                    id,
                    reason: e.to_string(),
                }),
            }
        }
        out.sort_by(|a, b| b.id().cmp(a.id()));
        Ok(out)
    }

    async fn manifest(&self, id: &BackupId) -> Result<Manifest> {
        self.read_sidecar(id)
    }

    async fn put(&self, id: &BackupId, object: &ObjectName, data: ByteStream) -> Result<u64> {
        let name = Self::name(id, object);
        let mut data = data;
        let mut all = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| self.store_err(&name, e.to_string()))?;
            all.extend_from_slice(&chunk);
        }
        let size = all.len() as u64;
        self.map().insert(name, Bytes::from(all));
        Ok(size)
    }

    async fn get(&self, id: &BackupId, object: &ObjectName) -> Result<ByteStream> {
        let bytes = self
            .get_raw(&Self::name(id, object))
            .ok_or_else(|| Error::NotFound {
                id: id.to_string(),
                location: self.location(),
            })?;
        let chunks: Vec<std::io::Result<Bytes>> = (0..bytes.len())
            .step_by(CHUNK)
            .map(|at| Ok(bytes.slice(at..bytes.len().min(at + CHUNK))))
            .collect();
        Ok(futures::stream::iter(chunks).boxed())
    }

    async fn publish(&self, manifest: &Manifest) -> Result<()> {
        let id = &manifest.id;
        let summary = serde_json::to_vec(&Summary::from(manifest))
            .map_err(|e| self.store_err(&format!("{id}{SUMMARY}"), e.to_string()))?;
        let sidecar = manifest
            .to_json()
            .map_err(|e| self.store_err(&format!("{id}{SIDECAR}"), e.to_string()))?;
        self.put_raw(&format!("{id}{SUMMARY}"), &summary);
        self.put_raw(&format!("{id}{SIDECAR}"), &sidecar);
        Ok(())
    }

    async fn delete(&self, id: &BackupId) -> Result<()> {
        let had_sidecar = self.map().remove(&format!("{id}{SIDECAR}")).is_some();
        let data = self.data_names(id);
        if !had_sidecar && data.is_empty() {
            return Err(Error::NotFound {
                id: id.to_string(),
                location: self.location(),
            });
        }
        let mut map = self.map();
        for name in data {
            map.remove(&name);
        }
        Ok(())
    }

    async fn discard(&self, id: &BackupId) -> Result<()> {
        let data = self.data_names(id);
        let mut map = self.map();
        for name in data {
            map.remove(&name);
        }
        Ok(())
    }

    async fn read_status(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.get_raw(STATUS).map(|b| b.to_vec()))
    }

    async fn write_status(&self, bytes: Vec<u8>) -> Result<()> {
        self.put_raw(STATUS, &bytes);
        Ok(())
    }

    async fn cleanup_incomplete(&self) -> Result<Vec<String>> {
        let names = self.names();
        let published: Vec<String> = names
            .iter()
            .filter(|n| !n.contains('/'))
            .filter_map(|n| n.strip_suffix(SIDECAR))
            .map(str::to_owned)
            .collect();
        let mut removed = Vec::new();
        for name in names {
            if name.ends_with(SIDECAR) && !name.contains('/') {
                continue;
            }
            let Some(id) = id_of(&name) else { continue };
            if !published.contains(&id.to_string()) {
                self.map().remove(&name);
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// An [`OperationLock`] in memory; clones share the lock (as processes on
/// one store would).
#[derive(Debug, Clone, Default)]
pub struct InMemoryLock {
    holder: Arc<Mutex<Option<Operation>>>,
}

impl InMemoryLock {
    /// A free lock.
    pub fn new() -> InMemoryLock {
        InMemoryLock::default()
    }
}

/// A held [`InMemoryLock`]; released on `release` and on drop.
#[derive(Debug)]
struct InMemoryGuard {
    holder: Arc<Mutex<Option<Operation>>>,
}

impl Drop for InMemoryGuard {
    fn drop(&mut self) {
        *self.holder.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

#[async_trait]
impl LockGuard for InMemoryGuard {
    async fn release(self: Box<Self>) -> Result<()> {
        drop(self);
        Ok(())
    }
}

#[async_trait]
impl OperationLock for InMemoryLock {
    async fn try_acquire(&self, operation: Operation) -> Result<Box<dyn LockGuard>> {
        let mut holder = self.holder.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(other) = *holder {
            return Err(Error::Busy {
                operation: operation.as_str().to_owned(),
                holder: format!("a {} is running (in this process)", other.as_str()),
            });
        }
        *holder = Some(operation);
        Ok(Box::new(InMemoryGuard {
            holder: Arc::clone(&self.holder),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, Target};

    struct Memory {
        store: InMemoryStore,
        lock: InMemoryLock,
    }

    #[async_trait]
    impl Target for Memory {
        fn store(&self) -> Arc<dyn BackupStore> {
            Arc::new(self.store.clone())
        }

        fn lock(&self) -> Arc<dyn OperationLock> {
            Arc::new(self.lock.clone())
        }

        fn other_lock(&self) -> Arc<dyn OperationLock> {
            Arc::new(self.lock.clone())
        }

        async fn put_raw(&self, name: &str, bytes: &[u8]) {
            self.store.put_raw(name, bytes);
        }

        async fn exists_raw(&self, name: &str) -> bool {
            self.store
                .map()
                .keys()
                .any(|n| n == name || n.starts_with(&format!("{name}/")))
        }
    }

    #[tokio::test]
    async fn the_in_memory_store_passes_the_conformance_suite() {
        conformance::run_all(&Memory {
            store: InMemoryStore::new(),
            lock: InMemoryLock::new(),
        })
        .await;
    }
}
