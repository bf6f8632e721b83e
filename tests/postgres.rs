//! PostgreSQL deployments end to end against a real server (a throwaway
//! cluster, see `pg_cluster.rs`): a consistent dump while a writer
//! commits, the all-or-nothing restore of the database and the files
//! together, refusals that touch nothing, SIGKILL at every step of the
//! database swap, and clear errors for bad URLs, passwords, databases and
//! a server that goes away.

#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backup_core::manifest::Engine;
use backup_core::{BackupConfig, BackupService, Error, RestoreOptions, Trigger};
use sqlx::Connection;
use synthorg_tests::pg_cluster::PgCluster;
use synthorg_tests::{Fixture, capture, confirmed};

const DB: &str = "synthorg_app";
const ACCOUNTS: i64 = 20;
const SCHEMA: i64 = synthorg_cli::demo::DEMO_SCHEMA_VERSION;

/// The demo config with the database at `url` instead of `synthorg.db`,
/// plus `extra` lines in the `backup:` block.
fn pg_config(fx: &Fixture, url: &str, extra: &str) -> BackupConfig {
    let yaml = synthorg_tests::config_yaml(extra).replace(
        "    database: synthorg.db\n",
        &format!("    database_url: {url}\n"),
    );
    BackupConfig::load(Some(&yaml), &fx.layout.root).expect("valid config")
}

fn service(_: &Fixture, config: &BackupConfig) -> BackupService {
    synthorg_api::build_service(config, synthorg_tests::running_app_for(config), None)
        .expect("service")
}

/// Two tables with an invariant across them: every account's balance is
/// 100 plus what the ledger moved to it minus what it moved away; the
/// schema version table says the demo's schema version.
async fn seed(pg: &PgCluster, marker: &str) {
    pg.fresh_database(DB).await;
    pg.exec(
        DB,
        &format!(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             CREATE TABLE ledger (id bigserial PRIMARY KEY, src bigint NOT NULL, dst bigint NOT NULL, amount bigint NOT NULL, note text NOT NULL);
             CREATE TABLE schema_version (version integer NOT NULL);
             CREATE TABLE marker (v text NOT NULL);
             INSERT INTO schema_version VALUES ({SCHEMA});
             INSERT INTO marker VALUES ('{marker}');
             INSERT INTO accounts SELECT g, 100 FROM generate_series(1, {ACCOUNTS}) g;
             INSERT INTO ledger (src, dst, amount, note) SELECT 1 + g % {ACCOUNTS}, 1 + (g * 7) % {ACCOUNTS}, 0, repeat('x', 200) FROM generate_series(1, 5000) g;"
        ),
    )
    .await;
}

/// Whether the invariant holds; the number of ledger rows and the marker.
async fn state(pg: &PgCluster) -> (bool, i64, String) {
    let mut c = pg.connect(DB).await;
    let broken: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM accounts a WHERE a.balance <> 100
           + COALESCE((SELECT sum(amount) FROM ledger WHERE dst = a.id), 0)
           - COALESCE((SELECT sum(amount) FROM ledger WHERE src = a.id), 0)",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let marker: String = sqlx::query_scalar("SELECT v FROM marker")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let _ = c.close().await;
    (broken == 0, rows, marker)
}

