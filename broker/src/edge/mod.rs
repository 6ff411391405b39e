//! The device-facing edge: accept loops (plain and TLS), one task per connection.
//!
//! - [`connection`]: TLS handshake, CONNECT, identity rules, authentication, Will ACL.
//! - [`session`]: CONNACK, the pump, and the Will on an unclean end.
//! - [`pump`]: the device's MQTT session: publishes (ACL, aliases, limits) into the router
//!   through the shared uplink, SUBSCRIBE/UNSUBSCRIBE/PING answered here, messages from the
//!   mailbox written to the device.
//! - [`fanout`]: the downlink: one router link for every device's down topics, handing each
//!   message to its device's mailbox; the retained messages per device.

mod acks;
pub(crate) mod admission;
mod connection;
pub(crate) mod fanout;
mod limits;
mod pump;
mod session;
pub(crate) mod sessions;
pub(crate) mod websocket;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_schema::DeviceId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, DenyReason};
use crate::events::EventSink;
use crate::events::{AclAction, BrokerEvent};
use crate::link::{RouterPort, Uplink};
use crate::metrics::{result, ActionLabel, Metrics, ReasonLabel, ResultLabel};
use crate::proxy;
use crate::settings::MqttSettings;
use admission::{LogLimit, Pending, PendingGuard, Source, Throttle, TooMany};
use sessions::Sessions;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// At most one warning per this interval for each kind of refusal an attack repeats (the
/// metrics count every one; the held-back lines are summed in the next).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate limits for the log lines an attack would otherwise repeat per connection.
pub(crate) struct RefusalLogs {
    pub over_capacity: LogLimit,
    pub too_many_pending: LogLimit,
    pub blocked: LogLimit,
    pub refused: LogLimit,
}

impl Default for RefusalLogs {
    fn default() -> Self {
        Self {
            over_capacity: LogLimit::new(REFUSAL_LOG_EVERY),
            too_many_pending: LogLimit::new(REFUSAL_LOG_EVERY),
            blocked: LogLimit::new(REFUSAL_LOG_EVERY),
            refused: LogLimit::new(Duration::from_secs(1)),
        }
    }
}

/// What every connection task shares.
pub(crate) struct Edge {
    pub settings: MqttSettings,
    pub auth: Arc<dyn Authenticator>,
    pub sink: Arc<dyn EventSink>,
    /// Holds QoS 1 acknowledgements until the message is stored.
    pub receipts: Option<Arc<dyn crate::receipts::Receipts>>,
    pub metrics: Metrics,
    pub sessions: Sessions,
    /// Where links to the router are opened.
    pub router: Arc<RouterPort>,
    /// The shared way into the router for every device's publishes.
    pub uplink: Arc<Uplink>,
    /// The last retained message per device and down kind.
    pub retained: fanout::Retained,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub permits: Arc<Semaphore>,
    /// Connections not yet authenticated, in all and per source address.
    pub pending: Arc<Pending>,
    /// Failed logins per source address; blocked addresses.
    pub throttle: Throttle,
    pub logs: RefusalLogs,
    /// Accept loops still running.
    pub listeners_alive: AtomicUsize,
}

impl Edge {
    /// Records an ACL violation: audit event, counter, log.
    pub fn acl_denied(&self, device: &DeviceId, action: AclAction, topic: &str) {
        let topic = crate::acl::truncate(topic, 256);
        tracing::warn!(device_id = %device, action = action.as_str(), %topic, "ACL violation");
        self.metrics
            .acl_denied
            .get_or_create(&ActionLabel {
                action: action.as_str(),
            })
            .inc();
        self.sink.send(BrokerEvent::AclDenied {
            device: device.clone(),
            action,
            topic,
        });
    }

