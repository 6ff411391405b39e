//! The `[mqtt]` section of the server configuration. The backend embeds this type in its own
//! `Settings`, so every key here is `mqtt.<key>` in files and `COMPANION_MQTT__<KEY>` in the
//! environment.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Plain MQTT listener for development. Loopback by default; empty string disables it.
    pub listen: String,
    /// MQTT over TLS, the device-facing listener. Empty string disables it.
    pub tls_listen: String,
    /// MQTT over WebSocket without TLS: development, or behind a reverse proxy that terminates
    /// TLS on 443 (`ops/nginx` proxies `/mqtt` here). Loopback by default; empty disables it.
    pub ws_listen: String,
    /// MQTT over WebSocket with TLS, for devices that may only reach 443 and no proxy in
    /// front (e.g. `0.0.0.0:443`). Empty (the default) disables it.
    pub wss_listen: String,
    /// The HTTP path WebSocket clients upgrade on; any other path gets 404.
    pub ws_path: String,
    /// Browser origins allowed to open a WebSocket (`https://app.example.com`). Clients that
    /// send no `Origin` (devices, agents) are always allowed: MQTT authenticates with the
    /// device token in CONNECT, never with ambient cookies. Empty: any origin.
    pub ws_allowed_origins: Vec<String>,
    /// Reverse proxies (networks or addresses) in front of the WebSocket listeners whose
    /// `X-Forwarded-For` names the device's real address. Empty: the header is ignored.
    pub ws_trusted_proxies: crate::proxy::Networks,
    /// Host names (besides localhost and 127.0.0.1) the generated server certificate covers,
    /// and the host that registration answers tell devices to use.
    pub hosts: Vec<String>,
    /// Most simultaneous device connections across both listeners.
    pub max_connections: usize,
    /// TCP proxies (networks or addresses) in front of the MQTT listeners (`listen`,
    /// `tls_listen`; the WebSocket ones use `ws_trusted_proxies`) that send a PROXY
    /// protocol header (v1 or v2) with the device's real address, such as nginx's `stream`
    /// module with `proxy_protocol on;`. A connection from one of them must start with the
    /// header; from anywhere else a header is not accepted. Empty: no proxy.
    pub proxy_protocol_from: crate::proxy::Networks,
    /// Largest MQTT packet accepted from a device, in bytes.
    pub max_packet_size: usize,
    pub tls_handshake_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub auth_timeout_ms: u64,
    /// Most connections not yet authenticated (in the TLS handshake, waiting for CONNECT or
    /// for the authenticator) across all listeners; they count within `max_connections`.
    /// Over it, a new connection is closed at once (`broker_connects_total{result=
    /// "too_many_pending"}`).
    pub max_pending: usize,
    /// Most connections not yet authenticated from one source address (an IPv6 /64 counts as
    /// one), so idle sockets and half-finished handshakes from one address cannot take the
    /// slots every device needs. A device is pending for a few milliseconds: a fleet behind
    /// one NAT reconnecting at hundreds per second stays far below it.
    pub max_pending_per_ip: usize,
    /// Failed logins from one source address within `auth_failure_window_s` after which that
    /// address is refused for `auth_block_s`, before the TLS handshake and before any
    /// database lookup. 0 turns the block off. Devices behind one NAT share the count.
    pub auth_failures_per_ip: u32,
    /// The failed-login window; also the period over which the audit log sums up refused
    /// logins from one address (the first written at once, the rest as one row).
    pub auth_failure_window_s: u64,
    pub auth_block_s: u64,
    /// Most source addresses whose failed logins are tracked at once (broker and audit
    /// summaries each); entries expire with their window or block.
    pub max_tracked_addresses: usize,
    /// rumqttd commit-log segment size for fleet-wide filters (`devices/+/<suffix>`, the
    /// backend's subscriptions). rumqttd keeps one log per filter and never frees it.
    pub router_segment_bytes: usize,
    /// Segment size for the fleet-wide filters of the small control kinds (status, buttons,
    /// session control, persona, config, LEDs). rumqttd counts only topic and payload bytes
    /// against a segment while each stored message costs about 460 bytes in memory, so with
    /// `router_segment_bytes` these logs kept filling for hours at a few hundred messages a
    /// minute (the soak's RSS growth).
    pub router_control_segment_bytes: usize,
    /// Segment size for every other filter (a device's own down topics).
    pub router_device_segment_bytes: usize,
    /// Segments kept per filter; older ones are dropped (a lagging subscriber then loses
    /// messages, counted as `broker_messages_lost_total`).
    pub router_segment_count: usize,
    pub rate: RateSettings,
    pub tls: TlsFiles,
    /// An external broker (`mqtt://host:port` or `mqtts://host:port`) the backend uses
    /// instead of the embedded one; empty: embedded. With it set, the embedded broker and its
    /// listeners do not run, and device authentication and ACLs are the external broker's.
    pub upstream: String,
    pub upstream_username: String,
    pub upstream_password: Option<Redacted>,
    /// CA certificate (PEM) that signs an `mqtts://` upstream's certificate.
    pub upstream_ca: Option<PathBuf>,
    /// Subscribe to the upstream through shared subscriptions (`$share/companion-<kind>/...`,
    /// MQTT 5 and most brokers); off for a broker without them (RabbitMQ 3.x), where every
    /// backend connected to it receives every device message.
    pub upstream_shared: bool,
}

