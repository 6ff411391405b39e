//! The external broker named by `mqtt.upstream`.

use std::sync::Arc;

/// An external broker the backend connects to over MQTT.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Subscribe through shared subscriptions (`mqtt.upstream_shared`).
    pub shared: bool,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("mqtt.upstream {0:?}: expected mqtt://host:port or mqtts://host:port")]
    Url(String),
    #[error("mqtt.upstream_ca: {0}")]
    Ca(String),
}

impl Target {
    /// The external broker from `mqtt.upstream`, `None` when it is empty.
    pub fn upstream(s: &companion_broker::MqttSettings) -> Result<Option<Self>, TargetError> {
        if s.upstream.is_empty() {
            return Ok(None);
        }
        let (tls, rest) = if let Some(r) = s.upstream.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = s.upstream.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(TargetError::Url(s.upstream.clone()));
        };
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| TargetError::Url(s.upstream.clone()))?;
        let tls = if tls {
            let path = s
                .upstream_ca
                .as_ref()
                .ok_or_else(|| TargetError::Ca("required for mqtts://".into()))?;
            let pem = std::fs::read(path)
                .map_err(|e| TargetError::Ca(format!("{}: {e}", path.display())))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| TargetError::Ca(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| TargetError::Ca(e.to_string()))?;
            }
            Some(Arc::new(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ))
        } else {
            None
        };
        Ok(Some(Self {
            host,
            port,
            username: s.upstream_username.clone(),
            password: s
                .upstream_password
                .as_ref()
                .map(|p| p.0.clone())
                .unwrap_or_default(),
            tls,
            shared: s.upstream_shared,
        }))
    }
}
