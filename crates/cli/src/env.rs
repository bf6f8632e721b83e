//! Every environment variable the `synthorg` process reads, declared here
//! (README "Environment variables"). `SYNTHORG_SERVER` is read by clap
//! (`args.rs`) and `SYNTHORG_BACKUP__*` by the config loader
//! (`backup_core::config`); the rest through [`var`].

/// The config file, when `--config` is not given.
pub(crate) const CONFIG: &str = "SYNTHORG_CONFIG";
/// The admin API token of `serve` (and the remote token's last fallback).
pub(crate) const API_TOKEN: &str = "SYNTHORG_API_TOKEN";
/// The bearer token of remote mode when `--token` is not given.
pub(crate) const TOKEN: &str = "SYNTHORG_TOKEN";
/// The newest database schema the running app supports.
pub(crate) const SCHEMA_VERSION: &str = "SYNTHORG_SCHEMA_VERSION";
/// How many CPUs `synthorg` uses (0: all).
pub(crate) const BACKUP_CPUS: &str = "SYNTHORG_BACKUP_CPUS";
/// glibc's malloc mmap threshold, fixed by re-executing (`process.rs`).
pub(crate) const MALLOC_MMAP_THRESHOLD: &str = "MALLOC_MMAP_THRESHOLD_";

/// The variable's value, `None` when unset, empty or not UTF-8.
pub(crate) fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}
