//! LocalFsStore and FileLock: the shared conformance suite, plus what only
//! a local disk has (permissions, crash leftovers, disk full, read-only).

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use adapters_fs::{FileLock, LocalDir, LocalFsStore};
use async_trait::async_trait;
use backup_core::conformance::{self, Target};
use backup_core::ports::{BackupStore, ObjectName, Operation, OperationLock};
use backup_core::{BackupId, Compression, Error, Trigger};
use futures::StreamExt;

struct Local {
    root: PathBuf,
    store: Arc<LocalFsStore>,
}

impl Local {
    fn new(root: &Path) -> Local {
        Local {
            root: root.to_path_buf(),
            store: Arc::new(LocalDir::store(root).unwrap()),
        }
    }
}

#[async_trait]
impl Target for Local {
    fn store(&self) -> Arc<dyn BackupStore> {
        self.store.clone()
    }
    fn lock(&self) -> Arc<dyn OperationLock> {
        Arc::new(FileLock::in_dir(&self.root))
    }
    fn other_lock(&self) -> Arc<dyn OperationLock> {
        Arc::new(FileLock::in_dir(&self.root))
    }
    async fn put_raw(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.root.join(name), bytes).unwrap();
    }
    async fn exists_raw(&self, name: &str) -> bool {
        self.root.join(name).exists()
    }
}

fn id(secs: i64) -> BackupId {
    BackupId::new(
        chrono::DateTime::from_timestamp(secs, 0).unwrap(),
        Trigger::Manual,
        1,
    )
}

fn bytes_stream(data: Vec<u8>) -> backup_core::ports::ByteStream {
    futures::stream::once(async move { Ok(bytes::Bytes::from(data)) }).boxed()
}

#[tokio::test]
async fn local_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run_all(&Local::new(&dir.path().join("backups"))).await;
}

#[tokio::test]
async fn a_lazy_store_appears_with_its_first_write_and_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pool/backups");
    let store = LocalDir::lazy_store(&root);
    assert!(store.list().await.unwrap().is_empty());
    assert!(store.cleanup_incomplete().await.unwrap().is_empty());
    assert!(matches!(
        store.manifest(&id(1_800_000_000)).await,
        Err(Error::NotFound { .. })
    ));
    assert!(!root.exists(), "reading does not create it");
    store
        .put(
            &id(1_800_000_000),
            &ObjectName::Archive(Compression::Gzip),
            bytes_stream(b"x".to_vec()),
        )
        .await
        .unwrap();
    let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    store.discard(&id(1_800_000_000)).await.unwrap();
    let target = Local {
        root: root.clone(),
        store: Arc::new(store),
    };
    conformance::run_all(&target).await;
}

#[tokio::test]
async fn backup_directory_and_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a/b/backups");
    let store = LocalDir::store(&root).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    let id = id(1_800_000_000);
    store
        .put(
            &id,
            &ObjectName::Archive(Compression::Gzip),
            bytes_stream(b"a".to_vec()),
        )
        .await
        .unwrap();
    store
        .publish(&conformance::manifest_for(&id, Some(b"a"), b"x"))
        .await
        .unwrap();
    assert_eq!(mode(&root.join(format!("{id}.tar.gz"))), 0o600);
    assert_eq!(mode(&root.join(format!("{id}.manifest.json"))), 0o600);
    let _g = FileLock::in_dir(&root)
        .try_acquire(Operation::Backup)
        .await
        .unwrap();
    assert_eq!(mode(&root.join(".lock")), 0o600);
}

#[tokio::test]
async fn a_failed_stream_leaves_no_partial_object() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDir::store(dir.path()).unwrap();
    let id = id(1_800_000_000);
    let failing = futures::stream::iter(vec![
        Ok(bytes::Bytes::from_static(b"some data")),
        Err(std::io::Error::other("source broke")),
    ])
    .boxed();
    let err = store
        .put(&id, &ObjectName::Archive(Compression::Gzip), failing)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("source broke"), "{err}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[tokio::test]
async fn leftover_temp_files_of_a_crash_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDir::store(dir.path()).unwrap();
    let id = id(1_800_000_000);
    std::fs::write(dir.path().join(format!(".{id}.tar.gz.tmp-999-0")), b"half").unwrap();
    std::fs::write(
        dir.path().join(format!(".{id}.manifest.json.tmp-999-1")),
        b"{",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join(id.to_string()).join("memory")).unwrap();
    let removed = store.cleanup_incomplete().await.unwrap();
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_lock_held_by_another_process_is_busy_and_names_it_and_dies_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let lock_file = dir.path().join(".lock");
    std::fs::write(&lock_file, b"").unwrap();
    // flock(1) runs `sleep` holding the lock; both in their own process group.
    let mut holder = Command::new("flock")
        .arg(&lock_file)
        .args(["sleep", "30"])
        .process_group(0)
        .spawn()
        .unwrap();
    let lock = FileLock::in_dir(dir.path());
    let mut busy = None;
    for _ in 0..100 {
        match lock.try_acquire(Operation::Backup).await {
            Err(e @ Error::Busy { .. }) => {
                busy = Some(e);
                break;
            }
            Ok(g) => {
                drop(g);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    busy.expect("the other process's lock is seen");
    // A holder writes who it is into the lock file; Busy shows it.
    std::fs::write(
        &lock_file,
        b"restore (pid 4242 on elsewhere since 2026-01-01T00:00:00Z)",
    )
    .unwrap();
    let busy = lock.try_acquire(Operation::Backup).await.unwrap_err();
    assert!(busy.to_string().contains("restore (pid 4242"), "{busy}");
    // SIGKILL the whole group: the OS releases the flock.
    let group = format!("-{}", holder.id());
    assert!(
        Command::new("kill")
            .args(["-9", "--", &group])
            .status()
            .unwrap()
            .success()
    );
    holder.wait().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(lock.try_acquire(Operation::Backup).await.is_ok());
}

/// Mounts a small tmpfs (root only; CI runs as root).
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, opts: &str) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            Some(Mount(at.to_path_buf()))
        } else {
            eprintln!("SKIPPED: cannot mount tmpfs here (needs root)");
            None
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn disk_full_is_a_clear_error_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mount) = Mount::tmpfs(&dir.path().join("small"), "size=1m") else {
        return;
    };
    let store = LocalDir::store(&mount.0).unwrap();
    let id = id(1_800_000_000);
    let big =
        futures::stream::iter((0..40).map(|_| Ok(bytes::Bytes::from(vec![7u8; 100_000])))).boxed();
    let err = store
        .put(&id, &ObjectName::Archive(Compression::Gzip), big)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(matches!(err, Error::Store { .. }));
    assert_eq!(
        std::fs::read_dir(&mount.0).unwrap().count(),
        0,
        "no partial file"
    );
}

#[tokio::test]
async fn a_read_only_backup_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mount) = Mount::tmpfs(&dir.path().join("ro"), "ro,size=1m") else {
        return;
    };
    let store = LocalDir::store(&mount.0).unwrap();
    let err = store
        .put(
            &id(1_800_000_000),
            &ObjectName::Archive(Compression::Gzip),
            bytes_stream(vec![1]),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    let err = LocalDir::store(mount.0.join("sub")).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
}
