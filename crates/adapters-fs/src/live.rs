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

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use backup_core::config::{SourcesConfig, check_yaml};
use backup_core::manifest::{DirEntry, FileEntry, SymlinkEntry};
use backup_core::ports::{
    ContentCheck, DatabaseVerifier, EntrySink, RestoreTarget, SCRATCH_PREFIX, Staging,
};
use backup_core::{ArchivePath, Component, Error, Manifest, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::dir_source::contained_target;
use crate::fsio::{self, DIR_MODE, FILE_MODE};

const JOURNAL: &str = ".synthorg-restore.journal";

const STAGED: &str = ".restore-staged";
const ASIDE: &str = ".restore-aside";
/// Staging and aside directories *inside* a component directory that is a
/// mount point (a Docker volume, say), which cannot be renamed: its
/// contents are swapped instead.
const INSIDE_STAGED: &str = ".synthorg-restore-staged";
const INSIDE_ASIDE: &str = ".synthorg-restore-aside";
/// Largest company config accepted when verifying a staged one.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// The live data directory layout, from `backup.sources`.
#[derive(Debug, Clone)]
pub struct LiveData {
    database: PathBuf,
    memory_dir: PathBuf,
    company_config: PathBuf,
    checkpoints_dir: PathBuf,
    verifier: Option<Arc<dyn DatabaseVerifier>>,
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
            fault: None,
        }
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

/// A staged SQLite file is a consistent copy taken through SQLite, complete
/// by itself. Backups made before 1.1 also stored the live file's `-wal`,
/// `-shm` and `-journal` raw next to it; SQLite would replay those over
/// the copy and corrupt it, so they are removed from staging (the copy is
/// the backed-up state).
fn drop_stale_companions(c: Component, file: &Path) -> Result<()> {
    for stale in with_companions(file).into_iter().skip(1) {
        if exists(&stale) {
            fsio::remove_any(&stale).map_err(|e| source_err(c, &stale, e))?;
            tracing::warn!(path = %stale.display(),
                "removed a stale SQLite companion stored next to its consistent copy");
        }
    }
    Ok(())
}

/// A SQLite file and its `-wal`, `-shm` and `-journal` companions.
fn with_companions(main: &Path) -> Vec<PathBuf> {
    let mut items = vec![main.to_path_buf()];
    for suffix in crate::dir_source::SQLITE_COMPANIONS {
        let mut p = main.as_os_str().to_owned();
        p.push(suffix);
        items.push(PathBuf::from(p));
    }
    items
}

/// `path`, or what it points to when it is a symlink (followed to the end;
/// a dangling link resolves to its target's path).
fn resolve_link(path: &Path) -> PathBuf {
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) {
        return path.to_path_buf();
    }
    std::fs::canonicalize(path).unwrap_or_else(|_| match std::fs::read_link(path) {
        Ok(target) => parent_of(path).join(target),
        Err(_) => path.to_path_buf(),
    })
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `<dir>/.<name><suffix>`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}{suffix}"))
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
        .map_err(|e| Error::Cancelled(format!("restore task: {e}")))?
}

/// The restore journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    backup_id: String,
    state: JournalState,
    moves: Vec<Move>,
    /// Directories of a swap inside a mount point, removed at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cleanup: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum JournalState {
    Swapping,
    Committed,
}

/// One live item and where it goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Move {
    /// The component the item belongs to (for error messages).
    #[serde(default = "default_component")]
    component: Component,
    live: PathBuf,
    /// Where the live item is moved aside, if it existed before the swap.
    aside: Option<PathBuf>,
    /// The staged item that replaces it (only for the component's main path).
    staged: Option<PathBuf>,
}

fn default_component() -> Component {
    Component::Persistence
}

/// A failed step of the swap: which component, which item.
#[derive(Debug)]
struct SwapError {
    component: Component,
    path: PathBuf,
    error: io::Error,
}

impl SwapError {
    fn at(component: Component, path: &Path) -> impl FnOnce(io::Error) -> SwapError + '_ {
        move |error| SwapError {
            component,
            path: path.to_path_buf(),
            error,
        }
    }

    fn into_error(self) -> Error {
        source_err(self.component, &self.path, self.error)
    }
}

fn write_journal(path: &Path, journal: &Journal) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(journal).map_err(io::Error::other)?;
    let temp = fsio::temp_path_for(path);
    let guard = fsio::RemoveOnDrop::new(temp.clone());
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&temp, path)?;
    guard.disarm();
    fsio::fsync_dir(parent_of(path))
}

fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

fn rename_synced(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    fsio::fsync_dir(parent_of(to))
}

/// Performs the journaled swap; on a failure midway, rolls back. The
/// error names the component and the item whose move failed.
fn swap(journal_path: &Path, journal: &Journal, fault: Option<SwapFault>) -> Result<(), SwapError> {
    let at_journal = || SwapError::at(Component::Persistence, journal_path);
    // Aside names must be free before the journal claims them: anything
    // there is a leftover (we hold the operation lock), and rolling back
    // must never mistake it for the live data it moved.
    for m in &journal.moves {
        if let Some(aside) = &m.aside {
            fsio::remove_any(aside).map_err(SwapError::at(m.component, aside))?;
        }
    }
    write_journal(journal_path, journal).map_err(at_journal())?;
    let mut renames = 0usize;
    let mut rename = |m: &Move, from: &Path, to: &Path| -> Result<(), SwapError> {
        if fault == Some(SwapFault::FailBefore(renames)) {
            return Err(SwapError::at(m.component, from)(io::Error::other(
                "injected fault: swap interrupted",
            )));
        }
        rename_synced(from, to).map_err(SwapError::at(m.component, from))?;
        if fault == Some(SwapFault::AbortAfter(renames)) {
            tracing::error!(
                rename = renames,
                "injected fault: aborting the process inside the swap"
            );
            std::process::abort();
        }
        renames += 1;
        Ok(())
    };
    let mut forward = || -> Result<(), SwapError> {
        for m in &journal.moves {
            if let Some(aside) = &m.aside {
                rename(m, &m.live, aside)?;
            }
            if let Some(staged) = &m.staged {
                rename(m, staged, &m.live)?;
            }
        }
        Ok(())
    };
    if let Err(e) = forward() {
        roll_back(journal).map_err(at_journal())?;
        remove_cleanup(journal).map_err(at_journal())?;
        std::fs::remove_file(journal_path).map_err(at_journal())?;
        fsio::fsync_dir(parent_of(journal_path)).map_err(at_journal())?;
        return Err(e);
    }
    let committed = Journal {
        state: JournalState::Committed,
        ..journal.clone()
    };
    write_journal(journal_path, &committed).map_err(at_journal())?;
    finish(&committed, journal_path).map_err(at_journal())
}

/// Removes the directories of a swap inside a mount point (idempotent).
fn remove_cleanup(journal: &Journal) -> io::Result<()> {
    for dir in &journal.cleanup {
        fsio::remove_any(dir)?;
        fsio::fsync_dir(parent_of(dir))?;
    }
    Ok(())
}

/// Whether `path` is a mount point: on another device than its parent, or
/// listed in `/proc/self/mountinfo` (bind mounts of the same device).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let parent = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    if let Some(parent) = &parent
        && std::fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev())
    {
        return true;
    }
    let Ok(canonical) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount| Path::new(&unescape_mountinfo(mount)) == canonical)
}

