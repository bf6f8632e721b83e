//! [`SafetyPool`]: a remote store whose restores keep their safety backups
//! on the machine whose data they hold.
//!
//! A restore's `pre-restore` safety backup is the live state it replaces.
//! Kept in a local directory beside the data, the swap renames the replaced
//! items into it (no copy, no compression, no upload: what a restore from
//! S3 then costs is the download). Every other backup, and the status
//! record, is the remote store's. The pool never leaves the machine:
//! encryption, which is for what leaves it, does not apply to it (a
//! regular safety backup, taken where moving is not possible, is still
//! encrypted when backups are).
//!
//! The two are one store to the service: listings are merged, and a
//! `pre-restore` backup is looked up in the pool first, then in the remote
//! store (where safety backups of earlier versions are).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::id::{BackupId, Trigger};
use crate::manifest::Manifest;
use crate::ports::{BackupStore, ByteStream, Listed, ObjectName, Sidecar};

/// The remote store `main`, with `pre-restore` backups in the local `pool`.
pub struct SafetyPool {
    main: Arc<dyn BackupStore>,
    pool: Arc<dyn BackupStore>,
}

impl SafetyPool {
    /// `main` for every backup but new `pre-restore` ones, which go to `pool`.
    pub fn new(main: Arc<dyn BackupStore>, pool: Arc<dyn BackupStore>) -> SafetyPool {
        SafetyPool { main, pool }
    }
}

impl fmt::Debug for SafetyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetyPool")
            .field("main", &self.main.location())
            .field("pool", &self.pool.location())
            .finish()
    }
}

/// Whether backup `id` belongs in the pool.
fn pooled(id: &BackupId) -> bool {
    id.trigger() == Trigger::PreRestore
}

impl SafetyPool {
    /// Where a new backup `id` is written.
    fn home(&self, id: &BackupId) -> &dyn BackupStore {
        if pooled(id) {
            self.pool.as_ref()
        } else {
            self.main.as_ref()
        }
    }
}

/// `first`'s answer, or `then`'s where `first` has no such backup.
async fn either<T>(
    first: impl Future<Output = Result<T>>,
    then: impl Future<Output = Result<T>>,
) -> Result<T> {
    match first.await {
        Err(Error::NotFound { .. }) => then.await,
        other => other,
    }
}

#[async_trait]
impl BackupStore for SafetyPool {
    fn location(&self) -> String {
        self.main.location()
    }

    async fn list(&self) -> Result<Vec<Listed>> {
        let (main, pool) = futures::join!(self.main.list(), self.pool.list());
        let mut all = main?;
        match pool {
            Ok(pool) => {
                let remote: std::collections::HashSet<BackupId> =
                    all.iter().map(|l| l.id().clone()).collect();
                // Only the safety backups: other backups at `backup.path`
                // (taken before the switch to S3, or by a local
                // configuration sharing the directory) are not this
                // store's; listed here, retention would prune them through
                // the main store, where they are not.
                all.extend(
                    pool.into_iter()
                        .filter(|l| pooled(l.id()) && !remote.contains(l.id())),
                );
            }
            // The remote backups are still there to list (and a retention
            // run then leaves the pool as it is).
            Err(e) => tracing::error!(pool = %self.pool.location(), error = %e,
                "the local pool of safety backups cannot be listed; listing without it"),
        }
        all.sort_by(|a, b| b.id().cmp(a.id()));
        Ok(all)
    }

    async fn sidecar(&self, id: &BackupId) -> Result<Sidecar> {
        if pooled(id) {
            either(self.pool.sidecar(id), self.main.sidecar(id)).await
        } else {
            self.main.sidecar(id).await
        }
    }

    async fn put(&self, id: &BackupId, object: &ObjectName, data: ByteStream) -> Result<u64> {
        self.home(id).put(id, object, data).await
    }

    async fn get(&self, id: &BackupId, object: &ObjectName) -> Result<ByteStream> {
        if pooled(id) {
            either(self.pool.get(id, object), self.main.get(id, object)).await
        } else {
            self.main.get(id, object).await
        }
    }

    async fn publish(&self, manifest: &Manifest) -> Result<()> {
        self.home(&manifest.id).publish(manifest).await
    }

    async fn delete(&self, id: &BackupId) -> Result<()> {
        if pooled(id) {
            either(self.pool.delete(id), self.main.delete(id)).await
        } else {
            self.main.delete(id).await
        }
    }

    async fn discard(&self, id: &BackupId) -> Result<()> {
        self.home(id).discard(id).await
    }

    async fn read_status(&self) -> Result<Option<Vec<u8>>> {
        self.main.read_status().await
    }

    async fn write_status(&self, bytes: Vec<u8>) -> Result<()> {
        self.main.write_status(bytes).await
    }

    async fn cleanup_incomplete(&self) -> Result<Vec<String>> {
        let mut removed = self.main.cleanup_incomplete().await?;
        removed.extend(self.pool.cleanup_incomplete().await?);
        Ok(removed)
    }

