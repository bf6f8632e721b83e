//! S3Store and S3Lock against a real S3 server over HTTP: an in-process
//! `s3s` + `s3s-fs` server on 127.0.0.1 with a random port. The same suite
//! runs against an external endpoint (MinIO, Garage, AWS) when
//! `SYNTHORG_TEST_S3_ENDPOINT`, `SYNTHORG_TEST_S3_BUCKET`,
//! `SYNTHORG_TEST_S3_ACCESS_KEY` and `SYNTHORG_TEST_S3_SECRET_KEY` are set.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use adapters_s3::{S3Lock, S3Store};
use async_trait::async_trait;
use backup_core::config::{S3Config, Secret};
use backup_core::conformance::{self, Target};
use backup_core::ports::{BackupStore, ObjectName, Operation, OperationLock};
use backup_core::{BackupId, Compression, Error, Trigger};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

use synthorg_tests::s3_server::{SECRET, Server};

struct S3Target {
    store: Arc<S3Store>,
    lock: Arc<S3Lock>,
    other: Arc<S3Lock>,
    raw: Arc<dyn ObjectStore>,
    prefix: String,
}

impl S3Target {
    fn new(config: &S3Config) -> S3Target {
        let (store, lock) = adapters_s3::connect(config).unwrap();
        let (_, other) = adapters_s3::connect(config).unwrap();
        let raw: Arc<dyn ObjectStore> = Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(&config.bucket)
                .with_region(&config.region)
                .with_endpoint(config.endpoint.clone().unwrap())
                .with_access_key_id(config.access_key_id.clone().unwrap())
                .with_secret_access_key(config.secret_access_key.as_ref().unwrap().expose())
                .with_virtual_hosted_style_request(false)
                .with_allow_http(true)
                .build()
                .unwrap(),
        );
        S3Target {
            store: Arc::new(store),
            lock: Arc::new(lock),
            other: Arc::new(other),
            raw,
            prefix: config.prefix.clone(),
        }
    }

    /// Entries of the listing index object.
    async fn index_len(&self) -> usize {
        let got = self.raw.get(&self.raw_key("_index.json")).await.unwrap();
        let entries: Vec<serde_json::Value> =
            serde_json::from_slice(&got.bytes().await.unwrap()).unwrap();
        entries.len()
    }

    fn raw_key(&self, name: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("{}{name}", self.prefix))
    }
}

#[async_trait]
impl Target for S3Target {
    fn store(&self) -> Arc<dyn BackupStore> {
        self.store.clone()
    }
    fn lock(&self) -> Arc<dyn OperationLock> {
        self.lock.clone()
    }
    fn other_lock(&self) -> Arc<dyn OperationLock> {
        self.other.clone()
    }
    async fn put_raw(&self, name: &str, bytes: &[u8]) {
        self.raw
            .put(&self.raw_key(name), bytes.to_vec().into())
            .await
            .unwrap();
    }
    async fn exists_raw(&self, name: &str) -> bool {
        self.raw.head(&self.raw_key(name)).await.is_ok()
    }
}

