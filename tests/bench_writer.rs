//! `synthorg-bench-writer DB SECONDS [normal|full] [STOP_FILE]`: commits to
//! a WAL database about 500 times a second for SECONDS, or until STOP_FILE
//! exists (each transaction updates a counter and appends a log row), with
//! `synchronous` NORMAL (default) or FULL, and prints commit latencies as
//! JSON: count, p50, p99, max (ms). Used by bench/run to measure how much a
//! backup disturbs the app, next to a bare `VACUUM INTO`.

use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(db), Some(secs)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: synthorg-bench-writer DB SECONDS [normal|full] [STOP_FILE]");
    };
    let secs: f64 = secs.parse()?;
    let synchronous = match args.next().as_deref() {
        None | Some("normal") => SqliteSynchronous::Normal,
        Some("full") => SqliteSynchronous::Full,
        Some(other) => anyhow::bail!("synchronous must be normal or full, not {other}"),
    };
    let stop = args.next().map(std::path::PathBuf::from);
    let mut conn = SqliteConnectOptions::from_str("sqlite://")?
        .filename(&db)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    )
    .execute(&mut conn)
    .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_log (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)",
    )
    .execute(&mut conn)
    .await?;
    sqlx::query("INSERT OR IGNORE INTO bench_counter (id, n) VALUES (1, 0)")
        .execute(&mut conn)
        .await?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut latencies = Vec::new();
    while Instant::now() < end && !stop.as_ref().is_some_and(|f| f.exists()) {
        let t = Instant::now();
        let mut tx = conn.begin().await?;
        sqlx::query("UPDATE bench_counter SET n = n + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO bench_log (payload) VALUES (hex(randomblob(64)))")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        // About 500 commits a second, like a busy app.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    conn.close().await?;
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "{{\"commits\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
        latencies.len(),
        pick(0.5),
        pick(0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    Ok(())
}