    pub fn count_connect(&self, result: &'static str) {
        self.metrics
            .connects
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Records a refused login: metrics, the audit event, the source's failure count (which
    /// may start a block), and a log line (info for a source's first failure in its window,
    /// at most one a second; debug otherwise).
    pub fn login_refused(&self, client_id: &str, peer: SocketAddr, reason: DenyReason) {
        let throttled = reason == DenyReason::Throttled;
        self.count_connect(if throttled {
            result::THROTTLED
        } else {
            result::DENIED
        });
        self.metrics
            .auth_failures
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        let client_id = crate::acl::truncate(client_id, 64);
        // The source's own mistakes count towards a block; an unavailable authenticator
        // (database down) and refusals during a block do not.
        let source = Source::of(peer.ip());
        let failure = match reason {
            DenyReason::Throttled | DenyReason::Unavailable => None,
            _ => Some(self.throttle.failed(source, Instant::now())),
        };
        if failure.is_some_and(|f| f.first) && self.logs.refused.allow().is_some() {
            tracing::info!(%peer, %client_id, reason = reason.as_str(), "device refused");
        } else {
            tracing::debug!(%peer, %client_id, reason = reason.as_str(), "device refused");
        }
        if failure.is_some_and(|f| f.blocked) {
            self.metrics.throttle_blocks.inc();
            if let Some(held) = self.logs.blocked.allow() {
                tracing::warn!(
                    %source,
                    failures = self.settings.auth_failures_per_ip,
                    window_s = self.settings.auth_failure_window_s,
                    block_s = self.settings.auth_block_s,
                    other_blocks_not_logged = held,
                    "address blocked after repeated failed logins"
                );
            }
        }
        self.sink.send(BrokerEvent::AuthFailed {
            client_id,
            peer,
            reason,
        });
    }

    /// Counts `client` (the peer, or the address a trusted proxy named) against its source's
    /// limits: refused if the source is blocked or has too many pending connections.
    fn admit(&self, pending: &mut PendingGuard, client: SocketAddr) -> bool {
        let source = Source::of(client.ip());
        if self.throttle.blocked(source, Instant::now()) {
            self.login_refused("", client, DenyReason::Throttled);
            return false;
        }
        match pending.attribute(source) {
            Ok(()) => true,
            Err(why) => {
                self.too_many_pending(client, why);
                false
            }
        }
    }

    fn too_many_pending(&self, peer: SocketAddr, why: TooMany) {
        self.count_connect(result::TOO_MANY_PENDING);
        let limit = match why {
            TooMany::InAll => "mqtt.max_pending",
            TooMany::FromSource => "mqtt.max_pending_per_ip",
        };
        match self.logs.too_many_pending.allow() {
            Some(held) => tracing::warn!(
                %peer,
                limit,
                others_not_logged = held,
                "connection refused: too many connections not yet authenticated"
            ),
            None => tracing::debug!(%peer, limit, "connection refused: too many pending"),
        }
    }
}

/// What a listener speaks on top of TCP.
#[derive(Clone)]
pub(crate) struct Transport {
    pub tls: Option<TlsAcceptor>,
    /// MQTT over WebSocket, upgraded under this policy.
    pub ws: Option<Arc<websocket::Policy>>,
}

impl Transport {
    fn label(&self) -> &'static str {
        match (self.tls.is_some(), self.ws.is_some()) {
            (false, false) => "plain",
            (true, false) => "tls",
            (false, true) => "ws",
            (true, true) => "wss",
        }
    }
}

