//! Encrypted backups end to end with the real adapters and the real `age`
//! and `tar` binaries: what is stored, what stays in the clear, opening a
//! backup by hand, round trips on local disk and S3, and refusals (no
//! identity, a wrong one, a damaged `.age` object) that touch nothing.

#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::{Path, PathBuf};
use std::process::Command;

use backup_core::ports::Listed;
use backup_core::{BackupService, Error, ErrorKind, Manifest, Sha256Digest, Trigger};
use synthorg_tests::s3_server::{ACCESS, SECRET, Server};
use synthorg_tests::{Fixture, capture, confirmed, dump};

/// A new identity file in `dir`; its recipient.
fn new_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let (text, recipient) = backup_core::crypt::generate_identity();
    let path = dir.join(name);
    adapters_fs::write_identity(&path, &text).unwrap();
    (path, recipient)
}

/// The `encryption:` block for `config_yaml`.
fn encryption(recipients: &[&str], identity: Option<&Path>) -> String {
    let mut yaml = format!("encryption:\n  recipients: [{}]\n", recipients.join(", "));
    if let Some(file) = identity {
        yaml.push_str(&format!("  identity_file: {}\n", file.display()));
    }
    yaml
}

fn service(fx: &Fixture, extra: &str) -> BackupService {
    fx.service(&fx.config(extra))
}

