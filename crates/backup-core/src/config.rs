//! The `backup:` block of the SynthOrg YAML config: one serde struct with
//! defaults and validation, loaded by figment from YAML text, then
//! `SYNTHORG_BACKUP__<KEY>` environment overrides (nested keys joined with
//! `__`, e.g. `SYNTHORG_BACKUP__RETENTION__MAX_COUNT=20`).
//!
//! This module never reads files: the caller hands over the YAML text and
//! the directory that relative paths resolve against.

use std::fmt;
use std::path::{Component as PathComponent, Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Yaml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::id::Component;

/// Prefix of environment overrides (`SYNTHORG_BACKUP__SCHEDULE_HOURS=12`).
pub const ENV_PREFIX: &str = "SYNTHORG_BACKUP__";

/// How a backup is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// `<id>.tar.gz` (the default; `compression: true`).
    #[default]
    Gzip,
    /// `<id>.tar.zst`.
    Zstd,
    /// The directory form `<id>/` (`compression: false`).
    None,
}

impl Compression {
    /// Name used in config and manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }

    /// Allowed `compression_level` range.
    pub fn level_range(self) -> Option<(u32, u32)> {
        match self {
            Compression::Gzip => Some((1, 9)),
            Compression::Zstd => Some((1, 22)),
            Compression::None => None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Compression {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Name(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Flag(true) => Ok(Compression::Gzip),
            Raw::Flag(false) => Ok(Compression::None),
            Raw::Name(name) => match name.as_str() {
                "gzip" | "true" => Ok(Compression::Gzip),
                "zstd" => Ok(Compression::Zstd),
                "none" | "false" => Ok(Compression::None),
                other => Err(serde::de::Error::custom(format!(
                    "unknown compression {other:?}; expected true, false, gzip, zstd or none"
                ))),
            },
        }
    }
}

/// `backup.retention`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Most backups kept (pinned pre-migration backups not counted). 1–1000.
    #[serde(deserialize_with = "bounded::<_, 1, 1000>")]
    pub max_count: u32,
    /// Oldest backup kept, in days. 1–3650.
    #[serde(deserialize_with = "bounded::<_, 1, 3650>")]
    pub max_age_days: u32,
    /// Also keep the newest backup of each of the last N days (restic-style).
    #[serde(default, deserialize_with = "bounded_opt::<_, 1, 3650>")]
    pub keep_daily: Option<u32>,
    /// Also keep the newest backup of each of the last N ISO weeks.
    #[serde(default, deserialize_with = "bounded_opt::<_, 1, 520>")]
    pub keep_weekly: Option<u32>,
    /// Also keep the newest backup of each of the last N months.
    #[serde(default, deserialize_with = "bounded_opt::<_, 1, 120>")]
    pub keep_monthly: Option<u32>,
    /// Most `pre-restore` safety backups kept, in a pool of their own (they
    /// take no `max_count` slot). 1–100.
    #[serde(deserialize_with = "bounded::<_, 1, 100>")]
    pub keep_pre_restore: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_count: 10,
            max_age_days: 30,
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
            keep_pre_restore: 3,
        }
    }
}

/// `backup.quiesce`: commands that pause and resume the memory writer
/// around its snapshot (e.g. a `curl` to the app's own pause endpoint),
/// for hosts that do not pause it in process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuiesceConfig {
    /// Run before the memory snapshot; must exit 0 once the writer is paused.
    pub pause: Vec<String>,
    /// Run after it, always (also after errors, timeouts, cancellation).
    pub resume: Vec<String>,
}

/// The events a notification can be about.
pub const NOTIFY_EVENTS: [&str; 6] = [
    "backup.succeeded",
    "backup.failed",
    "restore.succeeded",
    "restore.failed",
    "verify.failed",
    "backup.overdue",
];

/// `backup.notify`: where events go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Each event is POSTed as JSON to every URL (`http://` or `https://`).
    pub webhooks: Vec<Secret>,
    /// A program run with the event's JSON on stdin (argv).
    pub command: Vec<String>,
    /// Which events are sent; all by default.
    pub events: Vec<String>,
    /// Per-attempt timeout, 1–300 s.
    #[serde(deserialize_with = "bounded::<_, 1, 300>")]
    pub timeout_secs: u32,
    /// Attempts per delivery (with backoff), 1–10.
    #[serde(deserialize_with = "bounded::<_, 1, 10>")]
    pub attempts: u32,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            webhooks: Vec::new(),
            command: Vec::new(),
            events: NOTIFY_EVENTS.iter().map(|e| (*e).to_owned()).collect(),
            timeout_secs: 10,
            attempts: 3,
        }
    }
}

