//! The broker's Prometheus metrics, registered under the `broker` prefix of the shared registry.
//! Labels are small closed sets; never a device id.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use companion_schema::TopicKind;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
}

/// The topic kind (`telemetry`, `audio_up`, ...) or `other`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: &'static str,
}

impl ClassLabel {
    pub fn of(kind: Option<TopicKind>) -> Self {
        Self {
            class: kind.map_or("other", TopicKind::label),
        }
    }
}

/// Connect outcomes (`broker_connects_total{result}`).
pub mod result {
    pub const ACCEPTED: &str = "accepted";
    pub const DENIED: &str = "denied";
    pub const ACL_DENIED: &str = "acl_denied";
    pub const ROUTER_REFUSED: &str = "router_refused";
    pub const OVER_CAPACITY: &str = "over_capacity";
    pub const TIMEOUT: &str = "timeout";
    pub const PROTOCOL_ERROR: &str = "protocol_error";
    pub const UPSTREAM_ERROR: &str = "upstream_error";
    /// A trusted proxy's connection without a valid PROXY protocol header.
    pub const PROXY_HEADER: &str = "proxy_header";
    /// A WebSocket upgrade refused (wrong path, origin or subprotocol; not a WebSocket).
    pub const WEBSOCKET_REFUSED: &str = "websocket_refused";
    /// Closed at once: `mqtt.max_pending` or `mqtt.max_pending_per_ip` reached.
    pub const TOO_MANY_PENDING: &str = "too_many_pending";
    /// Closed or refused: the source address is blocked after repeated failed logins.
    pub const THROTTLED: &str = "throttled";
}

#[derive(Clone, Default)]
pub struct Metrics {
    pub connected_devices: Gauge,
    /// Distinct client ids the edge has used on the router (rumqttd keeps a record per id).
    pub router_client_ids: Gauge,
    pub connects: Family<ResultLabel, Counter>,
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub acl_denied: Family<ActionLabel, Counter>,
    pub messages_in: Family<ClassLabel, Counter>,
    pub bytes_in: Family<ClassLabel, Counter>,
    pub messages_out: Family<ClassLabel, Counter>,
    pub bytes_out: Family<ClassLabel, Counter>,
    pub dropped: Family<ReasonLabel, Counter>,
    /// QoS 1 publishes over the rate limit, let through with the connection paused.
    pub throttled: Counter,
    pub disconnects: Family<ReasonLabel, Counter>,
    pub lost: Counter,
    pub tls_handshake_failures: Family<ReasonLabel, Counter>,
    /// Connections accepted and not yet authenticated.
    pub pending: Gauge,
    /// Source addresses in the failed-login table.
    pub throttle_addresses: Gauge,
    /// Blocks started (an address reached `mqtt.auth_failures_per_ip`).
    pub throttle_blocks: Counter,
    /// Failed logins not tracked because the failed-login table was full.
    pub throttle_untracked: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("broker");
        r.register(
            "connected_devices",
            "Device connections currently forwarded to the router",
            m.connected_devices.clone(),
        );
        r.register(
            "router_client_ids",
            "Distinct client ids used on the embedded router; rumqttd keeps a small record per id for the life of the process",
            m.router_client_ids.clone(),
        );
        r.register(
            "connects",
            "Connection attempts by result",
            m.connects.clone(),
        );
        r.register(
            "auth_failures",
            "Refused device connections by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "acl_denied",
            "Publish, subscribe and will attempts outside a device's ACL",
            m.acl_denied.clone(),
        );
        r.register(
            "messages_in",
            "PUBLISH packets from devices by topic class",
            m.messages_in.clone(),
        );
        r.register(
            "bytes_in",
            "PUBLISH bytes from devices by topic class",
            m.bytes_in.clone(),
        );
        r.register(
            "messages_out",
            "PUBLISH packets to devices by topic class",
            m.messages_out.clone(),
        );
        r.register(
            "bytes_out",
            "PUBLISH bytes to devices by topic class",
            m.bytes_out.clone(),
        );
        r.register(
            "messages_dropped",
            "PUBLISH packets from devices dropped by the edge, by reason",
            m.dropped.clone(),
        );
        r.register(
            "publishes_throttled",
            "QoS 1 publishes over the rate limit: let through, and the connection not read again until the limit allows (dropping them would acknowledge what was not stored)",
            m.throttled.clone(),
        );
        r.register(
            "disconnects",
            "Device disconnections by reason",
            m.disconnects.clone(),
        );
        r.register(
            "messages_lost",
            "Messages lost: dropped by the embedded router before a subscriber read them (commit-log rotation under a slow reader), a QoS 1 message to a device that stopped acknowledging, or a device message the backend refused to store",
            m.lost.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Failed TLS handshakes by reason",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "pending_connections",
            "Connections accepted and not yet authenticated (TLS handshake, CONNECT, authenticator)",
            m.pending.clone(),
        );
        r.register(
            "auth_throttle_addresses",
            "Source addresses with recent failed logins (tracked for mqtt.auth_failures_per_ip)",
            m.throttle_addresses.clone(),
        );
        r.register(
            "auth_throttle_blocks",
            "Source addresses blocked for mqtt.auth_block_s after repeated failed logins",
            m.throttle_blocks.clone(),
        );
        r.register(
            "auth_throttle_untracked",
            "Failed logins not counted towards a block because mqtt.max_tracked_addresses addresses were tracked already",
            m.throttle_untracked.clone(),
        );
        m.prime();
        m
    }
}

