//! The admin REST API (axum): thin handlers over [`AdminState`], errors as
//! RFC 9457 problem+json with a stable `code`, bearer-token auth compared
//! in constant time.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use backup_core::ports::Listed;
use backup_core::{BackupId, Component, Error, ErrorKind, RestoreOptions, Trigger};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::state::{AdminState, Job};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Default and largest page of `GET /backups`.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

/// The admin endpoints, to mount under `/api/v1/admin`.
pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/backup", post(create_backup))
        .route("/backups", get(list_backups))
        .route("/status", get(status))
        .route("/backups/{id}", get(show_backup).delete(delete_backup))
        .route("/restore", post(restore))
        .route("/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// The whole app: the admin API under `/api/v1/admin`, `/healthz`
/// (open) and `/metrics` (token required when one is set).
pub fn app(state: AdminState) -> Router {
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state.clone());
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .merge(metrics)
        .nest("/api/v1/admin", admin_router(state))
        .fallback(|| async {
            problem(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint".into(),
            )
        })
}

/// An RFC 9457 problem response.
fn problem(status: StatusCode, code: &str, detail: String) -> Response {
    let body = json!({
        "type": format!("https://synthorg.dev/problems/{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// Domain errors at the HTTP edge.
struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = match (&e, e.kind()) {
            (Error::Pinned { .. } | Error::InUse { .. }, _) => StatusCode::CONFLICT,
            (_, ErrorKind::Invalid) => StatusCode::BAD_REQUEST,
            (_, ErrorKind::NotFound) => StatusCode::NOT_FOUND,
            (_, ErrorKind::Busy) => StatusCode::CONFLICT,
            (_, ErrorKind::Refused) => StatusCode::UNPROCESSABLE_ENTITY,
            (_, ErrorKind::Failed) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // Messages that would name server paths say what matters without them.
        match &e {
            Error::NotFound { id, .. } => {
                return problem(status, e.code(), format!("backup {id} not found"));
            }
            Error::InUse {
                component, holder, ..
            } => {
                return problem(
                    status,
                    e.code(),
                    format!(
                        "the live {component} is in use by {holder}; stop the app (or close its connections) before restoring"
                    ),
                );
            }
            _ => {}
        }
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            // Internals go to the log, not to the client.
            tracing::error!(error = %e, "admin API request failed");
            return problem(
                status,
                e.code(),
                "the operation failed; see the server log".into(),
            );
        }
        if let Error::Incompatible { report, .. } = &e {
            let mut response = problem(status, e.code(), e.to_string());
            if let Ok(findings) = serde_json::to_value(report) {
                *response.body_mut() = axum::body::Body::from(
                    json!({
                        "type": "https://synthorg.dev/problems/incompatible",
                        "title": "Unprocessable Entity",
                        "status": 422,
                        "code": "incompatible",
                        "detail": e.to_string(),
                        "compatibility": findings,
                    })
                    .to_string(),
                );
            }
            return response;
        }
        problem(status, e.code(), e.to_string())
    }
}

fn parse_id(raw: &str) -> Result<BackupId, ApiError> {
    BackupId::parse(raw).map_err(|e| ApiError(Error::InvalidId(e)))
}

fn bad_body(rejection: JsonRejection) -> Response {
    let status = rejection.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body_too_large"
    } else {
        "invalid_body"
    };
    problem(status, code, rejection.body_text())
}

fn disabled() -> Response {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "backups_disabled",
        "backups are disabled (backup.enabled is false)".into(),
    )
}

