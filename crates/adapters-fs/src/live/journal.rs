//! The restore journal and the swap it records: write it, move every
//! item, commit or roll back; every step idempotent (see `live.rs`).

use super::*;

/// The restore journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Journal {
    pub(super) backup_id: String,
    pub(super) state: JournalState,
    pub(super) moves: Vec<Move>,
    /// Directories of a swap inside a mount point, removed at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) cleanup: Vec<PathBuf>,
    /// The server database swapped by renames (PostgreSQL), first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) db: Option<DbMove>,
}

/// The live server database renamed aside and the staged one renamed into
/// its place; the aside one is dropped when the swap finishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DbMove {
    pub(super) live: String,
    pub(super) aside: String,
    pub(super) staged: String,
}

/// The server the journal's database move needs.
pub(super) fn server_for<'a>(
    journal: &Journal,
    server: Option<&'a dyn ServerDatabase>,
) -> io::Result<Option<&'a dyn ServerDatabase>> {
    match (&journal.db, server) {
        (None, _) => Ok(None),
        (Some(_), Some(s)) => Ok(Some(s)),
        (Some(m), None) => Err(io::Error::other(format!(
            "the restore journal renames PostgreSQL database {} but backup.sources.database_url is not set; set it to the same server and run `synthorg recover`",
            m.live
        ))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum JournalState {
    Swapping,
    Committed,
}

/// One live item and where it goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Move {
    /// The component the item belongs to (for error messages).
    #[serde(default = "default_component")]
    pub(super) component: Component,
    pub(super) live: PathBuf,
    /// Where the live item is moved aside, if it existed before the swap.
    pub(super) aside: Option<PathBuf>,
    /// The staged item that replaces it (only for the component's main path).
    pub(super) staged: Option<PathBuf>,
    /// The aside is in a safety backup's directory: kept when the swap
    /// finishes (the backup is published then).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) keep: bool,
}

pub(super) fn default_component() -> Component {
    Component::Persistence
}

/// A failed step of the swap: which component, which item.
#[derive(Debug)]
pub(super) struct SwapError {
    pub(super) component: Component,
    pub(super) path: PathBuf,
    pub(super) error: io::Error,
}

impl SwapError {
    pub(super) fn at(
        component: Component,
        path: &Path,
    ) -> impl FnOnce(io::Error) -> SwapError + '_ {
        move |error| SwapError {
            component,
            path: path.to_path_buf(),
            error,
        }
    }

    pub(super) fn into_error(self) -> Error {
        source_err(self.component, &self.path, self.error)
    }
}

pub(super) fn write_journal(path: &Path, journal: &Journal) -> io::Result<()> {
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

pub(super) fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

pub(super) fn rename_synced(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    fsio::fsync_dir(parent_of(to))
}

/// Performs the journaled swap; on a failure midway, rolls back. The
/// error names the component and the item whose move failed.
pub(super) fn swap(
    journal_path: &Path,
    journal: &Journal,
    fault: Option<SwapFault>,
    server: Option<&dyn ServerDatabase>,
) -> Result<(), SwapError> {
    let at_journal = || SwapError::at(Component::Persistence, journal_path);
    let server = server_for(journal, server).map_err(at_journal())?;
    // Aside names must be free before the journal claims them: anything
    // there is a leftover (we hold the operation lock), and rolling back
    // must never mistake it for the live data it moved.
    for m in &journal.moves {
        if let Some(aside) = m.aside.as_ref().filter(|_| !m.keep) {
            fsio::remove_any(aside).map_err(SwapError::at(m.component, aside))?;
        }
    }
    write_journal(journal_path, journal).map_err(at_journal())?;
    let mut renames = 0usize;
    // Every rename, of a file or a database, counts for fault injection.
    let mut step = |component: Component,
                    from: &Path,
                    run: &mut dyn FnMut() -> io::Result<()>|
     -> Result<(), SwapError> {
        if fault == Some(SwapFault::FailBefore(renames)) {
            return Err(SwapError::at(component, from)(io::Error::other(
                "injected fault: swap interrupted",
            )));
        }
        run().map_err(SwapError::at(component, from))?;
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
        if let (Some(db), Some(server)) = (&journal.db, server) {
            let name = |n: &str| PathBuf::from(format!("database {n}"));
            step(Component::Persistence, &name(&db.live), &mut || {
                server.rename(&db.live, &db.aside)
            })?;
            step(Component::Persistence, &name(&db.staged), &mut || {
                server.rename(&db.staged, &db.live)
            })?;
        }
        let mut rename = |m: &Move, from: &Path, to: &Path| {
            step(m.component, from, &mut || rename_synced(from, to))
        };
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
        roll_back(journal, server).map_err(at_journal())?;
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
    finish(&committed, journal_path, server).map_err(at_journal())
}

/// Removes the directories of a swap inside a mount point (idempotent).
pub(super) fn remove_cleanup(journal: &Journal) -> io::Result<()> {
    for dir in &journal.cleanup {
        fsio::remove_any(dir)?;
        fsio::fsync_dir(parent_of(dir))?;
    }
    Ok(())
}

/// Puts every live item back where it was (idempotent).
pub(super) fn roll_back(journal: &Journal, server: Option<&dyn ServerDatabase>) -> io::Result<()> {
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
    if let (Some(db), Some(server)) = (&journal.db, server_for(journal, server)?) {
        if server.exists(&db.aside)? {
            if server.exists(&db.live)? {
                // The staged database took its place: back to staging.
                server.drop_database(&db.staged)?;
                server.rename(&db.live, &db.staged)?;
            }
            server.rename(&db.aside, &db.live)?;
        }
        server.drop_database(&db.staged)?;
    }
    Ok(())
}

/// Removes the old copies after a committed swap (idempotent).
pub(super) fn finish(
    journal: &Journal,
    journal_path: &Path,
    server: Option<&dyn ServerDatabase>,
) -> io::Result<()> {
    if let (Some(db), Some(server)) = (&journal.db, server_for(journal, server)?) {
        // Committed: the staged database is live (a kill between the two
        // renames is rolled back, never committed).
        server.drop_database(&db.aside)?;
        server.drop_database(&db.staged)?;
    }
    // The replaced items not kept by a safety backup, all at once.
    let replaced: Vec<PathBuf> = journal
        .moves
        .iter()
        .filter(|m| !m.keep)
        .filter_map(|m| m.aside.clone())
        .collect();
    fsio::remove_all_parallel(&replaced)?;
    for m in &journal.moves {
        if let Some(kept) = m.aside.as_ref().filter(|_| m.keep) {
            fsio::fsync_dir(parent_of(kept))?;
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

/// The moves that swap the contents of `root` (a mount point) with those of
/// `staged` inside it: every entry of either, by name.
pub(super) fn inside_moves(
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
                keep: false,
            }
        })
        .collect())
}
