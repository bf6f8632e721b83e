//! Restore: validated, all-or-nothing, crash-safe (protocol in docs/ARCHITECTURE.md).
//!
//! 1. Read the sidecar manifest and run the compatibility rules; any error
//!    stops here, before anything is downloaded. `dry_run` stops here too
//!    and reports what would be replaced.
//! 2. Stream the backup into staging next to the live data, verifying every
//!    entry, hash and size (see `read.rs`).
//! 3. Verify the staged components (SQLite integrity and schema, YAML).
//! 4. Take the `pre-restore` safety backup of the live state (during 2-3;
//!    on a local store the swap moves the replaced items into it).
//! 5. Swap under the operation lock with a fsynced journal.
//!
//! A restore deletes no backup; retention runs with the next backup.
//!
//! Any failure before step 5 discards the staging and leaves live data
//! untouched; a failure inside step 5 is rolled back by the target.

use serde::{Deserialize, Serialize};

use super::read::read_backup;
use super::{BackupService, CreateOptions};
use crate::compat::{self, CompatReport};
use crate::error::{Error, Result};
use crate::id::{BackupId, Component, Trigger};
use crate::manifest::Manifest;
use crate::ports::{Kept, Operation, Staging};
use crate::status::EventKind;

/// Options of [`BackupService::restore`].
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Must be true, or nothing happens (`NotConfirmed`).
    pub confirm: bool,
    /// Only check and report; touch nothing (needs no confirmation).
    pub dry_run: bool,
    /// Components to restore; all in the backup when `None`.
    pub components: Option<Vec<Component>>,
}

/// One component a restore replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    /// The component.
    pub component: Component,
    /// Its live location.
    pub live_path: String,
    /// Files restored into it.
    pub files: u64,
    /// Bytes restored into it.
    pub bytes: u64,
}

/// What a restore did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The backup restored.
    pub id: BackupId,
    /// Whether this was only a dry run.
    pub dry_run: bool,
    /// What is (or would be) replaced.
    pub components: Vec<Replaced>,
    /// Total bytes restored.
    pub bytes: u64,
    /// Compatibility findings.
    pub compatibility: CompatReport,
    /// Warnings, as text.
    pub warnings: Vec<String>,
    /// The safety backup of the state before the restore.
    pub safety_backup_id: Option<BackupId>,
    /// Where that safety backup's files are on this machine, when it is
    /// the replaced items moved into a directory (with S3: in the local
    /// pool at `backup.path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_backup_path: Option<String>,
    /// The host must restart (or reopen its pools) after a restore.
    pub restart_required: bool,
}

impl BackupService {
    /// Restores a backup; see the module docs for the protocol.
    ///
    /// # Errors
    /// `NotFound`; `Manifest` for a damaged sidecar; `Incompatible` with
    /// every finding; `NotConfirmed` without `confirm`; `Busy`; `Integrity`
    /// when the stored data does not match the manifest; `Source`/`Store`
    /// for I/O failures. In every case the live data is as it was.
    pub async fn restore(&self, id: &BackupId, options: RestoreOptions) -> Result<RestoreReport> {
        let (manifest, components, mut report) = self.plan(id, &options).await?;
        if options.dry_run {
            // Everything a restore's staging would check, in a scratch
            // place: a dry run that passes means the restore would.
            self.read_and_check(&manifest).await?;
            return Ok(report);
        }
        if !options.confirm {
            return Err(Error::NotConfirmed {
                operation: "restore".into(),
                id: id.to_string(),
            });
        }
        let started = std::time::Instant::now();
        let guard = self.acquire(Operation::Restore).await?;
        let result = self
            .restore_locked(&manifest, &components, &mut report)
            .await;
        super::release(guard).await;
        let event = match &result {
            Ok(()) => self.event(EventKind::RestoreSucceeded, Some(&manifest), started, None),
            Err(e) => self.event(EventKind::RestoreFailed, Some(&manifest), started, Some(e)),
        };
        self.ports.notifier.notify(&event).await;
        match &result {
            Ok(()) => {
                tracing::info!(backup_id = %id, safety_backup = ?report.safety_backup_id.as_ref().map(ToString::to_string),
                "restore complete; restart the app")
            }
            Err(e) => {
                tracing::error!(backup_id = %id, error = %e, "restore failed; live data is unchanged")
            }
        }
        result.map(|()| report)
    }

