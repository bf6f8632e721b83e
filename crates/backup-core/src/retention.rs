//! The retention planner: a pure function from (backups, now, policy) to a
//! keep/prune decision with a reason for every backup.
//!
//! "Newest" means created last in this store: backups are ordered by their
//! creation sequence (manifest 1.1), then by timestamp (older backups have
//! no sequence and rank below every backup that has one). A clock that
//! jumped forward and back cannot make a fresh backup look older than one
//! dated in the future.
//!
//! Rules, in order:
//! 1. `pre-migration` backups are pinned: always kept, and they take no
//!    `max_count` slot. Only an explicit, forced delete removes them.
//! 2. The newest backup is always kept, and so is every backup the caller
//!    protects: the one the running backup just created (a restore runs no
//!    retention; the next backup trims the safety pool).
//! 3. `pre-restore` safety backups form their own pool: ranked newest first
//!    among themselves, kept while the rank is below `keep_pre_restore` and
//!    they are at most `max_age_days` old. They never take `max_count`
//!    slots, so failed or repeated restores cannot push out real backups.
//! 4. Every other backup is ranked newest first. It is kept while its rank is
//!    below `max_count` and it is at most `max_age_days` old (age from the
//!    manifest timestamp; a backup dated in the future is not old).
//! 5. A backup that rules 3–4 would prune is still kept when it is the newest
//!    of one of the last `keep_daily` days / `keep_weekly` ISO weeks /
//!    `keep_monthly` months that have backups (restic-style; off by default),
//!    or when it is the newest `pre-restore` safety backup, the way back from
//!    the last restore.

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Datelike, TimeDelta, Utc};

use crate::config::RetentionConfig;
use crate::id::{BackupId, Trigger};
use crate::manifest::Manifest;

/// What to keep, from `backup.retention`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Most unpinned backups kept by rule 3.
    pub max_count: u32,
    /// Oldest backup kept by rule 3, in days.
    pub max_age_days: u32,
    /// Newest backup of each of the last N days with backups.
    pub keep_daily: Option<u32>,
    /// Newest backup of each of the last N ISO weeks with backups.
    pub keep_weekly: Option<u32>,
    /// Newest backup of each of the last N months with backups.
    pub keep_monthly: Option<u32>,
    /// Most `pre-restore` safety backups kept (their own pool).
    pub keep_pre_restore: u32,
}

impl From<&RetentionConfig> for RetentionPolicy {
    fn from(c: &RetentionConfig) -> Self {
        RetentionPolicy {
            max_count: c.max_count,
            max_age_days: c.max_age_days,
            keep_daily: c.keep_daily,
            keep_weekly: c.keep_weekly,
            keep_monthly: c.keep_monthly,
            keep_pre_restore: c.keep_pre_restore,
        }
    }
}

/// What the planner needs to know of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The backup.
    pub id: BackupId,
    /// Its manifest timestamp.
    pub timestamp: DateTime<Utc>,
    /// Its trigger.
    pub trigger: Trigger,
    /// Its creation sequence in the store (0 when unknown).
    pub sequence: u64,
}

impl Candidate {
    /// Newest first: by creation sequence, then timestamp, then id.
    fn newer_first(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
        (b.sequence, b.timestamp, &b.id).cmp(&(a.sequence, a.timestamp, &a.id))
    }
}

impl From<&crate::manifest::Summary> for Candidate {
    fn from(m: &crate::manifest::Summary) -> Self {
        Candidate {
            id: m.id.clone(),
            timestamp: m.timestamp,
            trigger: m.trigger,
            sequence: m.sequence,
        }
    }
}

impl From<&Manifest> for Candidate {
    fn from(m: &Manifest) -> Self {
        Candidate {
            id: m.id.clone(),
            timestamp: m.timestamp,
            trigger: m.trigger,
            sequence: m.sequence,
        }
    }
}

/// Keep or prune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave the backup.
    Keep,
    /// Delete the backup.
    Prune,
}

