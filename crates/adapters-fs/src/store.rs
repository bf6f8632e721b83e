//! [`LocalFsStore`]: backups in a local directory.
//!
//! Layout (docs/ARCHITECTURE.md):
//! ```text
//! <root>/<id>.tar.gz | <id>.tar.zst   archive of a compressed backup
//! <root>/<id>/...                      directory form (compression none)
//! <root>/<id>.manifest.json            sidecar, written last = commit point
//! <root>/.lock                         cross-process lock (see `FileLock`)
//! ```
//! Every write goes to a temp name in the same directory, is fsynced,
//! renamed into place and the directory fsynced. A crash at any point leaves
//! at most unlisted leftovers, removed by [`cleanup_incomplete`](BackupStore::cleanup_incomplete).

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use backup_core::manifest::{Found, MAX_MANIFEST_BYTES};
use backup_core::path::MANIFEST_FILE;
use backup_core::ports::{BackupStore, ByteStream, Listed, ObjectName};
use backup_core::{BackupId, Compression, Error, Manifest, Result, Summary};

use crate::fsio::{self, TEMP_MARKER};

const SIDECAR_SUFFIX: &str = ".manifest.json";
const SUMMARY_SUFFIX: &str = ".summary.json";

/// A [`BackupStore`] on a local directory.
#[derive(Debug, Clone)]
pub struct LocalFsStore {
    root: PathBuf,
}

impl LocalFsStore {
    /// Opens (and creates, with mode 0700) the backup directory.
    ///
    /// # Errors
    /// `Store` when the directory cannot be created or is not a directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalFsStore> {
        let root = root.into();
        let store = LocalFsStore { root };
        fsio::create_dir_private(&store.root)
            .map_err(|e| store.io_err(&store.root, "create", e))?;
        if !store.root.is_dir() {
            return Err(store.err(&store.root, "not a directory".into(), None));
        }
        Ok(store)
    }

    /// The backup directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn summary_path(&self, id: &BackupId) -> PathBuf {
        self.root.join(format!("{id}{SUMMARY_SUFFIX}"))
    }

    /// The summary of a published backup: the small summary object, or
    /// (missing or unreadable) the sidecar.
    async fn read_summary(&self, id: &BackupId) -> Result<Summary> {
        if let Ok(bytes) = fsio::read_capped(&self.summary_path(id), MAX_MANIFEST_BYTES).await
            && let Ok(summary) = Summary::from_json(&bytes, id)
        {
            return Ok(summary);
        }
        self.read_sidecar(id).await.map(|m| Summary::from(&m))
    }

    fn sidecar_path(&self, id: &BackupId) -> PathBuf {
        self.root.join(format!("{id}{SIDECAR_SUFFIX}"))
    }

    fn object_path(&self, id: &BackupId, object: &ObjectName) -> PathBuf {
        match object {
            ObjectName::Archive(c) => self.root.join(format!("{id}{}", archive_suffix(*c))),
            ObjectName::File(path) => {
                let mut p = self.root.join(id.to_string());
                p.extend(path.segments());
                p
            }
            ObjectName::InnerManifest => self.root.join(id.to_string()).join(MANIFEST_FILE),
        }
    }

    /// Every data path a backup may occupy (archives and directory form).
    fn data_paths(&self, id: &BackupId) -> [PathBuf; 4] {
        [
            self.object_path(id, &ObjectName::Archive(Compression::Gzip)),
            self.object_path(id, &ObjectName::Archive(Compression::Zstd)),
            self.root.join(id.to_string()),
            self.summary_path(id),
        ]
    }

    fn err(&self, path: &Path, reason: String, source: Option<io::Error>) -> Error {
        Error::Store {
            location: self.location(),
            key: path.display().to_string(),
            reason,
            source: source.map(|e| Box::new(e) as _),
        }
    }

    fn io_err(&self, path: &Path, what: &str, e: io::Error) -> Error {
        self.err(path, format!("{what}: {}", fsio::describe(&e)), Some(e))
    }

    fn not_found(&self, id: &BackupId) -> Error {
        Error::NotFound {
            id: id.to_string(),
            location: self.location(),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
        path: &Path,
        what: &str,
    ) -> Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| self.err(path, format!("{what}: task failed: {e}"), None))?
            .map_err(|e| self.io_err(path, what, e))
    }

    async fn read_sidecar(&self, id: &BackupId) -> Result<Manifest> {
        let path = self.sidecar_path(id);
        let bytes = match fsio::read_capped(&path, MAX_MANIFEST_BYTES).await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(id)),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(Error::Manifest {
                    id: id.to_string(),
                    source: backup_core::ManifestError::TooLarge {
                        size: MAX_MANIFEST_BYTES as u64 + 1,
                    },
                });
            }
            Err(e) => return Err(self.io_err(&path, "read sidecar", e)),
        };
        Manifest::from_sidecar(&bytes, id)
    }

    /// What exists of a backup's data (one stat).
    async fn found(&self, summary: &Summary) -> Found {
        let path = match summary.compression {
            Compression::None => self.root.join(summary.id.to_string()),
            c => self.object_path(&summary.id, &ObjectName::Archive(c)),
        };
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_dir() => Found::Directory,
            Ok(m) if m.is_file() => Found::Archive { size: m.len() },
            _ => Found::Nothing,
        }
    }

    /// Names in the root directory (blocking listing off the async threads).
    async fn root_names(&self) -> Result<Vec<String>> {
        let root = self.root.clone();
        self.blocking(
            move || {
                let mut names = Vec::new();
                for entry in std::fs::read_dir(&root)? {
                    if let Some(name) = entry?.file_name().to_str() {
                        names.push(name.to_owned());
                    }
                }
                Ok(names)
            },
            &self.root.clone(),
            "list",
        )
        .await
    }
}

