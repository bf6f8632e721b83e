//! Manifest v1: what a backup holds and how to verify it.
//!
//! The manifest is written twice: as `manifest.json` inside the backup and as
//! the sidecar `<id>.manifest.json` next to it, published last (the commit
//! point of a backup). Parsing is strict: a size cap before reading
//! ([`MAX_MANIFEST_BYTES`]), an unknown major version is an error, and
//! [`Manifest::validate`] checks that the manifest is consistent with itself
//! (sizes add up, the checksum recomputes, every path is inside an included
//! component).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Timelike, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Compression;
use crate::digest::{Blake3Digest, Checksum, Sha256Digest, Sha256Hasher};
use crate::id::{BackupId, Component, Trigger};
use crate::path::ArchivePath;

/// Major version of the manifest format this build reads and writes.
pub const MANIFEST_MAJOR: u32 = 1;
/// Minor version this build writes. Readers accept newer minors of the same
/// major and ignore the top-level fields they do not know.
pub const MANIFEST_MINOR: u32 = 3;
/// Largest manifest accepted, in bytes. About 200,000 files fit.
pub const MAX_MANIFEST_BYTES: usize = 32 * 1024 * 1024;

/// Where the persistence component came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// `synthorg.db`, a SQLite database (`VACUUM INTO` copy).
    #[default]
    Sqlite,
    /// `synthorg.pgdump`, a `pg_dump --format=custom` archive.
    Postgres,
}

impl Engine {
    /// The persistence file of this engine in a backup.
    pub fn file(self) -> &'static str {
        match self {
            Engine::Sqlite => "synthorg.db",
            Engine::Postgres => crate::path::PGDUMP_FILE,
        }
    }

    /// Whether it is SQLite (the default, left out of manifests).
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    pub fn is_sqlite(&self) -> bool {
        *self == Engine::Sqlite
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Sqlite => "SQLite",
            Engine::Postgres => "PostgreSQL",
        })
    }
}

/// The manifest of one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version, `"1.0"`.
    pub version: ManifestVersion,
    /// The backup's id.
    pub id: BackupId,
    /// Version of the SynthOrg app whose data this is (semver).
    pub synthorg_version: semver::Version,
    /// When the backup was started (UTC).
    pub timestamp: DateTime<Utc>,
    /// Why it was taken.
    pub trigger: Trigger,
    /// Components held, in canonical order.
    pub components: Vec<Component>,
    /// Components that were to be backed up but whose source did not exist
    /// (canonical order; since 1.1). A restore leaves them alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absent: Vec<Component>,
    /// Creation order in the store: one more than every backup listed when
    /// this one was created (since 1.1; 0 for older backups). Retention
    /// decides "newest" by it, so a clock that jumped cannot make a fresh
    /// backup look older than one dated in the future.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sequence: u64,
    /// `PRAGMA user_version` of `synthorg.db`; present exactly when
    /// persistence is included.
    pub db_schema_version: Option<i64>,
    /// The database engine the persistence component came from (since
    /// 1.2; SQLite, the default, is left out).
    #[serde(default, skip_serializing_if = "Engine::is_sqlite")]
    pub engine: Engine,
    /// Total size of all files, uncompressed, in bytes.
    pub size_bytes: u64,
    /// `sha256:` over the tree; see [`tree_checksum`].
    pub checksum: Checksum,
    /// How the backup is stored: `gzip`/`zstd` archive or `none` (directory).
    pub compression: Compression,
    /// The archive's own hash and size; absent for the directory form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveInfo>,
    /// Whether the archive (and the sidecar) is an age file (since 1.2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypted: bool,
    /// The recipients (public keys) it is encrypted to, in canonical
    /// spelling; present exactly when `encrypted` (since 1.2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// Every regular file, sorted by path.
    pub files: Vec<FileEntry>,
    /// Every directory (so that empty ones are restored), sorted by path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<DirEntry>,
    /// Symbolic links that stay inside their component, sorted by path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub symlinks: Vec<SymlinkEntry>,
    /// Free-form labels, e.g. `migration: "3->4"` on pre-migration backups.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A regular file in the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path inside the backup.
    pub path: ArchivePath,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content.
    pub sha256: Sha256Digest,
    /// Unix permission bits (restored; not part of the checksum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Modification time, Unix seconds (restored; not part of the checksum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<i64>,
    /// Owner's uid (since 1.1; used by a restore as root into an empty location).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Owner's gid (since 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// A directory in the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    /// Path inside the backup.
    pub path: ArchivePath,
    /// Unix permission bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Owner's uid (since 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Owner's gid (since 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// A symbolic link in the backup; `target` is relative and stays inside the
