//! [`BackupService`]: the orchestration of create, list, show, verify,
//! delete and prune, through the ports only.
//!
//! Every mutating operation takes the [`OperationLock`] first and fails
//! with `Busy` instead of waiting. Failures are logged at ERROR with the
//! backup id and returned as typed errors; nothing here panics or exits.

mod create;
#[cfg(test)]
mod memory_tests;
mod read;
mod restore;
mod status;
#[cfg(test)]
mod tests;
mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::compat::RunningApp;
use crate::config::{BackupConfig, Compression};
use crate::crypt::{Identities, IdentityState, Recipients};
use crate::error::{Error, Result};
use crate::id::{BackupId, Component, Trigger};
use crate::manifest::Manifest;
use crate::ports::{
    BackupStore, Clock, ComponentSource, Listed, LockGuard, Operation, OperationLock, Quiesce,
    RestoreTarget, Sidecar,
};
use crate::retention::{self, Action, Candidate, Decision, RetentionPolicy};
use crate::status::EventKind;

pub use restore::{Replaced, RestoreOptions, RestoreReport};
pub use verify::VerifyReport;

/// What the service needs from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Archive or directory form.
    pub compression: Compression,
    /// Compression level; a measured default when `None`.
    pub compression_level: Option<u32>,
    /// Components to back up, in canonical order.
    pub include: Vec<Component>,
    /// Retention applied after every backup.
    pub retention: RetentionPolicy,
    /// Longest the memory writer may stay paused.
    pub quiesce_timeout: Duration,
    /// Recipients new backups are encrypted to (`None`: in the clear);
    /// `Err` (the key, what is wrong with it) for a config naming bad
    /// ones, so that backups fail rather than go out unencrypted.
    pub encrypt_to: std::result::Result<Option<Recipients>, (String, String)>,
    /// The identity that decrypts encrypted backups, as the host loaded it.
    pub identity: IdentityState,
}

impl From<&BackupConfig> for Settings {
    fn from(c: &BackupConfig) -> Self {
        let mut include = c.include.clone();
        include.sort();
        Settings {
            compression: c.compression,
            compression_level: c.compression_level,
            include,
            retention: c.retention_policy(),
            quiesce_timeout: Duration::from_secs(u64::from(c.quiesce_timeout_secs)),
            encrypt_to: match &c.encryption {
                None => Ok(None),
                Some(e) => e.recipients().map(Some).map_err(|e| match e {
                    crate::config::ConfigError::Invalid { key, reason } => (key, reason),
                    other => ("backup.encryption.recipients".into(), other.to_string()),
                }),
            },
            identity: IdentityState::None,
        }
    }
}

/// A progress report of a running operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Progress {
    /// The backup concerned.
    pub id: BackupId,
    /// What is happening.
    pub phase: Phase,
    /// Bytes done in this phase.
    pub bytes_done: u64,
    /// Bytes in this phase, as far as known.
    pub bytes_total: u64,
    /// Files done in this phase.
    pub files_done: u64,
    /// Files in this phase, as far as known.
    pub files_total: u64,
}

/// Phases reported by [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "phase", content = "component")]
pub enum Phase {
    /// Snapshotting and archiving one component.
    Backup(Component),
    /// Re-reading a backup to verify or export it.
    Verify,
    /// Reading a backup into staging for a restore.
    Restore,
    /// Publishing the manifest and applying retention.
    Finish,
}

/// Receives progress reports; must be cheap and never block.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Options of [`BackupService::create_with`].
#[derive(Clone, Default)]
pub struct CreateOptions {
    /// Labels stored in the manifest, e.g. `migration: "3->4"`.
    pub labels: BTreeMap<String, String>,
    /// Progress receiver.
    pub progress: Option<ProgressFn>,
    /// Back up only these components (each needs a source); `include` when `None`.
    pub components: Option<Vec<Component>>,
    /// No one writes the sources now (see
    /// [`ComponentSource::snapshot_settled`]): a restore's safety backup,
    /// taken while the app is stopped.
    pub settled: bool,
    /// The compression level of this backup; the configured one when
    /// `None`. A restore's regular safety backup takes the fastest.
    pub compression_level: Option<u32>,
}