fn archive_suffix(c: Compression) -> &'static str {
    match c {
        Compression::Gzip => ".tar.gz",
        Compression::Zstd => ".tar.zst",
        Compression::None => "",
    }
}

/// The backup id a root entry belongs to, if it is one of ours.
fn id_of_data_name(name: &str) -> Option<BackupId> {
    let stem = name
        .strip_suffix(".tar.gz")
        .or_else(|| name.strip_suffix(".tar.zst"))
        .or_else(|| name.strip_suffix(SUMMARY_SUFFIX))
        .unwrap_or(name);
    BackupId::parse(stem).ok()
}

/// The status record (see `backup_core::status`); not a backup name.
const STATUS_FILE: &str = "_status.json";

#[async_trait]
impl BackupStore for LocalFsStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn list(&self) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        for name in self.root_names().await? {
            let Some(stem) = name.strip_suffix(SIDECAR_SUFFIX) else {
                continue;
            };
            let Ok(id) = BackupId::parse(stem) else {
                continue; // foreign file
            };
            match self.read_summary(&id).await {
                Ok(m) => match m.damage(self.found(&m).await) {
                    None => out.push(Listed::Complete(Box::new(m))),
                    Some(reason) => {
                        tracing::warn!(backup_id = %id, reason = %reason, "damaged backup");
                        out.push(Listed::Damaged { id, reason });
                    }
                },
                Err(Error::NotFound { .. }) => {} // deleted meanwhile
                Err(e) => {
                    tracing::warn!(backup_id = %id, error = %e, "damaged backup sidecar");
                    out.push(Listed::Damaged {
                        id,
                        reason: e.to_string(),
                    });
                }
            }
        }
        out.sort_by(|a, b| b.id().cmp(a.id()));
        Ok(out)
    }

    async fn manifest(&self, id: &BackupId) -> Result<Manifest> {
        self.read_sidecar(id).await
    }

    async fn put(&self, id: &BackupId, object: &ObjectName, data: ByteStream) -> Result<u64> {
        let path = self.object_path(id, object);
        if let Some(parent) = path.parent() {
            let parent = parent.to_path_buf();
            self.blocking(
                move || fsio::create_dir_private(&parent),
                &path,
                "create directory",
            )
            .await?;
        }
        fsio::write_atomically(&path, data)
            .await
            .map_err(|e| self.io_err(&path, "write", e))
    }

    async fn get(&self, id: &BackupId, object: &ObjectName) -> Result<ByteStream> {
        let path = self.object_path(id, object);
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(fsio::stream_file(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound {
                id: format!("{id} ({})", path.display()),
                location: self.location(),
            }),
            Err(e) => Err(self.io_err(&path, "open", e)),
        }
    }

    async fn publish(&self, manifest: &Manifest) -> Result<()> {
        let summary_path = self.summary_path(&manifest.id);
        let summary =
            serde_json::to_vec(&Summary::from(manifest)).map_err(|e| Error::Manifest {
                id: manifest.id.to_string(),
                source: e.into(),
            })?;
        fsio::write_bytes_atomically(&summary_path, summary)
            .await
            .map_err(|e| self.io_err(&summary_path, "write summary", e))?;
        let path = self.sidecar_path(&manifest.id);
        let json = manifest.to_json().map_err(|source| Error::Manifest {
            id: manifest.id.to_string(),
            source,
        })?;
        fsio::write_bytes_atomically(&path, json)
            .await
            .map_err(|e| self.io_err(&path, "publish sidecar", e))?;
        Ok(())
    }

    async fn delete(&self, id: &BackupId) -> Result<()> {
        let sidecar = self.sidecar_path(id);
        let data = self.data_paths(id);
        let root = self.root.clone();
        let existed = self
            .blocking(
                move || {
                    let mut existed = false;
                    match std::fs::remove_file(&sidecar) {
                        Ok(()) => {
                            existed = true;
                            fsio::fsync_dir(&root)?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                    for path in data {
                        if path.symlink_metadata().is_ok() {
                            existed = true;
                            fsio::remove_any(&path)?;
                        }
                    }
                    fsio::fsync_dir(&root)?;
                    Ok(existed)
                },
                &self.sidecar_path(id),
                "delete",
            )
            .await?;
        if existed {
            Ok(())
        } else {
            Err(self.not_found(id))
        }
    }

    async fn discard(&self, id: &BackupId) -> Result<()> {
        let data = self.data_paths(id);
        let root = self.root.clone();
        let prefix = format!(".{id}");
        self.blocking(
            move || {
                for path in data {
                    fsio::remove_any(&path)?;
                }
                for entry in std::fs::read_dir(&root)? {
                    let entry = entry?;
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with(&prefix) && name.contains(TEMP_MARKER) {
                        fsio::remove_any(&entry.path())?;
                    }
                }
                fsio::fsync_dir(&root)
            },
            &self.root.clone(),
            "discard",
        )
        .await
    }

    async fn read_status(&self) -> Result<Option<Vec<u8>>> {
        let path = self.root.join(STATUS_FILE);
        match fsio::read_capped(&path, MAX_MANIFEST_BYTES).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err(&path, "read status", e)),
        }
    }

    async fn write_status(&self, bytes: Vec<u8>) -> Result<()> {
        let path = self.root.join(STATUS_FILE);
        fsio::write_bytes_atomically(&path, bytes)
            .await
            .map(|_| ())
            .map_err(|e| self.io_err(&path, "write status", e))
    }

    async fn cleanup_incomplete(&self) -> Result<Vec<String>> {
        let names = self.root_names().await?;
        let published: std::collections::HashSet<String> = names
            .iter()
            .filter_map(|n| n.strip_suffix(SIDECAR_SUFFIX))
            .filter(|stem| BackupId::parse(stem).is_ok())
            .map(str::to_owned)
            .collect();
        let mut removed = Vec::new();
        for name in names {
            let leftover = if name.starts_with('.') && name.contains(TEMP_MARKER) {
                true
            } else if name.ends_with(SIDECAR_SUFFIX) {
                false
            } else {
                id_of_data_name(&name).is_some_and(|id| !published.contains(&id.to_string()))
            };
            if leftover {
                let path = self.root.join(&name);
                self.blocking(
                    move || fsio::remove_any(&path),
                    &self.root.join(&name),
                    "remove leftover",
                )
                .await?;
                tracing::warn!(store = %self.location(), leftover = %name, "removed incomplete backup leftover");
                removed.push(name);
            }
        }
        if !removed.is_empty() {
            let root = self.root.clone();
            self.blocking(move || fsio::fsync_dir(&root), &self.root.clone(), "fsync")
                .await?;
        }
        Ok(removed)
    }
}