/// link's component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymlinkEntry {
    /// Path inside the backup.
    pub path: ArchivePath,
    /// Link target, relative to the link's directory.
    pub target: String,
}

/// The archive file of a compressed backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveInfo {
    /// SHA-256 of the archive bytes as stored.
    pub sha256: Sha256Digest,
    /// Size of the archive as stored, in bytes.
    pub size_bytes: u64,
    /// Offsets of independently compressed members (gzip members or zstd
    /// frames), for parallel decompression; empty when unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<u64>,
    /// Size of the archive before encryption, which the member offsets
    /// refer to (encrypted backups only, since 1.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_size_bytes: Option<u64>,
    /// BLAKE3 of the backup's pieces object (`<id>.pieces`: the
    /// [`PieceDigest`]s of the members, in order; since 1.3, unencrypted
    /// compressed archives): what a later backup reads to copy members
    /// instead of compressing their content again. Kept out of the
    /// manifest, which must stay small whatever the data size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pieces: Option<Blake3Digest>,
}

/// The BLAKE3 digests of one member of an archive: of the content it
/// holds (before compression) and of the member as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PieceDigest {
    /// BLAKE3 of the member's decompressed content.
    pub raw: Blake3Digest,
    /// BLAKE3 of the member's bytes as stored.
    pub packed: Blake3Digest,
}

impl PieceDigest {
    /// Bytes of one digest pair in a pieces object.
    pub const SIZE: usize = 64;

    /// The pieces object of `pieces`: each pair's 64 bytes, in order.
    pub fn encode(pieces: &[PieceDigest]) -> Vec<u8> {
        let mut out = Vec::with_capacity(pieces.len() * Self::SIZE);
        for p in pieces {
            out.extend_from_slice(p.raw.as_bytes());
            out.extend_from_slice(p.packed.as_bytes());
        }
        out
    }

    /// The pairs of a pieces object; `None` when its length is not a
    /// whole number of pairs.
    pub fn decode(bytes: &[u8]) -> Option<Vec<PieceDigest>> {
        if !bytes.len().is_multiple_of(Self::SIZE) {
            return None;
        }
        bytes
            .chunks_exact(Self::SIZE)
            .map(|pair| {
                let (raw, packed) = pair.split_at(32);
                Some(PieceDigest {
                    raw: Blake3Digest::from_bytes(raw.try_into().ok()?),
                    packed: Blake3Digest::from_bytes(packed.try_into().ok()?),
                })
            })
            .collect()
    }
}

/// `major.minor` of the manifest format, written as a string (`"1.0"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestVersion {
    /// Incompatible changes bump this; readers refuse unknown majors.
    pub major: u32,
    /// Compatible additions bump this.
    pub minor: u32,
}

impl ManifestVersion {
    /// The version this build writes.
    pub const CURRENT: ManifestVersion = ManifestVersion {
        major: MANIFEST_MAJOR,
        minor: MANIFEST_MINOR,
    };

    fn parse(raw: &str) -> Option<ManifestVersion> {
        let (major, minor) = raw.split_once('.')?;
        let num = |s: &str| {
            (!s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        Some(ManifestVersion {
            major: num(major)?,
            minor: num(minor)?,
        })
    }
}

impl fmt::Display for ManifestVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl Serialize for ManifestVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ManifestVersion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        ManifestVersion::parse(&raw).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid manifest version {raw:?}, expected \"1.x\""
            ))
        })
    }
}

/// Why bytes are not a usable manifest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Larger than [`MAX_MANIFEST_BYTES`]; not parsed.
    #[error("manifest is {size} bytes; the maximum is {MAX_MANIFEST_BYTES}")]
    TooLarge {
        /// Size seen (or at least this many bytes).
        size: u64,
    },
    /// Not JSON, or not of the manifest's shape.
    #[error("manifest is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// A major version this build does not know.
    #[error("manifest version {found} is not supported; this build reads {MANIFEST_MAJOR}.x")]
    UnsupportedVersion {
        /// The version found.
        found: String,
    },
    /// Parsed, but inconsistent with itself.
    #[error("manifest is inconsistent: {0}")]
    Inconsistent(String),
}

/// Only the version, read before anything else so that an unknown major is
/// reported as such rather than as a shape error.
#[derive(Deserialize)]
struct VersionProbe {
    version: serde_json::Value,
}