/// Constant-time comparison: the time taken does not depend on where the
/// first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // RFC 9110: the scheme is case-insensitive.
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_start_matches(' '));
    match presented {
        Some(p) if same(p.as_bytes(), token.expose().as_bytes()) => next.run(request).await,
        _ => {
            let mut r = problem(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid bearer token".into(),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    trigger: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

async fn create_backup(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    if !state.enabled {
        return disabled();
    }
    let body = match body {
        Err(rejection) => {
            let status = rejection.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "body_too_large"
            } else {
                "invalid_body"
            };
            return problem(status, code, rejection.body_text());
        }
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => CreateBody::default(),
        Ok(bytes) => match serde_json::from_slice::<CreateBody>(&bytes) {
            Ok(b) => b,
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("invalid JSON body: {e}"),
                );
            }
        },
    };
    let trigger = match body.trigger.as_deref() {
        None | Some("manual") => Trigger::Manual,
        Some("pre-migration") => Trigger::PreMigration,
        Some(other) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("trigger {other:?} cannot be requested; use manual or pre-migration"),
            );
        }
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| k.chars().take(200).collect::<String>());
    match state.start_backup(trigger, body.labels, key).await {
        Ok(started) => {
            let url = format!("/api/v1/admin/backups/{}", started.id);
            // A repeat answers as the first request did, with the status now.
            let status = if started.repeated {
                state.status_of(&started.id).await
            } else {
                "running"
            };
            let mut response = (
                StatusCode::ACCEPTED,
                Json(json!({ "id": started.id, "status": status, "status_url": url, "repeated": started.repeated })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&url) {
                response.headers_mut().insert(header::LOCATION, v);
            }
            response
        }
        Err(e) => ApiError(e).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

fn item(l: &Listed) -> Value {
    serde_json::to_value(backup_core::ports::ListItem::from(l)).unwrap_or(Value::Null)
}

async fn list_backups(
    State(state): State<AdminState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Ok(Query(query)) = query else {
        return Ok(problem(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "limit must be a number".into(),
        ));
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let cursor = query.cursor.as_deref().map(parse_id).transpose()?;
    let listed = state.service.list().await?;
    state
        .metrics
        .backups
        .store(listed.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let mut items: Vec<(BackupId, Value)> = state
        .running()
        .into_iter()
        .map(|(id, progress)| {
            let v = json!({ "id": id, "status": "running", "trigger": id.trigger(), "timestamp": id.timestamp(), "progress": progress });
            (id, v)
        })
        .chain(listed.iter().map(|l| (l.id().clone(), item(l))))
        .collect();
    items.sort_by(|a, b| b.0.cmp(&a.0));
    items.dedup_by(|a, b| a.0 == b.0);
    let mut page: Vec<(BackupId, Value)> = items
        .into_iter()
        .filter(|(id, _)| cursor.as_ref().is_none_or(|c| id < c))
        .take(limit + 1)
        .collect();
    let next = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(|(id, _)| id.to_string())
    });
    Ok(Json(json!({
        "items": page.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "next_cursor": next.flatten(),
    }))
    .into_response())
}

async fn show_backup(
    State(state): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    match state.job(&id) {
        Some(Job::Running(progress)) => {
            return Ok(
                Json(json!({ "id": id, "status": "running", "progress": progress }))
                    .into_response(),
            );
        }
        Some(Job::Failed(error)) => {
            return Ok(
                Json(json!({ "id": id, "status": "failed", "error": error })).into_response(),
            );
        }
        None => {}
    }
    match state.service.show(&id).await {
        Ok(m) => Ok(Json(json!({ "id": id, "status": "complete", "manifest": m })).into_response()),
        Err(e @ Error::Manifest { .. }) => Ok(Json(
            json!({ "id": id, "status": "damaged", "error": e.to_string() }),
        )
        .into_response()),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_backup(
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let Ok(Query(query)) = query else {
        return Ok(problem(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "force must be true or false".into(),
        ));
    };
    state.service.delete(&id, query.force).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    backup_id: String,
    #[serde(default)]
    confirm: bool,
    #[serde(default)]
    dry_run: bool,
    /// With `dry_run`: only the plan (compatibility, what would be
    /// replaced), without reading the backup's content.
    #[serde(default)]
    plan_only: bool,
    #[serde(default)]
    components: Option<Vec<Component>>,
}

async fn restore(
    State(state): State<AdminState>,
    body: Result<Json<RestoreBody>, JsonRejection>,
) -> Response {
    if !state.enabled {
        return disabled();
    }
    let body = match body {
        Ok(Json(b)) => b,
        Err(rejection) => return bad_body(rejection),
    };
    let id = match parse_id(&body.backup_id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if body.components.as_ref().is_some_and(Vec::is_empty) {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no_components",
            "components is empty: list the components to restore, or leave it out to restore all"
                .into(),
        );
    }
    let options = RestoreOptions {
        confirm: body.confirm,
        dry_run: body.dry_run,
        components: body.components,
    };
    let result = if body.plan_only && body.dry_run {
        state.service.restore_plan(&id, &options).await
    } else {
        state.service.restore(&id, options).await
    };
    match result {
        Ok(report) => {
            if !report.dry_run {
                state
                    .metrics
                    .restores
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Json(report).into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    if let Ok(listed) = state.service.list().await {
        state
            .metrics
            .backups
            .store(listed.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    if let Err(e) = state.status().await {
        tracing::warn!(error = %e, "cannot evaluate the backup status for /metrics");
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn status(State(state): State<AdminState>) -> Response {
    match state.status().await {
        Ok(report) => Json(report).into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn constant_time_comparison_is_correct() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
        assert!(same(b"", b""));
    }
}
