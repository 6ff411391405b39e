//! Closing a device's live connection on an external broker through its management API, for
//! what the embedded edge does with a kick: a rotated token, a disabled or deleted device.
//!
//! - RabbitMQ (`rabbitmq_management`): `GET`, then `DELETE /api/connections/username/{device}`
//!   (an MQTT connection's user is its username, which the hooks bind to the device id).
//! - EMQX 5: `DELETE /api/v5/clients/{clientid}` (204; 404 when not connected), with an API
//!   key and secret as basic credentials.

use std::time::Duration;

use companion_schema::DeviceId;
use serde::Deserialize;

use crate::settings::{BrokerApiKind, MqttHookSettings};

/// How long one management call may take.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BrokerApiError {
    #[error("broker management API: {0}")]
    Transport(String),
    #[error("broker management API answered {status}: {body}")]
    Status { status: u16, body: String },
}

impl From<reqwest::Error> for BrokerApiError {
    fn from(e: reqwest::Error) -> Self {
        // Without the URL: it may carry credentials.
        BrokerApiError::Transport(e.without_url().to_string())
    }
}

/// A broker's management API.
pub struct BrokerApi {
    kind: BrokerApiKind,
    base: String,
    username: String,
    password: String,
    client: reqwest::Client,
}

/// One tracked connection (only counted).
#[derive(Deserialize)]
struct RabbitConnection {}

impl BrokerApi {
    /// The API `settings` name, `None` when none is configured.
    pub fn new(settings: &MqttHookSettings) -> Result<Option<Self>, BrokerApiError> {
        if settings.broker_api == BrokerApiKind::None {
            return Ok(None);
        }
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("companion/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Some(Self {
            kind: settings.broker_api,
            base: settings.broker_api_url.trim_end_matches('/').to_owned(),
            username: settings.broker_api_username.clone(),
            password: settings
                .broker_api_password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default(),
            client,
        }))
    }

    /// Closes every live connection of `device`; how many there were.
    pub async fn disconnect(&self, device: &DeviceId) -> Result<usize, BrokerApiError> {
        match self.kind {
            BrokerApiKind::None => Ok(0),
            BrokerApiKind::Rabbitmq => self.rabbitmq_disconnect(device).await,
            BrokerApiKind::Emqx => self.emqx_disconnect(device).await,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .basic_auth(&self.username, Some(&self.password))
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, BrokerApiError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        Err(BrokerApiError::Status {
            status: status.as_u16(),
            body,
        })
    }

    async fn rabbitmq_disconnect(&self, device: &DeviceId) -> Result<usize, BrokerApiError> {
        // The per-user routes read RabbitMQ's connection tracking, which is current; the
        // plain connection list comes from the statistics database, seconds behind.
        let path = format!(
            "/api/connections/username/{}",
            encode_segment(device.as_str())
        );
        let resp = self.request(reqwest::Method::GET, &path).send().await?;
        let connections: Vec<RabbitConnection> = Self::check(resp).await?.json().await?;
        if connections.is_empty() {
            return Ok(0);
        }
        let resp = self
            .request(reqwest::Method::DELETE, &path)
            .header("X-Reason", "companion: credentials revoked")
            .send()
            .await?;
        Self::check(resp).await?;
        Ok(connections.len())
    }

    async fn emqx_disconnect(&self, device: &DeviceId) -> Result<usize, BrokerApiError> {
        let path = format!("/api/v5/clients/{}", encode_segment(device.as_str()));
        let resp = self.request(reqwest::Method::DELETE, &path).send().await?;
        if resp.status().as_u16() == 404 {
            return Ok(0);
        }
        Self::check(resp).await?;
        Ok(1)
    }
}

/// Percent-encodes one path segment (RabbitMQ connection names hold spaces, `:` and `>`).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_names_are_one_segment() {
        assert_eq!(
            encode_segment("127.0.0.1:5000 -> 127.0.0.1:1883"),
            "127.0.0.1%3A5000%20-%3E%20127.0.0.1%3A1883"
        );
        assert_eq!(encode_segment("a/b"), "a%2Fb");
    }
}
