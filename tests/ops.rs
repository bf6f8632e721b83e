//! Operations: notifications to a real HTTP receiver, the status record
//! shared through the store, overdue detection with a shifted clock, and
//! scheduled verification of a tampered backup.

#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters_fs::LiveData;
use adapters_sqlite::SqliteSnapshotter;
use axum::Router;
use axum::routing::post;
use backup_core::status::Health;
use backup_core::{BackupService, Trigger};
use serde_json::Value;
use synthorg_tests::Fixture;

/// An HTTP server on loopback that keeps every JSON body POSTed to it.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let got = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&got);
        let app = Router::new().route(
            "/hook/{token}",
            post(move |body: axum::body::Bytes| {
                let keep = Arc::clone(&keep);
                async move {
                    keep.lock()
                        .unwrap()
                        .push(serde_json::from_slice::<Value>(&body).unwrap());
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url: format!("http://{addr}/hook/secret-token-123"),
            got,
        }
    }

    /// Waits for an event named `name` and returns it.
    async fn event(&self, name: &str) -> Value {
        for _ in 0..200 {
            if let Some(e) = self.got.lock().unwrap().iter().find(|e| e["event"] == name) {
                return e.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no {name} event; got {:?}", self.got.lock().unwrap());
    }

    fn count(&self, name: &str) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == name)
            .count()
    }
}

fn service_with_clock(
    fx: &Fixture,
    extra: &str,
    clock: Arc<synthorg_tests::ShiftedClock>,
) -> BackupService {
    let config = fx.config(extra);
    synthorg_api::build_service_with_clock(
        &config,
        synthorg_tests::running_app(),
        None,
        LiveData::new(&config.sources).with_verifier(Arc::new(SqliteSnapshotter)),
        clock,
    )
    .unwrap()
}

const SIX_HOURS: Duration = Duration::from_secs(6 * 3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_successes_are_notified_and_the_status_follows_them() {
    let fx = Fixture::new(300_000).await;
    let receiver = Receiver::start().await;
    let clock = Arc::new(synthorg_tests::ShiftedClock::default());
    let extra = format!("notify:\n  webhooks: [\"{}\"]\n  attempts: 2", receiver.url);
    let service = service_with_clock(&fx, &extra, Arc::clone(&clock));

    // The database is broken: the backup fails, backup.failed is sent.
    let db = &fx.layout.database;
    let saved = fx.dir.path().join("db-saved");
    std::fs::rename(db, &saved).unwrap();
    std::fs::write(db, b"this is not a database").unwrap();
    service.create(Trigger::Scheduled).await.unwrap_err();
    let failed = receiver.event("backup.failed").await;
    for key in [
        "backup_id",
        "trigger",
        "timestamp",
        "duration_secs",
        "size_bytes",
        "error",
        "host",
    ] {
        assert!(failed.get(key).is_some(), "{key} missing: {failed}");
    }
    assert_eq!(failed["trigger"], "scheduled");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("not a SQLite database"),
        "{failed}"
    );
    let status = service.status(true, SIX_HOURS).await.unwrap();
    assert_eq!(status.status, Health::Failing);
    assert!(status.last_failure.unwrap().error.contains("SQLite"));
    // Another process on the same store sees the same status.
    let other = fx.service(&fx.config(""));
    assert_eq!(
        other.status(true, SIX_HOURS).await.unwrap().status,
        Health::Failing
    );

    // Fixed: the next backup succeeds, backup.succeeded, status ok.
    std::fs::rename(&saved, db).unwrap();
    let m = service.create(Trigger::Scheduled).await.unwrap();
    let ok = receiver.event("backup.succeeded").await;
    assert_eq!(ok["backup_id"], m.id.to_string());
    assert_eq!(ok["size_bytes"], m.size_bytes);
    let status = service.status(true, SIX_HOURS).await.unwrap();
    assert_eq!(status.status, Health::Ok);
    assert_eq!(status.last_success.unwrap().id, m.id);
    assert_eq!(
        service.status(false, SIX_HOURS).await.unwrap().status,
        Health::Disabled
    );

    // Thirteen hours later nothing succeeded: overdue, sent once.
    *clock.0.lock().unwrap() = chrono::TimeDelta::hours(13);
    assert_eq!(
        service.status(true, SIX_HOURS).await.unwrap().status,
        Health::Overdue
    );
    let overdue = service.status(true, SIX_HOURS).await.unwrap();
    assert!(service.notify_if_overdue(&overdue).await);
    assert!(
        !service.notify_if_overdue(&overdue).await,
        "once per overdue period"
    );
    receiver.event("backup.overdue").await;
    assert_eq!(receiver.count("backup.overdue"), 1);

    // A restore and its outcome.
    *clock.0.lock().unwrap() = chrono::TimeDelta::zero();
    service
        .restore(&m.id, synthorg_tests::confirmed())
        .await
        .unwrap();
    assert_eq!(
        receiver.event("restore.succeeded").await["backup_id"],
        m.id.to_string()
    );
    // Its safety backup is newer, but not a backup that succeeded: the
    // status still counts from m (nor is it what the runtime verifies).
    assert_eq!(service.list().await.unwrap().len(), 2);
    let status = service.status(true, SIX_HOURS).await.unwrap();
    assert_eq!(status.last_success.unwrap().id, m.id);
    assert_eq!(
        service.verify_newest().await.unwrap().unwrap().backup_id,
        m.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_webhook_never_fails_a_backup() {
    let fx = Fixture::new(200_000).await;
    // A port nobody listens on: connection refused, retried, given up.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let extra = format!(
        "notify:\n  webhooks: [\"http://127.0.0.1:{port}/hook?token=abc\"]\n  attempts: 2\n  timeout_secs: 1\n  command: [/nonexistent/notify-program]"
    );
    let service = fx.service(&fx.config(&extra));
    let started = std::time::Instant::now();
    service.create(Trigger::Manual).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(service.list().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_command_gets_the_event_on_stdin() {
    let fx = Fixture::new(200_000).await;
    let out = fx.dir.path().join("events.jsonl");
    let extra = format!(
        "notify:\n  command: [sh, -c, \"cat >> {}; echo >> {}\"]\n  events: [backup.succeeded]",
        out.display(),
        out.display()
    );
    let service = fx.service(&fx.config(&extra));
    let m = service.create(Trigger::Manual).await.unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    let event: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(event["event"], "backup.succeeded");
    assert_eq!(event["backup_id"], m.id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_of_a_tampered_backup_sends_verify_failed_and_counts() {
    let fx = Fixture::new(300_000).await;
    let receiver = Receiver::start().await;
    let extra = format!("notify:\n  webhooks: [\"{}\"]", receiver.url);
    let service = fx.service(&fx.config(&extra));
    let state = synthorg_api::AdminState::new(service.clone(), None, true);
    let m = service.create(Trigger::Manual).await.unwrap();
    let v = state.verify_newest().await.unwrap().unwrap();
    assert!(v.ok);
    let archive = fx.layout.backups_dir.join(format!("{}.tar.gz", m.id));
    let mut bytes = std::fs::read(&archive).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&archive, bytes).unwrap();
    let v = state.verify_newest().await.unwrap().unwrap();
    assert!(!v.ok);
    let failed = receiver.event("verify.failed").await;
    assert_eq!(failed["backup_id"], m.id.to_string());
    let metrics = state.metrics().render();
    assert!(
        metrics.contains("synthorg_backup_verify_failures_total 1"),
        "{metrics}"
    );
    let status = state.status().await.unwrap();
    let last = status.last_verification.unwrap();
    assert!(!last.ok && last.backup_id == m.id);
    assert!(
        state
            .metrics()
            .render()
            .contains("synthorg_backup_status 0")
    );
}

#[test]
fn notify_config_errors_name_the_key() {
    let dir = std::path::Path::new("/tmp");
    for (yaml, key) in [
        (
            "backup:\n  notify:\n    webhooks: [\"ftp://x\"]\n",
            "backup.notify.webhooks[0]",
        ),
        (
            "backup:\n  notify:\n    webhooks: [\"http://\"]\n",
            "backup.notify.webhooks[0]",
        ),
        (
            "backup:\n  notify:\n    events: [backup.exploded]\n",
            "backup.notify.events",
        ),
    ] {
        let e = backup_core::BackupConfig::load(Some(yaml), dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{yaml}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_verifies_on_schedule_and_reports_overdue_once() {
    let fx = Fixture::new(200_000).await;
    let receiver = Receiver::start().await;
    let extra = format!("notify:\n  webhooks: [\"{}\"]", receiver.url);
    let clock = Arc::new(synthorg_tests::ShiftedClock::default());
    let service = service_with_clock(&fx, &extra, Arc::clone(&clock));
    let schedule = Duration::from_secs(3600);
    let state = synthorg_api::AdminState::new(service, None, true).with_schedule(schedule);
    let config = synthorg_api::RuntimeConfig {
        enabled: true,
        on_startup: true,
        on_shutdown: false,
        schedule,
        shutdown_timeout: Duration::from_secs(60),
        verify_every: Some(Duration::from_millis(300)),
        overdue_check: Duration::from_millis(100),
    };
    let runtime = synthorg_api::BackupRuntime::start(state.clone(), config, clock.clone()).await;
    receiver.event("backup.succeeded").await;
    // A scheduled verification passes and shows in the metrics.
    let mut verified = false;
    for _ in 0..100 {
        if !state
            .metrics()
            .render()
            .contains("synthorg_backup_last_verify_success_timestamp_seconds 0")
        {
            verified = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(verified, "{}", state.metrics().render());
    // The clock stops being now: three hours later, nothing new: overdue.
    *clock.0.lock().unwrap() = chrono::TimeDelta::hours(3);
    receiver.event("backup.overdue").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.count("backup.overdue"),
        1,
        "once per overdue period"
    );
    assert!(
        state
            .metrics()
            .render()
            .contains("synthorg_backup_status 2")
    );
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restores_safety_backup_does_not_postpone_the_first_scheduled_backup() {
    let fx = Fixture::new(200_000).await;
    let clock = Arc::new(synthorg_tests::ShiftedClock::default());
    let service = service_with_clock(&fx, "", Arc::clone(&clock));
    // The last backup is 7 hours old; a restore of it just now took a
    // safety backup, the newest backup listed.
    *clock.0.lock().unwrap() = -chrono::TimeDelta::hours(7);
    let old = service.create(Trigger::Scheduled).await.unwrap();
    *clock.0.lock().unwrap() = chrono::TimeDelta::zero();
    service
        .restore(&old.id, synthorg_tests::confirmed())
        .await
        .unwrap();
    assert_eq!(
        service.list().await.unwrap()[0].id().trigger(),
        Trigger::PreRestore
    );
    let schedule = Duration::from_secs(6 * 3600);
    let state = synthorg_api::AdminState::new(service.clone(), None, true).with_schedule(schedule);
    let config = synthorg_api::RuntimeConfig {
        enabled: true,
        on_startup: false,
        on_shutdown: false,
        schedule,
        shutdown_timeout: Duration::from_secs(60),
        verify_every: None,
        overdue_check: Duration::from_secs(300),
    };
    let runtime = synthorg_api::BackupRuntime::start(state, config, clock).await;
    let started = std::time::Instant::now();
    let scheduled = loop {
        let listed = service.list().await.unwrap();
        if let Some(l) = listed
            .iter()
            .find(|l| l.id().trigger() == Trigger::Scheduled && *l.id() != old.id)
        {
            break l.id().clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no scheduled backup at start: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    runtime.shutdown().await;
    assert!(scheduled > old.id);
}
