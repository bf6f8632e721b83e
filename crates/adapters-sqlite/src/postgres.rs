//! PostgreSQL persistence: [`PgSource`] dumps the live database with
//! `pg_dump --format=custom` in one snapshot; [`PgServer`] restores a dump
//! into a staging database and renames databases for the restore's
//! journaled swap (the [`ServerDatabase`] port).
//!
//! The password never reaches a command line or a message: child
//! processes get the URL without it and the password in `PGPASSWORD`
//! (when the URL holds one; else they use `PGPASSWORD` or `.pgpass` as
//! usual), and errors name the URL with `***`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Instant;

use async_trait::async_trait;
use backup_core::config::{DatabaseUrl, SourcesConfig};
use backup_core::ports::{ComponentSource, ServerDatabase, Snapshot};
use backup_core::{ArchivePath, Component, Error, Result};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions as _, Connection as _};

use crate::snapshot::{FileSnapshot, scratch_dir};

const COMPONENT: Component = Component::Persistence;

/// A PostgreSQL database: its URL and how to read its schema version.
#[derive(Debug, Clone)]
pub struct PgDatabase {
    url: DatabaseUrl,
    schema_query: Option<String>,
}

impl PgDatabase {
    /// The database at `url`; `schema_query` returns its schema version
    /// (unset: the highest `version` in `public.schema_version`, else 0).
    pub fn new(url: DatabaseUrl, schema_query: Option<String>) -> PgDatabase {
        PgDatabase { url, schema_query }
    }

    /// The database `sources` name (`database_url`), if any.
    pub fn configured(sources: &SourcesConfig) -> Option<PgDatabase> {
        sources
            .database_url
            .clone()
            .map(|url| PgDatabase::new(url, sources.schema_version_query.clone()))
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Source {
            component: COMPONENT,
            path: self.url.redacted(),
            reason: reason.into(),
            source: None,
        }
    }

    /// A clear reason for a connection or query failure (the password is
    /// never in it: sqlx does not print it).
    fn sqlx_err(&self, e: &sqlx::Error) -> Error {
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        let reason = match code.as_deref() {
            Some("28P01") => format!(
                "password authentication failed ({}); check the password in the URL, PGPASSWORD or .pgpass",
                db_message(e)
            ),
            Some("28000") => format!("the server refused the login: {}", db_message(e)),
            Some("3D000") => format!("database {:?} does not exist", self.url.dbname()),
            Some("42501") => format!("permission denied: {}", db_message(e)),
            _ => match e {
                sqlx::Error::Io(io) => format!(
                    "cannot reach the PostgreSQL server ({io}); is it running, and are host and port right?"
                ),
                other => other.to_string(),
            },
        };
        self.err(reason)
    }

    async fn connect_to(&self, dbname: &str) -> Result<PgConnection> {
        PgConnectOptions::from_str(self.url.expose())
            .map_err(|e| self.err(format!("not a usable connection URL: {e}")))?
            .database(dbname)
            .application_name("synthorg-backup")
            .connect()
            .await
            .map_err(|e| self.sqlx_err(&e))
    }

    /// The live database's schema version.
    ///
    /// # Errors
    /// `Source`: unreachable, authentication, missing database, a failing
    /// schema query.
    pub async fn read_schema_version(&self) -> Result<i64> {
        let mut conn = self.connect_to(self.url.dbname()).await?;
        let version = self.schema_version(&mut conn).await;
        let _ = conn.close().await;
        version
    }

