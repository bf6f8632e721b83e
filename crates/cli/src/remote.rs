//! Remote mode: `--server URL` sends the commands to a running
//! `synthorg serve` instead of acting locally. Requests and answers are the
//! typed bodies of `backup_core::wire`, rendered by the same code as local
//! results, so the output is the same; problem+json codes map onto the
//! local exit codes through `ErrorKind`.

use std::time::Duration;

use anyhow::Context as _;
use backup_core::BackupId;
use backup_core::wire::{BackupState, CreateRequest, ListPage, Problem, RestoreRequest, Started};
use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};

use crate::render::Output;
use crate::{Exit, exit};

/// A client of the admin API.
pub(crate) struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// No request body.
const NO_BODY: Option<&()> = None;

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

    /// One request; the answer parsed as `T`, a problem+json answer as the
    /// error it stands for.
    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + Sync)>,
    ) -> anyhow::Result<T> {
        let url = format!("{}/api/v1/admin{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = res.status().as_u16();
        let text = res.text().await.context("reading the answer")?;
        if status >= 400 {
            return Err(problem(status, &text));
        }
        // An empty answer (204) reads as JSON null.
        let text = if text.is_empty() { "null" } else { &text };
        serde_json::from_str(text).with_context(|| format!("reading the answer of {url}"))
    }

    /// `backup`: starts it, waits for it, prints like local mode.
    pub(crate) async fn create(
        &self,
        out: &Output,
        trigger: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let request = CreateRequest {
            trigger: Some(trigger.to_owned()),
            labels: labels.clone(),
        };
        let started: Started = self
            .send(reqwest::Method::POST, "/backup", Some(&request))
            .await?;
        let id = started.id;
        loop {
            let state: BackupState = self
                .send(reqwest::Method::GET, &format!("/backups/{id}"), NO_BODY)
                .await?;
            match (state.status.as_str(), state.manifest) {
                ("running", _) => tokio::time::sleep(Duration::from_millis(200)).await,
                ("complete", Some(manifest)) => return out.created(&manifest),
                _ => {
                    return Err(Exit {
                        code: exit::FAILED,
                        message: format!(
                            "backup {id} failed: {}",
                            state.error.as_deref().unwrap_or("see the server log")
                        ),
                    }
                    .into());
                }
            }
        }
    }

    /// `GET /status`, rendered as locally.
    pub(crate) async fn status(&self, out: &Output) -> anyhow::Result<()> {
        let report: backup_core::status::StatusReport =
            self.send(reqwest::Method::GET, "/status", NO_BODY).await?;
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
            let page: ListPage = self.send(reqwest::Method::GET, &path, NO_BODY).await?;
            items.extend(page.items);
            cursor = page.next_cursor;
            if cursor.is_none() || limit.is_some_and(|l| items.len() >= l) {
                break;
            }
        }
        out.list_items(&items)
    }

    pub(crate) async fn show(&self, out: &Output, id: &BackupId) -> anyhow::Result<()> {
        let state: BackupState = self
            .send(reqwest::Method::GET, &format!("/backups/{id}"), NO_BODY)
            .await?;
        match state.manifest {
            Some(m) => out.manifest(&m),
            None => {
                println!("{}", serde_json::to_string_pretty(&state)?);
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
        let _: IgnoredAny = self
            .send(
                reqwest::Method::DELETE,
                &format!("/backups/{id}?force={force}"),
                NO_BODY,
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
        let request = RestoreRequest {
            backup_id: id.to_string(),
            confirm: mode == Mode::Restore,
            dry_run: mode != Mode::Restore,
            plan_only: mode == Mode::Plan,
            components,
        };
        self.send(reqwest::Method::POST, "/restore", Some(&request))
            .await
    }
}

/// A problem+json answer as an error with the documented exit code.
fn problem(status: u16, text: &str) -> anyhow::Error {
    let (code, detail) = match serde_json::from_str::<Problem>(text) {
        Ok(p) => (p.code, p.detail),
        Err(_) => (String::new(), text.to_owned()),
    };
    // The server's error kind, from the stable code, as a local error of
    // that kind would exit; HTTP-level answers by status.
    let exit_code = match backup_core::ErrorKind::of_code(&code) {
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
