//! Admin REST API (axum) and host lifecycle.
//!
//! Not implemented yet (open issue "Admin API"); this crate is an empty
//! skeleton and exports nothing.
