//! S3 adapter of synthorg-backup: [`S3Store`] (the core's store layout over
//! [`S3Prefix`]) and [`S3Lock`] on any
//! S3-compatible server (AWS, MinIO, Garage) through `object_store`.
//!
//! [`connect`] builds both from the `backup.s3` config: bucket, prefix,
//! endpoint (path-style by default when set), region, credentials from the
//! config or `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`. Plain HTTP is
//! allowed only when the endpoint says `http://`. Failed requests are
//! retried with backoff (`max_retries`, `retry_timeout_secs`). Secrets never appear in
//! logs or errors: messages name the bucket and key only.

mod errors;
mod lock;
mod store;

use std::sync::Arc;

use backup_core::config::S3Config;
use backup_core::layout::Layout;
use backup_core::{Error, Result};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, RetryConfig};

pub use lock::{DEFAULT_LEASE, S3Lock, S3LockGuard};
pub use store::{PARTS_IN_FLIGHT, S3Prefix, S3Store};

/// The store and the lock for `config`.
///
/// # Errors
/// `Store` when the client cannot be built (e.g. an invalid endpoint URL).
pub fn connect(config: &S3Config) -> Result<(S3Store, S3Lock)> {
    let location = format!("s3://{}/{}", config.bucket, config.prefix);
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_virtual_hosted_style_request(!config.path_style())
        .with_allow_http(config.allow_http())
        .with_retry(RetryConfig {
            max_retries: config.max_retries as usize,
            retry_timeout: Duration::from_secs(config.retry_timeout_secs.into()),
            ..RetryConfig::default()
        });
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(key) = &config.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &config.secret_access_key {
        builder = builder.with_secret_access_key(secret.expose());
    }
    let s3 = builder.build().map_err(|e| Error::Store {
        location: location.clone(),
        key: String::new(),
        reason: format!("cannot configure the S3 client: {e}"),
        source: None,
    })?;
    let s3 = Arc::new(s3);
    let part_size = config.part_size_mib as usize * 1024 * 1024;
    let objects = S3Prefix::new(Arc::clone(&s3), location.clone(), &config.prefix, part_size);
    let lock = S3Lock::new(s3 as Arc<dyn ObjectStore>, objects.key(".lock"), location);
    Ok((Layout::new(objects), lock))
}
