//! Devices on an external MQTT broker (EMQX, RabbitMQ, mosquitto-go-auth): the decisions
//! behind the HTTP authentication/authorization hooks under `/api/v1/mqtt/` (the wire shapes
//! are in `api::mqtt_hook`).
//!
//! The rules are the embedded edge's: a device logs in with `client_id == username ==
//! device id` and its token; ids with the platform's reserved prefix never log in; a device
//! publishes only to its own up topics and subscribes only to its own down topics
//! (`companion_broker::acl`). A database error denies, never allows.
//!
//! Credentials are cached for [`CACHE_TTL`] (1 s), found or not, so a broker asking about
//! every publish does not cost a query each, and a rotation, disabling or deletion made on
//! any replica is honoured within a second (on this one at once: [`Hook::invalidate`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use companion_broker::{acl, DenyReason, RESERVED_CLIENT_ID_PREFIX};
use companion_schema::DeviceId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::audit::{AuditEntry, AuditLog, Outcome};
use crate::login_digest::LoginDigest;
use crate::registry::tokens::verify;
use crate::registry::DeviceStore;
use crate::registry::StoreError;
use tokio_util::sync::CancellationToken;

/// How long a looked-up credential (or its absence) is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(1);
/// Most cached devices; the cache is emptied when it would grow past this.
const CACHE_CAPACITY: usize = 100_000;
/// Longest client id, username or topic echoed into the audit log.
const AUDIT_FIELD_MAX: usize = 128;

/// A login's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    Allow(DeviceId),
    Deny(DenyReason),
    /// Not a device's login at all (the username cannot be a device id): for a broker that
    /// chains authenticators (EMQX), someone else's to decide.
    NotADevice,
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Publish to the topic.
    Publish,
    /// Subscribe to the filter.
    Subscribe,
    /// Receive a message published on the topic (mosquitto "read").
    Receive,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Access::Publish => "publish",
            Access::Subscribe => "subscribe",
            Access::Receive => "receive",
        }
    }
}

/// An authorization's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authz {
    Allow,
    Deny,
    NotADevice,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: &'static str,
    result: &'static str,
}

/// The hook's decision counters.
#[derive(Clone, Default)]
struct HookMetrics {
    decisions: Family<CheckLabels, Counter>,
}

#[derive(Clone)]
struct Cached {
    /// `None`: no such device.
    credential: Option<(bool, String)>,
    at: Instant,
}

/// Marks an audit row as coming through an external broker's hook.
fn external(mut entry: AuditEntry) -> AuditEntry {
    entry.detail = Some(match entry.detail.take() {
        Some(d) => format!("{d} (external broker)"),
        None => "external broker".to_owned(),
    });
    entry
}

/// Authentication and authorization of devices for an external broker.
pub struct Hook {
    devices: DeviceStore,
    audit: AuditLog,
    cache: Mutex<HashMap<DeviceId, Cached>>,
    /// Refused logins summed up per source address and reason, as the edge does.
    digest: Mutex<LoginDigest>,
    metrics: HookMetrics,
}

/// How often closed windows of refused logins are written.
const DIGEST_TICK: Duration = Duration::from_secs(1);

impl Hook {
    pub fn new(devices: DeviceStore, audit: AuditLog, digest: LoginDigest) -> Self {
        Self {
            devices,
            audit,
            cache: Mutex::new(HashMap::new()),
            digest: Mutex::new(digest),
            metrics: HookMetrics::default(),
        }
    }