/// Runs one accept loop until shutdown; each connection gets its own task.
pub(crate) async fn accept_loop(edge: Arc<Edge>, listener: TcpListener, transport: Transport) {
    let kind = transport.label();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, listener = kind, "edge listening");
    }
    loop {
        // Cases: shutdown (stop accepting, drop the listener); a new connection.
        tokio::select! {
            _ = edge.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => spawn_connection(&edge, stream, peer, transport.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, listener = kind, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
    edge.listeners_alive.fetch_sub(1, Ordering::SeqCst);
    tracing::info!(listener = kind, "edge listener closed");
}

fn spawn_connection(edge: &Arc<Edge>, stream: TcpStream, peer: SocketAddr, transport: Transport) {
    // The client's address is known now, unless the peer is a trusted proxy that names it
    // (PROXY header, X-Forwarded-For): then the per-source limits apply once it has.
    let proxied = match transport.ws {
        None => edge.settings.proxy_protocol_from.contains(peer.ip()),
        Some(_) => edge.settings.ws_trusted_proxies.contains(peer.ip()),
    };
    let source = (!proxied).then(|| Source::of(peer.ip()));
    if let Some(source) = source {
        if edge.throttle.blocked(source, Instant::now()) {
            return edge.login_refused("", peer, DenyReason::Throttled);
        }
    }
    let pending = match edge.pending.enter(source) {
        Ok(guard) => guard,
        Err(why) => return edge.too_many_pending(peer, why),
    };
    let Ok(permit) = edge.permits.clone().try_acquire_owned() else {
        edge.count_connect(result::OVER_CAPACITY);
        match edge.logs.over_capacity.allow() {
            Some(held) => tracing::warn!(
                %peer,
                others_not_logged = held,
                "connection refused: maximum number of connections reached"
            ),
            None => tracing::debug!(%peer, "connection refused: maximum number of connections"),
        }
        return;
    };
    let _ = stream.set_nodelay(true);
    let edge2 = edge.clone();
    edge.tracker.spawn(async move {
        let _permit = permit;
        let mut pending = pending;
        let mut stream = stream;
        let mut peer = peer;
        // PROXY protocol on the MQTT listeners; the WebSocket ones learn the client's address
        // from X-Forwarded-For (an HTTP reverse proxy cannot send a PROXY header).
        if transport.ws.is_none() && proxied {
            let timeout = Duration::from_millis(edge2.settings.connect_timeout_ms);
            // Cases: shutdown; the header arrives, is refused, or times out.
            let header = tokio::select! {
                _ = edge2.shutdown.cancelled() => return,
                h = tokio::time::timeout(timeout, proxy::read_header(&mut stream)) => h,
            };
            match header {
                Ok(Ok(Some(client))) => peer = client,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return proxy_refused(&edge2, peer, &e.to_string()),
                Err(_) => return proxy_refused(&edge2, peer, "no PROXY protocol header in time"),
            }
            if !edge2.admit(&mut pending, peer) {
                return;
            }
        }
        // The connection's life runs in a boxed future made here, awaited only once the
        // handshake's locals are gone: awaited inside the match, the task kept room for a
        // whole TLS stream (unused by then) next to it, ~4.7 KiB per device for its life.
        let connection: Pin<Box<dyn Future<Output = ()> + Send>> = match transport.tls {
            Some(acceptor) => {
                let timeout = Duration::from_millis(edge2.settings.tls_handshake_timeout_ms);
                // Cases: shutdown; the handshake finishes or times out.
                // Boxed: the handshake's state (a whole TLS server connection) is freed when it
                // is done, instead of sizing the connection's task for its whole life.
                let handshake = tokio::select! {
                    _ = edge2.shutdown.cancelled() => return,
                    h = tokio::time::timeout(timeout, Box::pin(acceptor.accept(stream))) => h,
                };
                match handshake {
                    Ok(Ok(stream)) => Box::pin(serve(edge2, stream, peer, transport.ws, pending)),
                    Ok(Err(e)) => return tls_failed(&edge2, peer, "error", &e.to_string()),
                    Err(_) => return tls_failed(&edge2, peer, "timeout", "handshake timed out"),
                }
            }
            None => Box::pin(serve(edge2, stream, peer, transport.ws, pending)),
        };
        connection.await;
    });
}

/// Runs the MQTT connection on `stream`, after the WebSocket upgrade when `ws` is set: one
/// code path for every transport from here on.
async fn serve<S>(
    edge: Arc<Edge>,
    stream: S,
    peer: SocketAddr,
    ws: Option<Arc<websocket::Policy>>,
    mut pending: PendingGuard,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(policy) = ws else {
        // Inline: the caller boxes this future, so it is the connection's one heap block.
        return connection::run(edge, stream, peer, pending).await;
    };
    let timeout = Duration::from_millis(edge.settings.connect_timeout_ms);
    // Cases: shutdown; the upgrade finishes, is refused, or times out.
    // Boxed for the same reason as the TLS handshake.
    let upgrade = tokio::select! {
        _ = edge.shutdown.cancelled() => return,
        u = tokio::time::timeout(timeout, Box::pin(websocket::accept(stream, &policy, peer))) => u,
    };
    match upgrade {
        Ok(Ok((stream, client))) => {
            if edge.admit(&mut pending, client) {
                Box::pin(connection::run(edge, stream, client, pending)).await;
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "WebSocket upgrade refused");
            edge.count_connect(result::WEBSOCKET_REFUSED);
        }
        Err(_) => {
            tracing::debug!(%peer, "no WebSocket upgrade in time");
            edge.count_connect(result::TIMEOUT);
        }
    }
}

fn proxy_refused(edge: &Edge, proxy: SocketAddr, detail: &str) {
    tracing::warn!(%proxy, detail, "connection from a trusted proxy refused");
    edge.count_connect(result::PROXY_HEADER);
}

fn tls_failed(edge: &Edge, peer: SocketAddr, reason: &'static str, detail: &str) {
    tracing::debug!(%peer, reason, detail, "TLS handshake failed");
    edge.metrics
        .tls_handshake_failures
        .get_or_create(&ReasonLabel { reason })
        .inc();
}
