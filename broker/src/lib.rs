//! `companion-broker`: the MQTT edge in front of an embedded rumqttd router.
//!
//! ```text
//! device --MQTT(+TLS)--> edge ==local link==> rumqttd router <==local link== backend
//!                          \____________ up topics, direct (UpSink) ___________/^
//! ```
//!
//! What [`start`] runs (all on the caller's tokio runtime, tracked by its `TaskTracker`,
//! stopped by its `CancellationToken`), except rumqttd's router loop, which rumqttd runs on its
//! own thread:
//! - [`router`]: rumqttd's `Router` with no listeners of its own, reached only through
//!   [`link::RouterPort`] (rumqttd local links; nothing else can bypass the edge).
//! - [`edge`]: one accept loop per device-facing listener (TLS, plain); one task per
//!   connection doing TLS handshake, CONNECT, authentication ([`Authenticator`]), then the
//!   pump: the device's MQTT session, packets decoded once, ACL checks ([`acl`]), size and
//!   rate limits. Publishes go into the router through one shared uplink link
//!   ([`link::Uplink`]), or straight to the in-process backend when it registered as the
//!   [`UpSink`] (no device may read an up topic, so the router would only pass them on to
//!   it); one downlink task holds the router link subscribed to every device's
//!   down topics and queues each message in its device's bounded mailbox. The router keeps no
//!   per-device state (rumqttd 0.20's per-filter bookkeeping is quadratic in filters and
//!   topics; one filter per device topic stopped connects past a few thousand devices).
//! - [`local`]: [`LocalClient`], the backend's in-process connection to the router.
//! - `edge::sessions`: live connections by device id, for [`BrokerHandle::kick`] and takeover.
//! - Events go to the backend's [`EventSink`]; metrics to the shared registry ([`metrics`]).

pub mod acl;
pub mod auth;
mod doorbell;
mod edge;
pub mod events;
pub mod link;
pub mod local;
pub mod metrics;
pub mod packet;
pub mod proxy;
pub mod receipts;
pub mod router;
pub mod settings;
pub mod tls;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use companion_schema::DeviceId;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{AuthDecision, AuthRequest, Authenticator, DenyReason};
pub use events::{AclAction, BrokerEvent, DisconnectReason, EventSink, NullSink};
pub use link::{RouterLinkError, RouterPort, UpSink};
pub use local::{LocalClient, LocalEvent};
pub use receipts::{Ledger, Receipt, Receipts, Settled};
pub use settings::{MqttSettings, RateSettings, TlsFiles};

/// Client ids starting with this belong to the platform (the backend's router clients); the
/// edge refuses them.
pub const RESERVED_CLIENT_ID_PREFIX: &str = "companion-internal";

/// Device-facing listeners, bound by the caller (port 0 in tests).
#[derive(Debug, Default)]
pub struct EdgeListeners {
    pub plain: Option<TcpListener>,
    pub tls: Option<TcpListener>,
    /// MQTT over WebSocket, plain.
    pub ws: Option<TcpListener>,
    /// MQTT over WebSocket over TLS.
    pub wss: Option<TcpListener>,
}

/// What the embedding application plugs into the edge.
#[derive(Clone)]
pub struct Hooks {
    /// Checks device credentials.
    pub auth: Arc<dyn Authenticator>,
    /// Receives presence, ACL and other edge events.
    pub sink: Arc<dyn EventSink>,
    /// Holds QoS 1 acknowledgements until the message is stored; `None`: acknowledge once the
    /// router has it.
    pub receipts: Option<Arc<dyn Receipts>>,
}

impl Hooks {
    pub fn new(auth: Arc<dyn Authenticator>, sink: Arc<dyn EventSink>) -> Self {
        Self {
            auth,
            sink,
            receipts: None,
        }
    }

    pub fn with_receipts(mut self, receipts: Arc<dyn Receipts>) -> Self {
        self.receipts = Some(receipts);
        self
    }
}

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("a TLS listener was given without a TLS configuration")]
    TlsWithoutConfig,
    #[error("starting the internal router: {0}")]
    Router(#[from] router::RouterError),
    #[error("linking the edge to the router: {0}")]
    Link(#[from] RouterLinkError),
}

/// A handle on the running broker. Cheap to clone.
#[derive(Clone)]
pub struct BrokerHandle {
    edge: Arc<edge::Edge>,
    listeners: usize,
}

impl std::fmt::Debug for BrokerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerHandle")
            .field("connected_devices", &self.connected_devices())
            .finish()
    }
}

impl BrokerHandle {
    /// Closes the device's live connection (reason `kicked`). False if it is not connected.
    pub fn kick(&self, device: &DeviceId) -> bool {
        self.edge.sessions.close(device, DisconnectReason::Kicked)
    }

