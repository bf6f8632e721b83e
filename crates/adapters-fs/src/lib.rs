//! Local-disk adapter: `LocalFsStore` (a `BackupStore` on a directory),
//! directory sources for memory, config and checkpoints, and the file lock.
//!
//! Not implemented yet (open issue "adapters-fs"); this crate is an empty
//! skeleton and exports nothing.
