//! The conformance suite every [`BackupStore`] and [`OperationLock`] must
//! pass (like object_store's `integration.rs`): each adapter's tests call
//! [`run_all`] (or the single checks) on its own target.
//!
//! Compiled with the `conformance` feature (and in this crate's tests).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::config::Compression;
use crate::digest::{Sha256Digest, Sha256Hasher};
use crate::error::Error;
use crate::id::{BackupId, Component, Trigger};
use crate::manifest::{ArchiveInfo, FileEntry, Manifest, ManifestVersion, tree_checksum};
use crate::path::ArchivePath;
use crate::ports::{BackupStore, ByteStream, Listed, ObjectName, Operation, OperationLock};

/// What the suite needs of a target besides the ports.
#[async_trait]
pub trait Target: Send + Sync {
    /// The store under test (empty at the start).
    fn store(&self) -> Arc<dyn BackupStore>;
    /// A lock on the store.
    fn lock(&self) -> Arc<dyn OperationLock>;
    /// A second, independent lock on the same store, as another process
    /// would have.
    fn other_lock(&self) -> Arc<dyn OperationLock>;
    /// Writes raw bytes at `name`, relative to the store's root or prefix,
    /// bypassing the store (junk, corrupt sidecars).
    async fn put_raw(&self, name: &str, bytes: &[u8]);
    /// Whether anything exists at `name` (relative to root or prefix).
    async fn exists_raw(&self, name: &str) -> bool;
}

/// The ids `store` lists, in its order.
pub async fn listed_ids(store: &dyn BackupStore) -> Vec<BackupId> {
    store
        .list()
        .await
        .unwrap()
        .iter()
        .map(|l| l.id().clone())
        .collect()
}

/// Runs every check.
pub async fn run_all(target: &dyn Target) {
    put_get_publish_list_delete(target).await;
    unpublished_backups_are_invisible_and_cleaned_up(target).await;
    directory_form_objects(target).await;
    listing_ignores_junk_and_reports_damaged_sidecars(target).await;
    every_id_form_round_trips(target).await;
    delete_of_a_missing_id_is_not_found(target).await;
    large_objects_stream(target, 80 << 20).await;
    exactly_one_lock_winner(target).await;
    lock_is_released_by_release_and_drop(target).await;
}