/// Why a backup is kept or pruned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Rule 1.
    Pinned,
    /// Rule 2.
    Newest,
    /// Rule 2: protected by the running operation (the backup it created).
    Protected,
    /// Rule 3: `rank` (0 = newest) is below `max_count` and the age is within bounds.
    WithinLimits {
        /// Position among unpinned backups, newest first.
        rank: u32,
    },
    /// Rule 4: newest of its day.
    KeepDaily,
    /// Rule 4: newest of its ISO week.
    KeepWeekly,
    /// Rule 4: newest of its month.
    KeepMonthly,
    /// Rule 4: the newest `pre-restore` safety backup.
    NewestSafety,
    /// Pruned: `rank` is at or beyond `max_count`.
    ExceedsMaxCount {
        /// Position among unpinned backups, newest first.
        rank: u32,
        /// The configured limit.
        max_count: u32,
    },
    /// Pruned: a safety backup whose `rank` among `pre-restore` backups is
    /// at or beyond `keep_pre_restore`.
    ExceedsSafetyCount {
        /// Position among `pre-restore` backups, newest first.
        rank: u32,
        /// The configured limit.
        keep: u32,
    },
    /// Pruned: older than `max_age_days`.
    TooOld {
        /// Age in whole days.
        age_days: i64,
        /// The configured limit.
        max_age_days: u32,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Pinned => f.write_str("pinned (pre-migration)"),
            Reason::Newest => f.write_str("newest backup"),
            Reason::Protected => f.write_str("protected by the running operation"),
            Reason::WithinLimits { rank } => write!(f, "within limits (#{} newest)", rank + 1),
            Reason::KeepDaily => f.write_str("newest of its day (keep_daily)"),
            Reason::KeepWeekly => f.write_str("newest of its week (keep_weekly)"),
            Reason::KeepMonthly => f.write_str("newest of its month (keep_monthly)"),
            Reason::NewestSafety => f.write_str("newest pre-restore safety backup"),
            Reason::ExceedsMaxCount { rank, max_count } => {
                write!(f, "exceeds max_count {max_count} (#{} newest)", rank + 1)
            }
            Reason::ExceedsSafetyCount { rank, keep } => write!(
                f,
                "exceeds keep_pre_restore {keep} (#{} newest safety backup)",
                rank + 1
            ),
            Reason::TooOld {
                age_days,
                max_age_days,
            } => write!(
                f,
                "{age_days} days old, older than max_age_days {max_age_days}"
            ),
        }
    }
}

/// The decision for one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The backup.
    pub id: BackupId,
    /// Keep or prune.
    pub action: Action,
    /// Why.
    pub reason: Reason,
}

/// Decides, for every backup, whether to keep or prune it; one decision per
/// input, newest first. `protect` lists backups that must stay whatever
/// the limits say (the running operation's own). Pure: same inputs, same
/// plan.
pub fn plan(
    backups: &[Candidate],
    now: DateTime<Utc>,
    policy: &RetentionPolicy,
    protect: &[BackupId],
) -> Vec<Decision> {
    let mut sorted: Vec<&Candidate> = backups.iter().collect();
    sorted.sort_by(|a, b| Candidate::newer_first(a, b));

    let newest = sorted.first().map(|c| &c.id);
    let newest_safety = sorted
        .iter()
        .find(|c| c.trigger == Trigger::PreRestore)
        .map(|c| &c.id);
    let regular: Vec<&Candidate> = sorted
        .iter()
        .copied()
        .filter(|c| !c.trigger.is_pinned() && c.trigger != Trigger::PreRestore)
        .collect();
    let daily = newest_per_bucket(&regular, policy.keep_daily, |t| (t.year(), t.ordinal(), 0));
    let weekly = newest_per_bucket(&regular, policy.keep_weekly, |t| {
        let w = t.iso_week();
        (w.year(), w.week(), 0)
    });
    let monthly = newest_per_bucket(&regular, policy.keep_monthly, |t| (t.year(), t.month(), 0));
    let max_age = TimeDelta::days(i64::from(policy.max_age_days));

    let (mut rank, mut safety_rank) = (0u32, 0u32);
    sorted
        .into_iter()
        .map(|c| {
            let (action, reason) = if c.trigger.is_pinned() {
                (Action::Keep, Reason::Pinned)
            } else {
                let safety = c.trigger == Trigger::PreRestore;
                let counter = if safety { &mut safety_rank } else { &mut rank };
                let my_rank = *counter;
                *counter += 1;
                let age = now.signed_duration_since(c.timestamp);
                let limit = if age > max_age {
                    Some(Reason::TooOld {
                        age_days: age.num_days(),
                        max_age_days: policy.max_age_days,
                    })
                } else if safety && my_rank >= policy.keep_pre_restore {
                    Some(Reason::ExceedsSafetyCount {
                        rank: my_rank,
                        keep: policy.keep_pre_restore,
                    })
                } else if !safety && my_rank >= policy.max_count {
                    Some(Reason::ExceedsMaxCount {
                        rank: my_rank,
                        max_count: policy.max_count,
                    })
                } else {
                    None
                };
                match limit {
                    _ if Some(&c.id) == newest => (Action::Keep, Reason::Newest),
                    None => (Action::Keep, Reason::WithinLimits { rank: my_rank }),
                    Some(_) if protect.contains(&c.id) => (Action::Keep, Reason::Protected),
                    Some(_) if daily.contains(&c.id) => (Action::Keep, Reason::KeepDaily),
                    Some(_) if weekly.contains(&c.id) => (Action::Keep, Reason::KeepWeekly),
                    Some(_) if monthly.contains(&c.id) => (Action::Keep, Reason::KeepMonthly),
                    Some(_) if Some(&c.id) == newest_safety => (Action::Keep, Reason::NewestSafety),
                    Some(reason) => (Action::Prune, reason),
                }
            };
            Decision {
                id: c.id.clone(),
                action,
                reason,
            }
        })
        .collect()
}

