//! Status and events: the status record in the store, `status()`, and the
//! events handed to the notifier.

use std::time::Instant;

use super::BackupService;
use crate::error::{Error, Result};
use crate::id::{BackupId, Trigger};
use crate::manifest::{Manifest, Summary};
use crate::ports::{Listed, Operation};
use crate::status::{
    Event, EventKind, Failure, StatusRecord, StatusReport, Verification, evaluate,
};

impl BackupService {
    /// An event about `manifest`'s backup (or none) after an operation
    /// that started at `started`.
    pub(crate) fn event(
        &self,
        kind: EventKind,
        manifest: Option<&Manifest>,
        started: Instant,
        error: Option<&Error>,
    ) -> Event {
        Event {
            event: kind,
            backup_id: manifest.map(|m| m.id.clone()),
            trigger: manifest.map(|m| m.trigger),
            timestamp: self.ports.clock.now(),
            duration_secs: started.elapsed().as_secs_f64(),
            size_bytes: manifest.map(|m| m.size_bytes),
            error: error.map(ToString::to_string),
        }
    }

    /// The status record of the store; an unreadable one counts as empty
    /// (logged): status is advice, never a reason to fail.
    pub(crate) async fn read_record(&self) -> StatusRecord {
        match self.ports.store.read_status().await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the status record is unreadable; starting a new one");
                StatusRecord::default()
            }),
            Ok(None) => StatusRecord::default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the status record");
                StatusRecord::default()
            }
        }
    }

    /// Changes the status record (the caller holds the lock); failures are
    /// logged.
    pub(crate) async fn update_record(&self, change: impl FnOnce(&mut StatusRecord)) {
        let mut record = self.read_record().await;
        change(&mut record);
        let written = match serde_json::to_vec_pretty(&record) {
            Ok(bytes) => self.ports.store.write_status(bytes).await,
            Err(e) => Err(Error::Internal(format!("status record: {e}"))),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write the status record");
        }
    }

    /// Records a failed backup in the status record (under the lock).
    pub(crate) async fn record_failure(&self, trigger: Trigger, sequence: u64, error: &Error) {
        let failure = Failure {
            timestamp: self.ports.clock.now(),
            trigger,
            error: error.to_string(),
            sequence,
        };
        self.update_record(|r| r.last_failure = Some(failure)).await;
    }

    /// The status: `ok`, `failing`, `overdue` or `disabled` (`enabled`:
    /// `backup.enabled`), with the last success, failure and verification.
    ///
    /// # Errors
    /// `Store` when the backups cannot be listed.
    pub async fn status(
        &self,
        enabled: bool,
        schedule: std::time::Duration,
    ) -> Result<StatusReport> {
        let listed = self.ports.store.list().await?;
        let record = self.read_record().await;
        let newest = newest_complete(&listed);
        let mut report = evaluate(&record, newest, self.ports.clock.now(), enabled, schedule);
        report.warnings = self.key_warnings(newest).await;
        Ok(report)
    }

    /// [`key_warnings`](Self::key_warnings) about the newest complete
    /// backup in the store (none listed: about the configuration only).
    pub async fn check_keys(&self) -> Vec<String> {
        let listed = self.ports.store.list().await.unwrap_or_default();
        self.key_warnings(newest_complete(&listed)).await
    }

    /// Problems with the encryption keys, now rather than on the day of a
    /// restore: recipients that are invalid or that the configured
    /// identity cannot decrypt, an identity that cannot be loaded, and
    /// (with an identity configured) a newest backup it cannot decrypt.
    pub async fn key_warnings(&self, newest: Option<&Summary>) -> Vec<String> {
        let recipients = match &self.settings.encrypt_to {
            Ok(r) => r.as_ref(),
            Err((key, reason)) => {
                return vec![format!(
                    "{key} is invalid ({reason}): backups fail until it is fixed"
                )];
            }
        };
        let mut out = crate::crypt::key_warnings(&self.settings.identity, recipients);
        if let (crate::crypt::IdentityState::Loaded(_), Some(s)) = (&self.settings.identity, newest)
            && s.encrypted
            && let Err(e @ (Error::Key { .. } | Error::Manifest { .. })) =
                self.read_manifest(&s.id).await
        {
            out.push(format!(
                "the newest backup cannot be opened on this host: {e}"
            ));
        }
        for w in &out {
            tracing::warn!(warning = %w, "encryption keys");
        }
        out
    }

    /// Verifies the newest complete backup (the runtime's scheduled
    /// verification), records the result and sends `verify.failed` when it
    /// would not restore. `None` when there is no backup. The lock is held
    /// only to record the result.
    ///
    /// # Errors
    /// `Store` when the store cannot be read.
    pub async fn verify_newest(&self) -> Result<Option<Verification>> {
        let listed = self.ports.store.list().await?;
        let Some(id) = newest_complete(&listed).map(|s| s.id.clone()) else {
            return Ok(None);
        };
        let report = self.verify(&id).await?;
        let verification = Verification {
            timestamp: self.ports.clock.now(),
            backup_id: id,
            ok: report.ok,
            problem: report.problem,
        };
        self.record_verification(&verification).await;
        Ok(Some(verification))
    }

    /// Records a verification in the status record, taking the lock
    /// briefly (when another operation holds it, the record is left for
    /// the next verification; the result is still returned and logged).
    pub(crate) async fn record_verification(&self, verification: &Verification) {
        match self.ports.lock.try_acquire(Operation::Prune).await {
            Ok(guard) => {
                let v = verification.clone();
                self.update_record(|r| r.last_verification = Some(v)).await;
                super::release(guard).await;
            }
            Err(e) => tracing::warn!(error = %e, "verification not recorded in the status record"),
        }
    }

    /// Sends `backup.overdue` once per overdue period: when `report` (from
    /// [`status`](Self::status)) is overdue and no notice was sent since
    /// the last success. Returns whether it sent one.
    pub async fn notify_if_overdue(&self, report: &StatusReport) -> bool {
        if report.status != crate::status::Health::Overdue {
            return false;
        }
        let last = report.last_success.as_ref().map(|s| s.id.clone());
        let record = self.read_record().await;
        if record.overdue_notified_for.is_some() && record.overdue_notified_for == last {
            return false;
        }
        let Ok(guard) = self.ports.lock.try_acquire(Operation::Prune).await else {
            return false;
        };
        self.update_record(|r| r.overdue_notified_for = last.clone())
            .await;
        super::release(guard).await;
        let event = Event {
            event: EventKind::BackupOverdue,
            backup_id: last,
            trigger: None,
            timestamp: self.ports.clock.now(),
            duration_secs: 0.0,
            size_bytes: report.last_success.as_ref().map(|s| s.size_bytes),
            error: Some(format!(
                "no backup succeeded for more than {} s (twice the schedule)",
                2 * report.schedule_secs
            )),
        };
        self.ports.notifier.notify(&event).await;
        true
    }

    /// Sends `verify.failed` for a verification that found a problem.
    pub(crate) async fn notify_verify_failed(
        &self,
        id: &BackupId,
        problem: &str,
        started: Instant,
    ) {
        let event = Event {
            event: EventKind::VerifyFailed,
            backup_id: Some(id.clone()),
            trigger: Some(id.trigger()),
            timestamp: self.ports.clock.now(),
            duration_secs: started.elapsed().as_secs_f64(),
            size_bytes: None,
            error: Some(problem.to_owned()),
        };
        self.ports.notifier.notify(&event).await;
    }
}

/// The newest complete backup, by creation order.
fn newest_complete(listed: &[Listed]) -> Option<&crate::manifest::Summary> {
    listed
        .iter()
        .filter_map(Listed::succeeded)
        .max_by_key(|s| (s.sequence, s.timestamp, s.id.clone()))
}