    /// The schema version of the database `conn` is connected to.
    async fn schema_version(&self, conn: &mut PgConnection) -> Result<i64> {
        let query = match &self.schema_query {
            Some(q) => q.clone(),
            None => {
                let table: bool =
                    sqlx::query_scalar("SELECT to_regclass('public.schema_version') IS NOT NULL")
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(|e| self.sqlx_err(&e))?;
                if !table {
                    return Ok(0);
                }
                "SELECT COALESCE(MAX(version), 0)::bigint FROM public.schema_version".to_owned()
            }
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(query.clone()))
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| {
                self.err(format!(
                    "backup.sources.schema_version_query {query:?} failed: {}",
                    db_message(&e)
                ))
            })?;
        use sqlx::Row;
        row.try_get::<i64, _>(0)
            .or_else(|_| row.try_get::<i32, _>(0).map(i64::from))
            .map_err(|_| {
                self.err(format!(
                    "backup.sources.schema_version_query {query:?} must return one integer"
                ))
            })
    }

    /// Runs a PostgreSQL client tool against `dbname` with the password in
    /// its environment; its stderr on failure.
    async fn run_tool(&self, tool: &str, args: &[&str], dbname: &str) -> Result<()> {
        let url = with_dbname(&self.url.without_password(), self.url.dbname(), dbname);
        let mut cmd = tokio::process::Command::new(tool);
        cmd.args(args)
            .arg(format!("--dbname={url}"))
            .arg("--no-password");
        if let Some(password) = self.url.password() {
            cmd.env("PGPASSWORD", password);
        }
        let stderr = match run_client(tool, cmd).await {
            Ok(()) => return Ok(()),
            Err(ClientFailure::NotRun(reason)) => return Err(self.err(reason)),
            Err(ClientFailure::Failed(stderr)) => {
                stderr.replace(self.url.expose(), &self.url.redacted())
            }
        };
        if stderr.contains("server version mismatch")
            || stderr.contains("aborting because of server version")
        {
            let client = tool_version(tool).await;
            return Err(self.err(format!(
                "{tool} {client} is older than the server ({stderr}); install the client tools of the server's major version or newer"
            )));
        }
        Err(self.err(format!("{tool} failed: {stderr}")))
    }
}

/// Why a PostgreSQL client tool did not succeed.
enum ClientFailure {
    /// It could not be started (e.g. not installed); the reason in words.
    NotRun(String),
    /// It ran and failed; its stderr.
    Failed(String),
}

/// Runs a PostgreSQL client tool `tool` (the command `cmd`) to its end,
/// without stdin or stdout.
async fn run_client(
    tool: &str,
    mut cmd: tokio::process::Command,
) -> std::result::Result<(), ClientFailure> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            ClientFailure::NotRun(if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "{tool} is not installed (install the PostgreSQL client tools, e.g. the postgresql-client package, of the server's major version or newer)"
                )
            } else {
                format!("cannot run {tool}: {e}")
            })
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClientFailure::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// `postgres://…/old?x` with the database name replaced.
fn with_dbname(url: &str, old: &str, new: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = base
        .strip_suffix(old)
        .map_or_else(|| base.to_owned(), |prefix| format!("{prefix}{new}"));
    match query {
        Some(q) => format!("{base}?{q}"),
        None => base,
    }
}

fn db_message(e: &sqlx::Error) -> String {
    e.as_database_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

async fn tool_version(tool: &str) -> String {
    match tokio::process::Command::new(tool)
        .arg("--version")
        .output()
        .await
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(_) => "(version unknown)".to_owned(),
    }
}

/// An identifier quoted for SQL (names are ours: `[a-z0-9_]`, checked when
/// the URL was parsed, plus our suffixes).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The persistence component of a PostgreSQL deployment: one
/// `pg_dump --format=custom` archive, `synthorg.pgdump`.
#[derive(Debug, Clone)]
pub struct PgSource {
    db: PgDatabase,
    scratch_near: PathBuf,
}

impl PgSource {
    /// Dumps `db`, into a scratch directory beside `scratch_near` (a path
    /// in the data directory: recovery removes scratch leftovers there).
    pub fn new(db: PgDatabase, scratch_near: impl Into<PathBuf>) -> PgSource {
        PgSource {
            db,
            scratch_near: scratch_near.into(),
        }
    }
}