impl NotifyConfig {
    /// Whether anything is configured to receive events.
    pub fn is_enabled(&self) -> bool {
        !self.webhooks.is_empty() || !self.command.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (i, url) in self.webhooks.iter().enumerate() {
            let raw = url.expose();
            let rest = raw
                .strip_prefix("https://")
                .or_else(|| raw.strip_prefix("http://"));
            let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
            if host.is_none_or(|h| h.is_empty() || h.chars().any(char::is_whitespace)) {
                return Err(invalid(
                    format!("backup.notify.webhooks[{i}]"),
                    "must be an http:// or https:// URL with a host",
                ));
            }
        }
        for e in &self.events {
            if !NOTIFY_EVENTS.contains(&e.as_str()) {
                return Err(invalid(
                    "backup.notify.events",
                    format!("unknown event {e:?}; known: {}", NOTIFY_EVENTS.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

/// `backup.sources`: where the live SynthOrg data is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// The SQLite database (`synthorg.db`, WAL mode).
    pub database: PathBuf,
    /// Agent memory directory.
    pub memory_dir: PathBuf,
    /// The company YAML config file.
    pub company_config: PathBuf,
    /// Per-turn checkpoints directory.
    pub checkpoints_dir: PathBuf,
    /// A PostgreSQL database instead of `database`:
    /// `postgres://user[:password]@host[:port]/dbname`. The password may
    /// also come from `PGPASSWORD` or a `.pgpass` file; it is never shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<DatabaseUrl>,
    /// SQL returning one integer, the PostgreSQL schema version recorded
    /// as `db_schema_version`. Unset: the highest `version` in table
    /// `public.schema_version`, 0 when there is no such table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version_query: Option<String>,
}

/// A PostgreSQL connection URL. Its password never shows: `Debug`,
/// `Display` and serialization print `***` in its place.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    raw: String,
    /// Byte range of the password in `raw`, if any.
    password: Option<(usize, usize)>,
    dbname: String,
}

impl DatabaseUrl {
    /// Parses `postgres://[user[:password]@][host][:port]/dbname[?params]`.
    ///
    /// # Errors
    /// What is wrong, without the password.
    pub fn parse(raw: &str) -> Result<DatabaseUrl, String> {
        let rest = raw
            .strip_prefix("postgres://")
            .or_else(|| raw.strip_prefix("postgresql://"))
            .ok_or("must start with postgres:// or postgresql://")?;
        let scheme = raw.len() - rest.len();
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let password = authority.rfind('@').and_then(|at| {
            let userinfo = &authority[..at];
            userinfo.find(':').map(|c| (scheme + c + 1, scheme + at))
        });
        let dbname = path.split('?').next().unwrap_or_default();
        if dbname.is_empty() {
            return Err("names no database (postgres://user@host:port/dbname)".into());
        }
        let dbname = percent_decode(dbname)?;
        if dbname.len() > 36
            || !dbname
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(format!(
                "database name {dbname:?} must be at most 36 of a-z 0-9 _ (a restore creates <name>__restore_<timestamp> beside it)"
            ));
        }
        Ok(DatabaseUrl {
            raw: raw.to_owned(),
            password,
            dbname,
        })
    }

    /// The URL itself, password included, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// The URL without its password (for child processes, which get the
    /// password through the environment instead of their command line).
    pub fn without_password(&self) -> String {
        match self.password {
            Some((a, b)) => format!("{}{}", &self.raw[..a - 1], &self.raw[b..]),
            None => self.raw.clone(),
        }
    }

    /// The password in the URL, decoded, if any.
    pub fn password(&self) -> Option<String> {
        self.password
            .and_then(|(a, b)| percent_decode(&self.raw[a..b]).ok())
    }

    /// The database's name.
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// The URL with `***` for its password.
    pub fn redacted(&self) -> String {
        match self.password {
            Some((a, b)) => format!("{}***{}", &self.raw[..a], &self.raw[b..]),
            None => self.raw.clone(),
        }
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("has a malformed %-escape")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8 after %-decoding".to_owned())
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        DatabaseUrl::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl SourcesConfig {
    /// The engine of the persistence component: PostgreSQL when
    /// `database_url` is set.
    pub fn engine(&self) -> crate::manifest::Engine {
        if self.database_url.is_some() {
            crate::manifest::Engine::Postgres
        } else {
            crate::manifest::Engine::Sqlite
        }
    }
}

impl Default for SourcesConfig {
    fn default() -> Self {
        SourcesConfig {
            database: PathBuf::from("./data/synthorg.db"),
            memory_dir: PathBuf::from("./data/memory"),
            company_config: PathBuf::from("./company.yaml"),
            checkpoints_dir: PathBuf::from("./data/checkpoints"),
            database_url: None,
            schema_version_query: None,
        }
    }
}

/// `backup.encryption`: encrypt new backups with age.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Public keys new backups are encrypted to (`age1…`, `ssh-ed25519 …`,
    /// `ssh-rsa …`); at least one.
    pub recipients: Vec<String>,
    /// The private key that decrypts them (age identity file or unencrypted
    /// OpenSSH key), needed to verify, restore, export and show; not to
    /// back up.
    pub identity_file: Option<PathBuf>,
}

/// A secret string: never shown by `Debug`, `Display` or serialization.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

/// `backup.s3`: when present, backups go to this bucket instead of `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Bucket name (must exist).
    pub bucket: String,
    /// Key prefix, e.g. `prod/`; empty for the bucket root.
    #[serde(default)]
    pub prefix: String,
    /// Endpoint URL for MinIO, Garage and the like; AWS when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region, `us-east-1` by default.
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style addressing; defaults to on when an endpoint is set.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Access key id; else `AWS_ACCESS_KEY_ID`.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key; else `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// Multipart part size in MiB. 5–5120, default 8.
    #[serde(
        default = "default_part_size",
        deserialize_with = "bounded::<_, 5, 5120>"
    )]
    pub part_size_mib: u32,
    /// Retries of a failed request (connection errors, 5xx, throttling),
    /// with exponential backoff. 0–100, default 10.
    #[serde(
        default = "default_max_retries",
        deserialize_with = "bounded::<_, 0, 100>"
    )]
    pub max_retries: u32,
    /// Give up retrying a request after this many seconds. 1–3600,
    /// default 180.
    #[serde(
        default = "default_retry_timeout",
        deserialize_with = "bounded::<_, 1, 3600>"
    )]
    pub retry_timeout_secs: u32,
}

fn default_max_retries() -> u32 {
    10
}

fn default_retry_timeout() -> u32 {
    180
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_part_size() -> u32 {
    8
}

impl S3Config {
    /// Whether to use path-style addressing (explicit, or on with an endpoint).
    pub fn path_style(&self) -> bool {
        self.path_style.unwrap_or(self.endpoint.is_some())
    }

    /// Whether plain HTTP is allowed: only when the endpoint says `http://`.
    pub fn allow_http(&self) -> bool {
        self.endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
    }
}

/// The `backup:` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Master switch for automatic backups (scheduled, startup, shutdown).
    pub enabled: bool,
    /// Local-disk target, used when there is no `s3` block; with one, where
    /// a restore keeps its safety backup (see `safety_pool`).
    pub path: PathBuf,
    /// Hours between scheduled backups. 1–168.
    #[serde(deserialize_with = "bounded::<_, 1, 168>")]
    pub schedule_hours: u32,
    /// What to keep.
    pub retention: RetentionConfig,
    /// Back up synchronously on shutdown.
    pub on_shutdown: bool,
    /// Back up after startup, before serving.
    pub on_startup: bool,
    /// `true` (gzip), `false` (none), `gzip`, `zstd` or `none`.
    pub compression: Compression,
    /// Compression level; gzip 1–9, zstd 1–22; a measured default when absent.
    pub compression_level: Option<u32>,
    /// Components to back up, each at most once.
    pub include: Vec<Component>,
    /// Where the live data is.
    pub sources: SourcesConfig,
    /// S3-compatible target; overrides `path` when present.
    pub s3: Option<S3Config>,
    /// Client-side encryption of new backups; off when absent.
    #[serde(default)]
    pub encryption: Option<EncryptionConfig>,
    /// Commands pausing the memory writer (when no in-process hook is given).
    #[serde(default)]
    pub quiesce: Option<QuiesceConfig>,
    /// Notifications of successes and failures.
    #[serde(default)]
    pub notify: NotifyConfig,
    /// Hours between verifications of the newest backup by the runtime
    /// (full re-read, re-hash and staged checks); 0 = off. 0–8760.
    #[serde(deserialize_with = "bounded::<_, 0, 8760>")]
    pub verify_every_hours: u32,
    /// Longest the memory writer may stay paused for a snapshot. 1–3600 s.
    #[serde(deserialize_with = "bounded::<_, 1, 3600>")]
    pub quiesce_timeout_secs: u32,
    /// Longest the pre-shutdown backup may take. 1–86400 s.
    #[serde(deserialize_with = "bounded::<_, 1, 86400>")]
    pub shutdown_timeout_secs: u32,
    /// The newest database schema (`PRAGMA user_version`) the installed app
    /// supports, for restores without a live database to read it from.
    /// 0–2147483647; unset by default.
    #[serde(default, deserialize_with = "bounded_opt::<_, 0, 2147483647>")]
    pub supported_schema: Option<u32>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            enabled: true,
            path: PathBuf::from("./data/backups"),
            schedule_hours: 6,
            retention: RetentionConfig::default(),
            on_shutdown: true,
            on_startup: true,
            compression: Compression::Gzip,
            compression_level: None,
            include: Component::ALL.to_vec(),
            sources: SourcesConfig::default(),
            s3: None,
            encryption: None,
            quiesce_timeout_secs: 30,
            shutdown_timeout_secs: 300,
            supported_schema: None,
            quiesce: None,
            notify: NotifyConfig::default(),
            verify_every_hours: 24,
        }
    }
}

/// A config that cannot be used. Every message names the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// YAML syntax, unknown key, wrong type or out-of-range number.
    #[error("invalid configuration: {key}: {reason} (from {source_name})")]
    Parse {
        /// Dotted key, e.g. `backup.schedule_hours`; empty for syntax errors.
        key: String,
        /// What is wrong and what is allowed.
        reason: String,
        /// Where the value came from: the YAML file or an environment variable.
        source_name: String,
    },
    /// A value that parsed but is not allowed.
    #[error("invalid configuration: {key}: {reason}")]
    Invalid {
        /// Dotted key, e.g. `backup.include`.
        key: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        let key = e.path.join(".");
        let from_env = e
            .metadata
            .as_ref()
            .is_some_and(|m| m.name.contains("environment"));
        let source_name = if from_env && !key.is_empty() {
            format!(
                "environment variable SYNTHORG_{}",
                e.path.join("__").to_ascii_uppercase()
            )
        } else {
            "YAML".to_owned()
        };
        ConfigError::Parse {
            key: if key.is_empty() {
                "<document>".to_owned()
            } else {
                key
            },
            reason: e.kind.to_string(),
            source_name,
        }
    }
}

