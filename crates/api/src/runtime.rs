//! [`BackupRuntime`]: the host lifecycle: recover and back up at start-up
//! (before the host serves), back up on a schedule in the background, and
//! back up synchronously on shutdown. A backup failure is logged at ERROR
//! and never stops the host.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backup_core::ports::Clock;
use backup_core::{BackupConfig, BackupId, Error, Result, Trigger};
use tokio::sync::watch;

use crate::state::AdminState;

/// What the runtime does, from `backup:`.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `backup.enabled`: without it, no automatic backups at all.
    pub enabled: bool,
    /// Back up after recovery, before the host serves.
    pub on_startup: bool,
    /// Back up synchronously on shutdown.
    pub on_shutdown: bool,
    /// Time between scheduled backups.
    pub schedule: Duration,
    /// Longest the shutdown backup may take, and longest the pre-migration
    /// backup waits for another running operation (a scheduled backup, an
    /// API request) before it fails with `Busy`.
    pub shutdown_timeout: Duration,
    /// Time between verifications of the newest backup; `None`: off.
    pub verify_every: Option<Duration>,
    /// How often the runtime checks whether backups are overdue (and sends
    /// `backup.overdue` once per overdue period).
    pub overdue_check: Duration,
}

impl From<&BackupConfig> for RuntimeConfig {
    fn from(c: &BackupConfig) -> Self {
        RuntimeConfig {
            enabled: c.enabled,
            on_startup: c.on_startup,
            on_shutdown: c.on_shutdown,
            schedule: Duration::from_secs(u64::from(c.schedule_hours) * 3600),
            shutdown_timeout: Duration::from_secs(u64::from(c.shutdown_timeout_secs)),
            verify_every: (c.verify_every_hours > 0)
                .then(|| Duration::from_secs(u64::from(c.verify_every_hours) * 3600)),
            overdue_check: Duration::from_secs(300),
        }
    }
}

/// The running lifecycle. Start it once, before the host accepts work.
#[derive(Debug)]
pub struct BackupRuntime {
    state: AdminState,
    config: RuntimeConfig,
    stop: watch::Sender<bool>,
    scheduler: Option<tokio::task::JoinHandle<()>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl BackupRuntime {
    /// Runs `recover()`, then (with `on_startup`) the startup backup, and
    /// starts the scheduler. Returns when the startup backup is done or
    /// failed (logged at ERROR): the host starts either way.
    pub async fn start(
        state: AdminState,
        config: RuntimeConfig,
        clock: Arc<dyn Clock>,
    ) -> BackupRuntime {
        match state.service().recover().await {
            Ok(done) if !done.is_empty() => {
                tracing::warn!(actions = ?done, "recovered from an interrupted operation")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "recovery at start-up failed"),
        }
        if config.enabled && config.on_startup {
            log_outcome(
                Trigger::Startup,
                state.run_backup(Trigger::Startup, BTreeMap::new()).await,
            );
        }
        // A lost or wrong key is told at start, not on the day of a
        // restore (each problem logged at WARN by the service).
        state.service().check_keys().await;
        let (stop, stopped) = watch::channel(false);
        let watcher = Some(tokio::spawn(watch_health(
            state.clone(),
            config.clone(),
            Arc::clone(&clock),
            stopped.clone(),
        )));
        let scheduler = config
            .enabled
            .then(|| tokio::spawn(schedule(state.clone(), config.schedule, clock, stopped)));
        BackupRuntime {
            state,
            watcher,
            config,
            stop,
            scheduler,
        }
    }

    /// The shared state (for the router).
    pub fn state(&self) -> &AdminState {
        &self.state
    }

    /// Takes a pinned `pre-migration` backup labelled `migration: from->to`;
    /// the host calls it before running schema migrations.
    ///
    /// When another operation runs (a scheduled backup, an API request),
    /// it waits for it, up to `shutdown_timeout`: the migration must not
    /// fail because a routine backup happened to be running.
    ///
    /// # Errors
    /// As a backup (`Busy` when the other operation outlasts the wait); the
    /// host should not migrate without it.
    pub async fn before_migration(&self, from: i64, to: i64) -> Result<BackupId> {
        let labels = BTreeMap::from([("migration".to_owned(), format!("{from}->{to}"))]);
        let run = run_when_free(
            &self.state,
            Trigger::PreMigration,
            labels,
            self.config.shutdown_timeout,
        );
        match run.await {
            Ok(m) => {
                tracing::info!(backup_id = %m.id, from, to, "pre-migration backup done");
                Ok(m.id)
            }
            Err(e) => {
                tracing::error!(error = %e, from, to, "pre-migration backup failed; do not migrate");
                Err(e)
            }
        }
    }

    /// Stops the scheduler and (with `on_shutdown`) takes the shutdown
    /// backup, bounded by the shutdown timeout. Returns when done.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(s) = self.scheduler.take() {
            let _ = s.await;
        }
        if let Some(w) = self.watcher.take() {
            let _ = w.await;
        }
        if self.config.enabled && self.config.on_shutdown {
            let timeout = self.config.shutdown_timeout;
            let run = run_when_free(&self.state, Trigger::Shutdown, BTreeMap::new(), timeout);
            match tokio::time::timeout(timeout, run).await {
                Ok(result) => log_outcome(Trigger::Shutdown, result),
                Err(_) => tracing::error!(
                    timeout_secs = self.config.shutdown_timeout.as_secs(),
                    "shutdown backup timed out and was abandoned; nothing partial was published"
                ),
            }
        }
    }
}

