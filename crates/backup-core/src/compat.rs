//! Compatibility rules: may this backup be restored into this build?
//!
//! [`check`] is pure and returns every finding at once, so that
//! `restore --dry-run` and the API can show the whole picture. Refused
//! (errors): an unknown manifest major version, a backup from a newer app,
//! a database schema newer than this build supports, a requested component
//! the backup lacks. Warned: an older schema (migrations will run on the
//! next start), an older app version.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::Component;
use crate::manifest::{MANIFEST_MAJOR, Manifest};

/// What the running build is and supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningApp {
    /// The running SynthOrg version.
    pub version: semver::Version,
    /// The newest `PRAGMA user_version` this build can open; `None` when
    /// unknown (no live database and nothing configured: disaster
    /// recovery), see [`check_unknown_schema`].
    pub supported_schema: Option<i64>,
    /// The database engine this host runs (`sources.database_url` set:
    /// PostgreSQL).
    pub engine: crate::manifest::Engine,
}

/// One finding of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Finding {
    /// Manifest major version unknown to this build.
    UnknownManifestVersion {
        /// The manifest's version.
        found: String,
    },
    /// The backup was made by a newer SynthOrg.
    NewerAppVersion {
        /// Version in the backup.
        backup: String,
        /// Running version.
        running: String,
    },
    /// The backup was made by an older SynthOrg.
    OlderAppVersion {
        /// Version in the backup.
        backup: String,
        /// Running version.
        running: String,
    },
    /// The backup's schema is newer than this build supports.
    NewerSchema {
        /// Schema in the backup.
        backup: i64,
        /// Newest schema this build supports.
        supported: i64,
    },
    /// The backup's schema is older: migrations will run on the next start.
    OlderSchema {
        /// Schema in the backup.
        backup: i64,
        /// Newest schema this build supports.
        supported: i64,
    },
    /// The backup's persistence comes from another database engine.
    OtherEngine {
        /// The backup's engine.
        backup: String,
        /// This host's.
        running: String,
    },
    /// The supported schema is unknown: nothing to compare the backup's with.
    SchemaUnknown {
        /// Schema in the backup.
        backup: i64,
    },
    /// The supported schema is unknown and the backup's schema is newer
    /// than that of every other backup in the store.
    NewerThanStore {
        /// Schema in the backup.
        backup: i64,
        /// Newest schema of the other backups.
        newest: i64,
    },
    /// A requested component is not in the backup.
    MissingComponent {
        /// The component.
        component: Component,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::UnknownManifestVersion { found } => write!(
                f,
                "manifest version {found} is not supported (this build reads {MANIFEST_MAJOR}.x)"
            ),
            Finding::NewerAppVersion { backup, running } => write!(
                f,
                "backup was made by SynthOrg {backup}, newer than the running {running}"
            ),
            Finding::OlderAppVersion { backup, running } => write!(
                f,
                "backup was made by SynthOrg {backup}, older than the running {running}"
            ),
            Finding::NewerSchema { backup, supported } => write!(
                f,
                "database schema {backup} is newer than the supported {supported}"
            ),
            Finding::OlderSchema { backup, supported } => write!(
                f,
                "schema {backup} < {supported}: migrations will run on next start"
            ),
            Finding::SchemaUnknown { backup } => write!(
                f,
                "supported schema unknown (no live database, backup.supported_schema or SYNTHORG_SCHEMA_VERSION): cannot check the backup's schema {backup}"
            ),
            Finding::NewerThanStore { backup, newest } => write!(
                f,
                "database schema {backup} is newer than every other backup in this store (newest {newest}) and the supported schema is unknown; set backup.supported_schema or SYNTHORG_SCHEMA_VERSION to the schema the installed app supports"
            ),
            Finding::MissingComponent { component } => {
                write!(f, "component {component} is not in the backup")
            }
            Finding::OtherEngine { backup, running } => write!(
                f,
                "the backup's database is {backup} and this host runs {running}: a {backup} backup never restores into {running} (restore the other components with --component, or convert the data by hand)"
            ),
        }
    }
}

/// All findings of [`check`]: any error refuses the restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatReport {
    /// Findings that refuse the restore.
    pub errors: Vec<Finding>,
    /// Findings to show, which do not refuse it.
    pub warnings: Vec<Finding>,
}

impl CompatReport {
    /// Whether the restore may go ahead.
    pub fn is_compatible(&self) -> bool {
        self.errors.is_empty()
    }
}

/// With the supported schema unknown, the rule that stands in for it: a
/// backup whose schema is newer than that of every other backup in the
/// store (`others_newest`) may come from a newer app than the one
/// installed, and is refused; with no other backup to compare with, the
/// restore goes ahead with the [`Finding::SchemaUnknown`] warning.
pub fn check_unknown_schema(manifest: &Manifest, others_newest: Option<i64>) -> Option<Finding> {
    match (manifest.db_schema_version, others_newest) {
        (Some(backup), Some(newest)) if backup > newest => {
            Some(Finding::NewerThanStore { backup, newest })
        }
        _ => None,
    }
}

