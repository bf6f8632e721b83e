//! [`CommandQuiesce`]: pauses the memory writer with a command from
//! `backup.quiesce` (for hosts that cannot pause it in process), e.g. a
//! `curl` to the app's own pause endpoint.
//!
//! `pause` runs its command and succeeds when it exits 0 (the service
//! bounds it, with the snapshot, by `quiesce_timeout_secs`). `resume` is
//! synchronous and must never block, as the port requires: it starts its
//! command and a thread that waits for it and logs the outcome. It runs
//! once for every pause that was started, also when the pause failed or
//! timed out and when the backup was cancelled (the service calls it from
//! a drop guard); a resume without a pause does nothing.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use backup_core::config::QuiesceConfig;
use backup_core::ports::Quiesce;
use backup_core::{Component, Error, Result};

/// Runs `backup.quiesce.pause` / `resume`.
#[derive(Debug)]
pub struct CommandQuiesce {
    pause: Vec<String>,
    resume: Vec<String>,
    paused: AtomicBool,
}

impl CommandQuiesce {
    /// The commands of `config` (both non-empty, checked at load).
    pub fn new(config: &QuiesceConfig) -> CommandQuiesce {
        CommandQuiesce {
            pause: config.pause.clone(),
            resume: config.resume.clone(),
            paused: AtomicBool::new(false),
        }
    }

    fn fail(&self, reason: String) -> Error {
        Error::Source {
            component: Component::Memory,
            path: format!("backup.quiesce.pause ({})", self.pause.join(" ")),
            reason,
            source: None,
        }
    }
}

#[async_trait]
impl Quiesce for CommandQuiesce {
    async fn pause(&self) -> Result<()> {
        let Some((program, args)) = self.pause.split_first() else {
            return Err(self.fail("no command".into()));
        };
        self.paused.store(true, Ordering::SeqCst);
        tracing::info!(command = %self.pause.join(" "), "pausing the memory writer");
        let out = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| self.fail(format!("cannot run {program}: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(self.fail(format!(
                "exited with {}: {}",
                out.status,
                stderr.trim().chars().take(500).collect::<String>()
            )));
        }
        tracing::info!("memory writer paused");
        Ok(())
    }

    fn resume(&self) {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return;
        }
        let Some((program, args)) = self.resume.split_first() else {
            return;
        };
        let command = self.resume.join(" ");
        tracing::info!(command = %command, "resuming the memory writer");
        match std::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => {
                std::thread::spawn(move || match child.wait_with_output() {
                    Ok(out) if out.status.success() => {
                        tracing::info!(command = %command, "memory writer resumed");
                    }
                    Ok(out) => tracing::error!(command = %command, status = %out.status,
                        stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                        "resuming the memory writer failed; resume it by hand"),
                    Err(e) => tracing::error!(command = %command, error = %e,
                        "resuming the memory writer failed; resume it by hand"),
                });
            }
            Err(e) => tracing::error!(command = %command, error = %e,
                "cannot run the resume command; resume the memory writer by hand"),
        }
    }
}