impl Metrics {
    /// Creates every known series at zero: prometheus-client prints nothing for a labelled
    /// family until a series exists, and dashboards, `rate()` and absence alerts need them.
    fn prime(&self) {
        use crate::auth::DenyReason;
        use crate::events::{AclAction, DisconnectReason};
        for r in [
            result::ACCEPTED,
            result::DENIED,
            result::ACL_DENIED,
            result::ROUTER_REFUSED,
            result::OVER_CAPACITY,
            result::TIMEOUT,
            result::PROTOCOL_ERROR,
            result::UPSTREAM_ERROR,
            result::PROXY_HEADER,
            result::WEBSOCKET_REFUSED,
            result::TOO_MANY_PENDING,
            result::THROTTLED,
        ] {
            let _ = self.connects.get_or_create(&ResultLabel { result: r });
        }
        for d in [
            DenyReason::UnknownDevice,
            DenyReason::BadToken,
            DenyReason::Disabled,
            DenyReason::IdentityMismatch,
            DenyReason::ReservedClientId,
            DenyReason::Unavailable,
            DenyReason::Throttled,
        ] {
            let _ = self
                .auth_failures
                .get_or_create(&ReasonLabel { reason: d.as_str() });
        }
        for a in [AclAction::Publish, AclAction::Subscribe, AclAction::Will] {
            let _ = self
                .acl_denied
                .get_or_create(&ActionLabel { action: a.as_str() });
        }
        let classes = TopicKind::ALL
            .into_iter()
            .map(|k| ClassLabel::of(Some(k)))
            .chain([ClassLabel::of(None)]);
        for c in classes {
            let _ = self.messages_in.get_or_create(&c);
            let _ = self.bytes_in.get_or_create(&c);
            let _ = self.messages_out.get_or_create(&c);
            let _ = self.bytes_out.get_or_create(&c);
        }
        for d in [
            DisconnectReason::Clean,
            DisconnectReason::KeepaliveTimeout,
            DisconnectReason::AclViolation,
            DisconnectReason::RateLimited,
            DisconnectReason::PacketTooLarge,
            DisconnectReason::Kicked,
            DisconnectReason::Takeover,
            DisconnectReason::ServerShutdown,
            DisconnectReason::NetworkError,
            DisconnectReason::ProtocolError,
        ] {
            let _ = self
                .disconnects
                .get_or_create(&ReasonLabel { reason: d.as_str() });
        }
        let _ = self.dropped.get_or_create(&ReasonLabel {
            reason: "rate_limited",
        });
        for r in ["error", "timeout"] {
            let _ = self
                .tls_handshake_failures
                .get_or_create(&ReasonLabel { reason: r });
        }
    }
}
