//! Comparing SynthOrg data by content: databases by SQL dump, other files
//! by sha256. Used by `synthorg demo` to show that a restore brought back
//! exactly the backed-up data, and by the tests.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context as _;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection};

use crate::demo::DemoLayout;

/// Opens an existing database.
///
/// # Errors
/// When it does not exist or cannot be opened.
pub async fn open(path: &Path) -> anyhow::Result<SqliteConnection> {
    SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(false)
        .connect()
        .await
        .with_context(|| format!("open {}", path.display()))
}

/// Every row of every table as text, ordered, plus `user_version`: two
/// databases with the same dump hold the same data.
///
/// # Errors
/// SQLite errors, naming the file.
pub async fn dump(path: &Path) -> anyhow::Result<Vec<String>> {
    let mut conn = open(path).await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await?;
    let mut out = Vec::new();
    for t in tables {
        let sql = format!("SELECT * FROM \"{}\" ORDER BY 1", t.replace('"', "\"\""));
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await?;
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
                    .or_else(|_| {
                        row.try_get::<Option<Vec<u8>>, _>(i)
                            .map(|v| v.map(|b| backup_core::Sha256Digest::of(&b).to_string()))
                    })
                    .unwrap_or(None);
                line.push_str(&format!("{v:?}|"));
            }
            out.push(line);
        }
    }
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut conn)
        .await?;
    out.push(format!("user_version={version}"));
    let _ = conn.close().await;
    Ok(out)
}

/// Every regular file under `root`: relative path and bytes, sorted. A
/// missing root is empty.
///
/// # Errors
/// I/O errors, naming the path.
pub fn files_under(root: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                let rel = entry.path().strip_prefix(root)?.to_path_buf();
                let bytes = std::fs::read(entry.path())
                    .with_context(|| format!("read {}", entry.path().display()))?;
                out.push((rel, bytes));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The content of a SynthOrg data directory, compared by value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveState {
    /// sha256 of the SQL dump of `synthorg.db`; `absent` without one (a
    /// PostgreSQL deployment).
    pub database: String,
    /// Every file under memory/ with its sha256 (databases: of their dump).
    pub memory: Vec<(PathBuf, String)>,
    /// sha256 of the company config.
    pub config: String,
    /// Every file under checkpoints/ with its sha256.
    pub checkpoints: Vec<(PathBuf, String)>,
}

fn hash(bytes: &[u8]) -> String {
    backup_core::Sha256Digest::of(bytes).to_string()
}

impl LiveState {
    /// Captures the data of `layout`.
    ///
    /// # Errors
    /// I/O and SQLite errors, naming the path.
    pub async fn capture(layout: &DemoLayout) -> anyhow::Result<LiveState> {
        let mut memory = Vec::new();
        for (rel, bytes) in files_under(&layout.memory_dir)? {
            let name = rel.to_string_lossy();
            if name.ends_with("-wal") || name.ends_with("-shm") {
                continue; // part of their database, compared by its dump
            }
            let value = if bytes.starts_with(b"SQLite format 3\0") {
                hash(
                    dump(&layout.memory_dir.join(&rel))
                        .await?
                        .join("\n")
                        .as_bytes(),
                )
            } else {
                hash(&bytes)
            };
            memory.push((rel, value));
        }
        Ok(LiveState {
            database: if layout.database.exists() {
                hash(dump(&layout.database).await?.join("\n").as_bytes())
            } else {
                "absent".to_owned()
            },
            memory,
            config: hash(
                &std::fs::read(&layout.company_config)
                    .with_context(|| format!("read {}", layout.company_config.display()))?,
            ),
            checkpoints: files_under(&layout.checkpoints_dir)?
                .into_iter()
                .map(|(p, b)| (p, hash(&b)))
                .collect(),
        })
    }
}
