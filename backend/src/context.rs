//! What request handlers share: stores, authenticators, the broker handle, limits, metrics.

use std::sync::Arc;
use std::time::Duration;

use companion_broker::BrokerHandle;
use companion_schema::DeviceId;
use prometheus_client::registry::Registry;

use crate::api_error::ApiError;
use crate::audit::{AuditEntry, AuditLog, Outcome};
use crate::db::Db;
use crate::metrics::HttpMetrics;
use crate::mqtt_auth::RegistryAuthenticator;
use crate::ratelimit::KeyedLimiter;
use crate::registry::admin::AuthFailure;
use crate::registry::{AdminAuth, DeviceStore, EnrollmentStore, Principal};

/// How devices reach the broker, as registration answers tell them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MqttInfo {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Limits applied by the REST layer.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    pub requests_per_minute: u32,
    pub enroll_failures_per_minute: u32,
}

/// Shared state of the HTTP handlers.
pub struct ApiContext {
    pub db: Db,
    pub devices: DeviceStore,
    pub enrollments: EnrollmentStore,
    pub admin: AdminAuth,
    pub audit: AuditLog,
    pub authenticator: Arc<RegistryAuthenticator>,
    pub broker: Option<BrokerHandle>,
    pub mqtt: MqttInfo,
    pub registry: Arc<Registry>,
    pub http_metrics: Arc<HttpMetrics>,
    pub limiter: KeyedLimiter,
    pub enroll_failures: KeyedLimiter,
    /// Peers whose `X-Forwarded-For` names the client (`http.trusted_proxies`).
    pub trusted_proxies: companion_broker::proxy::Networks,
    /// Lifetime of JWTs from `POST /auth/token` (24 hours; shorter in tests).
    pub jwt_lifetime: Duration,
    pub personas: Arc<crate::personas::PersonaSet>,
    pub rules: Arc<crate::rules::store::RuleStore>,
    pub dispatcher: Arc<crate::devices::Dispatcher>,
    /// Decisions for devices on an external broker (`/api/v1/mqtt/...`).
    pub hook: Arc<crate::mqtt_hook::Hook>,
    pub hook_settings: crate::settings::MqttHookSettings,
    /// Hook requests per calling address.
    pub hook_limiter: KeyedLimiter,
    /// The external broker's management API (`mqtt_hook.broker_api`), for kicks.
    pub broker_api: Option<Arc<crate::broker_api::BrokerApi>>,
    /// Devices are on an external broker (`mqtt.upstream`): presence it reports (EMQX's
    /// events) is written; the embedded broker reports its own.
    pub external_broker: bool,
}

pub type Ctx = Arc<ApiContext>;

/// What a kick did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    Kicked,
    NotConnected,
    /// The external broker's management API failed (logged); new logins are refused anyway.
    Failed,
}

impl Kick {
    pub fn as_str(self) -> &'static str {
        match self {
            Kick::Kicked => "kicked",
            Kick::NotConnected => "not connected",
            Kick::Failed => "kick failed",
        }
    }
}

fn addr_key(remote: Option<std::net::SocketAddr>) -> String {
    remote.map_or_else(|| "addr:unknown".into(), |r| format!("addr:{}", r.ip()))
}

impl ApiContext {
    /// Authenticates an admin request and applies its rate limit. A failure is audited and
    /// counts against the caller's address.
    pub async fn admin(
        &self,
        auth: Option<&str>,
        remote: Option<std::net::SocketAddr>,
    ) -> Result<Principal, ApiError> {
        let result = self
            .admin
            .authenticate(auth)
            .await
            .map_err(|e| ApiError::Internal(e.into()))?;
        match result {
            Ok(principal) => {
                self.limiter
                    .check(&format!("principal:{}", principal.token_id))
                    .map_err(|retry_after_s| ApiError::TooManyRequests { retry_after_s })?;
                Ok(principal)
            }
            Err(failure) => {
                self.limiter
                    .check(&addr_key(remote))
                    .map_err(|retry_after_s| ApiError::TooManyRequests { retry_after_s })?;
                if failure != AuthFailure::Missing {
                    self.audit
                        .record(
                            AuditEntry::new("anonymous", "admin.auth", Outcome::Denied)
                                .remote(remote)
                                .detail(failure.as_str()),
                        )
                        .await;
                }
                Err(ApiError::Unauthorized)
            }
        }
    }

    /// The per-address limit for routes without admin authentication.
    pub fn public_limit(&self, remote: Option<std::net::SocketAddr>) -> Result<(), ApiError> {
        self.limiter
            .check(&addr_key(remote))
            .map_err(|retry_after_s| ApiError::TooManyRequests { retry_after_s })
    }

    /// The per-address limit on failed enrolments.
    pub fn enroll_failure_limit(
        &self,
        remote: Option<std::net::SocketAddr>,
    ) -> Result<(), ApiError> {
        self.enroll_failures
            .check(&addr_key(remote))
            .map_err(|retry_after_s| ApiError::TooManyRequests { retry_after_s })
    }

    /// Ends a device's live connection (the embedded edge's, or through the external broker's
    /// management API) and forgets its cached credentials.
    pub async fn kick(&self, device: &DeviceId) -> Kick {
        self.authenticator.invalidate(device);
        self.hook.invalidate(device);
        if let Some(broker) = &self.broker {
            return if broker.kick(device) {
                Kick::Kicked
            } else {
                Kick::NotConnected
            };
        }
        let Some(api) = &self.broker_api else {
            return Kick::NotConnected;
        };
        // The other replicas' hooks may take the old credentials for as long as they keep
        // their answer (CACHE_TTL from when they asked the database), and a login they
        // answered just before may still be on its way through the broker: a device kicked
        // now could be back in on them, for good. After twice that, whatever is connected
        // under this name is closed again (a device back with its new token meanwhile
        // reconnects once more).
        let (again, who) = (api.clone(), device.clone());
        tokio::spawn(async move {
            tokio::time::sleep(2 * crate::mqtt_hook::CACHE_TTL).await;
            match again.disconnect(&who).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(device_id = %who, connections = n, "closed a connection made while the old credentials were still cached")
                }
                Err(e) => {
                    tracing::warn!(error = %e, device_id = %who, "the second kick on the external broker failed")
                }
            }
        });
        match api.disconnect(device).await {
            Ok(0) => Kick::NotConnected,
            Ok(_) => Kick::Kicked,
            Err(e) => {
                tracing::error!(error = %e, device_id = %device, "closing the device's connection on the external broker failed");
                Kick::Failed
            }
        }
    }
}