    /// What a restore would replace, after the compatibility check, without
    /// reading the backup's content (a dry run also checks that): for
    /// showing the plan before asking for confirmation.
    ///
    /// # Errors
    /// `NotFound`; `Manifest`; `Incompatible` with every finding; `Store`.
    pub async fn restore_plan(
        &self,
        id: &BackupId,
        options: &RestoreOptions,
    ) -> Result<RestoreReport> {
        let (_, _, mut report) = self.plan(id, options).await?;
        report.dry_run = true;
        report.restart_required = false;
        Ok(report)
    }

    async fn plan(
        &self,
        id: &BackupId,
        options: &RestoreOptions,
    ) -> Result<(Manifest, Vec<Component>, RestoreReport)> {
        let target = self.ports.restore_target.as_ref();
        let manifest = self.read_manifest(id).await?;
        if manifest.is_archive() {
            manifest
                .require_archive_info()
                .map_err(|source| Error::Manifest {
                    id: id.to_string(),
                    source,
                })?;
        }
        let components = match &options.components {
            Some(list) => {
                let mut list = list.clone();
                list.sort();
                list.dedup();
                list
            }
            None => manifest.components.clone(),
        };
        let mut report_compat = compat::check(&manifest, &self.app, options.components.as_deref());
        let restores_db = components.contains(&crate::id::Component::Persistence);
        if self.app.supported_schema.is_none() && restores_db {
            let others_newest = self
                .ports
                .store
                .list()
                .await?
                .iter()
                .filter_map(|l| match l {
                    crate::ports::Listed::Complete(s) if s.id != *id => s.db_schema_version,
                    _ => None,
                })
                .max();
            report_compat
                .errors
                .extend(compat::check_unknown_schema(&manifest, others_newest));
        }
        if !report_compat.is_compatible() {
            tracing::error!(backup_id = %id, findings = ?report_compat.errors, "restore refused: incompatible backup");
            return Err(Error::Incompatible {
                id: id.to_string(),
                report: report_compat,
            });
        }
        let mut report = RestoreReport {
            id: id.clone(),
            dry_run: options.dry_run,
            components: components
                .iter()
                .map(|c| {
                    let files = manifest
                        .files
                        .iter()
                        .filter(|f| f.path.component() == Some(*c));
                    Replaced {
                        component: *c,
                        live_path: target.live_path(*c),
                        files: files.clone().count() as u64,
                        bytes: files.map(|f| f.size).sum(),
                    }
                })
                .collect(),
            bytes: 0,
            warnings: report_compat
                .warnings
                .iter()
                .map(ToString::to_string)
                .collect(),
            compatibility: report_compat,
            safety_backup_id: None,
            safety_backup_path: None,
            restart_required: !options.dry_run,
        };
        report.bytes = report.components.iter().map(|c| c.bytes).sum();
        for c in &manifest.absent {
            report.warnings.push(format!(
                "{c} was absent when {id} was taken: the live {c} at {} is left as it is",
                target.live_path(*c)
            ));
        }
        Ok((manifest, components, report))
    }