/// Checks a backup's manifest against the running build and the components
/// to restore (`None`: all in the backup).
pub fn check(
    manifest: &Manifest,
    running: &RunningApp,
    requested: Option<&[Component]>,
) -> CompatReport {
    let mut report = CompatReport::default();
    if manifest.version.major != MANIFEST_MAJOR {
        report.errors.push(Finding::UnknownManifestVersion {
            found: manifest.version.to_string(),
        });
    }
    let (backup_v, running_v) = (&manifest.synthorg_version, &running.version);
    if backup_v > running_v {
        report.errors.push(Finding::NewerAppVersion {
            backup: backup_v.to_string(),
            running: running_v.to_string(),
        });
    } else if backup_v < running_v {
        report.warnings.push(Finding::OlderAppVersion {
            backup: backup_v.to_string(),
            running: running_v.to_string(),
        });
    }
    let restores_db = requested.is_none_or(|r| r.contains(&Component::Persistence));
    if restores_db
        && manifest.components.contains(&Component::Persistence)
        && manifest.engine != running.engine
    {
        report.errors.push(Finding::OtherEngine {
            backup: manifest.engine.to_string(),
            running: running.engine.to_string(),
        });
    }
    match (
        manifest.db_schema_version,
        restores_db,
        running.supported_schema,
    ) {
        (Some(schema), true, Some(supported)) if schema > supported => {
            report.errors.push(Finding::NewerSchema {
                backup: schema,
                supported,
            });
        }
        (Some(schema), true, Some(supported)) if schema < supported => {
            report.warnings.push(Finding::OlderSchema {
                backup: schema,
                supported,
            });
        }
        (Some(schema), true, None) => {
            report
                .warnings
                .push(Finding::SchemaUnknown { backup: schema });
        }
        _ => {}
    }
    for component in requested.unwrap_or(&[]) {
        if !manifest.components.contains(component) {
            report.errors.push(Finding::MissingComponent {
                component: *component,
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Engine;
    use crate::manifest::tests::sample;

    #[test]
    fn persistence_never_crosses_database_engines() {
        let mut m = sample("2026-03-15T14-30-00_manual");
        let mut app = running("1.4.0", 3);
        app.engine = Engine::Postgres;
        let r = check(&m, &app, None);
        assert!(
            r.errors
                .iter()
                .any(|f| matches!(f, Finding::OtherEngine { .. })
                    && f.to_string().contains("SQLite")
                    && f.to_string().contains("PostgreSQL")),
            "{r:?}"
        );
        // Only the files: allowed.
        let r = check(&m, &app, Some(&[Component::Config]));
        assert!(r.errors.is_empty(), "{r:?}");
        m.engine = Engine::Postgres;
        assert!(check(&m, &app, None).errors.is_empty());
        assert!(!check(&m, &running("1.4.0", 3), None).errors.is_empty());
    }

    fn running(v: &str, schema: i64) -> RunningApp {
        RunningApp {
            version: semver::Version::parse(v).unwrap(),
            supported_schema: Some(schema),
            engine: Default::default(),
        }
    }

    #[test]
    fn same_version_and_schema_is_clean() {
        let m = sample("2026-03-15T14-30-00_manual"); // app 1.4.0, schema 3
        let r = check(&m, &running("1.4.0", 3), None);
        assert!(r.is_compatible());
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn refuses_newer_app_and_newer_schema_reporting_both() {
        let m = sample("2026-03-15T14-30-00_manual");
        let r = check(&m, &running("1.3.9", 2), None);
        assert_eq!(r.errors.len(), 2, "{r:?}");
        assert!(matches!(r.errors[0], Finding::NewerAppVersion { .. }));
        assert_eq!(
            r.errors[1],
            Finding::NewerSchema {
                backup: 3,
                supported: 2
            }
        );
    }

    #[test]
    fn prerelease_of_running_version_is_older_than_release() {
        let mut m = sample("2026-03-15T14-30-00_manual");
        m.synthorg_version = semver::Version::parse("1.4.0").unwrap();
        let r = check(&m, &running("1.4.0-rc.1", 3), None);
        assert!(!r.is_compatible());
    }

    #[test]
    fn warns_on_older_schema_with_the_documented_text() {
        let m = sample("2026-03-15T14-30-00_manual");
        let r = check(&m, &running("1.5.0", 4), None);
        assert!(r.is_compatible());
        let texts: Vec<String> = r.warnings.iter().map(ToString::to_string).collect();
        assert!(texts.contains(&"schema 3 < 4: migrations will run on next start".to_owned()));
    }

    #[test]
    fn schema_is_irrelevant_when_persistence_is_not_restored() {
        let m = sample("2026-03-15T14-30-00_manual");
        let r = check(&m, &running("1.4.0", 1), Some(&[Component::Memory]));
        assert!(r.is_compatible(), "{r:?}");
    }

    #[test]
    fn refuses_missing_requested_component() {
        let mut m = sample("2026-03-15T14-30-00_manual");
        m.components.retain(|c| *c != Component::Checkpoints);
        let r = check(
            &m,
            &running("1.4.0", 3),
            Some(&[Component::Checkpoints, Component::Config]),
        );
        assert_eq!(
            r.errors,
            vec![Finding::MissingComponent {
                component: Component::Checkpoints
            }]
        );
    }

    #[test]
    fn reports_serialize_with_stable_codes() {
        let m = sample("2026-03-15T14-30-00_manual");
        let r = check(&m, &running("1.0.0", 3), None);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["errors"][0]["code"], "newer_app_version");
    }

    #[test]
    fn an_unknown_supported_schema_warns_and_never_prints_a_sentinel() {
        let m = sample("2026-03-15T14-30-00_manual"); // schema 3
        let unknown = RunningApp {
            version: semver::Version::parse("1.4.0").unwrap(),
            supported_schema: None,
            engine: Default::default(),
        };
        let r = check(&m, &unknown, None);
        assert!(r.is_compatible());
        assert_eq!(r.warnings, vec![Finding::SchemaUnknown { backup: 3 }]);
        assert!(
            r.warnings[0]
                .to_string()
                .contains("supported schema unknown")
        );
        assert_eq!(check_unknown_schema(&m, None), None);
        assert_eq!(check_unknown_schema(&m, Some(3)), None);
        assert_eq!(
            check_unknown_schema(&m, Some(2)),
            Some(Finding::NewerThanStore {
                backup: 3,
                newest: 2
            })
        );
    }
}
