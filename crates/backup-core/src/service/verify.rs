//! `verify`: re-read a backup completely and check it against its manifest.

use serde::Serialize;

use super::BackupService;
use super::read::read_backup;
use crate::error::{Error, Result};
use crate::id::BackupId;
use crate::manifest::Manifest;
use crate::ports::{DiscardSink, EntrySink};

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
        let manifest = self.ports.store.manifest(id).await?;
        match read_backup(self.ports.store.as_ref(), &manifest, None, &mut DiscardSink).await {
            Ok(stats) => Ok(VerifyReport {
                id: id.clone(),
                ok: true,
                files_checked: stats.files,
                bytes_checked: stats.bytes,
                problem: None,
            }),
            Err(e @ (Error::Integrity { .. } | Error::Manifest { .. })) => {
                tracing::error!(backup_id = %id, error = %e, "backup failed verification");
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
        let manifest = self.ports.store.manifest(id).await?;
        let stats = read_backup(self.ports.store.as_ref(), &manifest, None, sink).await?;
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
