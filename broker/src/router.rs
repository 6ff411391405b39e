//! The embedded rumqttd router: `Router::new(..).spawn()` (its own thread, started by rumqttd)
//! with no network listeners of its own. The edge and the backend reach it in process through
//! local links ([`crate::link`]); there is no port on which anything could bypass the edge.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rumqttd::local::LinkBuilder;
use rumqttd::{Router, RouterConfig, SegmentConfig, Strategy};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::link::RouterPort;
use crate::settings::MqttSettings;

/// Why the router could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("registering the alerts link: {0}")]
    Alerts(String),
}

/// Starts the router thread; returns the port links are opened through.
pub(crate) fn start(
    settings: &MqttSettings,
    lost: Counter,
    ids: Gauge,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Arc<RouterPort>, RouterError> {
    let router = Router::new(0, router_config(settings));
    let router_tx = router.spawn();

    // rumqttd only pushes alerts when something sends it `Event::SendAlerts`, which only the
    // timer inside `Broker::start` does. The links count lost messages themselves (offset
    // jumps, `link::Link`); the alerts link stays registered so its log lines still show.
    let alerts = rumqttd::alerts::AlertsLink::new(router_tx.clone())
        .map_err(|e| RouterError::Alerts(e.to_string()))?;
    let token = shutdown.clone();
    tracker.spawn(async move {
        loop {
            // Cases: shutdown; a batch of alerts; the router is gone.
            tokio::select! {
                _ = token.cancelled() => break,
                batch = alerts.next() => match batch {
                    Ok(batch) => log_alerts(&batch),
                    Err(_) => break,
                },
            }
        }
    });

    let build_tx = router_tx.clone();
    let build = Box::new(move |client_id: &str| {
        LinkBuilder::new(client_id, build_tx.clone())
            .clean_session(true)
            .dynamic_filters(true)
            .build()
            .map(|(tx, rx, _connack)| (tx, rx))
            .map_err(|e| e.to_string())
    });
    let queued = Box::new(move || router_tx.len());
    Ok(Arc::new(RouterPort::new(build, queued, lost, ids)))
}

fn log_alerts(batch: &[rumqttd::Alert]) {
    for alert in batch {
        tracing::warn!(client_id = %alert.client_id, kind = alert.kind.name(),
            detail = %alert.kind.description(), "router alert");
    }
}

/// The kinds whose fleet-wide logs carry most of the bytes.
fn bulk(kind: companion_schema::TopicKind) -> bool {
    use companion_schema::TopicKind::*;
    matches!(kind, Telemetry | AudioUp | AudioDown)
}

fn router_config(settings: &MqttSettings) -> RouterConfig {
    // One commit log per subscription filter, never freed (rumqtt#1001): fleet-wide filters
    // (`devices/+/<suffix>`, the backend's) get `router_segment_bytes` for the bulk kinds
    // (telemetry, audio) and `router_control_segment_bytes` for the rest; everything else (a
    // device's own down topics, dynamic filters) the smaller `router_device_segment_bytes`.
    let custom: HashMap<String, SegmentConfig> = companion_schema::TopicKind::ALL
        .into_iter()
        .map(|k| {
            let size = if bulk(k) {
                settings.router_segment_bytes
            } else {
                settings.router_control_segment_bytes
            };
            let segment = SegmentConfig {
                max_segment_size: size,
                max_segment_count: settings.router_segment_count,
            };
            (k.all_devices_filter(), segment)
        })
        .collect();
    RouterConfig {
        max_connections: settings.max_connections + 1024,
        max_outgoing_packet_count: 200,
        max_segment_size: settings.router_device_segment_bytes,
        max_segment_count: settings.router_segment_count,
        custom_segment: Some(custom),
        initialized_filters: None,
        shared_subscriptions_strategy: Strategy::RoundRobin,
    }
}
