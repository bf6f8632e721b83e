//! [`FileLock`]: one mutating operation at a time per backup directory,
//! across processes and within one.
//!
//! An advisory `flock` on `<root>/.lock` (std's `File::try_lock`). The OS
//! releases it when the holder dies, so a crash never leaves a stale lock.
//! Each open of the file is its own open file description, so two
//! acquisitions in one process exclude each other too. The holder writes
//! `operation pid host time` into the file, which `Busy` errors show.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use backup_core::ports::{LockGuard, Operation, OperationLock};
use backup_core::{Error, Result};

use crate::fsio::FILE_MODE;

/// Name of the lock file inside the backup directory.
pub const LOCK_FILE: &str = ".lock";

/// A cross-process [`OperationLock`] on a lock file.
#[derive(Debug, Clone)]
pub struct FileLock {
    path: PathBuf,
}

impl FileLock {
    /// A lock on `<dir>/.lock`; the directory must exist.
    pub fn in_dir(dir: &Path) -> FileLock {
        FileLock {
            path: dir.join(LOCK_FILE),
        }
    }

    fn store_err(&self, reason: String, e: std::io::Error) -> Error {
        Error::Store {
            location: self.path.display().to_string(),
            key: LOCK_FILE.to_owned(),
            reason: format!("{reason}: {}", crate::fsio::describe(&e)),
            source: Some(Box::new(e)),
        }
    }

    fn acquire_blocking(&self, operation: Operation) -> Result<FileLockGuard> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&self.path)
            .map_err(|e| self.store_err("open lock file".into(), e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::Busy {
                    operation: operation.as_str().to_owned(),
                    holder: if holder.is_empty() {
                        "another operation holds the lock".to_owned()
                    } else {
                        format!("{holder} holds the lock")
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(self.store_err("lock".into(), e)),
        }
        let info = format!(
            "{} (pid {} on {} since {})",
            operation.as_str(),
            std::process::id(),
            hostname(),
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
        );
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(info.as_bytes()))
            .map_err(|e| self.store_err("record lock holder".into(), e))?;
        Ok(FileLockGuard { file: Some(file) })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}

#[async_trait]
impl OperationLock for FileLock {
    async fn try_acquire(&self, operation: Operation) -> Result<Box<dyn LockGuard>> {
        let me = self.clone();
        let guard = tokio::task::spawn_blocking(move || me.acquire_blocking(operation))
            .await
            .map_err(|e| Error::Store {
                location: self.path.display().to_string(),
                key: LOCK_FILE.to_owned(),
                reason: format!("lock task failed: {e}"),
                source: None,
            })??;
        Ok(Box::new(guard))
    }
}

/// The held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct FileLockGuard {
    file: Option<File>,
}

impl FileLockGuard {
    fn release_now(&mut self) {
        if let Some(file) = self.file.take() {
            // Clear the holder line first, so a reader never sees a stale one.
            let _ = file.set_len(0);
            let _ = file.unlock();
        }
    }
}

impl Drop for FileLockGuard {
    fn drop(&mut self) {
        self.release_now();
    }
}

#[async_trait]
impl LockGuard for FileLockGuard {
    async fn release(mut self: Box<Self>) -> Result<()> {
        self.release_now();
        Ok(())
    }
}
