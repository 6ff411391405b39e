//! Logging with `tracing`: plain or JSON by configuration, filtered by `RUST_LOG`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::LogFormat;

const DEFAULT_FILTER: &str = "info,sqlx=warn,rumqttd=warn,hyper=warn,warp=warn";

/// Installs the global subscriber. Call once, from `main`. `quiet` lowers the default level
/// to warnings (for one-shot commands); `RUST_LOG` always wins. Colours only on a terminal:
/// journald, `docker logs` and files get plain text.
pub fn init(format: LogFormat, quiet: bool) {
    let default = if quiet { "warn" } else { DEFAULT_FILTER };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::stderr().is_terminal();
    let result = match format {
        LogFormat::Plain => plain(filter, ansi, std::io::stderr).try_init(),
        LogFormat::Json => json(filter, std::io::stderr).try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging was already initialised: {e}");
    }
}

fn plain<W>(filter: EnvFilter, ansi: bool, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer)
        .finish()
        .with(QuietRouterDrops)
}

fn json<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(filter)
        .with_writer(writer)
        .finish()
        .with(QuietRouterDrops)
}

static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Marks the process as stopping: from now on rumqttd's connection errors are expected (every
/// internal connection is being closed, some with a reset) and no longer logged.
pub fn shutting_down() {
    SHUTTING_DOWN.store(true, Ordering::Relaxed);
}

/// rumqttd 0.20 logs `ERROR router-drop error=Recv(Disconnected)` whenever a client of its
/// own listener disconnects cleanly: the router drops the link on DISCONNECT and the link task
/// reports that as an error. Every device that disconnects (its upstream link forwards the
/// DISCONNECT) and the start-up readiness probes did it, so `companion serve` printed errors
/// on every start and on every normal disconnect. The edge logs device disconnects itself
/// (`device disconnected`, with the reason), so these events are dropped; other rumqttd
/// errors pass, except once the process is shutting down ([`shutting_down`]), when its
/// connections being reset are expected.
///
/// rumqttd's spans are never created either: its router opens two ERROR-level spans per
/// publish (`incoming_payload`, and `publish` with the topic formatted by `Debug`), which
/// the `rumqttd=warn` filter lets through; they were ~3 % of the server's CPU at 10,000
/// messages/s and only ever add a client id to rumqttd's own rare errors (the edge logs
/// the device id of everything it does itself).
struct QuietRouterDrops;

const RUMQTTD_LINK_TARGET: &str = "rumqttd::server::broker";

fn is_rumqttd_span(metadata: &Metadata<'_>) -> bool {
    metadata.is_span()
        && (metadata.target() == "rumqttd" || metadata.target().starts_with("rumqttd::"))
}

impl<S: Subscriber> Layer<S> for QuietRouterDrops {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if is_rumqttd_span(metadata) {
            Interest::never()
        } else {
            Interest::always()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        !is_rumqttd_span(metadata)
    }

    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        if event.metadata().target() != RUMQTTD_LINK_TARGET {
            return true;
        }
        if SHUTTING_DOWN.load(Ordering::Relaxed) {
            return false;
        }
        let mut message = IsMessage {
            wanted: "router-drop",
            found: false,
        };
        event.record(&mut message);
        !message.found
    }
}

/// Whether an event's message is exactly `wanted`.
struct IsMessage {
    wanted: &'static str,
    found: bool,
}

impl Visit for IsMessage {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.found = format!("{value:?}") == self.wanted;
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.found = value == self.wanted;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn emit_rumqttd_events() {
        let e = "Recv(Disconnected)";
        tracing::error!(target: "rumqttd::server::broker", error = ?e, "router-drop");
        tracing::error!(target: "rumqttd::server::broker", error = ?e, "disconnected");
        tracing::error!(target: "rumqttd::router", "router-drop");
        tracing::info!(target: "companion_broker::edge", "device disconnected");
    }

    #[test]
    fn rumqttds_spans_are_not_created_and_its_events_still_pass() {
        let out = Captured::default();
        let subscriber = plain(EnvFilter::new(DEFAULT_FILTER), false, out.clone());
        tracing::subscriber::with_default(subscriber, || {
            let router = tracing::error_span!(target: "rumqttd::router::routing", "incoming_payload", client_id = "dev-1");
            assert!(router.is_disabled(), "rumqttd's span is not created");
            router.in_scope(|| tracing::error!(target: "rumqttd::router", "a router error"));
            let ours = tracing::error_span!(target: "companion_broker::edge", "edge_span", device_id = "dev-2");
            assert!(!ours.is_disabled(), "other spans are");
            ours.in_scope(|| tracing::error!(target: "companion_broker::edge", "an edge error"));
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("a router error"), "{text}");
        assert!(!text.contains("incoming_payload"), "{text}");
        assert!(
            text.contains("edge_span") && text.contains("an edge error"),
            "{text}"
        );
    }

    #[test]
    fn rumqttds_clean_disconnect_errors_are_dropped_and_everything_else_passes() {
        for json_format in [false, true] {
            let out = Captured::default();
            let filter = EnvFilter::new(DEFAULT_FILTER);
            if json_format {
                tracing::subscriber::with_default(json(filter, out.clone()), emit_rumqttd_events);
            } else {
                let subscriber = plain(filter, false, out.clone());
                tracing::subscriber::with_default(subscriber, emit_rumqttd_events);
            }
            let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 3, "{text}");
            assert!(
                lines[0].contains("rumqttd::server::broker") && lines[0].contains("disconnected")
            );
            assert!(lines[1].contains("rumqttd::router") && lines[1].contains("router-drop"));
            assert!(lines[2].contains("device disconnected"));
            assert!(
                !text.contains('\x1b'),
                "no colour codes off a terminal: {text:?}"
            );
        }
        // Once shutting down, rumqttd's link errors are expected: none is logged. (This is
        // the only test that logs through this layer, so the global flag disturbs no other.)
        shutting_down();
        let out = Captured::default();
        let subscriber = plain(EnvFilter::new(DEFAULT_FILTER), false, out.clone());
        tracing::subscriber::with_default(subscriber, emit_rumqttd_events);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("rumqttd::router"));
        assert!(lines[1].contains("device disconnected"));
    }
}