/// Ids of the newest backup in each of the `n` most recent buckets that
/// have backups. `sorted` is newest first.
fn newest_per_bucket<'a>(
    sorted: &[&'a Candidate],
    n: Option<u32>,
    bucket: impl Fn(DateTime<Utc>) -> (i32, u32, u32),
) -> HashSet<&'a BackupId> {
    let Some(n) = n else {
        return HashSet::new();
    };
    let mut seen = HashSet::new();
    let mut kept = HashSet::new();
    for c in sorted {
        if seen.len() >= n as usize {
            break;
        }
        if seen.insert(bucket(c.timestamp)) {
            kept.insert(&c.id);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_800_000_000; // 2027-01-15

    fn cand(secs: i64, trigger: Trigger) -> Candidate {
        let ts = DateTime::from_timestamp(secs, 0).unwrap();
        Candidate {
            id: BackupId::new(ts, trigger, 1),
            timestamp: ts,
            trigger,
            sequence: 0,
        }
    }

    fn policy(max_count: u32, max_age_days: u32) -> RetentionPolicy {
        RetentionPolicy {
            max_count,
            max_age_days,
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
            keep_pre_restore: 1,
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(T0, 0).unwrap()
    }

    fn pruned(plan: &[Decision]) -> Vec<String> {
        plan.iter()
            .filter(|d| d.action == Action::Prune)
            .map(|d| d.id.to_string())
            .collect()
    }

    #[test]
    fn prunes_beyond_max_count_oldest_first() {
        let backups: Vec<_> = (0..5)
            .map(|i| cand(T0 - i * 3600, Trigger::Scheduled))
            .collect();
        let p = plan(&backups, now(), &policy(3, 30), &[]);
        assert_eq!(p.len(), 5);
        assert_eq!(
            pruned(&p),
            vec![backups[3].id.to_string(), backups[4].id.to_string()]
        );
        assert!(matches!(
            p[4].reason,
            Reason::ExceedsMaxCount {
                rank: 4,
                max_count: 3
            }
        ));
        assert_eq!(p[0].reason, Reason::Newest);
    }

    #[test]
    fn prunes_by_age_but_never_the_newest() {
        let backups = vec![
            cand(T0 - 40 * 86_400, Trigger::Scheduled),
            cand(T0 - 50 * 86_400, Trigger::Scheduled),
        ];
        let p = plan(&backups, now(), &policy(10, 30), &[]);
        assert_eq!(p[0].action, Action::Keep);
        assert_eq!(p[0].reason, Reason::Newest);
        assert_eq!(
            p[1].reason,
            Reason::TooOld {
                age_days: 50,
                max_age_days: 30
            }
        );
    }

    #[test]
    fn pre_migration_is_pinned_and_takes_no_slot() {
        let backups = vec![
            cand(T0, Trigger::Scheduled),
            cand(T0 - 10, Trigger::PreMigration),
            cand(T0 - 20, Trigger::Scheduled),
            cand(T0 - 400 * 86_400, Trigger::PreMigration),
        ];
        let p = plan(&backups, now(), &policy(2, 30), &[]);
        assert!(pruned(&p).is_empty(), "{p:?}");
        assert_eq!(p[1].reason, Reason::Pinned);
        assert_eq!(p[3].reason, Reason::Pinned);
    }

    #[test]
    fn safety_backups_have_their_own_pool_and_take_no_slots() {
        let backups = vec![
            cand(T0, Trigger::Scheduled),
            cand(T0 - 10, Trigger::Scheduled),
            cand(T0 - 20, Trigger::PreRestore),
            cand(T0 - 30, Trigger::PreRestore),
            cand(T0 - 40, Trigger::PreRestore),
        ];
        let mut pol = policy(2, 30);
        pol.keep_pre_restore = 2;
        let p = plan(&backups, now(), &pol, &[]);
        assert_eq!(pruned(&p), vec![backups[4].id.to_string()]);
        assert_eq!(p[1].reason, Reason::WithinLimits { rank: 1 });
        assert_eq!(p[4].reason, Reason::ExceedsSafetyCount { rank: 2, keep: 2 });
        // Failed restores piling up safety backups never push out real ones.
        let mut many: Vec<_> = (0..10).map(|i| cand(T0 - i, Trigger::PreRestore)).collect();
        many.push(cand(T0 - 100, Trigger::Scheduled));
        many.push(cand(T0 - 200, Trigger::Manual));
        let p = plan(&many, now(), &pol, &[]);
        assert!(
            p.iter()
                .filter(|d| d.action == Action::Keep)
                .any(|d| d.id == many[10].id)
        );
        assert!(
            p.iter()
                .filter(|d| d.action == Action::Keep)
                .any(|d| d.id == many[11].id)
        );
    }

    #[test]
    fn the_backup_just_restored_and_the_one_just_created_are_protected() {
        // max_count 2: restoring the oldest of two adds a safety backup.
        let a = cand(T0 - 100, Trigger::Manual);
        let b = cand(T0 - 50, Trigger::Manual);
        let c = cand(T0 - 10, Trigger::Scheduled);
        let backups = vec![a.clone(), b.clone(), c.clone()];
        let p = plan(&backups, now(), &policy(2, 30), std::slice::from_ref(&a.id));
        assert!(pruned(&p).is_empty(), "{p:?}");
        assert_eq!(p[2].reason, Reason::Protected);
        let p = plan(&backups, now(), &policy(2, 30), &[]);
        assert_eq!(pruned(&p), vec![a.id.to_string()]);
    }

    #[test]
    fn after_a_clock_jump_the_backup_created_last_is_the_newest() {
        // Three backups dated 2027-06-01 (the clock ran ahead), then one at
        // the real time: created last, it must survive its own retention.
        let future = DateTime::parse_from_rfc3339("2027-06-01T00:00:00Z")
            .unwrap()
            .timestamp();
        let mut backups: Vec<_> = (0..3)
            .map(|i| {
                let mut c = cand(future + i, Trigger::Manual);
                c.sequence = 1 + i as u64;
                c
            })
            .collect();
        let mut fresh = cand(T0, Trigger::Manual);
        fresh.sequence = 4;
        backups.push(fresh.clone());
        let p = plan(&backups, now(), &policy(3, 30), &[]);
        assert_eq!(p[0].id, fresh.id);
        assert_eq!(p[0].reason, Reason::Newest);
        assert_eq!(pruned(&p), vec![backups[0].id.to_string()]);
    }

    #[test]
    fn keep_daily_keeps_newest_of_each_day() {
        // Three backups a day over four days; max_count 1 alone would keep one.
        let mut backups = vec![];
        for day in 0..4 {
            for h in 0..3 {
                backups.push(cand(T0 - day * 86_400 - h * 3600, Trigger::Scheduled));
            }
        }
        let mut pol = policy(1, 30);
        pol.keep_daily = Some(3);
        let p = plan(&backups, now(), &pol, &[]);
        let kept: Vec<_> = p.iter().filter(|d| d.action == Action::Keep).collect();
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert_eq!(kept[0].reason, Reason::Newest);
        assert!(kept[1..].iter().all(|d| d.reason == Reason::KeepDaily));
    }

    #[test]
    fn empty_input_gives_empty_plan() {
        assert!(plan(&[], now(), &policy(1, 1), &[]).is_empty());
    }

    /// Backups over 200 days, some dated in the future, with creation
    /// sequences that may disagree with their timestamps (clock jumps).
    fn arb_backups() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::btree_map(-30 * 86_400i64..200 * 86_400, (0usize..6, 0u64..50), 0..40)
            .prop_map(|m| {
                m.into_iter()
                    .map(|(ago, (t, seq))| {
                        let mut c = cand(T0 - ago, Trigger::ALL[t]);
                        c.sequence = seq;
                        c
                    })
                    .collect()
            })
    }

    fn arb_policy() -> impl Strategy<Value = RetentionPolicy> {
        (
            1u32..15,
            1u32..120,
            proptest::option::of(1u32..10),
            proptest::option::of(1u32..6),
            proptest::option::of(1u32..4),
            1u32..5,
        )
            .prop_map(|(max_count, max_age_days, d, w, m, s)| RetentionPolicy {
                max_count,
                max_age_days,
                keep_daily: d,
                keep_weekly: w,
                keep_monthly: m,
                keep_pre_restore: s,
            })
    }

    proptest! {
        #[test]
        fn invariants_hold(
            backups in arb_backups(),
            pol in arb_policy(),
            protect_mask in proptest::collection::vec(proptest::bool::weighted(0.2), 40),
        ) {
            let protect: Vec<BackupId> = backups
                .iter()
                .zip(&protect_mask)
                .filter(|(_, p)| **p)
                .map(|(c, _)| c.id.clone())
                .collect();
            let p = plan(&backups, now(), &pol, &protect);
            // One decision per backup.
            prop_assert_eq!(p.len(), backups.len());
            let ids: HashSet<_> = p.iter().map(|d| &d.id).collect();
            prop_assert_eq!(ids.len(), backups.len());
            // The newest by creation, the pinned and the protected are never pruned.
            if let Some(newest) = backups.iter().max_by_key(|c| (c.sequence, c.timestamp, c.id.clone())) {
                prop_assert!(p.iter().any(|d| d.id == newest.id && d.action == Action::Keep));
            }
            for d in &p {
                let c = backups.iter().find(|c| c.id == d.id).unwrap();
                if c.trigger.is_pinned() || protect.contains(&c.id) {
                    prop_assert_eq!(d.action, Action::Keep);
                }
                // A prune always has a limit reason; a keep never has one.
                let limit = matches!(d.reason, Reason::TooOld { .. } | Reason::ExceedsMaxCount { .. } | Reason::ExceedsSafetyCount { .. });
                prop_assert_eq!(d.action == Action::Prune, limit);
                // A backup dated in the future is never too old.
                if c.timestamp > now() {
                    let too_old = matches!(d.reason, Reason::TooOld { .. });
                    prop_assert!(!too_old, "{:?} is dated in the future", d.id);
                }
            }
            // Rule 4 keeps: young enough and within count among regular
            // backups (safety backups take no slot) are never pruned.
            let mut regular: Vec<_> = backups
                .iter()
                .filter(|c| !c.trigger.is_pinned() && c.trigger != Trigger::PreRestore)
                .collect();
            regular.sort_by(|a, b| Candidate::newer_first(a, b));
            for (rank, c) in regular.iter().enumerate() {
                let young = now().signed_duration_since(c.timestamp) <= TimeDelta::days(i64::from(pol.max_age_days));
                if young && (rank as u32) < pol.max_count {
                    prop_assert!(p.iter().any(|d| d.id == c.id && d.action == Action::Keep));
                }
            }
        }

        #[test]
        fn count_limit_is_respected_without_keep_rules(backups in arb_backups(), max_count in 1u32..15) {
            let pol = policy(max_count, 3650);
            let p = plan(&backups, now(), &pol, &[]);
            let regular = |d: &&Decision| d.id.trigger() != Trigger::PreRestore;
            let kept_by_rank = p
                .iter()
                .filter(regular)
                .filter(|d| matches!(d.reason, Reason::WithinLimits { .. } | Reason::Newest))
                .count();
            prop_assert!(kept_by_rank <= max_count as usize);
            let safety_kept = p
                .iter()
                .filter(|d| d.id.trigger() == Trigger::PreRestore && d.action == Action::Keep)
                .count();
            // The newest safety backup may also be the newest of all.
            prop_assert!(safety_kept <= pol.keep_pre_restore as usize + 1);
        }

        #[test]
        fn replanning_the_kept_set_prunes_nothing(backups in arb_backups(), pol in arb_policy()) {
            let p = plan(&backups, now(), &pol, &[]);
            let kept: Vec<Candidate> = backups
                .iter()
                .filter(|c| p.iter().any(|d| d.id == c.id && d.action == Action::Keep))
                .cloned()
                .collect();
            let again = plan(&kept, now(), &pol, &[]);
            prop_assert!(again.iter().all(|d| d.action == Action::Keep), "{:?}", again);
        }
    }
}