const KNOWN_FIELDS: &[&str] = &[
    "version",
    "id",
    "synthorg_version",
    "timestamp",
    "trigger",
    "components",
    "absent",
    "sequence",
    "db_schema_version",
    "size_bytes",
    "checksum",
    "compression",
    "archive",
    "files",
    "dirs",
    "symlinks",
    "labels",
];

const KNOWN_FILE_FIELDS: &[&str] = &["path", "size", "sha256", "mode", "mtime", "uid", "gid"];
const KNOWN_DIR_FIELDS: &[&str] = &["path", "mode", "uid", "gid"];
const KNOWN_SYMLINK_FIELDS: &[&str] = &["path", "target"];
const KNOWN_ARCHIVE_FIELDS: &[&str] = &[
    "sha256",
    "size_bytes",
    "members",
    "inner_size_bytes",
    "pieces",
];

impl Manifest {
    /// Parses and validates a manifest.
    ///
    /// # Errors
    /// [`ManifestError::TooLarge`] above [`MAX_MANIFEST_BYTES`] (checked
    /// before parsing), `UnsupportedVersion` for another major version,
    /// `Json` for malformed input or unknown fields, `Inconsistent` when
    /// [`Manifest::validate`] fails.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                size: bytes.len() as u64,
            });
        }
        let probe: VersionProbe = serde_json::from_slice(bytes)?;
        let version = probe
            .version
            .as_str()
            .and_then(ManifestVersion::parse)
            .ok_or_else(|| ManifestError::UnsupportedVersion {
                found: probe.version.to_string().chars().take(40).collect(),
            })?;
        if version.major != MANIFEST_MAJOR {
            return Err(ManifestError::UnsupportedVersion {
                found: version.to_string(),
            });
        }
        let manifest: Manifest = if version.minor > MANIFEST_MINOR {
            let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
            if let Some(obj) = value.as_object_mut() {
                obj.retain(|k, _| KNOWN_FIELDS.contains(&k.as_str()));
                // A newer minor may add fields to entries too.
                for (list, known) in [
                    ("files", KNOWN_FILE_FIELDS),
                    ("dirs", KNOWN_DIR_FIELDS),
                    ("symlinks", KNOWN_SYMLINK_FIELDS),
                ] {
                    if let Some(entries) = obj.get_mut(list).and_then(|v| v.as_array_mut()) {
                        for entry in entries.iter_mut().filter_map(|e| e.as_object_mut()) {
                            entry.retain(|k, _| known.contains(&k.as_str()));
                        }
                    }
                }
                if let Some(archive) = obj.get_mut("archive").and_then(|v| v.as_object_mut()) {
                    archive.retain(|k, _| KNOWN_ARCHIVE_FIELDS.contains(&k.as_str()));
                }
            }
            serde_json::from_value(value)?
        } else {
            serde_json::from_slice(bytes)?
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Parses the sidecar of backup `id`: [`Manifest::from_json`], and it
    /// must be `id`'s manifest. Errors come as `Error::Manifest` naming `id`.
    ///
    /// # Errors
    /// `Error::Manifest` for every problem of [`Manifest::from_json`] and
    /// for a sidecar holding another backup's manifest.
    pub fn from_sidecar(bytes: &[u8], id: &BackupId) -> crate::Result<Manifest> {
        let wrap = |source| crate::Error::Manifest {
            id: id.to_string(),
            source,
        };
        let manifest = Manifest::from_json(bytes).map_err(wrap)?;
        if &manifest.id != id {
            return Err(wrap(ManifestError::Inconsistent(format!(
                "sidecar of {id} holds the manifest of {}",
                manifest.id
            ))));
        }
        Ok(manifest)
    }

    /// Pretty JSON, as written to `manifest.json` and the sidecar.
    ///
    /// # Errors
    /// Never in practice (all fields serialize); typed for honesty.
    pub fn to_json(&self) -> Result<Vec<u8>, ManifestError> {
        let mut out = serde_json::to_vec_pretty(self)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Whether retention must leave this backup alone.
    pub fn is_pinned(&self) -> bool {
        self.trigger.is_pinned()
    }

    /// Checks the manifest against itself: id matches trigger and
    /// timestamp; components are unique and canonical; every path is unique
    /// and inside an included component; persistence ⇔ `synthorg.db` ⇔
    /// `db_schema_version`; `size_bytes` is the sum of file sizes; the
    /// checksum recomputes; the archive info matches the compression.
    ///
    /// # Errors
    /// [`ManifestError::Inconsistent`] naming the first problem found.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |msg: String| Err(ManifestError::Inconsistent(msg));
        if self.id.trigger() != self.trigger {
            return bad(format!(
                "id {} does not match trigger {}",
                self.id, self.trigger
            ));
        }
        if self.id.timestamp() != self.timestamp.with_nanosecond(0).unwrap_or(self.timestamp) {
            return bad(format!(
                "id {} does not match timestamp {}",
                self.id,
                self.timestamp.to_rfc3339()
            ));
        }
        if self.components.is_empty() {
            return bad("no components".into());
        }
        if !self.absent.windows(2).all(|w| w[0] < w[1])
            || self.absent.iter().any(|c| self.components.contains(c))
        {
            return bad(format!(
                "absent components {:?} are duplicated, unordered or also included",
                self.absent
            ));
        }
        let mut sorted = self.components.clone();
        sorted.sort();
        sorted.dedup();
        if sorted != self.components {
            return bad(format!(
                "components {:?} are duplicated or not in canonical order",
                self.components
            ));
        }
        if !self.files.windows(2).all(|w| w[0].path < w[1].path) {
            return bad("files are not sorted by path".into());
        }
        let mut seen = BTreeSet::new();
        let paths = self
            .files
            .iter()
            .map(|f| &f.path)
            .chain(self.dirs.iter().map(|d| &d.path))
            .chain(self.symlinks.iter().map(|s| &s.path));
        for path in paths {
            match path.component() {
                Some(c) if self.components.contains(&c) => {}
                Some(c) => return bad(format!("{path} belongs to {c}, which is not included")),
                None => return bad(format!("{path} is outside every component")),
            }
            if !seen.insert(path.as_str()) {
                return bad(format!("{path} is listed twice"));
            }
        }
        let db_files: Vec<&str> = self
            .files
            .iter()
            .filter(|f| f.path.component() == Some(Component::Persistence))
            .map(|f| f.path.as_str())
            .collect();
        if db_files.iter().any(|f| *f != self.engine.file()) {
            return bad(format!(
                "the {} persistence component must be {}, not {}",
                self.engine,
                self.engine.file(),
                db_files.join(", ")
            ));
        }
        let has_db = !db_files.is_empty();
        let includes_db = self.components.contains(&Component::Persistence);
        if has_db != includes_db || includes_db != self.db_schema_version.is_some() {
            return bad(
                "persistence, synthorg.db and db_schema_version must be present together".into(),
            );
        }
        let total = self
            .files
            .iter()
            .try_fold(0u64, |acc, f| acc.checked_add(f.size));
        if total != Some(self.size_bytes) {
            return bad(format!(
                "size_bytes {} is not the sum of the file sizes",
                self.size_bytes
            ));
        }
        let computed = tree_checksum(&self.files, &self.dirs, &self.symlinks);
        if computed != self.checksum {
            return bad(format!(
                "checksum {} does not match the file list ({computed})",
                self.checksum
            ));
        }
        // The copy inside an archive cannot hold the archive's own hash;
        // sidecars must (see `require_archive_info`).
        if !self.is_archive() && self.archive.is_some() {
            return bad("directory-form backup has archive info".into());
        }
        if self.encrypted == self.recipients.is_empty() {
            return bad("an encrypted backup names its recipients, and only it".into());
        }
        if self
            .archive
            .as_ref()
            .is_some_and(|a| a.inner_size_bytes.is_some() != self.encrypted)
        {
            return bad("inner_size_bytes is recorded exactly for encrypted archives".into());
        }
        for link in &self.symlinks {
            if link.target.is_empty()
                || link.target.starts_with('/')
                || link.target.chars().any(char::is_control)
            {
                return bad(format!("symlink {} has an invalid target", link.path));
            }
        }
        Ok(())
    }

    /// Whether the backup is one archive object (compressed or encrypted)
    /// rather than the directory form.
    pub fn is_archive(&self) -> bool {
        archive_kind(self.compression, self.encrypted).is_some()
    }

    /// Checks what only a sidecar can hold: the archive's hash and size
    /// for a compressed backup.
    ///
    /// # Errors
    /// [`ManifestError::Inconsistent`] when the archive info is missing.
    pub fn require_archive_info(&self) -> Result<&ArchiveInfo, ManifestError> {
        self.archive.as_ref().ok_or_else(|| {
            ManifestError::Inconsistent(format!(
                "{} backup {} lacks archive info in its sidecar",
                self.compression, self.id
            ))
        })
    }

    /// Bytes as stored: the archive, or the files of the directory form.
    pub fn stored_bytes(&self) -> u64 {
        self.archive
            .as_ref()
            .map_or(self.size_bytes, |a| a.size_bytes)
    }

    /// The file entry for `path`, if listed.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files
            .binary_search_by(|f| f.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.files[i])
    }

    /// Number of entries of every kind (files, dirs, links).
    pub fn entry_count(&self) -> usize {
        self.files.len() + self.dirs.len() + self.symlinks.len()
    }
}