impl std::fmt::Debug for CreateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateOptions")
            .field("labels", &self.labels)
            .field("progress", &self.progress.is_some())
            .field("components", &self.components)
            .field("settled", &self.settled)
            .field("compression_level", &self.compression_level)
            .finish()
    }
}

/// A backup whose id is chosen and whose lock is held; `run` does the work.
pub struct PendingBackup {
    /// The id the backup will have.
    pub id: BackupId,
    /// Creates the backup, applies retention, releases the lock.
    pub run: futures::future::BoxFuture<'static, Result<Manifest>>,
}

impl std::fmt::Debug for PendingBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingBackup")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The ports a service runs on.
#[derive(Debug, Clone)]
pub struct Ports {
    /// Where backups go.
    pub store: Arc<dyn BackupStore>,
    /// One mutating operation at a time.
    pub lock: Arc<dyn OperationLock>,
    /// One source per included component.
    pub sources: Vec<Arc<dyn ComponentSource>>,
    /// Pauses the memory writer.
    pub quiesce: Arc<dyn Quiesce>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// The live data a restore replaces.
    pub restore_target: Arc<dyn RestoreTarget>,
    /// Where events go.
    pub notifier: Arc<dyn crate::ports::Notifier>,
}

/// Create, list, show, verify, delete and prune backups.
#[derive(Clone)]
pub struct BackupService {
    settings: Settings,
    ports: Ports,
    app: RunningApp,
    /// Receives progress of verify, export and restore.
    progress: Option<ProgressFn>,
    /// What the recovery of the operations of this service (and its
    /// clones) did, until [`take_recovered`](BackupService::take_recovered).
    recovered: Arc<std::sync::Mutex<Vec<String>>>,
}

