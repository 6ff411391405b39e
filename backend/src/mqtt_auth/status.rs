//! Presence on an external broker (`mqtt.upstream`), where there are no edge events: each
//! device's status messages, and what the broker itself reports (EMQX's events).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use companion_broker::{BrokerEvent, EventSink};
use companion_schema::DeviceId;

use super::{Presence, PresenceChange, REPORTED_OFFLINE};
use crate::db::{now_ms, Db};

/// With an external broker there are no edge events: presence follows each device's status
/// (`devices/{id}/status`, retained, and its Last Will with `online: false`), reported once
/// per change into the same writer as the edge's events.
pub struct StatusPresence<I> {
    inner: I,
    sink: Arc<dyn EventSink>,
    db: Db,
    /// The last status seen here of each device (online or not).
    known: Mutex<HashMap<DeviceId, bool>>,
}

impl<I> StatusPresence<I> {
    pub fn new(inner: I, sink: Arc<dyn EventSink>, db: Db) -> Self {
        Self {
            inner,
            sink,
            db,
            known: Mutex::new(HashMap::new()),
        }
    }
}

impl<I: crate::bus::Inbox> crate::bus::Inbox for StatusPresence<I> {
    fn deliver(
        &self,
        device: &DeviceId,
        payload: companion_schema::Payload,
        arrived: std::time::Instant,
    ) {
        self.note(device, &payload);
        self.inner.deliver(device, payload, arrived);
    }

    fn deliver_held(
        &self,
        device: &DeviceId,
        payload: companion_schema::Payload,
        arrived: std::time::Instant,
        ledger: &std::sync::Arc<companion_broker::Ledger>,
    ) -> Option<companion_broker::Receipt> {
        self.note(device, &payload);
        self.inner.deliver_held(device, payload, arrived, ledger)
    }

    fn replay(
        &self,
        device: &DeviceId,
        events: Vec<(companion_schema::Payload, std::time::Instant)>,
    ) {
        for (payload, _) in &events {
            self.note(device, payload);
        }
        self.inner.replay(device, events);
    }
}

impl<I> StatusPresence<I> {
    /// A status that changes the device's presence is reported to the presence writer.
    fn note(&self, device: &DeviceId, payload: &companion_schema::Payload) {
        if let companion_schema::Payload::Status(s) = payload {
            // A retained status comes again after every reconnect of the backend: only
            // changes count.
            let before = match self.known.lock() {
                Ok(mut known) => known.insert(device.clone(), s.online),
                Err(_) => return,
            };
            if !s.online && before.is_none() {
                // Offline, from a device this replica has not seen online: it may have gone
                // online while another replica owned it (or before this one started), and
                // its presence would stay online for good. Written straight away, ending only
                // a row that says online since before now (not through the event queue: at
                // startup every offline device's retained status arrives at once).
                let db = self.db.clone();
                let gone = Presence {
                    device: device.clone(),
                    at_ms: now_ms(),
                    change: PresenceChange::Offline {
                        reason: REPORTED_OFFLINE,
                    },
                };
                tokio::spawn(async move {
                    if let Err(e) = gone.apply(&db, true).await {
                        tracing::warn!(error = %e, device_id = %gone.device, "presence update failed; dropped");
                    }
                });
                return;
            }
            if before != Some(s.online) {
                self.sink.send(if s.online {
                    BrokerEvent::Connected {
                        device: device.clone(),
                        peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                        protocol: 4,
                    }
                } else {
                    BrokerEvent::Disconnected {
                        device: device.clone(),
                        reason: companion_broker::DisconnectReason::ReportedOffline,
                    }
                });
            }
        }
    }
}

