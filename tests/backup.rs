//! Backups end to end with the real adapters: a generated SynthOrg data
//! directory, a live writer, the local-disk store, and the system `tar`.

#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::Path;
use std::process::Command;

use backup_core::manifest::tree_checksum;
use backup_core::ports::Listed;
use backup_core::{Component, Compression, Error, Manifest, Sha256Digest, Trigger};
use synthorg_tests::{Fixture, Writer, dump, files_under, writer_state};

fn extract(archive: &Path, into: &Path, flags: &[&str]) {
    std::fs::create_dir_all(into).unwrap();
    let out = Command::new("tar")
        .args(flags)
        .arg(archive)
        .arg("-C")
        .arg(into)
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything in an extracted backup equals the live data: files byte for
/// byte, databases by SQL content, and the manifest's hashes recompute.
async fn assert_matches_live(fx: &Fixture, extracted: &Path, manifest: &Manifest) {
    let live = &fx.layout;
    assert_eq!(
        dump(&extracted.join("synthorg.db")).await,
        dump(&live.database).await
    );
    for (rel, bytes) in files_under(&live.memory_dir) {
        let copy = extracted.join("memory").join(&rel);
        if rel.extension().is_some_and(|e| e == "db") {
            assert_eq!(
                dump(&copy).await,
                dump(&live.memory_dir.join(&rel)).await,
                "{rel:?}"
            );
        } else {
            assert_eq!(std::fs::read(&copy).unwrap(), bytes, "memory/{rel:?}");
        }
    }
    assert_eq!(
        files_under(&extracted.join("checkpoints")),
        files_under(&live.checkpoints_dir)
    );
    assert_eq!(
        std::fs::read(extracted.join("config/company.yaml")).unwrap(),
        std::fs::read(&live.company_config).unwrap()
    );
    for f in &manifest.files {
        let data = std::fs::read(extracted.join(f.path.as_str())).unwrap();
        assert_eq!(data.len() as u64, f.size, "{}", f.path);
        assert_eq!(Sha256Digest::of(&data), f.sha256, "{}", f.path);
    }
    assert_eq!(
        tree_checksum(&manifest.files, &manifest.dirs, &manifest.symlinks),
        manifest.checksum
    );
    let inner =
        Manifest::from_json(&std::fs::read(extracted.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(inner.checksum, manifest.checksum);
    assert_eq!(inner.id, manifest.id);
}

#[tokio::test]
async fn gzip_backup_opens_with_system_tar_and_equals_the_live_data() {
    let fx = Fixture::new(3_000_000).await;
    let config = fx.config("");
    let service = fx.service(&config);
    let m = service.create(Trigger::Manual).await.unwrap();

    assert_eq!(m.components, Component::ALL.to_vec());
    assert_eq!(
        m.db_schema_version,
        Some(synthorg_cli::demo::DEMO_SCHEMA_VERSION)
    );
    assert_eq!(m.synthorg_version.to_string(), synthorg_tests::APP_VERSION);
    assert!(m.checksum.to_string().starts_with("sha256:"));
    let archive = fx.layout.backups_dir.join(format!("{}.tar.gz", m.id));
    let info = m.archive.as_ref().unwrap();
    assert_eq!(std::fs::metadata(&archive).unwrap().len(), info.size_bytes);
    assert_eq!(
        Sha256Digest::of(&std::fs::read(&archive).unwrap()),
        info.sha256
    );
    assert!(
        fx.layout
            .backups_dir
            .join(format!("{}.manifest.json", m.id))
            .is_file()
    );

    let out = fx.dir.path().join("extracted");
    extract(&archive, &out, &["-xzf"]);
    assert_matches_live(&fx, &out, &m).await;

    let report = service.verify(&m.id).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.files_checked, m.files.len() as u64);
    let listed = service.list().await.unwrap();
    assert!(matches!(&listed[..], [Listed::Complete(x)] if x.id == m.id));
}

#[tokio::test]
async fn zstd_and_directory_forms_round_trip() {
    let fx = Fixture::new(1_000_000).await;
    let zstd = fx.service(&fx.config("compression: zstd"));
    let m = zstd.create(Trigger::Scheduled).await.unwrap();
    assert_eq!(m.compression, Compression::Zstd);
    let out = fx.dir.path().join("zstd");
    extract(
        &fx.layout.backups_dir.join(format!("{}.tar.zst", m.id)),
        &out,
        &["--zstd", "-xf"],
    );
    assert!(zstd.verify(&m.id).await.unwrap().ok);

    let plain = fx.service(&fx.config("compression: false"));
    let d = plain.create(Trigger::Manual).await.unwrap();
    assert_eq!(d.compression, Compression::None);
    assert!(d.archive.is_none());
    let dir = fx.layout.backups_dir.join(d.id.to_string());
    assert_matches_live(&fx, &dir, &d).await;
    assert!(plain.verify(&d.id).await.unwrap().ok);
    // Same data, same tree checksum in both forms.
    assert_eq!(m.checksum, d.checksum);
}

#[tokio::test]
async fn verify_catches_a_flipped_byte_in_archive_and_directory_forms() {
    let fx = Fixture::new(500_000).await;
    let gz = fx.service(&fx.config(""));
    let m = gz.create(Trigger::Manual).await.unwrap();
    let archive = fx.layout.backups_dir.join(format!("{}.tar.gz", m.id));
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&archive, bytes).unwrap();
    let report = gz.verify(&m.id).await.unwrap();
    assert!(!report.ok);
    assert!(report.problem.unwrap().contains(&m.id.to_string()));

    let plain = fx.service(&fx.config("compression: none"));
    let d = plain.create(Trigger::Manual).await.unwrap();
    let file = fx
        .layout
        .backups_dir
        .join(d.id.to_string())
        .join("config/company.yaml");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[3] ^= 0x20;
    std::fs::write(&file, bytes).unwrap();
    let report = plain.verify(&d.id).await.unwrap();
    assert!(!report.ok);
    assert!(report.problem.unwrap().contains("config/company.yaml"));
}

/// The stored bytes of each member of a backup's archive.
fn members_of(fx: &Fixture, m: &Manifest) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(fx.layout.backups_dir.join(format!("{}.tar.gz", m.id))).unwrap();
    let info = m.archive.as_ref().unwrap();
    let ends = info.members.iter().skip(1).map(|o| *o as usize);
    info.members
        .iter()
        .map(|o| *o as usize)
        .zip(ends.chain([bytes.len()]))
        .map(|(a, b)| bytes[a..b].to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_after_a_small_change_copies_unchanged_members_and_never_a_damaged_one() {
    let fx = Fixture::new(3_000_000).await;
    let service = fx.service(&fx.config(""));
    let first = service.create(Trigger::Scheduled).await.unwrap();
    let first_members = members_of(&fx, &first);
    let first_info = first.archive.as_ref().unwrap();
    let pieces_object =
        std::fs::read(fx.layout.backups_dir.join(format!("{}.pieces", first.id))).unwrap();
    assert_eq!(
        Some(backup_core::Blake3Digest::of(&pieces_object)),
        first_info.pieces
    );
    let pieces = backup_core::manifest::PieceDigest::decode(&pieces_object).unwrap();
    assert_eq!(pieces.len(), first_members.len());
    assert!(first_members.len() > 20, "{} members", first_members.len());
    for (member, piece) in first_members.iter().zip(&pieces) {
        assert_eq!(backup_core::Blake3Digest::of(member), piece.packed);
    }

    // A small change: one checkpoint added, one memory file rewritten.
    let turn = fx.layout.checkpoints_dir.join("task-new/turn-0000.json");
    std::fs::create_dir_all(turn.parent().unwrap()).unwrap();
    std::fs::write(&turn, b"{\"turn\": 0}").unwrap();
    let (rel, _) = files_under(&fx.layout.memory_dir)
        .into_iter()
        .find(|(rel, _)| rel.extension().is_some_and(|e| e == "json"))
        .unwrap();
    std::fs::write(fx.layout.memory_dir.join(&rel), b"{\"rewritten\": true}").unwrap();

    // Damage the last member of the first archive that the second needs
    // unchanged (its content is still live).
    let second_plan = service.create(Trigger::Manual).await.unwrap();
    let needed = members_of(&fx, &second_plan);
    let victim = first_members
        .iter()
        .rposition(|m| needed.contains(m))
        .expect("members shared");
    let shared = first_members.iter().filter(|m| needed.contains(m)).count();
    assert!(
        shared * 10 >= needed.len() * 7,
        "only {shared} of {} members copied",
        needed.len()
    );
    service.delete(&second_plan.id, false).await.unwrap();
    assert!(
        !fx.layout
            .backups_dir
            .join(format!("{}.pieces", second_plan.id))
            .exists(),
        "a deleted backup's pieces object stays"
    );
    let path = fx.layout.backups_dir.join(format!("{}.tar.gz", first.id));
    let mut bytes = std::fs::read(&path).unwrap();
    let spot = first_info.members[victim] as usize + 12;
    bytes[spot] ^= 0x10;
    let damaged =
        bytes[first_info.members[victim] as usize..][..first_members[victim].len()].to_vec();
    std::fs::write(&path, bytes).unwrap();

    let second = service.create(Trigger::Manual).await.unwrap();
    let second_members = members_of(&fx, &second);
    // The member's content was compressed afresh: a member with the same
    // content (not necessarily the same bytes: a piece may be stored or
    // compressed, by what deflate did with the piece before it).
    let gunzip = |member: &[u8]| {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(member), &mut out).unwrap();
        out
    };
    let victim_content = gunzip(&first_members[victim]);
    assert!(
        second_members.iter().any(|m| gunzip(m) == victim_content),
        "the damaged member's content is in the new archive"
    );
    assert!(
        !second_members.contains(&damaged),
        "a damaged member was copied"
    );
    let copied = second_members
        .iter()
        .filter(|m| first_members.contains(m))
        .count();
    assert!(
        copied + 3 >= shared,
        "{copied} members copied, {shared} before"
    );
    assert!(!service.verify(&first.id).await.unwrap().ok);
    assert!(service.verify(&second.id).await.unwrap().ok);
    let out = fx.dir.path().join("second");
    extract(
        &fx.layout.backups_dir.join(format!("{}.tar.gz", second.id)),
        &out,
        &["-xzf"],
    );
    assert_matches_live(&fx, &out, &second).await;

    // A pieces object that does not match its manifest (then nothing is
    // reused from it), or none at all: the next backup is whole all the same.
    let pieces = fx.layout.backups_dir.join(format!("{}.pieces", second.id));
    let mut bytes = std::fs::read(&pieces).unwrap();
    bytes[5] ^= 1;
    std::fs::write(&pieces, bytes).unwrap();
    let third = service.create(Trigger::Manual).await.unwrap();
    assert!(service.verify(&third.id).await.unwrap().ok);
    std::fs::remove_file(fx.layout.backups_dir.join(format!("{}.pieces", third.id))).unwrap();
    let fourth = service.create(Trigger::Manual).await.unwrap();
    assert!(service.verify(&fourth.id).await.unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_a_continuous_writer_is_consistent_and_never_blocks_it() {
    let fx = Fixture::new(2_000_000).await;
    let writer = Writer::start(&fx.layout.database).await;
    while writer.commits() < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let service = fx.service(&fx.config(""));
    let before = writer.commits();
    let m = service.create(Trigger::Scheduled).await.unwrap();
    let during = writer.commits() - before;
    let total = writer.stop().await.expect("writer saw no errors");
    assert!(total > before);
    assert!(during > 0, "the writer made progress while the backup ran");

    let out = fx.dir.path().join("x");
    extract(
        &fx.layout.backups_dir.join(format!("{}.tar.gz", m.id)),
        &out,
        &["-xzf"],
    );
    let (n, rows) = writer_state(&out.join("synthorg.db")).await;
    assert_eq!(n, rows, "counter and log agree in the snapshot");
    assert!(n >= 200);
    let mut conn = synthorg_tests::open(&out.join("synthorg.db")).await;
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn retention_runs_after_each_backup_and_spares_pre_migration() {
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config("retention: {max_count: 2, max_age_days: 30}"));
    let pinned = service.create(Trigger::PreMigration).await.unwrap();
    let mut made = Vec::new();
    for _ in 0..4 {
        made.push(service.create(Trigger::Scheduled).await.unwrap().id);
    }
    let ids: Vec<_> = service
        .list()
        .await
        .unwrap()
        .iter()
        .map(|l| l.id().clone())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.contains(&pinned.id));
    assert!(ids.contains(&made[3]) && ids.contains(&made[2]));
    // Same-second backups get distinct, ordered ids.
    assert!(made.windows(2).all(|w| w[0] < w[1]));
    // Pruned backups are gone from disk too.
    assert!(
        !fx.layout
            .backups_dir
            .join(format!("{}.tar.gz", made[0]))
            .exists()
    );
}

#[tokio::test]
async fn a_held_lock_makes_backup_busy_and_touches_nothing() {
    let fx = Fixture::new(200_000).await;
    let config = fx.config("");
    let service = fx.service(&config);
    let lock = adapters_fs_lock(&config.path);
    let guard = backup_core::ports::OperationLock::try_acquire(
        &lock,
        backup_core::ports::Operation::Restore,
    )
    .await
    .unwrap();
    let err = service.create(Trigger::Manual).await.unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err}");
    assert!(err.to_string().contains("restore"), "{err}");
    assert!(service.list().await.unwrap().is_empty());
    drop(guard);
    service.create(Trigger::Manual).await.unwrap();
}

fn adapters_fs_lock(path: &Path) -> adapters_fs::FileLock {
    adapters_fs::FileLock::in_dir(path)
}

#[tokio::test]
async fn a_failing_source_publishes_nothing_and_leaves_no_leftovers() {
    let fx = Fixture::new(200_000).await;
    std::fs::write(
        &fx.layout.database,
        b"this is not a database at all, just text",
    )
    .unwrap();
    let service = fx.service(&fx.config(""));
    let err = service.create(Trigger::Manual).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("not a SQLite database") && text.contains("synthorg.db"),
        "{text}"
    );
    assert!(service.list().await.unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(&fx.layout.backups_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    // Only the status record, which now holds the failure.
    assert_eq!(left, ["_status.json"], "leftovers: {left:?}");
    // No scratch copies left next to the data either.
    let scratch: Vec<_> = std::fs::read_dir(&fx.layout.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".synthorg-snapshot-"))
        .collect();
    assert!(scratch.is_empty(), "{scratch:?}");

    std::fs::remove_file(&fx.layout.database).unwrap();
    let err = service
        .create(Trigger::Manual)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_backup_publishes_nothing_and_recover_clears_its_leftovers() {
    let fx = Fixture::new(6_000_000).await;
    let service = fx.service(&fx.config(""));
    let mut cancelled = 0;
    for delay_ms in [5, 20, 60, 150] {
        let run = tokio::time::timeout(
            std::time::Duration::from_millis(delay_ms),
            service.create(Trigger::Manual),
        )
        .await;
        match run {
            Err(_elapsed) => {
                cancelled += 1;
                assert!(
                    service.list().await.unwrap().is_empty(),
                    "nothing published after {delay_ms} ms"
                );
            }
            // Finished before the deadline: fine, but clean up.
            Ok(done) => service.delete(&done.unwrap().id, false).await.unwrap(),
        }
        service.recover().await.unwrap();
        let left: Vec<_> = std::fs::read_dir(&fx.layout.backups_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect();
        assert!(left.is_empty(), "after {delay_ms} ms: {left:?}");
        let scratch: Vec<_> = std::fs::read_dir(&fx.layout.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(scratch.is_empty(), "after {delay_ms} ms: {scratch:?}");
    }
    assert!(cancelled > 0, "at least one backup was cancelled midway");
    // The lock was released by the cancelled runs.
    let m = service.create(Trigger::Manual).await.unwrap();
    assert!(service.verify(&m.id).await.unwrap().ok);
}

#[tokio::test]
async fn verify_and_restore_report_progress() {
    let fx = Fixture::new(300_000).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = std::sync::Arc::clone(&seen);
    let service = fx
        .service(&fx.config(""))
        .with_progress(Some(std::sync::Arc::new(
            move |p: &backup_core::Progress| {
                s.lock().unwrap().push(p.clone());
            },
        )));
    let m = service.create(Trigger::Manual).await.unwrap();
    assert!(service.verify(&m.id).await.unwrap().ok);
    {
        let seen = seen.lock().unwrap();
        let verify: Vec<_> = seen
            .iter()
            .filter(|p| p.phase == backup_core::service::Phase::Verify)
            .collect();
        assert!(verify.len() > 1);
        assert!(
            verify
                .windows(2)
                .all(|w| w[0].bytes_done <= w[1].bytes_done),
            "monotonic"
        );
        let last = verify.last().unwrap();
        assert_eq!(
            (last.bytes_done, last.files_done),
            (m.size_bytes, m.files.len() as u64)
        );
    }
    seen.lock().unwrap().clear();
    service
        .restore(
            &m.id,
            backup_core::RestoreOptions {
                confirm: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|p| p.phase == backup_core::service::Phase::Restore && p.files_done > 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_mode_memory_database_with_an_open_writer_restores_intact() {
    let fx = Fixture::new(1_000_000).await;
    let service = fx.service(&fx.config(""));
    let mem0 = fx.layout.memory_dir.join("mem0_history.db");
    // The app's state: the database open in WAL mode, recent commits only
    // in the -wal (no checkpoint), the -shm in use.
    let mut conn = synthorg_tests::open(&mem0).await;
    sqlx::query("PRAGMA wal_autocheckpoint = 0")
        .execute(&mut conn)
        .await
        .unwrap();
    for i in 0..300 {
        sqlx::query(
            "INSERT INTO memories (agent_id, text, vector_ref, created_at) VALUES ('a', ?, 'v', 0)",
        )
        .bind(format!("note {i} {}", "y".repeat(300)))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let wal = fx.layout.memory_dir.join("mem0_history.db-wal");
    assert!(
        std::fs::metadata(&wal).unwrap().len() > 0,
        "commits sit in the WAL"
    );
    let expected = dump(&mem0).await;
    let backup = service.create(Trigger::Manual).await.unwrap();
    for f in &backup.files {
        let p = f.path.as_str();
        assert!(
            !(p.ends_with("-wal") || p.ends_with("-shm") || p.ends_with("-journal")),
            "a snapshotted database's companion was stored: {p}"
        );
    }
    // The app goes on and then stops (a restore refuses while it runs).
    sqlx::query("DELETE FROM memories")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    service.verify(&backup.id).await.unwrap();
    let options = backup_core::RestoreOptions {
        confirm: true,
        ..Default::default()
    };
    service.restore(&backup.id, options).await.unwrap();
    assert_eq!(dump(&mem0).await, expected);
    let mut conn = synthorg_tests::open(&mem0).await;
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    sqlx::Connection::close(conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_backup_after_an_app_crash_takes_a_hot_journal_in_its_stride() {
    let fx = Fixture::new(500_000).await;
    let service = fx.service(&fx.config(""));
    let db = fx.layout.memory_dir.join("journal.db");
    let status = Command::new("sqlite3")
        .arg(&db)
        .arg("PRAGMA journal_mode=DELETE; CREATE TABLE t (x TEXT); INSERT INTO t SELECT hex(randomblob(500)) FROM generate_series(1, 2000);")
        .status();
    let Ok(status) = status else {
        eprintln!("SKIPPED: no sqlite3 binary");
        return;
    };
    assert!(status.success());
    // A writer killed inside a transaction leaves a hot -journal.
    let mut child = Command::new("sqlite3")
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(b"PRAGMA cache_size=1; BEGIN; UPDATE t SET x = x || 'changed';\n")
            .unwrap();
        stdin.flush().unwrap();
    }
    let journal = fx.layout.memory_dir.join("journal.db-journal");
    for _ in 0..500 {
        if std::fs::metadata(&journal).is_ok_and(|m| m.len() > 0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(journal.exists(), "the kill left a hot journal");
    let backup = service.create(Trigger::Manual).await.unwrap();
    assert!(backup.file("memory/journal.db").is_some());
    assert!(backup.file("memory/journal.db-journal").is_none());
    assert!(service.verify(&backup.id).await.unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_source_is_recorded_as_absent_and_its_live_data_is_left_alone_on_restore() {
    let fx = Fixture::new(500_000).await;
    let service = fx.service(&fx.config(""));
    let checkpoints = fx.layout.checkpoints_dir.clone();
    let aside = fx.dir.path().join("checkpoints-elsewhere");
    std::fs::rename(&checkpoints, &aside).unwrap();
    let backup = service.create(Trigger::Manual).await.unwrap();
    assert_eq!(backup.absent, vec![Component::Checkpoints]);
    assert!(!backup.components.contains(&Component::Checkpoints));
    let listed = service.list().await.unwrap();
    let Listed::Complete(summary) = &listed[0] else {
        panic!("{listed:?}");
    };
    assert_eq!(summary.absent, vec![Component::Checkpoints]);
    // The directory comes back (the app created it since); a restore of
    // the backup leaves it alone and says so.
    std::fs::rename(&aside, &checkpoints).unwrap();
    let before = files_under(&checkpoints);
    let options = backup_core::RestoreOptions {
        confirm: true,
        ..Default::default()
    };
    let report = service.restore(&backup.id, options).await.unwrap();
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("checkpoints") && w.contains("absent")),
        "{:?}",
        report.warnings
    );
    assert!(
        !report
            .components
            .iter()
            .any(|c| c.component == Component::Checkpoints)
    );
    assert_eq!(files_under(&checkpoints), before);
    // Asking for it explicitly is refused: the backup does not hold it.
    let only = backup_core::RestoreOptions {
        confirm: true,
        components: Some(vec![Component::Checkpoints]),
        ..Default::default()
    };
    let err = service.restore(&backup.id, only).await.unwrap_err();
    assert!(matches!(err, Error::Incompatible { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_truncated_archives_are_listed_damaged_and_never_counted_as_copies() {
    let fx = Fixture::new(300_000).await;
    let service = fx.service(&fx.config("retention: { max_count: 2 }"));
    let gone = service.create(Trigger::Manual).await.unwrap();
    let cut = service.create(Trigger::Manual).await.unwrap();
    let archive = |id: &backup_core::BackupId| fx.layout.backups_dir.join(format!("{id}.tar.gz"));
    std::fs::remove_file(archive(&gone.id)).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(archive(&cut.id))
        .unwrap();
    file.set_len(cut.stored_bytes() / 2).unwrap();
    drop(file);
    let listed = service.list().await.unwrap();
    for id in [&gone.id, &cut.id] {
        let entry = listed.iter().find(|l| l.id() == id).unwrap();
        assert!(matches!(entry, Listed::Damaged { .. }), "{entry:?}");
    }
    // Two new backups with max_count 2: the damaged ones never counted as
    // copies, so both good ones stay (and the damaged stay for the user).
    let a = service.create(Trigger::Manual).await.unwrap();
    let b = service.create(Trigger::Manual).await.unwrap();
    let listed = service.list().await.unwrap();
    let complete: Vec<_> = listed
        .iter()
        .filter(|l| matches!(l, Listed::Complete(_)))
        .map(|l| l.id().clone())
        .collect();
    assert_eq!(complete, vec![b.id, a.id]);
    assert_eq!(listed.len(), 4);
}

/// The `backup.quiesce` block for shell snippets.
fn quiesce_yaml(pause: &str, resume: &str) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    format!(
        "quiesce:\n  pause: [sh, -c, {}]\n  resume: [sh, -c, {}]",
        q(pause),
        q(resume)
    )
}

/// Waits until `path` holds `want` (the resume command runs detached).
fn wait_for_text(path: &Path, want: &str) -> String {
    for _ in 0..200 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(want) {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_commands_run_pause_then_the_memory_snapshot_then_resume() {
    let fx = Fixture::new(300_000).await;
    let log = fx.dir.path().join("quiesce.log");
    let state = fx.layout.memory_dir.join("writer-state.txt");
    std::fs::write(&state, "running").unwrap();
    let pause = format!(
        "echo pause >> {log}; printf paused > {state}",
        log = log.display(),
        state = state.display()
    );
    let resume = format!(
        "echo resume >> {log}; printf running > {state}",
        log = log.display(),
        state = state.display()
    );
    let service = fx.service(&fx.config(&quiesce_yaml(&pause, &resume)));
    let backup = service.create(Trigger::Manual).await.unwrap();
    // The snapshot saw the paused writer; resume ran afterwards.
    let into = fx.dir.path().join("x");
    extract(
        &fx.layout.backups_dir.join(format!("{}.tar.gz", backup.id)),
        &into,
        &["xzf"],
    );
    assert_eq!(
        std::fs::read_to_string(into.join("memory/writer-state.txt")).unwrap(),
        "paused"
    );
    assert_eq!(wait_for_text(&log, "resume"), "pause\nresume\n");
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "running");

    // A snapshot that fails while paused: the backup fails, resume runs.
    std::fs::remove_file(&log).unwrap();
    let broken = fx.layout.memory_dir.join("broken.db");
    let mut bytes = b"SQLite format 3\0".to_vec();
    bytes.extend(std::iter::repeat_n(0x5a, 4096));
    std::fs::write(&broken, bytes).unwrap();
    let err = service.create(Trigger::Manual).await.unwrap_err();
    assert!(err.to_string().contains("broken.db"), "{err}");
    assert_eq!(wait_for_text(&log, "resume"), "pause\nresume\n");
    std::fs::remove_file(&broken).unwrap();

    // A pause command that does not exist fails the backup, naming it.
    let config = fx.config("quiesce:\n  pause: [/nonexistent/pause-writer]\n  resume: [\"true\"]");
    let err = fx
        .service(&config)
        .create(Trigger::Manual)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/pause-writer"),
        "{err}"
    );
    // Half a quiesce block is a config error naming the key.
    let e = backup_core::BackupConfig::load(
        Some("backup:\n  quiesce:\n    pause: [\"true\"]\n    resume: []\n"),
        &fx.layout.root,
    )
    .unwrap_err();
    assert!(e.to_string().contains("backup.quiesce"), "{e}");
}