    /// Writes the summaries of refused-login windows as they close, and the open ones at
    /// shutdown.
    pub async fn run_digest(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(DIGEST_TICK);
        loop {
            let done = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.cancelled() => true,
            };
            let entries = match self.digest.lock() {
                Ok(mut d) if done => d.flush(),
                Ok(mut d) => d.due(Instant::now()),
                Err(_) => Vec::new(),
            };
            for entry in entries {
                self.audit.record(external(entry)).await;
            }
            if done {
                return;
            }
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "backend_mqtt_hook_decisions",
            "Answers of the external-broker hooks by check (login, acl) and result",
            self.metrics.decisions.clone(),
        );
    }

    fn count(&self, check: &'static str, result: &'static str) {
        self.metrics
            .decisions
            .get_or_create(&CheckLabels { check, result })
            .inc();
    }

    /// Forgets a device's cached credential (rotation, disable, delete on this replica).
    pub fn invalidate(&self, device: &DeviceId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(device);
        }
    }

    /// The device's credential: `(enabled, token hash)`, or `None` if it does not exist.
    async fn credential(&self, device: &DeviceId) -> Result<Option<(bool, String)>, StoreError> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(c) = cache.get(device).filter(|c| c.at.elapsed() < CACHE_TTL) {
                return Ok(c.credential.clone());
            }
        }
        // Stamped before the read: the answer is as old as the moment it was asked for, so
        // a change committed while the read was under way is honoured within CACHE_TTL too.
        let asked = Instant::now();
        let credential = self
            .devices
            .credential(device)
            .await?
            .map(|c| (c.enabled, c.token_hash));
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(
                device.clone(),
                Cached {
                    credential: credential.clone(),
                    at: asked,
                },
            );
        }
        Ok(credential)
    }

    /// Checks a login. `client_id` is `None` when the broker does not send it (it must then
    /// be bound to the username by the broker's own configuration). Failures are audited as
    /// the edge audits them (`mqtt.connect`, denied, with the reason).
    pub async fn login(
        &self,
        client_id: Option<&str>,
        username: &str,
        password: &[u8],
        remote: Option<std::net::SocketAddr>,
    ) -> Login {
        let decision = self.decide_login(client_id, username, password).await;
        match &decision {
            Login::Allow(_) => self.count("login", "allow"),
            Login::NotADevice => self.count("login", "not_a_device"),
            Login::Deny(reason) => {
                self.count("login", "deny");
                let who = acl::truncate(client_id.unwrap_or(username), AUDIT_FIELD_MAX);
                // Summed up per device address and reason. A broker that does not send the
                // address (RabbitMQ's user_path) gets a row per refusal: summing those up
                // per reason alone would hide which devices were refused.
                let entries = match remote {
                    Some(peer) => match self.digest.lock() {
                        Ok(mut d) => d.refused(&who, peer, *reason, Instant::now()),
                        Err(_) => Vec::new(),
                    },
                    None => vec![AuditEntry::new(
                        format!("mqtt:{who}"),
                        "mqtt.connect",
                        Outcome::Denied,
                    )
                    .target(who.clone())
                    .detail(reason.as_str())],
                };
                for entry in entries {
                    self.audit.record(external(entry)).await;
                }
            }
        }
        decision
    }

    async fn decide_login(
        &self,
        client_id: Option<&str>,
        username: &str,
        password: &[u8],
    ) -> Login {
        if client_id.is_some_and(|c| c.starts_with(RESERVED_CLIENT_ID_PREFIX))
            || username.starts_with(RESERVED_CLIENT_ID_PREFIX)
        {
            return Login::Deny(DenyReason::ReservedClientId);
        }
        let Ok(device) = DeviceId::parse(username) else {
            return Login::NotADevice;
        };
        if client_id.is_some_and(|c| c != username) {
            return Login::Deny(DenyReason::IdentityMismatch);
        }
        if password.is_empty() {
            return Login::Deny(DenyReason::BadToken);
        }
        match self.credential(&device).await {
            Ok(None) => Login::Deny(DenyReason::UnknownDevice),
            Ok(Some((false, _))) => Login::Deny(DenyReason::Disabled),
            Ok(Some((true, hash))) if verify(password, &hash) => Login::Allow(device),
            Ok(Some(_)) => Login::Deny(DenyReason::BadToken),
            Err(e) => {
                tracing::error!(error = %e, device_id = %device, "credential lookup failed; denying");
                Login::Deny(DenyReason::Unavailable)
            }
        }
    }

    /// Whether `username` names an existing, enabled device (RabbitMQ's vhost and resource
    /// checks).
    pub async fn active(&self, username: &str) -> bool {
        let Ok(device) = DeviceId::parse(username) else {
            return false;
        };
        match self.credential(&device).await {
            Ok(c) => matches!(c, Some((true, _))),
            Err(e) => {
                tracing::error!(error = %e, device_id = %device, "credential lookup failed; denying");
                false
            }
        }
    }

    /// Whether an existing, enabled device may do `access` on `topic`. Denials of a device
    /// are audited as the edge audits them (`mqtt.acl`).
    pub async fn authorize(
        &self,
        client_id: Option<&str>,
        username: &str,
        topic: &str,
        access: Access,
    ) -> Authz {
        let Ok(device) = DeviceId::parse(username) else {
            self.count("acl", "not_a_device");
            return Authz::NotADevice;
        };
        let allowed = client_id.is_none_or(|c| c == username)
            && match access {
                Access::Publish => acl::may_publish(&device, topic).is_some(),
                Access::Subscribe => acl::may_subscribe(&device, topic),
                // A message a device may receive is one on a topic it may subscribe to.
                Access::Receive => acl::may_subscribe(&device, topic),
            }
            && self.active(username).await;
        if allowed {
            self.count("acl", "allow");
            return Authz::Allow;
        }
        self.count("acl", "deny");
        self.audit
            .record(
                AuditEntry::new(format!("device:{device}"), "mqtt.acl", Outcome::Denied)
                    .target(device.to_string())
                    .detail(format!(
                        "{} {} (external broker)",
                        access.as_str(),
                        acl::truncate(topic, AUDIT_FIELD_MAX)
                    )),
            )
            .await;
        Authz::Deny
    }
}