/// Transfers between accounts, one transaction each, until stopped.
fn start_writer(pg: &PgCluster) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let url = pg.url(DB);
    let flag = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let mut n = 0u64;
        while !flag.load(Ordering::Relaxed) {
            let (src, dst) = (
                1 + (n as i64 % ACCOUNTS),
                1 + ((n as i64 * 3 + 1) % ACCOUNTS),
            );
            let mut tx = c.begin().await.unwrap();
            for sql in [
                "UPDATE accounts SET balance = balance - 5 WHERE id = $1",
                "UPDATE accounts SET balance = balance + 5 WHERE id = $2",
                "INSERT INTO ledger (src, dst, amount, note) VALUES ($1, $2, 5, 'transfer')",
            ] {
                sqlx::query(sql)
                    .bind(src)
                    .bind(dst)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
            n += 1;
        }
        let _ = c.close().await;
        n
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_deployment_round_trips_all_or_nothing_with_a_writer_during_the_backup() {
    let Some(pg) = PgCluster::start() else { return };
    seed(&pg, "backed-up").await;
    let fx = Fixture::new(1_000_000).await;
    std::fs::remove_file(&fx.layout.database).unwrap(); // no SQLite here
    let config = pg_config(&fx, &pg.url(DB), "");
    let svc = service(&fx, &config);

    let (stop, writer) = start_writer(&pg);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let m = svc.create(Trigger::Manual).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let commits = writer.await.unwrap();
    assert!(commits > 0, "the writer committed during the backup");
    assert_eq!(m.engine, Engine::Postgres);
    assert_eq!(m.db_schema_version, Some(SCHEMA));
    assert!(m.file("synthorg.pgdump").is_some());
    assert!(m.file("synthorg.db").is_none());
    assert!(svc.verify(&m.id).await.unwrap().ok);
    let files_then = capture(&fx.layout).await;

    // Change the database and the files, then restore both together.
    pg.exec(
        DB,
        "UPDATE marker SET v = 'changed'; DELETE FROM ledger; UPDATE accounts SET balance = 0;",
    )
    .await;
    std::fs::write(&fx.layout.company_config, b"company: {name: changed}\n").unwrap();
    let report = svc.restore(&m.id, confirmed()).await.unwrap();
    let (consistent, rows, marker) = state(&pg).await;
    assert!(consistent, "the dump is one snapshot: the invariant holds");
    assert!(rows >= 5000, "{rows}");
    assert_eq!(marker, "backed-up");
    assert_eq!(capture(&fx.layout).await, files_then);
    assert_eq!(
        pg.databases(DB).await,
        [DB],
        "no staging or aside database left"
    );

    // The safety backup holds the replaced database, and restores it.
    let safety = report.safety_backup_id.unwrap();
    let safety_m = svc.show(&safety).await.unwrap();
    assert_eq!(safety_m.engine, Engine::Postgres);
    svc.restore(&safety, confirmed()).await.unwrap();
    let (_, rows, marker) = state(&pg).await;
    assert_eq!((rows, marker.as_str()), (0, "changed"));

    // A SQLite backup never restores into PostgreSQL.
    let fx2 = Fixture::new(300_000).await;
    let sqlite_svc =
        fx2.service(&fx2.config(&format!("path: {}", fx.layout.backups_dir.display())));
    let sqlite_backup = sqlite_svc.create(Trigger::Manual).await.unwrap();
    let e = svc
        .restore(&sqlite_backup.id, confirmed())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Incompatible { .. }), "{e:?}");
    assert!(
        e.to_string().contains("SQLite") && e.to_string().contains("PostgreSQL"),
        "{e}"
    );
    let e = sqlite_svc.restore(&m.id, confirmed()).await.unwrap_err();
    assert!(matches!(e, Error::Incompatible { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_is_refused_while_a_session_is_connected_or_without_createdb() {
    let Some(pg) = PgCluster::start() else { return };
    seed(&pg, "old").await;
    let fx = Fixture::new(300_000).await;
    std::fs::remove_file(&fx.layout.database).unwrap();
    let svc = service(&fx, &pg_config(&fx, &pg.url(DB), ""));
    let m = svc.create(Trigger::Manual).await.unwrap();
    pg.exec(DB, "UPDATE marker SET v = 'live'").await;
    let files = capture(&fx.layout).await;

    let session = pg.connect(DB).await;
    let e = svc.restore(&m.id, confirmed()).await.unwrap_err();
    assert!(matches!(e, Error::InUse { .. }), "{e:?}");
    assert!(
        e.to_string().contains("pid") && e.to_string().contains(DB),
        "{e}"
    );
    drop(session);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(state(&pg).await.2, "live");
    assert_eq!(capture(&fx.layout).await, files);
    assert_eq!(svc.list().await.unwrap().len(), 1, "no safety backup taken");

    pg.exec(
        "postgres",
        "DROP ROLE IF EXISTS plain_owner; CREATE ROLE plain_owner LOGIN PASSWORD 'pw-plain-owner' NOCREATEDB;",
    )
    .await;
    pg.exec(
        DB,
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO plain_owner",
    )
    .await;
    let weak = service(
        &fx,
        &pg_config(&fx, &pg.url_as("plain_owner", "pw-plain-owner", DB), ""),
    );
    let e = weak.restore(&m.id, confirmed()).await.unwrap_err();
    assert!(e.to_string().contains("CREATEDB"), "{e}");
    assert!(!e.to_string().contains("pw-plain-owner"), "{e}");
    assert_eq!(state(&pg).await.2, "live");
    assert_eq!(pg.databases(DB).await, [DB]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_for_bad_urls_passwords_databases_and_no_partial_backup() {
    let Some(pg) = PgCluster::start() else { return };
    seed(&pg, "x").await;
    let fx = Fixture::new(300_000).await;
    std::fs::remove_file(&fx.layout.database).unwrap();
    let attempt = |url: String| {
        let config = pg_config(&fx, &url, "");
        let svc = service(&fx, &config);
        async move {
            let e = svc.create(Trigger::Manual).await.unwrap_err();
            assert!(
                svc.list().await.unwrap().is_empty(),
                "nothing listed after {e}"
            );
            e.to_string()
        }
    };
    let e = attempt(pg.url_as("postgres", "not-the-password", DB)).await;
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("not-the-password"), "{e}");
    let e = attempt(pg.url("no_such_db")).await;
    assert!(
        e.contains("no_such_db") && e.contains("does not exist"),
        "{e}"
    );
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = attempt(format!("postgres://postgres:pw@127.0.0.1:{closed}/{DB}")).await;
    assert!(e.contains("cannot reach"), "{e}");

    // Both engines configured: a config error naming both keys.
    let yaml = synthorg_tests::config_yaml("").replace(
        "    database: synthorg.db\n",
        &format!(
            "    database: synthorg.db\n    database_url: {}\n",
            pg.url(DB)
        ),
    );
    let e = BackupConfig::load(Some(&yaml), &fx.layout.root)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("backup.sources.database_url") && e.contains("backup.sources.database "),
        "{e}"
    );
    let shown = serde_json::to_string(&pg_config(&fx, &pg.url(DB), "")).unwrap();
    assert!(
        !shown.contains(synthorg_tests::pg_cluster::PASSWORD),
        "{shown}"
    );
    assert!(shown.contains("postgres:***@"), "{shown}");

    // The server goes away in the middle of a dump: the backup fails
    // naming the database, nothing is listed, nothing is left over.
    pg.exec(
        DB,
        "INSERT INTO ledger (src, dst, amount, note) SELECT 1, 2, 0, repeat(md5(g::text), 40) FROM generate_series(1, 300000) g",
    )
    .await;
    let svc = service(&fx, &pg_config(&fx, &pg.url(DB), ""));
    let backup = svc.create(Trigger::Manual);
    let kill = async {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        pg.stop_now();
    };
    let (result, ()) = tokio::join!(backup, kill);
    let e = result.unwrap_err();
    assert!(matches!(e, Error::Source { .. }), "{e:?}");
    assert!(e.to_string().contains(DB), "{e}");
    assert!(svc.list().await.unwrap().is_empty());
    assert_eq!(
        synthorg_tests::hidden_entries(&fx.layout.root),
        Vec::<String>::new()
    );
}

/// The crash helper restoring `id`, aborting after rename `n`.
fn killed_restore(config_file: &std::path::Path, fx: &Fixture, id: &str, n: &str) -> bool {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synthorg-crash-helper"))
        .arg(config_file)
        .arg(&fx.layout.root)
        .args(["restore", id])
        .env("SYNTHORG_CRASH_ABORT_AFTER_RENAME", n)
        .output()
        .unwrap();
    !out.status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_at_every_step_of_the_database_swap_ends_old_or_new() {
    let Some(pg) = PgCluster::start() else { return };
    seed(&pg, "new").await;
    let fx = Fixture::new(300_000).await;
    std::fs::remove_file(&fx.layout.database).unwrap();
    let yaml = synthorg_tests::config_yaml("retention: { max_count: 50, keep_pre_restore: 50 }")
        .replace(
            "    database: synthorg.db\n",
            &format!("    database_url: {}\n", pg.url(DB)),
        );
    let config_file = fx.dir.path().join("pg.yaml");
    std::fs::write(&config_file, &yaml).unwrap();
    let config = BackupConfig::load(Some(&yaml), &fx.layout.root).unwrap();
    let svc = service(&fx, &config);
    let m = svc.create(Trigger::Manual).await.unwrap();
    let new_files = capture(&fx.layout).await;
    let mut outcomes = Vec::new();
    // Renames: 2 of databases, then the files'; "commit" after the swap.
    for n in ["0", "1", "2", "3", "4", "5", "6", "7", "commit"] {
        pg.exec(DB, "UPDATE marker SET v = 'old'").await;
        std::fs::write(&fx.layout.company_config, b"company: {name: old}\n").unwrap();
        let old_files = capture(&fx.layout).await;
        let killed = killed_restore(&config_file, &fx, &m.id.to_string(), n);
        // The next operation recovers first.
        let after = service(&fx, &config);
        after.create(Trigger::Manual).await.unwrap();
        let marker = state(&pg).await.2;
        let files = capture(&fx.layout).await;
        match marker.as_str() {
            "old" => assert_eq!(files, old_files, "step {n}: old database, new files"),
            "new" => assert_eq!(files, new_files, "step {n}: new database, old files"),
            other => panic!("step {n}: marker {other}"),
        }
        assert_eq!(pg.databases(DB).await, [DB], "step {n}: leftovers");
        assert!(state(&pg).await.0, "step {n}: consistent");
        outcomes.push(format!(
            "{n}:{}{marker}",
            if killed { "killed→" } else { "" }
        ));
    }
    eprintln!("outcomes: {outcomes:?}");
    assert!(
        outcomes.iter().any(|o| o.ends_with("old")) && outcomes.iter().any(|o| o.ends_with("new"))
    );
    for listed in svc.list().await.unwrap() {
        assert!(svc.verify(listed.id()).await.unwrap().ok, "{}", listed.id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_options_without_persistence_leave_the_database_alone() {
    let Some(pg) = PgCluster::start() else { return };
    seed(&pg, "kept").await;
    let fx = Fixture::new(300_000).await;
    std::fs::remove_file(&fx.layout.database).unwrap();
    let svc = service(&fx, &pg_config(&fx, &pg.url(DB), ""));
    let m = svc.create(Trigger::Manual).await.unwrap();
    pg.exec(DB, "UPDATE marker SET v = 'live'").await;
    std::fs::write(&fx.layout.company_config, b"company: {name: changed}\n").unwrap();
    let session = pg.connect(DB).await; // allowed: the database is not replaced
    svc.restore(
        &m.id,
        RestoreOptions {
            confirm: true,
            components: Some(vec![backup_core::Component::Config]),
            ..RestoreOptions::default()
        },
    )
    .await
    .unwrap();
    drop(session);
    assert_eq!(state(&pg).await.2, "live");
    assert_ne!(
        std::fs::read(&fx.layout.company_config).unwrap(),
        b"company: {name: changed}\n"
    );
}

/// The crash helper running `op` with `env`; its output.
fn helper(
    config_file: &std::path::Path,
    fx: &Fixture,
    op: &str,
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_synthorg-crash-helper"));
    cmd.arg(config_file).arg(&fx.layout.root).arg(op);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_comes_from_pgpassword_or_pgpass_and_a_missing_pg_dump_is_named() {
    let Some(pg) = PgCluster::start() else { return };
    seed(&pg, "x").await;
    let fx = Fixture::new(300_000).await;
    std::fs::remove_file(&fx.layout.database).unwrap();
    let no_password = pg
        .url(DB)
        .replace(&format!(":{}@", synthorg_tests::pg_cluster::PASSWORD), "@");
    assert!(!no_password.contains(synthorg_tests::pg_cluster::PASSWORD));
    let yaml = synthorg_tests::config_yaml("").replace(
        "    database: synthorg.db\n",
        &format!("    database_url: {no_password}\n"),
    );
    let config_file = fx.dir.path().join("pg.yaml");
    std::fs::write(&config_file, yaml).unwrap();
    let empty_pgpass = fx.dir.path().join("empty.pgpass");
    std::fs::write(&empty_pgpass, "").unwrap();

    let out = helper(
        &config_file,
        &fx,
        "backup",
        &[
            ("PGPASSWORD", synthorg_tests::pg_cluster::PASSWORD),
            ("PGPASSFILE", empty_pgpass.to_str().unwrap()),
        ],
    );
    assert!(
        out.status.success(),
        "PGPASSWORD: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pgpass = fx.dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "127.0.0.1:{}:*:postgres:{}\n",
            pg.port(),
            synthorg_tests::pg_cluster::PASSWORD
        ),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = helper(
        &config_file,
        &fx,
        "backup",
        &[("PGPASSFILE", pgpass.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        ".pgpass: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = helper(
        &config_file,
        &fx,
        "backup",
        &[
            ("PGPASSFILE", pgpass.to_str().unwrap()),
            ("PATH", "/nonexistent"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("pg_dump is not installed"), "{stderr}");
}
