//! DirSource on real trees: layout, names, many files, links, special
//! files, and files that change while they are read.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use adapters_fs::DirSource;
use backup_core::ports::{ComponentSource, EntryKind, Opened, Snapshot};
use backup_core::{ArchivePath, Component, Error};
use futures::StreamExt;

async fn read(snap: &dyn Snapshot, path: &str) -> Result<Vec<u8>, Error> {
    let mut opened = snap.open(&ArchivePath::parse(path).unwrap()).await?;
    let mut out = Vec::new();
    while let Some(chunk) = opened.stream.next().await {
        out.extend_from_slice(&chunk.map_err(|e| Error::Cancelled(e.to_string()))?);
    }
    assert_eq!(out.len() as u64, opened.size);
    Ok(out)
}

fn paths(snap: &dyn Snapshot) -> Vec<(String, EntryKind)> {
    snap.entries()
        .iter()
        .map(|e| (e.path.to_string(), e.kind.clone()))
        .collect()
}

#[tokio::test]
async fn nested_trees_empty_dirs_unicode_names_and_modes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("memory");
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("a/b/c/deep.bin"), vec![9u8; 5000]).unwrap();
    std::fs::write(root.join("Ünïcødé ✓ notes.json"), "{\"ok\":true}").unwrap();
    std::fs::write(root.join("a/script.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        root.join("a/script.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();

    let snap = DirSource::dir(Component::Memory, &root)
        .snapshot()
        .await
        .unwrap();
    let listed = paths(snap.as_ref());
    let expect = [
        ("memory", EntryKind::Dir),
        ("memory/a", EntryKind::Dir),
        ("memory/a/b", EntryKind::Dir),
        ("memory/a/b/c", EntryKind::Dir),
        ("memory/a/b/c/deep.bin", EntryKind::File),
        ("memory/a/script.sh", EntryKind::File),
        ("memory/empty", EntryKind::Dir),
        ("memory/Ünïcødé ✓ notes.json", EntryKind::File),
    ];
    let mut sorted: Vec<(String, EntryKind)> = expect
        .iter()
        .map(|(p, k)| ((*p).to_owned(), k.clone()))
        .collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    assert_eq!(listed, sorted);
    let script = snap
        .entries()
        .iter()
        .find(|e| e.path.as_str() == "memory/a/script.sh")
        .unwrap();
    assert_eq!(script.mode, 0o750);
    assert_eq!(
        read(snap.as_ref(), "memory/a/b/c/deep.bin").await.unwrap(),
        vec![9u8; 5000]
    );
    assert_eq!(
        read(snap.as_ref(), "memory/Ünïcødé ✓ notes.json")
            .await
            .unwrap(),
        b"{\"ok\":true}"
    );
    snap.finish().await.unwrap();
}

#[tokio::test]
async fn ten_thousand_small_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    for i in 0..10_000 {
        let task = root.join(format!("task-{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&task).unwrap();
        }
        std::fs::write(
            task.join(format!("turn-{i:05}.json")),
            format!("{{\"turn\":{i}}}"),
        )
        .unwrap();
    }
    let snap = DirSource::dir(Component::Checkpoints, &root)
        .snapshot()
        .await
        .unwrap();
    let files: Vec<_> = snap
        .entries()
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .collect();
    assert_eq!(files.len(), 10_000);
    assert!(
        snap.entries().windows(2).all(|w| w[0].path < w[1].path),
        "sorted"
    );
    for e in files.iter().step_by(997) {
        let data = read(snap.as_ref(), e.path.as_str()).await.unwrap();
        assert_eq!(data.len() as u64, e.size);
    }
}

#[tokio::test]
async fn symlinks_inside_are_kept_outside_skipped_special_files_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("memory");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/target.txt"), b"t").unwrap();
    std::os::unix::fs::symlink("target.txt", root.join("sub/inside")).unwrap();
    std::os::unix::fs::symlink("../sub/target.txt", root.join("sub/also-inside")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("absolute")).unwrap();
    std::os::unix::fs::symlink("../../outside", root.join("sub/escaping")).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(root.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());

    let snap = DirSource::dir(Component::Memory, &root)
        .snapshot()
        .await
        .unwrap();
    let listed = paths(snap.as_ref());
    assert!(listed.contains(&(
        "memory/sub/inside".into(),
        EntryKind::Symlink("target.txt".into())
    )));
    assert!(listed.contains(&(
        "memory/sub/also-inside".into(),
        EntryKind::Symlink("../sub/target.txt".into())
    )));
    for skipped in ["memory/absolute", "memory/sub/escaping", "memory/pipe"] {
        assert!(
            !listed.iter().any(|(p, _)| p == skipped),
            "{skipped} was not skipped"
        );
    }
}

