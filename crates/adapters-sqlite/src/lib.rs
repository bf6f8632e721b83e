//! SQLite (and PostgreSQL) adapter of synthorg-backup.
//!
//! - [`PgSource`] / [`PgServer`]: the persistence component of a
//!   PostgreSQL deployment (`pg_dump` in one snapshot; restore into a
//!   staging database renamed into place), see `postgres.rs`.
//! - [`SqliteSource`]: the persistence component. It snapshots the live
//!   `synthorg.db` with `VACUUM INTO` a scratch file on its own connection
//!   while the app keeps writing. In WAL mode `VACUUM INTO` is one read
//!   transaction: it sees one committed state (including what is still in
//!   the WAL) and never blocks the app's writers. The online backup API is
//!   not used: it restarts on every write and never finishes under a busy
//!   writer.
//! - [`SqliteSnapshotter`]: the same, for SQLite files found inside other
//!   components (e.g. `memory/mem0_history.db`), recognised by header.
//! - [`verify_database`]: `PRAGMA integrity_check` and `user_version` of a
//!   staged database, for restore.
//!
//! Errors are distinct and name the file: missing, not a SQLite database,
//! locked, corrupt.

mod postgres;
mod snapshot;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use backup_core::{Component, Error, Result};
use sqlx::ConnectOptions as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

pub use postgres::{PgDatabase, PgServer, PgSource, check_dump};
pub use snapshot::{SqliteSnapshotter, SqliteSource};

/// Whether the file at `path` starts with `magic`.
pub(crate) async fn file_starts_with(path: &Path, magic: &[u8]) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return false;
    };
    let mut head = vec![0u8; magic.len()];
    file.read_exact(&mut head).await.is_ok() && head == magic
}

/// The 16-byte header of every SQLite 3 database file.
pub const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// How long a snapshot connection waits on a lock before reporting it as
/// locked, unless configured otherwise.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a database could not be read; mapped onto [`Error::Source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbProblem {
    /// The file does not exist.
    Missing,
    /// The file is not a SQLite database.
    NotSqlite,
    /// Another connection holds a lock longer than the busy timeout.
    Locked,
    /// The database is malformed.
    Corrupt,
    /// Anything else (I/O, permissions).
    Other,
}

impl DbProblem {
    fn describe(self) -> &'static str {
        match self {
            DbProblem::Missing => "database file does not exist",
            DbProblem::NotSqlite => "file is not a SQLite database",
            DbProblem::Locked => "database is locked by another process (busy timeout exceeded)",
            DbProblem::Corrupt => "database is corrupt (malformed disk image)",
            DbProblem::Other => "database could not be read",
        }
    }
}

/// Classifies a sqlx error by SQLite's primary result code.
fn classify(e: &sqlx::Error) -> DbProblem {
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .and_then(|c| c.parse::<i32>().ok())
        .map(|c| c & 0xff);
    match code {
        Some(5 | 6) => DbProblem::Locked, // SQLITE_BUSY, SQLITE_LOCKED
        Some(11) => DbProblem::Corrupt,   // SQLITE_CORRUPT
        Some(26) => DbProblem::NotSqlite, // SQLITE_NOTADB
        Some(14) => DbProblem::Missing,   // SQLITE_CANTOPEN
        _ => DbProblem::Other,
    }
}

pub(crate) fn db_error(
    component: Component,
    path: &Path,
    problem: DbProblem,
    detail: Option<String>,
) -> Error {
    Error::Source {
        component,
        path: path.display().to_string(),
        reason: match detail {
            Some(d) => format!("{}: {d}", problem.describe()),
            None => problem.describe().to_owned(),
        },
        source: None,
    }
}

pub(crate) fn sqlx_error(component: Component, path: &Path, e: &sqlx::Error) -> Error {
    db_error(component, path, classify(e), Some(e.to_string()))
}