/// Every file under `root`, with its bytes.
fn stored(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Stored files holding `needle`.
fn holding(root: &Path, needle: &str) -> Vec<PathBuf> {
    stored(root)
        .into_iter()
        .filter(|(_, bytes)| contains(bytes, needle.as_bytes()))
        .map(|(p, _)| p)
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    n.sort();
    n
}

/// `age -d -i key archive | tar <tar_args> -C into`, e.g. `xzf -`.
fn open_by_hand(key: &Path, archive: &Path, into: &Path, tar_args: &str) {
    std::fs::create_dir_all(into).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; age -d -i '{}' '{}' | tar {tar_args} -C '{}'",
            key.display(),
            archive.display(),
            into.display()
        ))
        .output()
        .expect("run age and tar");
    assert!(
        out.status.success(),
        "age -d | tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file the manifest lists is in `dir` with its recorded hash.
fn assert_tree_matches(dir: &Path, m: &Manifest) {
    for f in &m.files {
        let data =
            std::fs::read(dir.join(f.path.as_str())).unwrap_or_else(|e| panic!("{}: {e}", f.path));
        assert_eq!(Sha256Digest::of(&data), f.sha256, "{}", f.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_backup_opens_by_hand_with_age_and_tar_and_restores() {
    let fx = Fixture::new(3_000_000).await;
    let (key, recipient) = new_key(fx.dir.path(), "key.txt");
    let (_, second) = new_key(fx.dir.path(), "offline.txt");
    let svc = service(&fx, &encryption(&[&recipient, &second], Some(&key)));
    let before = capture(&fx.layout).await;
    let m = svc.create(Trigger::Manual).await.unwrap();
    assert!(m.encrypted);
    assert_eq!(m.recipients, [recipient.clone(), second.clone()]);

    let dir = &fx.layout.backups_dir;
    assert_eq!(
        names(dir),
        [
            format!("{}.manifest.json.age", m.id),
            format!("{}.summary.json", m.id),
            format!("{}.tar.gz.age", m.id),
        ],
        "an encrypted archive and sidecar, a clear summary, nothing else"
    );
    let archive = dir.join(format!("{}.tar.gz.age", m.id));
    assert!(
        std::fs::read(&archive)
            .unwrap()
            .starts_with(b"age-encryption.org/v1\n")
    );

    // By hand, with the standard tools only.
    let by_hand = fx.dir.path().join("by-hand");
    open_by_hand(&key, &archive, &by_hand, "xzf -");
    assert_tree_matches(&by_hand, &m);
    assert_eq!(
        dump(&by_hand.join("synthorg.db")).await,
        dump(&fx.layout.database).await
    );
    let sidecar = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&key)
        .arg(dir.join(format!("{}.manifest.json.age", m.id)))
        .output()
        .unwrap();
    assert!(sidecar.status.success());
    assert_eq!(Manifest::from_json(&sidecar.stdout).unwrap(), m);

    // Listing and retention need no key: the summary says who it is for.
    match &svc.list().await.unwrap()[..] {
        [Listed::Complete(s)] => {
            assert!(s.encrypted);
            assert_eq!(s.recipients, m.recipients);
            assert_eq!(s.checksum, None);
        }
        other => panic!("{other:?}"),
    }
    assert!(svc.verify(&m.id).await.unwrap().ok);
    assert_eq!(svc.show(&m.id).await.unwrap(), m);

    std::fs::write(&fx.layout.company_config, b"company: {name: changed}\n").unwrap();
    std::fs::remove_dir_all(&fx.layout.checkpoints_dir).unwrap();
    {
        let mut db = synthorg_tests::open(&fx.layout.database).await;
        sqlx::query("UPDATE tasks SET status = 'changed after the backup'")
            .execute(&mut db)
            .await
            .unwrap();
    }
    let changed = capture(&fx.layout).await;
    let report = svc.restore(&m.id, confirmed()).await.unwrap();
    assert_eq!(capture(&fx.layout).await, before);
    // The safety backup of an encrypting host is encrypted too (never the
    // clear directory form).
    let safety = report.safety_backup_id.unwrap();
    assert!(dir.join(format!("{safety}.tar.gz.age")).exists());
    assert!(!dir.join(safety.to_string()).exists());
    assert!(svc.verify(&safety).await.unwrap().ok);
    // It holds the state the restore replaced (its database read in place;
    // the checkpoints were absent then, so the live ones are left).
    svc.restore(&safety, confirmed()).await.unwrap();
    let after = capture(&fx.layout).await;
    assert_eq!(
        (&after.database, &after.memory, &after.config),
        (&changed.database, &changed.memory, &changed.config)
    );
    assert_ne!(after.database, before.database);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_derived_from_contents_or_names_is_stored_in_the_clear() {
    const CANARY: &str = "CANARY-5e1d0b7c-secret-connection-string";
    const NAME: &str = "canary-named-segment-77a1.bin";
    let fx = Fixture::new(2_000_000).await;
    {
        let mut db = synthorg_tests::open(&fx.layout.database).await;
        sqlx::query("CREATE TABLE canary(v TEXT)")
            .execute(&mut db)
            .await
            .unwrap();
        sqlx::query("INSERT INTO canary VALUES (?)")
            .bind(CANARY)
            .execute(&mut db)
            .await
            .unwrap();
    }
    std::fs::write(fx.layout.memory_dir.join(NAME), b"vector segment").unwrap();
    let (key, recipient) = new_key(fx.dir.path(), "key.txt");

    // The control: without encryption, uncompressed, both are visible, so
    // the search below can find them.
    let clear = fx.dir.path().join("clear");
    let svc = service(
        &fx,
        &format!("path: {}\ncompression: none", clear.display()),
    );
    svc.create(Trigger::Manual).await.unwrap();
    assert!(!holding(&clear, CANARY).is_empty());
    assert!(!holding(&clear, NAME).is_empty());

    // Encrypted, uncompressed (`.tar.age`): on local disk and on S3 (whose
    // listing cache `_index.json` is stored too).
    let local = fx.dir.path().join("sealed");
    let svc = service(
        &fx,
        &format!(
            "path: {}\ncompression: none\n{}",
            local.display(),
            encryption(&[&recipient], Some(&key))
        ),
    );
    let m = svc.create(Trigger::Manual).await.unwrap();
    assert!(local.join(format!("{}.tar.age", m.id)).exists());
    let server = Server::start(&["canary"]).await;
    let s3 = format!(
        "compression: none\ns3:\n  bucket: canary\n  endpoint: http://{}\n  access_key_id: {ACCESS}\n  secret_access_key: {SECRET}\n{}",
        server.addr,
        encryption(&[&recipient], Some(&key))
    );
    let on_s3 = service(&fx, &s3);
    on_s3.create(Trigger::Manual).await.unwrap();
    assert!(
        stored(&server.root)
            .iter()
            .any(|(p, _)| p.ends_with("_index.json"))
    );
    for root in [&local, &server.root] {
        for needle in [CANARY, NAME, "synthorg.db", "company.yaml", "sha256:"] {
            assert_eq!(holding(root, needle), Vec::<PathBuf>::new(), "{needle}");
        }
    }
    // And it is all there after decryption.
    let by_hand = fx.dir.path().join("by-hand");
    open_by_hand(
        &key,
        &local.join(format!("{}.tar.age", m.id)),
        &by_hand,
        "xf -",
    );
    assert_tree_matches(&by_hand, &m);
    assert!(by_hand.join("memory").join(NAME).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_identity_restore_and_verify_are_refused_and_touch_nothing() {
    let fx = Fixture::new(2_000_000).await;
    let (key, recipient) = new_key(fx.dir.path(), "key.txt");
    let (other_key, other) = new_key(fx.dir.path(), "other.txt");

    // A host that only backs up holds no identity.
    let backs_up = service(&fx, &encryption(&[&recipient], None));
    let m = backs_up.create(Trigger::Manual).await.unwrap();
    assert_eq!(backs_up.list().await.unwrap().len(), 1);
    std::fs::write(&fx.layout.company_config, b"company: {name: now}\n").unwrap();
    let live = capture(&fx.layout).await;
    let files_before = synthorg_tests::raw_bytes(&fx.layout);

    let refused = |e: Error, needles: &[&str]| {
        assert!(matches!(e, Error::Key { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Refused);
        let text = e.to_string();
        for n in needles {
            assert!(text.contains(n), "{text} lacks {n}");
        }
    };
    for svc in [
        &backs_up,
        &service(&fx, &encryption(&[&other], Some(&other_key))),
        &service(
            &fx,
            &encryption(&[&recipient], Some(&fx.dir.path().join("missing.txt"))),
        ),
    ] {
        let needles: &[&str] = if std::ptr::eq(svc, &backs_up) {
            &["no identity is configured", &recipient]
        } else {
            &[&recipient]
        };
        refused(svc.verify(&m.id).await.unwrap_err(), needles);
        refused(svc.show(&m.id).await.unwrap_err(), needles);
        refused(svc.restore(&m.id, confirmed()).await.unwrap_err(), needles);
        assert_eq!(capture(&fx.layout).await, live);
        assert_eq!(synthorg_tests::raw_bytes(&fx.layout), files_before);
    }
    let wrong = service(&fx, &encryption(&[&other], Some(&other_key)))
        .verify(&m.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(wrong.contains(&other_key.display().to_string()), "{wrong}");
    assert!(wrong.contains(&other), "{wrong}");
    let missing = service(
        &fx,
        &encryption(&[&recipient], Some(&fx.dir.path().join("missing.txt"))),
    )
    .verify(&m.id)
    .await
    .unwrap_err()
    .to_string();
    assert!(
        missing.contains("missing.txt") && missing.contains("not found"),
        "{missing}"
    );

    // The right identity opens it; the warnings say what is wrong before.
    let right = service(&fx, &encryption(&[&recipient], Some(&key)));
    assert!(right.verify(&m.id).await.unwrap().ok);
    assert!(right.check_keys().await.is_empty());
    let mismatched = service(&fx, &encryption(&[&other], Some(&key)));
    let warnings = mismatched.check_keys().await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("none of the configured recipients")),
        "{warnings:?}"
    );
    let cannot_open = service(&fx, &encryption(&[&other], Some(&other_key)));
    let warnings = cannot_open.check_keys().await;
    assert!(
        warnings.iter().any(|w| w.contains("newest backup")),
        "{warnings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_age_object_is_refused_before_the_swap() {
    let fx = Fixture::new(2_000_000).await;
    let (key, recipient) = new_key(fx.dir.path(), "key.txt");
    let svc = service(&fx, &encryption(&[&recipient], Some(&key)));
    let m = svc.create(Trigger::Manual).await.unwrap();
    std::fs::write(&fx.layout.company_config, b"company: {name: now}\n").unwrap();
    let live = capture(&fx.layout).await;
    let archive = fx.layout.backups_dir.join(format!("{}.tar.gz.age", m.id));
    let good = std::fs::read(&archive).unwrap();

    // A flipped byte in the body, then one in the header.
    for at in [good.len() / 2, 30] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        std::fs::write(&archive, &bad).unwrap();
        let report = svc.verify(&m.id).await.unwrap();
        assert!(!report.ok, "flipped byte at {at} went unnoticed");
        let e = svc.restore(&m.id, confirmed()).await.unwrap_err();
        assert!(matches!(e, Error::Integrity { .. }), "at {at}: {e:?}");
        assert_eq!(capture(&fx.layout).await, live);
    }
    // Truncated: listed as damaged, refused.
    std::fs::write(&archive, &good[..good.len() - 1000]).unwrap();
    assert!(matches!(
        &svc.list().await.unwrap()[..],
        [Listed::Damaged { .. }]
    ));
    assert!(svc.restore(&m.id, confirmed()).await.is_err());
    assert_eq!(capture(&fx.layout).await, live);
    std::fs::write(&archive, &good).unwrap();

    // A damaged sidecar is damage, not a key problem.
    let sidecar = fx
        .layout
        .backups_dir
        .join(format!("{}.manifest.json.age", m.id));
    let mut bytes = std::fs::read(&sidecar).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0x01;
    std::fs::write(&sidecar, &bytes).unwrap();
    let e = svc.show(&m.id).await.unwrap_err();
    assert!(matches!(e, Error::Manifest { .. }), "{e:?}");
    assert_eq!(capture(&fx.layout).await, live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_backups_round_trip_through_s3_multipart() {
    let server = Server::start(&["sealed"]).await;
    let fx = Fixture::new(2_000_000).await;
    fx.add_incompressible_memory(12, 9);
    let (key, recipient) = new_key(fx.dir.path(), "key.txt");
    let extra = format!(
        "compression: zstd\ns3:\n  bucket: sealed\n  endpoint: http://{}\n  access_key_id: {ACCESS}\n  secret_access_key: {SECRET}\n  part_size_mib: 5\n{}",
        server.addr,
        encryption(&[&recipient], Some(&key))
    );
    let svc = service(&fx, &extra);
    let before = capture(&fx.layout).await;
    let m = svc.create(Trigger::Manual).await.unwrap();
    assert!(
        m.archive.as_ref().unwrap().size_bytes > 10 << 20,
        "multipart"
    );
    let object = stored(&server.root.join("sealed"))
        .into_iter()
        .find(|(p, _)| p.to_string_lossy().ends_with(".tar.zst.age"))
        .expect("the encrypted archive is stored under its name");
    let by_hand = fx.dir.path().join("by-hand");
    let copy = fx.dir.path().join("copy.tar.zst.age");
    std::fs::write(&copy, &object.1).unwrap();
    open_by_hand(&key, &copy, &by_hand, "--zstd -xf -");
    assert_tree_matches(&by_hand, &m);

    std::fs::write(fx.layout.memory_dir.join("vectors.bin"), b"replaced").unwrap();
    svc.restore(&m.id, confirmed()).await.unwrap();
    assert_eq!(capture(&fx.layout).await, before);
}

#[test]
fn bad_recipients_and_identity_settings_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let load = |extra: &str| {
        backup_core::BackupConfig::load(Some(&synthorg_tests::config_yaml(extra)), dir.path())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let (_, good) = backup_core::crypt::generate_identity();
    let e = load(&encryption(&[&good, "age1notakey"], None)).unwrap_err();
    assert!(e.contains("backup.encryption.recipients[1]"), "{e}");
    let e = load(&encryption(&["AGE-SECRET-KEY-1ABCDEF"], None)).unwrap_err();
    assert!(e.contains("recipients[0]") && e.contains("neither"), "{e}");
    let e = load("encryption:\n  recipients: []\n").unwrap_err();
    assert!(e.contains("at least one recipient"), "{e}");
    let e = load(&encryption(&[&good, &good], None)).unwrap_err();
    assert!(e.contains("twice"), "{e}");
    assert!(load(&encryption(&[&good], None)).is_ok());
    // age's own test key.
    let ssh = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW+uObz5dvMgjz1OxfM/XXUB+VHtZ6isGN alice@rust";
    assert!(
        load(&encryption(&[ssh], None)).is_ok(),
        "ssh-ed25519 keys are recipients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_ed25519_key_is_a_recipient_and_its_private_key_an_identity() {
    let fx = Fixture::new(500_000).await;
    let key = fx.dir.path().join("id_ed25519");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops@vault", "-f"])
        .arg(&key)
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: ssh-keygen is not installed here");
        return;
    }
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let svc = service(&fx, &encryption(&[public.trim()], Some(&key)));
    let m = svc.create(Trigger::Manual).await.unwrap();
    assert!(
        m.recipients[0].starts_with("ssh-ed25519 "),
        "{:?}",
        m.recipients
    );
    assert!(svc.verify(&m.id).await.unwrap().ok);
    assert!(
        svc.check_keys().await.is_empty(),
        "the identity opens its own recipient"
    );
    // And by hand: age takes the ssh key as an identity.
    let by_hand = fx.dir.path().join("by-hand");
    let archive = fx.layout.backups_dir.join(format!("{}.tar.gz.age", m.id));
    open_by_hand(&key, &archive, &by_hand, "xzf -");
    assert_tree_matches(&by_hand, &m);
}
