//! Typed configuration: built-in defaults, then an optional file, then the environment
//! (`COMPANION_<SECTION>__<KEY>`, plus `DATABASE_URL`).
//!
//! Loading never binds a port or touches the database; `companion serve` exits with status 64
//! when this module returns an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use companion_broker::MqttSettings;
use serde::Deserialize;

pub use crate::secret::Secret;

/// Configuration of the `companion` server.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the SQLite database, TLS material and generated secrets live.
    pub data_dir: PathBuf,
    pub http: HttpSettings,
    pub mqtt: MqttSettings,
    pub database: DatabaseSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub personas: PersonaSettings,
    pub rules: RulesSettings,
    pub sessions: SessionSettings,
    pub voice: crate::voice::VoiceSettings,
    pub mqtt_hook: MqttHookSettings,
    pub cluster: ClusterSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            http: HttpSettings::default(),
            mqtt: MqttSettings::default(),
            database: DatabaseSettings::default(),
            admin: AdminSettings::default(),
            log: LogSettings::default(),
            personas: PersonaSettings::default(),
            rules: RulesSettings::default(),
            sessions: SessionSettings::default(),
            voice: crate::voice::VoiceSettings::default(),
            mqtt_hook: MqttHookSettings::default(),
            cluster: ClusterSettings::default(),
        }
    }
}

/// Several replicas behind one external broker, on one PostgreSQL (see `cluster.rs`): each
/// device's events are handled by exactly one replica at a time.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// Off: this is the only replica.
    pub enabled: bool,
    /// This replica's name, unique among the live ones. Empty: host name, process id and a
    /// random suffix.
    pub replica_id: String,
    /// A replica silent this long is dead and its devices are taken over, in milliseconds.
    pub lease_ms: u64,
    /// How often each replica renews its lease, in milliseconds (at most a third of it).
    pub heartbeat_ms: u64,
    /// Events kept per device another replica owns, replayed if it dies.
    pub shadow_per_device: usize,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            replica_id: String::new(),
            lease_ms: 3_000,
            heartbeat_ms: 1_000,
            shadow_per_device: 512,
        }
    }
}

impl ClusterSettings {
    /// The configured replica id, or a generated one.
    pub fn replica(&self) -> String {
        if !self.replica_id.is_empty() {
            return self.replica_id.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "companion".into());
        format!(
            "{host}-{}-{:06x}",
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        )
    }
}

/// The HTTP authentication/authorization hooks for an external MQTT broker
/// (`/api/v1/mqtt/...`). Off unless `allow_from` or `secret` is set: a request is answered
/// when it comes from one of `allow_from` (the broker nodes) or carries
/// `Authorization: Bearer <secret>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttHookSettings {
    /// Networks or addresses of the broker nodes (after `http.trusted_proxies`).
    pub allow_from: companion_broker::proxy::Networks,
    /// A shared secret the broker sends as `Authorization: Bearer ...` (EMQX can set
    /// headers; RabbitMQ and mosquitto-go-auth cannot, use `allow_from` for them).
    pub secret: Option<Secret>,
    /// Hook requests per minute per calling address (a broker node asks on every connect,
    /// and RabbitMQ on every publish to a new topic).
    pub requests_per_minute: u32,
    /// The RabbitMQ virtual host devices use.
    pub rabbitmq_vhost: String,
    /// The exchange RabbitMQ's MQTT plugin publishes to (`mqtt.exchange`).
    pub rabbitmq_exchange: String,
    /// The external broker's management API, to close a revoked device's live connection:
    /// `none`, `rabbitmq` (rabbitmq_management, e.g. `http://rabbit:15672`) or `emqx`
    /// (e.g. `http://emqx:18083`, with an API key and secret as username and password).
    pub broker_api: BrokerApiKind,
    pub broker_api_url: String,
    pub broker_api_username: String,
    pub broker_api_password: Option<Secret>,
}

/// Which management API `mqtt_hook.broker_api` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerApiKind {
    #[default]
    None,
    Rabbitmq,
    Emqx,
}

