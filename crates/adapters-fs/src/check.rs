//! [`ScratchCheck`]: the checks a restore's staging runs, on a backup's
//! content as it streams past, in a scratch directory, so that `verify`
//! and `restore --dry-run` say "intact" only when a restore would succeed.
//!
//! Only what is checked is written, one file at a time: the database, the
//! SQLite files under `memory/` (recognised by header, like the backup
//! recognised them) and the company config. Each is checked as soon as it
//! is complete and removed; the rest streams past (its sha256 is checked by
//! the reader). The scratch directory has the snapshot prefix, so recovery
//! removes what a killed check left.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use backup_core::config::check_yaml;
use backup_core::manifest::{DirEntry, FileEntry, SymlinkEntry};
use backup_core::ports::{ContentCheck, DatabaseVerifier, EntrySink};
use backup_core::{Component, Error, Manifest, Result};
use tokio::io::AsyncWriteExt;

/// Bytes needed to recognise a SQLite file.
const HEADER: usize = 16;
/// Largest company config accepted (checks and staging alike).
const MAX_CONFIG_BYTES: usize = 16 * 1024 * 1024;

/// Why a company config file would not load, if it would not: not UTF-8,
/// or not YAML. The one check of staging and of the content check.
///
/// # Errors
/// When the file cannot be read (or is larger than 16 MiB).
pub(crate) async fn company_config_problem(path: &Path) -> std::io::Result<Option<String>> {
    let text = crate::fsio::read_capped(path, MAX_CONFIG_BYTES).await?;
    let Ok(text) = String::from_utf8(text) else {
        return Ok(Some("company config is not UTF-8".into()));
    };
    Ok(check_yaml(&text)
        .err()
        .map(|e| format!("company config does not parse as YAML: {e}")))
}

/// What happens to the file being read.
enum Current {
    /// A memory file whose first bytes decide.
    Pending(Vec<u8>),
    /// Written to scratch, to be checked at its end.
    Writing(tokio::fs::File, PathBuf),
    /// Not checked here.
    Skipping,
}

/// A content check in a scratch directory.
pub struct ScratchCheck {
    dir: tempfile::TempDir,
    verifier: Option<Arc<dyn DatabaseVerifier>>,
    manifest: Manifest,
    /// The file being read and what happens to it.
    current: Option<(FileEntry, Current)>,
    count: u64,
}

impl ScratchCheck {
    /// A check of `manifest`'s backup in a scratch directory under `near`.
    ///
    /// # Errors
    /// `Source` when the directory cannot be created.
    pub fn new(
        near: &Path,
        verifier: Option<Arc<dyn DatabaseVerifier>>,
        manifest: &Manifest,
    ) -> Result<ScratchCheck> {
        let dir = tempfile::Builder::new()
            .prefix(backup_core::ports::SCRATCH_PREFIX)
            .tempdir_in(near)
            .map_err(|e| Error::Source {
                component: Component::Persistence,
                path: near.display().to_string(),
                reason: format!("cannot create a scratch directory for checks: {e}"),
                source: None,
            })?;
        Ok(ScratchCheck {
            dir,
            verifier,
            manifest: manifest.clone(),
            current: None,
            count: 0,
        })
    }

    fn fail(&self, path: &str, reason: String) -> Error {
        Error::Integrity {
            id: self.manifest.id.to_string(),
            path: path.to_owned(),
            reason,
        }
    }

    fn io(&self, entry: &FileEntry, e: &std::io::Error) -> Error {
        Error::Source {
            component: entry.path.component().unwrap_or(Component::Persistence),
            path: self.dir.path().display().to_string(),
            reason: format!("scratch copy of {} for checks: {e}", entry.path),
            source: None,
        }
    }

    async fn open(&mut self, entry: &FileEntry) -> Result<Current> {
        self.count += 1;
        let path = self.dir.path().join(format!("{}.check", self.count));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| self.io(entry, &e))?;
        Ok(Current::Writing(file, path))
    }

    /// Runs the check of a complete scratch copy.
    async fn check(&self, entry: &FileEntry, path: &Path) -> Result<()> {
        let c = entry.path.component().unwrap_or(Component::Persistence);
        match c {
            Component::Config => match company_config_problem(path)
                .await
                .map_err(|e| self.io(entry, &e))?
            {
                Some(reason) => Err(self.fail(entry.path.as_str(), reason)),
                None => Ok(()),
            },
            _ => {
                let Some(v) = &self.verifier else {
                    return Ok(());
                };
                let expected = (c == Component::Persistence)
                    .then_some(self.manifest.db_schema_version)
                    .flatten();
                match v.verify(c, path, expected).await {
                    Ok(_) => Ok(()),
                    // The scratch path means nothing to the user: name the
                    // file in the backup.
                    Err(Error::Source { reason, .. }) => {
                        Err(self.fail(entry.path.as_str(), format!("would not restore: {reason}")))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }
}

#[async_trait]
impl EntrySink for ScratchCheck {
    async fn dir(&mut self, _: &DirEntry) -> Result<()> {
        Ok(())
    }

    async fn symlink(&mut self, _: &SymlinkEntry) -> Result<()> {
        Ok(())
    }

    async fn file_start(&mut self, entry: &FileEntry) -> Result<()> {
        let current = match entry.path.component() {
            Some(Component::Persistence | Component::Config) => self.open(entry).await?,
            Some(Component::Memory) if self.verifier.is_some() => Current::Pending(Vec::new()),
            _ => Current::Skipping,
        };
        self.current = Some((entry.clone(), current));
        Ok(())
    }

    async fn file_data(&mut self, data: &[u8]) -> Result<()> {
        let Some((entry, current)) = self.current.take() else {
            return Ok(());
        };
        let next = match current {
            Current::Pending(mut head) => {
                head.extend_from_slice(data);
                if head.len() < HEADER {
                    Current::Pending(head)
                } else if self.verifier.as_ref().is_some_and(|v| v.handles(&head)) {
                    // Recognised: write what was held back, then stream.
                    let mut opened = self.open(&entry).await?;
                    if let Current::Writing(file, _) = &mut opened {
                        file.write_all(&head)
                            .await
                            .map_err(|e| self.io(&entry, &e))?;
                    }
                    opened
                } else {
                    Current::Skipping
                }
            }
            Current::Writing(mut file, path) => {
                file.write_all(data)
                    .await
                    .map_err(|e| self.io(&entry, &e))?;
                Current::Writing(file, path)
            }
            Current::Skipping => Current::Skipping,
        };
        self.current = Some((entry, next));
        Ok(())
    }

    async fn file_end(&mut self, entry: &FileEntry) -> Result<()> {
        if let Some((_, Current::Writing(mut file, path))) = self.current.take() {
            file.flush().await.map_err(|e| self.io(entry, &e))?;
            drop(file);
            let checked = self.check(entry, &path).await;
            let _ = tokio::fs::remove_file(&path).await;
            checked?;
        }
        Ok(())
    }
}

#[async_trait]
impl ContentCheck for ScratchCheck {
    async fn finish(self: Box<Self>) -> Result<()> {
        let path = self.dir.path().display().to_string();
        self.dir.close().map_err(|e| Error::Source {
            component: Component::Persistence,
            path,
            reason: format!("cannot remove the scratch directory of checks: {e}"),
            source: None,
        })
    }
}
