//! What the edge reports: presence and security events, delivered to an [`EventSink`] the
//! backend implements (presence table, audit log).

use std::net::SocketAddr;

use companion_schema::DeviceId;

use crate::auth::DenyReason;

/// Why a device connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    Clean,
    KeepaliveTimeout,
    AclViolation,
    RateLimited,
    PacketTooLarge,
    Kicked,
    Takeover,
    ServerShutdown,
    NetworkError,
    ProtocolError,
    /// On an external broker: the device's status said offline (its Last Will, or its own
    /// goodbye). Never produced by the edge.
    ReportedOffline,
}

impl DisconnectReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::Clean => "clean",
            DisconnectReason::KeepaliveTimeout => "keepalive_timeout",
            DisconnectReason::AclViolation => "acl_violation",
            DisconnectReason::RateLimited => "rate_limited",
            DisconnectReason::PacketTooLarge => "packet_too_large",
            DisconnectReason::Kicked => "kicked",
            DisconnectReason::Takeover => "takeover",
            DisconnectReason::ServerShutdown => "server_shutdown",
            DisconnectReason::NetworkError => "network_error",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::ReportedOffline => "reported_offline",
        }
    }
}

/// What a device tried that its ACL forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AclAction {
    Publish,
    Subscribe,
    Will,
}

impl AclAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            AclAction::Publish => "publish",
            AclAction::Subscribe => "subscribe",
            AclAction::Will => "will",
        }
    }
}

/// One event from the edge.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerEvent {
    Connected {
        device: DeviceId,
        peer: SocketAddr,
        /// MQTT protocol level: 4 (3.1.1) or 5.
        protocol: u8,
    },
    Disconnected {
        device: DeviceId,
        reason: DisconnectReason,
    },
    AuthFailed {
        /// The client id as presented (may be invalid; truncated to 64 characters); empty when
        /// the connection was refused before its CONNECT was read (`DenyReason::Throttled`).
        client_id: String,
        peer: SocketAddr,
        reason: DenyReason,
    },
    AclDenied {
        device: DeviceId,
        action: AclAction,
        /// The topic or filter as presented (truncated to 256 characters).
        topic: String,
    },
}

/// Receives edge events. Called from connection tasks: implementations must not block
/// (hand the event to a bounded channel and count what is dropped).
pub trait EventSink: Send + Sync + 'static {
    fn send(&self, event: BrokerEvent);
}

/// A sink that discards everything.
pub struct NullSink;

impl EventSink for NullSink {
    fn send(&self, _event: BrokerEvent) {}
}