fn stream_of(data: Vec<u8>) -> ByteStream {
    let chunks: Vec<std::io::Result<Bytes>> = data
        .chunks(100_000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(chunks).boxed()
}

async fn read_all(s: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = s;
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

fn ts(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap()
}

/// A valid manifest for `id` whose archive is `archive` (or the directory
/// form with one config file of `content` when `archive` is `None`).
pub fn manifest_for(id: &BackupId, archive: Option<&[u8]>, content: &[u8]) -> Manifest {
    let files = vec![FileEntry {
        path: ArchivePath::parse("config/company.yaml").unwrap(),
        size: content.len() as u64,
        sha256: Sha256Digest::of(content),
        mode: Some(0o600),
        mtime: Some(0),
        uid: None,
        gid: None,
    }];
    Manifest {
        version: ManifestVersion::CURRENT,
        id: id.clone(),
        synthorg_version: semver::Version::new(1, 0, 0),
        timestamp: id.timestamp(),
        trigger: id.trigger(),
        components: vec![Component::Config],
        absent: Vec::new(),
        sequence: 0,
        db_schema_version: None,
        engine: Default::default(),
        size_bytes: content.len() as u64,
        checksum: tree_checksum(&files, &[], &[]),
        compression: if archive.is_some() {
            Compression::Gzip
        } else {
            Compression::None
        },
        archive: archive.map(|a| ArchiveInfo {
            sha256: Sha256Digest::of(a),
            size_bytes: a.len() as u64,
            members: vec![0],
            inner_size_bytes: None,
            pieces: None,
        }),
        encrypted: false,
        recipients: Vec::new(),
        files,
        dirs: vec![],
        symlinks: vec![],
        labels: BTreeMap::new(),
    }
}

pub async fn put_get_publish_list_delete(target: &dyn Target) {
    let store = target.store();
    // The status record: absent, then replaced whole, never listed.
    assert_eq!(store.read_status().await.unwrap(), None);
    store.write_status(b"{\"a\":1}".to_vec()).await.unwrap();
    store.write_status(b"{}".to_vec()).await.unwrap();
    assert_eq!(store.read_status().await.unwrap(), Some(b"{}".to_vec()));
    assert!(store.list().await.unwrap().is_empty());
    assert!(store.cleanup_incomplete().await.unwrap().is_empty());
    let id = BackupId::new(ts(1_800_000_000), Trigger::Manual, 1);
    let archive = b"pretend this is a tar.gz".to_vec();
    let object = ObjectName::Archive(Compression::Gzip);
    let written = store
        .put(&id, &object, stream_of(archive.clone()))
        .await
        .unwrap();
    assert_eq!(written, archive.len() as u64);
    assert!(
        store.list().await.unwrap().is_empty(),
        "not listed before publish"
    );
    assert!(matches!(
        store.manifest(&id).await,
        Err(Error::NotFound { .. })
    ));

    let manifest = manifest_for(&id, Some(&archive), b"x");
    store.publish(&manifest).await.unwrap();
    let listed = store.list().await.unwrap();
    assert!(
        matches!(&listed[..], [Listed::Complete(m)] if **m == crate::manifest::Summary::from(&manifest)),
        "{listed:?}"
    );
    assert_eq!(store.manifest(&id).await.unwrap(), manifest);
    assert_eq!(
        read_all(store.get(&id, &object).await.unwrap()).await,
        archive
    );
    // Positional reads: served exactly where the store says it can (there
    // a backup records piece digests for the next one to copy members).
    match store.open_ranges(&id, &object).await {
        Some(ranges) => {
            assert!(store.reads_ranges(), "ranges served but not announced");
            let mut buf = [0u8; 7];
            ranges.read_at(8, &mut buf).unwrap();
            assert_eq!(&buf, &archive[8..15]);
            assert!(ranges.read_at(archive.len() as u64 - 2, &mut buf).is_err());
        }
        None => assert!(!store.reads_ranges(), "announced but not served"),
    }
    assert!(
        store
            .open_ranges(&id, &ObjectName::Archive(Compression::Zstd))
            .await
            .is_none()
    );

    // Overwriting an object replaces it whole.
    store
        .put(&id, &object, stream_of(b"v2".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        read_all(store.get(&id, &object).await.unwrap()).await,
        b"v2"
    );
    // An archive of another size than the manifest records (truncated,
    // replaced) is listed as damaged, never as complete.
    let listed = store.list().await.unwrap();
    assert!(
        matches!(&listed[..], [Listed::Damaged { id: d, reason }] if *d == id && reason.contains("bytes")),
        "{listed:?}"
    );

    store.delete(&id).await.unwrap();
    assert!(store.list().await.unwrap().is_empty());
    assert!(matches!(
        store.get(&id, &object).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.manifest(&id).await,
        Err(Error::NotFound { .. })
    ));
}

pub async fn unpublished_backups_are_invisible_and_cleaned_up(target: &dyn Target) {
    let store = target.store();
    let done = BackupId::new(ts(1_800_000_100), Trigger::Scheduled, 1);
    let half = BackupId::new(ts(1_800_000_200), Trigger::Scheduled, 1);
    let gz = ObjectName::Archive(Compression::Gzip);
    store
        .put(&done, &gz, stream_of(b"complete".to_vec()))
        .await
        .unwrap();
    store
        .publish(&manifest_for(&done, Some(b"complete"), b"x"))
        .await
        .unwrap();
    store
        .put(&half, &gz, stream_of(b"interrupted".to_vec()))
        .await
        .unwrap();
    assert_eq!(listed_ids(store.as_ref()).await, vec![done.clone()]);
    let removed = store.cleanup_incomplete().await.unwrap();
    assert!(
        removed.iter().any(|r| r.contains(&half.to_string())),
        "{removed:?}"
    );
    assert!(matches!(
        store.get(&half, &gz).await,
        Err(Error::NotFound { .. })
    ));
    assert!(
        store.get(&done, &gz).await.is_ok(),
        "published backups are kept"
    );
    assert!(
        store.cleanup_incomplete().await.unwrap().is_empty(),
        "idempotent"
    );
    store.discard(&half).await.unwrap(); // discarding nothing is fine
    store.delete(&done).await.unwrap();
}

pub async fn directory_form_objects(target: &dyn Target) {
    let store = target.store();
    let id = BackupId::new(ts(1_800_000_300), Trigger::Manual, 1);
    let path = ArchivePath::parse("config/company.yaml").unwrap();
    store
        .put(
            &id,
            &ObjectName::File(path.clone()),
            stream_of(b"name: x\n".to_vec()),
        )
        .await
        .unwrap();
    store
        .put(&id, &ObjectName::InnerManifest, stream_of(b"{}".to_vec()))
        .await
        .unwrap();
    store
        .publish(&manifest_for(&id, None, b"name: x\n"))
        .await
        .unwrap();
    assert_eq!(
        read_all(
            store
                .get(&id, &ObjectName::File(path.clone()))
                .await
                .unwrap()
        )
        .await,
        b"name: x\n"
    );
    store.delete(&id).await.unwrap();
    assert!(matches!(
        store.get(&id, &ObjectName::File(path)).await,
        Err(Error::NotFound { .. })
    ));

    // Discard removes an unpublished directory-form backup entirely.
    let other = BackupId::new(ts(1_800_000_301), Trigger::Manual, 1);
    let p = ArchivePath::parse("memory/a/b.bin").unwrap();
    store
        .put(&other, &ObjectName::File(p.clone()), stream_of(vec![1; 10]))
        .await
        .unwrap();
    store.discard(&other).await.unwrap();
    assert!(matches!(
        store.get(&other, &ObjectName::File(p)).await,
        Err(Error::NotFound { .. })
    ));
}

pub async fn listing_ignores_junk_and_reports_damaged_sidecars(target: &dyn Target) {
    let store = target.store();
    target.put_raw("README.txt", b"not ours").await;
    target.put_raw("notes.manifest.json", b"{}").await;
    target
        .put_raw("2026-13-99T00-00-00_manual.manifest.json", b"{}")
        .await;
    let bad = BackupId::new(ts(1_800_000_400), Trigger::Manual, 1);
    target
        .put_raw(&format!("{bad}.manifest.json"), b"{ this is not json")
        .await;
    let good = BackupId::new(ts(1_800_000_500), Trigger::Manual, 1);
    store
        .put(
            &good,
            &ObjectName::Archive(Compression::Gzip),
            stream_of(b"a".to_vec()),
        )
        .await
        .unwrap();
    store
        .publish(&manifest_for(&good, Some(b"a"), b"x"))
        .await
        .unwrap();
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        matches!(&listed[0], Listed::Complete(m) if m.id == good),
        "newest first"
    );
    assert!(matches!(&listed[1], Listed::Damaged { id, .. } if *id == bad));
    store.cleanup_incomplete().await.unwrap();
    assert!(
        target.exists_raw("README.txt").await,
        "foreign files are never removed"
    );
    store.delete(&bad).await.unwrap();
    store.delete(&good).await.unwrap();
}

pub async fn every_id_form_round_trips(target: &dyn Target) {
    let store = target.store();
    let mut ids = Vec::new();
    for (i, trigger) in Trigger::ALL.into_iter().enumerate() {
        for seq in [1, 2, 999_999_999] {
            ids.push(BackupId::new(ts(1_800_001_000 + i as i64), trigger, seq));
        }
    }
    for id in &ids {
        store
            .put(
                id,
                &ObjectName::Archive(Compression::Zstd),
                stream_of(id.to_string().into_bytes()),
            )
            .await
            .unwrap();
        let mut m = manifest_for(id, Some(id.to_string().as_bytes()), b"x");
        m.compression = Compression::Zstd;
        store.publish(&m).await.unwrap();
    }
    let listed = listed_ids(store.as_ref()).await;
    let mut want = ids.clone();
    want.sort_by(|a, b| b.cmp(a));
    assert_eq!(listed, want);
    for id in &ids {
        let got = read_all(
            store
                .get(id, &ObjectName::Archive(Compression::Zstd))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(got, id.to_string().into_bytes());
        store.delete(id).await.unwrap();
    }
}

pub async fn delete_of_a_missing_id_is_not_found(target: &dyn Target) {
    let store = target.store();
    let id = BackupId::new(ts(1_800_002_000), Trigger::Manual, 1);
    assert!(matches!(
        store.delete(&id).await,
        Err(Error::NotFound { .. })
    ));
}

/// Streams `size` bytes through put and get without holding them.
pub async fn large_objects_stream(target: &dyn Target, size: u64) {
    let store = target.store();
    let id = BackupId::new(ts(1_800_003_000), Trigger::Manual, 1);
    let chunk = Bytes::from(
        (0..1_048_576u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect::<Vec<u8>>(),
    );
    let count = size.div_ceil(chunk.len() as u64);
    let mut want = Sha256Hasher::new();
    for _ in 0..count {
        want.update(&chunk);
    }
    let c = chunk.clone();
    let data = futures::stream::iter(0..count)
        .map(move |_| Ok(c.clone()))
        .boxed();
    let written = store
        .put(&id, &ObjectName::Archive(Compression::Gzip), data)
        .await
        .unwrap();
    assert_eq!(written, count * chunk.len() as u64);
    let mut got = Sha256Hasher::new();
    let mut n = 0u64;
    let mut s = store
        .get(&id, &ObjectName::Archive(Compression::Gzip))
        .await
        .unwrap();
    while let Some(part) = s.next().await {
        let part = part.unwrap();
        n += part.len() as u64;
        got.update(&part);
    }
    assert_eq!(n, written);
    assert_eq!(got.finish(), want.finish());
    store.discard(&id).await.unwrap();
}

pub async fn exactly_one_lock_winner(target: &dyn Target) {
    let locks = [
        target.lock(),
        target.other_lock(),
        target.lock(),
        target.other_lock(),
    ];
    let attempts = locks.iter().map(|l| {
        let l = Arc::clone(l);
        async move { l.try_acquire(Operation::Backup).await }
    });
    let results = futures::future::join_all(attempts).await;
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, Error::Busy { .. }), "{e}");
            assert!(e.to_string().contains("backup"), "{e}");
        }
    }
    for r in results.into_iter().flatten() {
        r.release().await.unwrap();
    }
}

pub async fn lock_is_released_by_release_and_drop(target: &dyn Target) {
    let guard = target.lock().try_acquire(Operation::Restore).await.unwrap();
    let busy = target
        .other_lock()
        .try_acquire(Operation::Delete)
        .await
        .unwrap_err();
    assert!(
        busy.to_string().contains("restore"),
        "the holder is named: {busy}"
    );
    guard.release().await.unwrap();
    let guard = target
        .other_lock()
        .try_acquire(Operation::Delete)
        .await
        .unwrap();
    drop(guard);
    // A drop may release in the background (a remote lock): allow it time.
    let mut again = target.lock().try_acquire(Operation::Prune).await;
    for _ in 0..50 {
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        again = target.lock().try_acquire(Operation::Prune).await;
    }
    assert!(
        again.is_ok(),
        "dropping a guard releases the lock: {again:?}"
    );
}