fn id(secs: i64) -> BackupId {
    BackupId::new(
        chrono::DateTime::from_timestamp(secs, 0).unwrap(),
        Trigger::Manual,
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_passes_the_conformance_suite_in_process() {
    let server = Server::start(&["backups"]).await;
    conformance::run_all(&S3Target::new(&server.config("backups", "prod/"))).await;
    // Also at the bucket root.
    let server = Server::start(&["root"]).await;
    conformance::run_all(&S3Target::new(&server.config("root", ""))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_passes_the_conformance_suite_against_an_external_endpoint() {
    let (Ok(endpoint), Ok(bucket), Ok(access), Ok(secret)) = (
        std::env::var("SYNTHORG_TEST_S3_ENDPOINT"),
        std::env::var("SYNTHORG_TEST_S3_BUCKET"),
        std::env::var("SYNTHORG_TEST_S3_ACCESS_KEY"),
        std::env::var("SYNTHORG_TEST_S3_SECRET_KEY"),
    ) else {
        eprintln!(
            "SKIPPED: set SYNTHORG_TEST_S3_ENDPOINT/_BUCKET/_ACCESS_KEY/_SECRET_KEY to run against MinIO or Garage"
        );
        return;
    };
    let config = S3Config {
        bucket,
        prefix: format!("synthorg-conformance-{}/", std::process::id()),
        endpoint: Some(endpoint),
        region: std::env::var("SYNTHORG_TEST_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
        path_style: None,
        access_key_id: Some(access),
        secret_access_key: Some(Secret::new(secret)),
        part_size_mib: 5,
        max_retries: 3,
        retry_timeout_secs: 30,
    };
    conformance::run_all(&S3Target::new(&config)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_lock_is_busy_and_an_expired_one_is_taken_over() {
    let server = Server::start(&["bucket-one"]).await;
    let target = S3Target::new(&server.config("bucket-one", "x/"));
    let alive = serde_json::json!({
        "owner": "other-host/4242/1/0", "operation": "restore", "host": "other-host", "pid": 4242,
        "acquired_at": chrono::Utc::now(), "expires_at": chrono::Utc::now() + chrono::Duration::minutes(5),
    });
    target.put_raw(".lock", alive.to_string().as_bytes()).await;
    let err = target
        .lock
        .try_acquire(Operation::Backup)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Busy { .. }));
    assert!(
        err.to_string().contains("restore (pid 4242 on other-host"),
        "{err}"
    );

    let dead = serde_json::json!({
        "owner": "other-host/4242/1/0", "operation": "restore", "host": "other-host", "pid": 4242,
        "acquired_at": chrono::Utc::now() - chrono::Duration::minutes(10),
        "expires_at": chrono::Utc::now() - chrono::Duration::minutes(9),
    });
    target.put_raw(".lock", dead.to_string().as_bytes()).await;
    let guard = target.lock.try_acquire(Operation::Backup).await.unwrap();
    assert!(
        target.other.try_acquire(Operation::Prune).await.is_err(),
        "taken over, now held"
    );
    guard.release().await.unwrap();
    assert!(!target.exists_raw(".lock").await, "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_while_held() {
    let server = Server::start(&["bucket-two"]).await;
    let config = server.config("bucket-two", "");
    let (store, _) = adapters_s3::connect(&config).unwrap();
    let raw = S3Target::new(&config).raw;
    let lock = S3Lock::new(
        raw.clone(),
        object_store::path::Path::from(".lock"),
        store.location(),
    )
    .with_lease(Duration::from_millis(1500));
    let other = S3Lock::new(
        raw,
        object_store::path::Path::from(".lock"),
        store.location(),
    );
    let guard = lock.try_acquire(Operation::Backup).await.unwrap();
    tokio::time::sleep(Duration::from_millis(4000)).await; // well past two leases
    assert!(
        other.try_acquire(Operation::Backup).await.is_err(),
        "still held: the lease was renewed"
    );
    guard.release().await.unwrap();
    assert!(other.try_acquire(Operation::Backup).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_bucket_and_key_never_the_secret() {
    let server = Server::start(&["exists"]).await;
    let check = |e: Error, want: &str| {
        let text = e.to_string();
        assert!(text.contains(want), "{want:?} not in {text}");
        assert!(!text.contains(SECRET), "secret leaked: {text}");
        assert!(
            !format!("{e:?}").contains(SECRET),
            "secret leaked in debug: {e:?}"
        );
        text
    };
    let (missing_bucket, _) = adapters_s3::connect(&server.config("no-such-bucket", "")).unwrap();
    let text = check(
        missing_bucket.list().await.unwrap_err(),
        "s3://no-such-bucket/",
    );
    assert!(
        text.contains("does not exist") || text.contains("NoSuchBucket"),
        "{text}"
    );

    let mut bad = server.config("exists", "");
    bad.secret_access_key = Some(Secret::new("wrong-secret"));
    let (bad_creds, _) = adapters_s3::connect(&bad).unwrap();
    check(bad_creds.list().await.unwrap_err(), "authentication failed");

    let mut gone = server.config("exists", "");
    gone.endpoint = Some("http://127.0.0.1:9".into()); // discard port: nothing listens
    let (unreachable, _) = adapters_s3::connect(&gone).unwrap();
    check(unreachable.list().await.unwrap_err(), "unreachable");

    let (store, _) = adapters_s3::connect(&server.config("exists", "p/")).unwrap();
    let err = store
        .get(&id(1_800_000_000), &ObjectName::Archive(Compression::Gzip))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::NotFound { .. }));
    check(err, "2027-01-15T08-00-00_manual");
    assert!(!format!("{:?}", server.config("exists", "")).contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_upload_is_aborted_and_never_listed() {
    let server = Server::start(&["cancel-test"]).await;
    let (store, _) = adapters_s3::connect(&server.config("cancel-test", "")).unwrap();
    let id = id(1_800_000_000);
    // A stream that yields 12 MiB, then stalls forever.
    let chunk = bytes::Bytes::from(vec![3u8; 1 << 20]);
    let data = futures::stream::iter((0..12).map(move |_| Ok(chunk.clone())))
        .chain(futures::stream::pending())
        .boxed();
    let upload = store.put(&id, &ObjectName::Archive(Compression::Gzip), data);
    assert!(
        tokio::time::timeout(Duration::from_secs(3), upload)
            .await
            .is_err(),
        "stalled upload cancelled"
    );
    // The abort runs in the background; the server drops the parts.
    let mut parts = Vec::new();
    for _ in 0..50 {
        parts = server
            .bucket_files("cancel-test")
            .into_iter()
            .chain(
                std::fs::read_dir(&server.root)
                    .unwrap()
                    .map(|e| e.unwrap().path()),
            )
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(".upload_id-"))
            })
            .collect();
        if parts.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(parts.is_empty(), "multipart leftovers: {parts:?}");
    assert!(store.list().await.unwrap().is_empty());
    assert!(matches!(
        store
            .get(&id, &ObjectName::Archive(Compression::Gzip))
            .await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_handles_more_than_a_thousand_backups() {
    let server = Server::start(&["many"]).await;
    let target = S3Target::new(&server.config("many", "p/"));
    for i in 0..1100 {
        let id = id(1_800_000_000 + i * 60);
        let m = conformance::manifest_for(&id, Some(b"a"), b"x");
        target
            .put_raw(&format!("{id}.manifest.json"), &m.to_json().unwrap())
            .await;
    }
    let listed = target.store.list().await.unwrap();
    assert_eq!(listed.len(), 1100);
    assert!(listed.windows(2).all(|w| w[0].id() > w[1].id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_list_verify_restore_round_trip_through_s3() {
    let server = Server::start(&["round-trip"]).await;
    let fx = synthorg_tests::Fixture::new(7_000_000).await;
    let extra = format!(
        "s3:\n  bucket: round-trip\n  prefix: site/a/\n  endpoint: http://{}\n  access_key_id: {}\n  secret_access_key: {}\n  part_size_mib: 5",
        server.addr,
        synthorg_tests::s3_server::ACCESS,
        SECRET
    );
    let service = fx.service(&fx.config(&extra));
    assert_eq!(service.location(), "s3://round-trip/site/a/");
    let before = synthorg_tests::capture(&fx.layout).await;
    let m = service.create(Trigger::Manual).await.unwrap();
    assert!(
        !fx.layout.backups_dir.exists(),
        "nothing written to the local path"
    );
    let listed = service.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(service.verify(&m.id).await.unwrap().ok);
    // No later backup copies members from S3: no digests are recorded and
    // no pieces object is written.
    assert_eq!(m.archive.as_ref().unwrap().pieces, None);
    let in_bucket = || -> Vec<String> {
        std::fs::read_dir(server.root.join("round-trip/site/a"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let objects = in_bucket();
    assert!(
        objects.iter().any(|n| n.ends_with(".tar.gz")),
        "{objects:?}"
    );
    assert!(
        !objects.iter().any(|n| n.ends_with(".pieces")),
        "{objects:?}"
    );

    std::fs::write(&fx.layout.company_config, b"company: {name: changed}\n").unwrap();
    let changed = synthorg_tests::capture(&fx.layout).await;
    let confirmed = || backup_core::RestoreOptions {
        confirm: true,
        ..Default::default()
    };
    let report = service.restore(&m.id, confirmed()).await.unwrap();
    assert_eq!(synthorg_tests::capture(&fx.layout).await, before);
    assert_eq!(
        service.list().await.unwrap().len(),
        2,
        "the safety backup is listed"
    );
    // It stays on this machine, at backup.path, in directory form (the
    // replaced items renamed into it): not compressed, not uploaded.
    let safety = report.safety_backup_id.unwrap();
    assert_eq!(safety.trigger(), Trigger::PreRestore);
    let pooled = fx.layout.backups_dir.join(safety.to_string());
    assert!(
        pooled.join("manifest.json").is_file(),
        "{}",
        pooled.display()
    );
    assert_eq!(
        report.safety_backup_path.as_deref(),
        Some(pooled.to_str().unwrap()),
        "the report says where"
    );
    let in_s3: Vec<String> = in_bucket()
        .into_iter()
        .filter(|n| n.starts_with(&safety.to_string()))
        .collect();
    assert!(in_s3.is_empty(), "uploaded: {in_s3:?}");
    assert!(service.verify(&safety).await.unwrap().ok);
    // Undoing the restore: the safety backup gives the replaced state back.
    service.restore(&safety, confirmed()).await.unwrap();
    assert_eq!(synthorg_tests::capture(&fx.layout).await, changed);
    assert_eq!(service.list().await.unwrap().len(), 3);
}

/// The S3 server as a child process, so that it can be stopped.
struct ServerProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl ServerProcess {
    fn start(root: &std::path::Path, port: u16) -> ServerProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_synthorg-s3-server"))
            .arg(root)
            .arg("faults")
            .arg(port.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .parse()
            .unwrap();
        ServerProcess { child, addr }
    }

    fn stop(self) {}
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until an entry whose name satisfies `found` shows up in `dir`.
async fn wait_for_entry(dir: &std::path::Path, found: impl Fn(&str) -> bool) {
    let started = std::time::Instant::now();
    while !std::fs::read_dir(dir)
        .unwrap()
        .any(|e| found(&e.unwrap().file_name().to_string_lossy()))
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing in {dir:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_stopped_mid_upload_and_mid_download() {
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root.path(), 0);
    let fx = synthorg_tests::Fixture::new(2_000_000).await;
    // 12 MiB gzip cannot shrink: the archive is a 3-part upload.
    fx.add_incompressible_memory(12, 8);
    let config = fx.config(&format!(
        "s3:\n  bucket: faults\n  endpoint: http://{}\n  access_key_id: {}\n  secret_access_key: {SECRET}\n  part_size_mib: 5\n  max_retries: 1\n  retry_timeout_secs: 2",
        server.addr,
        synthorg_tests::s3_server::ACCESS,
    ));
    let service = fx.service(&config);
    let good = service.create(Trigger::Manual).await.unwrap();
    let before = synthorg_tests::capture(&fx.layout).await;

    // Mid-upload: the backup fails with an error naming the endpoint problem.
    let upload = tokio::spawn({
        let service = service.clone();
        async move { service.create(Trigger::Manual).await }
    });
    wait_for_entry(root.path(), |n| n.starts_with(".upload_id-")).await;
    let port = server.addr.port();
    server.stop();
    let err = tokio::time::timeout(Duration::from_secs(60), upload)
        .await
        .expect("the backup gave up")
        .unwrap()
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Store { .. }), "{text}");
    assert!(
        text.contains("s3://faults/") && !text.contains(SECRET),
        "{text}"
    );
    assert_eq!(synthorg_tests::capture(&fx.layout).await, before);

    // Back up: recover aborts the interrupted upload; only the good backup is listed.
    let server = ServerProcess::start(root.path(), port);
    let actions = service.recover().await.unwrap();
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("aborted the interrupted upload")),
        "{actions:?}"
    );
    let listed: Vec<BackupId> = service
        .list()
        .await
        .unwrap()
        .iter()
        .map(|l| l.id().clone())
        .collect();
    assert_eq!(listed, vec![good.id.clone()]);
    let leftovers: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());

    // Mid-download: the restore is refused and the live data stays as it is.
    std::fs::write(&fx.layout.company_config, b"company: {name: changed}\n").unwrap();
    let changed = synthorg_tests::capture(&fx.layout).await;
    let restore = tokio::spawn({
        let (service, id) = (service.clone(), good.id.clone());
        async move {
            let options = backup_core::RestoreOptions {
                confirm: true,
                ..Default::default()
            };
            service.restore(&id, options).await
        }
    });
    wait_for_entry(&fx.layout.root, |n| n.contains(".restore-staged")).await;
    server.stop();
    let err = tokio::time::timeout(Duration::from_secs(60), restore)
        .await
        .expect("the restore gave up")
        .unwrap()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("{}.tar.gz", good.id)),
        "failed downloading: {text}"
    );
    assert_eq!(synthorg_tests::capture(&fx.layout).await, changed);
    let hidden: Vec<String> = std::fs::read_dir(&fx.layout.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".restore-") || n.starts_with(".synthorg"))
        .collect();
    assert_eq!(hidden, Vec::<String>::new(), "staging left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_uses_the_index_and_the_sidecars_stay_authoritative() {
    let server = Server::start(&["indexed"]).await;
    let target = S3Target::new(&server.config("indexed", "p/"));
    let store = target.store();
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = id(1_800_000_000 + i * 60);
        store
            .publish(&conformance::manifest_for(&id, Some(b"a"), b"x"))
            .await
            .unwrap();
        ids.push(id);
    }
    let listed = |l: Vec<backup_core::ports::Listed>| -> Vec<BackupId> {
        l.iter().map(|x| x.id().clone()).collect()
    };
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed(store.list().await.unwrap()), newest_first);
    let index = target.index_len().await;
    assert_eq!(index, 5, "every published backup is indexed");

    // Deleted: gone from the index too.
    store.delete(&ids[0]).await.unwrap();
    assert_eq!(
        listed(store.list().await.unwrap()),
        newest_first[..4].to_vec()
    );

    // A sidecar removed behind the store's back: not listed, whatever the index says.
    target
        .raw
        .delete(&target.raw_key(&format!("{}.manifest.json", ids[1])))
        .await
        .unwrap();
    assert_eq!(
        listed(store.list().await.unwrap()),
        newest_first[..3].to_vec()
    );

    // A garbage or missing index: the same listing, read summary by summary.
    for damage in [Some(&b"{not json"[..]), None] {
        match damage {
            Some(bytes) => target.put_raw("_index.json", bytes).await,
            None => target
                .raw
                .delete(&target.raw_key("_index.json"))
                .await
                .unwrap(),
        }
        assert_eq!(
            listed(store.list().await.unwrap()),
            newest_first[..3].to_vec()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_heals_backups_published_without_it() {
    let server = Server::start(&["healing"]).await;
    let target = S3Target::new(&server.config("healing", ""));
    // As in a bucket from before the index: sidecars only.
    for i in 0..30 {
        let id = id(1_800_000_000 + i * 60);
        let m = conformance::manifest_for(&id, Some(b"a"), b"x");
        target
            .put_raw(&format!("{id}.manifest.json"), &m.to_json().unwrap())
            .await;
    }
    assert!(!target.exists_raw("_index.json").await);
    assert_eq!(target.store.list().await.unwrap().len(), 30);
    // The next publication indexes them all.
    let next = id(1_900_000_000);
    target
        .store
        .publish(&conformance::manifest_for(&next, Some(b"a"), b"x"))
        .await
        .unwrap();
    let index = target.index_len().await;
    assert_eq!(index, 31);
    assert_eq!(target.store.list().await.unwrap().len(), 31);
}
