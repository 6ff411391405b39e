//! `companion-backend`: the control plane behind the `companion` binary.
//!
//! `companion serve` ([`app::run`]) starts, in one process and on one tokio runtime:
//! - storage ([`db`]): an sqlx `AnyPool` over SQLite or PostgreSQL, migrated at start-up;
//! - the broker edge and its embedded rumqttd router (crate `companion-broker`), which calls
//!   back into `mqtt_auth` to authenticate devices over the [`registry`] and reports
//!   presence/security events through a bounded channel to the writer task in `mqtt_auth`
//!   (refused logins are summed up per source address and window by `login_digest` before
//!   they reach the audit log);
//! - the backend's own MQTT connection to the router ([`bus`]): one task owns the event loop
//!   and hands every decoded device message to a [`bus::Inbox`]: the device runtime
//!   (`devices`), whose dispatcher runs one worker task per active device (telemetry,
//!   presence, personas, the [`rules`] engine, the session state machine; a turn task per
//!   utterance calls the [`voice`] pipeline);
//! - the telemetry batch writer and the rule-file watcher;
//! - HTTP ([`http`]: the transport, serving the route table [`api`] builds: the REST API and
//!   `/health`, `/ready`, `/metrics`), plain or TLS.
//!
//! Dependencies between modules go one way (`.ci/import_loops.py` checks it in CI): `api` →
//! `http`, `context` → `api_error`; `devices` → `bus`; inside `devices`, `worker` drives the
//! plain `session` state machine and spawns `turn`s.
//!
//! Ownership: [`app::App`] builds everything, owns the metrics registry until it is frozen
//! into an `Arc`, and spawns each long-lived task on one `TaskTracker`. One root
//! `CancellationToken` (cancelled by SIGINT/SIGTERM in `main`) stops them all; shutdown waits
//! at most [`app::SHUTDOWN_GRACE`]. Channels are bounded and their capacities are named
//! constants (`devices::DEVICE_QUEUE`, [`bus::CLIENT_QUEUE`], `mqtt_auth::EVENT_QUEUE`,
//! [`voice::OUTPUT_QUEUE`]).

pub mod api;
pub mod api_error;
pub mod app;
pub(crate) mod audit;
pub mod broker_api;
pub mod bus;
pub mod cli;
pub mod cluster;
pub mod context;
pub mod datadir;
pub mod db;
pub(crate) mod devices;
pub mod http;
pub mod logging;
pub(crate) mod login_digest;
pub mod metrics;
pub(crate) mod mqtt_auth;
pub(crate) mod mqtt_hook;
pub mod personas;
pub(crate) mod ratelimit;
pub mod registry;
pub mod rules;
pub(crate) mod secret;
pub(crate) mod secrets;
pub mod settings;
pub mod voice;