/// A string whose `Debug` prints `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:1883".into(),
            tls_listen: "0.0.0.0:8883".into(),
            ws_listen: "127.0.0.1:8083".into(),
            wss_listen: String::new(),
            ws_path: "/mqtt".into(),
            ws_allowed_origins: Vec::new(),
            ws_trusted_proxies: crate::proxy::Networks::default(),
            hosts: Vec::new(),
            max_connections: 10_000,
            proxy_protocol_from: crate::proxy::Networks::default(),
            max_packet_size: 64 * 1024 + 512,
            tls_handshake_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            auth_timeout_ms: 2_000,
            max_pending: 1_024,
            max_pending_per_ip: 100,
            auth_failures_per_ip: 20,
            auth_failure_window_s: 60,
            auth_block_s: 60,
            max_tracked_addresses: 65_536,
            // Audio up at ~10 KB/s per talking device: 4 x 1 MiB holds ~4 s of 100 devices.
            router_segment_bytes: 1024 * 1024,
            // ~330 control messages (~100 bytes counted each) per segment, ~1,300 per filter:
            // full within minutes at a fleet's rates (so memory is flat early), and still far
            // more than an in-process reader falls behind in a 10,000-device connect storm
            // (bench/compare.sh, broker_messages_lost_total 0).
            router_control_segment_bytes: 32 * 1024,
            // A device's audio down at ~10 KB/s: 4 x 128 KiB holds ~50 s.
            router_device_segment_bytes: 128 * 1024,
            router_segment_count: 4,
            rate: RateSettings::default(),
            tls: TlsFiles::default(),
            upstream: String::new(),
            upstream_username: String::new(),
            upstream_password: None,
            upstream_ca: None,
            upstream_shared: true,
        }
    }
}

/// Per-device publish limits (token buckets), by topic class.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateSettings {
    pub control_per_s: u32,
    pub control_burst: u32,
    pub audio_per_s: u32,
    pub audio_burst: u32,
    /// A device that stays over a limit this long is disconnected.
    pub sustained_over_limit_s: u64,
}

impl Default for RateSettings {
    fn default() -> Self {
        Self {
            control_per_s: 20,
            control_burst: 40,
            audio_per_s: 100,
            audio_burst: 200,
            sustained_over_limit_s: 10,
        }
    }
}

/// Certificate and key for the TLS listener. When unset, a development CA and server
/// certificate are generated into `{data_dir}/tls/` on first start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}