/// What a listing shows of a backup: its manifest without the file list.
/// Stores publish it as `<id>.summary.json` next to the sidecar, so that
/// listing reads a few hundred bytes per backup instead of every file
/// entry. It is derived data: the sidecar manifest stays authoritative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Format version of the manifest it summarizes.
    pub version: ManifestVersion,
    /// The backup's id.
    pub id: BackupId,
    /// Version of the SynthOrg app whose data this is.
    pub synthorg_version: semver::Version,
    /// When the backup was started (UTC).
    pub timestamp: DateTime<Utc>,
    /// Why it was taken.
    pub trigger: Trigger,
    /// Components held.
    pub components: Vec<Component>,
    /// Components whose source did not exist when it was taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absent: Vec<Component>,
    /// Creation order in the store (see [`Manifest::sequence`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sequence: u64,
    /// `PRAGMA user_version` of `synthorg.db`, when included.
    pub db_schema_version: Option<i64>,
    /// The persistence component's engine (see [`Manifest::engine`]).
    #[serde(default, skip_serializing_if = "Engine::is_sqlite")]
    pub engine: Engine,
    /// Total size of all files, uncompressed.
    pub size_bytes: u64,
    /// Bytes as stored (the archive, or the files of the directory form).
    pub stored_bytes: u64,
    /// Number of files.
    pub file_count: u64,
    /// The tree checksum; left out for encrypted backups (it is derived
    /// from file names and contents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,
    /// How it is stored.
    pub compression: Compression,
    /// Whether it is encrypted (see [`Manifest::encrypted`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypted: bool,
    /// The recipients it is encrypted to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Summary {
    /// Whether retention must leave this backup alone.
    pub fn is_pinned(&self) -> bool {
        self.trigger.is_pinned()
    }

    /// Parses a summary with the manifest's size cap and version rule; it
    /// must name `id`.
    ///
    /// # Errors
    /// As [`Manifest::from_json`]; `Inconsistent` for another id.
    pub fn from_json(bytes: &[u8], id: &BackupId) -> Result<Summary, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                size: bytes.len() as u64,
            });
        }
        let summary: Summary = serde_json::from_slice(bytes)?;
        summary.check(id)?;
        Ok(summary)
    }

    /// The rules a parsed summary must meet: a supported major version,
    /// and it names `id` (and its trigger).
    ///
    /// # Errors
    /// `UnsupportedVersion`, or `Inconsistent` for another id.
    pub fn check(&self, id: &BackupId) -> Result<(), ManifestError> {
        if self.version.major != MANIFEST_MAJOR {
            return Err(ManifestError::UnsupportedVersion {
                found: self.version.to_string(),
            });
        }
        if &self.id != id || self.trigger != id.trigger() {
            return Err(ManifestError::Inconsistent(format!(
                "summary of {id} names {}",
                self.id
            )));
        }
        Ok(())
    }
}