/// The whole config file: only `backup` is ours; other top-level keys belong
/// to the app and are left alone.
#[derive(Deserialize)]
struct Root {
    #[serde(default)]
    backup: Option<BackupConfig>,
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl BackupConfig {
    /// Loads the `backup:` block from YAML text (the whole config file; other
    /// top-level keys are left to their owners), applies `SYNTHORG_BACKUP__*`
    /// overrides from the process environment, validates, and resolves
    /// relative paths against `base_dir` (the config file's directory).
    ///
    /// # Errors
    /// [`ConfigError`] naming the offending key.
    pub fn load(yaml: Option<&str>, base_dir: &Path) -> Result<BackupConfig, ConfigError> {
        let mut figment = Figment::new();
        if let Some(yaml) = yaml {
            figment = figment.merge(Yaml::string(yaml));
        }
        figment = figment.merge(
            Env::prefixed("SYNTHORG_")
                .filter(|k| k.as_str().to_ascii_lowercase().starts_with("backup__"))
                .split("__"),
        );
        let config = Self::from_figment(&figment)?.resolve_paths(base_dir);
        if config.sources.database_url.is_some()
            && figment.find_value("backup.sources.database").is_ok()
        {
            return Err(invalid(
                "backup.sources.database_url",
                "and backup.sources.database are both set; a deployment keeps its state in one of them (PostgreSQL or SQLite): remove one",
            ));
        }
        config.check_layout()?;
        Ok(config)
    }

    /// Checks that the local backup directory and the sources stay apart
    /// (after path resolution): `backup.path` equal to, inside or
    /// containing `memory_dir` or `checkpoints_dir` would back up earlier
    /// backups into each new one (or restore over them), and equal to the
    /// database or config file it would replace them. Beside the sources in
    /// the same data directory is fine. Lexical: both paths as configured.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `backup.path` and the source.
    pub fn check_layout(&self) -> Result<(), ConfigError> {
        // With S3 too: there it holds the restores' safety backups.
        let path = &self.path;
        for (key, dir) in [
            ("backup.sources.memory_dir", &self.sources.memory_dir),
            (
                "backup.sources.checkpoints_dir",
                &self.sources.checkpoints_dir,
            ),
        ] {
            let relation = if path == dir {
                Some("is the same directory as")
            } else if path.starts_with(dir) {
                Some("is inside")
            } else if dir.starts_with(path) {
                Some("contains")
            } else {
                None
            };
            if let Some(relation) = relation {
                return Err(invalid(
                    "backup.path",
                    format!(
                        "{} {relation} {key} ({}); keep backups outside the data they protect, e.g. beside it",
                        path.display(),
                        dir.display()
                    ),
                ));
            }
        }
        for (key, file) in [
            ("backup.sources.database", &self.sources.database),
            (
                "backup.sources.company_config",
                &self.sources.company_config,
            ),
        ] {
            if path == file {
                return Err(invalid(
                    "backup.path",
                    format!("{} is the same path as {key}", path.display()),
                ));
            }
        }
        Ok(())
    }

    /// Extracts and validates the `backup` key of a figment (no path resolution).
    ///
    /// # Errors
    /// [`ConfigError`] naming the offending key.
    pub fn from_figment(figment: &Figment) -> Result<BackupConfig, ConfigError> {
        let config = figment.extract::<Root>()?.backup.unwrap_or_default();
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: duplicate components, `..` in paths,
    /// level ranges, S3 names.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.include.is_empty() {
            return Err(invalid(
                "backup.include",
                "must list at least one of persistence, memory, config, checkpoints",
            ));
        }
        for (i, c) in self.include.iter().enumerate() {
            if self.include[..i].contains(c) {
                return Err(invalid("backup.include", format!("{c} is listed twice")));
            }
        }
        if let (Some(level), Some((lo, hi))) =
            (self.compression_level, self.compression.level_range())
            && !(lo..=hi).contains(&level)
        {
            return Err(invalid(
                "backup.compression_level",
                format!(
                    "{level} is out of range for {}: {lo}–{hi}",
                    self.compression
                ),
            ));
        }
        for (key, path) in [
            ("backup.path", &self.path),
            ("backup.sources.database", &self.sources.database),
            ("backup.sources.memory_dir", &self.sources.memory_dir),
            (
                "backup.sources.company_config",
                &self.sources.company_config,
            ),
            (
                "backup.sources.checkpoints_dir",
                &self.sources.checkpoints_dir,
            ),
        ] {
            check_path(key, path)?;
        }
        if let Some(s3) = &self.s3 {
            s3.validate()?;
        }
        if let Some(e) = &self.encryption {
            e.validate()?;
        }
        if let Some(q) = &self.quiesce
            && (q.pause.is_empty() || q.resume.is_empty())
        {
            return Err(invalid(
                "backup.quiesce",
                "needs both pause and resume, each a non-empty command (argv list)",
            ));
        }
        self.notify.validate()
    }

