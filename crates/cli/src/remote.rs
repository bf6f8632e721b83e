//! Remote mode: `--server URL` sends the commands to a running
//! `synthorg serve` instead of acting locally. Same output and exit codes as
//! local mode; problem+json codes map onto them.

use std::time::Duration;

use anyhow::Context as _;
use backup_core::BackupId;
use serde_json::{Value, json};

use crate::render::Output;
use crate::{Exit, exit};

/// A client of the admin API.
pub(crate) struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Remote {
    pub(crate) fn new(server: &str, token: Option<String>) -> anyhow::Result<Remote> {
        let base = server.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Exit {
                code: exit::USAGE,
                message: format!("--server {server:?} must start with http:// or https://"),
            }
            .into());
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3600))
            .build()
            .context("building the HTTP client")?;
        Ok(Remote { base, token, http })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}/api/v1/admin{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = res.status().as_u16();
        let text = res.text().await.context("reading the answer")?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status >= 400 {
            return Err(problem(status, &value));
        }
        Ok((status, value))
    }

    /// `backup`: starts it, waits for it, prints like local mode.
    pub(crate) async fn create(
        &self,
        out: &Output,
        trigger: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let (_, started) = self
            .send(
                reqwest::Method::POST,
                "/backup",
                Some(json!({ "trigger": trigger, "labels": labels })),
            )
            .await?;
        let id = started["id"].as_str().unwrap_or_default().to_owned();
        loop {
            let (_, status) = self
                .send(reqwest::Method::GET, &format!("/backups/{id}"), None)
                .await?;
            match status["status"].as_str() {
                Some("running") => tokio::time::sleep(Duration::from_millis(200)).await,
                Some("complete") => {
                    let manifest: backup_core::Manifest =
                        serde_json::from_value(status["manifest"].clone())
                            .context("reading the manifest")?;
                    return out.created(&manifest);
                }
                _ => {
                    return Err(Exit {
                        code: exit::FAILED,
                        message: format!(
                            "backup {id} failed: {}",
                            status["error"].as_str().unwrap_or("see the server log")
                        ),
                    }
                    .into());
                }
            }
        }
    }

    /// `GET /status`, rendered as locally.
    pub(crate) async fn status(&self, out: &Output) -> anyhow::Result<()> {
        let (_, body) = self.send(reqwest::Method::GET, "/status", None).await?;
        let report: backup_core::status::StatusReport =
            serde_json::from_value(body).context("reading the status")?;
        out.status(&report)
    }

    pub(crate) async fn list(&self, out: &Output, limit: Option<usize>) -> anyhow::Result<()> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let want = limit.map_or(1000, |l| l.saturating_sub(items.len()).clamp(1, 1000));
            let mut path = format!("/backups?limit={want}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (_, page) = self.send(reqwest::Method::GET, &path, None).await?;
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            cursor = page["next_cursor"].as_str().map(str::to_owned);
            if cursor.is_none() || limit.is_some_and(|l| items.len() >= l) {
                break;
            }
        }
        out.list_items(&items)
    }

    pub(crate) async fn show(&self, out: &Output, id: &BackupId) -> anyhow::Result<()> {
        let (_, status) = self
            .send(reqwest::Method::GET, &format!("/backups/{id}"), None)
            .await?;
        match serde_json::from_value::<backup_core::Manifest>(status["manifest"].clone()) {
            Ok(m) => out.manifest(&m),
            Err(_) => {
                println!("{}", serde_json::to_string_pretty(&status)?);
                Ok(())
            }
        }
    }

    pub(crate) async fn delete(
        &self,
        out: &Output,
        id: &BackupId,
        force: bool,
    ) -> anyhow::Result<()> {
        self.send(
            reqwest::Method::DELETE,
            &format!("/backups/{id}?force={force}"),
            None,
        )
        .await?;
        out.deleted(id)
    }

    /// The plan, the dry run's report, or the restore itself.
    pub(crate) async fn restore(
        &self,
        id: &BackupId,
        components: Option<Vec<backup_core::Component>>,
        mode: crate::commands::Mode,
    ) -> anyhow::Result<backup_core::RestoreReport> {
        use crate::commands::Mode;
        let body = json!({
            "backup_id": id,
            "confirm": mode == Mode::Restore,
            "dry_run": mode != Mode::Restore,
            "plan_only": mode == Mode::Plan,
            "components": components,
        });
        let (_, report) = self
            .send(reqwest::Method::POST, "/restore", Some(body))
            .await?;
        serde_json::from_value(report).context("reading the restore report")
    }
}

/// A problem+json answer as an error with the documented exit code.
fn problem(status: u16, body: &Value) -> anyhow::Error {
    let code = body["code"].as_str().unwrap_or("");
    let detail = body["detail"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_owned);
    // The server's error kind, from the stable code, as a local error of
    // that kind would exit; HTTP-level answers by status.
    let exit_code = match backup_core::ErrorKind::of_code(code) {
        Some(kind) => crate::exit::of_kind(kind),
        None if matches!(status, 400 | 401 | 413 | 422) => exit::USAGE,
        None => exit::FAILED,
    };
    Exit {
        code: exit_code,
        message: format!("server answered {status} {code}: {detail}"),
    }
    .into()
}
