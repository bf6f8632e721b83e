//! [`HookNotifier`]: sends events to `backup.notify.webhooks` (a JSON POST
//! each) and to `backup.notify.command` (the JSON on stdin), the way
//! borgmatic's monitoring hooks and kopia's notification profiles do.
//!
//! Each delivery is tried `attempts` times with a per-attempt timeout and
//! a doubling backoff; its outcome is logged (URLs only as scheme and
//! host: they may carry tokens). A delivery that fails is a WARN, never an
//! error of the operation: the operation's result is final before the
//! notifier is called.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use backup_core::config::{NotifyConfig, Secret};
use backup_core::ports::Notifier;
use backup_core::status::Event;
use tokio::io::AsyncWriteExt;

/// Delivers events to webhooks and a command.
#[derive(Debug)]
pub struct HookNotifier {
    webhooks: Vec<Secret>,
    command: Vec<String>,
    events: HashSet<String>,
    timeout: Duration,
    attempts: u32,
    client: reqwest::Client,
    host: String,
}

impl HookNotifier {
    /// A notifier for `config` (validated at load).
    pub fn new(config: &NotifyConfig) -> HookNotifier {
        HookNotifier {
            webhooks: config.webhooks.clone(),
            command: config.command.clone(),
            events: config.events.iter().cloned().collect(),
            timeout: Duration::from_secs(u64::from(config.timeout_secs)),
            attempts: config.attempts.max(1),
            client: reqwest::Client::new(),
            host: host_name(),
        }
    }

    async fn post(&self, url: &Secret, body: &str) -> Result<(), String> {
        let response = self
            .client
            .post(url.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .timeout(self.timeout)
            .send()
            .await
            // reqwest's errors may quote the URL: say only what kind it is.
            .map_err(|e| {
                if e.is_timeout() {
                    format!("no answer within {} s", self.timeout.as_secs())
                } else if e.is_connect() {
                    "cannot connect".to_owned()
                } else {
                    "request failed".to_owned()
                }
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", response.status()))
        }
    }

    async fn run_command(&self, body: &str) -> Result<(), String> {
        let Some((program, args)) = self.command.split_first() else {
            return Ok(());
        };
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(body.as_bytes()).await;
        }
        match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Err(_) => Err(format!(
                "{program} did not finish within {} s",
                self.timeout.as_secs()
            )),
            Ok(Err(e)) => Err(format!("{program}: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "{program} exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// Tries `deliver` up to `attempts` times with a doubling backoff.
    async fn with_retries<F, Fut>(&self, what: &str, event: &str, deliver: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut backoff = Duration::from_millis(500);
        for attempt in 1..=self.attempts {
            match deliver().await {
                Ok(()) => {
                    tracing::info!(receiver = %what, event, attempt, "notification delivered");
                    return;
                }
                Err(e) if attempt == self.attempts => {
                    tracing::warn!(receiver = %what, event, attempts = attempt, error = %e,
                        "notification could not be delivered; the operation itself is unaffected");
                }
                Err(e) => {
                    tracing::debug!(receiver = %what, event, attempt, error = %e, "notification failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
}

#[async_trait]
impl Notifier for HookNotifier {
    async fn notify(&self, event: &Event) {
        let name = event.event.as_str();
        if !self.events.contains(name) {
            return;
        }
        let mut body = match serde_json::to_value(event) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode the notification");
                return;
            }
        };
        if let Some(map) = body.as_object_mut() {
            map.insert("host".into(), serde_json::Value::String(self.host.clone()));
        }
        let body = body.to_string();
        let hooks = self.webhooks.iter().map(|url| {
            let body = &body;
            async move {
                self.with_retries(&redact(url), name, || self.post(url, body))
                    .await;
            }
        });
        let command = async {
            if !self.command.is_empty() {
                let what = format!("command {}", self.command[0]);
                self.with_retries(&what, name, || self.run_command(&body))
                    .await;
            }
        };
        futures::join!(futures::future::join_all(hooks), command);
    }
}

/// `scheme://host` of a URL: never its path or query, which may hold tokens.
pub(crate) fn redact(url: &Secret) -> String {
    let raw = url.expose();
    let (scheme, rest) = raw.split_once("://").unwrap_or(("?", raw));
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    // user:password@host
    let host = host.rsplit('@').next().unwrap_or(host);
    format!("{scheme}://{host}/…")
}

/// This machine's name, for the events' `host`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_logged_without_path_query_or_credentials() {
        let url = Secret::new("https://user:pw@hooks.example.com/T0/B1/secret-token?x=1");
        assert_eq!(redact(&url), "https://hooks.example.com/…");
        assert!(!redact(&url).contains("secret"));
    }
}
