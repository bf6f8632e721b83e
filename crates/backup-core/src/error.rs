//! The one error type of the domain. Adapters map their failures onto these
//! variants (keeping the source), and the edges map variants onto HTTP
//! statuses and exit codes through [`Error::kind`].

use crate::compat::CompatReport;
use crate::config::ConfigError;
use crate::id::{Component, IdError};
use crate::manifest::ManifestError;
use crate::path::PathError;

/// Boxed source error of an adapter.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, each variant naming the backup id, key or
/// path concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A string that is not a valid backup id.
    #[error("invalid backup id: {0}")]
    InvalidId(#[from] IdError),
    /// A path that is not allowed inside a backup.
    #[error("invalid path in backup {id}: {source}")]
    InvalidPath {
        /// The backup concerned.
        id: String,
        /// What is wrong with the path.
        source: PathError,
    },
    /// A label that may not be stored (control characters, too long...).
    #[error("invalid label {label}: {reason}")]
    InvalidLabel {
        /// The label's key, escaped.
        label: String,
        /// What is wrong.
        reason: String,
    },
    /// An idempotency key sent again with a different request.
    #[error(
        "idempotency key {key} was first used for another request (backup {id}); use a new key"
    )]
    IdempotencyMismatch {
        /// The key, escaped.
        key: String,
        /// The backup the first request started.
        id: String,
    },
    /// No published backup with this id.
    #[error("backup {id} not found in {location}")]
    NotFound {
        /// The requested id.
        id: String,
        /// The store, e.g. `/var/backups` or `s3://bucket/prefix` (no secrets).
        location: String,
    },
    /// Another mutating operation holds the lock; nothing was done.
    #[error("busy: cannot {operation} while {holder}")]
    Busy {
        /// What was asked for.
        operation: String,
        /// Who holds the lock and since when, as far as known.
        holder: String,
    },
    /// A manifest that cannot be read or is inconsistent.
    #[error("manifest of backup {id}: {source}")]
    Manifest {
        /// The backup concerned.
        id: String,
        /// Why.
        source: ManifestError,
    },
    /// The backup may not be restored into this build.
    #[error("backup {id} is incompatible: {}", .report.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Incompatible {
        /// The backup concerned.
        id: String,
        /// Every finding.
        report: CompatReport,
    },
    /// Data that does not match its manifest (hash, size, unexpected entry).
    #[error("integrity check of backup {id} failed at {path}: {reason}")]
    Integrity {
        /// The backup concerned.
        id: String,
        /// The file or entry concerned.
        path: String,
        /// What does not match.
        reason: String,
    },
    /// An encrypted backup that the configured identity cannot decrypt
    /// (none configured, unreadable, or not one of its recipients);
    /// nothing was read or touched.
    #[error("backup {id} cannot be decrypted: {reason}")]
    Key {
        /// The backup concerned.
        id: String,
        /// Which identity is missing or wrong, and who the backup is for.
        reason: String,
    },
    /// A restore or destructive operation was not confirmed.
    #[error("{operation} of backup {id} requires confirmation")]
    NotConfirmed {
        /// What needed confirmation.
        operation: String,
        /// The backup concerned.
        id: String,
    },
    /// Deleting a pinned (pre-migration) backup without `force`.
    #[error("backup {id} is pinned (pre-migration); deleting it requires force")]
    Pinned {
        /// The backup concerned.
        id: String,
    },
    /// A component source failed (missing DB, not SQLite, file changed while read...).
    #[error("{component} source failed at {path}: {reason}")]
    Source {
        /// The component.
        component: Component,
        /// The file or directory concerned.
        path: String,
        /// What happened.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The backup store failed.
    #[error("backup store {location} failed at {key}: {reason}")]
    Store {
        /// The store (no secrets).
        location: String,
        /// Object key or file path concerned.
        key: String,
        /// What happened.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// An operation exceeded its time bound.
    #[error("{what} timed out after {secs} s")]
    Timeout {
        /// What timed out.
        what: String,
        /// The bound.
        secs: u64,
    },
    /// Live data that a restore would replace is open in another process
    /// (a writer whose later commits would be lost); nothing was touched.
    #[error(
        "{component} at {path} is in use by {holder}; stop the app (or close its connections) before restoring"
    )]
    InUse {
        /// The component concerned.
        component: Component,
        /// The open file.
        path: String,
        /// Who holds it open, e.g. `pid 1234 (python3)`, as far as known.
        holder: String,
    },
    /// The operation was cancelled; nothing partial was published.
    #[error("{0} was cancelled")]
    Cancelled(String),
    /// A fault that is nobody's input: a task that panicked, a poisoned
    /// lock, a broken internal invariant. Nothing partial was published.
    #[error("internal error: {0}")]
    Internal(String),
}

