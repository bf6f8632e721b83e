//! The pure domain of synthorg-backup.
//!
//! It holds what every interface must agree on: the configuration
//! ([`config`]), backup identity ([`id`]), paths inside backups ([`path`]),
//! the manifest ([`manifest`]), the retention planner ([`retention`]), the
//! compatibility rules ([`compat`]) and the ports through which the
//! orchestration reaches storage and live data ([`ports`]).
//!
//! It must not depend on the filesystem, the network, SQL or the clock:
//! those arrive through the ports, implemented by the adapter crates and
//! chosen by the host at start-up. Everything it decides is a pure function
//! with unit and property tests.

pub mod archive;
pub mod buffers;
pub mod cdc;
pub mod compat;
pub mod compress;
pub mod config;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod crypt;
pub mod digest;
pub mod error;
pub mod id;
pub mod layout;
pub mod manifest;
pub mod memory;
pub mod path;
pub mod ports;
pub mod retention;
pub mod safety_pool;
pub mod service;
pub mod status;
pub mod wire;

pub use compat::{CompatReport, Finding, RunningApp};
pub use config::{BackupConfig, Compression, ConfigError};
pub use digest::{Blake3Digest, Checksum, Sha256Digest, Sha256Hasher};
pub use error::{Error, ErrorKind, Result};
pub use id::{BackupId, Component, IdError, Trigger};
pub use manifest::{Manifest, ManifestError, Summary};
pub use path::ArchivePath;
pub use service::{
    BackupService, CreateOptions, Ports, Progress, RestoreOptions, RestoreReport, Settings,
    VerifyReport,
};
