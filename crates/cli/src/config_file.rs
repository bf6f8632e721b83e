//! Finds and reads the config file; the parsing and validation live in
//! `backup_core::config`.
//!
//! Order: `--config FILE`, else `$SYNTHORG_CONFIG`, else `./synthorg.yaml`
//! if present, else built-in defaults (data under `./data`). Relative paths
//! in the file resolve against the file's directory; without a file, against
//! the working directory.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use backup_core::BackupConfig;
use backup_core::config::Secret;

/// The default config file name looked up in the working directory.
pub(crate) const DEFAULT_FILE: &str = "synthorg.yaml";

/// A loaded configuration and where it came from.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The validated config with absolute paths.
    pub(crate) config: BackupConfig,
    /// `path/to/synthorg.yaml` or `built-in defaults`.
    pub(crate) source: String,
    /// `api.token` of the file, if any (the API's bearer token).
    pub(crate) api_token: Option<Secret>,
}

/// The config file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read config file {path}")]
pub(crate) struct FileError {
    path: PathBuf,
    source: std::io::Error,
}

/// Loads the configuration.
///
/// # Errors
/// [`FileError`] when the chosen file cannot be read; `ConfigError` naming
/// the key when it is invalid.
pub(crate) fn load(explicit: Option<&Path>) -> anyhow::Result<Loaded> {
    let cwd = std::env::current_dir()?;
    let chosen = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(crate::env::CONFIG).map(PathBuf::from))
        .or_else(|| {
            let default = cwd.join(DEFAULT_FILE);
            default.is_file().then_some(default)
        });
    let Some(path) = chosen else {
        let config = BackupConfig::load(None, &cwd)?;
        return Ok(Loaded {
            config,
            source: "built-in defaults".to_owned(),
            api_token: None,
        });
    };
    let path = if path.is_relative() {
        cwd.join(path)
    } else {
        path
    };
    let text = std::fs::read_to_string(&path).map_err(|source| FileError {
        path: path.clone(),
        source,
    })?;
    let base = path.parent().unwrap_or(&cwd);
    let config = BackupConfig::load(Some(&text), base)
        .map_err(|e| anyhow::Error::new(e).context(format!("in {}", path.display())))?;
    let api_token = api_token(&text).with_context(|| format!("in {}", path.display()))?;
    Ok(Loaded {
        config,
        source: path.display().to_string(),
        api_token,
    })
}

/// `api.token` of a config file (the admin API's bearer token).
fn api_token(text: &str) -> anyhow::Result<Option<Secret>> {
    use figment::providers::{Format, Yaml};
    let figment = figment::Figment::from(Yaml::string(text));
    match figment.extract_inner::<String>("api.token") {
        Ok(token) if token.trim().is_empty() => anyhow::bail!("api.token is empty"),
        Ok(token) => Ok(Some(Secret::new(token))),
        Err(e) if e.missing() => Ok(None),
        Err(e) => anyhow::bail!("api.token: {}", e.kind),
    }
}
