//! Device authentication: the trait the backend implements over its registry.

use std::net::SocketAddr;

use companion_schema::DeviceId;

/// What a device presented in its CONNECT.
pub struct AuthRequest<'a> {
    pub client_id: &'a str,
    pub username: &'a str,
    pub password: &'a [u8],
    pub peer: SocketAddr,
}

impl std::fmt::Debug for AuthRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthRequest")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .field("peer", &self.peer)
            .finish()
    }
}

/// Why a device was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No such device.
    UnknownDevice,
    /// The token does not match.
    BadToken,
    /// The device exists but is disabled.
    Disabled,
    /// `client_id`, `username` and device id differ, or the id is malformed.
    IdentityMismatch,
    /// A client id reserved for the platform itself.
    ReservedClientId,
    /// The authenticator did not answer in time, or failed (a database error denies).
    Unavailable,
    /// The source address is blocked after repeated failed logins (`mqtt.auth_block_s`); the
    /// credentials were not checked.
    Throttled,
}

impl DenyReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            DenyReason::UnknownDevice => "unknown_device",
            DenyReason::BadToken => "bad_token",
            DenyReason::Disabled => "disabled",
            DenyReason::IdentityMismatch => "identity_mismatch",
            DenyReason::ReservedClientId => "reserved_client_id",
            DenyReason::Unavailable => "unavailable",
            DenyReason::Throttled => "throttled",
        }
    }
}

/// The authenticator's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    Allow { device: DeviceId },
    Deny(DenyReason),
}

/// Checks a device's credentials. Implemented by the backend over the registry; the broker
/// applies its own identity rules (`client_id == username`, reserved ids) before calling it and
/// wraps the call in a timeout.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> AuthDecision;
}
