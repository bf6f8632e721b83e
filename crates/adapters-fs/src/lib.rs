//! Local-disk adapter of synthorg-backup.
//!
//! - [`LocalDir`]: a backup directory's objects (durable atomic writes);
//!   [`LocalFsStore`] is the core's store layout over it.
//! - [`FileLock`]: the cross-process operation lock (`flock`).
//! - [`DirSource`]: the memory, config and checkpoints components.
//! - [`LiveData`]: the restore target: staging, journaled swap, recovery.
//! - [`ExportDir`]: a verified backup extracted into a plain directory.
//! - [`SystemClock`]: the real clock for hosts.
//! - [`load_identity`] / [`write_identity`]: encryption identity files.
//!
//! Depends only on `backup-core` and the standard library / tokio; SQLite
//! specifics arrive through the `FileSnapshotter` port.

mod check;
mod clock;
mod dir_source;
mod export;
mod fsio;
mod in_use;
mod keys;
mod live;
mod lock;
mod store;

pub use check::ScratchCheck;
pub use clock::SystemClock;
pub use dir_source::DirSource;
pub use export::ExportDir;
pub use keys::{load_identity, write_identity};
pub use live::{LiveData, SwapFault};
pub use lock::{FileLock, FileLockGuard, LOCK_FILE};
pub use store::{LocalDir, LocalFsStore};
