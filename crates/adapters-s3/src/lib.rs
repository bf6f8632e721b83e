//! S3 adapter: `S3Store`, a `BackupStore` on any S3-compatible server
//! through `object_store`.
//!
//! Not implemented yet (open issue "adapters-s3"); this crate is an empty
//! skeleton and exports nothing.