/// Checks the file's header before SQLite sees it, so that a missing file
/// and a non-SQLite file each get their own error.
pub(crate) async fn check_header(component: Component, path: &Path) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(db_error(component, path, DbProblem::Missing, None));
        }
        Err(e) => {
            return Err(db_error(
                component,
                path,
                DbProblem::Other,
                Some(e.to_string()),
            ));
        }
    };
    let mut header = [0u8; 16];
    let mut filled = 0;
    while filled < header.len() {
        let n = file
            .read(&mut header[filled..])
            .await
            .map_err(|e| db_error(component, path, DbProblem::Other, Some(e.to_string())))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    if filled < header.len() || &header != SQLITE_HEADER {
        return Err(db_error(component, path, DbProblem::NotSqlite, None));
    }
    Ok(())
}

/// Opens a connection to an existing database without creating it.
pub(crate) async fn connect(
    component: Component,
    path: &Path,
    read_only: bool,
    busy_timeout: Duration,
) -> Result<SqliteConnection> {
    SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| sqlx_error(component, path, &e))?
        .filename(path)
        .create_if_missing(false)
        .read_only(read_only)
        .busy_timeout(busy_timeout)
        .foreign_keys(false)
        .connect()
        .await
        .map_err(|e| sqlx_error(component, path, &e))
}

/// `PRAGMA user_version` of a database.
pub(crate) async fn user_version(
    conn: &mut SqliteConnection,
    component: Component,
    path: &Path,
) -> Result<i64> {
    sqlx::query_scalar::<_, i64>("PRAGMA user_version")
        .fetch_one(conn)
        .await
        .map_err(|e| sqlx_error(component, path, &e))
}

/// `PRAGMA user_version` of an existing database file.
///
/// # Errors
/// `Source` when the file is missing, not SQLite, locked or corrupt.
pub async fn read_user_version(path: &Path) -> Result<i64> {
    let component = Component::Persistence;
    check_header(component, path).await?;
    let mut conn = connect(component, path, true, DEFAULT_BUSY_TIMEOUT).await?;
    let version = user_version(&mut conn, component, path).await;
    let _ = sqlx::Connection::close(conn).await;
    version
}

/// Folds a live database's WAL into its main file (and removes it) or
/// rolls back its hot journal, as the app does when it opens it, so that
/// the file alone is the database. Returns `user_version`. Only while no
/// other process has the database open (a restore checks that first).
///
/// # Errors
/// `Source` naming the file: missing, not SQLite, locked (a checkpoint
/// that could not finish), corrupt.
pub async fn settle_database(component: Component, path: &Path) -> Result<i64> {
    check_header(component, path).await?;
    let mut conn = connect(component, path, false, DEFAULT_BUSY_TIMEOUT).await?;
    let settled = async {
        // (busy, frames in the WAL, frames checkpointed); busy = 1 means
        // another connection kept it from finishing.
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| sqlx_error(component, path, &e))?;
        if busy != 0 {
            return Err(db_error(
                component,
                path,
                DbProblem::Other,
                Some(
                    "the WAL checkpoint could not finish: another connection holds the database"
                        .into(),
                ),
            ));
        }
        user_version(&mut conn, component, path).await
    }
    .await;
    // Closing the last connection removes the (now empty) WAL and -shm.
    sqlx::Connection::close(conn)
        .await
        .map_err(|e| sqlx_error(component, path, &e))?;
    settled
}

/// Verifies a staged database: SQLite header, `PRAGMA integrity_check` =
/// `ok`, and `user_version` equal to `expected_schema` when given. Returns
/// the schema version.
///
/// # Errors
/// `Source` naming the file: missing, not SQLite, corrupt (with the first
/// integrity problems), or a schema version other than expected.
pub async fn verify_database(
    component: Component,
    path: &Path,
    expected_schema: Option<i64>,
) -> Result<i64> {
    check_header(component, path).await?;
    let mut conn = connect(component, path, true, DEFAULT_BUSY_TIMEOUT).await?;
    let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check(20)")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| sqlx_error(component, path, &e))?;
    if rows != ["ok"] {
        return Err(db_error(
            component,
            path,
            DbProblem::Corrupt,
            Some(rows.join("; ")),
        ));
    }
    let schema = user_version(&mut conn, component, path).await?;
    if let Some(expected) = expected_schema
        && schema != expected
    {
        return Err(Error::Source {
            component,
            path: path.display().to_string(),
            reason: format!(
                "schema version (user_version) is {schema}, the manifest says {expected}"
            ),
            source: None,
        });
    }
    Ok(schema)
}
