//! Operational status: events for notifications, the small status record
//! kept in the store (so that the CLI on the same store sees what `serve`
//! saw), and the pure evaluation of `ok` / `failing` / `overdue` /
//! `disabled`.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::id::{BackupId, Trigger};
use crate::manifest::Summary;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// A backup was published.
    #[serde(rename = "backup.succeeded")]
    BackupSucceeded,
    /// A backup failed (nothing was published).
    #[serde(rename = "backup.failed")]
    BackupFailed,
    /// A restore swapped the backup in.
    #[serde(rename = "restore.succeeded")]
    RestoreSucceeded,
    /// A confirmed restore did not happen (live data unchanged).
    #[serde(rename = "restore.failed")]
    RestoreFailed,
    /// A backup failed verification.
    #[serde(rename = "verify.failed")]
    VerifyFailed,
    /// No backup succeeded for twice the schedule.
    #[serde(rename = "backup.overdue")]
    BackupOverdue,
}

impl EventKind {
    /// The name used in config and JSON, e.g. `backup.failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BackupSucceeded => "backup.succeeded",
            EventKind::BackupFailed => "backup.failed",
            EventKind::RestoreSucceeded => "restore.succeeded",
            EventKind::RestoreFailed => "restore.failed",
            EventKind::VerifyFailed => "verify.failed",
            EventKind::BackupOverdue => "backup.overdue",
        }
    }
}

/// One event, as sent to webhooks and notify commands (the notifier adds
/// `host`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    pub event: EventKind,
    /// The backup concerned, if any.
    pub backup_id: Option<BackupId>,
    /// The trigger of the backup concerned, if any.
    pub trigger: Option<Trigger>,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// How long the operation took.
    pub duration_secs: f64,
    /// Size of the backup's data, for successes.
    pub size_bytes: Option<u64>,
    /// What went wrong, for failures.
    pub error: Option<String>,
}

/// The last failed backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// When it failed.
    pub timestamp: DateTime<Utc>,
    /// Its trigger.
    pub trigger: Trigger,
    /// Why.
    pub error: String,
    /// The creation sequence the failed backup would have had (one past
    /// every backup listed then); 0 when unknown.
    #[serde(default)]
    pub sequence: u64,
}

/// The last verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// When it ran.
    pub timestamp: DateTime<Utc>,
    /// The backup verified.
    pub backup_id: BackupId,
    /// Whether it would restore.
    pub ok: bool,
    /// The problem found, if any.
    pub problem: Option<String>,
}

/// The status record kept in the store (`_status.json`), written under the
/// operation lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// The last failed backup (kept after later successes: the status
    /// compares times).
    #[serde(default)]
    pub last_failure: Option<Failure>,
    /// The last verification.
    #[serde(default)]
    pub last_verification: Option<Verification>,
    /// The last success for which `backup.overdue` was sent (once per
    /// overdue period).
    #[serde(default)]
    pub overdue_notified_for: Option<BackupId>,
}

/// `ok`, `failing`, `overdue` or `disabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The last attempt succeeded and it is recent.
    Ok,
    /// The last attempt failed.
    Failing,
    /// No success for twice the schedule.
    Overdue,
    /// `backup.enabled` is false.
    Disabled,
}

impl Health {
    /// For the `synthorg_backup_status` gauge: 0 ok, 1 failing, 2 overdue, 3 disabled.
    pub fn code(self) -> u8 {
        match self {
            Health::Ok => 0,
            Health::Failing => 1,
            Health::Overdue => 2,
            Health::Disabled => 3,
        }
    }
}

/// The last successful backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Success {
    /// Its id.
    pub id: BackupId,
    /// When it was taken.
    pub timestamp: DateTime<Utc>,
    /// Its data size.
    pub size_bytes: u64,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The verdict.
    pub status: Health,
    /// The newest complete backup.
    pub last_success: Option<Success>,
    /// The last failed backup attempt.
    pub last_failure: Option<Failure>,
    /// When the next scheduled backup is due (last success + schedule).
    pub next_scheduled: Option<DateTime<Utc>>,
    /// The last verification.
    pub last_verification: Option<Verification>,
    /// The schedule, in seconds.
    pub schedule_secs: u64,
    /// Problems to fix before they matter, e.g. an identity that cannot
    /// decrypt new backups or the newest one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Evaluates the status: `disabled` when backups are off; `failing` when
