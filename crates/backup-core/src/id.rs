//! Backup identity: [`Trigger`], [`Component`] and [`BackupId`].
//!
//! A backup id names a backup in every interface (API path, CLI argument,
//! store key), so there is exactly one parser, [`BackupId::parse`], and it is
//! total: any string either becomes a valid id or an [`IdError`] naming the
//! problem. No raw string reaches a path or a key.
//!
//! Form: `2026-03-15T14-30-00_scheduled`, or `2026-03-15T14-30-00_scheduled-2`
//! for the second backup of the same trigger in the same second. The
//! timestamp is UTC; ids sort chronologically as strings at second precision,
//! and exactly by [`Ord`] (timestamp, then sequence, then trigger).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Periodic backup of the scheduler.
    Scheduled,
    /// Synchronous backup while the host shuts down.
    Shutdown,
    /// Backup after the host started, before it serves.
    Startup,
    /// Asked for by an operator (API or CLI).
    Manual,
    /// Taken before schema migrations run; pinned against retention.
    PreMigration,
    /// Safety backup of the live state taken right before a restore.
    PreRestore,
}

impl Trigger {
    /// Every trigger, in declaration order.
    pub const ALL: [Trigger; 6] = [
        Trigger::Scheduled,
        Trigger::Shutdown,
        Trigger::Startup,
        Trigger::Manual,
        Trigger::PreMigration,
        Trigger::PreRestore,
    ];

    /// The name used in ids, manifests, config and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Scheduled => "scheduled",
            Trigger::Shutdown => "shutdown",
            Trigger::Startup => "startup",
            Trigger::Manual => "manual",
            Trigger::PreMigration => "pre-migration",
            Trigger::PreRestore => "pre-restore",
        }
    }

    /// Pinned backups are never pruned by retention; only an explicit,
    /// forced delete removes them.
    pub fn is_pinned(self) -> bool {
        self == Trigger::PreMigration
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Trigger {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Trigger::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| IdError::UnknownTrigger(truncate_for_message(s)))
    }
}

/// A part of the SynthOrg data directory that a backup can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    /// `synthorg.db`: tasks, audit log, agent state, budget records, org facts.
    Persistence,
    /// `memory/`: Mem0 metadata database and vector-store segments.
    Memory,
    /// `config/`: the company YAML configuration.
    Config,
    /// `checkpoints/`: per-turn execution checkpoints.
    Checkpoints,
}

impl Component {
    /// Every component, in the canonical order used in archives and manifests.
    pub const ALL: [Component; 4] = [
        Component::Persistence,
        Component::Memory,
        Component::Config,
        Component::Checkpoints,
    ];

    /// The name used in manifests, config and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Persistence => "persistence",
            Component::Memory => "memory",
            Component::Config => "config",
            Component::Checkpoints => "checkpoints",
        }
    }

    /// Where the component lives inside a backup (archive or directory form):
    /// the file `synthorg.db` for persistence, a directory otherwise.
    pub fn archive_root(self) -> &'static str {
        match self {
            Component::Persistence => "synthorg.db",
            Component::Memory => "memory",
            Component::Config => "config",
            Component::Checkpoints => "checkpoints",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Component {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Component::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| IdError::UnknownComponent(truncate_for_message(s)))
    }
}

/// Longest id accepted: timestamp (19) + `_` + longest trigger (13) + `-` +
/// a 9-digit sequence. Anything longer is rejected before any other check.
pub const MAX_ID_LEN: usize = 19 + 1 + 13 + 1 + 9;

const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H-%M-%S";

/// The id of one backup. Constructed only through [`BackupId::new`] or
/// [`BackupId::parse`], so every value is valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackupId {
    timestamp: DateTime<Utc>,
    trigger: Trigger,
    /// 1 for the first backup of a trigger in a second, 2.. for later ones.
    sequence: u32,
}

/// Why a string is not a valid [`BackupId`], [`Trigger`] or [`Component`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Empty input.
    #[error("backup id is empty")]
    Empty,
    /// Longer than [`MAX_ID_LEN`].
    #[error("backup id is {len} bytes long; the maximum is {MAX_ID_LEN}")]
    TooLong {
        /// Length of the rejected input in bytes.
        len: usize,
    },
    /// A character outside `[0-9A-Za-z_-]` (path separators, NUL, unicode look-alikes...).
    #[error(
        "backup id {id:?} contains {ch:?}; only ASCII letters, digits, '-' and '_' are allowed"
    )]
    BadCharacter {
        /// The rejected input.
        id: String,
        /// The first offending character.
        ch: char,
    },
    /// No `_` between timestamp and trigger, or a malformed timestamp.
    #[error(
        "backup id {id:?} is not of the form YYYY-MM-DDTHH-MM-SS_<trigger>[-N], e.g. 2026-03-15T14-30-00_manual"
    )]
    Malformed {
        /// The rejected input.
        id: String,
    },
    /// Unknown trigger name.
    #[error(
        "unknown trigger {0:?}; expected one of scheduled, shutdown, startup, manual, pre-migration, pre-restore"
    )]
    UnknownTrigger(String),
    /// Unknown component name.
    #[error("unknown component {0:?}; expected one of persistence, memory, config, checkpoints")]
    UnknownComponent(String),
    /// Sequence suffix `-0`, with leading zeros, or too large.
    #[error(
        "backup id {id:?} has an invalid sequence suffix; expected -2 .. -999999999 without leading zeros"
    )]
    BadSequence {
        /// The rejected input.
        id: String,
    },
}

