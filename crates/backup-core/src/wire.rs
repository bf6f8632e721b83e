//! The wire format: typed bodies of every admin API request and response
//! and of every `--json` output of the CLI. The API handlers, the CLI's
//! local renderer and its remote client all use these types, so local and
//! remote output cannot drift apart; the OpenAPI document is checked
//! against them (`api/src/openapi.rs` tests).
//!
//! Reports that are domain results in their own right (`Manifest`,
//! `RestoreReport`, `VerifyReport`, `StatusReport`) are sent as they are.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Compression;
use crate::id::{BackupId, Component, Trigger};
use crate::manifest::Manifest;
use crate::ports::Listed;
use crate::retention::{Action, Decision};
use crate::service::Progress;

/// One entry of `backup list --json` and of `GET /backups`: the same
/// shape locally and remotely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListItem {
    /// The backup.
    pub id: BackupId,
    /// `complete` or `damaged` (the API also lists `running` backups).
    pub status: String,
    /// Why it was taken.
    pub trigger: Trigger,
    /// When it was taken.
    pub timestamp: DateTime<Utc>,
    /// Data size (complete backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Size as stored (complete backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// Components held (complete backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<Vec<Component>>,
    /// Components whose source did not exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absent: Vec<Component>,
    /// How it is stored (complete backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Whether retention leaves it alone (complete backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<bool>,
    /// Whether it is encrypted (complete backups).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// The recipients (public keys) it is encrypted to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// Why it is damaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How far it is (running backups, API only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

impl From<&Listed> for ListItem {
    fn from(l: &Listed) -> ListItem {
        match l {
            Listed::Complete(m) => ListItem {
                id: m.id.clone(),
                status: "complete".into(),
                trigger: m.trigger,
                timestamp: m.timestamp,
                size_bytes: Some(m.size_bytes),
                stored_bytes: Some(m.stored_bytes),
                components: Some(m.components.clone()),
                absent: m.absent.clone(),
                compression: Some(m.compression),
                pinned: Some(m.is_pinned()),
                encrypted: m.encrypted,
                recipients: m.recipients.clone(),
                reason: None,
                progress: None,
            },
            Listed::Damaged { id, reason } => ListItem {
                id: id.clone(),
                status: "damaged".into(),
                trigger: id.trigger(),
                timestamp: id.timestamp(),
                size_bytes: None,
                stored_bytes: None,
                components: None,
                absent: Vec::new(),
                compression: None,
                pinned: None,
                encrypted: false,
                recipients: Vec::new(),
                reason: Some(reason.clone()),
                progress: None,
            },
        }
    }
}

impl ListItem {
    /// A backup that is being written (the API lists it while it runs).
    pub fn running(id: &BackupId, progress: Option<Progress>) -> ListItem {
        ListItem {
            id: id.clone(),
            status: "running".into(),
            trigger: id.trigger(),
            timestamp: id.timestamp(),
            size_bytes: None,
            stored_bytes: None,
            components: None,
            absent: Vec::new(),
            compression: None,
            pinned: None,
            encrypted: false,
            recipients: Vec::new(),
            reason: None,
            progress,
        }
    }
}

/// `GET /backups`: one page, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPage {
    /// The backups on this page.
    pub items: Vec<ListItem>,
    /// The `cursor` of the next page; `None` on the last one.
    pub next_cursor: Option<String>,
}

/// `POST /backup` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// `manual` (default) or `pre-migration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Free-form labels recorded in the manifest.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `POST /backup` answer (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The backup being written.
    pub id: BackupId,
    /// `running`, or for a repeated request the status now.
    pub status: String,
    /// Where to poll.
    pub status_url: String,
    /// Whether this answers a repeat of an earlier request (same
    /// `Idempotency-Key`).
    pub repeated: bool,
}

/// `GET /backups/{id}`: a backup's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupState {
    /// The backup.
    pub id: BackupId,
    /// `running`, `failed`, `complete` or `damaged`.
    pub status: String,
    /// The manifest (complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Box<Manifest>>,
    /// How far it is (running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// What went wrong (failed, damaged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /restore` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The backup to restore.
    pub backup_id: String,
    /// Required to restore (not for a dry run).
    #[serde(default)]
    pub confirm: bool,
    /// Check everything a restore would and touch nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// With `dry_run`: only the plan (compatibility, what would be
    /// replaced), without reading the backup's content.
    #[serde(default)]
    pub plan_only: bool,
    /// The components to restore; all when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<Vec<Component>>,
}

/// An error answer (RFC 9457 problem+json).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary (the HTTP reason phrase).
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// The stable machine-readable code (`Error::code`).
    pub code: String,
    /// What went wrong, for people.
    pub detail: String,
    /// The compatibility findings (`incompatible` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compatibility: Option<crate::compat::CompatReport>,
}

impl Problem {
    /// The problem of `status` with `code` and `detail`.
    pub fn new(status: u16, title: &str, code: &str, detail: String) -> Problem {
        Problem {
            kind: format!("https://synthorg.dev/problems/{code}"),
            title: title.to_owned(),
            status,
            code: code.to_owned(),
            detail,
            compatibility: None,
        }
    }
}

/// `backup delete --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The backup deleted.
    pub deleted: BackupId,
}

/// One decision of `backup prune --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneItem {
    /// The backup.
    pub id: BackupId,
    /// `prune` or `keep`.
    pub action: String,
    /// Why.
    pub reason: String,
}

impl From<&Decision> for PruneItem {
    fn from(d: &Decision) -> PruneItem {
        PruneItem {
            id: d.id.clone(),
            action: if d.action == Action::Prune {
                "prune"
            } else {
                "keep"
            }
            .into(),
            reason: d.reason.to_string(),
        }
    }
}

/// `backup prune --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    /// Whether nothing was deleted (only planned).
    pub dry_run: bool,
    /// Every backup's decision.
    pub decisions: Vec<PruneItem>,
}

/// `recover --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    /// What recovery did.
    pub actions: Vec<String>,
}

/// `backup export --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exported {
    /// The backup exported.
    pub id: BackupId,
    /// Where it was extracted.
    pub path: PathBuf,
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// A plain message (`--json` of commands that only inform).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// The message.
    pub note: String,
}

/// `key generate --out FILE --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGenerated {
    /// The public key to list in `backup.encryption.recipients`.
    pub recipient: String,
    /// Where the identity (private key) was written.
    pub identity_file: String,
}

/// `config check --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigOk {
    /// Always `true` (a bad config is an error).
    pub ok: bool,
    /// Where the config came from.
    pub source: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
}
