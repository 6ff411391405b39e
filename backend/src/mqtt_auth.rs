//! The broker's `Authenticator` over the registry, and the `EventSink` that turns edge events
//! into presence rows and audit records.
//!
//! Positive credential lookups are cached briefly; rotation, disabling and deletion invalidate
//! the entry. A database error denies, never allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use companion_broker::{
    AuthDecision, AuthRequest, Authenticator, BrokerEvent, DenyReason, EventSink,
};
use companion_schema::DeviceId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEntry, AuditLog, Outcome};
use crate::db::{now_ms, Db};
use crate::registry::tokens::verify;
use crate::registry::DeviceStore;

/// How long a positive lookup is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// Most cached devices; the cache is emptied when it would grow past this.
const CACHE_CAPACITY: usize = 100_000;
/// Edge events waiting to be written.
pub const EVENT_QUEUE: usize = 4096;

#[derive(Clone)]
struct Cached {
    token_hash: String,
    at: Instant,
}

/// Authenticates devices against the registry.
pub struct RegistryAuthenticator {
    devices: DeviceStore,
    cache: Mutex<HashMap<DeviceId, Cached>>,
}

impl RegistryAuthenticator {
    pub fn new(devices: DeviceStore) -> Arc<Self> {
        Arc::new(Self {
            devices,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Forgets a device's cached credential (rotation, disable, delete).
    pub fn invalidate(&self, device: &DeviceId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(device);
        }
    }

    fn cached(&self, device: &DeviceId) -> Option<Cached> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(device)
            .filter(|c| c.at.elapsed() < CACHE_TTL)
            .cloned()
    }

    fn remember(&self, device: DeviceId, token_hash: String) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(
                device,
                Cached {
                    token_hash,
                    at: Instant::now(),
                },
            );
        }
    }
}

#[async_trait::async_trait]
impl Authenticator for RegistryAuthenticator {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> AuthDecision {
        let Ok(device) = DeviceId::parse(req.username) else {
            return AuthDecision::Deny(DenyReason::IdentityMismatch);
        };
        if let Some(cached) = self.cached(&device) {
            if verify(req.password, &cached.token_hash) {
                return AuthDecision::Allow { device };
            }
        }
        match self.devices.credential(&device).await {
            Ok(None) => AuthDecision::Deny(DenyReason::UnknownDevice),
            Ok(Some(cred)) if !cred.enabled => AuthDecision::Deny(DenyReason::Disabled),
            Ok(Some(cred)) => {
                if verify(req.password, &cred.token_hash) {
                    self.remember(device.clone(), cred.token_hash);
                    AuthDecision::Allow { device }
                } else {
                    AuthDecision::Deny(DenyReason::BadToken)
                }
            }
            Err(e) => {
                tracing::error!(error = %e, device_id = %device, "credential lookup failed; denying");
                AuthDecision::Deny(DenyReason::Unavailable)
            }
        }
    }
}

/// Metrics of the event path.
#[derive(Clone, Default)]
pub struct PresenceMetrics {
    pub active_devices: Gauge,
    pub events_dropped: Counter,
}

impl PresenceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "active_devices",
            "Devices connected through the broker edge now",
            m.active_devices.clone(),
        );
        registry.register(
            "backend_broker_events_dropped",
            "Edge events dropped because the presence/audit writer was behind",
            m.events_dropped.clone(),
        );
        m
    }
}

/// Hands edge events to the writer task without blocking the connection tasks.
pub struct ChannelSink {
    tx: mpsc::Sender<BrokerEvent>,
    metrics: PresenceMetrics,
}

impl ChannelSink {
    pub fn new(metrics: PresenceMetrics) -> (Arc<Self>, mpsc::Receiver<BrokerEvent>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        (Arc::new(Self { tx, metrics }), rx)
    }
}

impl EventSink for ChannelSink {
    fn send(&self, event: BrokerEvent) {
        match &event {
            BrokerEvent::Connected { .. } => {
                self.metrics.active_devices.inc();
            }
            BrokerEvent::Disconnected { .. } => {
                self.metrics.active_devices.dec();
            }
            _ => {}
        }
        if self.tx.try_send(event).is_err() {
            self.metrics.events_dropped.inc();
        }
    }
}

/// Writes presence rows and audit records for edge events until `shutdown`.
pub async fn write_events(
    mut rx: mpsc::Receiver<BrokerEvent>,
    db: Db,
    audit: AuditLog,
    devices: Option<Arc<crate::devices::Dispatcher>>,
    shutdown: CancellationToken,
) {
    loop {
        // Cases: an event to write; shutdown (then drain what is queued).
        let event = tokio::select! {
            ev = rx.recv() => ev,
            _ = shutdown.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(event) = event else { break };
        if let Some(d) = &devices {
            match &event {
                BrokerEvent::Connected { device, .. } => {
                    d.dispatch(
                        device,
                        crate::devices::DeviceEvent::Presence { online: true },
                    );
                }
                BrokerEvent::Disconnected { device, .. } => {
                    d.dispatch(
                        device,
                        crate::devices::DeviceEvent::Presence { online: false },
                    );
                }
                _ => {}
            }
        }
        handle_event(&db, &audit, event).await;
    }
}

async fn handle_event(db: &Db, audit: &AuditLog, event: BrokerEvent) {
    match event {
        BrokerEvent::Connected { device, peer, .. } => {
            let now = now_ms();
            let r = sqlx::query(
                "INSERT INTO presence (device_id, online, last_seen_ms, connected_since_ms, peer)
                 VALUES ($1, 1, $2, $2, $3)
                 ON CONFLICT (device_id) DO UPDATE SET
                    online = 1, last_seen_ms = $2, connected_since_ms = $2, peer = $3",
            )
            .bind(device.as_str())
            .bind(now)
            .bind(peer.ip().to_string())
            .execute(db.pool())
            .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, device_id = %device, "presence update failed");
            }
        }
        BrokerEvent::Disconnected { device, reason } => {
            let now = now_ms();
            let r = sqlx::query(
                "INSERT INTO presence (device_id, online, last_seen_ms, last_disconnect_ms, last_disconnect_reason)
                 VALUES ($1, 0, $2, $2, $3)
                 ON CONFLICT (device_id) DO UPDATE SET
                    online = 0, last_seen_ms = $2, last_disconnect_ms = $2,
                    last_disconnect_reason = $3, connected_since_ms = NULL",
            )
            .bind(device.as_str())
            .bind(now)
            .bind(reason.as_str())
            .execute(db.pool())
            .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, device_id = %device, "presence update failed");
            }
        }
        BrokerEvent::AuthFailed {
            client_id,
            peer,
            reason,
        } => {
            audit
                .record(
                    AuditEntry::new(format!("mqtt:{client_id}"), "mqtt.connect", Outcome::Denied)
                        .target(client_id)
                        .remote(Some(peer))
                        .detail(reason.as_str()),
                )
                .await;
        }
        BrokerEvent::AclDenied {
            device,
            action,
            topic,
        } => {
            audit
                .record(
                    AuditEntry::new(format!("device:{device}"), "mqtt.acl", Outcome::Denied)
                        .target(device.to_string())
                        .detail(format!("{} {topic}", action.as_str())),
                )
                .await;
        }
    }
}
