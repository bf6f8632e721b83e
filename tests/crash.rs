//! Crash safety: a helper process (`synthorg-crash-helper`) runs a backup,
//! a delete or a prune against a generated data directory, locally or on
//! S3, and is killed with SIGKILL after a random delay. After each kill,
//! `recover()` runs and then the invariants are checked: the live data is
//! exactly what it was, every listed backup is complete and verifies,
//! nothing else is left in the store (no temp files, no unlisted objects,
//! no multipart upload on the S3 server) and the interrupted backup is
//! either fully there or not at all.
//! (Restores killed at random: `crates/cli/tests/crash.rs`.)
//!
//! Iterations per operation: `SYNTHORG_CRASH_ITERATIONS`, else 50 when
//! `SYNTHORG_LONG_TESTS=1`, else 10.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backup_core::ports::Listed;
use backup_core::{BackupId, BackupService, Trigger};
use synthorg_cli::demo::Rng;
use synthorg_tests::s3_server::{ACCESS, SECRET, Server};
use synthorg_tests::{Fixture, LiveState, capture, config_yaml};

fn iterations() -> u64 {
    let long = std::env::var("SYNTHORG_LONG_TESTS").is_ok_and(|v| v == "1");
    std::env::var("SYNTHORG_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if long { 50 } else { 10 })
}

/// The fixture, the helper's config file and a service for checking.
struct Scene {
    fx: Fixture,
    config_file: PathBuf,
    service: BackupService,
    before: LiveState,
    rng: Rng,
}

impl Scene {
    /// `helper_extra` goes into the helper's config, `extra` into both.
    async fn new(extra: &str, helper_extra: &str, seed: u64) -> Scene {
        let fx = Fixture::new(3_000_000).await;
        let config_file = fx.dir.path().join("helper.yaml");
        std::fs::write(
            &config_file,
            config_yaml(&format!("{extra}\n{helper_extra}")),
        )
        .unwrap();
        let service = fx.service(&fx.config(extra));
        let before = capture(&fx.layout).await;
        Scene {
            fx,
            config_file,
            service,
            before,
            rng: Rng::new(seed),
        }
    }

    fn helper(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_synthorg-crash-helper"));
        cmd.arg(&self.config_file)
            .arg(&self.fx.layout.root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// How long the operation takes when not interrupted.
    fn time(&self, args: &[&str]) -> Duration {
        let started = Instant::now();
        let status = self.helper(args).status().unwrap();
        assert!(status.success(), "{args:?} failed uninterrupted");
        started.elapsed()
    }

    /// Runs the operation and kills it after a random delay within
    /// 110 % of `full`.
    fn run_and_kill(&mut self, args: &[&str], full: Duration) -> Duration {
        let delay = Duration::from_micros(self.rng.below(full.as_micros() as u64 * 11 / 10 + 1));
        let mut child = self.helper(args).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        delay
    }

    /// Starts a backup and SIGKILLs it as soon as a multipart part sits
    /// on the S3 server.
    fn kill_backup_mid_upload(&self, server: &Server) {
        let mut child = self.helper(&["backup"]).spawn().unwrap();
        let started = Instant::now();
        while !std::fs::read_dir(&server.root).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".upload_id-")
        }) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no part was uploaded"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The listed ids, newest first.
    async fn ids(&self) -> Vec<BackupId> {
        let listed = self.service.list().await.unwrap();
        listed.iter().map(|l| l.id().clone()).collect()
    }

    /// Runs the operation, kills it, recovers and checks the invariants,
    /// also that the local store holds nothing but the listed backups.
    async fn kill_and_check(
        &mut self,
        args: &[&str],
        full: Duration,
        i: u64,
    ) -> (String, Vec<BackupId>) {
        let delay = self.run_and_kill(args, full);
        let what = format!("iteration {i} (kill after {delay:?})");
        let ids = self.check(&what).await;
        assert_eq!(
            strays(&self.fx.layout.backups_dir, &ids),
            Vec::<String>::new(),
            "{what}"
        );
        (what, ids)
    }

    /// recover(), then the invariants; returns the listed ids.
    async fn check(&self, what: &str) -> Vec<BackupId> {
        self.service
            .recover()
            .await
            .unwrap_or_else(|e| panic!("{what}: recover failed: {e}"));
        assert_eq!(
            capture(&self.fx.layout).await,
            self.before,
            "{what}: live data changed"
        );
        let mut ids = Vec::new();
        for listed in self.service.list().await.unwrap() {
            let Listed::Complete(summary) = listed else {
                panic!("{what}: damaged backup listed: {listed:?}");
            };
            let report = self.service.verify(&summary.id).await.unwrap();
            assert!(report.ok, "{what}: {} does not verify", summary.id);
            ids.push(summary.id.clone());
        }
        ids
    }
}

/// Names in the local backup directory that belong to no listed backup.
fn strays(dir: &Path, ids: &[BackupId]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != ".lock" && name != "_status.json")
        .filter(|name| {
            !ids.iter().any(|id| {
                let id = id.to_string();
                name == &id || name.strip_prefix(&id).is_some_and(|r| r.starts_with('.'))
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_killed_at_any_moment_leaves_no_partial_backup() {
    let mut scene = Scene::new("retention: { max_count: 4 }", "", 1).await;
    let full = scene.time(&["backup"]);
    let (mut published, mut vanished) = (0, 0);
    for i in 0..iterations() {
        let before = scene.ids().await;
        let (what, ids) = scene.kill_and_check(&["backup"], full, i).await;
        assert!(
            ids.len() <= 4,
            "{what}: retention ran or did not: {}",
            ids.len()
        );
        if ids.iter().any(|id| !before.contains(id)) {
            published += 1;
        } else {
            vanished += 1;
        }
    }
    eprintln!(
        "backup kills: {published} finished first, {vanished} left nothing (full run {full:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_killed_at_any_moment_leaves_the_backup_whole_or_gone() {
    let mut scene = Scene::new("compression: none", "", 2).await;
    let victim = scene.service.create(Trigger::Manual).await.unwrap().id;
    let full = scene.time(&["delete", &victim.to_string()]);
    let (mut whole, mut gone) = (0, 0);
    for i in 0..iterations() {
        // Directory form: a delete removes many files, one at a time.
        let victim = scene.service.create(Trigger::Manual).await.unwrap().id;
        let (_, ids) = scene
            .kill_and_check(&["delete", &victim.to_string()], full, i)
            .await;
        if ids.contains(&victim) {
            whole += 1;
            scene.service.delete(&victim, false).await.unwrap();
        } else {
            gone += 1;
        }
    }
    eprintln!("delete kills: {whole} left the backup whole, {gone} removed it (full run {full:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_killed_at_any_moment_removes_whole_backups_only() {
    // The checking service keeps everything; the helper keeps 2.
    let mut scene = Scene::new(
        "compression: none\nretention: { max_count: 100 }",
        "retention: { max_count: 2 }",
        3,
    )
    .await;
    for _ in 0..5 {
        scene.service.create(Trigger::Manual).await.unwrap();
    }
    let full = scene.time(&["prune"]);
    let mut removed = 0;
    for i in 0..iterations() {
        while scene.service.list().await.unwrap().len() < 5 {
            scene.service.create(Trigger::Manual).await.unwrap();
        }
        let newest = scene.service.list().await.unwrap()[0].id().clone();
        let (what, ids) = scene.kill_and_check(&["prune"], full, i).await;
        assert!(
            ids.contains(&newest),
            "{what}: the newest backup was pruned"
        );
        assert!((2..=5).contains(&ids.len()), "{what}: {} left", ids.len());
        removed += 5 - ids.len();
    }
    eprintln!("prune kills: {removed} backups removed in all (full run {full:?})");
}

/// Files of the S3 server that belong to multipart uploads.
///
/// One case is left out, the window the README documents: a kill in the one
/// round trip between CreateMultipartUpload and the PUT of its marker
/// leaves an upload that no marker records and that holds no part (s3s-fs:
/// `.upload-<id>.json` without `.upload_id-<id>.part-*`); object_store
/// cannot list uploads, so only a bucket lifecycle rule removes it. Every
/// upload that holds data was recorded first and must be gone.
fn multipart_leftovers(server: &Server) -> Vec<String> {
    let names: Vec<String> = std::fs::read_dir(&server.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let unrecorded_and_empty = |n: &str| {
        n.strip_prefix(".upload-")
            .and_then(|r| r.strip_suffix(".json"))
            .is_some_and(|id| {
                !names
                    .iter()
                    .any(|p| p.starts_with(&format!(".upload_id-{id}.part-")))
            })
    };
    let mut out: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with(".upload") && !unrecorded_and_empty(n))
        .cloned()
        .collect();
    out.extend(
        server
            .bucket_files("crash")
            .into_iter()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| p.contains("_uploads")),
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backup_killed_mid_upload_leaves_no_listed_backup_and_no_multipart_upload() {
    let server = Server::start(&["crash"]).await;
    let s3 = format!(
        "retention: {{ max_count: 2 }}\ns3:\n  bucket: crash\n  prefix: site/\n  endpoint: http://{}\n  access_key_id: {ACCESS}\n  secret_access_key: {SECRET}\n  part_size_mib: 5",
        server.addr
    );
    let mut scene = Scene::new(&s3, "", 4).await;
    // 12 MiB that gzip cannot shrink: the archive is a 3-part upload.
    scene.fx.add_incompressible_memory(12, 5);
    scene.before = capture(&scene.fx.layout).await;
    let full = scene.time(&["backup"]);

    // Once deterministically while parts are on the server, then at random.
    scene.kill_backup_mid_upload(&server);
    assert!(
        !multipart_leftovers(&server).is_empty(),
        "the kill left parts behind"
    );
    let listed = scene.check("kill mid-upload").await;
    assert_eq!(listed.len(), 1, "only the timing run's backup");
    assert_eq!(multipart_leftovers(&server), Vec::<String>::new());

    let mut interrupted = 0;
    for i in 0..iterations() {
        let delay = scene.run_and_kill(&["backup"], full);
        let what = format!("iteration {i} (kill after {delay:?})");
        interrupted += usize::from(!multipart_leftovers(&server).is_empty());
        scene.check(&what).await;
        assert_eq!(multipart_leftovers(&server), Vec::<String>::new(), "{what}");
    }
    eprintln!(
        "S3 backup kills: {interrupted} of {} left a multipart upload, all aborted (full run {full:?})",
        iterations()
    );
}

/// The live state held by a backup: exported, then captured like live data.
async fn backup_state(service: &BackupService, id: &BackupId, layout_of: &Path) -> LiveState {
    let dest = layout_of.join(format!("export-{id}"));
    let mut sink = adapters_fs::ExportDir::create(&dest).unwrap();
    let (manifest, _) = service.export(id, &mut sink).await.unwrap();
    sink.finish(&manifest).await.unwrap();
    let config = std::fs::read_dir(dest.join("config"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let layout = synthorg_cli::demo::DemoLayout {
        root: dest.clone(),
        database: dest.join("synthorg.db"),
        memory_dir: dest.join("memory"),
        company_config: config,
        checkpoints_dir: dest.join("checkpoints"),
        config_file: dest.join("none.yaml"),
        backups_dir: dest.join("none"),
    };
    let state = capture(&layout).await;
    std::fs::remove_dir_all(&dest).unwrap();
    state
}

/// The `pre-restore` backups `service` lists.
async fn pre_restore_ids(service: &backup_core::BackupService) -> Vec<BackupId> {
    service
        .list()
        .await
        .unwrap()
        .iter()
        .map(|l| l.id().clone())
        .filter(|id| id.trigger() == Trigger::PreRestore)
        .collect()
}

/// What runs after the killed restore, instead of `recover`.
#[derive(Debug, Clone, Copy)]
enum Next {
    /// A plain `backup`, as cron or the next scheduled run does.
    Backup,
    /// The host starting: `BackupRuntime::start` (recover, startup backup).
    RuntimeStart,
}

/// For every rename N of the swap: a restore aborted right after rename N,
/// then `next` (not `recover`): the live data and the new backup are both
/// exactly the old state or exactly the restored one.
async fn restore_killed_after_every_rename(next: Next) {
    let scene = Scene::new("retention: { max_count: 200 }", "", 6).await;
    let state_a = scene.before.clone();
    let backup_a = scene.service.create(Trigger::Manual).await.unwrap().id;
    std::fs::write(&scene.fx.layout.company_config, b"company:\n  name: B\n").unwrap();
    std::fs::remove_dir_all(scene.fx.layout.checkpoints_dir.join("task-0000")).unwrap();
    std::fs::write(scene.fx.layout.memory_dir.join("b.txt"), b"state b").unwrap();
    let state_b = capture(&scene.fx.layout).await;
    let backup_b = scene.service.create(Trigger::Manual).await.unwrap().id;
    assert_ne!(state_a, state_b);
    let scratch = scene.fx.dir.path().to_path_buf();
    let (mut old, mut new) = (0, 0);
    // Every step of the restore from the safety backup's links to its
    // publication: the links made, each rename, the swap committed.
    let mut steps: Vec<String> = vec!["preserve".into(), "commit".into()];
    let mut n = 0;
    loop {
        assert!(n < 40, "the swap never completed");
        let step = match steps.pop() {
            Some(s) => s,
            None => {
                n += 1;
                (n - 1).to_string()
            }
        };
        let safety_before = pre_restore_ids(&scene.service).await;
        let status = scene
            .helper(&["restore", &backup_a.to_string()])
            .env("SYNTHORG_CRASH_ABORT_AFTER_RENAME", &step)
            .status()
            .unwrap();
        let what = format!("{next:?} after an abort at step {step}");
        // The safety backup is complete (it verifies) or absent.
        for listed in scene.service.list().await.unwrap() {
            let backup_core::ports::Listed::Complete(s) = listed else {
                panic!("{what}: a damaged backup: {listed:?}");
            };
            let report = scene.service.verify(&s.id).await.unwrap();
            assert!(report.ok, "{what}: {} does not verify: {report:?}", s.id);
        }
        let id = match next {
            Next::Backup => scene.service.create(Trigger::Manual).await.unwrap().id,
            Next::RuntimeStart => {
                let state = synthorg_api::AdminState::new(scene.service.clone(), None, true);
                let config = synthorg_api::RuntimeConfig {
                    enabled: true,
                    on_startup: true,
                    on_shutdown: false,
                    schedule: Duration::from_secs(3600),
                    shutdown_timeout: Duration::from_secs(60),
                    verify_every: None,
                    overdue_check: Duration::from_secs(300),
                };
                let runtime = synthorg_api::BackupRuntime::start(
                    state.clone(),
                    config,
                    std::sync::Arc::new(adapters_fs::SystemClock),
                )
                .await;
                runtime.shutdown().await;
                let listed = scene.service.list().await.unwrap();
                let startup = listed.iter().find(|l| l.id().trigger() == Trigger::Startup);
                startup
                    .unwrap_or_else(|| panic!("{what}: no startup backup"))
                    .id()
                    .clone()
            }
        };
        let live = capture(&scene.fx.layout).await;
        // A restore whose swap committed left its safety backup, published
        // by the restore or, when it died first, by recovery; one rolled
        // back left none.
        let safety: Vec<BackupId> = pre_restore_ids(&scene.service)
            .await
            .into_iter()
            .filter(|s| !safety_before.contains(s))
            .collect();
        if live == state_a {
            let [s] = &safety[..] else {
                panic!("{what}: the restored state, safety backups {safety:?}");
            };
            assert_eq!(
                backup_state(&scene.service, s, &scratch).await,
                state_b,
                "{what}: the safety backup holds the replaced state"
            );
        } else {
            assert_eq!(safety, Vec::<BackupId>::new(), "{what}: rolled back");
        }
        let stored = backup_state(&scene.service, &id, &scratch).await;
        assert_eq!(
            stored, live,
            "{what}: the backup differs from the live data"
        );
        if live == state_a {
            new += 1;
        } else {
            assert_eq!(
                live, state_b,
                "{what}: neither the old nor the restored state"
            );
            old += 1;
        }
        assert_eq!(
            strays(&scene.fx.layout.backups_dir, &scene.ids().await),
            Vec::<String>::new(),
            "{what}"
        );
        let hidden = synthorg_tests::hidden_entries(&scene.fx.layout.root);
        assert_eq!(hidden, Vec::<String>::new(), "{what}: leftovers");
        scene.service.delete(&id, true).await.unwrap();
        if status.success() {
            assert!(steps.is_empty());
            break; // N is past the last rename: the restore completed
        }
        if live == state_a {
            let options = backup_core::RestoreOptions {
                confirm: true,
                ..Default::default()
            };
            scene.service.restore(&backup_b, options).await.unwrap();
        }
    }
    assert!(n >= 4, "the swap has at least 4 renames, saw {n}");
    assert!(old > 0 && new > 0, "old {old}, new {new}");
    eprintln!("{next:?}: {n} renames; {old} left the old state, {new} the restored one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_killed_inside_the_swap_then_a_plain_backup_backs_up_old_or_new_state() {
    restore_killed_after_every_rename(Next::Backup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_killed_inside_the_swap_then_the_runtime_starts_on_old_or_new_state() {
    restore_killed_after_every_rename(Next::RuntimeStart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backups_are_cleaned_up_by_the_next_plain_backup() {
    let mut scene = Scene::new("retention: { max_count: 100 }", "", 7).await;
    scene.fx.add_incompressible_memory(24, 8);
    scene.before = capture(&scene.fx.layout).await;
    let full = scene.time(&["backup"]);
    let mut left = 0;
    for i in 0..3u64 {
        // Kill in the middle of the archive write, where temp files exist.
        let mut child = scene.helper(&["backup"]).spawn().unwrap();
        std::thread::sleep(full * (3 + i as u32) / 10);
        let _ = child.kill();
        let _ = child.wait();
        left += strays(&scene.fx.layout.backups_dir, &scene.ids().await).len();
    }
    assert!(
        left > 0,
        "no kill left a temp file behind; the test proves nothing"
    );
    scene.service.create(Trigger::Manual).await.unwrap();
    assert_eq!(
        strays(&scene.fx.layout.backups_dir, &scene.ids().await),
        Vec::<String>::new()
    );
    assert!(!scene.service.take_recovered().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backup_killed_mid_upload_is_cleaned_up_by_the_next_plain_backup() {
    let server = Server::start(&["crash"]).await;
    let s3 = format!(
        "s3:\n  bucket: crash\n  prefix: next/\n  endpoint: http://{}\n  access_key_id: {ACCESS}\n  secret_access_key: {SECRET}\n  part_size_mib: 5",
        server.addr
    );
    let scene = Scene::new(&s3, "", 9).await;
    scene.fx.add_incompressible_memory(12, 5);
    scene.kill_backup_mid_upload(&server);
    assert!(!multipart_leftovers(&server).is_empty());
    scene.service.create(Trigger::Manual).await.unwrap();
    assert_eq!(multipart_leftovers(&server), Vec::<String>::new());
    assert_eq!(scene.ids().await.len(), 1);
}

/// A writeback error (`syncfs` failing with EIO, injected by `strace` into
/// the helper process): the staged files may not be on disk, so the
/// restore stops before the swap. The live data is as it was, no journal,
/// no safety backup and nothing staged is left; without the fault the same
/// restore goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writeback_error_before_the_swap_refuses_the_restore() {
    let scene = Scene::new("", "", 9).await;
    let backup = scene.service.create(Trigger::Manual).await.unwrap().id;
    std::fs::write(&scene.fx.layout.company_config, b"company:\n  name: C\n").unwrap();
    std::fs::write(scene.fx.layout.memory_dir.join("c.txt"), b"state c").unwrap();
    let changed = capture(&scene.fx.layout).await;
    let helper = scene.helper(&["restore", &backup.to_string()]);
    let out = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=syncfs"])
        .args(["-e", "inject=syncfs:error=EIO"])
        .arg(helper.get_program())
        .args(helper.get_args())
        .stdin(Stdio::null())
        .output()
        .expect("strace (scripts/test.sh installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the restore went through: {stderr}");
    assert!(stderr.contains("Input/output error"), "{stderr}");
    assert_eq!(capture(&scene.fx.layout).await, changed);
    assert!(
        !scene
            .fx
            .layout
            .root
            .join(".synthorg-restore.journal")
            .exists()
    );
    assert!(pre_restore_ids(&scene.service).await.is_empty());
    let staged: Vec<String> = std::fs::read_dir(&scene.fx.layout.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("restore"))
        .collect();
    assert!(staged.is_empty(), "left behind: {staged:?}");
    assert!(
        scene
            .helper(&["restore", &backup.to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(capture(&scene.fx.layout).await, scene.before);
}