#[async_trait]
impl ComponentSource for PgSource {
    fn component(&self) -> Component {
        COMPONENT
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>> {
        let db = &self.db;
        let started = Instant::now();
        // One snapshot for the schema version and the dump: a repeatable
        // read transaction exports it, pg_dump uses it. Writers are never
        // blocked (MVCC).
        let mut conn = db.connect_to(db.url.dbname()).await?;
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut conn)
            .await
            .map_err(|e| db.sqlx_err(&e))?;
        let snapshot_id: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| db.sqlx_err(&e))?;
        let schema = db.schema_version(&mut conn).await?;
        let scratch = scratch_dir(COMPONENT, &self.scratch_near)?;
        let dump = scratch.path().join(backup_core::path::PGDUMP_FILE);
        let dump_text = dump.display().to_string();
        // Uncompressed: the pipeline compresses on every allowed core
        // (measured in bench/run against pg_dump's own compression).
        let dumped = db
            .run_tool(
                "pg_dump",
                &[
                    "--format=custom",
                    "--compress=0",
                    &format!("--snapshot={snapshot_id}"),
                    &format!("--file={dump_text}"),
                ],
                db.url.dbname(),
            )
            .await;
        let _ = sqlx::query("COMMIT").execute(&mut conn).await;
        let _ = conn.close().await;
        dumped?;
        let meta = tokio::fs::metadata(&dump)
            .await
            .map_err(|e| db.err(format!("pg_dump wrote no {dump_text}: {e}")))?;
        tracing::info!(database = %db.url.redacted(), dump_bytes = meta.len(),
            dump_ms = started.elapsed().as_millis() as u64, schema_version = schema,
            "database dumped with pg_dump (one snapshot; writers were not blocked)");
        let path = ArchivePath::parse(backup_core::path::PGDUMP_FILE)
            .map_err(|e| db.err(e.to_string()))?;
        Ok(Box::new(FileSnapshot::one(
            path,
            dump,
            (meta.len(), 0o600, None),
            schema,
            scratch,
        )))
    }
}

/// Checks that a file is a `pg_dump` custom-format archive `pg_restore`
/// can read (`pg_restore --list`), without a server.
///
/// # Errors
/// `Source` naming the file and `pg_restore`'s complaint.
pub async fn check_dump(path: &Path) -> Result<()> {
    let mut cmd = tokio::process::Command::new("pg_restore");
    cmd.arg("--list").arg(path);
    let reason = match run_client("pg_restore", cmd).await {
        Ok(()) => return Ok(()),
        Err(ClientFailure::NotRun(reason)) => reason,
        Err(ClientFailure::Failed(stderr)) => format!("pg_restore cannot read the dump: {stderr}"),
    };
    Err(Error::Source {
        component: COMPONENT,
        path: path.display().to_string(),
        reason,
        source: None,
    })
}

/// Another session on the live database: pid, user, application, client
/// address.
type Session = (i32, Option<String>, Option<String>, Option<String>);

/// The live PostgreSQL database as a restore replaces it.
#[derive(Debug, Clone)]
pub struct PgServer {
    db: PgDatabase,
}

impl PgServer {
    /// For the database `db`.
    pub fn new(db: PgDatabase) -> PgServer {
        PgServer { db }
    }

    /// Runs `f` to completion on a runtime of its own (the port's methods
    /// are called from blocking threads).
    fn block<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.db.err(format!("cannot start a runtime: {e}")))?
            .block_on(f)
    }

    /// A connection to the maintenance database (renames and drops cannot
    /// run while connected to the database they act on).
    async fn admin(&self) -> Result<PgConnection> {
        self.db.connect_to("postgres").await
    }

    fn io(e: Error) -> std::io::Error {
        std::io::Error::other(e.to_string())
    }

    /// Runs one statement of ours on the maintenance database.
    fn admin_exec(&self, sql: String) -> std::io::Result<()> {
        self.block(async {
            let mut conn = self.admin().await?;
            let done = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .map_err(|e| self.db.sqlx_err(&e));
            let _ = conn.close().await;
            done.map(|_| ())
        })
        .map_err(Self::io)
    }
}

impl ServerDatabase for PgServer {
    fn name(&self) -> &str {
        self.db.url.dbname()
    }

