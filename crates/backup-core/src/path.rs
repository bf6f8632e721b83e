//! [`ArchivePath`]: a validated, relative path of a file inside a backup.
//!
//! Every path that comes out of an archive, a manifest or a directory walk is
//! parsed here before it can name a file, so `..`, absolute paths, empty or
//! `.` segments, backslashes and control characters never reach the
//! filesystem. The same rules make the manifest checksum encoding
//! (`path NUL size NUL sha256 LF`) unambiguous: a path holds no NUL and no LF.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::id::Component;

/// Longest accepted path, in bytes (PATH_MAX on Linux).
pub const MAX_PATH_LEN: usize = 4096;

/// The manifest's own path inside an archive or backup directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The persistence component of a PostgreSQL deployment in a backup: a
/// `pg_dump --format=custom` archive (instead of `synthorg.db`).
pub const PGDUMP_FILE: &str = "synthorg.pgdump";

/// A relative `/`-separated path inside a backup, e.g. `memory/vectors/seg-0001.bin`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArchivePath(String);

/// Why a path is not a valid [`ArchivePath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// Empty path.
    #[error("empty path")]
    Empty,
    /// Longer than [`MAX_PATH_LEN`].
    #[error("path of {0} bytes exceeds the maximum of {MAX_PATH_LEN}")]
    TooLong(usize),
    /// Starts with `/`.
    #[error("absolute path {0:?}; only relative paths are allowed")]
    Absolute(String),
    /// Contains an empty, `.` or `..` segment.
    #[error("path {0:?} contains an empty, '.' or '..' segment")]
    BadSegment(String),
    /// Contains a control character (NUL, LF...) or a backslash.
    #[error("path {0:?} contains a control character or a backslash")]
    BadCharacter(String),
    /// Not under any component's root (nor the manifest itself).
    #[error("path {0:?} is outside every component (synthorg.db, memory/, config/, checkpoints/)")]
    OutsideComponents(String),
}

impl ArchivePath {
    /// Validates a relative path.
    ///
    /// # Errors
    /// A [`PathError`] naming the problem.
    pub fn parse(raw: &str) -> Result<ArchivePath, PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty);
        }
        if raw.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(raw.len()));
        }
        let shown = || raw.chars().take(200).collect::<String>();
        if raw.chars().any(|c| c.is_control() || c == '\\') {
            return Err(PathError::BadCharacter(shown()));
        }
        if raw.starts_with('/') {
            return Err(PathError::Absolute(shown()));
        }
        if raw
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(PathError::BadSegment(shown()));
        }
        Ok(ArchivePath(raw.to_owned()))
    }

    /// Validates a path and checks that it belongs to a component; returns
    /// the component.
    ///
    /// # Errors
    /// A [`PathError`]; `OutsideComponents` for `manifest.json` and foreign paths.
    pub fn parse_in_component(raw: &str) -> Result<(ArchivePath, Component), PathError> {
        let path = ArchivePath::parse(raw)?;
        let component = path
            .component()
            .ok_or_else(|| PathError::OutsideComponents(raw.chars().take(200).collect()))?;
        Ok((path, component))
    }

    /// Joins a validated relative path below this one.
    ///
    /// # Errors
    /// A [`PathError`] when `child` is not a valid relative path.
    pub fn join(&self, child: &str) -> Result<ArchivePath, PathError> {
        ArchivePath::parse(&format!("{}/{}", self.0, child))
    }

    /// The component this path belongs to, if any: `synthorg.db` is
    /// persistence, `memory/...` memory, and so on. The component's
    /// directory root itself (e.g. `memory`) belongs to it too.
    pub fn component(&self) -> Option<Component> {
        Component::ALL.into_iter().find(|c| {
            let root = c.archive_root();
            match c {
                Component::Persistence => self.0 == root || self.0 == PGDUMP_FILE,
                _ => {
                    self.0 == root
                        || (self.0.starts_with(root)
                            && self.0.as_bytes().get(root.len()) == Some(&b'/'))
                }
            }
        })
    }

    /// The path as a `/`-separated string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for ArchivePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ArchivePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ArchivePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        ArchivePath::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_component_paths() {
        for (raw, c) in [
            ("synthorg.db", Component::Persistence),
            ("synthorg.pgdump", Component::Persistence),
            ("memory", Component::Memory),
            ("memory/mem0.db", Component::Memory),
            ("config/company.yaml", Component::Config),
            ("checkpoints/task-1/turn-0003.json", Component::Checkpoints),
            ("memory/Ünïcødé ✓.bin", Component::Memory),
        ] {
            let (p, comp) = ArchivePath::parse_in_component(raw).unwrap();
            assert_eq!(p.as_str(), raw);
            assert_eq!(comp, c);
        }
    }

    #[test]
    fn rejects_escapes_and_foreign_paths() {
        for raw in [
            "",
            "/etc/passwd",
            "../../etc/passwd",
            "memory/../../x",
            "memory//x",
            "memory/./x",
            "memory/x/",
            "memory\\x",
            "memory/a\0b",
            "memory/a\nb",
        ] {
            assert!(ArchivePath::parse(raw).is_err(), "{raw:?} accepted");
        }
        for raw in [
            "manifest.json",
            "synthorg.db-wal",
            "memoryx/a",
            "etc/passwd",
        ] {
            assert!(
                matches!(
                    ArchivePath::parse_in_component(raw),
                    Err(PathError::OutsideComponents(_))
                ),
                "{raw:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn parse_is_total_and_never_yields_escapes(raw in "[a-z./\\\\\0\n]{0,30}") {
            if let Ok(p) = ArchivePath::parse(&raw) {
                prop_assert!(!p.as_str().starts_with('/'));
                prop_assert!(p.segments().all(|s| !s.is_empty() && s != "." && s != ".."));
                prop_assert!(!p.as_str().contains('\0') && !p.as_str().contains('\n'));
            }
        }
    }
}