impl Default for MqttHookSettings {
    fn default() -> Self {
        Self {
            allow_from: companion_broker::proxy::Networks::default(),
            secret: None,
            requests_per_minute: 600_000,
            rabbitmq_vhost: "/".into(),
            rabbitmq_exchange: "amq.topic".into(),
            broker_api: BrokerApiKind::None,
            broker_api_url: String::new(),
            broker_api_username: String::new(),
            broker_api_password: None,
        }
    }
}

impl MqttHookSettings {
    pub fn enabled(&self) -> bool {
        !self.allow_from.is_empty() || self.secret.is_some()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersonaSettings {
    /// A directory of `*.toml` persona files. Unset: the three shipped personas.
    pub dir: Option<PathBuf>,
    /// The persona new devices start with.
    pub default: String,
}

impl Default for PersonaSettings {
    fn default() -> Self {
        Self {
            dir: None,
            default: "aria".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesSettings {
    /// The rule file. Unset: `{data_dir}/rules.toml`, created from the shipped defaults.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    /// Longest a device may stay in `listening`, in milliseconds.
    pub max_listen_ms: u64,
    /// A session stuck thinking or speaking this long returns to idle, in milliseconds.
    pub watchdog_ms: u64,
    /// Conversation lines kept per device.
    pub history: usize,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            max_listen_ms: 30_000,
            watchdog_ms: 120_000,
            history: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
    /// Serve HTTPS with the same certificate as the MQTT TLS listener.
    pub tls: bool,
    /// REST requests per minute per admin principal, and per client address for routes
    /// without admin credentials.
    pub rate_limit_per_minute: u32,
    /// Failed enrolment attempts per minute per client address.
    pub enroll_failures_per_minute: u32,
    /// Reverse proxies (networks or addresses) whose `X-Forwarded-For` is believed: for a
    /// request from one of them, the client address (rate limits, audit log) is the rightmost
    /// forwarded address that is not itself a trusted proxy. Empty: the header is ignored.
    pub trusted_proxies: companion_broker::proxy::Networks,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8000".into(),
            tls: false,
            rate_limit_per_minute: 100,
            enroll_failures_per_minute: 10,
            trusted_proxies: companion_broker::proxy::Networks::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://...` or `postgres://...`. Unset: `sqlite://{data_dir}/companion.db`.
    pub url: Option<Secret>,
    pub max_connections: u32,
    /// How long to wait for a connection from the pool, in milliseconds.
    pub acquire_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 10,
            acquire_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// The bootstrap admin token. Unset: generated into `{data_dir}/admin-token`.
    pub token: Option<Secret>,
    /// The HS256 key for admin JWTs. Unset: generated into `{data_dir}/jwt-secret`.
    pub jwt_secret: Option<Secret>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        message: message.into(),
    }
}

/// Which database a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    Sqlite,
    Postgres,
}

impl Settings {
    /// Defaults, then `file` (if given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, env)
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let env: std::collections::HashMap<String, String> = env.into_iter().collect();
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let companion_env: std::collections::HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("COMPANION_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("COMPANION")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("mqtt.hosts")
                .with_list_parse_key("mqtt.proxy_protocol_from")
                .with_list_parse_key("http.trusted_proxies")
                .with_list_parse_key("mqtt.ws_trusted_proxies")
                .with_list_parse_key("mqtt.ws_allowed_origins")
                .with_list_parse_key("mqtt_hook.allow_from")
                .try_parsing(true)
                .source(Some(companion_env)),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        if settings.database.url.is_none() {
            if let Some(url) = env.get("DATABASE_URL").filter(|u| !u.is_empty()) {
                settings.database.url = Some(Secret::new(url.clone()));
            }
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Checks everything that can be checked without I/O.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        parse_addr("http.listen", &self.http.listen)?;
        if !self.mqtt.listen.is_empty() {
            parse_addr("mqtt.listen", &self.mqtt.listen)?;
        }
        if !self.mqtt.tls_listen.is_empty() {
            parse_addr("mqtt.tls_listen", &self.mqtt.tls_listen)?;
        }
        self.ws_addr()?;
        self.wss_addr()?;
        if !self.mqtt.ws_path.starts_with('/') {
            return Err(invalid("mqtt.ws_path", "must start with /"));
        }
        if self.mqtt.max_connections == 0 {
            return Err(invalid("mqtt.max_connections", "must be at least 1"));
        }
        for (key, value) in [
            ("mqtt.max_pending", self.mqtt.max_pending as u64),
            (
                "mqtt.max_pending_per_ip",
                self.mqtt.max_pending_per_ip as u64,
            ),
            (
                "mqtt.auth_failure_window_s",
                self.mqtt.auth_failure_window_s,
            ),
            (
                "mqtt.max_tracked_addresses",
                self.mqtt.max_tracked_addresses as u64,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.mqtt.max_packet_size < 1024 {
            return Err(invalid(
                "mqtt.max_packet_size",
                "must be at least 1024 bytes",
            ));
        }
        if self.mqtt.tls.cert.is_some() != self.mqtt.tls.key.is_some() {
            return Err(invalid(
                "mqtt.tls",
                "set both `mqtt.tls.cert` and `mqtt.tls.key`, or neither",
            ));
        }
        self.database_kind()?;
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        self.voice
            .validate()
            .map_err(|e| invalid("voice", e.to_string()))?;
        if self.sessions.max_listen_ms == 0 || self.sessions.watchdog_ms == 0 {
            return Err(invalid(
                "sessions",
                "max_listen_ms and watchdog_ms must be positive",
            ));
        }
        if self.http.rate_limit_per_minute == 0 {
            return Err(invalid("http.rate_limit_per_minute", "must be at least 1"));
        }
        if self.http.enroll_failures_per_minute == 0 {
            return Err(invalid(
                "http.enroll_failures_per_minute",
                "must be at least 1",
            ));
        }
        if let Some(secret) = &self.admin.jwt_secret {
            if secret.expose().len() < 32 {
                return Err(invalid(
                    "admin.jwt_secret",
                    "must be at least 32 characters long",
                ));
            }
        }
        if self.cluster.enabled {
            if self.database_kind()? != DatabaseKind::Postgres {
                return Err(invalid(
                    "cluster.enabled",
                    "replicas share one PostgreSQL: set database.url to a postgres:// URL",
                ));
            }
            if self.mqtt.upstream.is_empty() {
                return Err(invalid(
                    "cluster.enabled",
                    "replicas share an external broker: set mqtt.upstream",
                ));
            }
            if self.mqtt.upstream_shared {
                return Err(invalid(
                    "mqtt.upstream_shared",
                    "must be false with cluster.enabled: every replica sees every device's messages and handles those of the devices it owns",
                ));
            }
            if self.cluster.heartbeat_ms == 0
                || self.cluster.heartbeat_ms.saturating_mul(3) > self.cluster.lease_ms
            {
                return Err(invalid(
                    "cluster.heartbeat_ms",
                    "must be positive and at most a third of cluster.lease_ms",
                ));
            }
            if self.cluster.shadow_per_device == 0 {
                return Err(invalid("cluster.shadow_per_device", "must be at least 1"));
            }
            if self.cluster.replica_id.contains(char::is_whitespace) {
                return Err(invalid("cluster.replica_id", "must not contain spaces"));
            }
        }
        if let Some(token) = &self.admin.token {
            if token.expose().len() < 16 {
                return Err(invalid(
                    "admin.token",
                    "must be at least 16 characters long",
                ));
            }
        }
        Ok(())
    }

    pub fn http_addr(&self) -> Result<SocketAddr, SettingsError> {
        parse_addr("http.listen", &self.http.listen)
    }

    /// `None` when the listener is disabled (empty string).
    pub fn mqtt_addr(&self) -> Result<Option<SocketAddr>, SettingsError> {
        optional_addr("mqtt.listen", &self.mqtt.listen)
    }

    pub fn mqtts_addr(&self) -> Result<Option<SocketAddr>, SettingsError> {
        optional_addr("mqtt.tls_listen", &self.mqtt.tls_listen)
    }

    pub fn ws_addr(&self) -> Result<Option<SocketAddr>, SettingsError> {
        optional_addr("mqtt.ws_listen", &self.mqtt.ws_listen)
    }

    pub fn wss_addr(&self) -> Result<Option<SocketAddr>, SettingsError> {
        optional_addr("mqtt.wss_listen", &self.mqtt.wss_listen)
    }

    /// The rule file's path.
    pub fn rules_path(&self) -> PathBuf {
        self.rules
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("rules.toml"))
    }

    /// The database URL, defaulting to a SQLite file in the data dir.
    pub fn database_url(&self) -> Secret {
        match &self.database.url {
            Some(url) => url.clone(),
            None => Secret::new(format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("companion.db").display()
            )),
        }
    }

    pub fn database_kind(&self) -> Result<DatabaseKind, SettingsError> {
        let url = self.database_url();
        let url = url.expose();
        if url.starts_with("sqlite:") {
            Ok(DatabaseKind::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseKind::Postgres)
        } else {
            Err(invalid(
                "database.url",
                "must start with sqlite: or postgres://",
            ))
        }
    }
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, SettingsError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("{value:?} is not a socket address like 0.0.0.0:8000"),
        )
    })
}

fn optional_addr(key: &'static str, value: &str) -> Result<Option<SocketAddr>, SettingsError> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse_addr(key, value).map(Some)
    }
}

