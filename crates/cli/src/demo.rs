//! A realistic SynthOrg data directory, for `synthorg demo`, the tests and
//! the benchmarks.
//!
//! - `synthorg.db`: SQLite in WAL mode with tasks, audit_log, agent_state,
//!   budget_records and org_facts, `user_version` set;
//! - `memory/`: a Mem0-style SQLite metadata database, binary vector-store
//!   segments (float32, hardly compressible) and per-agent JSON metadata;
//! - `company.yaml`: the company config;
//! - `checkpoints/<task>/turn-NNNN.json`: per-turn checkpoints;
//! - `synthorg.yaml`: a config whose `backup:` block points at all of it.
//!
//! Content is pseudo-random but deterministic for a seed, and text is
//! word-based so that it compresses like real data.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

/// Schema version the demo database carries (`PRAGMA user_version`).
pub const DEMO_SCHEMA_VERSION: i64 = 3;

/// Where the generated pieces are.
#[derive(Debug, Clone)]
pub struct DemoLayout {
    /// The data directory.
    pub root: PathBuf,
    /// `synthorg.db`.
    pub database: PathBuf,
    /// `memory/`.
    pub memory_dir: PathBuf,
    /// `company.yaml`.
    pub company_config: PathBuf,
    /// `checkpoints/`.
    pub checkpoints_dir: PathBuf,
    /// `synthorg.yaml` pointing at the above, backups under `backups/`.
    pub config_file: PathBuf,
    /// Where backups go.
    pub backups_dir: PathBuf,
}

impl DemoLayout {
    /// The layout under `root` (nothing is created).
    pub fn at(root: &Path) -> DemoLayout {
        DemoLayout {
            root: root.to_path_buf(),
            database: root.join("synthorg.db"),
            memory_dir: root.join("memory"),
            company_config: root.join("company.yaml"),
            checkpoints_dir: root.join("checkpoints"),
            config_file: root.join("synthorg.yaml"),
            backups_dir: root.join("backups"),
        }
    }
}

/// Deterministic xorshift64* generator: enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Word-based text of about `len` bytes.
    pub fn text(&mut self, len: usize) -> String {
        const WORDS: &[&str] = &[
            "agent",
            "task",
            "budget",
            "review",
            "plan",
            "deploy",
            "customer",
            "report",
            "analysis",
            "meeting",
            "quarterly",
            "roadmap",
            "invoice",
            "research",
            "draft",
            "approve",
            "escalate",
            "memory",
            "context",
            "summary",
            "the",
            "of",
            "and",
            "to",
            "with",
            "for",
            "on",
            "status",
            "pending",
            "done",
            "blocked",
            "engineering",
            "finance",
            "marketing",
            "legal",
            "ops",
        ];
        let mut out = String::with_capacity(len + 16);
        while out.len() < len {
            out.push_str(WORDS[self.below(WORDS.len() as u64) as usize]);
            out.push(if self.below(12) == 0 { '.' } else { ' ' });
            if self.below(40) == 0 {
                out.push_str(&self.below(100_000).to_string());
                out.push(' ');
            }
        }
        out
    }
}

/// How much of each component to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoSize {
    /// Approximate bytes of task payloads in the database.
    pub db_bytes: u64,
    /// Approximate bytes of vector segments in memory/.
    pub vector_bytes: u64,
    /// Number of small memory metadata files.
    pub memory_files: u64,
    /// Number of checkpoint files.
    pub checkpoints: u64,
}

impl DemoSize {
    /// Splits a total like the real thing: ~83% database, ~15% memory,
    /// ~2% checkpoints.
    pub fn total(bytes: u64) -> DemoSize {
        DemoSize {
            db_bytes: bytes / 100 * 83,
            vector_bytes: bytes / 100 * 13,
            memory_files: (bytes / 40_000).clamp(10, 5000),
            checkpoints: (bytes / 20_000).clamp(10, 10_000),
        }
    }
}

/// Parses sizes like `600MB`, `2GiB`, `500k`, `1048576`.
///
/// # Errors
/// A message naming the input when it is not a size.
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let s = raw.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {raw:?}: expected e.g. 600MB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size unit in {raw:?}: use B, KB, MB, GB, KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {raw:?} is too large"))
}

async fn open_db(path: &Path) -> Result<SqliteConnection, sqlx::Error> {
    SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .connect()
        .await
}

