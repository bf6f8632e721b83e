//! The one place that chooses adapters: builds a [`BackupService`] from the
//! configuration.

use std::sync::Arc;

use adapters_fs::{DirSource, FileLock, LiveData, LocalDir, SystemClock};
use adapters_sqlite::{PgDatabase, PgServer, PgSource, SqliteSnapshotter, SqliteSource};
use backup_core::ports::{
    BackupStore, Clock, ComponentSource, NoNotifier, NoQuiesce, OperationLock, Quiesce,
};
use backup_core::safety_pool::SafetyPool;
use backup_core::{BackupConfig, BackupService, Component, Ports, Result, RunningApp, Settings};

/// Builds the service for `config`: the S3 target of `backup.s3` when
/// present, else the local-disk target at `backup.path`,
/// the SQLite source for persistence, directory sources (with consistent
/// copies of SQLite files) for memory, config and checkpoints, and
/// `quiesce` around the memory snapshot.
///
/// # Errors
/// `Store` when the backup directory cannot be created or the S3 client
/// cannot be configured.
pub fn build_service(
    config: &BackupConfig,
    app: RunningApp,
    quiesce: Option<Arc<dyn Quiesce>>,
) -> Result<BackupService> {
    build_service_with(config, app, quiesce, live_data(config))
}

/// The restore target of `config`: the live data at the configured
/// sources, with SQLite checks, and the PostgreSQL database when
/// `sources.database_url` is set.
pub fn live_data(config: &BackupConfig) -> LiveData {
    let live = LiveData::new(&config.sources).with_verifier(Arc::new(SqliteSnapshotter));
    match PgDatabase::configured(&config.sources) {
        Some(db) => live.with_server_database(Arc::new(PgServer::new(db))),
        None => live,
    }
}

/// As [`build_service`], with the restore target given (e.g. one with
/// fault injection for tests).
///
/// # Errors
/// As [`build_service`].
pub fn build_service_with(
    config: &BackupConfig,
    app: RunningApp,
    quiesce: Option<Arc<dyn Quiesce>>,
    live: LiveData,
) -> Result<BackupService> {
    build_service_with_clock(config, app, quiesce, live, Arc::new(SystemClock))
}

/// As [`build_service_with`], with the clock given (tests of clock jumps).
///
/// # Errors
/// As [`build_service`].
pub fn build_service_with_clock(
    config: &BackupConfig,
    app: RunningApp,
    quiesce: Option<Arc<dyn Quiesce>>,
    live: LiveData,
    clock: Arc<dyn Clock>,
) -> Result<BackupService> {
    let (store, lock): (Arc<dyn BackupStore>, Arc<dyn OperationLock>) = match &config.s3 {
        Some(s3) => {
            let (store, lock) = adapters_s3::connect(s3)?;
            // A restore's safety backup stays on this machine, at
            // `backup.path` (see `SafetyPool`).
            let pool = LocalDir::lazy_store(&config.path);
            let store = SafetyPool::new(Arc::new(store), Arc::new(pool));
            (Arc::new(store), Arc::new(lock))
        }
        None => {
            let store = LocalDir::store(&config.path)?;
            let lock = FileLock::in_dir(store.space().root());
            (Arc::new(store), Arc::new(lock))
        }
    };
    let sqlite = Arc::new(SqliteSnapshotter);
    // A source for every component, included or not: a restore's safety
    // backup must be able to cover any component it replaces.
    let sources: Vec<Arc<dyn ComponentSource>> = Component::ALL
        .iter()
        .map(|c| -> Arc<dyn ComponentSource> {
            match c {
                Component::Persistence => match PgDatabase::configured(&config.sources) {
                    // Its scratch dump goes into the data directory.
                    Some(db) => Arc::new(PgSource::new(
                        db,
                        config
                            .sources
                            .memory_dir
                            .parent()
                            .unwrap_or(std::path::Path::new("."))
                            .join(backup_core::path::PGDUMP_FILE),
                    )),
                    None => Arc::new(SqliteSource::new(&config.sources.database)),
                },
                Component::Memory => Arc::new(
                    DirSource::dir(Component::Memory, &config.sources.memory_dir)
                        .with_snapshotter(sqlite.clone()),
                ),
                Component::Config => Arc::new(DirSource::file(
                    Component::Config,
                    &config.sources.company_config,
                )),
                Component::Checkpoints => Arc::new(DirSource::dir(
                    Component::Checkpoints,
                    &config.sources.checkpoints_dir,
                )),
            }
        })
        .collect();
    let mut settings = Settings::from(config);
    if let Some(file) = config
        .encryption
        .as_ref()
        .and_then(|e| e.identity_file.as_deref())
    {
        settings.identity = adapters_fs::load_identity(file);
    }
    BackupService::new(
        settings,
        Ports {
            store,
            lock,
            sources,
            quiesce: quiesce.unwrap_or_else(|| match &config.quiesce {
                Some(commands) => Arc::new(crate::CommandQuiesce::new(commands)),
                None => Arc::new(NoQuiesce),
            }),
            clock,
            restore_target: Arc::new(live),
            notifier: if config.notify.is_enabled() {
                Arc::new(crate::HookNotifier::new(&config.notify))
            } else {
                Arc::new(NoNotifier)
            },
        },
        app,
    )
}