/// How an error should be treated by the CLI (exit codes) and the API
/// (status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input: config, id, path. Exit 2, HTTP 400.
    Invalid,
    /// Not found. Exit 1, HTTP 404.
    NotFound,
    /// Refused: incompatible, unconfirmed, integrity, pinned. Exit 3, HTTP 409/422.
    Refused,
    /// Busy. Exit 4, HTTP 409.
    Busy,
    /// The operation failed. Exit 1, HTTP 500.
    Failed,
}

impl ErrorKind {
    /// The kind of an error from its stable [`Error::code`], e.g. in a
    /// problem+json answer, so that a remote client treats it as the
    /// server did. `None` for codes that are not the domain's (HTTP-level
    /// ones such as `unauthorized`).
    pub fn of_code(code: &str) -> Option<ErrorKind> {
        Some(match code {
            "invalid_config" | "invalid_id" | "invalid_path" | "invalid_label" => {
                ErrorKind::Invalid
            }
            "not_found" => ErrorKind::NotFound,
            "busy" => ErrorKind::Busy,
            "bad_manifest"
            | "incompatible"
            | "integrity"
            | "not_confirmed"
            | "pinned"
            | "in_use"
            | "idempotency_mismatch"
            | "decryption_key" => ErrorKind::Refused,
            "source_failed" | "store_failed" | "timeout" | "cancelled" | "internal" => {
                ErrorKind::Failed
            }
            _ => return None,
        })
    }
}

impl Error {
    /// The treatment class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_)
            | Error::InvalidId(_)
            | Error::InvalidPath { .. }
            | Error::InvalidLabel { .. } => ErrorKind::Invalid,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Manifest { .. }
            | Error::Incompatible { .. }
            | Error::Integrity { .. }
            | Error::NotConfirmed { .. }
            | Error::Pinned { .. }
            | Error::InUse { .. }
            | Error::IdempotencyMismatch { .. }
            | Error::Key { .. } => ErrorKind::Refused,
            Error::Source { .. }
            | Error::Store { .. }
            | Error::Timeout { .. }
            | Error::Cancelled(_)
            | Error::Internal(_) => ErrorKind::Failed,
        }
    }

    /// A stable machine-readable code, e.g. for problem+json.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config(_) => "invalid_config",
            Error::InvalidId(_) => "invalid_id",
            Error::InvalidPath { .. } => "invalid_path",
            Error::InvalidLabel { .. } => "invalid_label",
            Error::NotFound { .. } => "not_found",
            Error::Busy { .. } => "busy",
            Error::Manifest { .. } => "bad_manifest",
            Error::Incompatible { .. } => "incompatible",
            Error::Integrity { .. } => "integrity",
            Error::Key { .. } => "decryption_key",
            Error::NotConfirmed { .. } => "not_confirmed",
            Error::Pinned { .. } => "pinned",
            Error::InUse { .. } => "in_use",
            Error::IdempotencyMismatch { .. } => "idempotency_mismatch",
            Error::Source { .. } => "source_failed",
            Error::Store { .. } => "store_failed",
            Error::Timeout { .. } => "timeout",
            Error::Cancelled(_) => "cancelled",
            Error::Internal(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_back_to_its_kind() {
        let errors = [
            Error::InvalidId(IdError::Empty),
            Error::InvalidLabel {
                label: "k".into(),
                reason: "r".into(),
            },
            Error::NotFound {
                id: "x".into(),
                location: "l".into(),
            },
            Error::Busy {
                operation: "o".into(),
                holder: "h".into(),
            },
            Error::Integrity {
                id: "x".into(),
                path: "p".into(),
                reason: "r".into(),
            },
            Error::Key {
                id: "x".into(),
                reason: "r".into(),
            },
            Error::NotConfirmed {
                operation: "o".into(),
                id: "x".into(),
            },
            Error::Pinned { id: "x".into() },
            Error::InUse {
                component: Component::Persistence,
                path: "p".into(),
                holder: "h".into(),
            },
            Error::IdempotencyMismatch {
                key: "k".into(),
                id: "x".into(),
            },
            Error::Source {
                component: Component::Memory,
                path: "p".into(),
                reason: "r".into(),
                source: None,
            },
            Error::Store {
                location: "l".into(),
                key: "k".into(),
                reason: "r".into(),
                source: None,
            },
            Error::Timeout {
                what: "w".into(),
                secs: 1,
            },
            Error::Cancelled("c".into()),
            Error::Internal("i".into()),
        ];
        for e in errors {
            assert_eq!(ErrorKind::of_code(e.code()), Some(e.kind()), "{}", e.code());
        }
        assert_eq!(ErrorKind::of_code("unauthorized"), None);
    }

    #[test]
    fn messages_name_what_is_concerned() {
        let e = Error::NotFound {
            id: "2026-03-15T14-30-00_manual".into(),
            location: "/var/backups".into(),
        };
        assert_eq!(
            e.to_string(),
            "backup 2026-03-15T14-30-00_manual not found in /var/backups"
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e: Error = IdError::Empty.into();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert_eq!(e.code(), "invalid_id");
    }
}
