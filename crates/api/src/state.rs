//! [`AdminState`]: what the API and the runtime share: the service, the
//! backups running in the background, idempotency keys, and metrics.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use backup_core::config::Secret;
use backup_core::service::ProgressFn;
use backup_core::{BackupId, BackupService, CreateOptions, Manifest, Progress, Result, Trigger};

/// Idempotency keys remembered (oldest forgotten first).
const MAX_IDEMPOTENCY_KEYS: usize = 1000;

/// A backup started through the state.
#[derive(Debug, Clone)]
pub enum Job {
    /// Still running, with its latest progress.
    Running(Option<Progress>),
    /// Failed; the error as text (details are in the log).
    Failed(String),
}

#[derive(Debug, Default)]
struct Jobs {
    jobs: HashMap<BackupId, Job>,
    /// Idempotency key -> the backup it started and the request it came
    /// with (trigger and labels, as JSON).
    keys: HashMap<String, (BackupId, String)>,
    key_order: VecDeque<String>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Last successful backup per trigger: (unix seconds, duration s, size bytes).
    last_success: Mutex<HashMap<Trigger, (i64, f64, u64)>>,
    /// Failed backups since start.
    pub failures: AtomicU64,
    /// Successful backups since start.
    pub successes: AtomicU64,
    /// Restores since start.
    pub restores: AtomicU64,
    /// Published backups at the last listing.
    pub backups: AtomicU64,
    /// `synthorg_backup_status` at the last evaluation (0 ok, 1 failing,
    /// 2 overdue, 3 disabled).
    pub status: AtomicU64,
    /// Unix time of the last verification that passed (0: none).
    pub last_verify_success: std::sync::atomic::AtomicI64,
    /// Verifications that failed since start.
    pub verify_failures: AtomicU64,
}

