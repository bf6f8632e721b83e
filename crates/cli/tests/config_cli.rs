//! The `synthorg config` commands, driven through the real binary.

use std::path::Path;
use std::process::{Command, Output};

fn synthorg(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_synthorg"))
        .args(args)
        .current_dir(dir)
        .env_remove("SYNTHORG_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run synthorg")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_config_file_exits_2_naming_the_key_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("synthorg.yaml");
    std::fs::write(&file, "backup:\n  schedule_hours: 500\n").unwrap();
    let out = synthorg(dir.path(), &["config", "check"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("backup.schedule_hours"), "{err}");
    assert!(err.contains("1 to 168"), "{err}");
    assert!(err.contains("synthorg.yaml"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn unknown_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("custom.yaml");
    std::fs::write(&file, "backup:\n  retention:\n    max_cnt: 3\n").unwrap();
    let out = synthorg(dir.path(), &["config", "check", "--config", "custom.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("backup.retention.max_cnt"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn env_override_is_applied_and_named_when_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_synthorg"))
        .args(["config", "show", "--json"])
        .current_dir(dir.path())
        .env_remove("SYNTHORG_CONFIG")
        .env("SYNTHORG_BACKUP__RETENTION__MAX_COUNT", "4")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backup"]["retention"]["max_count"], 4);
    // Relative defaults resolve against the working directory.
    let want = dir.path().join("data/backups");
    assert_eq!(v["backup"]["path"], want.to_str().unwrap());

    let out = Command::new(env!("CARGO_BIN_EXE_synthorg"))
        .args(["config", "check"])
        .current_dir(dir.path())
        .env_remove("SYNTHORG_CONFIG")
        .env("SYNTHORG_BACKUP__SCHEDULE_HOURS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("SYNTHORG_BACKUP__SCHEDULE_HOURS"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_explicit_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = synthorg(dir.path(), &["config", "check", "--config", "nope.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nope.yaml"));
}

#[test]
fn relative_paths_resolve_against_the_config_file_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::fs::write(
        dir.path().join("etc/synthorg.yaml"),
        "backup:\n  path: backups\n  sources: {database: db/synthorg.db}\n",
    )
    .unwrap();
    let out = synthorg(
        dir.path(),
        &["config", "show", "--json", "--config", "etc/synthorg.yaml"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let etc = dir.path().join("etc");
    assert_eq!(v["backup"]["path"], etc.join("backups").to_str().unwrap());
    assert_eq!(
        v["backup"]["sources"]["database"],
        etc.join("db/synthorg.db").to_str().unwrap()
    );
}

#[test]
fn a_backup_path_inside_the_memory_directory_exits_2_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("synthorg.yaml");
    std::fs::write(
        &file,
        "backup:\n  path: ./data/memory/backups\n  sources:\n    memory_dir: ./data/memory\n",
    )
    .unwrap();
    for args in [&["config", "check"][..], &["backup"][..]] {
        let out = synthorg(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("backup.path") && err.contains("backup.sources.memory_dir"),
            "{err}"
        );
    }
    assert!(!dir.path().join("data/memory/backups").exists());
}