/// Most labels on one backup.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 64;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 1024;

/// Characters a label may not hold: C0 and C1 controls (terminal escapes),
/// and the bidirectional overrides, embeddings, isolates and marks that
/// make text display as something else (Trojan Source).
pub fn is_unsafe_label_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Checks labels: at most [`MAX_LABELS`], keys non-empty and at most
/// [`MAX_LABEL_KEY`] bytes, values at most [`MAX_LABEL_VALUE`] bytes,
/// printable text only (see [`is_unsafe_label_char`]).
///
/// # Errors
/// The offending label (escaped) and what is wrong with it.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), (String, String)> {
    if labels.len() > MAX_LABELS {
        return Err((
            format!("{} labels", labels.len()),
            format!("at most {MAX_LABELS} labels are allowed"),
        ));
    }
    for (k, v) in labels {
        let name = k.escape_debug().to_string();
        if k.trim().is_empty() {
            return Err((name, "the key is empty".into()));
        }
        if k.len() > MAX_LABEL_KEY {
            return Err((
                name,
                format!("the key is longer than {MAX_LABEL_KEY} bytes"),
            ));
        }
        if v.len() > MAX_LABEL_VALUE {
            return Err((
                name,
                format!("the value is longer than {MAX_LABEL_VALUE} bytes"),
            ));
        }
        if let Some(c) = k
            .chars()
            .chain(v.chars())
            .find(|c| is_unsafe_label_char(*c))
        {
            return Err((
                name,
                format!(
                    "holds {}, a control or bidi-override character; labels are printable text",
                    c.escape_unicode()
                ),
            ));
        }
    }
    Ok(())
}

