//! Shared fixtures of the end-to-end suites: a generated SynthOrg data
//! directory, a service wired with the real adapters, SQL-level
//! comparison of databases, and a continuous writer.

pub mod pg_cluster;
pub mod s3_server;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use backup_core::{BackupConfig, BackupService, RunningApp};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use synthorg_cli::demo::{self, DemoLayout, DemoSize};
use synthorg_cli::state;
pub use synthorg_cli::state::LiveState;

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
        BackupConfig::load(Some(&config_yaml(extra)), &self.layout.root).expect("valid config")
    }

    /// Adds `memory/vectors.bin`: `mib` MiB that no compressor can shrink
    /// (from `seed`), so that the archive is a multipart upload on S3.
    pub fn add_incompressible_memory(&self, mib: usize, seed: u64) {
        let mut rng = demo::Rng::new(seed);
        let noise: Vec<u8> = (0..(mib << 20) / 8)
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect();
        std::fs::write(self.layout.memory_dir.join("vectors.bin"), &noise).expect("write noise");
    }

    /// A service with the real adapters for `config`.
    pub fn service(&self, config: &BackupConfig) -> BackupService {
        synthorg_api::build_service(config, running_app(), None).expect("service")
    }
}

/// The demo config YAML with `extra` lines appended to its `backup:` block.
pub fn config_yaml(extra: &str) -> String {
    let mut yaml = demo::config_yaml();
    for line in extra.lines() {
        yaml.push_str("  ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}

/// A small tmpfs mounted for a test, unmounted on drop. Mounting needs
/// root (CI runs as root); elsewhere `tmpfs` returns `None` and says so.
pub struct Mount(pub PathBuf);

impl Mount {
    /// Mounts a tmpfs with `opts` (e.g. `size=8m`) at `at`.
    pub fn tmpfs(at: &Path, opts: &str) -> Option<Mount> {
        std::fs::create_dir_all(at).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(Mount(at.to_path_buf()))
        } else {
            eprintln!("SKIPPED: cannot mount tmpfs here (needs root)");
            None
        }
    }

    /// Fills the file system with `filler` until writes fail, then frees
    /// `leave` bytes of it.
    pub fn fill(&self, filler: &Path, leave: u64) {
        use std::io::Write;
        let mut file = std::fs::File::create(filler).expect("filler");
        let block = vec![0x5au8; 64 * 1024];
        let mut written = 0u64;
        while file.write_all(&block).is_ok() {
            written += block.len() as u64;
        }
        let _ = file.flush();
        file.set_len(written.saturating_sub(leave))
            .expect("truncate filler");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The system clock shifted by an adjustable offset (clock jumps, time
/// passing without waiting).
#[derive(Debug, Default)]
pub struct ShiftedClock(pub std::sync::Mutex<chrono::TimeDelta>);

#[async_trait::async_trait]
impl backup_core::ports::Clock for ShiftedClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
            + *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn sleep(&self, duration: std::time::Duration) {
        tokio::time::sleep(duration).await;
    }
}

/// A confirmed restore of every component.
pub fn confirmed() -> backup_core::RestoreOptions {
    backup_core::RestoreOptions {
        confirm: true,
        ..backup_core::RestoreOptions::default()
    }
}

/// Names starting with `.` in `dir`: staging, aside, journal or scratch
/// leftovers next to the live data.
pub fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// [`running_app`] for `config`: PostgreSQL when it names a database URL.
pub fn running_app_for(config: &BackupConfig) -> RunningApp {
    RunningApp {
        engine: config.sources.engine(),
        ..running_app()
    }
}

/// The running app of the fixtures.
pub fn running_app() -> RunningApp {
    RunningApp {
        version: semver::Version::parse(APP_VERSION).expect("version"),
        supported_schema: Some(demo::DEMO_SCHEMA_VERSION),
        engine: Default::default(),
    }
}

/// Opens an existing database.
pub async fn open(path: &Path) -> SqliteConnection {
    state::open(path).await.expect("open database")
}

/// SQL dump of a database (see `synthorg_cli::state::dump`).
pub async fn dump(path: &Path) -> Vec<String> {
    state::dump(path).await.expect("dump database")
}

/// Every regular file under `root`, relative path -> bytes, sorted.
pub fn files_under(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    state::files_under(root).expect("list files")
}

/// Captures the live data of a layout.
pub async fn capture(layout: &DemoLayout) -> LiveState {
    LiveState::capture(layout)
        .await
        .expect("capture live state")
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

/// sha256 of every file under the data directory except the backups: live
/// data compared byte for byte.
pub fn raw_bytes(layout: &DemoLayout) -> Vec<(PathBuf, String)> {
    files_under(&layout.root)
        .into_iter()
        .filter(|(p, _)| !p.starts_with("backups"))
        .map(|(p, b)| (p, backup_core::Sha256Digest::of(&b).to_string()))
        .collect()
}