impl std::fmt::Debug for BackupService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupService")
            .field("settings", &self.settings)
            .field("ports", &self.ports)
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl BackupService {
    /// A service over `ports` for the running app `app`.
    ///
    /// # Errors
    /// `Config` when an included component has no source, or one has two.
    pub fn new(settings: Settings, ports: Ports, app: RunningApp) -> Result<BackupService> {
        let service = BackupService {
            settings,
            ports,
            app,
            progress: None,
            recovered: Arc::default(),
        };
        service.check_sources(&service.settings.include)?;
        for s in &service.ports.sources {
            let same = service
                .ports
                .sources
                .iter()
                .filter(|o| o.component() == s.component());
            if same.count() > 1 {
                return Err(Error::Config(crate::config::ConfigError::Invalid {
                    key: "backup.sources".into(),
                    reason: format!("component {} has more than one source", s.component()),
                }));
            }
        }
        Ok(service)
    }

    /// Every component in `list` has a source.
    fn check_sources(&self, list: &[Component]) -> Result<()> {
        match list
            .iter()
            .find(|c| !self.ports.sources.iter().any(|s| s.component() == **c))
        {
            Some(c) => Err(Error::Config(crate::config::ConfigError::Invalid {
                key: "backup.include".into(),
                reason: format!("component {c} has no source configured"),
            })),
            None => Ok(()),
        }
    }

    /// The same service, reporting the progress of verify, export and
    /// restore to `progress` (backups take theirs in [`CreateOptions`]).
    pub fn with_progress(&self, progress: Option<ProgressFn>) -> BackupService {
        BackupService {
            progress,
            ..self.clone()
        }
    }

    /// The store's location, for messages.
    pub fn location(&self) -> String {
        self.ports.store.location()
    }

    /// The running app this service restores into.
    pub fn app(&self) -> &RunningApp {
        &self.app
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Creates a backup; see [`create_with`](Self::create_with).
    ///
    /// # Errors
    /// As [`create_with`](Self::create_with).
    pub async fn create(&self, trigger: Trigger) -> Result<Manifest> {
        self.create_with(trigger, CreateOptions::default()).await
    }

    /// Creates a backup of every included component and publishes it, then
    /// applies retention (whose failures are logged, not returned).
    ///
    /// # Errors
    /// `Busy` when another operation runs; `Config` when a requested
    /// component has no source; `Source`, `Store`, `Timeout` otherwise. On
    /// any error nothing is published and partial objects are removed.
    pub async fn create_with(&self, trigger: Trigger, options: CreateOptions) -> Result<Manifest> {
        self.begin(trigger, options).await?.run.await
    }

    /// Takes the lock and picks the id of a new backup, and returns the
    /// work still to do as a future, so that a caller (the API) can answer
    /// with the id at once and run the backup in the background. The lock
    /// is held until the future completes or is dropped.
    ///
    /// # Errors
    /// `Busy` when another operation runs; `Config` for a component without
    /// a source; `Store` when the store cannot be listed.
    pub async fn begin(&self, trigger: Trigger, options: CreateOptions) -> Result<PendingBackup> {
        if let Some(list) = &options.components {
            self.check_sources(list)?;
        }
        crate::manifest::check_labels(&options.labels)
            .map_err(|(label, reason)| Error::InvalidLabel { label, reason })?;
        let guard = self.acquire(Operation::Backup).await?;
        let timestamp = self.ports.clock.now();
        let (id, sequence) = match self.next_id(trigger, timestamp).await {
            Ok(next) => next,
            Err(e) => {
                release(guard).await;
                return Err(e);
            }
        };
        let service = self.clone();
        let task_id = id.clone();
        let run = async move {
            let started = std::time::Instant::now();
            let result = service
                .create_as(&task_id, sequence, timestamp, &options)
                .await;
            match &result {
                Ok(_) => {
                    if let Err(e) = service
                        .apply_retention(false, std::slice::from_ref(&task_id))
                        .await
                    {
                        tracing::error!(error = %e, "retention after backup failed; the backup itself is fine");
                    }
                }
                Err(e) => service.record_failure(trigger, sequence, e).await,
            }
            release(guard).await;
            let event = match &result {
                Ok(m) => service.event(EventKind::BackupSucceeded, Some(m), started, None),
                Err(e) => {
                    let mut ev = service.event(EventKind::BackupFailed, None, started, Some(e));
                    ev.backup_id = Some(task_id.clone());
                    ev.trigger = Some(trigger);
                    ev
                }
            };
            service.ports.notifier.notify(&event).await;
            result
        };
        Ok(PendingBackup {
            id,
            run: Box::pin(run),
        })
    }

    /// Published backups, newest first; damaged sidecars are listed as such.
    ///
    /// # Errors
    /// `Store` when the location cannot be listed.
    pub async fn list(&self) -> Result<Vec<Listed>> {
        self.ports.store.list().await
    }

    /// The manifest of one backup.
    ///
    /// # Errors
    /// `NotFound`, or `Manifest` when its sidecar is damaged.
    pub async fn show(&self, id: &BackupId) -> Result<Manifest> {
        self.read_manifest(id).await
    }

    /// The sidecar manifest of `id`, decrypted with the configured
    /// identity when the backup is encrypted.
    ///
    /// # Errors
    /// `NotFound`; `Manifest` when it is invalid; `Key` when it is
    /// encrypted and no configured identity opens it.
    pub(crate) async fn read_manifest(&self, id: &BackupId) -> Result<Manifest> {
        let (bytes, made_for) = match self.ports.store.sidecar(id).await? {
            Sidecar::Clear(m) => return Ok(*m),
            Sidecar::Sealed { bytes, recipients } => (bytes, recipients),
        };
        let identities = self.identities(id, &made_for)?;
        let plain = identities
            .open(&bytes)
            .map_err(|e| crate::crypt::open_failure(id, &made_for, &identities, &e))?;
        let manifest = Manifest::from_sidecar(&plain, id)?;
        if !manifest.encrypted {
            return Err(Error::Manifest {
                id: id.to_string(),
                source: crate::manifest::ManifestError::Inconsistent(
                    "the encrypted sidecar holds a manifest of an unencrypted backup".into(),
                ),
            });
        }
        Ok(manifest)
    }

    /// The identities to decrypt backup `id` (encrypted to `made_for`) with.
    ///
    /// # Errors
    /// `Key` naming what is missing.
    pub(crate) fn identities(&self, id: &BackupId, made_for: &[String]) -> Result<Arc<Identities>> {
        let to = if made_for.is_empty() {
            String::new()
        } else {
            format!(" to {}", made_for.join(", "))
        };
        match &self.settings.identity {
            IdentityState::Loaded(ids) => Ok(Arc::clone(ids)),
            IdentityState::None => Err(Error::Key {
                id: id.to_string(),
                reason: format!(
                    "it is encrypted{to} and no identity is configured; set backup.encryption.identity_file to the identity file of one of its recipients"
                ),
            }),
            IdentityState::Unavailable { file, reason } => Err(Error::Key {
                id: id.to_string(),
                reason: format!(
                    "it is encrypted{to} and the identity file {file} cannot be used: {reason}"
                ),
            }),
        }
    }

    /// The identities to read `manifest`'s archive with (none for an
    /// unencrypted backup).
    pub(crate) fn archive_keys(&self, manifest: &Manifest) -> Result<Option<Arc<Identities>>> {
        manifest
            .encrypted
            .then(|| self.identities(&manifest.id, &manifest.recipients))
            .transpose()
    }

    /// Deletes a backup. Pinned (pre-migration) backups need `force`.
    ///
    /// # Errors
    /// `Busy` while another operation runs (e.g. a restore); `NotFound`;
    /// `Pinned` without `force`; `Store`.
    pub async fn delete(&self, id: &BackupId, force: bool) -> Result<()> {
        let guard = self.acquire(Operation::Delete).await?;
        let result = async {
            match self.ports.store.sidecar(id).await {
                // Pinned by trigger, which the id names: an encrypted
                // backup need not be decrypted to be deleted.
                Ok(_) if id.trigger().is_pinned() && !force => {
                    return Err(Error::Pinned { id: id.to_string() });
                }
                Ok(_) | Err(Error::Manifest { .. }) => {}
                Err(e) => return Err(e),
            }
            self.ports.store.delete(id).await?;
            tracing::info!(backup_id = %id, forced = force, "deleted backup");
            Ok(())
        }
        .await;
        release(guard).await;
        result
    }

    /// Applies retention now; with `dry_run`, only plans.
    ///
    /// # Errors
    /// `Busy`, or `Store` when listing fails. Individual delete failures are
    /// logged and reported in the returned decisions' absence from the store.
    pub async fn prune(&self, dry_run: bool) -> Result<Vec<Decision>> {
        let guard = self.acquire(Operation::Prune).await?;
        let result = self.apply_retention(dry_run, &[]).await;
        release(guard).await;
        result
    }

    /// Finishes or rolls back an interrupted restore, then removes
    /// leftovers of interrupted operations. Every other mutating operation
    /// does the same right after taking the lock (see
    /// [`acquire`](Self::acquire)); this is the explicit command, which the
    /// host also runs at start-up. Returns what it did (also logged at WARN).
    ///
    /// # Errors
    /// `Busy`, `Source` when the restore journal cannot be handled, `Store`
    /// when the backup location cannot be listed.
    pub async fn recover(&self) -> Result<Vec<String>> {
        self.acquire(Operation::Recover).await?.release().await?;
        Ok(self.take_recovered())
    }

    /// What recovery did for the operations run since the last call (the
    /// CLI puts it into its `--json` output).
    pub fn take_recovered(&self) -> Vec<String> {
        let mut log = self
            .recovered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *log)
    }

    /// Takes the operation lock, then recovers what an earlier holder left
    /// (like SQLite rolling back a hot journal on the next open): an
    /// interrupted restore is finished or rolled back, and temp objects,
    /// staging, aside and scratch items and upload markers of dead
    /// processes are removed. Holding the lock proves their owner is gone.
    /// No operation ever reads the live data or the store while a restore
    /// journal exists: if recovery fails, so does the operation.
    ///
    /// # Errors
    /// `Busy`; the recovery's error (the lock is released).
    pub(crate) async fn acquire(&self, operation: Operation) -> Result<Box<dyn LockGuard>> {
        let guard = self.ports.lock.try_acquire(operation).await?;
        let recovered = async {
            let mut done = self.ports.restore_target.recover().await?;
            done.extend(self.ports.store.cleanup_incomplete().await?);
            Ok::<_, Error>(done)
        }
        .await;
        match recovered {
            Ok(done) => {
                if !done.is_empty() {
                    tracing::warn!(operation = operation.as_str(), actions = ?done,
                        "recovered what an interrupted operation left before starting");
                    self.recovered
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend(done);
                }
                Ok(guard)
            }
            Err(e) => {
                tracing::error!(operation = operation.as_str(), error = %e,
                    "recovery before the operation failed; nothing was done");
                release(guard).await;
                Err(e)
            }
        }
    }

    /// Plans retention over the published backups and, unless `dry_run`,
    /// deletes what it prunes, logging each at INFO with its reason. The
    /// backups in `protect` (the running operation's own) are never pruned.
    /// Backups dated in the future are warned about. The caller holds the
    /// lock.
    async fn apply_retention(&self, dry_run: bool, protect: &[BackupId]) -> Result<Vec<Decision>> {
        let listed = self.ports.store.list().await?;
        let now = self.ports.clock.now();
        let candidates: Vec<Candidate> = listed
            .iter()
            .filter_map(|l| match l {
                Listed::Complete(m) => Some(Candidate::from(m.as_ref())),
                Listed::Damaged { .. } => None,
            })
            .collect();
        for c in candidates.iter().filter(|c| is_future(c.timestamp, now)) {
            tracing::warn!(backup_id = %c.id, timestamp = %c.timestamp.to_rfc3339(), now = %now.to_rfc3339(),
                "backup is dated in the future (the clock jumped?); retention orders backups by creation, not by this date");
        }
        let plan = retention::plan(&candidates, now, &self.settings.retention, protect);
        if dry_run {
            return Ok(plan);
        }
        for d in plan.iter().filter(|d| d.action == Action::Prune) {
            match self.ports.store.delete(&d.id).await {
                Ok(()) => tracing::info!(backup_id = %d.id, reason = %d.reason, "pruned backup"),
                Err(e) => tracing::error!(backup_id = %d.id, error = %e, "pruning backup failed"),
            }
        }
        Ok(plan)
    }

    /// A fresh id for `trigger` now, and the creation sequence number of
    /// the new backup (one past every listed backup's). Within one second
    /// the id's sequence goes past every listed backup of that second
    /// (whatever its trigger), so ids keep creation order even after
    /// retention pruned some of them.
    async fn next_id(&self, trigger: Trigger, now: DateTime<Utc>) -> Result<(BackupId, u64)> {
        let first = BackupId::new(now, trigger, 1);
        let listed = self.ports.store.list().await?;
        let last_seq = listed
            .iter()
            .map(Listed::id)
            .filter(|id| id.timestamp() == first.timestamp())
            .map(BackupId::sequence)
            .max();
        let id = match last_seq {
            None => first,
            Some(seq) => BackupId::new(now, trigger, seq.saturating_add(1)),
        };
        let created = listed
            .iter()
            .filter_map(|l| match l {
                Listed::Complete(s) => Some(s.sequence),
                Listed::Damaged { .. } => None,
            })
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        Ok((id, created))
    }
}

/// Whether `timestamp` lies ahead of `now` by more than clock skew (a
/// minute): such a backup was dated by a clock that ran ahead.
pub fn is_future(timestamp: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    timestamp > now + chrono::TimeDelta::minutes(1)
}

/// Releases the operation lock, logging a failure (the lock then expires
/// or is found stale; the operation's own result stands).
pub(crate) async fn release(guard: Box<dyn LockGuard>) {
    if let Err(e) = guard.release().await {
        tracing::warn!(error = %e, "releasing the operation lock failed");
    }
}

/// Runs `fut` with a time bound measured by `clock`.
pub(crate) async fn with_timeout<T>(
    clock: &dyn Clock,
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let fut = std::pin::pin!(fut);
    let sleep = std::pin::pin!(clock.sleep(limit));
    match futures::future::select(fut, sleep).await {
        futures::future::Either::Left((out, _)) => out,
        futures::future::Either::Right(((), _)) => Err(Error::Timeout {
            what: what.to_owned(),
            secs: limit.as_secs(),
        }),
    }
}