/// Keeps error messages bounded when the input is hostile (e.g. 10 KB).
fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

impl BackupId {
    /// The id of the `sequence`-th backup with `trigger` in the second of
    /// `timestamp` (sub-second precision is dropped). `sequence` 0 is
    /// treated as 1.
    pub fn new(timestamp: DateTime<Utc>, trigger: Trigger, sequence: u32) -> BackupId {
        let timestamp = timestamp.with_nanosecond(0).unwrap_or(timestamp);
        BackupId {
            timestamp,
            trigger,
            sequence: sequence.clamp(1, 999_999_999),
        }
    }

    /// Parses and validates an id. Total: never panics, whatever the input.
    ///
    /// # Errors
    /// An [`IdError`] naming the problem: empty, too long, a character outside
    /// `[0-9A-Za-z_-]`, malformed timestamp, unknown trigger, bad sequence.
    pub fn parse(raw: &str) -> Result<BackupId, IdError> {
        if raw.is_empty() {
            return Err(IdError::Empty);
        }
        if raw.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: raw.len() });
        }
        if let Some(ch) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(IdError::BadCharacter {
                id: raw.to_owned(),
                ch,
            });
        }
        let malformed = || IdError::Malformed { id: raw.to_owned() };
        let (stamp, rest) = raw.split_once('_').ok_or_else(malformed)?;
        // Exactly 19 ASCII bytes; chrono alone would accept e.g. 1-digit fields.
        if stamp.len() != 19 {
            return Err(malformed());
        }
        let naive =
            NaiveDateTime::parse_from_str(stamp, TIMESTAMP_FORMAT).map_err(|_| malformed())?;
        let (trigger_str, sequence) =
            split_sequence(rest).ok_or_else(|| IdError::BadSequence { id: raw.to_owned() })?;
        let trigger = trigger_str.parse::<Trigger>()?;
        let id = BackupId {
            timestamp: naive.and_utc(),
            trigger,
            sequence,
        };
        // Canonical form only: one id, one spelling.
        if id.to_string() != raw {
            return Err(malformed());
        }
        Ok(id)
    }

    /// When the backup was started (UTC, whole seconds).
    pub fn timestamp(&self) -> DateTime<Utc> {
        self.timestamp
    }

    /// Why the backup was taken.
    pub fn trigger(&self) -> Trigger {
        self.trigger
    }

    /// 1 for the first backup of this trigger in this second, then 2, 3...
    pub fn sequence(&self) -> u32 {
        self.sequence
    }

    /// The same id with the next sequence number, for a collision within one second.
    pub fn next_sequence(&self) -> BackupId {
        BackupId {
            sequence: self.sequence.saturating_add(1).min(999_999_999),
            ..self.clone()
        }
    }
}

/// Splits `pre-migration-2` into (`pre-migration`, 2). No trigger name ends in
/// a digit, so a trailing `-<digits>` is always a sequence.
fn split_sequence(rest: &str) -> Option<(&str, u32)> {
    match rest.rsplit_once('-') {
        Some((name, digits))
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            if digits.starts_with('0') || digits.len() > 9 {
                return None;
            }
            let n: u32 = digits.parse().ok()?;
            if n < 2 {
                return None;
            }
            Some((name, n))
        }
        _ => Some((rest, 1)),
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}_{}",
            self.timestamp.format(TIMESTAMP_FORMAT),
            self.trigger
        )?;
        if self.sequence > 1 {
            write!(f, "-{}", self.sequence)?;
        }
        Ok(())
    }
}

impl FromStr for BackupId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackupId::parse(s)
    }
}

impl Ord for BackupId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.timestamp, self.sequence, self.trigger).cmp(&(
            other.timestamp,
            other.sequence,
            other.trigger,
        ))
    }
}