/// A device's connect or disconnect as EMQX reports it (its `client.connected` and
/// `client.disconnected` events, posted by a rule's HTTP action), in the edge's terms for the
/// presence table. `None` for anything else: another event, a client that is not a device
/// (its client id and username differ, or are no device id), or a disconnect that is not the
/// device leaving: `takenover` and `discarded` end an old connection of a device that has
/// just connected again (EMQX may deliver that after the new connection's own event).
pub fn emqx_presence(
    event: &str,
    client_id: Option<&str>,
    username: &str,
    peername: Option<&str>,
    reason: Option<&str>,
    proto_ver: Option<i64>,
) -> Option<companion_broker::BrokerEvent> {
    use companion_broker::{BrokerEvent, DisconnectReason as R};
    if client_id.is_some_and(|c| !c.is_empty() && c != username)
        || username.starts_with(RESERVED_CLIENT_ID_PREFIX)
    {
        return None;
    }
    let device = DeviceId::parse(username).ok()?;
    match event {
        "client.connected" => Some(BrokerEvent::Connected {
            device,
            peer: peername
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            protocol: proto_ver.and_then(|v| u8::try_from(v).ok()).unwrap_or(4),
        }),
        "client.disconnected" => {
            let reason = match reason.unwrap_or("") {
                "takenover" | "discarded" => return None,
                "normal" => R::Clean,
                "kicked" => R::Kicked,
                "keepalive_timeout" => R::KeepaliveTimeout,
                "not_authorized" => R::AclViolation,
                "frame_too_large" | "packet_too_large" => R::PacketTooLarge,
                "protocol_error" | "frame_error" | "malformed_packet" => R::ProtocolError,
                "shutdown" => R::ServerShutdown,
                _ => R::NetworkError,
            };
            Some(BrokerEvent::Disconnected { device, reason })
        }
        _ => None,
    }
}

/// An AMQP routing key (RabbitMQ's form of an MQTT topic: `.` and `/` swapped, `*` for `+`)
/// as the MQTT topic or filter it stands for.
pub fn topic_from_routing_key(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            '*' => '+',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emqx_events_become_presence_changes() {
        use companion_broker::{BrokerEvent, DisconnectReason};
        let connected = emqx_presence(
            "client.connected",
            Some("dev-1"),
            "dev-1",
            Some("198.51.100.7:52918"),
            None,
            Some(5),
        );
        assert!(
            matches!(&connected, Some(BrokerEvent::Connected { device, peer, protocol: 5 })
                if device.as_str() == "dev-1" && peer.to_string() == "198.51.100.7:52918"),
            "{connected:?}"
        );
        let reason = |r: &str| match emqx_presence(
            "client.disconnected",
            None,
            "dev-1",
            None,
            Some(r),
            None,
        ) {
            Some(BrokerEvent::Disconnected { reason, .. }) => Some(reason),
            _ => None,
        };
        assert_eq!(reason("normal"), Some(DisconnectReason::Clean));
        assert_eq!(
            reason("keepalive_timeout"),
            Some(DisconnectReason::KeepaliveTimeout)
        );
        assert_eq!(reason("kicked"), Some(DisconnectReason::Kicked));
        assert_eq!(reason("sock_closed"), Some(DisconnectReason::NetworkError));
        // The device is on a newer connection: not offline.
        assert_eq!(reason("takenover"), None);
        assert_eq!(reason("discarded"), None);
        // Not a device's, or not a presence event.
        assert!(
            emqx_presence("client.connected", Some("other"), "dev-1", None, None, None).is_none()
        );
        assert!(
            emqx_presence("client.connected", None, "not a device!", None, None, None).is_none()
        );
        assert!(emqx_presence("session.subscribed", None, "dev-1", None, None, None).is_none());
    }

    #[test]
    fn routing_keys_become_mqtt_topics() {
        assert_eq!(
            topic_from_routing_key("devices.a-1.telemetry"),
            "devices/a-1/telemetry"
        );
        assert_eq!(topic_from_routing_key("devices.*.led"), "devices/+/led");
        assert_eq!(topic_from_routing_key("devices.#"), "devices/#");
        assert_eq!(topic_from_routing_key("a/b.c"), "a.b/c");
    }
}
