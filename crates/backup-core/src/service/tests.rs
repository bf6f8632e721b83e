//! Orchestration of `create` against mocked ports: what happens in which
//! order, and what always happens (resume, lock release, cleanup) when a
//! step fails.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::{BackupService, CreateOptions, Ports, Settings};
use crate::compat::RunningApp;
use crate::config::Compression;
use crate::error::{Error, Result};
use crate::id::{BackupId, Component, Trigger};
use crate::manifest::{Manifest, Summary};
use crate::path::ArchivePath;
use crate::ports::{
    BackupStore, ByteStream, Clock, EntryKind, Listed, MockComponentSource, MockLockGuard,
    MockOperationLock, MockRestoreTarget, ObjectName, Opened, Quiesce, Snapshot, SnapshotEntry,
};
use crate::retention::RetentionPolicy;

pub(super) type Log = Arc<Mutex<Vec<String>>>;

pub(super) fn push(log: &Log, event: &str) {
    log.lock().unwrap().push(event.to_owned());
}

pub(super) fn events(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// A clock at a fixed time whose sleeps complete after `sleep` (never, for
/// `None`), so that timeouts fire only when a test wants them to.
#[derive(Debug)]
pub(super) struct FakeClock {
    pub(super) sleep: Option<Duration>,
}

#[async_trait]
impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    async fn sleep(&self, _: Duration) {
        match self.sleep {
            Some(d) => tokio::time::sleep(d).await,
            None => futures::future::pending().await,
        }
    }
}

/// A snapshot of one small file.
struct FakeSnapshot {
    entries: Vec<SnapshotEntry>,
    log: Log,
    fail_open: bool,
}

#[async_trait]
impl Snapshot for FakeSnapshot {
    fn entries(&self) -> &[SnapshotEntry] {
        &self.entries
    }

    fn db_schema_version(&self) -> Option<i64> {
        None
    }

    async fn open(&self, path: &ArchivePath) -> Result<Opened> {
        push(&self.log, "open");
        if self.fail_open {
            return Err(Error::Source {
                component: Component::Memory,
                path: path.to_string(),
                reason: "injected".into(),
                source: None,
            });
        }
        Ok(Opened {
            size: 5,
            stream: futures::stream::once(async { Ok(bytes::Bytes::from_static(b"hello")) })
                .boxed(),
        })
    }

    async fn finish(self: Box<Self>) -> Result<()> {
        push(&self.log, "finish");
        Ok(())
    }
}

/// What a scenario changes.
#[derive(Default, Clone, Copy)]
pub(super) struct Faults {
    snapshot_fails: bool,
    open_fails: bool,
    put_fails: bool,
    pause_hangs: bool,
    snapshot_panics: bool,
    /// An interrupted restore that cannot be recovered.
    recover_fails: bool,
}

pub(super) fn memory_source(log: &Log, faults: Faults) -> MockComponentSource {
    let mut source = MockComponentSource::new();
    source.expect_component().return_const(Component::Memory);
    source.expect_needs_quiesce().return_const(true);
    let log = Arc::clone(log);
    let snapshot = Arc::new(move || -> Result<Box<dyn crate::ports::Snapshot>> {
        push(&log, "snapshot");
        if faults.snapshot_panics {
            panic!("source panicked");
        }
        if faults.snapshot_fails {
            return Err(Error::Source {
                component: Component::Memory,
                path: "memory".into(),
                reason: "injected".into(),
                source: None,
            });
        }
        Ok(Box::new(FakeSnapshot {
            entries: vec![SnapshotEntry {
                path: ArchivePath::parse("memory/a.txt").unwrap(),
                kind: EntryKind::File,
                size: 5,
                mode: 0o600,
                mtime: 0,
                owner: None,
            }],
            log: Arc::clone(&log),
            fail_open: faults.open_fails,
        }))
    });
    // A restore's safety backup snapshots settled sources: the same here.
    let settled = Arc::clone(&snapshot);
    source.expect_snapshot().returning(move || snapshot());
    source
        .expect_snapshot_settled()
        .returning(move || settled());
    source
}

