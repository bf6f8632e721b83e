//! Faults of the local disk, end to end: a full disk under the backup path
//! and under the live data during restore staging. Both need root (tmpfs
//! mounts); CI runs as root, elsewhere they say SKIPPED.

#![allow(clippy::unwrap_used)]

use backup_core::{BackupConfig, Error, RestoreOptions, Trigger};
use synthorg_cli::demo::{self, DemoSize};
use synthorg_tests::{Fixture, Mount, capture, running_app};

/// Names under `dir`, recursively, relative.
fn names(dir: &std::path::Path) -> Vec<String> {
    synthorg_tests::files_under(dir)
        .into_iter()
        .map(|(p, _)| p.to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_during_backup_leaves_no_partial_backup() {
    let fx = Fixture::new(3_000_000).await;
    let Some(mount) = Mount::tmpfs(&fx.dir.path().join("small"), "size=1m") else {
        return;
    };
    let before = capture(&fx.layout).await;
    let service = fx.service(&fx.config(&format!("path: {}", mount.0.display())));
    let err = service.create(Trigger::Manual).await.unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(service.list().await.unwrap().is_empty());
    assert_eq!(
        names(&mount.0),
        vec![".lock".to_owned(), "_status.json".to_owned()],
        "only the lock file and the status record of the failure"
    );
    assert_eq!(capture(&fx.layout).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_during_restore_staging_is_refused_and_live_data_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mount) = Mount::tmpfs(&dir.path().join("live"), "size=16m") else {
        return;
    };
    let layout = demo::generate(&mount.0.join("data"), DemoSize::total(3_000_000), 11)
        .await
        .unwrap();
    let backups = dir.path().join("backups");
    let yaml = demo::config_yaml().replace(
        "path: backups",
        &format!("path: {}\n  compression: none", backups.display()),
    );
    let config = BackupConfig::load(Some(&yaml), &layout.root).unwrap();
    let service = synthorg_api::build_service(&config, running_app(), None).unwrap();
    let backup = service.create(Trigger::Manual).await.unwrap();

    std::fs::write(&layout.company_config, b"company: {name: changed}\n").unwrap();
    let before = capture(&layout).await;
    let files: u64 = backup.files.iter().map(|f| f.size).sum();
    // Room for less than the restored files: refused before anything is
    // staged, naming what is needed. Room for the files' bytes but not for
    // the blocks they take (each file's last page, the directories): the
    // check lets it through and staging runs out of space midway.
    for (leave, expected) in [
        (512 * 1024, "not enough free space to stage the restore"),
        (files + 4096, "no space left on device"),
    ] {
        mount.fill(&layout.root.join("filler"), leave);
        let raw_before = synthorg_tests::raw_bytes(&layout);
        let options = RestoreOptions {
            confirm: true,
            ..RestoreOptions::default()
        };
        let err = service.restore(&backup.id, options).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("disk full") && text.contains(expected),
            "{text}"
        );
        assert_eq!(capture(&layout).await, before);
        assert!(
            synthorg_tests::raw_bytes(&layout) == raw_before,
            "live files changed"
        );
        let staged: Vec<String> = std::fs::read_dir(&layout.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".restore-") || n.starts_with(".synthorg"))
            .collect();
        assert_eq!(staged, Vec::<String>::new(), "staging cleaned up");
        // No safety backup was taken for a restore that never got to the swap.
        assert_eq!(service.list().await.unwrap().len(), 1);
    }
}
