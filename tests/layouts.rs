//! Layouts operators use: component roots that are symlinks to another
//! disk or mount points (a Docker volume), and data owned by the app's own
//! user while the restore runs as root. Each round trip compares the data
//! by content and checks that the layout itself survives.

#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use backup_core::ports::Listed;
use backup_core::{Component, Error, Trigger};
use synthorg_tests::{Fixture, Mount, capture, confirmed};

/// Changes every component through whatever layout it has.
async fn mutate(fx: &Fixture) {
    let mut conn = synthorg_tests::open(&fx.layout.database).await;
    sqlx::query("UPDATE tasks SET status = 'changed'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    std::fs::write(fx.layout.memory_dir.join("new-note.json"), b"{}").unwrap();
    std::fs::write(&fx.layout.company_config, b"company:\n  name: Changed\n").unwrap();
    std::fs::remove_dir_all(fx.layout.checkpoints_dir.join("task-0000")).unwrap();
}

/// Moves `path` to `elsewhere/<name>` and puts a symlink in its place.
fn move_behind_link(path: &Path, elsewhere: &Path) -> PathBuf {
    std::fs::create_dir_all(elsewhere).unwrap();
    let target = elsewhere.join(path.file_name().unwrap());
    std::fs::rename(path, &target).unwrap();
    std::os::unix::fs::symlink(&target, path).unwrap();
    target
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_component_roots_round_trip_and_the_links_survive() {
    let fx = Fixture::new(500_000).await;
    let elsewhere = fx.dir.path().join("other-disk");
    let roots = [
        fx.layout.database.clone(),
        fx.layout.memory_dir.clone(),
        fx.layout.company_config.clone(),
        fx.layout.checkpoints_dir.clone(),
    ];
    let targets: Vec<PathBuf> = roots
        .iter()
        .map(|r| move_behind_link(r, &elsewhere))
        .collect();
    let service = fx.service(&fx.config(""));
    let before = capture(&fx.layout).await;
    let backup = service.create(Trigger::Manual).await.unwrap();
    for c in Component::ALL {
        assert!(
            backup.components.contains(&c),
            "{c} backed up through its link"
        );
    }
    assert!(backup.file("memory/mem0_history.db").is_some());
    mutate(&fx).await;
    assert_ne!(capture(&fx.layout).await, before);
    service.restore(&backup.id, confirmed()).await.unwrap();
    assert_eq!(capture(&fx.layout).await, before);
    for (root, target) in roots.iter().zip(&targets) {
        let meta = std::fs::symlink_metadata(root).unwrap();
        assert!(meta.is_symlink(), "{} is still a link", root.display());
        assert_eq!(&std::fs::read_link(root).unwrap(), target);
    }
    // Nothing was left next to the links or the targets.
    for dir in [&fx.layout.root, &elsewhere] {
        let hidden = synthorg_tests::hidden_entries(dir);
        assert!(hidden.is_empty(), "{}: {hidden:?}", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_memory_directory_is_restored_inside_its_mount() {
    let fx = Fixture::new(500_000).await;
    let memory = fx.layout.memory_dir.clone();
    let saved = fx.dir.path().join("memory-saved");
    std::fs::rename(&memory, &saved).unwrap();
    let Some(_mount) = Mount::tmpfs(&memory, "size=32m") else {
        return;
    };
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", saved.display()))
        .arg(&memory)
        .status()
        .unwrap();
    assert!(out.success());
    let service = fx.service(&fx.config(""));
    let before = capture(&fx.layout).await;
    let backup = service.create(Trigger::Manual).await.unwrap();
    mutate(&fx).await;
    std::fs::remove_dir_all(memory.join("agents")).unwrap();
    let changed = capture(&fx.layout).await;
    // The swap inside the mount fails at every step in turn: rolled back.
    let config = fx.config("");
    let (mut n, mut memory_named) = (0, 0);
    loop {
        let failing = synthorg_api::build_service_with(
            &config,
            synthorg_tests::running_app(),
            None,
            adapters_fs::LiveData::new(&config.sources)
                .with_verifier(std::sync::Arc::new(adapters_sqlite::SqliteSnapshotter))
                .fail_swap_after(n),
        )
        .unwrap();
        let err = match failing.restore(&backup.id, confirmed()).await {
            Ok(_) => break,
            Err(e) => e,
        };
        let text = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(
            text.matches("injected fault").count(),
            1,
            "said once: {text}"
        );
        if text.contains("memory source failed") {
            memory_named += 1;
            assert!(text.contains(&memory.display().to_string()), "{text}");
        }
        assert_eq!(
            capture(&fx.layout).await,
            changed,
            "fault before rename {n}"
        );
        n += 1;
        assert!(n < 100);
    }
    assert!(n > 4, "the swap inside the mount moves entry by entry: {n}");
    assert!(
        memory_named > 2,
        "failed moves inside memory/ name memory: {memory_named}"
    );
    assert_eq!(capture(&fx.layout).await, before);
    mutate(&fx).await;
    service.restore(&backup.id, confirmed()).await.unwrap();
    assert_eq!(capture(&fx.layout).await, before);
    let names: Vec<_> = std::fs::read_dir(&memory)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".synthorg")),
        "{names:?}"
    );
    // Still the mount: another device than its parent.
    assert_ne!(
        std::fs::metadata(&memory).unwrap().dev(),
        std::fs::metadata(&fx.layout.root).unwrap().dev()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_mounted_config_file_is_refused_before_anything_is_touched() {
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config(""));
    let backup = service.create(Trigger::Manual).await.unwrap();
    let source = fx.dir.path().join("company-on-host.yaml");
    std::fs::copy(&fx.layout.company_config, &source).unwrap();
    let mounted = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&source)
        .arg(&fx.layout.company_config)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot bind-mount here (needs root)");
        return;
    }
    let raw = synthorg_tests::raw_bytes(&fx.layout);
    let err = service.restore(&backup.id, confirmed()).await.unwrap_err();
    let _ = std::process::Command::new("umount")
        .arg(&fx.layout.company_config)
        .status();
    let text = err.to_string();
    assert!(
        matches!(
            &err,
            Error::Source {
                component: Component::Config,
                ..
            }
        ) && text.contains("mount point"),
        "{text}"
    );
    assert_eq!(text.matches("mount point").count(), 1, "said once: {text}");
    assert_eq!(synthorg_tests::raw_bytes(&fx.layout), raw);
    let listed = service.list().await.unwrap();
    assert_eq!(listed.len(), 1, "no safety backup: {listed:?}");
    assert!(matches!(&listed[0], Listed::Complete(_)));
}

/// Every path under `root` (not following links) with its owner.
fn owners(root: &Path) -> Vec<(PathBuf, u32, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        out.push((p.clone(), meta.uid(), meta.gid()));
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_owned_by_the_app_user_keeps_its_owner_when_root_restores() {
    if !is_root() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let fx = Fixture::new(300_000).await;
    let chown = |path: &Path| {
        let ok = std::process::Command::new("chown")
            .args(["-R", "1000:1000"])
            .arg(path)
            .status()
            .unwrap();
        assert!(ok.success());
    };
    for p in [
        &fx.layout.database,
        &fx.layout.memory_dir,
        &fx.layout.company_config,
        &fx.layout.checkpoints_dir,
    ] {
        chown(p);
    }
    let service = fx.service(&fx.config(""));
    let backup = service.create(Trigger::Manual).await.unwrap();
    assert!(
        backup
            .files
            .iter()
            .all(|f| f.uid == Some(1000) && f.gid == Some(1000))
    );
    mutate(&fx).await;
    service.restore(&backup.id, confirmed()).await.unwrap();
    let check = |what: &str| {
        for root in [
            &fx.layout.database,
            &fx.layout.memory_dir,
            &fx.layout.company_config,
            &fx.layout.checkpoints_dir,
        ] {
            for (p, uid, gid) in owners(root) {
                assert_eq!((uid, gid), (1000, 1000), "{what}: {}", p.display());
            }
        }
    };
    check("restore over live data");
    let mode = std::fs::metadata(&fx.layout.memory_dir).unwrap().mode() & 0o777;
    assert_ne!(mode, 0o700, "the memory directory keeps its recorded mode");

    // Into an empty location (disaster recovery): the recorded owner,
    // also for the data directory the restore creates (the app creates
    // its -wal and -shm there).
    for p in [&fx.layout.memory_dir, &fx.layout.checkpoints_dir] {
        std::fs::remove_dir_all(p).unwrap();
    }
    std::fs::remove_file(&fx.layout.database).unwrap();
    std::fs::remove_file(&fx.layout.company_config).unwrap();
    service.restore(&backup.id, confirmed()).await.unwrap();
    check("restore into an empty location");
    let elsewhere = fx.dir.path().join("new-host/data");
    let yaml = format!(
        "backup:\n  path: {}\n  sources:\n    database: {}/synthorg.db\n    memory_dir: {}/memory\n    company_config: {}/company.yaml\n    checkpoints_dir: {}/checkpoints\n",
        fx.layout.backups_dir.display(),
        elsewhere.display(),
        elsewhere.display(),
        elsewhere.display(),
        elsewhere.display()
    );
    let config = backup_core::BackupConfig::load(Some(&yaml), fx.dir.path()).unwrap();
    let fresh = fx.service(&config);
    fresh.restore(&backup.id, confirmed()).await.unwrap();
    let meta = std::fs::metadata(&elsewhere).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (1000, 1000),
        "created data directory"
    );
    assert_eq!(meta.mode() & 0o777 & 0o700, 0o700);
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
