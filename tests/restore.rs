//! Restore end to end with the real adapters: round trips, refusals that
//! leave live data byte-for-byte unchanged, and a swap failure rolled back.

#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::sync::Arc;

use adapters_fs::LiveData;
use adapters_sqlite::SqliteSnapshotter;
use backup_core::ports::Listed;
use backup_core::{BackupService, Component, Error, RestoreOptions, RunningApp, Trigger};
use synthorg_tests::Fixture;

use synthorg_tests::confirmed;

/// Changes every component of the live data.
async fn mutate(fx: &Fixture) {
    let mut conn = synthorg_tests::open(&fx.layout.database).await;
    sqlx::query("UPDATE tasks SET status = 'tampered' WHERE id % 3 = 0")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_log WHERE id % 2 = 0")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let agents = fx.layout.memory_dir.join("agents");
    let victim = std::fs::read_dir(agents.join("agent-0"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(victim).unwrap();
    std::fs::write(fx.layout.memory_dir.join("new-note.json"), b"{}").unwrap();
    std::fs::write(&fx.layout.company_config, b"company:\n  name: Changed\n").unwrap();
    std::fs::create_dir_all(fx.layout.checkpoints_dir.join("task-new")).unwrap();
    std::fs::write(
        fx.layout.checkpoints_dir.join("task-new/turn-0000.json"),
        b"{}",
    )
    .unwrap();
}

fn service_with(fx: &Fixture, app: RunningApp, extra: &str) -> BackupService {
    synthorg_api::build_service(&fx.config(extra), app, None).unwrap()
}

#[tokio::test]
async fn restore_brings_back_every_component_and_keeps_a_safety_backup() {
    // A database of more than 8 MiB: read in owned chunks, hashed on a
    // thread of its own and handed to the staging without a copy.
    let fx = Fixture::new(12_000_000).await;
    assert!(std::fs::metadata(&fx.layout.database).unwrap().len() > 8 << 20);
    let service = fx.service(&fx.config(""));
    let before = synthorg_tests::capture(&fx.layout).await;
    let backup = service.create(Trigger::Manual).await.unwrap();
    mutate(&fx).await;
    let changed = synthorg_tests::capture(&fx.layout).await;
    assert_ne!(before, changed);

    let report = service.restore(&backup.id, confirmed()).await.unwrap();
    assert!(report.restart_required);
    assert_eq!(report.components.len(), 4);
    assert_eq!(synthorg_tests::capture(&fx.layout).await, before);
    // No staging, aside or journal leftovers next to the data.
    let hidden = synthorg_tests::hidden_entries(&fx.layout.root);
    assert!(hidden.is_empty(), "{hidden:?}");

    // The safety backup holds the state from right before the restore.
    let safety = report.safety_backup_id.unwrap();
    assert_eq!(safety.trigger(), Trigger::PreRestore);
    assert!(
        service
            .list()
            .await
            .unwrap()
            .iter()
            .any(|l| matches!(l, Listed::Complete(m) if m.id == safety))
    );
    service.restore(&safety, confirmed()).await.unwrap();
    assert_eq!(synthorg_tests::capture(&fx.layout).await, changed);
}

#[tokio::test]
async fn restore_of_a_subset_touches_only_those_components() {
    let fx = Fixture::new(500_000).await;
    let service = fx.service(&fx.config("compression: none"));
    let before = synthorg_tests::capture(&fx.layout).await;
    let backup = service.create(Trigger::Manual).await.unwrap();
    mutate(&fx).await;
    let changed = synthorg_tests::capture(&fx.layout).await;
    let options = RestoreOptions {
        confirm: true,
        components: Some(vec![Component::Config, Component::Memory]),
        ..RestoreOptions::default()
    };
    service.restore(&backup.id, options).await.unwrap();
    let now = synthorg_tests::capture(&fx.layout).await;
    assert_eq!(now.config, before.config);
    assert_eq!(now.memory, before.memory);
    assert_eq!(now.database, changed.database);
    assert_eq!(now.checkpoints, changed.checkpoints);
}

#[tokio::test]
async fn unconfirmed_and_dry_run_restores_touch_nothing() {
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config(""));
    let backup = service.create(Trigger::Manual).await.unwrap();
    mutate(&fx).await;
    let changed = synthorg_tests::capture(&fx.layout).await;
    let listed = service.list().await.unwrap().len();

    let err = service
        .restore(&backup.id, RestoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotConfirmed { .. }), "{err}");

    let newer_app = RunningApp {
        version: semver::Version::new(1, 5, 0),
        supported_schema: Some(synthorg_cli::demo::DEMO_SCHEMA_VERSION + 1),
        engine: Default::default(),
    };
    let dry = service_with(&fx, newer_app, "")
        .restore(
            &backup.id,
            RestoreOptions {
                dry_run: true,
                ..RestoreOptions::default()
            },
        )
        .await
        .unwrap();
    assert!(dry.dry_run && !dry.restart_required);
    assert!(dry.safety_backup_id.is_none());
    assert!(
        dry.warnings
            .iter()
            .any(|w| w == "schema 3 < 4: migrations will run on next start"),
        "{:?}",
        dry.warnings
    );
    assert_eq!(
        dry.components
            .iter()
            .map(|c| c.component)
            .collect::<Vec<_>>(),
        Component::ALL.to_vec()
    );
    assert!(dry.bytes > 0);

    assert_eq!(synthorg_tests::capture(&fx.layout).await, changed);
    assert_eq!(service.list().await.unwrap().len(), listed);
}