    /// Whether the edge is accepting on every listener it was given (for `/ready`).
    pub fn is_up(&self) -> bool {
        !self.edge.shutdown.is_cancelled()
            && self.edge.listeners_alive.load(Ordering::SeqCst) == self.listeners
    }

    /// Devices currently connected through the edge.
    pub fn connected_devices(&self) -> usize {
        usize::try_from(self.edge.metrics.connected_devices.get()).unwrap_or(0)
    }

    /// Hands every device up-topic publish to `sink` instead of the router, until it is set
    /// to `None` (see [`UpSink`]). Subscribers of up topics on the router (in-process clients)
    /// see none of them meanwhile.
    pub fn set_up_sink(&self, sink: Option<Arc<dyn UpSink>>) {
        self.edge.uplink.set_sink(sink);
    }

    /// An in-process client of the router under the reserved id
    /// `companion-internal-{name}` (the backend's connection; devices can never use it).
    pub async fn local_client(&self, name: &str) -> Result<LocalClient, RouterLinkError> {
        LocalClient::open(
            &self.edge.router,
            &format!("{RESERVED_CLIENT_ID_PREFIX}-{name}"),
        )
        .await
    }
}

/// Starts the router and the edge. Returns once the router accepts connections and the edge
/// listeners are being served; everything stops when `shutdown` is cancelled (connections are
/// closed with reason `server_shutdown`) and every task is tracked by `tracker`.
pub async fn start(
    settings: &MqttSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
    listeners: EdgeListeners,
    hooks: Hooks,
    registry: &mut prometheus_client::registry::Registry,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<BrokerHandle, BrokerError> {
    let tls_acceptor = match (listeners.tls.is_some() || listeners.wss.is_some(), tls) {
        (true, Some(config)) => Some(tokio_rustls::TlsAcceptor::from(config)),
        (true, None) => return Err(BrokerError::TlsWithoutConfig),
        (false, _) => None,
    };
    let metrics = metrics::Metrics::register(registry);
    let router = router::start(
        settings,
        metrics.lost.clone(),
        metrics.router_client_ids.clone(),
        shutdown.clone(),
        tracker,
    )?;

    let (uplink, uplink_rx) =
        link::Uplink::open(&router, &format!("{RESERVED_CLIENT_ID_PREFIX}-uplink")).await?;
    tracker.spawn(uplink.clone().watch(uplink_rx, shutdown.clone()));

    let count = [
        &listeners.plain,
        &listeners.tls,
        &listeners.ws,
        &listeners.wss,
    ]
    .iter()
    .filter(|l| l.is_some())
    .count();
    let edge = Arc::new(edge::Edge {
        settings: settings.clone(),
        auth: hooks.auth,
        sink: hooks.sink,
        receipts: hooks.receipts,
        metrics: metrics.clone(),
        sessions: edge::sessions::Sessions::default(),
        router,
        uplink,
        retained: Default::default(),
        shutdown,
        tracker: tracker.clone(),
        permits: Arc::new(Semaphore::new(settings.max_connections.max(1))),
        pending: edge::admission::Pending::new(settings, metrics.pending.clone()),
        throttle: edge::admission::Throttle::new(
            settings,
            metrics.throttle_addresses.clone(),
            metrics.throttle_untracked.clone(),
            std::time::Instant::now(),
        ),
        logs: Default::default(),
        listeners_alive: AtomicUsize::new(count),
    });
    // Shutdown reaches the connections through their doorbells: the pumps do not poll the
    // shutdown token.
    tracker.spawn({
        let edge = edge.clone();
        async move {
            edge.shutdown.cancelled().await;
            edge.sessions
                .close_all(events::DisconnectReason::ServerShutdown);
        }
    });
    // Subscribed before any device can connect, so no message for one is missed.
    let downlink = edge::fanout::open(&edge).await?;
    tracker.spawn(edge::fanout::run(
        edge.clone(),
        downlink,
        edge.shutdown.clone(),
    ));
    let ws = Some(Arc::new(edge::websocket::Policy::new(settings)));
    let transports = [
        (listeners.plain, None, None),
        (listeners.tls, tls_acceptor.clone(), None),
        (listeners.ws, None, ws.clone()),
        (listeners.wss, tls_acceptor, ws),
    ];
    for (listener, tls, ws) in transports {
        if let Some(listener) = listener {
            let transport = edge::Transport { tls, ws };
            tracker.spawn(edge::accept_loop(edge.clone(), listener, transport));
        }
    }
    Ok(BrokerHandle {
        edge,
        listeners: count,
    })
}
