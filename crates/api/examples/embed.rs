//! A small SynthOrg-like host embedding synthorg-backup:
//!
//! - it owns a SQLite pool (`synthorg.db`, WAL) and a memory writer that
//!   keeps adding notes to `memory/`;
//! - it implements [`Quiesce`] for real: a pause makes the writer stop at a
//!   safe point (between two notes) and wait until resumed;
//! - it mounts the admin router under `/api/v1/admin` beside its own
//!   routes (`GET /tasks`, `POST /migrate`, `POST /restore/{id}`);
//! - it starts [`BackupRuntime`] (recovery and the startup backup happen
//!   before it listens), takes the pinned `pre-migration` backup before a
//!   schema change, closes its pool before a restore and reopens it after,
//!   and takes the shutdown backup on SIGTERM / Ctrl-C.
//!
//! Run it with `cargo run -p synthorg-api --example embed -- DATA_DIR`; its
//! test (`cargo test -p synthorg-api --example embed`) drives all of it.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{Path as UrlPath, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use backup_core::ports::Quiesce;
use backup_core::{BackupConfig, BackupId, RestoreOptions, RunningApp};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use synthorg_api::{AdminState, BackupRuntime, RuntimeConfig};
use tokio::sync::{RwLock, watch};

/// The host's own state.
#[derive(Clone)]
struct Host {
    dir: PathBuf,
    /// `None` while a restore swaps the database.
    pool: Arc<RwLock<Option<SqlitePool>>>,
    admin: AdminState,
    runtime: Arc<RwLock<Option<BackupRuntime>>>,
    writer: Arc<WriterPause>,
}

/// Pauses the memory writer at a safe point, for a backup (the [`Quiesce`]
/// port) or for the host itself (around a restore); it writes again only
/// when neither holds it.
#[derive(Debug)]
struct WriterPause {
    /// (paused for a backup, paused by the host).
    paused: watch::Sender<(bool, bool)>,
    /// The writer reports here that it is between two notes and waiting.
    idle: watch::Receiver<bool>,
}

impl WriterPause {
    async fn wait_idle(&self) -> backup_core::Result<()> {
        let mut idle = self.idle.clone();
        idle.wait_for(|idle| *idle)
            .await
            .map_err(|_| backup_core::Error::Cancelled("the memory writer stopped".into()))?;
        Ok(())
    }

    /// The host's own pause (e.g. around a restore).
    async fn hold(&self) -> backup_core::Result<()> {
        self.paused.send_modify(|p| p.1 = true);
        self.wait_idle().await
    }

    fn release(&self) {
        self.paused.send_modify(|p| p.1 = false);
    }
}

#[async_trait]
impl Quiesce for WriterPause {
    async fn pause(&self) -> backup_core::Result<()> {
        self.paused.send_modify(|p| p.0 = true);
        self.wait_idle().await
    }

    fn resume(&self) {
        self.paused.send_modify(|p| p.0 = false);
    }
}