#[tokio::test]
async fn incompatible_backups_are_refused_before_anything_is_read() {
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config(""));
    let backup = service.create(Trigger::Manual).await.unwrap();
    mutate(&fx).await;
    let changed = synthorg_tests::capture(&fx.layout).await;
    // Remove the archive: a refusal must come from the manifest alone.
    std::fs::remove_file(fx.layout.backups_dir.join(format!("{}.tar.gz", backup.id))).unwrap();

    let older = RunningApp {
        version: semver::Version::new(1, 3, 0),
        supported_schema: Some(2),
        engine: Default::default(),
    };
    let err = service_with(&fx, older, "")
        .restore(&backup.id, confirmed())
        .await
        .unwrap_err();
    match &err {
        Error::Incompatible { report, .. } => assert_eq!(report.errors.len(), 2, "{report:?}"),
        other => panic!("expected Incompatible, got {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("newer than the running 1.3.0") && text.contains("schema 3"),
        "{text}"
    );

    let err = fx
        .service(&fx.config(""))
        .restore(
            &backup.id,
            RestoreOptions {
                confirm: true,
                components: Some(vec![Component::Checkpoints]),
                dry_run: false,
            },
        )
        .await;
    assert!(err.is_err()); // archive missing -> refused
    assert_eq!(synthorg_tests::capture(&fx.layout).await, changed);
}

#[tokio::test]
async fn corrupted_or_truncated_backups_are_refused_and_live_data_is_unchanged() {
    let fx = Fixture::new(1_000_000).await;
    let service = fx.service(&fx.config(""));
    let backup = service.create(Trigger::Manual).await.unwrap();
    mutate(&fx).await;
    let changed = synthorg_tests::capture(&fx.layout).await;
    let archive = fx.layout.backups_dir.join(format!("{}.tar.gz", backup.id));
    let good = std::fs::read(&archive).unwrap();

    let mut flipped = good.clone();
    let at = good.len() / 3;
    flipped[at] ^= 0x40;
    std::fs::write(&archive, &flipped).unwrap();
    let err = service.restore(&backup.id, confirmed()).await.unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err}");
    assert_eq!(synthorg_tests::capture(&fx.layout).await, changed);

    std::fs::write(&archive, &good[..good.len() - 1000]).unwrap();
    let err = service.restore(&backup.id, confirmed()).await.unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err}");
    assert_eq!(synthorg_tests::capture(&fx.layout).await, changed);

    // Neither attempt got as far as a safety backup.
    assert_eq!(service.list().await.unwrap().len(), 1);
    let hidden = synthorg_tests::hidden_entries(&fx.layout.root);
    assert!(hidden.is_empty(), "staging left behind: {hidden:?}");
}