    async fn restore_locked(
        &self,
        manifest: &Manifest,
        components: &[Component],
        report: &mut RestoreReport,
    ) -> Result<()> {
        let target = self.ports.restore_target.as_ref();
        // Learn early that a writer has the data open, before any download.
        target.check_not_in_use(components).await?;
        let mut staging = target.stage(manifest, components).await?;
        // The safety backup covers what this restore replaces and exists.
        let mut present = Vec::new();
        for c in components {
            if target.is_present(*c).await {
                present.push(*c);
            }
        }
        let started = std::time::Instant::now();
        // The safety backup is taken while the backup stages: both then
        // overlap instead of adding up (a local one hashes the live files
        // while the download is decompressed and written).
        let staged = async {
            let mut sink = super::verify::Reporting::new(
                staging.as_mut(),
                self.progress.clone(),
                manifest,
                super::Phase::Restore,
            );
            read_backup(
                self.ports.store.as_ref(),
                manifest,
                self.archive_keys(manifest)?,
                Some(components),
                &mut sink,
            )
            .await?;
            sink.done();
            let read = started.elapsed();
            staging.verify().await?;
            tracing::info!(backup_id = %manifest.id, read_ms = read.as_millis() as u64,
                checks_ms = (started.elapsed() - read).as_millis() as u64, "backup staged and checked");
            Ok(())
        };
        let safety = async {
            if present.is_empty() {
                None
            } else {
                Some(self.safety_backup(&present).await)
            }
        };
        let (staged, safety) = futures::join!(staged, safety);
        if let Err(e) = staged {
            discard(staging, &manifest.id).await;
            if let Some(Ok(s)) = safety {
                self.drop_safety(Some(&s)).await;
            }
            return Err(e);
        }
        if present.is_empty() {
            report
                .warnings
                .push("no live data to replace: no safety backup was needed".into());
        }
        let safety = match safety.transpose() {
            Ok(s) => {
                if let Some(s) = &s {
                    tracing::info!(backup_id = %manifest.id, safety_backup = %s.id(),
                        elapsed_ms = started.elapsed().as_millis() as u64, "safety backup taken; swapping");
                }
                s
            }
            Err(e) => {
                discard(staging, &manifest.id).await;
                return Err(e);
            }
        };
        // Again right before the swap: the writer may have started since.
        if let Err(e) = target.check_not_in_use(components).await {
            discard(staging, &manifest.id).await;
            self.drop_safety(safety.as_ref()).await;
            return Err(e);
        }
        let kept = match &safety {
            Some(Safety::Moved(_, kept)) => Some(kept.clone()),
            _ => None,
        };
        if let Err(e) = staging.commit(kept.as_ref()).await {
            // The swap rolled itself back; make sure (we hold the lock)
            // before dropping the safety backup of a state still live.
            match target.recover().await {
                Ok(_) => self.drop_safety(safety.as_ref()).await,
                Err(r) => tracing::error!(backup_id = %manifest.id, error = %r,
                    "recovering the failed swap failed; the safety backup is kept"),
            }
            return Err(e);
        }
        tracing::info!(backup_id = %manifest.id, elapsed_ms = started.elapsed().as_millis() as u64,
            "swap committed");
        let safety = match safety {
            Some(Safety::Moved(m, kept)) => match self.ports.store.publish(&m).await {
                // Published only now: the swap has just moved the replaced
                // live items into it.
                Ok(()) => {
                    report.safety_backup_path = Some(kept.dir.display().to_string());
                    Some(m.id)
                }
                Err(e) => {
                    tracing::error!(backup_id = %manifest.id, safety_backup = %m.id, error = %e,
                        "publishing the safety backup failed; the previous state is not kept");
                    report.warnings.push(format!(
                        "the safety backup {} could not be published: {e}",
                        m.id
                    ));
                    let _ = self.ports.store.discard(&m.id).await;
                    None
                }
            },
            Some(Safety::Published(id)) => Some(id),
            None => None,
        };
        // A restore deletes nothing: the pool of safety backups is trimmed
        // by the next backup's retention (or `prune`). Deleting the oldest
        // safety backup's thousands of files took a quarter of a restore
        // here (bench/run), time the app stays down for no one's benefit.
        report.safety_backup_id = safety;
        Ok(())
    }