    fn local_dir(&self, id: &BackupId) -> Option<std::path::PathBuf> {
        self.home(id).local_dir(id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;
    use futures::StreamExt;

    use super::*;
    use crate::config::Compression;
    use crate::conformance::{listed_ids, manifest_for};
    use crate::layout::Layout;
    use crate::memory::InMemoryObjects;
    use crate::ports::MockBackupStore;

    fn id(secs: i64, trigger: Trigger) -> BackupId {
        BackupId::new(
            chrono::DateTime::from_timestamp(secs, 0).unwrap(),
            trigger,
            1,
        )
    }

    async fn put_backup(store: &dyn BackupStore, id: &BackupId) {
        let data = id.to_string().into_bytes();
        let stream = futures::stream::once(async move { Ok(Bytes::from(data)) }).boxed();
        store
            .put(id, &ObjectName::Archive(Compression::Gzip), stream)
            .await
            .unwrap();
        store
            .publish(&manifest_for(id, Some(id.to_string().as_bytes()), b"x"))
            .await
            .unwrap();
    }

    fn stores() -> (InMemoryObjects, InMemoryObjects, SafetyPool) {
        let (main, pool) = (InMemoryObjects::default(), InMemoryObjects::default());
        let store = SafetyPool::new(
            Arc::new(Layout::new(main.clone())),
            Arc::new(Layout::new(pool.clone())),
        );
        (main, pool, store)
    }

    #[tokio::test]
    async fn safety_backups_go_to_the_pool_the_rest_and_the_status_to_the_main_store() {
        let (main, pool, store) = stores();
        let (manual, safety) = (id(1_000, Trigger::Manual), id(2_000, Trigger::PreRestore));
        put_backup(&store, &manual).await;
        put_backup(&store, &safety).await;
        store.write_status(b"{}".to_vec()).await.unwrap();
        let named = |space: &InMemoryObjects, id: &BackupId| {
            space.names().iter().any(|n| n.starts_with(&id.to_string()))
        };
        assert!(named(&main, &manual) && !named(&pool, &manual));
        assert!(named(&pool, &safety) && !named(&main, &safety));
        assert!(main.get_raw(crate::layout::STATUS_NAME).is_some());
        assert!(pool.get_raw(crate::layout::STATUS_NAME).is_none());
        assert_eq!(
            listed_ids(&store).await,
            vec![safety.clone(), manual.clone()],
            "merged, newest first"
        );
        assert_eq!(store.manifest(&safety).await.unwrap().id, safety);
        store.delete(&safety).await.unwrap();
        assert!(!named(&pool, &safety));
        assert_eq!(store.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_safety_backup_of_an_earlier_version_in_the_main_store_is_still_found() {
        let (main, pool, store) = stores();
        let old = id(3_000, Trigger::PreRestore);
        put_backup(&Layout::new(main.clone()), &old).await;
        assert_eq!(store.list().await.unwrap()[0].id(), &old);
        assert_eq!(store.manifest(&old).await.unwrap().id, old);
        assert!(matches!(
            store.sidecar(&old).await.unwrap(),
            Sidecar::Clear(_)
        ));
        let mut read = Vec::new();
        let mut stream = store
            .get(&old, &ObjectName::Archive(Compression::Gzip))
            .await
            .unwrap();
        while let Some(chunk) = stream.next().await {
            read.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(read, old.to_string().into_bytes());
        store.delete(&old).await.unwrap();
        assert!(main.names().is_empty() && pool.names().is_empty());
        assert!(matches!(
            store.delete(&old).await,
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            store.manifest(&old).await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn other_backups_in_the_pool_directory_are_not_the_stores() {
        let (main, pool, store) = stores();
        let manual = id(1_000, Trigger::Manual);
        put_backup(&store, &manual).await;
        // Left at backup.path by a local configuration (before the switch
        // to S3, or sharing the directory).
        let local = (id(500, Trigger::Manual), id(600, Trigger::Scheduled));
        put_backup(&Layout::new(pool.clone()), &local.0).await;
        put_backup(&Layout::new(pool.clone()), &local.1).await;
        let safety = id(2_000, Trigger::PreRestore);
        put_backup(&store, &safety).await;
        assert_eq!(listed_ids(&store).await, vec![safety, manual.clone()]);
        // Deleting what it lists leaves the directory's own alone.
        let before = pool.names();
        store.delete(&manual).await.unwrap();
        assert!(
            main.names()
                .iter()
                .all(|n| !n.starts_with(&manual.to_string()))
        );
        assert_eq!(
            pool.names(),
            before,
            "the directory's own backups untouched"
        );
        assert!(matches!(
            store.manifest(&local.0).await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn a_pool_that_cannot_be_listed_leaves_the_main_listing() {
        let main = InMemoryObjects::default();
        let manual = id(1_000, Trigger::Manual);
        put_backup(&Layout::new(main.clone()), &manual).await;
        let mut broken = MockBackupStore::new();
        broken.expect_list().returning(|| {
            Err(Error::Store {
                location: "/pool".into(),
                key: "/pool".into(),
                reason: "permission denied".into(),
                source: None,
            })
        });
        broken.expect_location().return_const("/pool".to_owned());
        let store = SafetyPool::new(Arc::new(Layout::new(main)), Arc::new(broken));
        let listed = store.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id(), &manual);
    }
}