/// Writes a connect or disconnect the external broker reported (EMQX's events), at the time
/// the broker gives, unless the row already holds something newer: the broker may deliver its
/// events out of order. Not through the event queue: nothing to dispatch (the device's owner
/// learns from its status), nothing to count. Whether it changed the row.
pub async fn write_broker_reported(
    db: &Db,
    event: &BrokerEvent,
    at_ms: i64,
) -> Result<bool, sqlx::Error> {
    match Presence::from_event(event, at_ms) {
        Some(p) => p.apply(db, true).await,
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt_auth::tests::test_db;

    /// Collects what a [`StatusPresence`] reports.
    #[derive(Default)]
    struct Events(std::sync::Mutex<Vec<BrokerEvent>>);

    impl EventSink for Events {
        fn send(&self, event: BrokerEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    struct Nobody;

    impl crate::bus::Inbox for Nobody {
        fn deliver(&self, _: &DeviceId, _: companion_schema::Payload, _: std::time::Instant) {}
        fn replay(&self, _: &DeviceId, _: Vec<(companion_schema::Payload, std::time::Instant)>) {}
    }

    fn status(online: bool) -> companion_schema::Payload {
        companion_schema::Payload::Status(companion_schema::Status {
            v: companion_schema::SCHEMA_VERSION,
            online,
            agent_version: "test".into(),
            boot_id: "b".into(),
            ts_ms: 1,
        })
    }

    async fn online_in_db(db: &Db, device: &DeviceId) -> i64 {
        sqlx::query_scalar("SELECT online FROM presence WHERE device_id = $1")
            .bind(device.as_str())
            .fetch_one(db.pool())
            .await
            .unwrap()
    }

    /// A replica that takes a device over (or starts) after it went online never saw that
    /// status: its Will must still end the device's presence, written straight away. Known
    /// changes go through the event queue once each: repeated statuses (the retained one after
    /// each reconnect of the backend) are not reported again.
    #[tokio::test]
    async fn an_offline_status_counts_even_from_a_device_not_seen_online_here() {
        use crate::bus::Inbox;
        let dir = tempfile::tempdir().unwrap();
        let (db, device) = test_db(&dir).await;
        // Online, as another replica wrote it.
        Presence {
            device: device.clone(),
            at_ms: now_ms() - 1_000,
            change: PresenceChange::Online { peer: None },
        }
        .write(&db)
        .await
        .unwrap();
        let events = Arc::new(Events::default());
        let presence = StatusPresence::new(Nobody, events.clone(), db.clone());
        let now = std::time::Instant::now();
        presence.replay(&device, vec![(status(false), now)]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while online_in_db(&db, &device).await == 1 {
            assert!(std::time::Instant::now() < deadline, "still online");
            tokio::task::yield_now().await;
        }
        presence.deliver(&device, status(false), now);
        presence.deliver(&device, status(true), now);
        presence.deliver(&device, status(true), now);
        presence.deliver(&device, status(false), now);
        let got: Vec<&'static str> = events
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                BrokerEvent::Connected { .. } => "online",
                BrokerEvent::Disconnected { .. } => "offline",
                _ => "other",
            })
            .collect();
        assert_eq!(got, ["online", "offline"]);
    }

    /// EMQX's events are written at the broker's time: one that arrives after a newer one
    /// changes nothing.
    #[tokio::test]
    async fn broker_reported_presence_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (db, device) = test_db(&dir).await;
        let connected = BrokerEvent::Connected {
            device: device.clone(),
            peer: std::net::SocketAddr::from(([198, 51, 100, 7], 1)),
            protocol: 4,
        };
        let gone = BrokerEvent::Disconnected {
            device: device.clone(),
            reason: companion_broker::DisconnectReason::Clean,
        };
        assert!(write_broker_reported(&db, &connected, 2_000).await.unwrap());
        // The disconnect of an earlier connection, delivered late.
        assert!(!write_broker_reported(&db, &gone, 1_000).await.unwrap());
        assert_eq!(online_in_db(&db, &device).await, 1);
        assert!(write_broker_reported(&db, &gone, 3_000).await.unwrap());
        assert_eq!(online_in_db(&db, &device).await, 0);
    }
}
