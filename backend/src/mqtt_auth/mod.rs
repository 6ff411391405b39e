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
use crate::login_digest::LoginDigest;
use crate::registry::tokens::verify;
use crate::registry::DeviceStore;

mod status;
pub use status::{write_broker_reported, StatusPresence};

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
    /// (Source address, reason) windows of refused logins not yet summed up in the audit log.
    pub audit_pending_summaries: Gauge,
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
        registry.register(
            "backend_audit_pending_summaries",
            "Windows of refused MQTT logins (per source address and reason) whose summary audit row is not written yet",
            m.audit_pending_summaries.clone(),
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

/// Presence writes that failed (the database was away), newest per device, retried until
/// they succeed: a device that came or went during an outage is shown right afterwards.
#[derive(Default)]
struct Unwritten {
    latest: HashMap<DeviceId, Presence>,
    retry: Option<Duration>,
}

/// Most unwritten presence changes kept; beyond it they are dropped and counted.
const UNWRITTEN_CAPACITY: usize = 100_000;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl Unwritten {
    fn keep(&mut self, p: Presence, metrics: &PresenceMetrics) {
        if self.latest.len() >= UNWRITTEN_CAPACITY && !self.latest.contains_key(&p.device) {
            metrics.events_dropped.inc();
            return;
        }
        self.latest.insert(p.device.clone(), p);
        self.retry.get_or_insert(RETRY_MIN);
    }

    /// Writes what waits; stops at the first failure and backs off.
    async fn flush(&mut self, db: &Db) {
        let devices: Vec<DeviceId> = self.latest.keys().cloned().collect();
        for device in devices {
            let Some(p) = self.latest.get(&device) else {
                continue;
            };
            match p.write(db).await {
                Ok(()) => {}
                Err(e) if !crate::db::unavailable(&e) => {
                    tracing::warn!(error = %e, device_id = %device, "presence update failed; dropped");
                }
                Err(e) => {
                    let next = self.retry.map_or(RETRY_MIN, |r| (r * 2).min(RETRY_MAX));
                    tracing::debug!(error = %e, waiting = self.latest.len(), retry_ms = next.as_millis() as u64, "presence still not written");
                    self.retry = Some(next);
                    return;
                }
            }
            self.latest.remove(&device);
        }
        tracing::info!("presence written again after a database failure");
        self.retry = None;
    }
}

/// A presence change, with the time it happened.
struct Presence {
    device: DeviceId,
    at_ms: i64,
    change: PresenceChange,
}

const REPORTED_OFFLINE: &str = companion_broker::DisconnectReason::ReportedOffline.as_str();

enum PresenceChange {
    /// `peer`: the device's address, unknown on an external broker.
    Online {
        peer: Option<String>,
    },
    Offline {
        reason: &'static str,
    },
}

/// The upsert of an online row; with " WHERE presence.last_seen_ms <= $2" appended, only over
/// an older one.
macro_rules! online_upsert {
    () => {
        "INSERT INTO presence (device_id, online, last_seen_ms, connected_since_ms, peer)
         SELECT $1, 1, $2, $2, $3 WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = $1)
         ON CONFLICT (device_id) DO UPDATE SET
            online = 1, last_seen_ms = $2, connected_since_ms = $2, peer = $3"
    };
}

/// Setting a row offline; `WHERE` clauses follow.
macro_rules! offline_update {
    () => {
        "UPDATE presence SET online = 0, last_seen_ms = $2, last_disconnect_ms = $2,
            last_disconnect_reason = $3, connected_since_ms = NULL
         WHERE device_id = $1 AND last_seen_ms <= $2"
    };
}

impl Presence {
    /// The presence change an edge (or external broker) event stands for, at `at_ms`.
    fn from_event(event: &BrokerEvent, at_ms: i64) -> Option<Self> {
        let (device, change) = match event {
            BrokerEvent::Connected { device, peer, .. } => (
                device,
                PresenceChange::Online {
                    peer: (!peer.ip().is_unspecified()).then(|| peer.ip().to_string()),
                },
            ),
            BrokerEvent::Disconnected { device, reason } => (
                device,
                PresenceChange::Offline {
                    reason: reason.as_str(),
                },
            ),
            _ => return None,
        };
        Some(Self {
            device: device.clone(),
            at_ms,
            change,
        })
    }