    /// The pre-restore safety backup of the live `components`: where the
    /// store is a local directory and the target can, a directory-form
    /// backup the swap moves the replaced live items into (no copy, no
    /// compression; published after the swap); else a regular backup.
    async fn safety_backup(&self, components: &[Component]) -> Result<Safety> {
        match self.moved_safety(components).await {
            Ok(Some((m, kept))) => return Ok(Safety::Moved(Box::new(m), kept)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "a safety backup by moving the live items failed; taking a regular one");
            }
        }
        // The app is stopped (no process holds the live files) and we hold
        // the lock: the sources may be read in place (no `VACUUM INTO` of
        // the whole database into a scratch copy first). It is compressed
        // at the fastest level: the app stays down while it is taken, and
        // it is kept only until the safety pool is trimmed.
        let options = CreateOptions {
            components: Some(components.to_vec()),
            settled: true,
            compression_level: Some(crate::compress::FASTEST_LEVEL),
            ..CreateOptions::default()
        };
        self.create_locked(Trigger::PreRestore, &options)
            .await
            .map(|m| Safety::Published(m.id))
    }

    /// The safety backup the swap completes (its manifest written, the
    /// live items it names moved in by the swap), unpublished; `None` when
    /// the store or the target cannot make one.
    async fn moved_safety(&self, components: &[Component]) -> Result<Option<(Manifest, Kept)>> {
        let store = self.ports.store.as_ref();
        let timestamp = self.ports.clock.now();
        let (id, sequence) = self.next_id(Trigger::PreRestore, timestamp).await?;
        // Moved live files are a directory-form backup in the clear: never
        // when backups are to be encrypted.
        let encrypting = !matches!(self.settings.encrypt_to, Ok(None));
        let Some(dir) = store.local_dir(&id).filter(|_| !encrypting) else {
            return Ok(None);
        };
        store.discard(&id).await?;
        let built = async {
            let Some(p) = self.ports.restore_target.preserve(components, &dir).await? else {
                return Ok(None);
            };
            let kept = Kept {
                dir: dir.clone(),
                components: p.moved.clone(),
            };
            let options = CreateOptions {
                components: Some(components.to_vec()),
                ..CreateOptions::default()
            };
            let produced = super::create::Produced {
                files: p.files,
                dirs: p.dirs,
                symlinks: p.symlinks,
                db_schema_version: p.db_schema_version,
                absent: Vec::new(),
            };
            let mut m = self.manifest(&id, sequence, timestamp, produced, &options, None);
            m.compression = crate::config::Compression::None;
            m.validate().map_err(|source| Error::Manifest {
                id: id.to_string(),
                source,
            })?;
            self.put_inner_manifest(&m).await?;
            Ok(Some((m, kept)))
        }
        .await;
        if !matches!(built, Ok(Some(_)))
            && let Err(e) = store.discard(&id).await
        {
            tracing::warn!(safety_backup = %id, error = %e, "removing the unfinished safety backup failed; the next recover removes it");
        }
        built
    }

    /// Deletes the safety backup of a restore that did not happen: the
    /// live data it holds is still live, and it must not take the place of
    /// a backup the user needs.
    async fn drop_safety(&self, safety: Option<&Safety>) {
        let id = match safety {
            None => return,
            // Never published, and the swap did not happen: only copies
            // and its manifest are in it.
            Some(Safety::Moved(m, _)) => {
                if let Err(e) = self.ports.store.discard(&m.id).await {
                    tracing::warn!(safety_backup = %m.id, error = %e, "removing the unneeded safety backup failed; the next recover removes it");
                }
                return;
            }
            Some(Safety::Published(id)) => id,
        };
        match self.ports.store.delete(id).await {
            Ok(()) => {
                tracing::info!(safety_backup = %id, "deleted the safety backup of the restore that did not happen")
            }
            Err(e) => {
                tracing::warn!(safety_backup = %id, error = %e, "deleting the unneeded safety backup failed")
            }
        }
    }
}

/// The safety backup of a restore.
enum Safety {
    /// Completed by the swap (which moves the replaced items into it);
    /// published once the swap committed.
    Moved(Box<Manifest>, Kept),
    /// A regular backup, already published.
    Published(BackupId),
}

impl Safety {
    fn id(&self) -> &BackupId {
        match self {
            Safety::Moved(m, _) => &m.id,
            Safety::Published(id) => id,
        }
    }
}

async fn discard(staging: Box<dyn Staging>, id: &BackupId) {
    if let Err(e) = staging.discard().await {
        tracing::warn!(backup_id = %id, error = %e, "removing the staging area failed; the next recover removes it");
    }
}
