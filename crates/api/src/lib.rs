//! What the SynthOrg host embeds: the adapter wiring ([`build_service`]).
//!
//! The admin REST API (axum) and the host lifecycle (scheduler, startup and
//! shutdown backups) are not implemented yet (open issue "Admin API").

mod wiring;

pub use wiring::{build_service, build_service_with};
