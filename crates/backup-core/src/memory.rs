//! [`InMemoryStore`] and [`InMemoryLock`]: the store and lock ports held in
//! memory (like object_store's `InMemory`): the shared [`Layout`] over
//! objects in a map. They pass the conformance suite and let the core test reading,
//! verifying and restoring without a filesystem.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::id::BackupId;
use crate::layout::Layout;
use crate::ports::{
    ByteStream, LockGuard, ObjectSpace, Operation, OperationLock, RootListing, Small,
};

/// Chunk size of streams handed out by `get`.
const CHUNK: usize = 64 * 1024;

/// Objects by name, shared by the clones of a space.
type Objects = Arc<Mutex<BTreeMap<String, Bytes>>>;

/// An [`ObjectSpace`] in memory: `/` in a name makes a directory.
#[derive(Debug, Clone, Default)]
pub struct InMemoryObjects {
    objects: Objects,
    /// Names written with `put_unsettled` and not settled since: what a
    /// power cut may take ([`crash`](InMemoryObjects::crash)).
    unsettled: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

/// A [`BackupStore`](crate::ports::BackupStore) in memory.
pub type InMemoryStore = Layout<InMemoryObjects>;

impl InMemoryObjects {
    /// Writes raw bytes under `name`, bypassing the protocol (tests: junk,
    /// damaged objects).
    pub fn put_raw(&self, name: &str, bytes: &[u8]) {
        self.map()
            .insert(name.to_owned(), Bytes::copy_from_slice(bytes));
    }

    /// A power cut: objects not yet settled are lost.
    pub fn crash(&self) {
        let lost = std::mem::take(&mut *self.unsettled());
        let mut map = self.map();
        for name in lost {
            map.remove(&name);
        }
    }

    fn unsettled(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.unsettled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
}

#[async_trait]
impl ObjectSpace for InMemoryObjects {
    fn location(&self) -> String {
        "memory://".to_owned()
    }

    async fn list_root(&self) -> Result<RootListing> {
        let mut listing = RootListing::default();
        for (name, bytes) in self.map().iter() {
            match name.split_once('/') {
                Some((dir, _)) => {
                    if listing.dirs.last().map(String::as_str) != Some(dir) {
                        listing.dirs.push(dir.to_owned());
                    }
                }
                None => listing.objects.push((name.clone(), bytes.len() as u64)),
            }
        }
        Ok(listing)
    }

    async fn read_small(&self, name: &str, limit: usize) -> Result<Small> {
        Ok(match self.get_raw(name) {
            Some(b) if b.len() > limit => Small::TooLarge(b.len() as u64),
            Some(b) => Small::Found(b.to_vec()),
            None => Small::Missing,
        })
    }

    async fn write_small(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.map().insert(name.to_owned(), Bytes::from(bytes));
        Ok(())
    }

    async fn put(&self, name: &str, data: ByteStream) -> Result<u64> {
        let mut data = data;
        let mut all = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| Error::Store {
                location: self.location(),
                key: name.to_owned(),
                reason: format!("source stream failed: {e}"),
                source: None,
            })?;
            all.extend_from_slice(&chunk);
        }
        let size = all.len() as u64;
        self.map().insert(name.to_owned(), Bytes::from(all));
        self.unsettled().remove(name);
        Ok(size)
    }

    async fn put_unsettled(&self, name: &str, data: ByteStream) -> Result<u64> {
        let size = self.put(name, data).await?;
        self.unsettled().insert(name.to_owned());
        Ok(size)
    }

    async fn settle(&self) -> Result<()> {
        self.unsettled().clear();
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<ByteStream>> {
        Ok(self.get_raw(name).map(|bytes| {
            let chunks: Vec<std::io::Result<Bytes>> = (0..bytes.len())
                .step_by(CHUNK)
                .map(|at| Ok(bytes.slice(at..bytes.len().min(at + CHUNK))))
                .collect();
            futures::stream::iter(chunks).boxed()
        }))
    }

    async fn remove(&self, name: &str) -> Result<bool> {
        let dir = format!("{name}/");
        let mut map = self.map();
        let before = map.len();
        map.retain(|n, _| n != name && !n.starts_with(&dir));
        Ok(map.len() != before)
    }

    async fn remove_partial(&self, _: Option<&BackupId>) -> Result<Vec<String>> {
        Ok(Vec::new()) // writes here are never partial
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
    use crate::ports::BackupStore;

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
            self.store.space().put_raw(name, bytes);
        }

        async fn exists_raw(&self, name: &str) -> bool {
            self.store
                .space()
                .names()
                .iter()
                .any(|n| n == name || n.starts_with(&format!("{name}/")))
        }
    }

    #[tokio::test]
    async fn the_in_memory_store_passes_the_conformance_suite() {
        conformance::run_all(&Memory {
            store: InMemoryStore::default(),
            lock: InMemoryLock::new(),
        })
        .await;
    }
}
