//! [`S3Lock`]: the cross-process operation lock as a lock object.
//!
//! The lock is `<prefix>/.lock`, created with a conditional put
//! (`If-None-Match: *`), holding owner, host, pid, operation and a lease
//! expiry. While held, a background task renews the lease with conditional
//! updates (`If-Match: <etag>`). A live lock makes others fail with `Busy`
//! naming the holder; an expired one is taken over with a conditional
//! update, so two takers cannot both win. A lock whose holder is known to
//! be dead (same host and pid namespace, and that pid no longer runs the
//! process that took it, judged by its start time in `/proc`) counts as
//! expired at once, so a restart after a crash need not wait out the lease;
//! so does a lock this process released but could not delete (the server
//! was unreachable). Release deletes the
//! object; dropping a guard releases it in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use backup_core::ports::{LockGuard, Operation, OperationLock};
use backup_core::{Error, Result};
use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::errors::map_err;

/// Lease length; renewed every third of it while held.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

static TOKEN: AtomicU64 = AtomicU64::new(0);

/// Owners (unique per acquisition) this process has released, whose lock
/// object may still exist because deleting it failed (e.g. the server was
/// down): such a lock is free for this process at once. The last few only.
static RELEASED_HERE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
const RELEASED_KEPT: usize = 64;

fn mark_released(owner: &str) {
    let mut released = RELEASED_HERE.lock().unwrap_or_else(|e| e.into_inner());
    if released.len() >= RELEASED_KEPT {
        released.remove(0);
    }
    released.push(owner.to_owned());
}

fn released_here(owner: &str) -> bool {
    RELEASED_HERE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|o| o == owner)
}

/// What the lock object holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    owner: String,
    operation: String,
    host: String,
    pid: u32,
    acquired_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    /// The holder's pid namespace (`/proc/self/ns/pid`), if known.
    #[serde(default)]
    pid_ns: Option<String>,
    /// The holder's start time in clock ticks since boot, if known.
    #[serde(default)]
    start_ticks: Option<u64>,
}

impl Record {
    fn holder(&self) -> String {
        format!(
            "{} (pid {} on {} since {}, lease until {})",
            self.operation,
            self.pid,
            self.host,
            self.acquired_at.format("%Y-%m-%dT%H:%M:%SZ"),
            self.expires_at.format("%H:%M:%SZ")
        )
    }
}

impl Record {
    /// Whether the holder is certainly gone: this process released it, or
    /// it ran on this host, in this pid namespace, and its pid is free or
    /// taken by a later process.
    fn holder_is_dead(&self) -> bool {
        if released_here(&self.owner) {
            return true;
        }
        let Some(ns) = &self.pid_ns else {
            return false;
        };
        if self.host != hostname() || pid_namespace().as_ref() != Some(ns) {
            return false;
        }
        match start_ticks(self.pid) {
            None => std::path::Path::new("/proc/self/stat").exists(),
            Some(ticks) => self.start_ticks.is_some_and(|t| t != ticks),
        }
    }
}

fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Field 22 of `/proc/<pid>/stat`: when the process started.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}

/// A lock object in an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Lock {
    store: Arc<dyn ObjectStore>,
    key: Path,
    location: String,
    lease: Duration,
}

impl S3Lock {
    /// A lock at `key` in `store`.
    pub fn new(store: Arc<dyn ObjectStore>, key: Path, location: String) -> S3Lock {
        S3Lock {
            store,
            key,
            location,
            lease: DEFAULT_LEASE,
        }
    }

    /// Uses another lease length (tests of expiry).
    pub fn with_lease(mut self, lease: Duration) -> S3Lock {
        self.lease = lease;
        self
    }

    fn record(&self, operation: Operation) -> Record {
        let now = Utc::now();
        let host = hostname();
        let pid = std::process::id();
        Record {
            owner: format!(
                "{host}/{pid}/{}/{}",
                now.timestamp_nanos_opt().unwrap_or_default(),
                TOKEN.fetch_add(1, Ordering::Relaxed)
            ),
            operation: operation.as_str().to_owned(),
            host,
            pid,
            acquired_at: now,
            expires_at: now
                + chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::seconds(60)),
            pid_ns: pid_namespace(),
            start_ticks: start_ticks(pid),
        }
    }

    async fn put(
        &self,
        record: &Record,
        mode: PutMode,
    ) -> std::result::Result<Option<String>, object_store::Error> {
        let json = serde_json::to_vec(record).map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        })?;
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        Ok(self
            .store
            .put_opts(&self.key, json.into(), options)
            .await?
            .e_tag)
    }

    /// The current lock record and its etag, if any.
    async fn current(&self) -> Result<Option<(Record, Option<String>)>> {
        let result = match self.store.get(&self.key).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(map_err(&self.location, &self.key, e)),
        };
        let e_tag = result.meta.e_tag.clone();
        let bytes = result
            .bytes()
            .await
            .map_err(|e| map_err(&self.location, &self.key, e))?;
        // An unreadable record counts as expired: it cannot name a live holder.
        let record = serde_json::from_slice(&bytes).unwrap_or(Record {
            owner: "unreadable".into(),
            operation: "unknown".into(),
            host: "unknown".into(),
            pid: 0,
            acquired_at: DateTime::UNIX_EPOCH,
            expires_at: DateTime::UNIX_EPOCH,
            pid_ns: None,
            start_ticks: None,
        });
        Ok(Some((record, e_tag)))
    }

    fn busy(operation: Operation, holder: String) -> Error {
        Error::Busy {
            operation: operation.as_str().to_owned(),
            holder: format!("{holder} holds the lock"),
        }
    }

    fn guard(&self, record: Record, e_tag: Option<String>) -> S3LockGuard {
        let shared = Arc::new(tokio::sync::Mutex::new(Held {
            record,
            e_tag,
            released: false,
        }));
        let renewer = {
            let (lock, shared) = (self.clone(), Arc::clone(&shared));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lock.lease / 3).await;
                    let mut held = shared.lock().await;
                    if held.released {
                        return;
                    }
                    let mut next = held.record.clone();
                    next.expires_at = Utc::now()
                        + chrono::Duration::from_std(lock.lease)
                            .unwrap_or(chrono::Duration::seconds(60));
                    let mode = PutMode::Update(UpdateVersion {
                        e_tag: held.e_tag.clone(),
                        version: None,
                    });
                    match lock.put(&next, mode).await {
                        Ok(tag) => {
                            held.record = next;
                            held.e_tag = tag;
                        }
                        Err(e) => {
                            tracing::error!(key = %lock.key, error = %e, "renewing the lock lease failed; it will expire");
                            return;
                        }
                    }
                }
            })
        };
        S3LockGuard {
            lock: self.clone(),
            shared,
            renewer: Some(renewer),
        }
    }
}