/// Creates the demo data directory under `root` (which may exist but must
/// not already hold a database).
///
/// # Errors
/// I/O and SQLite errors, with the path concerned.
pub async fn generate(root: &Path, size: DemoSize, seed: u64) -> anyhow::Result<DemoLayout> {
    use anyhow::Context as _;
    let layout = DemoLayout::at(root);
    if layout.database.exists() {
        anyhow::bail!(
            "{} already exists; choose an empty --dir",
            layout.database.display()
        );
    }
    let mut rng = Rng::new(seed);
    std::fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
    create_database(&layout.database, size.db_bytes, &mut rng)
        .await
        .with_context(|| format!("create {}", layout.database.display()))?;
    create_memory(&layout.memory_dir, size, &mut rng)
        .await
        .with_context(|| format!("create {}", layout.memory_dir.display()))?;
    create_checkpoints(&layout.checkpoints_dir, size.checkpoints, &mut rng)
        .with_context(|| format!("create {}", layout.checkpoints_dir.display()))?;
    std::fs::write(&layout.company_config, company_yaml(&mut rng))
        .with_context(|| format!("write {}", layout.company_config.display()))?;
    std::fs::write(&layout.config_file, config_yaml())
        .with_context(|| format!("write {}", layout.config_file.display()))?;
    Ok(layout)
}

/// The `synthorg.yaml` of a demo directory (paths relative to it).
pub fn config_yaml() -> String {
    "# SynthOrg demo configuration\n\
     backup:\n  path: backups\n  sources:\n    database: synthorg.db\n    memory_dir: memory\n    \
     company_config: company.yaml\n    checkpoints_dir: checkpoints\n"
        .to_owned()
}