    async fn write(&self, db: &Db) -> Result<(), sqlx::Error> {
        self.apply(db, false).await.map(drop)
    }

    /// Applies the change. `newer_only`: only over a row that has seen nothing since (the
    /// source may deliver out of order). A status saying offline (`reported_offline`) may be
    /// news or an old retained one, so it only ever ends a row that says online. Whether a
    /// row changed.
    async fn apply(&self, db: &Db, newer_only: bool) -> Result<bool, sqlx::Error> {
        let _gate = db.write_gate().await;
        let sql = match (&self.change, newer_only) {
            (PresenceChange::Online { .. }, false) => online_upsert!(),
            (PresenceChange::Online { .. }, true) => {
                concat!(online_upsert!(), " WHERE presence.last_seen_ms <= $2")
            }
            (PresenceChange::Offline { reason }, _) if *reason == REPORTED_OFFLINE => {
                concat!(offline_update!(), " AND online = 1")
            }
            (PresenceChange::Offline { .. }, true) => offline_update!(),
            (PresenceChange::Offline { .. }, false) => {
                "INSERT INTO presence (device_id, online, last_seen_ms, last_disconnect_ms, last_disconnect_reason)
                 SELECT $1, 0, $2, $2, $3 WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = $1)
                 ON CONFLICT (device_id) DO UPDATE SET
                    online = 0, last_seen_ms = $2, last_disconnect_ms = $2,
                    last_disconnect_reason = $3, connected_since_ms = NULL"
            }
        };
        let third = match &self.change {
            PresenceChange::Online { peer } => peer.as_deref(),
            PresenceChange::Offline { reason } => Some(*reason),
        };
        let done = sqlx::query(sql)
            .bind(self.device.as_str())
            .bind(self.at_ms)
            .bind(third)
            .execute(db.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// How often windows of refused logins are checked for their end.
const DIGEST_TICK: Duration = Duration::from_secs(1);

/// Writes presence rows and audit records for edge events until `shutdown`. Presence that
/// cannot be written (the database is away) is retried, newest per device, until it is.
/// Refused logins go through `digest` (one row per source address, reason and window; the
/// summaries of open windows are written at shutdown).
pub async fn write_events(
    mut rx: mpsc::Receiver<BrokerEvent>,
    db: Db,
    audit: AuditLog,
    devices: Option<Arc<crate::devices::Dispatcher>>,
    metrics: PresenceMetrics,
    mut digest: LoginDigest,
    shutdown: CancellationToken,
) {
    let mut unwritten = Unwritten::default();
    let mut tick = tokio::time::interval(DIGEST_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When unwritten presence is due again: a fixed instant, so that events and ticks in
    // between do not push the retry back.
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        retry_at = match (unwritten.retry, retry_at) {
            (None, _) => None,
            (Some(_), Some(at)) => Some(at),
            (Some(after), None) => Some(tokio::time::Instant::now() + after),
        };
        let open_windows = !digest.is_empty();
        // Cases: an event to write; unwritten presence is due again; windows of refused
        // logins may have closed; shutdown (then drain what is queued).
        let event = tokio::select! {
            ev = rx.recv() => ev,
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                unwritten.flush(&db).await;
                retry_at = None;
                continue;
            }
            _ = tick.tick(), if open_windows => {
                let closed = digest.due(Instant::now());
                write_audit(&audit, closed, &digest, &metrics).await;
                continue;
            }
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
        if let BrokerEvent::AuthFailed {
            client_id,
            peer,
            reason,
        } = &event
        {
            let rows = digest.refused(client_id, *peer, *reason, Instant::now());
            write_audit(&audit, rows, &digest, &metrics).await;
            continue;
        }
        handle_event(&db, &audit, event, &mut unwritten, &metrics).await;
    }
    if !unwritten.latest.is_empty() {
        unwritten.flush(&db).await;
    }
    let rest = digest.flush();
    write_audit(&audit, rest, &digest, &metrics).await;
}

async fn write_audit(
    audit: &AuditLog,
    entries: Vec<AuditEntry>,
    digest: &LoginDigest,
    metrics: &PresenceMetrics,
) {
    for entry in entries {
        audit.record(entry).await;
    }
    metrics
        .audit_pending_summaries
        .set(i64::try_from(digest.len()).unwrap_or(i64::MAX));
}

async fn handle_event(
    db: &Db,
    audit: &AuditLog,
    event: BrokerEvent,
    unwritten: &mut Unwritten,
    metrics: &PresenceMetrics,
) {
    match event {
        BrokerEvent::Connected { .. } | BrokerEvent::Disconnected { .. } => {
            if let Some(p) = Presence::from_event(&event, now_ms()) {
                write_presence(db, p, unwritten, metrics).await;
            }
        }
        // Written through the digest by `write_events`.
        BrokerEvent::AuthFailed { .. } => {}
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

/// Writes a presence change now, unless others wait for the database (then it joins them,
/// the newest per device winning, instead of waiting out a timeout of its own), or the write
/// fails (then it waits).
async fn write_presence(
    db: &Db,
    p: Presence,
    unwritten: &mut Unwritten,
    metrics: &PresenceMetrics,
) {
    if !unwritten.latest.is_empty() {
        unwritten.keep(p, metrics);
        return;
    }
    match p.write(db).await {
        Ok(()) => {}
        Err(e) if crate::db::unavailable(&e) => {
            tracing::warn!(error = %e, device_id = %p.device, "presence update failed; will retry");
            unwritten.keep(p, metrics);
        }
        // Not a retry's business (it would hold every later presence change behind it).
        Err(e) => {
            tracing::warn!(error = %e, device_id = %p.device, "presence update failed; dropped")
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::registry::model::{DeviceName, DeviceType};
    use crate::registry::{DeviceStore, NewDevice};

    pub(super) async fn test_db(dir: &tempfile::TempDir) -> (Db, DeviceId) {
        let settings = crate::settings::Settings {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        };
        let db = Db::connect(&settings).await.unwrap();
        db.migrate().await.unwrap();
        let (device, _) = DeviceStore::new(db.clone())
            .create(&NewDevice {
                device_id: None,
                name: DeviceName::parse("Watched").unwrap(),
                device_type: DeviceType::Simulated,
                capabilities: Default::default(),
            })
            .await
            .unwrap();
        (db, device.device_id)
    }

    /// An offline status ends an online row, and leaves an offline one (and the time it went
    /// offline) as it was: a retained one comes again after every reconnect.
    #[tokio::test]
    async fn a_reported_offline_changes_only_an_online_row() {
        let dir = tempfile::tempdir().unwrap();
        let (db, id) = test_db(&dir).await;
        let change = |at_ms, change| Presence {
            device: id.clone(),
            at_ms,
            change,
        };
        let row = || async {
            sqlx::query_as::<_, (i64, Option<i64>)>(
                "SELECT online, last_disconnect_ms FROM presence WHERE device_id = $1",
            )
            .bind(id.as_str())
            .fetch_one(db.pool())
            .await
            .unwrap()
        };
        let offline = || PresenceChange::Offline {
            reason: REPORTED_OFFLINE,
        };
        change(1, PresenceChange::Online { peer: None })
            .write(&db)
            .await
            .unwrap();
        change(2, offline()).write(&db).await.unwrap();
        assert_eq!(row().await, (0, Some(2)));
        change(3, offline()).write(&db).await.unwrap();
        assert_eq!(
            row().await,
            (0, Some(2)),
            "a repeated offline changed nothing"
        );
    }

    /// A presence change of a device deleted meanwhile used to fail on the foreign key, be
    /// kept for a retry that could never succeed, and hold every later change behind it.
    #[tokio::test]
    async fn a_deleted_devices_presence_does_not_hold_up_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (db, device) = test_db(&dir).await;
        let metrics = PresenceMetrics::register(&mut Registry::default());
        let mut unwritten = Unwritten::default();
        let gone = Presence {
            device: DeviceId::parse("deleted-1").unwrap(),
            at_ms: 1,
            change: PresenceChange::Offline { reason: "kicked" },
        };
        write_presence(&db, gone, &mut unwritten, &metrics).await;
        let kept = Presence {
            device: device.clone(),
            at_ms: 2,
            change: PresenceChange::Online { peer: None },
        };
        write_presence(&db, kept, &mut unwritten, &metrics).await;
        assert!(unwritten.latest.is_empty(), "nothing waits for a retry");
        let online: Option<i64> =
            sqlx::query_scalar("SELECT online FROM presence WHERE device_id = $1")
                .bind(device.as_str())
                .fetch_optional(db.pool())
                .await
                .unwrap();
        assert_eq!(online, Some(1));
    }
}