/// How often a backup that must happen asks again for the lock.
const BUSY_RETRY: Duration = Duration::from_millis(200);

/// Runs a backup that must happen (pre-migration, shutdown): while another
/// operation holds the lock, asks again every [`BUSY_RETRY`] for up to
/// `wait`, then gives up with that `Busy`.
async fn run_when_free(
    state: &AdminState,
    trigger: Trigger,
    labels: BTreeMap<String, String>,
    wait: Duration,
) -> Result<backup_core::Manifest> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut told = false;
    loop {
        match state.run_backup(trigger, labels.clone()).await {
            Err(Error::Busy { holder, .. })
                if tokio::time::Instant::now() + BUSY_RETRY < deadline =>
            {
                if !told {
                    tracing::info!(trigger = %trigger, holder = %holder, "waiting for another operation to finish");
                    told = true;
                }
                tokio::time::sleep(BUSY_RETRY).await;
            }
            other => return other,
        }
    }
}

fn log_outcome(trigger: Trigger, result: Result<backup_core::Manifest>) {
    match result {
        Ok(m) => tracing::info!(backup_id = %m.id, trigger = %trigger, "backup done"),
        Err(Error::Busy { holder, .. }) => {
            tracing::warn!(trigger = %trigger, holder = %holder, "backup skipped: another operation is running");
        }
        Err(e) => {
            tracing::error!(trigger = %trigger, error = %e, "backup failed; the host keeps running")
        }
    }
}

/// Verifies the newest backup every `verify_every` (not holding the lock
/// while it reads, so backups are not blocked), and checks every
/// `overdue_check` whether backups are overdue (`backup.overdue` once per
/// overdue period). Both only while backups are enabled.
async fn watch_health(
    state: AdminState,
    config: RuntimeConfig,
    clock: Arc<dyn Clock>,
    mut stopped: watch::Receiver<bool>,
) {
    if !config.enabled {
        return;
    }
    let mut verified_at = std::time::Instant::now();
    loop {
        tokio::select! {
            () = clock.sleep(config.overdue_check) => {}
            _ = stopped.changed() => return,
        }
        if *stopped.borrow() {
            return;
        }
        // One evaluation a tick: it also updates the status metrics.
        if let Ok(report) = state.status().await
            && state.service().notify_if_overdue(&report).await
        {
            tracing::error!("no backup succeeded for twice the schedule; backup.overdue sent");
        }
        if let Some(every) = config.verify_every
            && verified_at.elapsed() >= every
        {
            verified_at = std::time::Instant::now();
            match state.verify_newest().await {
                Ok(Some(v)) if v.ok => {
                    tracing::info!(backup_id = %v.backup_id, "scheduled verification passed")
                }
                Ok(Some(v)) => {
                    tracing::error!(backup_id = %v.backup_id, problem = ?v.problem, "scheduled verification failed: the backup would not restore")
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "scheduled verification could not run"),
            }
        }
    }
}

/// Every `interval`, a scheduled backup; once at start if the newest
/// backup (a restore's safety backup aside: it holds the state the restore
/// replaced, not the live one) is older than the interval. Never
/// overlapping: each run is awaited, and a run that finds the lock taken
/// is skipped.
async fn schedule(
    state: AdminState,
    interval: Duration,
    clock: Arc<dyn Clock>,
    mut stopped: watch::Receiver<bool>,
) {
    let newest = match state.service().list().await {
        Ok(listed) => listed
            .iter()
            .find_map(|l| l.succeeded().map(|s| s.timestamp)),
        Err(e) => {
            tracing::error!(error = %e, "listing backups for the scheduler failed");
            None
        }
    };
    let age = newest.map(|t| {
        clock
            .now()
            .signed_duration_since(t)
            .to_std()
            .unwrap_or_default()
    });
    if age.is_none_or(|a| a >= interval) {
        log_outcome(
            Trigger::Scheduled,
            state.run_backup(Trigger::Scheduled, BTreeMap::new()).await,
        );
    }
    loop {
        tokio::select! {
            () = clock.sleep(interval) => {}
            _ = stopped.changed() => return,
        }
        if *stopped.borrow() {
            return;
        }
        log_outcome(
            Trigger::Scheduled,
            state.run_backup(Trigger::Scheduled, BTreeMap::new()).await,
        );
    }
}