impl Metrics {
    fn record(&self, manifest: &Manifest, seconds: f64) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.last_success.lock() {
            m.insert(
                manifest.trigger,
                (manifest.timestamp.timestamp(), seconds, manifest.size_bytes),
            );
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, rows: Vec<(String, String)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for (labels, value) in rows {
                out.push_str(&format!("{name}{labels} {value}\n"));
            }
        };
        let last = self
            .last_success
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let mut triggers: Vec<_> = last.into_iter().collect();
        triggers.sort_by_key(|(t, _)| t.as_str());
        let per = |f: &dyn Fn(&(i64, f64, u64)) -> String| {
            triggers
                .iter()
                .map(|(t, v)| (format!("{{trigger=\"{t}\"}}"), f(v)))
                .collect::<Vec<_>>()
        };
        gauge(
            "synthorg_backup_last_success_timestamp_seconds",
            "Start time of the last successful backup, per trigger.",
            per(&|v| v.0.to_string()),
        );
        gauge(
            "synthorg_backup_last_duration_seconds",
            "Duration of the last successful backup, per trigger.",
            per(&|v| format!("{:.3}", v.1)),
        );
        gauge(
            "synthorg_backup_last_size_bytes",
            "Uncompressed size of the last successful backup, per trigger.",
            per(&|v| v.2.to_string()),
        );
        gauge(
            "synthorg_backup_status",
            "0 ok, 1 failing (the last attempt failed), 2 overdue (no success for twice the schedule), 3 disabled.",
            vec![(
                String::new(),
                self.status.load(Ordering::Relaxed).to_string(),
            )],
        );
        gauge(
            "synthorg_backup_last_verify_success_timestamp_seconds",
            "Unix time of the last verification of a backup that passed (0: none yet).",
            vec![(
                String::new(),
                self.last_verify_success.load(Ordering::Relaxed).to_string(),
            )],
        );
        gauge(
            "synthorg_backups",
            "Published backups in the target at the last listing.",
            vec![(
                String::new(),
                self.backups.load(Ordering::Relaxed).to_string(),
            )],
        );
        for (name, help, value) in [
            (
                "synthorg_backup_successes_total",
                "Successful backups since start.",
                &self.successes,
            ),
            (
                "synthorg_backup_failures_total",
                "Failed backups since start.",
                &self.failures,
            ),
            (
                "synthorg_restores_total",
                "Restores since start.",
                &self.restores,
            ),
            (
                "synthorg_backup_verify_failures_total",
                "Verifications that found a backup that would not restore, since start.",
                &self.verify_failures,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// Shared by the router and the runtime.
#[derive(Clone)]
pub struct AdminState {
    pub(crate) service: BackupService,
    pub(crate) token: Option<Secret>,
    pub(crate) enabled: bool,
    /// Time between scheduled backups (for status).
    pub(crate) schedule: std::time::Duration,
    jobs: Arc<Mutex<Jobs>>,
    pub(crate) metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("location", &self.service.location())
            .field("auth", &self.token.is_some())
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// What [`AdminState::start_backup`] answers.
#[derive(Debug, Clone)]
pub struct Started {
    /// The backup's id.
    pub id: BackupId,
    /// Whether an earlier request with the same idempotency key started it.
    pub repeated: bool,
}

impl AdminState {
    /// State over `service`. `token`: the API bearer token (`None`: no
    /// authentication, for loopback with `--insecure-no-auth`). `enabled`:
    /// `backup.enabled`; when false, API backups and restores answer 503.
    pub fn new(service: BackupService, token: Option<Secret>, enabled: bool) -> AdminState {
        AdminState {
            service,
            token,
            enabled,
            schedule: std::time::Duration::from_secs(6 * 3600),
            jobs: Arc::new(Mutex::new(Jobs::default())),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The same state with the backup schedule `schedule` (`status` calls
    /// a backup overdue after twice that); 6 hours unless set.
    pub fn with_schedule(mut self, schedule: std::time::Duration) -> AdminState {
        self.schedule = schedule;
        self
    }

    /// The status now (see [`BackupService::status`]); updates the
    /// metrics that derive from it.
    ///
    /// # Errors
    /// `Store` when the backups cannot be listed.
    pub async fn status(&self) -> Result<backup_core::status::StatusReport> {
        let report = self.service.status(self.enabled, self.schedule).await?;
        self.metrics
            .status
            .store(u64::from(report.status.code()), Ordering::Relaxed);
        if let Some(v) = report.last_verification.as_ref().filter(|v| v.ok) {
            self.metrics
                .last_verify_success
                .store(v.timestamp.timestamp(), Ordering::Relaxed);
        }
        Ok(report)
    }

    /// Verifies the newest backup and records the outcome in the metrics
    /// (the service records it in the store and sends `verify.failed`).
    ///
    /// # Errors
    /// `Store` when the store cannot be read.
    pub async fn verify_newest(&self) -> Result<Option<backup_core::status::Verification>> {
        let verification = self.service.verify_newest().await?;
        if let Some(v) = &verification {
            if v.ok {
                self.metrics
                    .last_verify_success
                    .store(v.timestamp.timestamp(), Ordering::Relaxed);
            } else {
                self.metrics.verify_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(verification)
    }

    /// The service.
    pub fn service(&self) -> &BackupService {
        &self.service
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A job started here, if any.
    pub fn job(&self, id: &BackupId) -> Option<Job> {
        self.jobs.lock().ok().and_then(|j| j.jobs.get(id).cloned())
    }

    /// Running jobs, for listings.
    pub fn running(&self) -> Vec<(BackupId, Option<Progress>)> {
        self.jobs
            .lock()
            .map(|j| {
                j.jobs
                    .iter()
                    .filter_map(|(id, job)| match job {
                        Job::Running(p) => Some((id.clone(), p.clone())),
                        Job::Failed(_) => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Starts a backup in the background and returns its id at once. With
    /// an idempotency key seen before, returns that backup's id instead.
    ///
    /// # Errors
    /// `Busy` when another operation runs, and the errors of
    /// [`BackupService::begin`].
    pub async fn start_backup(
        &self,
        trigger: Trigger,
        labels: std::collections::BTreeMap<String, String>,
        idempotency_key: Option<String>,
    ) -> Result<Started> {
        let request = serde_json::json!({ "trigger": trigger, "labels": labels }).to_string();
        if let Some(key) = &idempotency_key
            && let Some((id, first)) = self.jobs.lock().ok().and_then(|j| j.keys.get(key).cloned())
        {
            if first != request {
                return Err(backup_core::Error::IdempotencyMismatch {
                    key: key.escape_debug().to_string(),
                    id: id.to_string(),
                });
            }
            return Ok(Started { id, repeated: true });
        }
        let jobs = Arc::clone(&self.jobs);
        let pending_id = Arc::new(Mutex::new(None::<BackupId>));
        let progress_id = Arc::clone(&pending_id);
        let progress: ProgressFn = Arc::new(move |p: &Progress| {
            if let (Ok(mut j), Ok(id)) = (jobs.lock(), progress_id.lock())
                && let Some(id) = id.as_ref()
            {
                j.jobs.insert(id.clone(), Job::Running(Some(p.clone())));
            }
        });
        let options = CreateOptions {
            labels,
            progress: Some(progress),
            ..CreateOptions::default()
        };
        let pending = self.service.begin(trigger, options).await?;
        let id = pending.id.clone();
        if let Ok(mut slot) = pending_id.lock() {
            *slot = Some(id.clone());
        }
        if let Ok(mut j) = self.jobs.lock() {
            j.jobs.insert(id.clone(), Job::Running(None));
            if let Some(key) = idempotency_key {
                j.keys.insert(key.clone(), (id.clone(), request));
                j.key_order.push_back(key);
                while j.key_order.len() > MAX_IDEMPOTENCY_KEYS {
                    if let Some(old) = j.key_order.pop_front() {
                        j.keys.remove(&old);
                    }
                }
            }
        }
        let state = self.clone();
        let task_id = id.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = pending.run.await;
            state.finish(&task_id, result, started);
        });
        Ok(Started {
            id,
            repeated: false,
        })
    }

    /// What became of a backup started here: `running`, `failed`,
    /// `complete` (published) or `gone` (deleted or pruned since).
    pub async fn status_of(&self, id: &BackupId) -> &'static str {
        match self.job(id) {
            Some(Job::Running(_)) => "running",
            Some(Job::Failed(_)) => "failed",
            None => match self.service.show(id).await {
                Ok(_) => "complete",
                Err(_) => "gone",
            },
        }
    }

    /// Runs a backup to completion (runtime: startup, scheduled, shutdown).
    ///
    /// # Errors
    /// As [`BackupService::create_with`]; also recorded in the metrics.
    pub async fn run_backup(
        &self,
        trigger: Trigger,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<Manifest> {
        let started = Instant::now();
        let options = CreateOptions {
            labels,
            ..CreateOptions::default()
        };
        let result = self.service.create_with(trigger, options).await;
        match &result {
            Ok(m) => self.metrics.record(m, started.elapsed().as_secs_f64()),
            Err(backup_core::Error::Busy { .. }) => {}
            Err(_) => {
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    fn finish(&self, id: &BackupId, result: Result<Manifest>, started: Instant) {
        let mut jobs = match self.jobs.lock() {
            Ok(j) => j,
            Err(_) => return,
        };
        match result {
            Ok(m) => {
                jobs.jobs.remove(id);
                self.metrics.record(&m, started.elapsed().as_secs_f64());
            }
            Err(e) => {
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                jobs.jobs.insert(id.clone(), Job::Failed(e.to_string()));
            }
        }
    }
}
