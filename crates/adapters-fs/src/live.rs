//! [`LiveData`]: the live SynthOrg data a restore replaces.
//!
//! Staging for each component sits next to it (`.<name>.restore-staged`,
//! same filesystem, so the swap is renames). The swap is journaled in
//! `<database dir>/.synthorg-restore.journal`:
//!
//! 1. write the journal (`swapping`, what exists and where it goes), fsync;
//! 2. per component: move the live item and, for the database, its
//!    `-wal`/`-shm`/`-journal` aside (`.<name>.restore-aside`), move the
//!    staged item into place, fsync the directory;
//! 3. rewrite the journal as `committed` (atomic), fsync;
//! 4. remove the aside copies, then the journal.
//!
//! [`recover`](RestoreTarget::recover) reads a journal left by a crash: in
//! state `swapping` it moves everything back (the old state), in state
//! `committed` it finishes step 4 (the new state). Every step is idempotent,
//! so a crash during recovery is recovered by the next run.
//!
//! Files: `live/journal.rs` (the journal and the swap), `live/staging.rs`
//! (the staging area and its checks), `live/layout.rs` (symlinked roots,
//! mount points, SQLite companions, owners).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use backup_core::config::SourcesConfig;
use backup_core::manifest::{DirEntry, FileEntry, SymlinkEntry};
use backup_core::ports::{
    ContentCheck, DatabaseVerifier, EntrySink, Kept, RestoreTarget, SCRATCH_PREFIX, ServerDatabase,
    Staging,
};
use backup_core::{ArchivePath, Component, Error, Manifest, Result};
use serde::{Deserialize, Serialize};

use crate::dir_source::contained_target;
use crate::fsio::{self, DIR_MODE, FILE_MODE};

mod journal;
mod layout;
mod preserve;
mod staging;
mod writer;

use journal::*;
use layout::*;
use staging::FsStaging;
use writer::StageWriter;

const JOURNAL: &str = ".synthorg-restore.journal";

const STAGED: &str = ".restore-staged";
const ASIDE: &str = ".restore-aside";
/// Staging and aside directories *inside* a component directory that is a
/// mount point (a Docker volume, say), which cannot be renamed: its
/// contents are swapped instead.
const INSIDE_STAGED: &str = ".synthorg-restore-staged";
const INSIDE_ASIDE: &str = ".synthorg-restore-aside";

/// The live data directory layout, from `backup.sources`.
#[derive(Debug, Clone)]
pub struct LiveData {
    database: PathBuf,
    memory_dir: PathBuf,
    company_config: PathBuf,
    checkpoints_dir: PathBuf,
    verifier: Option<Arc<dyn DatabaseVerifier>>,
    /// The PostgreSQL database of a deployment that keeps its state there
    /// (then `database` is a name in the data directory that never exists:
    /// staging and the journal sit beside it).
    server: Option<Arc<dyn ServerDatabase>>,
    fault: Option<SwapFault>,
}

/// A fault injected into the swap, for the tests of its crash safety.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapFault {
    /// The swap fails, as a disk error would, before rename `n` (0-based):
    /// it rolls itself back.
    FailBefore(usize),
    /// The process aborts right after rename `n` (0-based) is durable,
    /// as if killed: nothing is rolled back until the next recovery.
    AbortAfter(usize),
    /// The process aborts once the safety backup's links are made, before
    /// the swap starts.
    AbortAfterPreserve,
    /// The process aborts once the swap committed and finished, before
    /// the restore publishes its safety backup.
    AbortAfterCommit,
}

impl SwapFault {
    /// Aborts the process if `self` is `point` (crash tests only).
    pub(crate) fn abort_at(fault: Option<SwapFault>, point: SwapFault) {
        if fault == Some(point) {
            tracing::error!(?point, "injected fault: aborting the process");
            std::process::abort();
        }
    }
}

impl LiveData {
    /// The live data at the configured source paths.
    pub fn new(sources: &SourcesConfig) -> LiveData {
        LiveData {
            database: sources.database.clone(),
            memory_dir: sources.memory_dir.clone(),
            company_config: sources.company_config.clone(),
            checkpoints_dir: sources.checkpoints_dir.clone(),
            verifier: None,
            server: None,
            fault: None,
        }
    }