    /// Makes relative paths absolute against `base_dir`. Pure path joining.
    pub fn resolve_paths(mut self, base_dir: &Path) -> BackupConfig {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                let joined: PathBuf = base_dir
                    .join(&*p)
                    .components()
                    .filter(|c| *c != PathComponent::CurDir)
                    .collect();
                *p = joined;
            }
        };
        resolve(&mut self.path);
        resolve(&mut self.sources.database);
        resolve(&mut self.sources.memory_dir);
        resolve(&mut self.sources.company_config);
        resolve(&mut self.sources.checkpoints_dir);
        if let Some(file) = self
            .encryption
            .as_mut()
            .and_then(|e| e.identity_file.as_mut())
        {
            resolve(file);
        }
        self
    }

    /// The retention policy of this config.
    pub fn retention_policy(&self) -> crate::retention::RetentionPolicy {
        crate::retention::RetentionPolicy::from(&self.retention)
    }
}

impl EncryptionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.recipients().map(|_| ())?;
        if let Some(file) = &self.identity_file
            && file.as_os_str().is_empty()
        {
            return Err(invalid(
                "backup.encryption.identity_file",
                "is empty; leave it out on a host that only backs up",
            ));
        }
        Ok(())
    }

    /// The recipients, parsed.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the entry and what is wrong.
    pub fn recipients(&self) -> Result<crate::crypt::Recipients, ConfigError> {
        crate::crypt::Recipients::parse(&self.recipients).map_err(|(i, reason)| match i {
            Some(i) => invalid(format!("backup.encryption.recipients[{i}]"), reason),
            None => invalid(
                "backup.encryption.recipients",
                format!(
                    "{reason}: new backups are encrypted to them (a host that only restores lists its own identity's recipient; `synthorg key generate` makes one)"
                ),
            ),
        })
    }
}

