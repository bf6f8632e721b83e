//! Shared fixtures of the end-to-end suites: a generated SynthOrg data
//! directory, a service wired with the real adapters, SQL-level
//! comparison of databases, and a continuous writer.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use backup_core::{BackupConfig, BackupService, RunningApp};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection};
use synthorg_cli::demo::{self, DemoLayout, DemoSize};

/// The app version the fixtures run as.
pub const APP_VERSION: &str = "1.4.0";

/// A generated data directory with its config.
pub struct Fixture {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// Where everything is.
    pub layout: DemoLayout,
}

impl Fixture {
    /// Generates a small (~`bytes`) demo data directory.
    pub async fn new(bytes: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = demo::generate(&dir.path().join("data"), DemoSize::total(bytes), 42)
            .await
            .expect("generate demo data");
        Fixture { dir, layout }
    }

    /// The config of the data directory, with `extra` YAML lines appended
    /// to its `backup:` block.
    pub fn config(&self, extra: &str) -> BackupConfig {
        let mut yaml = demo::config_yaml();
        for line in extra.lines() {
            yaml.push_str("  ");
            yaml.push_str(line);
            yaml.push('\n');
        }
        BackupConfig::load(Some(&yaml), &self.layout.root).expect("valid config")
    }

    /// A service with the real adapters for `config`.
    pub fn service(&self, config: &BackupConfig) -> BackupService {
        synthorg_api::build_service(config, running_app(), None).expect("service")
    }
}

/// The running app of the fixtures.
pub fn running_app() -> RunningApp {
    RunningApp {
        version: semver::Version::parse(APP_VERSION).expect("version"),
        supported_schema: demo::DEMO_SCHEMA_VERSION,
    }
}

/// Opens an existing database.
pub async fn open(path: &Path) -> SqliteConnection {
    SqliteConnectOptions::from_str("sqlite://")
        .expect("options")
        .filename(path)
        .create_if_missing(false)
        .connect()
        .await
        .expect("open database")
}

/// Every row of every table, as text, ordered: two databases with the same
/// dump hold the same data.
pub async fn dump(path: &Path) -> Vec<String> {
    let mut conn = open(path).await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await
    .expect("tables");
    let mut out = Vec::new();
    for t in tables {
        let sql = format!("SELECT * FROM \"{t}\" ORDER BY 1");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await
            .expect("rows");
        for row in rows {
            let mut line = format!("{t}:");
            for i in 0..row.len() {
                let v: Option<String> = row
                    .try_get::<Option<String>, _>(i)
                    .or_else(|_| {
                        row.try_get::<Option<i64>, _>(i)
                            .map(|v| v.map(|v| v.to_string()))
                    })
                    .or_else(|_| {
                        row.try_get::<Option<f64>, _>(i)
                            .map(|v| v.map(|v| v.to_string()))
                    })
                    .unwrap_or(None);
                line.push_str(&format!("{v:?}|"));
            }
            out.push(line);
        }
    }
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut conn)
        .await
        .expect("version");
    out.push(format!("user_version={version}"));
    let _ = conn.close().await;
    out
}

/// Every regular file under `root`, relative path -> bytes, sorted.
pub fn files_under(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let ft = entry.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                let rel = entry
                    .path()
                    .strip_prefix(root)
                    .expect("prefix")
                    .to_path_buf();
                out.push((rel, std::fs::read(entry.path()).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// A task committing continuously to a WAL database: each transaction
/// bumps a counter and appends a log row, so a consistent snapshot always
/// has `counter = count(log)`.
pub struct Writer {
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<Result<u64, String>>,
}

impl Writer {
    /// Creates the writer's tables in `db` and starts committing.
    pub async fn start(db: &Path) -> Writer {
        let mut conn = SqliteConnectOptions::from_str("sqlite://")
            .expect("options")
            .filename(db)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .expect("open writer");
        sqlx::query("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)")
            .execute(&mut conn)
            .await
            .expect("counter");
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS wlog (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)",
        )
        .execute(&mut conn)
        .await
        .expect("log");
        sqlx::query("INSERT OR IGNORE INTO counter (id, n) VALUES (1, 0)")
            .execute(&mut conn)
            .await
            .expect("seed");
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&commits));
        let handle = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
                sqlx::query("UPDATE counter SET n = n + 1 WHERE id = 1")
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query("INSERT INTO wlog (payload) VALUES (?)")
                    .bind("x".repeat(200))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                c.fetch_add(1, Ordering::Relaxed);
            }
            let _ = conn.close().await;
            Ok(c.load(Ordering::Relaxed))
        });
        Writer {
            stop,
            commits,
            handle,
        }
    }

    /// Commits so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Stops the writer and returns its commit count, or its first error.
    pub async fn stop(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.map_err(|e| e.to_string())?
    }
}

/// `counter.n` and `count(wlog)` of a database.
pub async fn writer_state(db: &Path) -> (i64, i64) {
    let mut conn = open(db).await;
    let n: i64 = sqlx::query_scalar("SELECT n FROM counter WHERE id = 1")
        .fetch_one(&mut conn)
        .await
        .expect("n");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM wlog")
        .fetch_one(&mut conn)
        .await
        .expect("rows");
    let _ = conn.close().await;
    (n, rows)
}

/// The content of live data, compared by value: databases by SQL dump,
/// other files by sha256. Equal states hold the same data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveState {
    /// SQL dump of `synthorg.db`, hashed.
    pub database: String,
    /// Every file under memory/ (databases by dump), hashed.
    pub memory: Vec<(PathBuf, String)>,
    /// The company config, hashed.
    pub config: String,
    /// Every file under checkpoints/, hashed.
    pub checkpoints: Vec<(PathBuf, String)>,
}

fn hash(bytes: &[u8]) -> String {
    backup_core::Sha256Digest::of(bytes).to_string()
}

impl LiveState {
    /// Captures the live data of `layout`.
    pub async fn capture(layout: &DemoLayout) -> LiveState {
        let mut memory = Vec::new();
        for (rel, bytes) in files_under(&layout.memory_dir) {
            let value = if bytes.starts_with(b"SQLite format 3\0") {
                hash(
                    dump(&layout.memory_dir.join(&rel))
                        .await
                        .join("\n")
                        .as_bytes(),
                )
            } else {
                hash(&bytes)
            };
            memory.push((rel, value));
        }
        memory.retain(|(rel, _)| {
            let name = rel.to_string_lossy();
            !(name.ends_with("-wal") || name.ends_with("-shm"))
        });
        LiveState {
            database: hash(dump(&layout.database).await.join("\n").as_bytes()),
            memory,
            config: hash(&std::fs::read(&layout.company_config).expect("config")),
            checkpoints: files_under(&layout.checkpoints_dir)
                .into_iter()
                .map(|(p, b)| (p, hash(&b)))
                .collect(),
        }
    }
}