#[tokio::test]
async fn a_file_that_keeps_changing_fails_the_read_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("memory");
    std::fs::create_dir_all(&root).unwrap();
    let hot = root.join("hot.log");
    std::fs::write(&hot, vec![b'x'; 200_000]).unwrap();
    let snap = DirSource::dir(Component::Memory, &root)
        .snapshot()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, hot) = (Arc::clone(&stop), hot.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(hot).unwrap();
            while !stop.load(Ordering::Relaxed) {
                f.write_all(b"y").unwrap();
            }
        })
    };
    while std::fs::metadata(&hot).unwrap().len() < 210_000 {
        std::thread::yield_now(); // the writer is running
    }
    // A read that saw no change (the writer was descheduled throughout)
    // is consistent and fine; one that saw a change fails, naming the file.
    // Under a loaded machine the writer may stall for a while: keep trying
    // (each time after it made progress) until a change is caught.
    let mut failures = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut last_len = 0;
    while failures == 0 && std::time::Instant::now() < deadline {
        let len = std::fs::metadata(&hot).unwrap().len();
        if len == last_len {
            std::thread::yield_now();
            continue;
        }
        last_len = len;
        if let Err(e) = read(snap.as_ref(), "memory/hot.log").await {
            let text = e.to_string();
            assert!(
                text.contains("hot.log") && text.contains("changed while being read"),
                "{text}"
            );
            failures += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(failures > 0, "a constantly changing file is detected");
    // Once it is quiet, it reads fine.
    let data = read(snap.as_ref(), "memory/hot.log").await.unwrap();
    assert!(data.len() > 200_000);
}

/// A 6 MiB memory segment opened for streaming: the directory (kept
/// alive), the file, the stream.
async fn opened_segment() -> (tempfile::TempDir, std::path::PathBuf, Opened) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("memory");
    std::fs::create_dir_all(&root).unwrap();
    let big = root.join("segment.bin");
    std::fs::write(&big, vec![1u8; 6 << 20]).unwrap();
    let snap = DirSource::dir(Component::Memory, &root)
        .snapshot()
        .await
        .unwrap();
    let opened = snap
        .open(&ArchivePath::parse("memory/segment.bin").unwrap())
        .await
        .unwrap();
    (dir, big, opened)
}

#[tokio::test]
async fn a_large_file_that_changes_while_streamed_fails() {
    let (_dir, big, mut opened) = opened_segment().await;
    let first = opened.stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&big)
        .map(|mut f| {
            use std::io::Write;
            f.write_all(b"appended").unwrap();
        })
        .unwrap();
    let mut err = None;
    while let Some(chunk) = opened.stream.next().await {
        if let Err(e) = chunk {
            err = Some(e.to_string());
        }
    }
    let err = err.expect("the change is detected");
    assert!(
        err.contains("segment.bin") && err.contains("changed"),
        "{err}"
    );
}

#[tokio::test]
async fn a_large_file_cut_short_while_streamed_fails() {
    let (_dir, big, mut opened) = opened_segment().await;
    let declared = opened.size;
    let mut read = opened.stream.next().await.unwrap().unwrap().len() as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut err = None;
    while let Some(chunk) = opened.stream.next().await {
        match chunk {
            Ok(c) => read += c.len() as u64,
            Err(e) => err = Some(e.to_string()),
        }
    }
    assert!(read < declared, "{read} of {declared}");
    let err = err.expect("the change is detected");
    assert!(
        err.contains("segment.bin") && err.contains("changed"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_directory_is_an_empty_component_and_config_is_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let snap = DirSource::dir(Component::Checkpoints, dir.path().join("nope"))
        .snapshot()
        .await
        .unwrap();
    assert!(snap.entries().is_empty());

    let company = dir.path().join("acme.yaml");
    std::fs::write(&company, "company: {name: acme}\n").unwrap();
    let snap = DirSource::file(Component::Config, &company)
        .snapshot()
        .await
        .unwrap();
    assert_eq!(
        paths(snap.as_ref()),
        vec![
            ("config".to_owned(), EntryKind::Dir),
            ("config/acme.yaml".to_owned(), EntryKind::File)
        ]
    );
    assert_eq!(
        read(snap.as_ref(), "config/acme.yaml").await.unwrap(),
        b"company: {name: acme}\n"
    );

    let err = DirSource::file(Component::Config, dir.path())
        .snapshot()
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[tokio::test]
async fn small_files_read_ahead_in_any_order_and_after_changes_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("memory");
    std::fs::create_dir_all(&root).unwrap();
    // More files and bytes than one read-ahead batch, sizes varied, one
    // file too large to buffer in the middle.
    let content = |i: usize| format!("file {i} ").repeat(1 + i * 37 % 4000).into_bytes();
    for i in 0..300 {
        std::fs::write(root.join(format!("f{i:03}.json")), content(i)).unwrap();
    }
    std::fs::write(root.join("f150big.bin"), vec![3u8; 3 << 20]).unwrap();
    let snap = DirSource::dir(Component::Memory, &root)
        .snapshot()
        .await
        .unwrap();

    // In order, as the archive writer reads: every byte as written, even
    // for files rewritten after the batch that read them ahead.
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..300 {
        let path = format!("memory/f{i:03}.json");
        if i == 10 {
            // f011.. are read ahead by now; rewrite one of them.
            std::fs::write(root.join("f012.json"), b"rewritten").unwrap();
        }
        let got = read(snap.as_ref(), &path).await.unwrap();
        let want = if i == 12 && got == b"rewritten" {
            b"rewritten".to_vec()
        } else {
            content(i)
        };
        assert_eq!(got, want, "{path}");
        expected.push((path, got));
        if i == 150 {
            let big = read(snap.as_ref(), "memory/f150big.bin").await.unwrap();
            assert_eq!(big, vec![3u8; 3 << 20]);
        }
    }
    // Again, backwards: no read-ahead helps, the bytes are the same.
    for (path, bytes) in expected.iter().rev().take(50) {
        assert_eq!(&read(snap.as_ref(), path).await.unwrap(), bytes, "{path}");
    }
}
