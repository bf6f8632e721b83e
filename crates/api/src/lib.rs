//! What the SynthOrg host embeds, and what `synthorg serve` runs:
//!
//! - [`build_service`]: the one place that picks adapters from the config;
//! - [`admin_router`] / [`app`]: the admin REST API (axum), mountable under
//!   `/api/v1/admin`, errors as problem+json, bearer-token auth;
//! - [`BackupRuntime`]: recover and back up at start-up, on a schedule and
//!   on shutdown; [`BackupRuntime::before_migration`];
//! - [`CommandQuiesce`]: `backup.quiesce` commands around the memory snapshot.

mod http;
mod notify;
mod openapi;
mod quiesce;
mod runtime;
mod state;
mod wiring;

pub use http::{MAX_BODY, admin_router, app};
pub use notify::HookNotifier;
pub use openapi::document as openapi_document;
pub use quiesce::CommandQuiesce;
pub use runtime::{BackupRuntime, RuntimeConfig};
pub use state::{AdminState, Job, Metrics, Started};
pub use wiring::{build_service, build_service_with, build_service_with_clock, live_data};
