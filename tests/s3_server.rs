//! An in-process S3 server for the tests: `s3s` + `s3s-fs` over HTTP on
//! 127.0.0.1 with a random port, with one access key. Test support: it
//! panics on setup failures.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use backup_core::config::{S3Config, Secret};

/// The access key of the test server.
pub const ACCESS: &str = "synthorg-test-access";
/// Its secret; tests check it never shows up in messages.
pub const SECRET: &str = "synthorg-test-secret-do-not-print";

/// An in-process S3 server rooted in a (temp) directory.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its storage (one directory per bucket).
    pub root: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server with `buckets` created.
    pub async fn start(buckets: &[&str]) -> Server {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut server = Server::start_in(temp.path(), buckets, 0).await;
        server._temp = Some(temp);
        server
    }

    /// Starts a server storing into `root` on `port` (0: any free port).
    pub async fn start_in(root: &std::path::Path, buckets: &[&str], port: u16) -> Server {
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).unwrap();
        }
        let fs = s3s_fs::FileSystem::new(root).unwrap();
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(fs);
            b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS, SECRET));
            b.build()
        };
        // s3s-fs checks a conditional put and then writes; S3 does both
        // atomically. Serializing writes makes the emulator as atomic as S3.
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let http =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let (service, gate) = (service.clone(), Arc::clone(&gate));
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (service, gate) = (service.clone(), Arc::clone(&gate));
                        // S3 finishes a request it received even if the
                        // client goes away (s3s-fs would leave a multipart
                        // completion half done): run it in its own task.
                        let handler = tokio::spawn(async move {
                            let write = matches!(
                                *req.method(),
                                http::Method::PUT | http::Method::DELETE | http::Method::POST
                            );
                            let _g = if write {
                                Some(gate.lock_owned().await)
                            } else {
                                None
                            };
                            hyper::service::Service::call(&service, req).await
                        });
                        async move { handler.await.unwrap() }
                    });
                let conn = http
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Server {
            addr,
            root: root.to_path_buf(),
            _temp: None,
        }
    }

    /// A `backup.s3` config for `bucket` under `prefix`.
    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: Some(format!("http://{}", self.addr)),
            region: "us-east-1".to_owned(),
            path_style: None,
            access_key_id: Some(ACCESS.to_owned()),
            secret_access_key: Some(Secret::new(SECRET)),
            part_size_mib: 5,
            max_retries: 10,
            retry_timeout_secs: 180,
        }
    }

    /// Files of the bucket on the server's disk, for checking leftovers.
    pub fn bucket_files(&self, bucket: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.join(bucket)];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path());
                }
            }
        }
        out
    }
}