/// Adds a note to `memory/notes/` every few milliseconds; stops between
/// two notes while paused.
fn spawn_memory_writer(
    dir: PathBuf,
    mut paused: watch::Receiver<(bool, bool)>,
    idle: watch::Sender<bool>,
) {
    tokio::spawn(async move {
        let notes = dir.join("memory/notes");
        let _ = tokio::fs::create_dir_all(&notes).await;
        for n in 0u64.. {
            if *paused.borrow() != (false, false) {
                idle.send_replace(true);
                if paused.wait_for(|p| *p == (false, false)).await.is_err() {
                    return;
                }
                idle.send_replace(false);
            }
            // A note is written whole (temp + rename): a safe point after each.
            let tmp = notes.join(format!(".note-{n}.tmp"));
            let _ = tokio::fs::write(&tmp, format!("note {n}\n")).await;
            let _ = tokio::fs::rename(&tmp, notes.join(format!("note-{n:06}.txt"))).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

async fn open_pool(db: &Path) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(db)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY, title TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    Ok(pool)
}

fn config(dir: &Path) -> anyhow::Result<BackupConfig> {
    let yaml = "backup:\n  path: ./backups\n  schedule_hours: 6\n  sources:\n    database: ./synthorg.db\n    memory_dir: ./memory\n    company_config: ./company.yaml\n    checkpoints_dir: ./checkpoints\n";
    Ok(BackupConfig::load(Some(yaml), dir)?)
}

/// Starts the host in `dir`; returns its address and a handle that shuts
/// it down (as SIGTERM does) and waits for the shutdown backup.
async fn start(
    dir: &Path,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    std::fs::create_dir_all(dir.join("memory"))?;
    std::fs::create_dir_all(dir.join("checkpoints"))?;
    if !dir.join("company.yaml").exists() {
        std::fs::write(dir.join("company.yaml"), "company:\n  name: Embedded\n")?;
    }
    let pool = open_pool(&dir.join("synthorg.db")).await?;
    let (paused_tx, paused_rx) = watch::channel((false, false));
    let (idle_tx, idle_rx) = watch::channel(false);
    spawn_memory_writer(dir.to_path_buf(), paused_rx, idle_tx);
    let quiesce = Arc::new(WriterPause {
        paused: paused_tx,
        idle: idle_rx,
    });
    let config = config(dir)?;
    let app = RunningApp {
        version: semver::Version::parse("1.4.0")?,
        supported_schema: Some(4),
        engine: Default::default(),
    };
    let service = synthorg_api::build_service(&config, app, Some(quiesce.clone()))?;
    let admin = AdminState::new(service, None, true);
    // Recovery and the startup backup before the host serves.
    let runtime = BackupRuntime::start(
        admin.clone(),
        RuntimeConfig::from(&config),
        Arc::new(adapters_fs::SystemClock),
    )
    .await;
    let host = Host {
        dir: dir.to_path_buf(),
        pool: Arc::new(RwLock::new(Some(pool))),
        admin: admin.clone(),
        runtime: Arc::new(RwLock::new(Some(runtime))),
        writer: quiesce,
    };
    let router = Router::new()
        .route("/tasks", get(tasks).post(add_task))
        .route("/migrate", post(migrate))
        .route("/restore/{id}", post(restore))
        .with_state(host.clone())
        .nest("/api/v1/admin", synthorg_api::admin_router(admin));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await?;
        // The shutdown backup, then the pool closes.
        if let Some(runtime) = host.runtime.write().await.take() {
            runtime.shutdown().await;
        }
        if let Some(pool) = host.pool.write().await.take() {
            pool.close().await;
        }
        Ok(())
    });
    Ok((addr, stop_tx, served))
}

async fn tasks(State(host): State<Host>) -> Json<serde_json::Value> {
    let guard = host.pool.read().await;
    let count = match guard.as_ref() {
        Some(pool) => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tasks")
            .fetch_one(pool)
            .await
            .unwrap_or(-1),
        None => -1,
    };
    Json(serde_json::json!({ "tasks": count }))
}

async fn add_task(State(host): State<Host>) -> Json<serde_json::Value> {
    let guard = host.pool.read().await;
    if let Some(pool) = guard.as_ref() {
        let _ = sqlx::query("INSERT INTO tasks (title) VALUES ('work')")
            .execute(pool)
            .await;
    }
    drop(guard);
    tasks(State(host)).await
}

/// A schema change, after the pinned pre-migration backup.
async fn migrate(State(host): State<Host>) -> Json<serde_json::Value> {
    let runtime = host.runtime.read().await;
    let Some(runtime) = runtime.as_ref() else {
        return Json(serde_json::json!({ "error": "shutting down" }));
    };
    match runtime.before_migration(3, 4).await {
        Ok(id) => {
            if let Some(pool) = host.pool.read().await.as_ref() {
                let _ = sqlx::query("PRAGMA user_version = 4").execute(pool).await;
            }
            Json(serde_json::json!({ "pre_migration_backup": id }))
        }
        // No backup, no migration.
        Err(e) => Json(serde_json::json!({ "error": e.to_string() })),
    }
}

/// Closes the pool (a restore refuses while the database is open), restores,
/// reopens the pool.
async fn restore(
    State(host): State<Host>,
    UrlPath(id): UrlPath<String>,
) -> Json<serde_json::Value> {
    let Ok(id) = BackupId::parse(&id) else {
        return Json(serde_json::json!({ "error": "invalid id" }));
    };
    // Stop writing: the pool closed, the memory writer held.
    let mut pool = host.pool.write().await;
    if let Some(p) = pool.take() {
        p.close().await;
    }
    if let Err(e) = host.writer.hold().await {
        return Json(serde_json::json!({ "error": e.to_string() }));
    }
    let options = RestoreOptions {
        confirm: true,
        ..RestoreOptions::default()
    };
    let result = host.admin.service().restore(&id, options).await;
    *pool = open_pool(&host.dir.join("synthorg.db")).await.ok();
    host.writer.release();
    match result {
        Ok(report) => Json(
            serde_json::json!({ "restored": report.id, "safety_backup": report.safety_backup_id }),
        ),
        Err(e) => Json(serde_json::json!({ "error": e.to_string() })),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("./embed-data"), PathBuf::from);
    let (addr, stop, served) = start(&dir).await?;
    println!("listening on http://{addr} (admin API under /api/v1/admin)");
    tokio::signal::ctrl_c().await?;
    let _ = stop.send(());
    served.await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn call(addr: std::net::SocketAddr, method: &str, path: &str) -> serde_json::Value {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}{path}");
        let req = match method {
            "POST" => client.post(&url),
            _ => client.get(&url),
        };
        let text = req.send().await.unwrap().text().await.unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_embedded_host_backs_up_migrates_restores_and_shuts_down() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, stop, served) = start(dir.path()).await.unwrap();
        for _ in 0..5 {
            call(addr, "POST", "/tasks").await;
        }
        // A backup through the admin API while the memory writer runs.
        let started = call(addr, "POST", "/api/v1/admin/backup").await;
        let id = started["id"].as_str().unwrap().to_owned();
        let mut status = serde_json::Value::Null;
        for _ in 0..200 {
            status = call(addr, "GET", &format!("/api/v1/admin/backups/{id}")).await;
            if status["status"] != "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status["status"], "complete", "{status}");
        let notes = status["manifest"]["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| {
                f["path"]
                    .as_str()
                    .unwrap()
                    .starts_with("memory/notes/note-")
            })
            .count();
        assert!(notes > 0, "the writer's notes are in the backup");
        // Paused at a safe point: never a temp file in the backup.
        assert!(!status.to_string().contains(".note-"), "{status}");

        // Five tasks in the backup; more afterwards; restore brings back five.
        for _ in 0..3 {
            call(addr, "POST", "/tasks").await;
        }
        assert_eq!(call(addr, "GET", "/tasks").await["tasks"], 8);
        let migrated = call(addr, "POST", "/migrate").await;
        assert!(migrated["pre_migration_backup"].is_string(), "{migrated}");
        let restored = call(addr, "POST", &format!("/restore/{id}")).await;
        assert_eq!(restored["restored"], id.as_str(), "{restored}");
        assert_eq!(call(addr, "GET", "/tasks").await["tasks"], 5);

        // Shutdown: the shutdown backup is taken.
        stop.send(()).unwrap();
        served.await.unwrap().unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path().join("backups"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for trigger in [
            "startup",
            "manual",
            "pre-migration",
            "pre-restore",
            "shutdown",
        ] {
            assert!(
                names
                    .iter()
                    .any(|n| n.contains(&format!("_{trigger}")) && n.ends_with(".manifest.json")),
                "{trigger}: {names:?}"
            );
        }
    }
}