#[async_trait]
impl OperationLock for S3Lock {
    async fn try_acquire(&self, operation: Operation) -> Result<Box<dyn LockGuard>> {
        let record = self.record(operation);
        match self.put(&record, PutMode::Create).await {
            Ok(e_tag) => return Ok(Box::new(self.guard(record, e_tag))),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {}
            Err(e) => return Err(map_err(&self.location, &self.key, e)),
        }
        let Some((current, e_tag)) = self.current().await? else {
            // Released meanwhile: one more try, then report busy.
            return match self.put(&record, PutMode::Create).await {
                Ok(tag) => Ok(Box::new(self.guard(record, tag))),
                Err(_) => Err(Self::busy(operation, "another operation".into())),
            };
        };
        if current.expires_at > Utc::now() && !current.holder_is_dead() {
            return Err(Self::busy(operation, current.holder()));
        }
        // Expired, or its holder died. Take it over, conditionally.
        let mode = PutMode::Update(UpdateVersion {
            e_tag,
            version: None,
        });
        match self.put(&record, mode).await {
            Ok(tag) => {
                tracing::warn!(key = %self.key, stale = %current.holder(), "took over an expired lock");
                Ok(Box::new(self.guard(record, tag)))
            }
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => Err(Self::busy(
                operation,
                "another process that just took over the expired lock".into(),
            )),
            Err(e) => Err(map_err(&self.location, &self.key, e)),
        }
    }
}

#[derive(Debug)]
struct Held {
    record: Record,
    e_tag: Option<String>,
    released: bool,
}

/// A held S3 lock; released by [`release`](LockGuard::release) or, in the
/// background, on drop.
#[derive(Debug)]
pub struct S3LockGuard {
    lock: S3Lock,
    shared: Arc<tokio::sync::Mutex<Held>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

async fn release(lock: S3Lock, shared: Arc<tokio::sync::Mutex<Held>>) -> Result<()> {
    let mut held = shared.lock().await;
    if held.released {
        return Ok(());
    }
    held.released = true;
    mark_released(&held.record.owner);
    // Delete only our own record (a holder that lost its lease must not
    // remove the next holder's).
    match lock.current().await? {
        Some((current, _)) if current.owner == held.record.owner => {
            match lock.store.delete(&lock.key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(map_err(&lock.location, &lock.key, e)),
            }
        }
        _ => Ok(()),
    }
}

#[async_trait]
impl LockGuard for S3LockGuard {
    async fn release(mut self: Box<Self>) -> Result<()> {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        release(self.lock.clone(), Arc::clone(&self.shared)).await
    }
}

impl Drop for S3LockGuard {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let (lock, shared) = (self.lock.clone(), Arc::clone(&self.shared));
                handle.spawn(async move {
                    if let Err(e) = release(lock, shared).await {
                        tracing::warn!(error = %e, "releasing a dropped lock failed; its lease expires");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_record() -> Record {
        S3Lock::new(
            Arc::new(object_store::memory::InMemory::new()),
            Path::from("lock"),
            "mem".into(),
        )
        .record(Operation::Backup)
    }

    #[test]
    fn a_live_holder_is_not_dead() {
        let record = own_record();
        assert!(record.pid_ns.is_some() && record.start_ticks.is_some());
        assert!(!record.holder_is_dead());
    }

    #[test]
    fn a_lock_this_process_released_is_free_even_if_its_object_stayed() {
        let record = Record {
            host: "another-host".into(),
            ..own_record()
        };
        assert!(!record.holder_is_dead());
        mark_released(&record.owner);
        assert!(record.holder_is_dead());
    }

    #[test]
    fn an_exited_holder_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let record = Record {
            pid,
            ..own_record()
        };
        assert!(record.holder_is_dead());
    }

    #[test]
    fn a_reused_pid_is_dead_but_other_hosts_and_old_records_are_not_judged() {
        let own = own_record();
        let reused = Record {
            start_ticks: own.start_ticks.map(|t| t + 1),
            ..own.clone()
        };
        assert!(reused.holder_is_dead());
        let elsewhere = Record {
            host: "another-host".into(),
            ..reused.clone()
        };
        assert!(!elsewhere.holder_is_dead());
        let other_ns = Record {
            pid_ns: Some("pid:[1]".into()),
            ..reused.clone()
        };
        assert!(!other_ns.holder_is_dead());
        let old_format = Record {
            pid_ns: None,
            start_ticks: None,
            ..reused
        };
        assert!(!old_format.holder_is_dead());
    }
}