/// What a store found of a published backup's data when listing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No archive object and no directory.
    Nothing,
    /// The archive object, of this many bytes.
    Archive {
        /// Its size as stored.
        size: u64,
    },
    /// The directory of a directory-form backup.
    Directory,
}

impl Summary {
    /// Why the backup cannot be restored from what the store holds, if it
    /// cannot: its archive is missing or has another size than recorded
    /// (truncated, replaced), or its directory is gone. A listing shows
    /// such a backup as damaged, and retention never counts it as a copy.
    pub fn damage(&self, found: Found) -> Option<String> {
        let kind = archive_kind(self.compression, self.encrypted);
        match (kind, found) {
            (None, Found::Directory) => None,
            (None, _) => Some(format!("the directory {} is missing", self.id)),
            (Some(_), Found::Archive { size }) if size == self.stored_bytes => None,
            (Some(kind), Found::Archive { size }) => Some(format!(
                "the {kind} archive is {size} bytes, the manifest records {} (truncated or replaced)",
                self.stored_bytes
            )),
            (Some(kind), _) => Some(format!("the {kind} archive of {} is missing", self.id)),
        }
    }

    /// Whether the backup is one archive object (see [`Manifest::is_archive`]).
    pub fn is_archive(&self) -> bool {
        archive_kind(self.compression, self.encrypted).is_some()
    }
}

/// How a backup stored as one archive is written, e.g. `gzip`,
/// `encrypted zstd`, `encrypted tar`; `None` for the directory form.
pub fn archive_kind(compression: Compression, encrypted: bool) -> Option<String> {
    match (compression, encrypted) {
        (Compression::None, false) => None,
        (Compression::None, true) => Some("encrypted tar".into()),
        (c, false) => Some(c.to_string()),
        (c, true) => Some(format!("encrypted {c}")),
    }
}