    /// The persistence component is the server database `server`
    /// (PostgreSQL): restored into a staging database and renamed into
    /// place within the journal.
    pub fn with_server_database(mut self, server: Arc<dyn ServerDatabase>) -> LiveData {
        self.database = parent_of(&self.memory_dir).join(backup_core::path::PGDUMP_FILE);
        self.server = Some(server);
        self
    }

    fn server(&self) -> Option<&dyn ServerDatabase> {
        self.server.as_deref()
    }

    /// Fault injection for tests of the rollback: the swap fails, as a disk
    /// error would, after `renames` renames.
    pub fn fail_swap_after(self, renames: usize) -> LiveData {
        self.with_fault(SwapFault::FailBefore(renames))
    }

    /// Fault injection for the crash tests (never set outside them).
    pub fn with_fault(mut self, fault: SwapFault) -> LiveData {
        self.fault = Some(fault);
        self
    }

    /// Checks staged SQLite databases with `verifier` before swapping.
    pub fn with_verifier(mut self, verifier: Arc<dyn DatabaseVerifier>) -> LiveData {
        self.verifier = Some(verifier);
        self
    }

    /// The configured path of a component.
    fn configured(&self, c: Component) -> &Path {
        match c {
            Component::Persistence => &self.database,
            Component::Memory => &self.memory_dir,
            Component::Config => &self.company_config,
            Component::Checkpoints => &self.checkpoints_dir,
        }
    }

    /// Where a component's data really is: a root that is a symlink (to
    /// another disk, say) is followed, so that the restore stages next to
    /// the target (same filesystem) and swaps the target, leaving the link
    /// as it is.
    fn live(&self, c: Component) -> PathBuf {
        resolve_link(self.configured(c))
    }

    fn journal_path(&self) -> PathBuf {
        parent_of(&self.database).join(JOURNAL)
    }

    /// The live paths a component occupies: the database has companions.
    fn live_items(&self, c: Component) -> Vec<PathBuf> {
        let main = self.live(c);
        if c == Component::Persistence {
            with_companions(&main)
        } else {
            vec![main]
        }
    }
}

/// The reason holds the OS error's text, so it is not also chained as the
/// source (which would print it twice).
fn source_err(c: Component, path: &Path, e: io::Error) -> Error {
    Error::Source {
        component: c,
        path: path.display().to_string(),
        reason: fsio::describe(&e),
        source: None,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("restore task: {e}")))?
}

#[async_trait]
impl RestoreTarget for LiveData {
    fn live_path(&self, component: Component) -> String {
        self.configured(component).display().to_string()
    }

    async fn is_present(&self, component: Component) -> bool {
        if let (Component::Persistence, Some(server)) = (component, self.server.clone()) {
            return tokio::task::spawn_blocking(move || server.exists(server.name()))
                .await
                .is_ok_and(|found| found.unwrap_or(true));
        }
        tokio::fs::symlink_metadata(self.live(component))
            .await
            .is_ok()
    }

    async fn check_not_in_use(&self, components: &[Component]) -> Result<()> {
        let me = self.clone();
        let components = components.to_vec();
        blocking(move || {
            let mut open = None;
            for c in components {
                if let (Component::Persistence, Some(server)) = (c, me.server()) {
                    // Sessions on the live database, and the privilege to
                    // create the staging one: before anything is read.
                    server.check_restorable()?;
                    continue;
                }
                let open = open.get_or_insert_with(crate::in_use::OpenFiles::scan);
                if open.is_empty() {
                    continue;
                }
                let mut holder = open.holder_of(&me.live_items(c));
                if holder.is_none() && c == Component::Memory && me.memory_dir.is_dir() {
                    holder = sqlite_holder(&me.memory_dir, open)
                        .map_err(|e| source_err(c, &me.memory_dir, e))?;
                }
                if let Some(holder) = holder {
                    return Err(Error::InUse {
                        component: c,
                        path: holder.path.display().to_string(),
                        holder: holder.to_string(),
                    });
                }
            }
            Ok(())
        })
        .await
    }

