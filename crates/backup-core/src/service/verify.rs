//! `verify`: re-read a backup completely and check it against its manifest.

use serde::Serialize;

use super::BackupService;
use super::read::ReadStats;
use super::read::read_backup;
use crate::error::{Error, Result};
use crate::id::BackupId;
use crate::manifest::Manifest;
use crate::ports::EntrySink;

/// The outcome of [`BackupService::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The backup verified.
    pub id: BackupId,
    /// Whether everything matched.
    pub ok: bool,
    /// Files whose size and sha256 were checked.
    pub files_checked: u64,
    /// Bytes of those files.
    pub bytes_checked: u64,
    /// The first mismatch found, if any.
    pub problem: Option<String>,
}

impl BackupService {
    /// Re-reads the whole backup: archive sha256 and size, every file's
    /// size and sha256, the embedded manifest, and that the archive holds
    /// exactly what the manifest lists. Integrity failures are reported in
    /// the report, not as errors.
    ///
    /// # Errors
    /// `NotFound`; `Manifest` when the sidecar is damaged; `Store` when
    /// the store cannot be read.
    pub async fn verify(&self, id: &BackupId) -> Result<VerifyReport> {
        let started = std::time::Instant::now();
        let manifest = match self.read_manifest(id).await {
            Err(e @ Error::Manifest { .. }) => {
                self.notify_verify_failed(id, &e.to_string(), started).await;
                return Err(e);
            }
            other => other?,
        };
        let read = self.read_and_check(&manifest).await;
        match read {
            Ok(stats) => Ok(VerifyReport {
                id: id.clone(),
                ok: true,
                files_checked: stats.files,
                bytes_checked: stats.bytes,
                problem: None,
            }),
            Err(e @ (Error::Integrity { .. } | Error::Manifest { .. })) => {
                tracing::error!(backup_id = %id, error = %e, "backup failed verification");
                self.notify_verify_failed(id, &e.to_string(), started).await;
                Ok(VerifyReport {
                    id: id.clone(),
                    ok: false,
                    files_checked: 0,
                    bytes_checked: 0,
                    problem: Some(e.to_string()),
                })
            }
            Err(e) => Err(e),
        }
    }
}

impl BackupService {
    /// Reads the whole backup through the restore target's content check
    /// (SQLite integrity and schema, YAML, in a scratch place): what a
    /// restore's staging would find, without touching live data.
    pub(crate) async fn read_and_check(&self, manifest: &Manifest) -> Result<ReadStats> {
        let mut check = self.ports.restore_target.content_check(manifest).await?;
        let read = {
            let mut sink = Reporting::new(
                check.as_mut(),
                self.progress.clone(),
                manifest,
                super::Phase::Verify,
            );
            let keys = self.archive_keys(manifest)?;
            let read =
                read_backup(self.ports.store.as_ref(), manifest, keys, None, &mut sink).await;
            if read.is_ok() {
                sink.done();
            }
            read
        };
        let finished = check.finish().await;
        let stats = read?;
        finished?;
        Ok(stats)
    }

    /// Reads and verifies the whole backup, passing its content to `sink`
    /// (e.g. an export directory). Returns the manifest and what was read.
    ///
    /// # Errors
    /// `NotFound`, `Manifest`, `Integrity` (the sink's content must then be
    /// discarded), `Store`, or the sink's own errors.
    pub async fn export(
        &self,
        id: &BackupId,
        sink: &mut dyn EntrySink,
    ) -> Result<(Manifest, VerifyReport)> {
        let manifest = self.read_manifest(id).await?;
        let keys = self.archive_keys(&manifest)?;
        let mut sink = Reporting::new(sink, self.progress.clone(), &manifest, super::Phase::Verify);
        let stats =
            read_backup(self.ports.store.as_ref(), &manifest, keys, None, &mut sink).await?;
        sink.done();
        let report = VerifyReport {
            id: id.clone(),
            ok: true,
            files_checked: stats.files,
            bytes_checked: stats.bytes,
            problem: None,
        };
        Ok((manifest, report))
    }
}

/// Passes entries on to `inner` and reports progress after each file.
pub(crate) struct Reporting<'a> {
    inner: &'a mut dyn EntrySink,
    report: Option<super::ProgressFn>,
    progress: super::Progress,
}

impl<'a> Reporting<'a> {
    pub(crate) fn new(
        inner: &'a mut dyn EntrySink,
        report: Option<super::ProgressFn>,
        manifest: &Manifest,
        phase: super::Phase,
    ) -> Reporting<'a> {
        Reporting {
            inner,
            report,
            progress: super::Progress {
                id: manifest.id.clone(),
                phase,
                bytes_done: 0,
                bytes_total: manifest.size_bytes,
                files_done: 0,
                files_total: manifest.files.len() as u64,
            },
        }
    }

    /// Reports the end of the phase (a full bar).
    pub(crate) fn done(&mut self) {
        self.progress.bytes_done = self.progress.bytes_total;
        self.progress.files_done = self.progress.files_total;
        if let Some(r) = &self.report {
            r(&self.progress);
            r(&super::Progress {
                phase: super::Phase::Finish,
                ..self.progress.clone()
            });
        }
    }
}

#[async_trait::async_trait]
impl EntrySink for Reporting<'_> {
    async fn dir(&mut self, entry: &crate::manifest::DirEntry) -> Result<()> {
        self.inner.dir(entry).await
    }

    async fn symlink(&mut self, entry: &crate::manifest::SymlinkEntry) -> Result<()> {
        self.inner.symlink(entry).await
    }

    async fn file_start(&mut self, entry: &crate::manifest::FileEntry) -> Result<()> {
        self.inner.file_start(entry).await
    }

    async fn file_data(&mut self, data: &[u8]) -> Result<()> {
        self.inner.file_data(data).await
    }

    async fn file_bytes(&mut self, data: bytes::Bytes) -> Result<()> {
        self.inner.file_bytes(data).await
    }

    async fn file_end(&mut self, entry: &crate::manifest::FileEntry) -> Result<()> {
        self.inner.file_end(entry).await?;
        self.progress.files_done += 1;
        self.progress.bytes_done += entry.size;
        if let Some(r) = &self.report {
            r(&self.progress);
        }
        Ok(())
    }
}
