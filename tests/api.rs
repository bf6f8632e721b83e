//! The admin API through the real router (`oneshot`), and the runtime's
//! startup, scheduled, pre-migration and shutdown backups.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use backup_core::config::Secret;
use backup_core::ports::Listed;
use backup_core::{BackupService, Trigger};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use synthorg_api::{AdminState, BackupRuntime, RuntimeConfig, app};
use synthorg_tests::Fixture;
use tower::ServiceExt;

const TOKEN: &str = "test-token-1234";

fn router(service: BackupService, enabled: bool) -> Router {
    app(AdminState::new(service, Some(Secret::new(TOKEN)), enabled))
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value, axum::http::HeaderMap) {
    call_with(app, method, uri, body, token, &[]).await
}

/// As [`call`], with extra request headers.
async fn call_with(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value, axum::http::HeaderMap) {
    let mut req = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value, headers)
}

/// POST with the token; status and body.
async fn post(app: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let (status, body, _) = call(app, "POST", uri, Some(body), Some(TOKEN)).await;
    (status, body)
}

async fn wait_complete(app: &Router, id: &str) -> Value {
    for _ in 0..200 {
        let (status, body, _) = call(
            app,
            "GET",
            &format!("/api/v1/admin/backups/{id}"),
            None,
            Some(TOKEN),
        )
        .await;
        if status == StatusCode::OK && body["status"] != "running" {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("backup {id} did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_needs_the_token_except_healthz() {
    let fx = Fixture::new(200_000).await;
    let app = router(fx.service(&fx.config("")), true);
    for (method, uri) in [
        ("POST", "/api/v1/admin/backup"),
        ("GET", "/api/v1/admin/backups"),
        ("GET", "/api/v1/admin/backups/2026-03-15T14-30-00_manual"),
        ("DELETE", "/api/v1/admin/backups/2026-03-15T14-30-00_manual"),
        ("POST", "/api/v1/admin/restore"),
        ("GET", "/api/v1/admin/openapi.json"),
        ("GET", "/metrics"),
    ] {
        for token in [None, Some("wrong"), Some("test-token-123")] {
            let (status, body, headers) = call(&app, method, uri, None, token).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {uri} with {token:?}"
            );
            assert_eq!(body["code"], "unauthorized");
            assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        }
    }
    let (status, body, _) = call(&app, "GET", "/healthz", None, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_accepted_runs_in_the_background_and_is_idempotent() {
    let fx = Fixture::new(500_000).await;
    let app = router(fx.service(&fx.config("")), true);
    let keyed = || {
        call_with(
            &app,
            "POST",
            "/api/v1/admin/backup",
            None,
            Some(TOKEN),
            &[("Idempotency-Key", "deploy-42")],
        )
    };
    let (status, body, headers) = keyed().await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let location = headers[header::LOCATION].to_str().unwrap().to_owned();
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/admin/backups/{id}"));
    assert_eq!(body["status_url"], location.as_str());

    let (status, body, _) = keyed().await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["id"], id.as_str(), "same key, same backup");
    assert_eq!(body["repeated"], true);

    let done = wait_complete(&app, &id).await;
    assert_eq!(done["status"], "complete");
    assert_eq!(done["manifest"]["trigger"], "manual");
    let (status, body, _) = keyed().await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        (body["id"].as_str(), body["status"].as_str()),
        (Some(id.as_str()), Some("complete")),
        "a repeat reports the backup's real status"
    );
    // The same key with another request is not the same backup.
    let (status, body, _) = call_with(
        &app,
        "POST",
        "/api/v1/admin/backup",
        Some(json!({"trigger": "pre-migration", "labels": {"migration": "3->4"}})),
        Some(TOKEN),
        &[("Idempotency-Key", "deploy-42")],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "idempotency_mismatch");

    let (status, _, _) = call(
        &app,
        "POST",
        "/api/v1/admin/backup",
        Some(json!({"trigger": "scheduled"})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body, _) = call(
        &app,
        "POST",
        "/api/v1/admin/backup",
        Some(json!({"bogus": 1})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_with_a_cursor_and_show_delete_report_status_codes() {
    let fx = Fixture::new(200_000).await;
    let service = fx.service(&fx.config(""));
    let pinned = service.create(Trigger::PreMigration).await.unwrap();
    for _ in 0..2 {
        service.create(Trigger::Manual).await.unwrap();
    }
    let app = router(service, true);
    let (status, page1, _) = call(
        &app,
        "GET",
        "/api/v1/admin/backups?limit=2",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    let cursor = page1["next_cursor"].as_str().unwrap().to_owned();
    let (_, page2, _) = call(
        &app,
        "GET",
        &format!("/api/v1/admin/backups?limit=2&cursor={cursor}"),
        None,
        Some(TOKEN),
    )
    .await;
    let items = page2["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], pinned.id.to_string().as_str());
    assert!(page2["next_cursor"].is_null());
    for key in [
        "id",
        "trigger",
        "timestamp",
        "size_bytes",
        "components",
        "status",
    ] {
        assert!(items[0].get(key).is_some(), "{key}");
    }

    let (status, body, _) = call(
        &app,
        "GET",
        "/api/v1/admin/backups/..%2F..%2Fetc",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "invalid_id");
    let (status, _, _) = call(
        &app,
        "GET",
        "/api/v1/admin/backups?cursor=nonsense",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body, _) = call(
        &app,
        "GET",
        "/api/v1/admin/backups/2020-01-01T00-00-00_manual",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "not_found");

    let uri = format!("/api/v1/admin/backups/{}", pinned.id);
    let (status, body, _) = call(&app, "DELETE", &uri, None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "pinned");
    let (status, _, _) = call(
        &app,
        "DELETE",
        &format!("{uri}?force=true"),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = call(
        &app,
        "DELETE",
        &format!("{uri}?force=true"),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_requires_confirmation_and_reports_restart_required() {
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config(""));
    let m = service.create(Trigger::Manual).await.unwrap();
    let app = router(service, true);
    let id = m.id.to_string();
    let (status, body, _) = call(
        &app,
        "POST",
        "/api/v1/admin/restore",
        Some(json!({"backup_id": id})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "not_confirmed");
    let (status, body, _) = call(
        &app,
        "POST",
        "/api/v1/admin/restore",
        Some(json!({"backup_id": id, "dry_run": true})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["dry_run"], true);
    let (status, body, _) = call(
        &app,
        "POST",
        "/api/v1/admin/restore",
        Some(json!({"backup_id": id, "confirm": true, "components": ["config"]})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["restart_required"], true);
    assert!(body["safety_backup_id"].as_str().is_some());

    let (status, body, _) = call(
        &app,
        "POST",
        "/api/v1/admin/restore",
        Some(json!({"backup_id": "nope"})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_id"))
    );
    let (status, _, _) = call(
        &app,
        "POST",
        "/api/v1/admin/restore",
        Some(json!({"backup_id": "2020-01-01T00-00-00_manual", "confirm": true})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(
        &app,
        "POST",
        "/api/v1/admin/restore",
        Some(json!({"backup_id": id, "confirm": "yes"})),
        Some(TOKEN),
    )
    .await;
    assert!(
        status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY,
        "{status}"
    );
    let huge = json!({ "backup_id": "x".repeat(100_000) });
    let (status, body, _) = call(
        &app,
        "POST",
        "/api/v1/admin/restore",
        Some(huge),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

    let (status, doc, _) = call(&app, "GET", "/api/v1/admin/openapi.json", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/backup", "/backups", "/backups/{id}", "/restore"] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    let (status, metrics, _) = call(&app, "GET", "/metrics", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    let text = metrics.as_str().unwrap();
    assert!(text.contains("synthorg_restores_total 1"), "{text}");
    assert!(text.contains("synthorg_backups "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_disabled_and_failing_store_answers() {
    let fx = Fixture::new(200_000).await;
    let config = fx.config("");
    let app = router(fx.service(&config), true);
    let lock = adapters_fs::FileLock::in_dir(&config.path);
    let held = backup_core::ports::OperationLock::try_acquire(
        &lock,
        backup_core::ports::Operation::Restore,
    )
    .await
    .unwrap();
    let (status, body, _) = call(&app, "POST", "/api/v1/admin/backup", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "busy");
    drop(held);

    let (status, body, _) = call(
        &router(fx.service(&config), false),
        "POST",
        "/api/v1/admin/backup",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("backups_disabled"))
    );

    // The live database becomes unreadable: the backup fails, the server
    // reports it and keeps serving; no internals leak.
    std::fs::write(&fx.layout.database, b"garbage, not a database").unwrap();
    let (status, body, _) = call(&app, "POST", "/api/v1/admin/backup", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let done = wait_complete(&app, body["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed");
    let (status, _, _) = call(&app, "GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, metrics, _) = call(&app, "GET", "/metrics", None, Some(TOKEN)).await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("synthorg_backup_failures_total 1")
    );

    // The store itself breaks (the backup directory is replaced by a file):
    // a clean 500 without internals, and the server keeps serving.
    std::fs::remove_dir_all(&config.path).unwrap();
    std::fs::write(&config.path, b"not a directory").unwrap();
    let (status, body, _) = call(&app, "POST", "/api/v1/admin/backup", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        !body["detail"]
            .as_str()
            .unwrap()
            .contains(config.path.to_str().unwrap()),
        "no internals: {body}"
    );
    let (status, _, _) = call(&app, "GET", "/api/v1/admin/backups", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let (status, _, _) = call(&app, "GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_backs_up_at_startup_on_schedule_before_migration_and_at_shutdown() {
    let fx = Fixture::new(200_000).await;
    let config = fx.config("retention: {max_count: 100, max_age_days: 30}");
    let state = AdminState::new(fx.service(&config), None, true);
    let runtime_config = RuntimeConfig {
        enabled: true,
        on_startup: true,
        on_shutdown: true,
        schedule: Duration::from_millis(700),
        shutdown_timeout: Duration::from_secs(60),
        verify_every: None,
        overdue_check: Duration::from_secs(300),
    };
    let runtime = BackupRuntime::start(
        state.clone(),
        runtime_config,
        Arc::new(adapters_fs::SystemClock),
    )
    .await;
    let triggers =
        |listed: Vec<Listed>| listed.iter().map(|l| l.id().trigger()).collect::<Vec<_>>();
    let at_start = triggers(state.service().list().await.unwrap());
    assert!(
        at_start.contains(&Trigger::Startup),
        "startup backup done before start() returns: {at_start:?}"
    );

    // Wait for two scheduled runs (each 700 ms after the previous one ended).
    for _ in 0..200 {
        let now = triggers(state.service().list().await.unwrap());
        if now.iter().filter(|t| **t == Trigger::Scheduled).count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pm = runtime.before_migration(3, 4).await.unwrap();
    assert_eq!(
        state.service().show(&pm).await.unwrap().labels["migration"],
        "3->4"
    );
    runtime.shutdown().await;
    let all = triggers(state.service().list().await.unwrap());
    let scheduled = all.iter().filter(|t| **t == Trigger::Scheduled).count();
    assert!(scheduled >= 2, "scheduled backups every 700 ms: {all:?}");
    assert_eq!(
        all[0],
        Trigger::Shutdown,
        "the shutdown backup is the newest: {all:?}"
    );
    assert!(all.contains(&Trigger::PreMigration));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_migration_backup_waits_for_a_running_operation_within_the_timeout() {
    let fx = Fixture::new(200_000).await;
    let config = fx.config("");
    let state = AdminState::new(fx.service(&config), None, true);
    let runtime_config = |timeout_ms| RuntimeConfig {
        enabled: false,
        on_startup: false,
        on_shutdown: false,
        schedule: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_millis(timeout_ms),
        verify_every: None,
        overdue_check: Duration::from_secs(300),
    };
    let lock = adapters_fs::FileLock::in_dir(&config.path);
    let acquire = || {
        backup_core::ports::OperationLock::try_acquire(&lock, backup_core::ports::Operation::Backup)
    };

    // Another operation (say a scheduled backup) runs for 1.5 s: the
    // pre-migration backup waits for it and then succeeds.
    let start = |timeout_ms| {
        BackupRuntime::start(
            state.clone(),
            runtime_config(timeout_ms),
            Arc::new(adapters_fs::SystemClock),
        )
    };
    let runtime = start(30_000).await;
    let held = acquire().await.unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(held);
    });
    let started = std::time::Instant::now();
    let pm = runtime.before_migration(3, 4).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "it waited"
    );
    release.await.unwrap();
    let shown = state.service().show(&pm).await.unwrap();
    assert_eq!(shown.id.trigger(), Trigger::PreMigration);
    runtime.shutdown().await;

    // It outlasts the wait: Busy, naming the holder, and nothing published.
    let runtime = start(600).await;
    let held = acquire().await.unwrap();
    let before = state.service().list().await.unwrap().len();
    let e = runtime.before_migration(4, 5).await.unwrap_err();
    assert!(matches!(e, backup_core::Error::Busy { .. }), "{e}");
    assert_eq!(state.service().list().await.unwrap().len(), before);
    drop(held);
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mutations_run_one_at_a_time_and_lose_nothing() {
    let fx = Fixture::new(5_000_000).await;
    let service = fx.service(&fx.config("retention: { max_count: 100 }"));
    let mut existing = Vec::new();
    for _ in 0..3 {
        existing.push(
            service
                .create(Trigger::Manual)
                .await
                .unwrap()
                .id
                .to_string(),
        );
    }
    let app = router(service.clone(), true);
    // 4 backups, 3 deletes and 2 restores, all at once.
    let mut requests: Vec<(&str, String, Option<Value>)> = Vec::new();
    for _ in 0..4 {
        requests.push(("POST", "/api/v1/admin/backup".into(), None));
    }
    for id in &existing {
        requests.push(("DELETE", format!("/api/v1/admin/backups/{id}"), None));
    }
    for _ in 0..2 {
        let body = json!({"backup_id": existing[0], "confirm": true});
        requests.push(("POST", "/api/v1/admin/restore".into(), Some(body)));
    }
    let calls = requests.into_iter().map(|(method, uri, body)| {
        let app = app.clone();
        tokio::spawn(async move {
            let (status, body, _) = call(&app, method, &uri, body, Some(TOKEN)).await;
            (method, uri, status, body)
        })
    });
    let results: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let (mut accepted, mut deleted) = (Vec::new(), Vec::new());
    let (mut restored, mut busy, mut gone) = (0, 0, 0);
    for (method, uri, status, body) in &results {
        match status.as_u16() {
            202 => accepted.push(body["id"].as_str().unwrap().to_owned()),
            204 => deleted.push(uri.rsplit('/').next().unwrap().to_owned()),
            200 if uri.ends_with("/restore") => restored += 1,
            // Its backup was deleted first.
            404 if uri.ends_with("/restore") => gone += 1,
            409 => {
                assert_eq!(body["code"], "busy", "{method} {uri}: {body}");
                busy += 1;
            }
            other => panic!("{method} {uri}: unexpected {other}: {body}"),
        }
    }
    assert!(busy > 0, "nothing overlapped: {results:?}");
    assert!(gone == 0 || deleted.contains(&existing[0]));
    for id in &accepted {
        assert_eq!(wait_complete(&app, id).await["status"], "complete");
    }
    // Exactly what succeeded happened: the accepted backups and one safety
    // backup per restore were added, the deleted ones are gone, the rest
    // is still there, and everything listed verifies.
    let listed: Vec<String> = service
        .list()
        .await
        .unwrap()
        .iter()
        .map(|l| l.id().to_string())
        .collect();
    assert_eq!(
        listed.len(),
        existing.len() - deleted.len() + accepted.len() + restored,
        "{listed:?}"
    );
    for id in &existing {
        assert_eq!(listed.contains(id), !deleted.contains(id), "{id}");
    }
    for id in &accepted {
        assert!(listed.contains(id), "{id}");
    }
    for id in &listed {
        let id = backup_core::BackupId::parse(id).unwrap();
        assert!(service.verify(&id).await.unwrap().ok, "{id}");
    }
    eprintln!(
        "9 concurrent requests: {} backups, {} deletes, {restored} restores ran; {busy} got 409",
        accepted.len(),
        deleted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_are_400_on_every_endpoint_that_takes_one() {
    let fx = Fixture::new(200_000).await;
    let app = router(fx.service(&fx.config("")), true);
    let long = "9".repeat(10_000);
    // As they arrive in a path (percent-encoded) and as they are.
    let hostile: [(&str, &str); 6] = [
        ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd"),
        ("..", ".."),
        (
            "2026-03-15T14-30-00_man%00ual",
            "2026-03-15T14-30-00_man\0ual",
        ),
        (
            "2026-03-15T14-30-00_m%D0%B0nual",
            "2026-03-15T14-30-00_m\u{0430}nual",
        ),
        (&long, &long),
        ("%2Fabsolute", "/absolute"),
    ];
    for (in_path, raw) in hostile {
        for method in ["GET", "DELETE"] {
            let uri = format!("/api/v1/admin/backups/{in_path}");
            let (status, body, _) = call(&app, method, &uri, None, Some(TOKEN)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {raw:?}: {body}");
            assert_eq!(body["code"], "invalid_id", "{method} {raw:?}: {body}");
            assert!(body.to_string().len() < 2_000, "bounded message");
        }
        let restore = json!({"backup_id": raw, "confirm": true});
        let (status, body, _) = call(
            &app,
            "POST",
            "/api/v1/admin/restore",
            Some(restore),
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "restore {raw:?}: {body}");
        assert_eq!(body["code"], "invalid_id", "restore {raw:?}: {body}");
    }
    assert!(synthorg_tests::files_under(&fx.config("").path).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_labels_empty_components_and_auth_spellings_are_handled() {
    let fx = Fixture::new(300_000).await;
    let app = router(fx.service(&fx.config("")), true);
    for labels in [
        json!({"note": "\u{1b}[2J\u{1b}]0;pwned\u{7}"}),
        json!({"note": "a\u{0}b"}),
        json!({"note": "\u{202e}gnp.exe"}),
        json!({"note": "\u{85}next line"}),
        json!({"": "empty key"}),
        json!({"k": "v".repeat(5000)}),
    ] {
        let (status, body) = post(&app, "/api/v1/admin/backup", json!({ "labels": labels })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{labels}: {body}");
        assert_eq!(body["code"], "invalid_label", "{body}");
        assert!(body["detail"].as_str().unwrap().contains("label"), "{body}");
    }
    let too_many: serde_json::Map<String, Value> =
        (0..40).map(|i| (format!("k{i}"), json!("v"))).collect();
    let (status, _) = post(&app, "/api/v1/admin/backup", json!({ "labels": too_many })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(fx.service(&fx.config("")).list().await.unwrap().is_empty());

    // A good backup, then restores with an empty component list.
    let (_, body, _) = call(
        &app,
        "POST",
        "/api/v1/admin/backup",
        Some(json!({"labels": {"ticket": "OPS-7 ünïcode ok"}})),
        Some(TOKEN),
    )
    .await;
    let id = body["id"].as_str().unwrap().to_owned();
    wait_complete(&app, &id).await;
    let (status, body) = post(
        &app,
        "/api/v1/admin/restore",
        json!({"backup_id": id, "confirm": true, "components": []}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // The scheme is case-insensitive (RFC 9110); the token is not.
    let wrong = format!("Bearer {}", TOKEN.to_uppercase());
    for (auth, expected) in [
        (format!("bearer {TOKEN}"), StatusCode::OK),
        (format!("BEARER {TOKEN}"), StatusCode::OK),
        (wrong, StatusCode::UNAUTHORIZED),
    ] {
        let (status, _, _) = call_with(
            &app,
            "GET",
            "/api/v1/admin/backups",
            None,
            None,
            &[("authorization", auth.as_str())],
        )
        .await;
        assert_eq!(status, expected, "{auth}");
    }

    // No server paths in answers.
    let backups = fx.layout.backups_dir.display().to_string();
    let (status, body, _) = call(
        &app,
        "GET",
        "/api/v1/admin/backups/2020-01-01T00-00-00_manual",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!body.to_string().contains(&backups), "{body}");

    // A restore while the live database is open: 409 in_use, no path.
    let conn = synthorg_tests::open(&fx.layout.database).await;
    let (status, body) = post(
        &app,
        "/api/v1/admin/restore",
        json!({"backup_id": id, "confirm": true}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "in_use");
    assert!(
        !body
            .to_string()
            .contains(&fx.layout.root.display().to_string()),
        "{body}"
    );
    sqlx::Connection::close(conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_backup_without_its_identity_is_422_decryption_key_naming_the_recipients() {
    let fx = Fixture::new(300_000).await;
    let (_, recipient) = backup_core::crypt::generate_identity();
    let service = fx.service(&fx.config(&format!("encryption:\n  recipients: [{recipient}]")));
    let m = service.create(Trigger::Manual).await.unwrap();
    let app = router(service, true);
    let id = m.id.to_string();
    let (status, body) = post(
        &app,
        "/api/v1/admin/restore",
        json!({"backup_id": id, "confirm": true}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "decryption_key");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&recipient)),
        "{body}"
    );
    let (status, body, _) = call(&app, "GET", "/api/v1/admin/backups", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"][0]["encrypted"], true, "{body}");
    assert_eq!(body["items"][0]["recipients"][0], recipient.as_str());
}