/// Mount points in mountinfo escape space, tab, newline and backslash as
/// three octal digits.
fn unescape_mountinfo(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Puts every live item back where it was (idempotent).
fn roll_back(journal: &Journal) -> io::Result<()> {
    for m in journal.moves.iter().rev() {
        match &m.aside {
            Some(aside) if exists(aside) => {
                if exists(&m.live) {
                    // The staged item took its place: move it back to staging.
                    let back = m.staged.clone().unwrap_or_else(|| sibling(&m.live, STAGED));
                    fsio::remove_any(&back)?;
                    rename_synced(&m.live, &back)?;
                }
                rename_synced(aside, &m.live)?;
            }
            // Never moved aside: the live item is untouched.
            Some(_) => {}
            None => {
                // Nothing lived here before: whatever is here now was staged.
                if m.staged.is_some() && exists(&m.live) {
                    fsio::remove_any(&m.live)?;
                    fsio::fsync_dir(parent_of(&m.live))?;
                }
            }
        }
    }
    for m in &journal.moves {
        if let Some(staged) = &m.staged {
            fsio::remove_any(staged)?;
        }
    }
    Ok(())
}

/// Removes the old copies after a committed swap (idempotent).
fn finish(journal: &Journal, journal_path: &Path) -> io::Result<()> {
    for m in &journal.moves {
        if let Some(aside) = &m.aside {
            fsio::remove_any(aside)?;
        }
        if let Some(staged) = &m.staged {
            fsio::remove_any(staged)?;
        }
        fsio::fsync_dir(parent_of(&m.live))?;
    }
    remove_cleanup(journal)?;
    std::fs::remove_file(journal_path)?;
    fsio::fsync_dir(parent_of(journal_path))
}

#[async_trait]
impl RestoreTarget for LiveData {
    fn live_path(&self, component: Component) -> String {
        self.configured(component).display().to_string()
    }

    async fn is_present(&self, component: Component) -> bool {
        tokio::fs::symlink_metadata(self.live(component))
            .await
            .is_ok()
    }

    async fn check_not_in_use(&self, components: &[Component]) -> Result<()> {
        let me = self.clone();
        let components = components.to_vec();
        blocking(move || {
            for c in components {
                let mut files = me.live_items(c);
                if c == Component::Memory && me.memory_dir.is_dir() {
                    let candidates = sqlite_candidates(&me.memory_dir)
                        .map_err(|e| source_err(c, &me.memory_dir, e))?;
                    for file in candidates {
                        if read_header(&file).is_ok_and(|h| h.starts_with(b"SQLite format 3\0")) {
                            files.extend(with_companions(&file));
                        }
                    }
                }
                if let Some(holder) = crate::in_use::find_holder(&files) {
                    tracing::error!(component = %c, path = %holder.path.display(), holder = %holder,
                        "restore refused: live data is open in a process");
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
        let (roots, inside) = blocking(move || {
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
            Ok((roots, inside))
        })
        .await?;
        Ok(Box::new(FsStaging {
            live: self.clone(),
            manifest: manifest.clone(),
            roots,
            inside,
            current: None,
            dir_modes: Vec::new(),
        }))
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
                        roll_back(&journal).map_err(err)?;
                        remove_cleanup(&journal).map_err(err)?;
                        std::fs::remove_file(&journal_path).map_err(err)?;
                        fsio::fsync_dir(parent_of(&journal_path)).map_err(err)?;
                        let msg = format!("rolled back the interrupted restore of {}: live data is as before it", journal.backup_id);
                        tracing::warn!("{msg}");
                        done.push(msg);
                    }
                    JournalState::Committed => {
                        finish(&journal, &journal_path).map_err(err)?;
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

/// A staging area being filled.
struct FsStaging {
    live: LiveData,
    manifest: Manifest,
    roots: Vec<(Component, PathBuf)>,
    /// Components swapped inside their mount point, entry by entry.
    inside: Vec<Component>,
    current: Option<(tokio::fs::File, PathBuf, Component)>,
    dir_modes: Vec<(PathBuf, u32)>,
}

impl FsStaging {
    fn root(&self, c: Component) -> Result<&Path> {
        self.roots
            .iter()
            .find(|(rc, _)| *rc == c)
            .map(|(_, p)| p.as_path())
            .ok_or_else(|| self.refuse(c.archive_root(), "component is not being restored"))
    }

    fn refuse(&self, path: &str, reason: &str) -> Error {
        Error::Integrity {
            id: self.manifest.id.to_string(),
            path: path.to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// The owner a restored item gets: that of the live item it replaces,
    /// else the one recorded in the backup, else that of the live
    /// component. Restoring as root must not leave the app (running as
    /// its own user) unable to write its data.
    fn owner_for(
        &self,
        c: Component,
        path: &ArchivePath,
        recorded: Option<(u32, u32)>,
    ) -> Option<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        let root = self.live.live(c);
        let live = match c {
            Component::Persistence | Component::Config => root.clone(),
            Component::Memory | Component::Checkpoints => {
                let mut p = root.clone();
                p.extend(path.segments().skip(1));
                p
            }
        };
        let owner_of = |p: &Path| {
            std::fs::symlink_metadata(p)
                .ok()
                .map(|m| (m.uid(), m.gid()))
        };
        owner_of(&live).or(recorded).or_else(|| owner_of(&root))
    }

    /// Where an archive path goes in staging.
    fn staged_path(&self, path: &ArchivePath) -> Result<(Component, PathBuf)> {
        let c = path
            .component()
            .ok_or_else(|| self.refuse(path.as_str(), "outside every component"))?;
        let root = self.root(c)?.to_path_buf();
        let mut segments = path.segments().skip(1);
        match c {
            Component::Persistence => Ok((c, root)),
            Component::Config => match (segments.next(), segments.next()) {
                (Some(_name), None) => Ok((c, root)),
                _ => Err(self.refuse(
                    path.as_str(),
                    "config/ must hold exactly one file, the company config",
                )),
            },
            Component::Memory | Component::Checkpoints => {
                let mut p = root;
                p.extend(segments);
                Ok((c, p))
            }
        }
    }
}

#[async_trait]
impl EntrySink for FsStaging {
    async fn dir(&mut self, entry: &DirEntry) -> Result<()> {
        if entry.path.component() == Some(Component::Config) {
            return Ok(()); // the config component is staged as its one file
        }
        let (c, path) = self.staged_path(&entry.path)?;
        tokio::fs::create_dir_all(&path)
            .await
            .map_err(|e| source_err(c, &path, e))?;
        let owner = self.owner_for(c, &entry.path, entry.uid.zip(entry.gid));
        set_owner(&path, owner).map_err(|e| source_err(c, &path, e))?;
        self.dir_modes.push((path, entry.mode.unwrap_or(DIR_MODE)));
        Ok(())
    }

    async fn symlink(&mut self, entry: &SymlinkEntry) -> Result<()> {
        let (c, path) = self.staged_path(&entry.path)?;
        if contained_target(&entry.path, Path::new(&entry.target)).is_none() {
            return Err(self.refuse(entry.path.as_str(), "symlink points outside its component"));
        }
        create_symlink(&entry.target, &path)
            .await
            .map_err(|e| source_err(c, &path, e))
    }

    async fn file_start(&mut self, entry: &FileEntry) -> Result<()> {
        let (c, path) = self.staged_path(&entry.path)?;
        let file = fsio::create_new_file(&path)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => self.refuse(entry.path.as_str(), "written twice"),
                _ => source_err(c, &path, e),
            })?;
        self.current = Some((file, path, c));
        Ok(())
    }

    async fn file_data(&mut self, data: &[u8]) -> Result<()> {
        let Some((file, path, c)) = self.current.as_mut() else {
            return Err(Error::Cancelled("file data outside a file".into()));
        };
        file.write_all(data)
            .await
            .map_err(|e| source_err(*c, path, e))
    }

    async fn file_end(&mut self, entry: &FileEntry) -> Result<()> {
        let Some((file, path, c)) = self.current.take() else {
            return Err(Error::Cancelled("file end outside a file".into()));
        };
        // Staged files must be durable before the swap makes them live.
        fsio::finish_file(file, entry.mode, entry.mtime, true)
            .await
            .map_err(|e| source_err(c, &path, e))?;
        let owner = self.owner_for(c, &entry.path, entry.uid.zip(entry.gid));
        set_owner(&path, owner).map_err(|e| source_err(c, &path, e))
    }
}

#[async_trait]
impl Staging for FsStaging {
    async fn verify(&mut self) -> Result<()> {
        for (c, root) in self.roots.clone() {
            match c {
                Component::Persistence => {
                    if !exists(&root) {
                        return Err(self.refuse("synthorg.db", "missing from the backup"));
                    }
                    if let Some(v) = &self.live.verifier {
                        v.verify(c, &root, self.manifest.db_schema_version).await?;
                    }
                }
                Component::Config => {
                    if !exists(&root) {
                        return Err(
                            self.refuse("config/", "the company config is missing from the backup")
                        );
                    }
                    let text = fsio::read_capped(&root, MAX_CONFIG_BYTES as usize)
                        .await
                        .map_err(|e| source_err(c, &root, e))?;
                    let text = String::from_utf8(text)
                        .map_err(|_| self.refuse("config/", "company config is not UTF-8"))?;
                    check_yaml(&text).map_err(|e| Error::Integrity {
                        id: self.manifest.id.to_string(),
                        path: "config/".into(),
                        reason: format!("company config does not parse as YAML: {e}"),
                    })?;
                }
                Component::Memory => {
                    if let Some(v) = self.live.verifier.clone() {
                        for file in sqlite_candidates(&root).map_err(|e| source_err(c, &root, e))? {
                            let header = read_header(&file).map_err(|e| source_err(c, &file, e))?;
                            if v.handles(&header) {
                                drop_stale_companions(c, &file)?;
                                v.verify(c, &file, None).await?;
                            }
                        }
                    }
                }
                Component::Checkpoints => {}
            }
        }
        // Directory modes last (deepest first), so that read-only
        // directories did not stop their files from being written.
        let mut modes = std::mem::take(&mut self.dir_modes);
        modes.sort_by_key(|(dir, _)| std::cmp::Reverse(dir.components().count()));
        blocking(move || {
            for (dir, mode) in modes {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| source_err(Component::Memory, &dir, e))?;
            }
            Ok(())
        })
        .await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let live = self.live.clone();
        let roots = self.roots.clone();
        let inside = self.inside.clone();
        let backup_id = self.manifest.id.to_string();
        let journal_path = live.journal_path();
        let fault = live.fault;
        blocking(move || {
            let mut journal = Journal {
                backup_id,
                state: JournalState::Swapping,
                moves: Vec::new(),
                cleanup: Vec::new(),
            };
            for (c, staged) in roots {
                if inside.contains(&c) {
                    let root = live.live(c);
                    let aside = root.join(INSIDE_ASIDE);
                    let err = |p: &Path, e| source_err(c, p, e);
                    fsio::remove_any(&aside).map_err(|e| err(&aside, e))?;
                    fsio::create_dir_private(&aside).map_err(|e| err(&aside, e))?;
                    journal.moves.extend(
                        inside_moves(c, &root, &staged, &aside).map_err(|e| err(&root, e))?,
                    );
                    journal.cleanup.extend([staged, aside]);
                    continue;
                }
                for (i, item) in live.live_items(c).into_iter().enumerate() {
                    journal.moves.push(Move {
                        component: c,
                        aside: exists(&item).then(|| sibling(&item, ASIDE)),
                        staged: (i == 0).then(|| staged.clone()),
                        live: item,
                    });
                }
            }
            swap(&journal_path, &journal, fault).map_err(SwapError::into_error)
        })
        .await
    }

    async fn discard(self: Box<Self>) -> Result<()> {
        let roots = self.roots.clone();
        drop(self);
        blocking(move || {
            for (c, root) in roots {
                fsio::remove_any(&root).map_err(|e| source_err(c, &root, e))?;
            }
            Ok(())
        })
        .await
    }
}

/// The moves that swap the contents of `root` (a mount point) with those of
/// `staged` inside it: every entry of either, by name.
fn inside_moves(
    component: Component,
    root: &Path,
    staged: &Path,
    aside: &Path,
) -> io::Result<Vec<Move>> {
    let mut names = std::collections::BTreeSet::new();
    for dir in [root, staged] {
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            if name != INSIDE_STAGED && name != INSIDE_ASIDE {
                names.insert(name);
            }
        }
    }
    Ok(names
        .into_iter()
        .map(|name| {
            let live = root.join(&name);
            let from = staged.join(&name);
            Move {
                component,
                aside: exists(&live).then(|| aside.join(&name)),
                staged: exists(&from).then_some(from),
                live,
            }
        })
        .collect())
}

/// The owner the manifest recorded for a component's root item.
fn recorded_owner(manifest: &Manifest, c: Component) -> Option<(u32, u32)> {
    let root = c.archive_root();
    let file = manifest
        .files
        .iter()
        .find(|f| {
            f.path.component() == Some(c) && (f.path.as_str() == root || c == Component::Config)
        })
        .and_then(|f| f.uid.zip(f.gid));
    let dir = manifest
        .dirs
        .iter()
        .find(|d| d.path.as_str() == root.trim_end_matches('/'))
        .and_then(|d| d.uid.zip(d.gid));
    file.or(dir)
}

/// Gives `path` the owner `owner` when it has another one. Without the
/// right to (not root), the item stays ours: the only owner we can give.
fn set_owner(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    let meta = std::fs::symlink_metadata(path)?;
    if (meta.uid(), meta.gid()) == (uid, gid) {
        return Ok(());
    }
    match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            tracing::debug!(path = %path.display(), uid, gid, "cannot give the restored item its owner (not root)");
            Ok(())
        }
        other => other,
    }
}

/// Creates a symlink (and its parent directories).
pub(crate) async fn create_symlink(target: &str, path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::symlink(target, path).await
}

fn read_header(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(100);
    std::fs::File::open(path)?.take(100).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Regular files under `root`.
fn sqlite_candidates(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}