/// A store that drains what it is given, like a real one, and records
/// every call.
#[derive(Debug)]
struct FakeStore {
    log: Log,
    listed: Mutex<Vec<Listed>>,
    put_fails: bool,
}

#[async_trait]
impl BackupStore for FakeStore {
    fn location(&self) -> String {
        "fake://store".into()
    }

    async fn list(&self) -> Result<Vec<Listed>> {
        push(&self.log, "list");
        Ok(self.listed.lock().unwrap().clone())
    }

    async fn sidecar(&self, id: &BackupId) -> Result<crate::ports::Sidecar> {
        Err(Error::NotFound {
            id: id.to_string(),
            location: self.location(),
        })
    }

    async fn put(&self, _: &BackupId, object: &ObjectName, data: ByteStream) -> Result<u64> {
        let mut data = data;
        let mut n = 0u64;
        while let Some(chunk) = data.next().await {
            n += chunk.map_err(|e| Error::Cancelled(e.to_string()))?.len() as u64;
        }
        push(
            &self.log,
            if *object == ObjectName::Pieces {
                "put pieces"
            } else {
                "put"
            },
        );
        if self.put_fails {
            return Err(Error::Store {
                location: self.location(),
                key: "archive".into(),
                reason: "injected".into(),
                source: None,
            });
        }
        Ok(n)
    }

    async fn get(&self, id: &BackupId, _: &ObjectName) -> Result<ByteStream> {
        Err(Error::NotFound {
            id: id.to_string(),
            location: self.location(),
        })
    }

    async fn publish(&self, m: &Manifest) -> Result<()> {
        push(&self.log, &format!("publish {}", m.id));
        self.listed
            .lock()
            .unwrap()
            .push(Listed::Complete(Box::new(m.into())));
        Ok(())
    }

    async fn delete(&self, id: &BackupId) -> Result<()> {
        push(&self.log, &format!("delete {id}"));
        Ok(())
    }

    async fn discard(&self, _: &BackupId) -> Result<()> {
        push(&self.log, "discard");
        Ok(())
    }

    async fn read_status(&self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    async fn write_status(&self, _: Vec<u8>) -> Result<()> {
        push(&self.log, "status");
        Ok(())
    }

    async fn cleanup_incomplete(&self) -> Result<Vec<String>> {
        push(&self.log, "cleanup");
        Ok(vec![])
    }
}

/// A writer that pauses at once, or never reaches a safe point (`hang`).
#[derive(Debug)]
pub(super) struct FakeQuiesce {
    pub(super) log: Log,
    pub(super) hang: bool,
}

#[async_trait]
impl Quiesce for FakeQuiesce {
    async fn pause(&self) -> Result<()> {
        push(&self.log, "pause");
        if self.hang {
            futures::future::pending::<()>().await;
        }
        Ok(())
    }