/// Redacts the password in a database URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("./data"));
        assert_eq!(s.http.listen, "0.0.0.0:8000");
        assert_eq!(s.mqtt.listen, "127.0.0.1:1883");
        assert_eq!(s.mqtt.tls_listen, "0.0.0.0:8883");
        assert_eq!(s.log.format, LogFormat::Plain);
        assert_eq!(
            s.database_url().expose(),
            "sqlite://./data/companion.db?mode=rwc"
        );
        assert_eq!(s.database_kind().unwrap(), DatabaseKind::Sqlite);
    }

    #[test]
    fn environment_overrides_defaults() {
        let s = Settings::load_from(
            None,
            env(&[
                ("COMPANION_HTTP__LISTEN", "127.0.0.1:0"),
                ("COMPANION_DATA_DIR", "/tmp/x"),
                ("COMPANION_LOG__FORMAT", "json"),
                ("COMPANION_MQTT__HOSTS", "a.example,b.example"),
                (
                    "COMPANION_MQTT__PROXY_PROTOCOL_FROM",
                    "127.0.0.1,10.0.0.0/8",
                ),
                ("COMPANION_HTTP__TRUSTED_PROXIES", "::1"),
                ("COMPANION_MQTT__WS_TRUSTED_PROXIES", "10.1.0.0/16,10.2.0.1"),
                (
                    "COMPANION_MQTT__WS_ALLOWED_ORIGINS",
                    "https://a.example,https://b.example",
                ),
                ("COMPANION_MQTT_HOOK__ALLOW_FROM", "10.3.0.0/16,10.4.0.1"),
                ("COMPANION_MQTT_HOOK__SECRET", "s3cret"),
                ("DATABASE_URL", "postgres://u:p@h/db"),
            ]),
        )
        .unwrap();
        // Every list key takes a comma-separated value from the environment.
        assert!(s
            .mqtt
            .ws_trusted_proxies
            .contains("10.2.0.1".parse().unwrap()));
        assert!(s
            .mqtt
            .ws_trusted_proxies
            .contains("10.1.9.9".parse().unwrap()));
        assert_eq!(
            s.mqtt.ws_allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert!(s.mqtt_hook.allow_from.contains("10.3.4.5".parse().unwrap()));
        assert!(s.mqtt_hook.allow_from.contains("10.4.0.1".parse().unwrap()));
        assert!(s.mqtt_hook.enabled());
        assert!(s
            .mqtt
            .proxy_protocol_from
            .contains("10.9.8.7".parse().unwrap()));
        assert!(s
            .mqtt
            .proxy_protocol_from
            .contains("127.0.0.1".parse().unwrap()));
        assert!(!s
            .mqtt
            .proxy_protocol_from
            .contains("11.0.0.1".parse().unwrap()));
        assert!(s.http.trusted_proxies.contains("::1".parse().unwrap()));
        assert!(!s
            .http
            .trusted_proxies
            .contains("127.0.0.1".parse().unwrap()));
        assert_eq!(s.http.listen, "127.0.0.1:0");
        assert_eq!(s.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.mqtt.hosts, vec!["a.example", "b.example"]);
        assert_eq!(s.database_kind().unwrap(), DatabaseKind::Postgres);
    }

    #[test]
    fn cluster_mode_needs_postgres_an_upstream_broker_and_plain_subscriptions() {
        let base = [
            ("COMPANION_CLUSTER__ENABLED", "true"),
            ("DATABASE_URL", "postgres://u:p@h/db"),
            ("COMPANION_MQTT__UPSTREAM", "mqtt://broker:1883"),
            ("COMPANION_MQTT__UPSTREAM_SHARED", "false"),
        ];
        let s = Settings::load_from(None, env(&base)).unwrap();
        assert!(s.cluster.enabled);
        assert_eq!((s.cluster.lease_ms, s.cluster.heartbeat_ms), (3000, 1000));
        assert_ne!(
            s.cluster.replica(),
            s.cluster.replica(),
            "generated ids differ"
        );
        for (drop_key, replace, key) in [
            (
                "DATABASE_URL",
                ("DATABASE_URL", "sqlite::memory:"),
                "cluster.enabled",
            ),
            (
                "COMPANION_MQTT__UPSTREAM",
                ("COMPANION_MQTT__UPSTREAM", ""),
                "cluster.enabled",
            ),
            (
                "COMPANION_MQTT__UPSTREAM_SHARED",
                ("COMPANION_MQTT__UPSTREAM_SHARED", "true"),
                "mqtt.upstream_shared",
            ),
            (
                "",
                ("COMPANION_CLUSTER__HEARTBEAT_MS", "1500"),
                "cluster.heartbeat_ms",
            ),
        ] {
            let mut vars: Vec<(&str, &str)> = base
                .iter()
                .copied()
                .filter(|(k, _)| *k != drop_key)
                .collect();
            vars.push(replace);
            let err = Settings::load_from(None, env(&vars))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{replace:?}: {err}");
        }
    }

    #[test]
    fn companion_database_url_wins_over_database_url() {
        let s = Settings::load_from(
            None,
            env(&[
                ("COMPANION_DATABASE__URL", "sqlite::memory:"),
                ("DATABASE_URL", "postgres://u:p@h/db"),
            ]),
        )
        .unwrap();
        assert_eq!(s.database_url().expose(), "sqlite::memory:");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("COMPANION_LOG__FORMAT", "xml", "log.format"),
            ("COMPANION_HTTP__LISTEN", "not-an-address", "http.listen"),
            ("COMPANION_MQTT__TLS_LISTEN", "1.2.3.4", "mqtt.tls_listen"),
            ("COMPANION_DATABASE__URL", "mysql://x", "database.url"),
            ("COMPANION_ADMIN__TOKEN", "short", "admin.token"),
            (
                "COMPANION_HTTP__TRUSTED_PROXIES",
                "10.0.0.0/40",
                "http.trusted_proxies",
            ),
            (
                "COMPANION_MQTT__PROXY_PROTOCOL_FROM",
                "nginx",
                "mqtt.proxy_protocol_from",
            ),
            ("COMPANION_MQTT__MAX_PENDING", "0", "mqtt.max_pending"),
            (
                "COMPANION_MQTT__MAX_PENDING_PER_IP",
                "0",
                "mqtt.max_pending_per_ip",
            ),
            (
                "COMPANION_MQTT__AUTH_FAILURE_WINDOW_S",
                "0",
                "mqtt.auth_failure_window_s",
            ),
            (
                "COMPANION_MQTT__MAX_TRACKED_ADDRESSES",
                "0",
                "mqtt.max_tracked_addresses",
            ),
        ];
        for (var, value, key) in cases {
            let err = Settings::load_from(None, env(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::load_from(
            None,
            env(&[
                ("COMPANION_ADMIN__TOKEN", "super-secret-admin-token"),
                ("DATABASE_URL", "postgres://u:hunter2@h/db"),
            ]),
        )
        .unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("super-secret"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert_eq!(
            redact_url("postgres://u:hunter2@h/db"),
            "postgres://u:***@h/db"
        );
    }
}
