//! The SQLite adapter against real database files: snapshots under a busy
//! writer, un-checkpointed WAL content, SQLite files inside memory/,
//! staged-database verification, and distinct errors.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use adapters_sqlite::{SqliteSnapshotter, SqliteSource, verify_database};
use backup_core::ports::{ComponentSource, DatabaseVerifier, FileSnapshotter};
use backup_core::{ArchivePath, Component, Error};
use futures::StreamExt;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

async fn open(path: &Path, mode: SqliteJournalMode) -> SqliteConnection {
    SqliteConnectOptions::from_str("sqlite://")
        .unwrap()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(mode)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

async fn schema(conn: &mut SqliteConnection) {
    for sql in [
        "CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)",
        "INSERT OR IGNORE INTO counter (id, n) VALUES (1, 0)",
        "PRAGMA user_version = 7",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
}

/// One transaction: the counter and the log move together.
async fn commit_one(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("UPDATE counter SET n = n + 1 WHERE id = 1")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO log (payload) VALUES (hex(randomblob(100)))")
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Copies a snapshot's single file out, to inspect it after `finish`.
async fn take(source: &SqliteSource, out: &Path) -> Option<i64> {
    let snap = source.snapshot().await.unwrap();
    let path = ArchivePath::parse("synthorg.db").unwrap();
    let mut opened = snap.open(&path).await.unwrap();
    let mut bytes = Vec::new();
    while let Some(chunk) = opened.stream.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(bytes.len() as u64, opened.size);
    std::fs::write(out, bytes).unwrap();
    let schema = snap.db_schema_version();
    snap.finish().await.unwrap();
    schema
}

async fn counter_and_log(path: &Path) -> (i64, i64) {
    let mut conn = open(path, SqliteJournalMode::Delete).await;
    let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM log")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    (n, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_under_a_continuous_writer_are_consistent_and_the_writer_never_fails() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("synthorg.db");
    let mut conn = open(&db, SqliteJournalMode::Wal).await;
    schema(&mut conn).await;
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, commits) = (Arc::clone(&stop), Arc::clone(&commits));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                commit_one(&mut conn).await?;
                commits.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, sqlx::Error>(())
        })
    };
    while commits.load(Ordering::Relaxed) < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let source = SqliteSource::new(&db);
    let mut last = 0;
    for i in 0..3 {
        let before = commits.load(Ordering::Relaxed);
        let out = dir.path().join(format!("snap-{i}.db"));
        assert_eq!(take(&source, &out).await, Some(7));
        let (n, rows) = counter_and_log(&out).await;
        assert_eq!(n, rows, "counter and log agree in snapshot {i}");
        assert!(
            n as u64 >= before && n >= last,
            "snapshot {i} is recent: {n} >= {before}"
        );
        last = n;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap().expect("the writer saw no errors");
    // No scratch directory is left next to the database.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn snapshot_contains_committed_rows_still_in_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("synthorg.db");
    let mut conn = open(&db, SqliteJournalMode::Wal).await;
    sqlx::query("PRAGMA wal_autocheckpoint = 0")
        .execute(&mut conn)
        .await
        .unwrap();
    schema(&mut conn).await;
    for _ in 0..2000 {
        commit_one(&mut conn).await.unwrap();
    }
    let wal = std::fs::metadata(dir.path().join("synthorg.db-wal"))
        .unwrap()
        .len();
    assert!(wal > 1_000_000, "the WAL holds the rows ({wal} bytes)");
    let out = dir.path().join("snap.db");
    take(&SqliteSource::new(&db), &out).await;
    assert_eq!(counter_and_log(&out).await, (2000, 2000));
    // The writer's connection is still open: nothing forced a checkpoint on it.
    commit_one(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_found_by_header_are_copied_consistently_while_written() {
    let dir = tempfile::tempdir().unwrap();
    // Named like data, not like a database: detection is by header.
    let db = dir.path().join("mem0_history.bin");
    let mut conn = open(&db, SqliteJournalMode::Wal).await;
    schema(&mut conn).await;
    let header = std::fs::read(&db).unwrap();
    assert!(FileSnapshotter::handles(&SqliteSnapshotter, &header[..100]));
    assert!(!FileSnapshotter::handles(
        &SqliteSnapshotter,
        b"not a database"
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                commit_one(&mut conn).await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        let out = dir.path().join(format!("copy-{i}.db"));
        SqliteSnapshotter
            .copy_consistent(Component::Memory, &db, &out)
            .await
            .unwrap();
        let (n, rows) = counter_and_log(&out).await;
        assert_eq!(n, rows);
        assert!(n > 0);
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
}

#[tokio::test]
async fn staged_verification_rejects_a_corrupted_page_and_a_wrong_schema() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("staged.db");
    let mut conn = open(&db, SqliteJournalMode::Delete).await;
    schema(&mut conn).await;
    for _ in 0..500 {
        commit_one(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();
    assert_eq!(
        verify_database(Component::Persistence, &db, Some(7))
            .await
            .unwrap(),
        7
    );
    assert_eq!(
        SqliteSnapshotter
            .verify(Component::Persistence, &db, None)
            .await
            .unwrap(),
        7
    );

    let err = verify_database(Component::Persistence, &db, Some(8))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("user_version") && err.contains('7') && err.contains('8'),
        "{err}"
    );

    // Scribble over a page in the middle of the log table.
    let mut bytes = std::fs::read(&db).unwrap();
    let page = 4096;
    let at = (bytes.len() / page / 2) * page;
    for b in &mut bytes[at + 8..at + page] {
        *b = 0x5a;
    }
    std::fs::write(&db, bytes).unwrap();
    let err = verify_database(Component::Persistence, &db, Some(7))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
}

#[tokio::test]
async fn missing_not_sqlite_locked_and_corrupt_each_have_their_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let reason = |e: Error| match e {
        Error::Source {
            reason,
            path,
            component,
            ..
        } => {
            assert_eq!(component, Component::Persistence);
            assert!(path.ends_with(".db"), "{path}");
            reason
        }
        other => panic!("expected a source error, got {other}"),
    };

    let missing = SqliteSource::new(dir.path().join("missing.db"));
    assert!(reason(missing.snapshot().await.err().unwrap()).contains("does not exist"));

    let text = dir.path().join("text.db");
    std::fs::write(&text, b"just some text, long enough to have a header").unwrap();
    assert!(
        reason(SqliteSource::new(&text).snapshot().await.err().unwrap())
            .contains("not a SQLite database")
    );

    let locked = dir.path().join("locked.db");
    let mut holder = open(&locked, SqliteJournalMode::Delete).await;
    schema(&mut holder).await;
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::query("INSERT INTO log (payload) VALUES ('x')")
        .execute(&mut holder)
        .await
        .unwrap();
    let source = SqliteSource::new(&locked).with_busy_timeout(Duration::from_millis(300));
    assert!(reason(source.snapshot().await.err().unwrap()).contains("locked"));
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();
    assert!(
        source.snapshot().await.is_ok(),
        "works once the lock is gone"
    );

    let corrupt = dir.path().join("corrupt.db");
    let mut conn = open(&corrupt, SqliteJournalMode::Delete).await;
    schema(&mut conn).await;
    conn.close().await.unwrap();
    let mut bytes = std::fs::read(&corrupt).unwrap();
    // Keep the 16-byte magic, break the header fields behind it.
    for b in &mut bytes[16..100] {
        *b = 0xff;
    }
    std::fs::write(&corrupt, bytes).unwrap();
    let r = reason(SqliteSource::new(&corrupt).snapshot().await.err().unwrap());
    assert!(
        r.contains("corrupt") || r.contains("not a SQLite database"),
        "{r}"
    );
}
