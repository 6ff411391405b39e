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
mod connection;
pub(crate) mod fanout;
mod limits;
mod pump;
mod session;
pub(crate) mod sessions;
pub(crate) mod websocket;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use companion_schema::DeviceId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::events::EventSink;
use crate::events::{AclAction, BrokerEvent};
use crate::link::{RouterPort, Uplink};
use crate::metrics::{result, ActionLabel, Metrics, ReasonLabel, ResultLabel};
use crate::proxy;
use crate::settings::MqttSettings;
use sessions::Sessions;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

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
    let Ok(permit) = edge.permits.clone().try_acquire_owned() else {
        edge.count_connect(result::OVER_CAPACITY);
        tracing::warn!(%peer, "connection refused: maximum number of connections reached");
        return;
    };
    let _ = stream.set_nodelay(true);
    let edge2 = edge.clone();
    edge.tracker.spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let mut peer = peer;
        // PROXY protocol on the MQTT listeners; the WebSocket ones learn the client's address
        // from X-Forwarded-For (an HTTP reverse proxy cannot send a PROXY header).
        if transport.ws.is_none() && edge2.settings.proxy_protocol_from.contains(peer.ip()) {
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
        }
        match transport.tls {
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
                    Ok(Ok(stream)) => serve(edge2, stream, peer, transport.ws).await,
                    Ok(Err(e)) => tls_failed(&edge2, peer, "error", &e.to_string()),
                    Err(_) => tls_failed(&edge2, peer, "timeout", "handshake timed out"),
                }
            }
            None => serve(edge2, stream, peer, transport.ws).await,
        }
    });
}

/// Runs the MQTT connection on `stream`, after the WebSocket upgrade when `ws` is set: one
/// code path for every transport from here on.
async fn serve<S>(edge: Arc<Edge>, stream: S, peer: SocketAddr, ws: Option<Arc<websocket::Policy>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(policy) = ws else {
        return Box::pin(connection::run(edge, stream, peer)).await;
    };
    let timeout = Duration::from_millis(edge.settings.connect_timeout_ms);
    // Cases: shutdown; the upgrade finishes, is refused, or times out.
    // Boxed for the same reason as the TLS handshake.
    let upgrade = tokio::select! {
        _ = edge.shutdown.cancelled() => return,
        u = tokio::time::timeout(timeout, Box::pin(websocket::accept(stream, &policy, peer))) => u,
    };
    match upgrade {
        Ok(Ok((stream, client))) => Box::pin(connection::run(edge, stream, client)).await,
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