/// the last failure is newer than the last success; `overdue` when no
/// backup succeeded for twice the schedule (or none ever did); else `ok`.
/// `newest` is the newest complete backup.
pub fn evaluate(
    record: &StatusRecord,
    newest: Option<&Summary>,
    now: DateTime<Utc>,
    enabled: bool,
    schedule: std::time::Duration,
) -> StatusReport {
    let schedule_secs = schedule.as_secs();
    let schedule = TimeDelta::from_std(schedule).unwrap_or(TimeDelta::MAX / 4);
    let last_success = newest.map(|s| Success {
        id: s.id.clone(),
        timestamp: s.timestamp,
        size_bytes: s.size_bytes,
    });
    // By creation order where known, so that a clock that jumped cannot
    // hide a failure behind a success dated in the future.
    let failing = match (&record.last_failure, newest) {
        (Some(f), Some(s)) if f.sequence > 0 && s.sequence > 0 => f.sequence > s.sequence,
        (Some(f), Some(s)) => f.timestamp > s.timestamp,
        (Some(_), None) => true,
        (None, _) => false,
    };
    let overdue = last_success
        .as_ref()
        .is_none_or(|s| now.signed_duration_since(s.timestamp) > schedule * 2);
    let status = if !enabled {
        Health::Disabled
    } else if failing {
        Health::Failing
    } else if overdue {
        Health::Overdue
    } else {
        Health::Ok
    };
    StatusReport {
        status,
        next_scheduled: enabled
            .then(|| last_success.as_ref().map(|s| s.timestamp + schedule))
            .flatten(),
        last_success,
        last_failure: record.last_failure.clone(),
        last_verification: record.last_verification.clone(),
        schedule_secs,
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(secs: i64) -> Summary {
        let id = BackupId::new(
            DateTime::from_timestamp(secs, 0).unwrap(),
            Trigger::Scheduled,
            1,
        );
        Summary::from(&crate::conformance::manifest_for(&id, Some(b"a"), b"x"))
    }

    fn failure(secs: i64) -> Failure {
        Failure {
            timestamp: DateTime::from_timestamp(secs, 0).unwrap(),
            trigger: Trigger::Scheduled,
            error: "disk full".into(),
            sequence: 0,
        }
    }

    #[test]
    fn status_is_failing_then_ok_then_overdue_then_disabled() {
        let t = 1_800_000_000;
        let at = |s| DateTime::from_timestamp(s, 0).unwrap();
        let s = summary(t);
        let six = std::time::Duration::from_secs(6 * 3600);
        let failed_later = StatusRecord {
            last_failure: Some(failure(t + 60)),
            ..StatusRecord::default()
        };
        assert_eq!(
            evaluate(&failed_later, Some(&s), at(t + 120), true, six).status,
            Health::Failing
        );
        let failed_before = StatusRecord {
            last_failure: Some(failure(t - 60)),
            ..StatusRecord::default()
        };
        let ok = evaluate(&failed_before, Some(&s), at(t + 120), true, six);
        assert_eq!(ok.status, Health::Ok);
        assert_eq!(ok.next_scheduled, Some(at(t + 6 * 3600)));
        let late = evaluate(&failed_before, Some(&s), at(t + 12 * 3600 + 1), true, six);
        assert_eq!(late.status, Health::Overdue);
        assert_eq!(
            evaluate(&StatusRecord::default(), None, at(t), true, six).status,
            Health::Overdue
        );
        assert_eq!(
            evaluate(&failed_later, Some(&s), at(t), false, six).status,
            Health::Disabled
        );
        assert_eq!(Health::Failing.code(), 1);
        // Creation order wins over clocks: a failure after a success dated
        // in the future is still a failure.
        let mut future = summary(t + 86_400);
        future.sequence = 4;
        let after = StatusRecord {
            last_failure: Some(Failure {
                sequence: 5,
                ..failure(t)
            }),
            ..StatusRecord::default()
        };
        assert_eq!(
            evaluate(&after, Some(&future), at(t), true, six).status,
            Health::Failing
        );
    }

    #[test]
    fn events_serialize_with_their_documented_names() {
        let e = Event {
            event: EventKind::BackupFailed,
            backup_id: None,
            trigger: Some(Trigger::Scheduled),
            timestamp: DateTime::from_timestamp(0, 0).unwrap(),
            duration_secs: 1.5,
            size_bytes: None,
            error: Some("x".into()),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "backup.failed");
        assert_eq!(v["trigger"], "scheduled");
        for name in crate::config::NOTIFY_EVENTS {
            let kind: EventKind = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(kind.as_str(), name);
        }
    }
}