impl S3Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let b = &self.bucket;
        if b.len() < 3
            || b.len() > 63
            || !b
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        {
            return Err(invalid(
                "backup.s3.bucket",
                format!("{b:?} is not a valid bucket name (3–63 of a-z, 0-9, '-', '.')"),
            ));
        }
        if self.prefix.starts_with('/')
            || self.prefix.split('/').any(|s| s == ".." || s == ".")
            || self.prefix.contains("//")
            || self.prefix.chars().any(char::is_control)
        {
            return Err(invalid(
                "backup.s3.prefix",
                format!(
                    "{:?} must be relative, without '.', '..' or empty segments",
                    self.prefix
                ),
            ));
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "backup.s3.endpoint",
                format!("{endpoint:?} must start with http:// or https://"),
            ));
        }
        if self.region.is_empty() {
            return Err(invalid("backup.s3.region", "must not be empty"));
        }
        Ok(())
    }
}

/// Checks that `text` is a YAML mapping (the shape of the company config),
/// for verifying a staged config before it replaces the live one.
///
/// # Errors
/// The parser's message, with line and column.
pub fn check_yaml(text: &str) -> Result<(), String> {
    Figment::from(Yaml::string(text))
        .extract::<figment::value::Dict>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn check_path(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if path.components().any(|c| c == PathComponent::ParentDir) {
        return Err(invalid(
            key,
            format!(
                "{} contains '..'; use a path without parent references",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Deserializes an integer and checks `MIN..=MAX`, so that the error (with
/// figment's key) says the allowed range.
fn bounded<'de, D: Deserializer<'de>, const MIN: u32, const MAX: u32>(
    deserializer: D,
) -> Result<u32, D::Error> {
    let raw = i64::deserialize(deserializer)?;
    u32::try_from(raw)
        .ok()
        .filter(|v| (MIN..=MAX).contains(v))
        .ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Signed(raw),
                &format!("an integer from {MIN} to {MAX}").as_str(),
            )
        })
}

fn bounded_opt<'de, D: Deserializer<'de>, const MIN: u32, const MAX: u32>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    bounded::<D, MIN, MAX>(deserializer).map(Some)
}

#[cfg(test)]
// figment's `Jail` closures return its large error type; fine in tests.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_hide_their_password_everywhere() {
        let url = DatabaseUrl::parse(
            "postgres://app:s%40cret@db.internal:5433/synthorg_app?sslmode=disable",
        )
        .unwrap();
        assert_eq!(url.dbname(), "synthorg_app");
        assert_eq!(url.password().as_deref(), Some("s@cret"));
        assert_eq!(
            url.redacted(),
            "postgres://app:***@db.internal:5433/synthorg_app?sslmode=disable"
        );
        assert_eq!(
            url.without_password(),
            "postgres://app@db.internal:5433/synthorg_app?sslmode=disable"
        );
        for shown in [
            format!("{url}"),
            format!("{url:?}"),
            serde_json::to_string(&url).unwrap(),
        ] {
            assert!(!shown.contains("cret"), "{shown}");
        }
        let plain = DatabaseUrl::parse("postgresql://app@localhost/synthorg").unwrap();
        assert_eq!(plain.password(), None);
        assert_eq!(plain.redacted(), "postgresql://app@localhost/synthorg");
        for (bad, why) in [
            ("mysql://x/y", "postgres://"),
            ("postgres://host", "names no database"),
            ("postgres://host/", "names no database"),
            ("postgres://host/My-DB", "a-z 0-9 _"),
            ("postgres://host/%zz", "%-escape"),
        ] {
            let e = DatabaseUrl::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
    use figment::Jail;

    /// Loads inside a figment `Jail`, which serializes every test that
    /// touches the environment, so that env overrides of one test never
    /// leak into another.
    fn load(yaml: &str) -> Result<BackupConfig, ConfigError> {
        let mut out = None;
        Jail::expect_with(|_| {
            out = Some(BackupConfig::load(Some(yaml), Path::new("/etc/synthorg")));
            Ok(())
        });
        out.expect("jail ran")
    }

    fn err_text(yaml: &str) -> String {
        load(yaml).expect_err(yaml).to_string()
    }

    #[test]
    fn check_yaml_accepts_mappings_only() {
        assert!(check_yaml("company:\n  name: acme\n").is_ok());
        assert!(check_yaml("company: [\n").is_err());
        assert!(check_yaml("- a\n- b\n").is_err());
    }

    #[test]
    fn defaults_match_the_documented_seed() {
        let mut out = None;
        Jail::expect_with(|_| {
            out = Some(BackupConfig::load(None, Path::new("/srv")));
            Ok(())
        });
        let c = out.unwrap().unwrap();
        assert!(c.enabled && c.on_shutdown && c.on_startup);
        assert_eq!(c.schedule_hours, 6);
        assert_eq!(c.retention.max_count, 10);
        assert_eq!(c.retention.max_age_days, 30);
        assert_eq!(c.compression, Compression::Gzip);
        assert_eq!(c.include, Component::ALL.to_vec());
        assert_eq!(c.path, PathBuf::from("/srv/data/backups"));
        assert_eq!(c.sources.database, PathBuf::from("/srv/data/synthorg.db"));
        assert_eq!(c.sources.company_config, PathBuf::from("/srv/company.yaml"));
        assert!(c.s3.is_none());
    }

    #[test]
    fn parses_the_full_documented_block() {
        let c = load(
            r#"
company: { name: acme }          # other top-level keys belong to the app
backup:
  enabled: false
  path: /var/backups/synthorg
  schedule_hours: 12
  retention: { max_count: 5, max_age_days: 7, keep_daily: 7 }
  on_shutdown: false
  on_startup: true
  compression: zstd
  compression_level: 3
  include: [persistence, memory]
  sources:
    database: data/synthorg.db
    memory_dir: ./data/memory
    company_config: company.yaml
    checkpoints_dir: /abs/checkpoints
  s3:
    bucket: synthorg-backups
    prefix: prod/
    endpoint: http://127.0.0.1:9000
    region: eu-west-1
"#,
        )
        .unwrap();
        assert!(!c.enabled && !c.on_shutdown);
        assert_eq!(c.schedule_hours, 12);
        assert_eq!(c.retention.keep_daily, Some(7));
        assert_eq!(c.compression, Compression::Zstd);
        assert_eq!(c.include, vec![Component::Persistence, Component::Memory]);
        assert_eq!(
            c.sources.database,
            PathBuf::from("/etc/synthorg/data/synthorg.db")
        );
        assert_eq!(
            c.sources.memory_dir,
            PathBuf::from("/etc/synthorg/data/memory")
        );
        assert_eq!(c.sources.checkpoints_dir, PathBuf::from("/abs/checkpoints"));
        let s3 = c.s3.unwrap();
        assert!(s3.path_style() && s3.allow_http());
        assert_eq!(s3.region, "eu-west-1");
        assert_eq!(s3.part_size_mib, 8);
        assert_eq!((s3.max_retries, s3.retry_timeout_secs), (10, 180));
    }

    #[test]
    fn compression_accepts_booleans_and_names() {
        for (v, want) in [
            ("true", Compression::Gzip),
            ("false", Compression::None),
            ("gzip", Compression::Gzip),
            ("zstd", Compression::Zstd),
            ("none", Compression::None),
        ] {
            assert_eq!(
                load(&format!("backup: {{compression: {v}}}"))
                    .unwrap()
                    .compression,
                want
            );
        }
        let e = err_text("backup: {compression: lz4}");
        assert!(e.contains("lz4") && e.contains("compression"), "{e}");
    }

    #[test]
    fn out_of_range_numbers_name_key_and_range() {
        for (yaml, key, range) in [
            ("backup: {schedule_hours: 0}", "schedule_hours", "1 to 168"),
            (
                "backup: {schedule_hours: 169}",
                "schedule_hours",
                "1 to 168",
            ),
            ("backup: {schedule_hours: -5}", "schedule_hours", "1 to 168"),
            (
                "backup: {retention: {max_count: 1001}}",
                "max_count",
                "1 to 1000",
            ),
            (
                "backup: {retention: {max_count: 0}}",
                "max_count",
                "1 to 1000",
            ),
            (
                "backup: {retention: {max_age_days: 3651}}",
                "max_age_days",
                "1 to 3650",
            ),
        ] {
            let e = err_text(yaml);
            assert!(e.contains(key) && e.contains(range), "{yaml}: {e}");
        }
        let e = err_text("backup: {compression: gzip, compression_level: 12}");
        assert!(
            e.contains("backup.compression_level") && e.contains("1–9"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_components_are_rejected_by_name() {
        let e = err_text("backup: {schedule_hour: 6}");
        assert!(e.contains("schedule_hour"), "{e}");
        let e = err_text("backup: {retention: {max_cnt: 3}}");
        assert!(e.contains("max_cnt"), "{e}");
        let e = err_text("backup: {include: [persistence, vectors]}");
        assert!(e.contains("vectors"), "{e}");
        let e = err_text("backup: {include: [memory, memory]}");
        assert!(e.contains("backup.include") && e.contains("twice"), "{e}");
        let e = err_text("backup: {include: []}");
        assert!(e.contains("backup.include"), "{e}");
        let e = err_text("backup: {schedule_hours: [1}");
        assert!(!e.is_empty());
    }

    #[test]
    fn backup_path_overlapping_a_source_is_rejected_naming_both() {
        let base = Path::new("/srv/app");
        let load_at = |yaml: &str| BackupConfig::load(Some(yaml), base);
        for (yaml, relation) in [
            ("backup: {path: ./data/memory/backups}", "is inside"),
            ("backup: {path: ./data/memory}", "is the same directory as"),
            ("backup: {path: ./data}", "contains"),
            ("backup: {path: ./data/checkpoints/b}", "is inside"),
            ("backup: {path: ./data/synthorg.db}", "is the same path as"),
            ("backup: {path: company.yaml}", "is the same path as"),
        ] {
            let e = load_at(yaml).unwrap_err().to_string();
            assert!(
                e.contains("backup.path") && e.contains(relation),
                "{yaml}: {e}"
            );
            assert!(e.contains("backup.sources."), "{yaml}: {e}");
        }
        // Beside the sources in the same data directory: the seed's layout.
        assert!(load_at("backup: {path: ./data/backups}").is_ok());
        assert!(load_at("backup: {path: /var/backups/synthorg}").is_ok());
        // With an S3 target too: backup.path holds the restores' safety
        // backups (the memory directory would be moved into itself).
        let e = load_at("backup: {path: ./data/memory, s3: {bucket: b-1}}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backup.path") && e.contains("memory_dir"), "{e}");
        assert!(load_at("backup: {path: ./data/backups, s3: {bucket: b-1}}").is_ok());
    }

    #[test]
    fn parent_dir_paths_are_rejected() {
        let e = err_text("backup: {path: ../backups}");
        assert!(e.contains("backup.path") && e.contains(".."), "{e}");
        let e = err_text("backup: {sources: {memory_dir: /data/../etc}}");
        assert!(e.contains("backup.sources.memory_dir"), "{e}");
    }

    #[test]
    fn s3_block_is_validated_and_secret_is_hidden() {
        let e = err_text("backup: {s3: {bucket: Bad_Bucket}}");
        assert!(e.contains("backup.s3.bucket"), "{e}");
        let e = err_text("backup: {s3: {bucket: ok-bucket, prefix: ../x}}");
        assert!(e.contains("backup.s3.prefix"), "{e}");
        let e = err_text("backup: {s3: {bucket: ok-bucket, endpoint: ftp://x}}");
        assert!(e.contains("backup.s3.endpoint"), "{e}");
        let e = err_text("backup: {s3: {bucket: ok-bucket, part_size_mib: 1}}");
        assert!(
            e.contains("part_size_mib") && e.contains("5 to 5120"),
            "{e}"
        );
        let c = load("backup: {s3: {bucket: ok-bucket, secret_access_key: hunter2}}").unwrap();
        let s3 = c.s3.unwrap();
        assert_eq!(s3.secret_access_key.as_ref().unwrap().expose(), "hunter2");
        assert!(!format!("{s3:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&s3).unwrap().contains("hunter2"));
        assert!(!s3.path_style() && !s3.allow_http());
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        Jail::expect_with(|jail| {
            jail.set_env("SYNTHORG_BACKUP__SCHEDULE_HOURS", "24");
            jail.set_env("SYNTHORG_BACKUP__RETENTION__MAX_COUNT", "3");
            jail.set_env("SYNTHORG_BACKUP__COMPRESSION", "none");
            jail.set_env("SYNTHORG_BACKUP__S3__BUCKET", "from-env");
            jail.set_env("SYNTHORG_TOKEN", "unrelated");
            let c = BackupConfig::load(
                Some("backup: {schedule_hours: 2, retention: {max_count: 9, max_age_days: 4}}"),
                Path::new("/"),
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(c.schedule_hours, 24);
            assert_eq!(c.retention.max_count, 3);
            assert_eq!(c.retention.max_age_days, 4);
            assert_eq!(c.compression, Compression::None);
            assert_eq!(c.s3.map(|s| s.bucket).as_deref(), Some("from-env"));
            Ok(())
        });
    }

    #[test]
    fn env_override_out_of_range_names_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("SYNTHORG_BACKUP__SCHEDULE_HOURS", "500");
            let e = BackupConfig::load(None, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("backup.schedule_hours") && e.contains("1 to 168"),
                "{e}"
            );
            assert!(e.contains("SYNTHORG_BACKUP__SCHEDULE_HOURS"), "{e}");
            Ok(())
        });
    }

    /// YAML values of every shape, for the loader fuzzing below.
    fn yaml_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            Just("~".to_owned()),
            Just("1e400".to_owned()),
            Just("\"../../etc\"".to_owned()),
            "[a-z0-9_./-]{0,12}",
            "\\PC{0,12}".prop_map(|s| format!("{s:?}")),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(", "))),
                proptest::collection::vec((yaml_key(), inner), 0..4).prop_map(|v| {
                    let body: Vec<String> =
                        v.into_iter().map(|(k, x)| format!("{k}: {x}")).collect();
                    format!("{{{}}}", body.join(", "))
                }),
            ]
        })
    }

    fn yaml_key() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::strategy::Strategy;
        proptest::prop_oneof![
            proptest::sample::select(vec![
                "enabled",
                "path",
                "schedule_hours",
                "retention",
                "max_count",
                "max_age_days",
                "keep_daily",
                "on_shutdown",
                "on_startup",
                "compression",
                "include",
                "sources",
                "database",
                "memory_dir",
                "s3",
                "bucket",
                "prefix",
                "endpoint",
                "part_size_mib",
                "max_retries",
                "retry_timeout_secs",
                "secret_access_key",
            ])
            .prop_map(str::to_owned),
            "[a-z_]{1,10}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Arbitrary text: a config or an error with a message, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            if let Err(e) = BackupConfig::load(Some(&text), Path::new("/srv")) {
                proptest::prop_assert!(!e.to_string().is_empty());
            }
        }

        /// Structured YAML with real and unknown keys and values of every
        /// type: a valid config (whose numbers are in range) or an error.
        #[test]
        fn arbitrary_backup_blocks_never_panic(
            fields in proptest::collection::vec((yaml_key(), yaml_value()), 0..6)
        ) {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let yaml = format!("backup: {{{}}}", body.join(", "));
            match BackupConfig::load(Some(&yaml), Path::new("/srv")) {
                Ok(c) => proptest::prop_assert!((1..=168).contains(&c.schedule_hours)),
                Err(e) => proptest::prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
