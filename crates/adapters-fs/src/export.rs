//! [`ExportDir`]: a verified backup extracted into a plain directory,
//! without touching live data (e.g. a host path mounted into a container).
//!
//! Content goes to a temp directory next to the destination and is renamed
//! into place only when the whole backup verified, so the destination never
//! holds a half-written export.

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use backup_core::manifest::{DirEntry, FileEntry, SymlinkEntry};
use backup_core::path::MANIFEST_FILE;
use backup_core::ports::EntrySink;
use backup_core::{Error, Manifest, Result};
use tokio::io::AsyncWriteExt;

use crate::dir_source::contained_target;
use crate::fsio;

/// An export being written.
#[derive(Debug)]
pub struct ExportDir {
    dest: PathBuf,
    temp: PathBuf,
    current: Option<(tokio::fs::File, PathBuf)>,
}

fn err(path: &Path, e: io::Error) -> Error {
    Error::Store {
        location: "export".into(),
        key: path.display().to_string(),
        reason: fsio::describe(&e),
        source: Some(Box::new(e)),
    }
}

impl ExportDir {
    /// Prepares an export into `dest`, which must not exist or be empty.
    ///
    /// # Errors
    /// `Store` when `dest` holds files or the temp directory cannot be made.
    pub fn create(dest: &Path) -> Result<ExportDir> {
        if let Ok(mut entries) = std::fs::read_dir(dest)
            && entries.next().is_some()
        {
            return Err(Error::Store {
                location: "export".into(),
                key: dest.display().to_string(),
                reason: "destination is not empty; choose a new or empty directory".into(),
                source: None,
            });
        }
        let temp = fsio::temp_path_for(dest);
        fsio::create_dir_private(&temp).map_err(|e| err(&temp, e))?;
        Ok(ExportDir {
            dest: dest.to_path_buf(),
            temp,
            current: None,
        })
    }

    fn path_of(&self, archive_path: &str) -> PathBuf {
        let mut p = self.temp.clone();
        p.extend(archive_path.split('/'));
        p
    }

    /// Writes `manifest.json` and moves the export into place.
    ///
    /// # Errors
    /// `Store` when writing or renaming fails (the temp copy is removed).
    pub async fn finish(self, manifest: &Manifest) -> Result<PathBuf> {
        let guard = fsio::RemoveOnDrop::new(self.temp.clone());
        let json = manifest.to_json().map_err(|source| Error::Manifest {
            id: manifest.id.to_string(),
            source,
        })?;
        let path = self.temp.join(MANIFEST_FILE);
        fsio::write_bytes_atomically(&path, json)
            .await
            .map_err(|e| err(&path, e))?;
        if self.dest.exists() {
            std::fs::remove_dir(&self.dest).map_err(|e| err(&self.dest, e))?;
        }
        std::fs::rename(&self.temp, &self.dest).map_err(|e| err(&self.dest, e))?;
        guard.disarm();
        Ok(self.dest)
    }

    /// Removes the partial export.
    pub fn abandon(self) {
        let _ = fsio::remove_any(&self.temp);
    }
}

#[async_trait]
impl EntrySink for ExportDir {
    async fn dir(&mut self, entry: &DirEntry) -> Result<()> {
        let path = self.path_of(entry.path.as_str());
        tokio::fs::create_dir_all(&path)
            .await
            .map_err(|e| err(&path, e))
    }

    async fn symlink(&mut self, entry: &SymlinkEntry) -> Result<()> {
        let path = self.path_of(entry.path.as_str());
        if contained_target(&entry.path, Path::new(&entry.target)).is_none() {
            return Err(Error::Integrity {
                id: "export".into(),
                path: entry.path.to_string(),
                reason: "symlink points outside its component".into(),
            });
        }
        fsio::create_symlink(&entry.target, &path)
            .await
            .map_err(|e| err(&path, e))
    }

    async fn file_start(&mut self, entry: &FileEntry) -> Result<()> {
        let path = self.path_of(entry.path.as_str());
        let file = fsio::create_new_file(&path)
            .await
            .map_err(|e| err(&path, e))?;
        self.current = Some((file, path));
        Ok(())
    }

    async fn file_data(&mut self, data: &[u8]) -> Result<()> {
        let Some((file, path)) = self.current.as_mut() else {
            return Err(Error::Internal("file data outside a file".into()));
        };
        file.write_all(data).await.map_err(|e| err(path, e))
    }

    async fn file_end(&mut self, entry: &FileEntry) -> Result<()> {
        let Some((file, path)) = self.current.take() else {
            return Err(Error::Internal("file end outside a file".into()));
        };
        // Like `tar x`, an export is not fsynced (it is renamed into place
        // only once complete); restore staging is, by one syncfs.
        fsio::finish_file(file, entry.mode, entry.mtime)
            .await
            .map_err(|e| err(&path, e))
    }
}