impl From<&Manifest> for Summary {
    fn from(m: &Manifest) -> Summary {
        Summary {
            version: m.version,
            id: m.id.clone(),
            synthorg_version: m.synthorg_version.clone(),
            timestamp: m.timestamp,
            trigger: m.trigger,
            components: m.components.clone(),
            absent: m.absent.clone(),
            sequence: m.sequence,
            db_schema_version: m.db_schema_version,
            engine: m.engine,
            size_bytes: m.size_bytes,
            stored_bytes: m.stored_bytes(),
            file_count: m.files.len() as u64,
            checksum: (!m.encrypted).then_some(m.checksum),
            compression: m.compression,
            encrypted: m.encrypted,
            recipients: m.recipients.clone(),
            labels: m.labels.clone(),
        }
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

/// The manifest checksum: SHA-256 over every entry sorted by path (byte
/// order), each encoded as one line:
///
/// - file: `path NUL size NUL sha256hex LF`
/// - directory: `path NUL "dir" LF`
/// - symlink: `path NUL "link" NUL target LF`
///
/// Paths and targets cannot hold NUL or LF, sizes are decimal digits and
/// `dir`/`link` are not, so the encoding is injective: two different trees
/// never produce the same input to SHA-256. The same value results for the
/// archive and the directory form, since it covers only the tree.
pub fn tree_checksum(
    files: &[FileEntry],
    dirs: &[DirEntry],
    symlinks: &[SymlinkEntry],
) -> Checksum {
    let mut lines: Vec<(&str, String)> =
        Vec::with_capacity(files.len() + dirs.len() + symlinks.len());
    lines.extend(
        files
            .iter()
            .map(|f| (f.path.as_str(), format!("\0{}\0{}\n", f.size, f.sha256))),
    );
    lines.extend(dirs.iter().map(|d| (d.path.as_str(), "\0dir\n".to_owned())));
    lines.extend(
        symlinks
            .iter()
            .map(|s| (s.path.as_str(), format!("\0link\0{}\n", s.target))),
    );
    lines.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut hasher = Sha256Hasher::new();
    for (path, rest) in lines {
        hasher.update(path.as_bytes());
        hasher.update(rest.as_bytes());
    }
    Checksum(hasher.finish())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    pub(crate) fn file(path: &str, content: &[u8]) -> FileEntry {
        FileEntry {
            path: ArchivePath::parse(path).unwrap(),
            size: content.len() as u64,
            sha256: Sha256Digest::of(content),
            mode: Some(0o600),
            mtime: Some(1_700_000_000),
            uid: None,
            gid: None,
        }
    }

    /// A valid manifest of an archive backup with all four components.
    pub(crate) fn sample(id: &str) -> Manifest {
        let id = BackupId::parse(id).unwrap();
        let files = vec![
            file("checkpoints/t1/turn-1.json", b"{}"),
            file("config/company.yaml", b"name: acme\n"),
            file("memory/mem0.db", b"SQLite format 3\0..."),
            file("synthorg.db", b"SQLite format 3\0tasks"),
        ];
        let dirs = vec![DirEntry {
            path: ArchivePath::parse("memory/empty").unwrap(),
            mode: Some(0o700),
            uid: None,
            gid: None,
        }];
        Manifest {
            version: ManifestVersion::CURRENT,
            synthorg_version: semver::Version::new(1, 4, 0),
            timestamp: id.timestamp(),
            trigger: id.trigger(),
            id,
            components: Component::ALL.to_vec(),
            absent: Vec::new(),
            sequence: 0,
            db_schema_version: Some(3),
            engine: Engine::Sqlite,
            encrypted: false,
            recipients: Vec::new(),
            size_bytes: files.iter().map(|f| f.size).sum(),
            checksum: tree_checksum(&files, &dirs, &[]),
            compression: Compression::Gzip,
            archive: Some(ArchiveInfo {
                sha256: Sha256Digest::of(b"archive"),
                size_bytes: 1234,
                members: vec![0, 600],
                inner_size_bytes: None,
                pieces: None,
            }),
            files,
            dirs,
            symlinks: vec![],
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn round_trips_through_json() {
        let m = sample("2026-03-15T14-30-00_manual");
        m.validate().unwrap();
        let json = m.to_json().unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"version\": \"1.3\""));
        assert!(
            !text.contains("encrypted"),
            "unencrypted manifests do not say so"
        );
        assert!(text.contains("\"checksum\": \"sha256:"));
        assert!(text.contains("\"trigger\": \"manual\""));
        assert_eq!(Manifest::from_json(&json).unwrap(), m);

        // The pieces object's digest, as hex.
        let mut m = m;
        let digest = Blake3Digest::of(b"pieces");
        m.archive.as_mut().unwrap().pieces = Some(digest);
        let json = m.to_json().unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(&format!("\"pieces\": \"{digest}\"")));
        assert_eq!(Manifest::from_json(&json).unwrap(), m);
    }

    #[test]
    fn piece_digests_round_trip_through_their_object() {
        let pieces: Vec<PieceDigest> = (0u8..5)
            .map(|i| PieceDigest {
                raw: Blake3Digest::of(&[i]),
                packed: Blake3Digest::of(&[i, i]),
            })
            .collect();
        let bytes = PieceDigest::encode(&pieces);
        assert_eq!(bytes.len(), 5 * PieceDigest::SIZE);
        assert_eq!(PieceDigest::decode(&bytes), Some(pieces));
        assert_eq!(PieceDigest::decode(&bytes[..100]), None);
        assert_eq!(PieceDigest::decode(&[]), Some(Vec::new()));
    }

    #[test]
    fn encrypted_manifests_name_their_recipients_and_summaries_drop_the_checksum() {
        let mut m = sample("2026-03-15T14-30-00_manual");
        m.encrypted = true;
        assert!(m.validate().is_err(), "encrypted without recipients");
        m.recipients = vec!["age1x".into()];
        assert!(m.validate().is_err(), "no inner size recorded");
        if let Some(a) = m.archive.as_mut() {
            a.inner_size_bytes = Some(1000);
        }
        m.validate().unwrap();
        assert_eq!(Manifest::from_json(&m.to_json().unwrap()).unwrap(), m);
        let summary = Summary::from(&m);
        assert_eq!(summary.checksum, None);
        assert!(summary.encrypted && summary.recipients == ["age1x"]);
        let text = serde_json::to_string(&summary).unwrap();
        assert!(!text.contains("sha256"), "{text}");
        m.encrypted = false;
        assert!(m.validate().is_err(), "recipients without encryption");
        m.compression = Compression::None;
        m.encrypted = true;
        assert!(
            m.is_archive(),
            "an encrypted uncompressed backup is a .tar.age"
        );
    }

    #[test]
    fn refuses_oversized_input_before_parsing() {
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(
            Manifest::from_json(&huge),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    #[test]
    fn refuses_unknown_major_and_invalid_json() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&sample("2026-03-15T14-30-00_manual").to_json().unwrap())
                .unwrap();
        v["version"] = "2.0".into();
        let err = Manifest::from_json(v.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, ManifestError::UnsupportedVersion { ref found } if found == "2.0"));
        assert!(matches!(
            Manifest::from_json(b"{not json"),
            Err(ManifestError::Json(_))
        ));
        assert!(matches!(
            Manifest::from_json(br#"{"version": 1}"#),
            Err(ManifestError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn newer_minor_ignores_unknown_top_level_fields_but_current_minor_is_strict() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&sample("2026-03-15T14-30-00_manual").to_json().unwrap())
                .unwrap();
        v["future_field"] = 7.into();
        assert!(matches!(
            Manifest::from_json(v.to_string().as_bytes()),
            Err(ManifestError::Json(_))
        ));
        v["version"] = "1.9".into();
        assert!(Manifest::from_json(v.to_string().as_bytes()).is_ok());
        // ...and unknown fields inside entries (a 1.9 file's new attribute).
        v["files"][0]["xattrs"] = serde_json::json!({"user.a": "b"});
        v["dirs"][0]["acl"] = "x".into();
        v["archive"]["codec_params"] = 3.into();
        let parsed = Manifest::from_json(v.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.files, sample("2026-03-15T14-30-00_manual").files);
        v["version"] = MANIFEST_MINOR_STRING.into();
        assert!(Manifest::from_json(v.to_string().as_bytes()).is_err());
    }

    const MANIFEST_MINOR_STRING: &str = "1.3";

    #[test]
    fn validate_catches_each_inconsistency() {
        let base = sample("2026-03-15T14-30-00_manual");
        type Mutation = Box<dyn Fn(&mut Manifest)>;
        let mutations: Vec<(&str, Mutation)> = vec![
            ("trigger", Box::new(|m| m.trigger = Trigger::Scheduled)),
            (
                "timestamp",
                Box::new(|m| m.timestamp = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap()),
            ),
            ("size", Box::new(|m| m.size_bytes += 1)),
            (
                "checksum",
                Box::new(|m| m.files[0].sha256 = Sha256Digest::of(b"x")),
            ),
            (
                "duplicate",
                Box::new(|m| {
                    let f = m.files[0].clone();
                    m.files.push(f);
                }),
            ),
            (
                "component",
                Box::new(|m| m.components.retain(|c| *c != Component::Memory)),
            ),
            ("schema", Box::new(|m| m.db_schema_version = None)),
            ("archive", Box::new(|m| m.compression = Compression::None)),
            (
                "components dup",
                Box::new(|m| m.components.push(Component::Config)),
            ),
        ];
        for (what, mutate) in mutations {
            let mut m = base.clone();
            mutate(&mut m);
            assert!(
                matches!(m.validate(), Err(ManifestError::Inconsistent(_))),
                "{what} not caught"
            );
        }
    }

    #[test]
    fn checksum_differs_when_bytes_move_between_name_and_content() {
        // "a" + content "b1" vs "ab" + content "1": naive concatenation collides.
        let one = [file("memory/a", b"b1")];
        let two = [file("memory/ab", b"1")];
        assert_ne!(tree_checksum(&one, &[], &[]), tree_checksum(&two, &[], &[]));
        // A file and an empty directory of the same name differ too.
        let as_dir = [DirEntry {
            path: ArchivePath::parse("memory/a").unwrap(),
            mode: None,
            uid: None,
            gid: None,
        }];
        let as_file = [file("memory/a", b"")];
        assert_ne!(
            tree_checksum(&[], &as_dir, &[]),
            tree_checksum(&as_file, &[], &[])
        );
    }

    #[test]
    fn checksum_ignores_order_of_input_and_metadata() {
        let a = [file("memory/x", b"1"), file("memory/y", b"2")];
        let mut b = [file("memory/y", b"2"), file("memory/x", b"1")];
        b[0].mode = Some(0o644);
        assert_eq!(tree_checksum(&a, &[], &[]), tree_checksum(&b, &[], &[]));
    }

    fn arb_tree() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        proptest::collection::btree_map(
            "memory/[a-c]{1,3}(/[a-c]{1,2})?",
            proptest::collection::vec(0u8..4, 0..4),
            0..5,
        )
        .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #[test]
        fn different_trees_never_share_a_checksum(a in arb_tree(), b in arb_tree()) {
            prop_assume!(a != b);
            let fa: Vec<_> = a.iter().map(|(p, c)| file(p, c)).collect();
            let fb: Vec<_> = b.iter().map(|(p, c)| file(p, c)).collect();
            prop_assert_ne!(tree_checksum(&fa, &[], &[]), tree_checksum(&fb, &[], &[]));
        }

        #[test]
        fn from_json_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Manifest::from_json(&bytes);
        }
    }
}
