//! Reading, verifying and restoring through the service over the
//! in-memory store: damaged members, truncated and missing archives, a
//! sidecar of another backup, and a restore that must never commit what
//! does not verify. Fast, no filesystem.

use std::sync::Arc;

use async_trait::async_trait;

use super::tests::{FakeClock, FakeQuiesce, Faults, Log, events, memory_source, push, settings};
use super::{BackupService, Ports, RestoreOptions};
use crate::compat::RunningApp;
use crate::config::Compression;
use crate::error::{Error, Result};
use crate::id::Trigger;
use crate::manifest::{DirEntry, FileEntry, Manifest, SymlinkEntry};
use crate::memory::{InMemoryLock, InMemoryStore};
use crate::ports::{
    ContentCheck, DiscardSink, EntrySink, Listed, MockRestoreTarget, NoNotifier, Staging,
};

/// A staging area that records what it receives and whether it commits.
struct Recording(Log);

#[async_trait]
impl EntrySink for Recording {
    async fn dir(&mut self, _: &DirEntry) -> Result<()> {
        Ok(())
    }
    async fn symlink(&mut self, _: &SymlinkEntry) -> Result<()> {
        Ok(())
    }
    async fn file_start(&mut self, e: &FileEntry) -> Result<()> {
        push(&self.0, &format!("stage {}", e.path));
        Ok(())
    }
    async fn file_data(&mut self, _: &[u8]) -> Result<()> {
        Ok(())
    }
    async fn file_end(&mut self, _: &FileEntry) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl Staging for Recording {
    async fn verify(&mut self) -> Result<()> {
        push(&self.0, "verify staged");
        Ok(())
    }
    async fn commit(self: Box<Self>, _: Option<&crate::ports::Kept>) -> Result<()> {
        push(&self.0, "commit");
        Ok(())
    }
    async fn discard(self: Box<Self>) -> Result<()> {
        push(&self.0, "discard");
        Ok(())
    }
}

fn target(log: &Log) -> MockRestoreTarget {
    let mut t = MockRestoreTarget::new();
    t.expect_recover().returning(|| Ok(vec![]));
    // The filesystem adapter's SQLite and YAML checks are tested end to end.
    t.expect_content_check()
        .returning(|_| Ok(Box::new(DiscardSink) as Box<dyn ContentCheck>));
    t.expect_live_path().returning(|c| format!("/live/{c}"));
    t.expect_check_not_in_use().returning(|_| Ok(()));
    t.expect_is_present().returning(|_| true);
    let l = Arc::clone(log);
    t.expect_stage()
        .returning(move |_, _| Ok(Box::new(Recording(Arc::clone(&l))) as Box<dyn Staging>));
    t
}

fn service(store: &InMemoryStore, log: &Log, compression: Compression) -> BackupService {
    let settings = settings(compression, 10);
    let ports = Ports {
        store: Arc::new(store.clone()),
        lock: Arc::new(InMemoryLock::new()),
        sources: vec![Arc::new(memory_source(log, Faults::default()))],
        quiesce: Arc::new(FakeQuiesce {
            log: Arc::clone(log),
            hang: false,
        }),
        clock: Arc::new(FakeClock { sleep: None }),
        restore_target: Arc::new(target(log)),
        notifier: Arc::new(NoNotifier),
    };
    let app = RunningApp {
        version: semver::Version::new(1, 0, 0),
        supported_schema: Some(1),
        engine: Default::default(),
    };
    BackupService::new(settings, ports, app).unwrap()
}

fn archive_name(m: &Manifest) -> String {
    format!("{}.tar.gz", m.id)
}

fn confirmed() -> RestoreOptions {
    RestoreOptions {
        confirm: true,
        ..RestoreOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_verifies_and_restores_through_staging_then_commits() {
    let (store, log) = (InMemoryStore::default(), Log::default());
    let service = service(&store, &log, Compression::Gzip);
    let m = service.create(Trigger::Manual).await.unwrap();
    assert!(service.verify(&m.id).await.unwrap().ok);
    service.restore(&m.id, confirmed()).await.unwrap();
    let ev = events(&log);
    let staged = ev.iter().position(|e| e == "stage memory/a.txt").unwrap();
    let commit = ev.iter().position(|e| e == "commit").unwrap();
    assert!(staged < commit, "{ev:?}");
    assert!(ev.contains(&"verify staged".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_member_fails_verification_and_never_commits() {
    let (store, log) = (InMemoryStore::default(), Log::default());
    let service = service(&store, &log, Compression::Gzip);
    let m = service.create(Trigger::Manual).await.unwrap();
    let mut bytes = store.space().get_raw(&archive_name(&m)).unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    store.space().put_raw(&archive_name(&m), &bytes);
    let report = service.verify(&m.id).await.unwrap();
    assert!(!report.ok);
    let err = service.restore(&m.id, confirmed()).await.unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err}");
    let ev = events(&log);
    assert!(!ev.contains(&"commit".to_owned()), "{ev:?}");
    assert!(ev.contains(&"discard".to_owned()), "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_missing_archives_are_damaged_in_listings_and_refused() {
    let (store, log) = (InMemoryStore::default(), Log::default());
    let service = service(&store, &log, Compression::Gzip);
    let cut = service.create(Trigger::Manual).await.unwrap();
    let gone = service.create(Trigger::Manual).await.unwrap();
    let bytes = store.space().get_raw(&archive_name(&cut)).unwrap();
    store
        .space()
        .put_raw(&archive_name(&cut), &bytes[..bytes.len() - 10]);
    store.space().put_raw(&archive_name(&gone), b"");
    let listed = service.list().await.unwrap();
    assert!(
        listed.iter().all(|l| matches!(l, Listed::Damaged { .. })),
        "{listed:?}"
    );
    for id in [&cut.id, &gone.id] {
        assert!(!service.verify(id).await.unwrap().ok);
        assert!(service.restore(id, confirmed()).await.is_err());
    }
    assert!(!events(&log).contains(&"commit".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_of_another_backup_is_refused_before_anything_is_read() {
    let (store, log) = (InMemoryStore::default(), Log::default());
    let service = service(&store, &log, Compression::None);
    let a = service.create(Trigger::Manual).await.unwrap();
    let b = service.create(Trigger::Manual).await.unwrap();
    let other = store
        .space()
        .get_raw(&format!("{}.manifest.json", a.id))
        .unwrap();
    store
        .space()
        .put_raw(&format!("{}.manifest.json", b.id), &other);
    let err = service.restore(&b.id, confirmed()).await.unwrap_err();
    assert!(
        matches!(err, Error::Manifest { .. }) && err.to_string().contains(&a.id.to_string()),
        "{err}"
    );
    assert!(!events(&log).iter().any(|e| e.starts_with("stage")));
    // The directory form: a file of the backup removed.
    let gone = format!("{}/memory/a.txt", a.id);
    assert!(store.space().get_raw(&gone).is_some());
    store.space().put_raw(&gone, b"hellX");
    assert!(!service.verify(&a.id).await.unwrap().ok);
}
