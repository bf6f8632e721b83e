//! SQLite adapter: consistent snapshots of live SQLite databases with
//! `VACUUM INTO`, and verification of staged databases on restore.
//!
//! Not implemented yet (open issue "adapters-sqlite"); this crate is an
//! empty skeleton and exports nothing.
