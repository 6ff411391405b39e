//! The downlink: one router link subscribed to every device's down topics
//! (`devices/+/<down kind>`, a handful of filters for the whole fleet), handing each message to
//! the live session of the device it is for, plus the last retained message per device and
//! kind for a device that subscribes later. The router keeps no state per device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use companion_schema::{DeviceId, Direction, Topic, TopicKind};
use tokio_util::sync::CancellationToken;

use super::sessions::{Delivery, Down};
use super::Edge;
use crate::local::{LocalClient, LocalEvent};
use crate::metrics::ReasonLabel;

/// The fan-out's client id on the router.
pub(crate) const FANOUT_ID: &str = "fanout";
const REOPEN_PAUSE: Duration = Duration::from_millis(100);

/// The last message per device and retained kind (persona, config).
#[derive(Default)]
pub(crate) struct Retained {
    last: Mutex<HashMap<(DeviceId, TopicKind), (Bytes, Bytes)>>,
}

impl Retained {
    fn keep(&self, device: DeviceId, kind: TopicKind, topic: Bytes, payload: Bytes) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if payload.is_empty() {
            last.remove(&(device, kind)); // an empty retained message clears it (MQTT)
        } else {
            last.insert((device, kind), (topic, payload));
        }
    }

    /// The retained message for `device`'s `kind`, as a delivery.
    pub(crate) fn get(&self, device: &DeviceId, kind: TopicKind) -> Option<Down> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.get(&(device.clone(), kind))
            .map(|(topic, payload)| Down {
                kind,
                topic: topic.clone(),
                payload: payload.clone(),
                retain: true,
            })
    }
}

/// Opens the fan-out's link and subscribes it to every down filter.
pub(crate) async fn open(edge: &Edge) -> Result<LocalClient, crate::RouterLinkError> {
    let mut client = LocalClient::open(
        &edge.router,
        &format!("{}-{FANOUT_ID}", crate::RESERVED_CLIENT_ID_PREFIX),
    )
    .await?;
    let filters: Vec<String> = TopicKind::ALL
        .into_iter()
        .filter(|k| k.direction() == Direction::Down)
        .map(|k| k.all_devices_filter())
        .collect();
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    client.subscribe(&filters).await?;
    Ok(client)
}

/// Runs the fan-out until shutdown, reopening its link if the router drops it.
pub(crate) async fn run(edge: Arc<Edge>, mut client: LocalClient, shutdown: CancellationToken) {
    loop {
        loop {
            // Cases: shutdown; the next message from the router (or the link's end).
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = client.next() => e,
            };
            match event {
                Ok(LocalEvent::Publish { topic, payload, .. }) => dispatch(&edge, topic, payload),
                Ok(LocalEvent::SubAck) => {}
                Err(e) => {
                    tracing::error!(error = %e, "the router dropped the edge's downlink; reopening it");
                    break;
                }
            }
        }
        client = loop {
            // Cases: shutdown; retry after a pause.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REOPEN_PAUSE) => {}
            }
            match open(&edge).await {
                Ok(c) => break c,
                Err(e) => tracing::error!(error = %e, "reopening the downlink failed"),
            }
        };
    }
}

fn dispatch(edge: &Edge, topic: Bytes, payload: Bytes) {
    let Some(parsed) = std::str::from_utf8(&topic)
        .ok()
        .and_then(|t| Topic::parse(t).ok())
        .filter(|t| t.direction() == Direction::Down)
    else {
        return;
    };
    if parsed.kind.retained() {
        edge.retained.keep(
            parsed.device.clone(),
            parsed.kind,
            topic.clone(),
            payload.clone(),
        );
    }
    let down = Down {
        kind: parsed.kind,
        topic,
        payload,
        retain: false,
    };
    if let Delivery::Full = edge.sessions.deliver(&parsed.device, down) {
        // The device reads slower than the backend writes to it: the message is lost.
        tracing::warn!(device_id = %parsed.device, kind = parsed.kind.label(), "device queue full; message dropped");
        edge.metrics.lost.inc();
        edge.metrics
            .dropped
            .get_or_create(&ReasonLabel {
                reason: "device_queue_full",
            })
            .inc();
    }
}
