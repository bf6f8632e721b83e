//! `synthorg key generate`, encryption settings from the environment, and
//! key problems told by `backup status` and `list` rather than on the day
//! of a restore.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Demo, stderr, stdout};

/// Appends an `encryption:` block to the demo's config file.
fn encrypt(demo: &Demo, recipients: &[&str], identity: Option<&std::path::Path>) {
    let mut yaml = std::fs::read_to_string(demo.config()).unwrap();
    yaml.push_str(&format!(
        "  encryption:\n    recipients: [{}]\n",
        recipients.join(", ")
    ));
    if let Some(file) = identity {
        yaml.push_str(&format!("    identity_file: {}\n", file.display()));
    }
    std::fs::write(demo.config(), yaml).unwrap();
}

fn generate(demo: &Demo, name: &str) -> (std::path::PathBuf, String) {
    let path = demo.dir.path().join(name);
    let out = demo.run(&["key", "generate", "--out", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    (path, stdout(&out).trim().to_owned())
}

#[tokio::test]
async fn key_generate_writes_a_private_identity_once_and_prints_its_recipient() {
    let demo = Demo::new(500_000).await;
    let (path, recipient) = generate(&demo, "key.txt");
    assert!(recipient.starts_with("age1"), "{recipient}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("# public key: {recipient}")));
    // The age CLI agrees on the recipient.
    let age = std::process::Command::new("age-keygen")
        .arg("-y")
        .arg(&path)
        .output()
        .expect("age-keygen is installed (.ci/test installs it)");
    assert_eq!(String::from_utf8_lossy(&age.stdout).trim(), recipient);

    let again = demo.run(&["key", "generate", "--out", path.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "never replaced"
    );

    let printed = demo.run(&["key", "generate"]);
    assert!(printed.status.success());
    assert!(stdout(&printed).contains("AGE-SECRET-KEY-1"));
    assert!(stderr(&printed).contains("recipient: age1"));
}

#[tokio::test]
async fn an_encrypting_host_lists_recipients_and_status_tells_of_a_key_that_cannot_decrypt() {
    let demo = Demo::new(500_000).await;
    let (key, recipient) = generate(&demo, "key.txt");
    let (_, other) = generate(&demo, "other.txt");
    encrypt(&demo, &[&recipient], Some(&key));
    let created = demo.json(&["backup", "create"]);
    let id = created["id"].as_str().unwrap().to_owned();
    let list = demo.json(&["backup", "list"]);
    assert_eq!(list[0]["encrypted"], true);
    assert_eq!(list[0]["recipients"][0], recipient.as_str());
    let table = stdout(&demo.run(&["backup", "list"]));
    assert!(table.contains("encrypted to age1"), "{table}");
    let status = demo.run(&["backup", "status"]);
    assert!(status.status.success(), "{}", stderr(&status));

    // New recipients the identity cannot decrypt: said now, exit 3.
    let yaml = std::fs::read_to_string(demo.config())
        .unwrap()
        .replace(&recipient, &other);
    std::fs::write(demo.config(), yaml).unwrap();
    let status = demo.run(&["backup", "status"]);
    assert_eq!(status.status.code(), Some(3), "{}", stdout(&status));
    assert!(
        stdout(&status).contains("none of the configured recipients"),
        "{}",
        stdout(&status)
    );
    let json = demo.run(&["backup", "status", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(report["warnings"].as_array().is_some_and(|w| !w.is_empty()));

    // Without the identity: refused with exit 3 naming what is missing.
    let yaml = std::fs::read_to_string(demo.config()).unwrap();
    let without: String = yaml
        .lines()
        .filter(|l| !l.contains("identity_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(demo.config(), without).unwrap();
    let verify = demo.run(&["backup", "verify", &id]);
    assert_eq!(verify.status.code(), Some(3));
    assert!(
        stderr(&verify).contains("backup.encryption.identity_file"),
        "{}",
        stderr(&verify)
    );
}

#[tokio::test]
async fn encryption_settings_come_from_the_environment_too_and_bad_ones_exit_2() {
    let demo = Demo::new(500_000).await;
    let (key, recipient) = generate(&demo, "key.txt");
    let out = demo
        .command(&["config", "show", "--json"])
        .env(
            "SYNTHORG_BACKUP__ENCRYPTION__RECIPIENTS",
            format!("[{recipient}]"),
        )
        .env("SYNTHORG_BACKUP__ENCRYPTION__IDENTITY_FILE", &key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        shown["backup"]["encryption"]["recipients"][0],
        recipient.as_str()
    );
    assert!(
        !stdout(&out).contains("AGE-SECRET-KEY"),
        "never the key itself"
    );

    let bad = demo
        .command(&["config", "check"])
        .env("SYNTHORG_BACKUP__ENCRYPTION__RECIPIENTS", "[age1bogus]")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("backup.encryption.recipients[0]"),
        "{}",
        stderr(&bad)
    );
}

#[tokio::test]
async fn serve_warns_at_start_when_the_identity_cannot_decrypt_new_backups() {
    use std::io::{BufRead, BufReader};
    let demo = Demo::new(500_000).await;
    let (key, _) = generate(&demo, "key.txt");
    let (_, other) = generate(&demo, "other.txt");
    encrypt(&demo, &[&other], Some(&key));
    let mut child = demo
        .command(&["serve", "--listen", "127.0.0.1:0"])
        .env("SYNTHORG_API_TOKEN", "t0ken-for-keys-test")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on "), "{line}");
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let logs = stderr(&out);
    assert!(
        logs.contains("none of the configured recipients") && logs.contains("WARN"),
        "{logs}"
    );
}

#[tokio::test]
async fn config_check_names_an_unusable_identity_file_and_warns_of_lax_permissions() {
    let demo = Demo::new(500_000).await;
    let (key, recipient) = generate(&demo, "key.txt");
    let missing = demo.dir.path().join("no-such-key.txt");
    encrypt(&demo, &[&recipient], Some(&missing));
    let out = demo.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("backup.encryption.identity_file")
            && stderr(&out).contains("no-such-key.txt"),
        "{}",
        stderr(&out)
    );

    let yaml = std::fs::read_to_string(demo.config())
        .unwrap()
        .replace(missing.to_str().unwrap(), key.to_str().unwrap());
    std::fs::write(demo.config(), yaml).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = demo.run(&["config", "check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    // Backups and restores still work with it.
    let created = demo.json(&["backup", "create"]);
    let id = created["id"].as_str().unwrap();
    let verify = demo.run(&["backup", "verify", id]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}