#[tokio::test]
async fn a_failure_midway_through_the_swap_is_rolled_back() {
    let fx = Fixture::new(500_000).await;
    let config = fx.config("");
    let restored = synthorg_tests::capture(&fx.layout).await;
    let backup = fx.service(&config).create(Trigger::Manual).await.unwrap();
    mutate(&fx).await;
    let changed = synthorg_tests::capture(&fx.layout).await;
    // Fail after 0, 1, 2, ... renames (database aside, database in,
    // memory aside, ...) until the swap has none left to fail.
    let mut failures = 0;
    for fail_after in 0..20 {
        let live = LiveData::new(&config.sources)
            .with_verifier(Arc::new(SqliteSnapshotter))
            .fail_swap_after(fail_after);
        let service =
            synthorg_api::build_service_with(&config, synthorg_tests::running_app(), None, live)
                .unwrap();
        match service.restore(&backup.id, confirmed()).await {
            Err(err) => {
                assert!(err.to_string().contains("injected fault"), "{err}");
                assert_eq!(
                    synthorg_tests::capture(&fx.layout).await,
                    changed,
                    "after {fail_after} renames"
                );
                assert!(!fx.layout.root.join(".synthorg-restore.journal").exists());
                failures += 1;
            }
            Ok(_) => {
                assert_eq!(synthorg_tests::capture(&fx.layout).await, restored);
                break;
            }
        }
    }
    assert!(
        failures >= 8,
        "every component's two renames were interrupted once: {failures}"
    );
    mutate(&fx).await;
    // A leftover directory where the swap puts the old checkpoints is
    // cleared, never mistaken for live data.
    std::fs::create_dir_all(fx.layout.root.join(".checkpoints.restore-aside/in-the-way")).unwrap();
    let before = fx.service(&config);
    before.restore(&backup.id, confirmed()).await.unwrap();
    assert!(!fx.layout.checkpoints_dir.join("in-the-way").exists());
    assert!(!fx.layout.root.join(".checkpoints.restore-aside").exists());
}

#[tokio::test]
async fn restore_while_locked_is_busy_and_touches_nothing() {
    let fx = Fixture::new(300_000).await;
    let config = fx.config("");
    let service = fx.service(&config);
    let backup = service.create(Trigger::Manual).await.unwrap();
    mutate(&fx).await;
    let changed = synthorg_tests::capture(&fx.layout).await;
    let lock = adapters_fs::FileLock::in_dir(&config.path);
    let _held = backup_core::ports::OperationLock::try_acquire(
        &lock,
        backup_core::ports::Operation::Backup,
    )
    .await
    .unwrap();
    let err = service.restore(&backup.id, confirmed()).await.unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    assert_eq!(synthorg_tests::capture(&fx.layout).await, changed);
}

#[tokio::test]
async fn refusals_leave_live_data_byte_for_byte_unchanged() {
    let fx = Fixture::new(500_000).await;
    let gz = fx.service(&fx.config(""));
    let plain = fx.service(&fx.config("compression: none"));
    let partial = fx.service(&fx.config("include: [persistence, config]"));
    let archived = gz.create(Trigger::Manual).await.unwrap();
    let directory = plain.create(Trigger::Manual).await.unwrap();
    let without_memory = partial.create(Trigger::Manual).await.unwrap();
    mutate(&fx).await;
    let raw = synthorg_tests::raw_bytes(&fx.layout);
    let listed = gz.list().await.unwrap().len();

    // One flipped byte in a file of a directory-form backup.
    let file = fx
        .layout
        .backups_dir
        .join(directory.id.to_string())
        .join("synthorg.db");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[5000] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    let err = plain.restore(&directory.id, confirmed()).await.unwrap_err();
    assert!(
        matches!(err, Error::Integrity { .. }) && err.to_string().contains("synthorg.db"),
        "{err}"
    );

    // A requested component the backup does not hold.
    let err = gz
        .restore(
            &without_memory.id,
            RestoreOptions {
                confirm: true,
                components: Some(vec![Component::Memory]),
                dry_run: false,
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("component memory is not in the backup"),
        "{err}"
    );

    // An unknown manifest major version in the sidecar.
    let sidecar = fx
        .layout
        .backups_dir
        .join(format!("{}.manifest.json", archived.id));
    let text = std::fs::read_to_string(&sidecar).unwrap().replacen(
        "\"version\": \"1.3\"",
        "\"version\": \"2.0\"",
        1,
    );
    std::fs::write(&sidecar, text).unwrap();
    let err = gz.restore(&archived.id, confirmed()).await.unwrap_err();
    assert!(
        matches!(err, Error::Manifest { .. }) && err.to_string().contains("2.0"),
        "{err}"
    );
    let listed_now = gz.list().await.unwrap();
    // Listing reads the small summaries; the damaged sidecar shows on use.
    assert!(matches!(
        gz.show(&archived.id).await,
        Err(Error::Manifest { .. })
    ));
    assert!(matches!(
        gz.verify(&archived.id).await,
        Err(Error::Manifest { .. })
    ));

    assert_eq!(synthorg_tests::raw_bytes(&fx.layout), raw);
    assert_eq!(listed_now.len(), listed, "no safety backup was taken");
}

#[tokio::test]
async fn restore_into_an_empty_data_directory() {
    let fx = Fixture::new(500_000).await;
    let service = fx.service(&fx.config(""));
    let before = synthorg_tests::capture(&fx.layout).await;
    let backup = service.create(Trigger::Manual).await.unwrap();
    for p in [&fx.layout.database, &fx.layout.company_config] {
        std::fs::remove_file(p).unwrap();
    }
    for d in [&fx.layout.memory_dir, &fx.layout.checkpoints_dir] {
        std::fs::remove_dir_all(d).unwrap();
    }
    let _ = std::fs::remove_file(fx.layout.root.join("synthorg.db-wal"));
    let _ = std::fs::remove_file(fx.layout.root.join("synthorg.db-shm"));
    let report = service.restore(&backup.id, confirmed()).await.unwrap();
    assert!(report.safety_backup_id.is_none(), "nothing to protect");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("no safety backup")),
        "{:?}",
        report.warnings
    );
    assert_eq!(synthorg_tests::capture(&fx.layout).await, before);

    // With only the config present, the safety backup holds just that.
    std::fs::remove_dir_all(&fx.layout.memory_dir).unwrap();
    std::fs::write(&fx.layout.company_config, b"company: {name: other}\n").unwrap();
    let options = RestoreOptions {
        confirm: true,
        components: Some(vec![Component::Memory, Component::Config]),
        dry_run: false,
    };
    let report = service.restore(&backup.id, options).await.unwrap();
    let safety = service
        .show(&report.safety_backup_id.unwrap())
        .await
        .unwrap();
    assert_eq!(safety.components, vec![Component::Config]);
    assert_eq!(synthorg_tests::capture(&fx.layout).await, before);
}

