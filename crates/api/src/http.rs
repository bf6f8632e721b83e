//! The admin REST API (axum): thin handlers over [`AdminState`], errors as
//! RFC 9457 problem+json with a stable `code`, bearer-token auth compared
//! in constant time.

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use backup_core::wire::{
    BackupState, CreateRequest, Health, ListItem, ListPage, Problem, RestoreRequest, Started,
};
use backup_core::{BackupId, Error, ErrorKind, RestoreOptions, Trigger};
use serde::Deserialize;
use serde_json::Value;

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
            get(|| async {
                Json(Health {
                    status: "ok".into(),
                })
            }),
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
    problem_response(status, &problem_body(status, code, detail))
}

fn problem_body(status: StatusCode, code: &str, detail: String) -> Problem {
    let title = status.canonical_reason().unwrap_or("error");
    Problem::new(status.as_u16(), title, code, detail)
}

fn problem_response(status: StatusCode, body: &Problem) -> Response {
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
            let mut body = problem_body(status, e.code(), e.to_string());
            body.compatibility = Some(report.clone());
            return problem_response(status, &body);
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
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => CreateRequest::default(),
        Ok(bytes) => match serde_json::from_slice::<CreateRequest>(&bytes) {
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
                Json(Started {
                    id: started.id.clone(),
                    status: status.to_owned(),
                    status_url: url.clone(),
                    repeated: started.repeated,
                }),
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
    let mut items: Vec<ListItem> = state
        .running()
        .into_iter()
        .map(|(id, progress)| ListItem::running(&id, progress))
        .chain(listed.iter().map(ListItem::from))
        .collect();
    items.sort_by(|a, b| b.id.cmp(&a.id));
    items.dedup_by(|a, b| a.id == b.id);
    let mut page: Vec<ListItem> = items
        .into_iter()
        .filter(|item| cursor.as_ref().is_none_or(|c| item.id < *c))
        .take(limit + 1)
        .collect();
    let next_cursor = (page.len() > limit)
        .then(|| {
            page.truncate(limit);
            page.last().map(|item| item.id.to_string())
        })
        .flatten();
    Ok(Json(ListPage {
        items: page,
        next_cursor,
    })
    .into_response())
}

async fn show_backup(
    State(state): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let state_of = |status: &str| BackupState {
        id: id.clone(),
        status: status.to_owned(),
        manifest: None,
        progress: None,
        error: None,
    };
    let answer = match state.job(&id) {
        Some(Job::Running(progress)) => BackupState {
            progress,
            ..state_of("running")
        },
        Some(Job::Failed(error)) => BackupState {
            error: Some(error),
            ..state_of("failed")
        },
        None => match state.service.show(&id).await {
            Ok(m) => BackupState {
                manifest: Some(Box::new(m)),
                ..state_of("complete")
            },
            Err(e @ Error::Manifest { .. }) => BackupState {
                error: Some(e.to_string()),
                ..state_of("damaged")
            },
            Err(e) => return Err(e.into()),
        },
    };
    Ok(Json(answer).into_response())
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

async fn restore(
    State(state): State<AdminState>,
    body: Result<Json<RestoreRequest>, JsonRejection>,
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