impl PartialOrd for BackupId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Serialize for BackupId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BackupId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        BackupId::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn formats_as_documented() {
        let id = BackupId::new(at(2026, 3, 15, 14, 30, 0), Trigger::Scheduled, 1);
        assert_eq!(id.to_string(), "2026-03-15T14-30-00_scheduled");
        assert_eq!(
            id.next_sequence().to_string(),
            "2026-03-15T14-30-00_scheduled-2"
        );
        let pm = BackupId::new(at(2026, 3, 15, 14, 30, 0), Trigger::PreMigration, 3);
        assert_eq!(pm.to_string(), "2026-03-15T14-30-00_pre-migration-3");
    }

    #[test]
    fn parses_every_trigger_and_sequence() {
        for t in Trigger::ALL {
            for seq in [1, 2, 17, 999_999_999] {
                let id = BackupId::new(at(2030, 12, 31, 23, 59, 59), t, seq);
                assert_eq!(BackupId::parse(&id.to_string()), Ok(id));
            }
        }
    }

    #[test]
    fn rejects_hostile_and_malformed_ids_with_specific_errors() {
        let long = "a".repeat(10_000);
        type Expect = fn(&IdError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("", |e| matches!(e, IdError::Empty)),
            (&long, |e| matches!(e, IdError::TooLong { len: 10_000 })),
            ("2026-03-15T14-30-00_manual/../x", |e| {
                matches!(e, IdError::BadCharacter { ch: '/', .. })
            }),
            ("..", |e| matches!(e, IdError::BadCharacter { ch: '.', .. })),
            ("2026-03-15T14-30-00_man\0ual", |e| {
                matches!(e, IdError::BadCharacter { ch: '\0', .. })
            }),
            // Cyrillic 'а' looks like Latin 'a'.
            ("2026-03-15T14-30-00_m\u{0430}nual", |e| {
                matches!(e, IdError::BadCharacter { ch: '\u{0430}', .. })
            }),
            ("2026-03-15T14-30-00", |e| {
                matches!(e, IdError::Malformed { .. })
            }),
            ("2026-13-15T14-30-00_manual", |e| {
                matches!(e, IdError::Malformed { .. })
            }),
            ("2026-3-15T14-30-000_manual", |e| {
                matches!(e, IdError::Malformed { .. })
            }),
            ("2026-03-15T14-30-00_weekly", |e| {
                matches!(e, IdError::UnknownTrigger(_))
            }),
            ("2026-03-15T14-30-00_manual-1", |e| {
                matches!(e, IdError::BadSequence { .. })
            }),
            ("2026-03-15T14-30-00_manual-02", |e| {
                matches!(e, IdError::BadSequence { .. })
            }),
            ("2026-03-15T14-30-00_manual-0", |e| {
                matches!(e, IdError::BadSequence { .. })
            }),
            ("2026-03-15T14-30-00_MANUAL", |e| {
                matches!(e, IdError::UnknownTrigger(_))
            }),
        ];
        for (raw, expect) in cases {
            let err = BackupId::parse(raw).expect_err(raw);
            assert!(expect(&err), "{raw:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn orders_chronologically_then_by_sequence() {
        let a = BackupId::new(at(2026, 1, 1, 0, 0, 0), Trigger::Shutdown, 1);
        let b = BackupId::new(at(2026, 1, 1, 0, 0, 0), Trigger::Manual, 2);
        let c = BackupId::new(at(2026, 1, 1, 0, 0, 1), Trigger::Manual, 1);
        assert!(a < b && b < c);
    }

    #[test]
    fn serde_round_trips_and_validates() {
        let id = BackupId::new(at(2026, 3, 15, 14, 30, 0), Trigger::Manual, 1);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"2026-03-15T14-30-00_manual\"");
        assert_eq!(serde_json::from_str::<BackupId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<BackupId>("\"../etc\"").is_err());
    }

    proptest! {
        #[test]
        fn parse_is_total(raw in ".{0,80}") {
            let _ = BackupId::parse(&raw);
        }

        #[test]
        fn parse_accepts_only_canonical_ids(raw in "[0-9T_a-z-]{15,45}") {
            if let Ok(id) = BackupId::parse(&raw) {
                prop_assert_eq!(id.to_string(), raw);
            }
        }

        #[test]
        fn display_parse_round_trip(
            secs in 0i64..32_503_680_000, // years 1970..3000
            t in 0usize..6,
            seq in 1u32..1_000_000_000,
        ) {
            let ts = DateTime::from_timestamp(secs, 0).unwrap();
            let id = BackupId::new(ts, Trigger::ALL[t], seq);
            let parsed = BackupId::parse(&id.to_string()).unwrap();
            prop_assert_eq!(&parsed, &id);
        }

        #[test]
        fn string_order_matches_time_order(a in 0i64..32_503_680_000, b in 0i64..32_503_680_000) {
            let ia = BackupId::new(DateTime::from_timestamp(a, 0).unwrap(), Trigger::Manual, 1);
            let ib = BackupId::new(DateTime::from_timestamp(b, 0).unwrap(), Trigger::Manual, 1);
            prop_assert_eq!(ia.to_string().cmp(&ib.to_string()), a.cmp(&b));
        }
    }
}