/// A gzip'd tar of `entries` (path, kind, data) written as backup `id`'s
/// archive, with the sidecar's archive hash and size updated to match, so
/// that only the content checks can refuse it.
fn plant_archive(
    fx: &Fixture,
    id: &backup_core::BackupId,
    entries: &[(&str, backup_core::archive::TarKind, Vec<u8>, u64)],
) {
    use backup_core::archive::{END_OF_ARCHIVE, entry_header, padding};
    let mut tar = Vec::new();
    for (path, kind, data, declared) in entries {
        tar.extend(entry_header(path, kind, *declared, 0o600, 0).unwrap());
        tar.extend_from_slice(data);
        tar.extend_from_slice(padding(data.len() as u64));
    }
    tar.extend_from_slice(&END_OF_ARCHIVE);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let bytes = gz.finish().unwrap();
    std::fs::write(fx.layout.backups_dir.join(format!("{id}.tar.gz")), &bytes).unwrap();
    let sidecar = fx.layout.backups_dir.join(format!("{id}.manifest.json"));
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    m["archive"]["sha256"] = backup_core::Sha256Digest::of(&bytes).to_string().into();
    m["archive"]["size_bytes"] = (bytes.len() as u64).into();
    std::fs::write(&sidecar, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[tokio::test]
async fn hostile_archives_are_refused_before_live_data_is_touched() {
    use backup_core::archive::TarKind;
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config(""));
    let backup = service.create(Trigger::Manual).await.unwrap();
    let yaml = std::fs::read(&fx.layout.company_config).unwrap();
    let config_entry = (
        "config/company.yaml",
        TarKind::File,
        yaml.clone(),
        yaml.len() as u64,
    );
    mutate(&fx).await;
    let raw = synthorg_tests::raw_bytes(&fx.layout);
    type Entry<'a> = (&'a str, TarKind, Vec<u8>, u64);
    let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
        (
            "parent escape",
            vec![(
                "../../etc/passwd",
                TarKind::File,
                b"root:x:0:0".to_vec(),
                10,
            )],
            "refused entry",
        ),
        (
            "absolute path",
            vec![("/etc/passwd", TarKind::File, b"root:x:0:0".to_vec(), 10)],
            "refused entry",
        ),
        (
            "not in the manifest",
            vec![("memory/evil.bin", TarKind::File, b"evil".to_vec(), 4)],
            "not in the manifest",
        ),
        (
            "symlink to /",
            vec![("memory/root", TarKind::Symlink("/".into()), vec![], 0)],
            "not in the manifest",
        ),
        (
            "duplicate entry",
            vec![config_entry.clone(), config_entry.clone()],
            "duplicate entry",
        ),
        // Claims 1 GiB where the manifest says a few hundred bytes: refused
        // at the header, nothing expanded.
        (
            "tar bomb",
            vec![("config/company.yaml", TarKind::File, yaml.clone(), 1 << 30)],
            "size 1073741824 in the archive",
        ),
    ];
    for (what, entries, reason) in cases {
        plant_archive(&fx, &backup.id, &entries);
        let err = service.restore(&backup.id, confirmed()).await.unwrap_err();
        assert!(matches!(err, Error::Integrity { .. }), "{what}: {err}");
        assert!(err.to_string().contains(reason), "{what}: {err}");
        assert_eq!(
            synthorg_tests::raw_bytes(&fx.layout),
            raw,
            "{what}: live data touched"
        );
        let hidden = synthorg_tests::hidden_entries(&fx.layout.root);
        assert!(hidden.is_empty(), "{what}: staging left behind: {hidden:?}");
        assert!(!std::path::Path::new("/etc/passwd-synthorg-test").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_removes_a_journal_update_that_was_never_renamed_into_place() {
    // A restore killed while writing its journal leaves the temp file (found
    // by the SIGKILL loop of crates/cli/tests/crash.rs).
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config(""));
    let before = synthorg_tests::raw_bytes(&fx.layout);
    let temp = fx.layout.root.join("..synthorg-restore.journal.tmp-4242-0");
    std::fs::write(&temp, b"{\"state\": \"swapp").unwrap();
    let actions = service.recover().await.unwrap();
    assert!(!temp.exists(), "{actions:?}");
    assert!(
        actions.iter().any(|a| a.contains("journal.tmp")),
        "{actions:?}"
    );
    assert!(
        synthorg_tests::raw_bytes(&fx.layout) == before,
        "live data untouched"
    );
}

/// Waits until `db` exists with the writer's table.
async fn wait_for_commits(db: &std::path::Path) {
    for _ in 0..200 {
        if let Ok(rows) = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM bench_log")
            .fetch_one(&mut synthorg_tests::open(db).await)
            .await
            && rows > 20
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the writer never committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_under_a_live_writer_process_is_refused_and_its_rows_stay() {
    let fx = Fixture::new(1_000_000).await;
    let service = fx.service(&fx.config(""));
    let backup = service.create(Trigger::Manual).await.unwrap();
    // It writes for 6 s: long enough to still run when the restore looks,
    // even on a loaded machine running the other tests.
    let writer = std::process::Command::new(env!("CARGO_BIN_EXE_synthorg-bench-writer"))
        .arg(&fx.layout.database)
        .arg("6")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_commits(&fx.layout.database).await;
    let err = service.restore(&backup.id, confirmed()).await.unwrap_err();
    let Error::InUse {
        component,
        path,
        holder,
    } = &err
    else {
        panic!("expected in use, got {err}");
    };
    assert_eq!(*component, Component::Persistence);
    assert!(path.contains("synthorg.db"), "{err}");
    assert!(holder.contains(&writer.id().to_string()), "{err}");
    assert_eq!(err.kind(), backup_core::ErrorKind::Refused);
    assert_eq!(err.code(), "in_use");
    // No safety backup, no staging: nothing was touched.
    assert_eq!(service.list().await.unwrap().len(), 1);
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let commits = report["commits"].as_i64().unwrap();
    let mut conn = synthorg_tests::open(&fx.layout.database).await;
    let n: i64 = sqlx::query_scalar("SELECT n FROM bench_counter")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_log")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        (n, rows),
        (commits, commits),
        "every committed row is on disk"
    );
    sqlx::Connection::close(conn).await.unwrap();
    // Once the writer is gone, the same restore goes through.
    service.restore(&backup.id, confirmed()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_while_a_memory_database_is_open_is_refused() {
    let fx = Fixture::new(1_000_000).await;
    let service = fx.service(&fx.config(""));
    let backup = service.create(Trigger::Manual).await.unwrap();
    let mem0 = fx.layout.memory_dir.join("mem0_history.db");
    let conn = synthorg_tests::open(&mem0).await;
    let before = synthorg_tests::raw_bytes(&fx.layout);
    let err = service.restore(&backup.id, confirmed()).await.unwrap_err();
    assert!(
        matches!(&err, Error::InUse { component: Component::Memory, path, .. } if path.contains("mem0_history.db")),
        "{err}"
    );
    assert_eq!(synthorg_tests::raw_bytes(&fx.layout), before);
    // Restoring only what is not open is fine.
    let options = RestoreOptions {
        components: Some(vec![Component::Config]),
        ..confirmed()
    };
    service.restore(&backup.id, options).await.unwrap();
    sqlx::Connection::close(conn).await.unwrap();
}

fn ids_of(listed: &[Listed]) -> Vec<backup_core::BackupId> {
    listed.iter().map(|l| l.id().clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_the_oldest_backup_at_max_count_keeps_it() {
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config("retention: { max_count: 2 }"));
    let a = service.create(Trigger::Manual).await.unwrap().id;
    let b = service.create(Trigger::Manual).await.unwrap().id;
    let report = service.restore(&a, confirmed()).await.unwrap();
    let safety = report.safety_backup_id.unwrap();
    let ids = ids_of(&service.list().await.unwrap());
    for id in [&a, &b, &safety] {
        assert!(ids.contains(id), "{id} was pruned: {ids:?}");
    }
}

/// A restore deletes no backup (the app waits for it); the next backup's
/// retention trims the pool of safety backups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_deletes_nothing_and_the_next_backup_trims_the_safety_pool() {
    let fx = Fixture::new(200_000).await;
    let service = fx.service(&fx.config("retention: { max_count: 5, keep_pre_restore: 2 }"));
    let a = service.create(Trigger::Manual).await.unwrap().id;
    let mut safeties = Vec::new();
    for _ in 0..4 {
        let report = service.restore(&a, confirmed()).await.unwrap();
        safeties.push(report.safety_backup_id.unwrap());
        let ids = ids_of(&service.list().await.unwrap());
        for id in safeties.iter().chain([&a]) {
            assert!(ids.contains(id), "{id} was deleted by a restore: {ids:?}");
        }
    }
    let b = service.create(Trigger::Manual).await.unwrap().id;
    let ids = ids_of(&service.list().await.unwrap());
    assert!(ids.contains(&a) && ids.contains(&b), "{ids:?}");
    let kept: Vec<_> = safeties.iter().filter(|id| ids.contains(id)).collect();
    assert_eq!(kept, safeties[2..].iter().collect::<Vec<_>>(), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restores_leave_no_safety_backups_to_push_out_real_ones() {
    let fx = Fixture::new(300_000).await;
    let config = fx.config("retention: { max_count: 3 }");
    let service = fx.service(&config);
    let failing = synthorg_api::build_service_with(
        &config,
        synthorg_tests::running_app(),
        None,
        LiveData::new(&config.sources)
            .with_verifier(Arc::new(SqliteSnapshotter))
            .fail_swap_after(1),
    )
    .unwrap();
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(service.create(Trigger::Manual).await.unwrap().id);
    }
    let raw = synthorg_tests::raw_bytes(&fx.layout);
    for _ in 0..3 {
        failing.restore(&made[0], confirmed()).await.unwrap_err();
        assert_eq!(
            synthorg_tests::raw_bytes(&fx.layout),
            raw,
            "live data unchanged"
        );
    }
    let ids = ids_of(&service.list().await.unwrap());
    assert_eq!(
        ids.len(),
        3,
        "no safety backup of a restore that did not happen: {ids:?}"
    );
    let next = service.create(Trigger::Manual).await.unwrap().id;
    let ids = ids_of(&service.list().await.unwrap());
    assert_eq!(ids, vec![next, made[2].clone(), made[1].clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clock_jump_forward_and_back_new_backups_survive_their_own_retention() {
    let fx = Fixture::new(300_000).await;
    let config = fx.config("retention: { max_count: 3 }");
    let clock = Arc::new(synthorg_tests::ShiftedClock::default());
    let service = synthorg_api::build_service_with_clock(
        &config,
        synthorg_tests::running_app(),
        None,
        LiveData::new(&config.sources).with_verifier(Arc::new(SqliteSnapshotter)),
        clock.clone(),
    )
    .unwrap();
    let future = chrono::DateTime::parse_from_rfc3339("2027-06-01T00:00:00Z").unwrap();
    *clock.0.lock().unwrap() = future.signed_duration_since(chrono::Utc::now());
    let mut dated = Vec::new();
    for _ in 0..3 {
        dated.push(service.create(Trigger::Manual).await.unwrap().id);
    }
    *clock.0.lock().unwrap() = chrono::TimeDelta::zero();
    let fresh = service.create(Trigger::Manual).await.unwrap().id;
    let ids = ids_of(&service.list().await.unwrap());
    assert!(
        ids.contains(&fresh),
        "the new backup deleted itself: {ids:?}"
    );
    assert!(
        !ids.contains(&dated[0]),
        "the oldest-created one goes: {ids:?}"
    );
    let again = service.create(Trigger::Manual).await.unwrap().id;
    let ids = ids_of(&service.list().await.unwrap());
    assert!(ids.contains(&fresh) && ids.contains(&again), "{ids:?}");
    assert_eq!(ids.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_known_supported_schema_a_backup_newer_than_the_store_is_refused() {
    let fx = Fixture::new(300_000).await;
    let unknown = RunningApp {
        supported_schema: None,
        ..synthorg_tests::running_app()
    };
    let service = service_with(&fx, unknown, "retention: { max_count: 20 }");
    let old = service.create(Trigger::Manual).await.unwrap().id;
    let newer = synthorg_cli::demo::DEMO_SCHEMA_VERSION + 1;
    let mut conn = synthorg_tests::open(&fx.layout.database).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA user_version = {newer}"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let new = service.create(Trigger::Manual).await.unwrap().id;
    let err = service.restore(&new, confirmed()).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Incompatible { .. }), "{text}");
    assert!(
        text.contains("supported schema is unknown") && text.contains("SYNTHORG_SCHEMA_VERSION"),
        "{text}"
    );
    let report = service.restore(&old, confirmed()).await.unwrap();
    let warnings = report.warnings.join("\n");
    assert!(warnings.contains("supported schema unknown"), "{warnings}");
    assert!(!warnings.contains(&i64::MAX.to_string()), "{warnings}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_dry_run_run_the_staged_checks_of_a_restore() {
    // The memory database, and the main database (checked while the rest
    // of the backup still stages).
    for damaged in ["memory/mem0_history.db", "synthorg.db"] {
        staged_checks_refuse(damaged).await;
    }
}

async fn staged_checks_refuse(damaged: &str) {
    use backup_core::manifest::{Summary, tree_checksum};
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config("compression: none"));
    let backup = service.create(Trigger::Manual).await.unwrap();
    // A backup whose hashes all match but whose database is corrupt:
    // re-signed after damaging a page (what a bug, a bad disk under the
    // source or a tampering tool could publish).
    let dir = fx.layout.backups_dir.join(backup.id.to_string());
    let db = dir.join(damaged);
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 8192);
    for b in &mut bytes[4096..4196] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();
    let mut m = backup.clone();
    for f in &mut m.files {
        if f.path.as_str() == damaged {
            f.sha256 = backup_core::Sha256Digest::of(&bytes);
        }
    }
    m.checksum = tree_checksum(&m.files, &m.dirs, &m.symlinks);
    let json = m.to_json().unwrap();
    std::fs::write(dir.join("manifest.json"), &json).unwrap();
    std::fs::write(
        fx.layout.backups_dir.join(format!("{}.summary.json", m.id)),
        serde_json::to_vec(&Summary::from(&m)).unwrap(),
    )
    .unwrap();
    std::fs::write(
        fx.layout
            .backups_dir
            .join(format!("{}.manifest.json", m.id)),
        &json,
    )
    .unwrap();

    let report = service.verify(&m.id).await.unwrap();
    assert!(
        !report.ok,
        "{damaged}: hashes match, but it would not restore"
    );
    let problem = report.problem.unwrap();
    assert!(problem.contains(damaged), "{problem}");
    let raw = synthorg_tests::raw_bytes(&fx.layout);
    let dry = RestoreOptions {
        dry_run: true,
        ..RestoreOptions::default()
    };
    let err = service.restore(&m.id, dry).await.unwrap_err();
    assert!(matches!(err, Error::Integrity { .. }), "{err}");
    let err = service.restore(&m.id, confirmed()).await.unwrap_err();
    assert!(
        matches!(err, Error::Source { .. } | Error::Integrity { .. }),
        "{err}"
    );
    assert_eq!(synthorg_tests::raw_bytes(&fx.layout), raw, "{damaged}");
    // Nothing left in the data directory by the checks.
    let hidden = synthorg_tests::hidden_entries(&fx.layout.root);
    assert!(hidden.is_empty(), "{damaged}: {hidden:?}");
    // No safety backup of a restore that did not happen.
    let listed = service.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{damaged}: {:?}", ids_of(&listed));
    // A good backup verifies and dry-runs clean.
    let good = service.create(Trigger::Manual).await.unwrap();
    assert!(service.verify(&good.id).await.unwrap().ok);
    let dry = RestoreOptions {
        dry_run: true,
        ..RestoreOptions::default()
    };
    service.restore(&good.id, dry).await.unwrap();
}

/// The pre-restore safety backup of a local store is the replaced live
/// files themselves, moved into it by the swap (no copy, no recompression)
/// and published only after it: it shares nothing with the live data,
/// holds the rows a killed writer left in its WAL, verifies, and restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_safety_backup_keeps_a_killed_writers_wal_and_shares_nothing_with_live_data() {
    use std::os::unix::fs::MetadataExt;
    let fx = Fixture::new(1_000_000).await;
    let service = fx.service(&fx.config(""));
    let backup = service.create(Trigger::Manual).await.unwrap();
    let mut writer = std::process::Command::new(env!("CARGO_BIN_EXE_synthorg-bench-writer"))
        .arg(&fx.layout.database)
        .arg("30")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_commits(&fx.layout.database).await;
    writer.kill().unwrap();
    writer.wait().unwrap();
    let wal = fx.layout.root.join("synthorg.db-wal");
    assert!(
        std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0),
        "the killed writer left committed rows in its WAL"
    );

    let report = service.restore(&backup.id, confirmed()).await.unwrap();
    let safety = report.safety_backup_id.unwrap();
    let manifest = service.show(&safety).await.unwrap();
    assert_eq!(manifest.compression, backup_core::Compression::None);
    let dir = fx.layout.backups_dir.join(safety.to_string());
    for (path, _) in synthorg_tests::files_under(&dir) {
        let links = std::fs::metadata(dir.join(&path)).unwrap().nlink();
        assert_eq!(links, 1, "{} is shared with the live data", path.display());
    }
    // Changing the live data in place does not touch the safety backup.
    mutate(&fx).await;
    assert!(service.verify(&safety).await.unwrap().ok);

    service.restore(&safety, confirmed()).await.unwrap();
    let mut conn = synthorg_tests::open(&fx.layout.database).await;
    let (n, rows): (i64, i64) =
        sqlx::query_as("SELECT (SELECT n FROM bench_counter), (SELECT count(*) FROM bench_log)")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    assert!(rows > 20 && n == rows, "n {n}, rows {rows}");
}

/// A restore's regular safety backup (S3, encryption) reads the settled
/// live database in place instead of copying it with `VACUUM INTO`; a write
/// while it is read fails the snapshot instead of archiving a torn copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_database_is_read_in_place_and_a_change_while_read_fails_the_snapshot() {
    use backup_core::ports::ComponentSource;
    use futures::StreamExt;
    let fx = Fixture::new(1_000_000).await;
    let db = fx.layout.database.clone();
    let source = adapters_sqlite::SqliteSource::new(&db);
    let before = synthorg_tests::hidden_entries(&fx.layout.root);

    let snapshot = source.snapshot_settled().await.unwrap();
    // In place: no scratch copy next to the data.
    assert_eq!(synthorg_tests::hidden_entries(&fx.layout.root), before);
    let entry = snapshot.entries()[0].clone();
    let mut opened = snapshot.open(&entry.path).await.unwrap();
    let mut read = Vec::new();
    while let Some(chunk) = opened.stream.next().await {
        read.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(read, std::fs::read(&db).unwrap());
    assert_eq!(entry.size, read.len() as u64);
    snapshot.finish().await.unwrap();

    let snapshot = source.snapshot_settled().await.unwrap();
    let mut conn = synthorg_tests::open(&db).await;
    sqlx::query("CREATE TABLE written_meanwhile(x)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let err = snapshot.finish().await.unwrap_err();
    assert!(
        matches!(&err, Error::Source { reason, .. } if reason.contains("changed while it was read")),
        "{err}"
    );
}