    async fn content_check(&self, manifest: &Manifest) -> Result<Box<dyn ContentCheck>> {
        // Next to the live data when there is a data directory (it has room
        // for the database); else the temp directory (a host that only
        // verifies backups).
        let data_dir = parent_of(&self.live(Component::Persistence)).to_path_buf();
        let near = if data_dir.is_dir() {
            data_dir
        } else {
            std::env::temp_dir()
        };
        Ok(Box::new(crate::ScratchCheck::new(
            &near,
            self.verifier.clone(),
            manifest,
        )?))
    }

    async fn stage(
        &self,
        manifest: &Manifest,
        components: &[Component],
    ) -> Result<Box<dyn Staging>> {
        let me = self.clone();
        let comps = components.to_vec();
        let recorded = manifest.clone();
        let (roots, inside, filesystems) = blocking(move || {
            let manifest = recorded;
            let (mut roots, mut inside) = (Vec::new(), Vec::new());
            for c in comps {
                let live = me.live(c);
                let mut staged = sibling(&live, STAGED);
                if is_mount_point(&live) {
                    // Refused or handled here, before anything is touched
                    // (no safety backup yet).
                    match c {
                        Component::Persistence | Component::Config => {
                            return Err(Error::Source {
                                component: c,
                                path: live.display().to_string(),
                                reason: "is a mount point (a bind-mounted file), which a restore cannot replace atomically; mount its directory instead, or restore it by hand from `synthorg backup export`".into(),
                                source: None,
                            });
                        }
                        Component::Memory | Component::Checkpoints => {
                            staged = live.join(INSIDE_STAGED);
                            inside.push(c);
                        }
                    }
                }
                // A data directory that does not exist yet gets the usual
                // mode (umask), not the backup store's private 0700, and
                // the owner the backup recorded for the component (as root
                // into an empty location): the app must be able to create
                // its database's -wal and -shm next to it.
                let parent = parent_of(&live).to_path_buf();
                if !parent.exists() {
                    std::fs::create_dir_all(&parent).map_err(|e| source_err(c, &live, e))?;
                    set_owner(&parent, recorded_owner(&manifest, c)).map_err(|e| source_err(c, &parent, e))?;
                }
                fsio::remove_any(&staged).map_err(|e| source_err(c, &staged, e))?;
                if matches!(c, Component::Memory | Component::Checkpoints) {
                    fsio::create_dir_private(&staged).map_err(|e| source_err(c, &staged, e))?;
                }
                roots.push((c, staged));
            }
            let checked = staging_filesystems(&roots)
                .and_then(|filesystems| check_room(&manifest, &filesystems).map(|()| filesystems));
            let filesystems = match checked {
                Ok(filesystems) => filesystems,
                Err(e) => {
                    for (c, staged) in &roots {
                        fsio::remove_any(staged).map_err(|e| source_err(*c, staged, e))?;
                    }
                    return Err(e);
                }
            };
            Ok((roots, inside, filesystems))
        })
        .await?;
        let live_roots = roots.iter().map(|(c, _)| (*c, self.live(*c))).collect();
        let filesystems: Vec<(Component, PathBuf)> = filesystems
            .into_iter()
            .map(|fs| (fs.component, fs.dir))
            .collect();
        let flusher = writer::Flusher::start(&filesystems)?;
        Ok(Box::new(FsStaging {
            live: self.clone(),
            manifest: manifest.clone(),
            live_roots,
            roots,
            inside,
            dir_modes: Vec::new(),
            db_staging: None,
            writers: (0..backup_core::compress::parallelism().clamp(1, 4))
                .map(|_| StageWriter::start())
                .collect::<Result<_>>()?,
            current: None,
            db_check: None,
            filesystems,
            flusher: Some(flusher),
            flushing: None,
            memory_dbs: Vec::new(),
        }))
    }

