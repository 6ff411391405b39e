//! `companion-backend`: the control plane behind the `companion` binary.
//!
//! `companion serve` ([`app::run`]) starts, in one process and on one tokio runtime:
//! - storage ([`db`]): an sqlx pool over SQLite or PostgreSQL, migrated at start-up;
//! - the REST API and `/health`, `/ready`, `/metrics` ([`http`]), one warp server task;
//! - the embedded broker edge (crate `companion-broker`).
//!
//! Ownership: [`app::App`] owns the settings, the database handle and the metrics registry;
//! it builds the HTTP state and spawns each long-lived task on one `TaskTracker`. One root
//! `CancellationToken` (cancelled by SIGINT/SIGTERM in `main`) stops them all; shutdown waits
//! at most [`app::SHUTDOWN_GRACE`].

pub mod api;
pub mod app;
pub mod audit;
pub mod bus;
pub mod cli;
pub mod context;
pub mod db;
pub mod devices;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod mqtt_auth;
pub mod personas;
pub mod ratelimit;
pub mod registry;
pub mod rules;
pub mod secrets;
pub mod settings;
pub mod voice;