    fn check_restorable(&self) -> Result<()> {
        self.block(async {
            let db = &self.db;
            let mut conn = self.admin().await?;
            let may: bool = sqlx::query_scalar(
                "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user",
            )
            .fetch_one(&mut conn)
            .await
            .map_err(|e| db.sqlx_err(&e))?;
            if !may {
                let _ = conn.close().await;
                return Err(db.err(
                    "this role lacks the CREATEDB privilege, which a restore needs (it restores into a new database and renames it into place): ALTER ROLE … CREATEDB, or restore as the database's owner with it",
                ));
            }
            // Autovacuum workers are not the app: the rename ends them
            // (PostgreSQL cancels them when a database must be alone).
            let sessions: Vec<Session> =
                sqlx::query_as(
                    "SELECT pid, usename::text, application_name, client_addr::text FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type <> 'autovacuum worker'",
                )
                .bind(self.name())
                .fetch_all(&mut conn)
                .await
                .map_err(|e| db.sqlx_err(&e))?;
            let _ = conn.close().await;
            if sessions.is_empty() {
                return Ok(());
            }
            let holder = sessions
                .iter()
                .map(|(pid, user, app, addr)| {
                    format!(
                        "pid {pid} ({}{}{})",
                        user.as_deref().unwrap_or("?"),
                        app.as_deref()
                            .filter(|a| !a.is_empty())
                            .map(|a| format!(", {a}"))
                            .unwrap_or_default(),
                        addr.as_deref()
                            .map(|a| format!(" from {a}"))
                            .unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            Err(Error::InUse {
                component: COMPONENT,
                path: format!("database {}", self.name()),
                holder: format!("{} session(s): {holder}", sessions.len()),
            })
        })
    }

    fn restore_into(&self, staging: &str, dump: &Path, expected_schema: Option<i64>) -> Result<()> {
        self.block(async {
            let db = &self.db;
            let mut conn = self.admin().await?;
            let sql = format!("DROP DATABASE IF EXISTS {}", ident(staging));
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .map_err(|e| db.sqlx_err(&e))?;
            let sql = format!("CREATE DATABASE {}", ident(staging));
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .map_err(|e| db.sqlx_err(&e))?;
            let _ = conn.close().await;
            let dump_text = dump.display().to_string();
            db.run_tool(
                "pg_restore",
                &["--exit-on-error", "--single-transaction", "--no-owner", &dump_text],
                staging,
            )
            .await
            .map_err(|e| match e {
                Error::Source { reason, .. } => {
                    db.err(format!("restoring into the staging database {staging}: {reason}"))
                }
                other => other,
            })?;
            let mut conn = db.connect_to(staging).await?;
            let schema = db.schema_version(&mut conn).await;
            let _ = conn.close().await;
            let schema = schema?;
            if let Some(expected) = expected_schema
                && schema != expected
            {
                return Err(db.err(format!(
                    "the restored database's schema version is {schema}, the manifest says {expected}"
                )));
            }
            Ok(())
        })
    }

    fn exists(&self, name: &str) -> std::io::Result<bool> {
        self.block(async {
            let mut conn = self.admin().await?;
            let found: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(name)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(|e| self.db.sqlx_err(&e))?;
            let _ = conn.close().await;
            Ok(found)
        })
        .map_err(Self::io)
    }

    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.admin_exec(format!(
            "ALTER DATABASE {} RENAME TO {}",
            ident(from),
            ident(to)
        ))
    }

    fn drop_database(&self, name: &str) -> std::io::Result<()> {
        self.admin_exec(format!("DROP DATABASE IF EXISTS {}", ident(name)))
    }

    fn staging_leftovers(&self) -> std::io::Result<Vec<String>> {
        self.block(async {
            let mut conn = self.admin().await?;
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)",
            )
            .bind(format!("{}__restore_", self.name()))
            .fetch_all(&mut conn)
            .await
            .map_err(|e| self.db.sqlx_err(&e))?;
            let _ = conn.close().await;
            Ok(names)
        })
        .map_err(Self::io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_in_urls() {
        assert_eq!(
            with_dbname(
                "postgres://u@h:5/app?sslmode=disable",
                "app",
                "app__restore_1"
            ),
            "postgres://u@h:5/app__restore_1?sslmode=disable"
        );
        assert_eq!(
            with_dbname("postgres://h/app", "app", "x"),
            "postgres://h/x"
        );
    }
}