    async fn preserve(
        &self,
        components: &[Component],
        dest: &Path,
    ) -> Result<Option<backup_core::ports::Preserved>> {
        self.preserve_into(components, dest).await
    }

    async fn recover(&self) -> Result<Vec<String>> {
        let me = self.clone();
        blocking(move || {
            let journal_path = me.journal_path();
            let mut done = Vec::new();
            let err = |e: io::Error| source_err(Component::Persistence, &journal_path, e);
            if exists(&journal_path) {
                let bytes = std::fs::read(&journal_path).map_err(err)?;
                let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| Error::Source {
                    component: Component::Persistence,
                    path: journal_path.display().to_string(),
                    reason: format!("restore journal is unreadable: {e}; resolve by hand before starting"),
                    source: None,
                })?;
                match journal.state {
                    JournalState::Swapping => {
                        roll_back(&journal, me.server()).map_err(err)?;
                        remove_cleanup(&journal).map_err(err)?;
                        std::fs::remove_file(&journal_path).map_err(err)?;
                        fsio::fsync_dir(parent_of(&journal_path)).map_err(err)?;
                        let msg = format!("rolled back the interrupted restore of {}: live data is as before it", journal.backup_id);
                        tracing::warn!("{msg}");
                        done.push(msg);
                    }
                    JournalState::Committed => {
                        finish(&journal, &journal_path, me.server()).map_err(err)?;
                        let msg = format!("finished the interrupted restore of {}: live data is the restored backup", journal.backup_id);
                        tracing::warn!("{msg}");
                        done.push(msg);
                    }
                }
            }
            // Scratch copies of interrupted snapshots (SQLite VACUUM INTO
            // targets) sit next to the sources; no snapshot runs while we
            // hold the lock. So may the temp file of a journal update that
            // was never renamed into place: the journal on disk (or its
            // absence) is what happened, the temp file is nothing.
            let journal_temp = format!(".{JOURNAL}{}", fsio::TEMP_MARKER);
            let mut parents: Vec<PathBuf> = Component::ALL
                .iter()
                .flat_map(|c| [parent_of(me.configured(*c)).to_path_buf(), parent_of(&me.live(*c)).to_path_buf()])
                .collect();
            parents.sort();
            parents.dedup();
            for dir in parents {
                let Ok(entries) = std::fs::read_dir(dir) else { continue };
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with(SCRATCH_PREFIX) || name.starts_with(&journal_temp) {
                        let path = entry.path();
                        fsio::remove_any(&path).map_err(|e| source_err(Component::Persistence, &path, e))?;
                        tracing::warn!(path = %path.display(), "removed snapshot scratch leftover");
                        done.push(format!("removed {}", path.display()));
                    }
                }
            }
            // Staging databases of an interrupted restore are garbage, not
            // live data: failing to list or drop them (a role that cannot
            // reach the maintenance database) only leaves them for later.
            if let Some(server) = me.server() {
                match server.staging_leftovers() {
                    Ok(names) => {
                        for name in names {
                            match server.drop_database(&name) {
                                Ok(()) => {
                                    tracing::warn!(database = %name, "dropped the staging database of an interrupted restore");
                                    done.push(format!("dropped database {name}"));
                                }
                                Err(e) => tracing::warn!(database = %name, error = %e, "cannot drop the staging database of an interrupted restore"),
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot look for staging databases of interrupted restores"),
                }
            }
            for c in Component::ALL {
                let live = me.live(c);
                let inside = [live.join(INSIDE_STAGED), live.join(INSIDE_ASIDE)];
                let inside = if live.is_dir() { inside.to_vec() } else { Vec::new() };
                for item in me.live_items(c) {
                    for leftover in [sibling(&item, STAGED), sibling(&item, ASIDE)].into_iter().chain(inside.clone()) {
                        if exists(&leftover) {
                            fsio::remove_any(&leftover).map_err(|e| source_err(c, &leftover, e))?;
                            tracing::warn!(path = %leftover.display(), "removed restore leftover");
                            done.push(format!("removed {}", leftover.display()));
                        }
                    }
                }
            }
            Ok(done)
        })
        .await
    }
}
