//! Every `synthorg backup` command through the real binary: JSON output
//! shapes, exit codes, refusals.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Demo, stderr, stdout};
use synthorg_cli::state::LiveState;

#[tokio::test]
async fn create_list_show_verify_delete_with_json_and_exit_codes() {
    let demo = Demo::new(400_000).await;
    let created = demo.json(&["backup"]);
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.contains("_manual"), "{id}");
    assert_eq!(created["trigger"], "manual");
    assert!(created["checksum"].as_str().unwrap().starts_with("sha256:"));
    assert!(created["files"].as_array().unwrap().len() > 10);

    // -q: the id alone on stdout, nothing on stderr.
    let quiet = demo.run(&["-q", "backup"]);
    assert!(
        quiet.status.success() && quiet.stderr.is_empty(),
        "{}",
        stderr(&quiet)
    );
    let quiet_id = stdout(&quiet).trim().to_owned();
    assert!(quiet_id.contains("_manual"), "{quiet_id}");
    assert!(
        demo.run(&["-q", "backup", "delete", &quiet_id])
            .status
            .success()
    );
    // Plain output is the id alone on stdout.
    let out = demo.run(&[
        "backup",
        "create",
        "--trigger",
        "pre-migration",
        "--label",
        "migration=3->4",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pinned = stdout(&out).trim().to_owned();
    assert!(pinned.contains("_pre-migration"), "{pinned}");

    let list = demo.json(&["backup", "list"]);
    let items = list.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], pinned.as_str(), "newest first");
    for item in items {
        for key in [
            "id",
            "status",
            "trigger",
            "timestamp",
            "size_bytes",
            "stored_bytes",
            "components",
            "pinned",
        ] {
            assert!(item.get(key).is_some(), "missing {key} in {item}");
        }
        assert_eq!(item["status"], "complete");
    }
    assert_eq!(
        demo.json(&["backup", "list", "--limit", "1"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let table = stdout(&demo.run(&["backup", "list"]));
    assert!(
        table.contains("ID") && table.contains(&id) && table.contains("complete (pinned)"),
        "{table}"
    );

    let shown = demo.json(&["backup", "show", &pinned]);
    assert_eq!(shown["labels"]["migration"], "3->4");

    let verified = demo.json(&["backup", "verify", &id]);
    assert_eq!(verified["ok"], true);

    // Pinned backups need --force.
    let out = demo.run(&["backup", "delete", &pinned]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("pinned"), "{}", stderr(&out));
    let out = demo.run(&["backup", "delete", &pinned, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = demo.run(&["backup", "delete", &pinned]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "deleting a missing backup fails"
    );
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    let prune = demo.json(&["backup", "prune", "--dry-run"]);
    assert_eq!(prune["dry_run"], true);
    assert_eq!(prune["decisions"][0]["action"], "keep");
}

#[tokio::test]
async fn verify_exits_3_on_a_damaged_backup() {
    let demo = Demo::new(300_000).await;
    let id = demo.json(&["backup"])["id"].as_str().unwrap().to_owned();
    let archive = demo.backups_dir().join(format!("{id}.tar.gz"));
    let mut bytes = std::fs::read(&archive).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&archive, bytes).unwrap();
    let out = demo.run(&["backup", "verify", &id]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stdout(&out).contains("DAMAGED"));
}

#[tokio::test]
async fn invalid_ids_exit_2_with_a_clear_error() {
    let demo = Demo::new(200_000).await;
    let long = "9".repeat(10_000);
    for bad in [
        "../../etc/passwd",
        "2026-03-15T14-30-00_m\u{0430}nual",
        long.as_str(),
        "2026-03-15T14-30-00",
        "",
    ] {
        for cmd in [
            &["backup", "show", bad][..],
            &["backup", "verify", bad],
            &["backup", "restore", bad, "--yes"],
        ] {
            let out = demo.run(cmd);
            assert_eq!(out.status.code(), Some(2), "{cmd:?}: {}", stderr(&out));
            let err = stderr(&out);
            assert!(err.starts_with("error: invalid backup id"), "{err}");
            assert!(err.len() < 400, "bounded message: {err}");
            let reason = err.trim_start_matches("error: invalid backup id: ");
            let head: String = reason.chars().take(30).collect();
            assert_eq!(err.matches(head.as_str()).count(), 1, "said once: {err}");
        }
    }
}

#[tokio::test]
async fn restore_needs_yes_without_a_terminal_and_then_restores() {
    let demo = Demo::new(500_000).await;
    let original = LiveState::capture(&demo.layout).await.unwrap();
    let id = demo.json(&["backup"])["id"].as_str().unwrap().to_owned();
    std::fs::write(&demo.layout.company_config, b"company:\n  name: Changed\n").unwrap();
    let changed = LiveState::capture(&demo.layout).await.unwrap();

    let out = demo.run(&["backup", "restore", &id]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert_eq!(LiveState::capture(&demo.layout).await.unwrap(), changed);

    let dry = demo.json(&["backup", "restore", &id, "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["components"].as_array().unwrap().len(), 4);
    assert_eq!(LiveState::capture(&demo.layout).await.unwrap(), changed);

    let done = demo.json(&["restore", &id, "--yes", "--only", "config"]);
    assert_eq!(done["restart_required"], true);
    assert!(
        done["safety_backup_id"]
            .as_str()
            .unwrap()
            .contains("_pre-restore")
    );
    assert_eq!(LiveState::capture(&demo.layout).await.unwrap(), original);
}

#[tokio::test]
async fn export_verifies_and_extracts_without_touching_live_data() {
    let demo = Demo::new(300_000).await;
    let id = demo.json(&["backup"])["id"].as_str().unwrap().to_owned();
    let dest = demo.dir.path().join("export");
    let out = demo.json(&["backup", "export", &id, dest.to_str().unwrap()]);
    assert_eq!(out["id"], id.as_str());
    assert_eq!(
        std::fs::read(dest.join("config/company.yaml")).unwrap(),
        std::fs::read(&demo.layout.company_config).unwrap()
    );
    assert!(dest.join("synthorg.db").is_file() && dest.join("manifest.json").is_file());
    // A non-empty destination is refused.
    let out = demo.run(&["backup", "export", &id, dest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
}

#[tokio::test]
async fn a_held_lock_makes_commands_exit_4() {
    let demo = Demo::new(200_000).await;
    let id = demo.json(&["backup"])["id"].as_str().unwrap().to_owned();
    let lock = adapters_fs::FileLock::in_dir(demo.backups_dir());
    let _held = backup_core::ports::OperationLock::try_acquire(
        &lock,
        backup_core::ports::Operation::Restore,
    )
    .await
    .unwrap();
    for cmd in [
        &["backup"][..],
        &["backup", "delete", &id],
        &["restore", &id, "--yes"],
    ] {
        let out = demo.run(cmd);
        assert_eq!(out.status.code(), Some(4), "{cmd:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("busy"), "{}", stderr(&out));
    }
}

#[test]
fn completions_are_printed() {
    let out = std::process::Command::new(common::bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(stdout(&out).contains("synthorg"));
}

#[test]
fn demo_runs_backup_list_verify_change_restore_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["demo", "--dir"])
        .arg(dir.path().join("demo"))
        .args(["--size", "2MB"])
        .current_dir(dir.path())
        .env_remove("SYNTHORG_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for step in [
        "== 1.", "== 2.", "== 3.", "== 4.", "== 5.", "== 6.", "== 7.",
    ] {
        assert!(text.contains(step), "{step} missing: {text}");
    }
    assert!(text.contains("restored data equals the backup"), "{text}");
    // A second run into the same directory is refused, nothing overwritten.
    let again = std::process::Command::new(common::bin())
        .args(["demo", "--dir"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
}

#[tokio::test]
async fn a_plain_backup_recovers_leftovers_first_and_says_so_in_its_json() {
    let demo = Demo::new(300_000).await;
    let first = demo.json(&["backup"]);
    let id = first["id"].as_str().unwrap();
    // What a killed backup leaves: a temp archive; a killed restore: staging.
    let temp = demo
        .backups_dir()
        .join(format!(".{id}-x.tar.gz.tmp-999999-1"));
    std::fs::write(&temp, b"partial").unwrap();
    let staged = demo.layout.root.join(".memory.restore-staged");
    std::fs::create_dir_all(&staged).unwrap();
    let out = demo.json(&["backup"]);
    let recovered = out["recovered"].as_array().expect("recovered in --json");
    assert!(recovered.len() >= 2, "{out}");
    assert!(!temp.exists() && !staged.exists());
    // Nothing to recover: no key at all.
    let again = demo.json(&["backup"]);
    assert!(again.get("recovered").is_none(), "{again}");
    // Labels that could drive a terminal are refused with exit 2.
    let out = demo.run(&["backup", "--label", "note=\u{1b}[2Jgone"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("label"), "{}", stderr(&out));
}

#[tokio::test]
async fn status_is_ok_after_a_backup_and_failing_after_a_failed_one() {
    let demo = Demo::new(300_000).await;
    let out = demo.run(&["backup", "status", "--json"]);
    assert_eq!(out.status.code(), Some(3), "no backup yet: overdue");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "overdue");
    let id = demo.json(&["backup"])["id"].as_str().unwrap().to_owned();
    let report = demo.json(&["backup", "status"]);
    assert_eq!(report["status"], "ok");
    assert_eq!(report["last_success"]["id"], id.as_str());
    // A broken database: the backup fails, the status says so.
    let db = &demo.layout.database;
    let saved = demo.dir.path().join("saved.db");
    std::fs::rename(db, &saved).unwrap();
    std::fs::write(db, b"garbage").unwrap();
    assert!(!demo.run(&["backup"]).status.success());
    let out = demo.run(&["backup", "status"]);
    assert_eq!(out.status.code(), Some(3));
    let text = stdout(&out);
    assert!(
        text.contains("failing") && text.contains("SQLite"),
        "{text}"
    );
    std::fs::rename(&saved, db).unwrap();
}