    fn resume(&self) {
        push(&self.log, "resume");
    }
}

/// Settings of the test services: memory only, fast compression.
pub(super) fn settings(compression: Compression, max_count: u32) -> Settings {
    Settings {
        compression,
        compression_level: Some(1),
        include: vec![Component::Memory],
        retention: RetentionPolicy {
            max_count,
            max_age_days: 3650,
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
            keep_pre_restore: 3,
        },
        quiesce_timeout: Duration::from_secs(30),
        encrypt_to: Ok(None),
        identity: crate::crypt::IdentityState::None,
    }
}

/// A service over fakes and mocks that record every call in `log`.
/// `listed` is what the store lists (before this backup).
fn service(log: &Log, faults: Faults, listed: Vec<Listed>, max_count: u32) -> BackupService {
    let store = FakeStore {
        log: Arc::clone(log),
        listed: Mutex::new(listed),
        put_fails: faults.put_fails,
    };
    let mut lock = MockOperationLock::new();
    let l = Arc::clone(log);
    lock.expect_try_acquire().returning(move |op| {
        push(&l, &format!("lock {}", op.as_str()));
        let mut guard = MockLockGuard::new();
        let l2 = Arc::clone(&l);
        guard.expect_release().returning(move || {
            push(&l2, "release");
            Ok(())
        });
        Ok(Box::new(guard))
    });

    let quiesce = FakeQuiesce {
        log: Arc::clone(log),
        hang: faults.pause_hangs,
    };

    let settings = settings(Compression::Gzip, max_count);
    let ports = Ports {
        store: Arc::new(store),
        lock: Arc::new(lock),
        sources: vec![Arc::new(memory_source(log, faults))],
        quiesce: Arc::new(quiesce),
        clock: Arc::new(FakeClock {
            sleep: faults.pause_hangs.then_some(Duration::from_millis(0)),
        }),
        restore_target: Arc::new(recovering_target(log, faults.recover_fails)),
        notifier: Arc::new(crate::ports::NoNotifier),
    };
    let app = RunningApp {
        version: semver::Version::new(1, 0, 0),
        supported_schema: Some(1),
        engine: Default::default(),
    };
    BackupService::new(settings, ports, app).unwrap()
}

/// A restore target whose recovery finds nothing (and logs that it ran).
fn recovering_target(log: &Log, fails: bool) -> MockRestoreTarget {
    let mut target = MockRestoreTarget::new();
    let l = Arc::clone(log);
    target.expect_recover().returning(move || {
        push(&l, "recover");
        if fails {
            return Err(Error::Source {
                component: Component::Persistence,
                path: ".synthorg-restore.journal".into(),
                reason: "unreadable".into(),
                source: None,
            });
        }
        Ok(vec!["rolled back".into()])
    });
    target
}

fn published(id: &BackupId) -> Listed {
    Listed::Complete(Box::new(Summary::from(&crate::conformance::manifest_for(
        id,
        Some(b"a"),
        b"x",
    ))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_pauses_around_the_snapshot_publishes_last_then_prunes_then_releases() {
    let log = Log::default();
    let old = BackupId::new(
        DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        Trigger::Scheduled,
        1,
    );
    let m = service(&log, Faults::default(), vec![published(&old)], 1)
        .create(Trigger::Manual)
        .await
        .unwrap();
    assert_eq!(m.files.len(), 1);
    assert_eq!(
        events(&log),
        vec![
            "lock backup",
            "recover",
            "cleanup",
            "list",
            "discard",
            "pause",
            "snapshot",
            "open",
            "finish",
            "resume",
            "put",
            &format!("publish {}", m.id),
            "list",
            &format!("delete {old}"),
            "release",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_snapshot_still_resumes_publishes_nothing_and_releases() {
    for faults in [
        Faults {
            snapshot_fails: true,
            ..Faults::default()
        },
        Faults {
            open_fails: true,
            ..Faults::default()
        },
    ] {
        let log = Log::default();
        let err = service(&log, faults, vec![], 10)
            .create(Trigger::Manual)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        let ev = events(&log);
        let pos = |e: &str| {
            ev.iter()
                .position(|x| x == e)
                .unwrap_or_else(|| panic!("{e} missing: {ev:?}"))
        };
        assert!(
            pos("pause") < pos("snapshot") && pos("snapshot") < pos("resume"),
            "{ev:?}"
        );
        assert!(!ev.iter().any(|e| e.starts_with("publish")), "{ev:?}");
        assert!(
            !ev.iter().any(|e| e.starts_with("delete")),
            "no retention after a failure: {ev:?}"
        );
        // For the next id (this store cannot serve members to reuse); none
        // for retention.
        assert_eq!(ev.iter().filter(|e| *e == "list").count(), 1, "{ev:?}");
        assert_eq!(
            ev.iter().filter(|e| *e == "discard").count(),
            2,
            "partial objects removed: {ev:?}"
        );
        assert_eq!(ev.last().map(String::as_str), Some("release"), "{ev:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_recovers_first_and_reports_it() {
    let log = Log::default();
    let service = service(&log, Faults::default(), vec![], 10);
    service.create(Trigger::Manual).await.unwrap();
    service.prune(true).await.unwrap();
    let ev = events(&log);
    for op in ["backup", "prune"] {
        let at = ev.iter().position(|e| e == &format!("lock {op}")).unwrap();
        assert_eq!(ev[at + 1..at + 3], ["recover", "cleanup"], "{op}: {ev:?}");
    }
    assert_eq!(service.take_recovered(), ["rolled back", "rolled back"]);
    assert!(service.take_recovered().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_never_reads_live_data_when_recovery_fails() {
    let log = Log::default();
    let faults = Faults {
        recover_fails: true,
        ..Faults::default()
    };
    let err = service(&log, faults, vec![], 10)
        .create(Trigger::Manual)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Source { .. }), "{err}");
    assert_eq!(events(&log), ["lock backup", "recover", "release"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upload_publishes_nothing_and_releases() {
    let log = Log::default();
    let err = service(
        &log,
        Faults {
            put_fails: true,
            ..Faults::default()
        },
        vec![],
        10,
    )
    .create(Trigger::Manual)
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    let ev = events(&log);
    assert!(ev.contains(&"resume".to_owned()));
    assert!(!ev.iter().any(|e| e.starts_with("publish")), "{ev:?}");
    assert_eq!(ev.last().map(String::as_str), Some("release"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quiesce_window_is_bounded_and_resumed_on_timeout() {
    let log = Log::default();
    let err = service(
        &log,
        Faults {
            pause_hangs: true,
            ..Faults::default()
        },
        vec![],
        10,
    )
    .create(Trigger::Manual)
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let ev = events(&log);
    assert!(ev.contains(&"resume".to_owned()), "{ev:?}");
    assert!(!ev.iter().any(|e| e.starts_with("publish")), "{ev:?}");
    assert_eq!(ev.last().map(String::as_str), Some("release"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_source_still_resumes_the_writer() {
    let log = Log::default();
    let svc = service(
        &log,
        Faults {
            snapshot_panics: true,
            ..Faults::default()
        },
        vec![],
        10,
    );
    let outcome =
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(svc.create(Trigger::Manual)))
            .await;
    assert!(
        outcome.is_err(),
        "the panic propagates to the caller's task"
    );
    let ev = events(&log);
    let pos = |e: &str| ev.iter().position(|x| x == e).unwrap();
    assert!(pos("snapshot") < pos("resume"), "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_lock_does_nothing_at_all() {
    let mut lock = MockOperationLock::new();
    lock.expect_try_acquire().returning(|op| {
        Err(Error::Busy {
            operation: op.as_str().into(),
            holder: "restore (pid 1)".into(),
        })
    });
    let log = Log::default();
    let mut svc = service(&log, Faults::default(), vec![], 10);
    svc.ports.lock = Arc::new(lock);
    let err = svc.create(Trigger::Manual).await.unwrap_err();
    assert!(matches!(err, Error::Busy { .. }));
    assert!(events(&log).is_empty(), "{:?}", events(&log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reports_bytes_and_files() {
    let log = Log::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let options = CreateOptions {
        progress: Some(Arc::new(move |p| s.lock().unwrap().push(p.clone()))),
        ..CreateOptions::default()
    };
    service(&log, Faults::default(), vec![], 10)
        .create_with(Trigger::Manual, options)
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    let memory = seen
        .iter()
        .find(|p| p.phase == super::Phase::Backup(Component::Memory))
        .unwrap();
    assert_eq!(
        (
            memory.bytes_done,
            memory.bytes_total,
            memory.files_done,
            memory.files_total
        ),
        (5, 5, 1, 1)
    );
    assert_eq!(seen.last().unwrap().phase, super::Phase::Finish);
}

#[test]
fn bad_recipients_that_bypassed_validation_fail_backups_naming_the_key_once() {
    let config = crate::config::BackupConfig {
        encryption: Some(crate::config::EncryptionConfig {
            recipients: vec!["age1bogus".into()],
            identity_file: None,
        }),
        ..Default::default()
    };
    let (key, reason) = Settings::from(&config).encrypt_to.unwrap_err();
    assert_eq!(key, "backup.encryption.recipients[0]");
    assert!(!reason.contains("backup.encryption"), "{reason}");
    let e = Error::Config(crate::config::ConfigError::Invalid { key, reason }).to_string();
    assert_eq!(e.matches("backup.encryption.recipients").count(), 1, "{e}");
}