async fn create_database(path: &Path, bytes: u64, rng: &mut Rng) -> Result<(), sqlx::Error> {
    let mut conn = open_db(path).await?;
    for ddl in [
        "CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT NOT NULL, status TEXT NOT NULL, assignee TEXT, payload TEXT NOT NULL, created_at INTEGER NOT NULL)",
        "CREATE TABLE audit_log (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL)",
        "CREATE TABLE agent_state (agent_id TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at INTEGER NOT NULL)",
        "CREATE TABLE budget_records (id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL, amount_cents INTEGER NOT NULL, ts INTEGER NOT NULL)",
        "CREATE TABLE org_facts (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE INDEX audit_ts ON audit_log(ts)",
    ] {
        sqlx::query(ddl).execute(&mut conn).await?;
    }
    let rows = (bytes / 1_100).max(20);
    // Multi-row inserts in batches: per-statement overhead dominates
    // otherwise (generating 600 MB took minutes row by row).
    const BATCH: u64 = 200;
    let mut tx = conn.begin().await?;
    let mut start = 0u64;
    while start < rows {
        let end = (start + BATCH).min(rows);
        let mut tasks = sqlx::QueryBuilder::new(
            "INSERT INTO tasks (title, status, assignee, payload, created_at) ",
        );
        tasks.push_values(start..end, |mut b, i| {
            let len = 700 + rng.below(400) as usize;
            b.push_bind(rng.text(40))
                .push_bind(["pending", "running", "done", "blocked"][rng.below(4) as usize])
                .push_bind(format!("agent-{}", rng.below(50)))
                .push_bind(rng.text(len))
                .push_bind(1_700_000_000 + i as i64 * 60);
        });
        tasks.build().execute(&mut *tx).await?;
        let mut audit =
            sqlx::QueryBuilder::new("INSERT INTO audit_log (ts, actor, action, detail) ");
        audit.push_values(start..end, |mut b, i| {
            b.push_bind(1_700_000_000 + i as i64 * 60)
                .push_bind(format!("agent-{}", rng.below(50)))
                .push_bind(["create", "update", "assign", "close"][rng.below(4) as usize])
                .push_bind(rng.text(120));
        });
        audit.build().execute(&mut *tx).await?;
        let mut budget =
            sqlx::QueryBuilder::new("INSERT INTO budget_records (agent_id, amount_cents, ts) ");
        budget.push_values((start..end).step_by(10), |mut b, i| {
            b.push_bind(format!("agent-{}", rng.below(50)))
                .push_bind(rng.below(100_000) as i64)
                .push_bind(1_700_000_000 + i as i64 * 60);
        });
        budget.build().execute(&mut *tx).await?;
        if end / 20_000 != start / 20_000 {
            tx.commit().await?;
            tx = conn.begin().await?;
        }
        start = end;
    }
    for a in 0..50 {
        sqlx::query("INSERT INTO agent_state (agent_id, state, updated_at) VALUES (?, ?, ?)")
            .bind(format!("agent-{a}"))
            .bind(format!(
                "{{\"mood\":\"focused\",\"notes\":\"{}\"}}",
                rng.text(200)
            ))
            .bind(1_700_000_000_i64)
            .execute(&mut *tx)
            .await?;
    }
    for k in 0..100 {
        sqlx::query("INSERT INTO org_facts (key, value) VALUES (?, ?)")
            .bind(format!("fact-{k}"))
            .bind(rng.text(80))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA user_version = {DEMO_SCHEMA_VERSION}"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await
}

async fn create_memory(dir: &Path, size: DemoSize, rng: &mut Rng) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("vectors"))?;
    std::fs::create_dir_all(dir.join("agents"))?;
    let mut conn = open_db(&dir.join("mem0_history.db")).await?;
    sqlx::query("CREATE TABLE memories (id INTEGER PRIMARY KEY, agent_id TEXT NOT NULL, text TEXT NOT NULL, vector_ref TEXT NOT NULL, created_at INTEGER NOT NULL)")
        .execute(&mut conn)
        .await?;
    let mut tx = conn.begin().await?;
    let notes = size.memory_files * 10;
    let mut start = 0u64;
    while start < notes {
        let end = (start + 200).min(notes);
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO memories (agent_id, text, vector_ref, created_at) ",
        );
        q.push_values(start..end, |mut b, i| {
            b.push_bind(format!("agent-{}", rng.below(50)))
                .push_bind(rng.text(200))
                .push_bind(format!("segment-{:05}:{}", i / 1000, i % 1000))
                .push_bind(1_700_000_000 + i as i64);
        });
        q.build().execute(&mut *tx).await?;
        start = end;
    }
    tx.commit().await?;
    conn.close().await?;
    // Vector segments: float32 embeddings, 4 MiB per segment at most.
    let segment = 4u64 << 20;
    let mut left = size.vector_bytes;
    let mut n = 0;
    while left > 0 {
        let len = left.min(segment) as usize;
        let mut data = Vec::with_capacity(len);
        while data.len() + 4 <= len {
            let v = (rng.below(2_000_000) as f32 / 1_000_000.0) - 1.0;
            data.extend_from_slice(&v.to_le_bytes());
        }
        data.resize(len, 0);
        std::fs::write(
            dir.join("vectors").join(format!("segment-{n:05}.bin")),
            data,
        )?;
        left -= len as u64;
        n += 1;
    }
    for i in 0..size.memory_files {
        let agent = dir.join("agents").join(format!("agent-{}", i % 50));
        std::fs::create_dir_all(&agent)?;
        std::fs::write(
            agent.join(format!("note-{i:05}.json")),
            format!("{{\"id\":{i},\"summary\":\"{}\"}}\n", rng.text(300)),
        )?;
    }
    Ok(())
}

fn create_checkpoints(dir: &Path, count: u64, rng: &mut Rng) -> std::io::Result<()> {
    for i in 0..count {
        let task = dir.join(format!("task-{:04}", i / 8));
        std::fs::create_dir_all(&task)?;
        std::fs::write(
            task.join(format!("turn-{:04}.json", i % 8)),
            format!(
                "{{\"task\":{},\"turn\":{},\"state\":{{\"thoughts\":\"{}\",\"tokens\":{}}}}}\n",
                i / 8,
                i % 8,
                rng.text(600),
                rng.below(8000)
            ),
        )?;
    }
    Ok(())
}

fn company_yaml(rng: &mut Rng) -> String {
    let mut out = String::from("company:\n  name: Acme Synthetic Corp\n  agents:\n");
    for a in 0..12 {
        out.push_str(&format!(
            "    - id: agent-{a}\n      role: {}\n      budget_cents: {}\n",
            ["engineer", "analyst", "manager", "support"][a % 4],
            rng.below(1_000_000)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("600MB"), Ok(600_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("12XB").unwrap_err().contains("12XB"));
        assert!(parse_size("MB").is_err());
    }

    #[test]
    fn rng_is_deterministic() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
    }
}
