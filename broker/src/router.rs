//! The embedded rumqttd: a `Router` (its own thread, started by rumqttd) and one `Server` per
//! protocol version on our tokio runtime, listening on loopback only, accepting only this
//! process's random internal credentials.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use rand::RngCore;
use rumqttd::protocol::{self, Packet, Protocol};
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, SegmentConfig, Server, ServerSettings,
    Strategy,
};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::packet;
use crate::settings::MqttSettings;
use crate::RESERVED_CLIENT_ID_PREFIX;

/// Why the router could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("picking a loopback port: {0}")]
    Port(std::io::Error),
    #[error("the internal {0} listener did not come up")]
    NotListening(&'static str),
    #[error("registering the alerts link: {0}")]
    Alerts(String),
}

/// How the backend (or the edge) reaches the router directly.
#[derive(Clone)]
pub struct InternalEndpoint {
    pub v4: SocketAddr,
    pub v5: SocketAddr,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for InternalEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalEndpoint")
            .field("v4", &self.v4)
            .field("v5", &self.v5)
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// Capacity of rumqttd's alerts channel is rumqttd's; alerts are counted as they arrive.
const READY_DEADLINE: Duration = Duration::from_secs(5);

/// Starts the router and its two loopback servers; returns once both accept MQTT.
pub(crate) async fn start(
    settings: &MqttSettings,
    lost: Counter,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<InternalEndpoint, RouterError> {
    let mut secret = [0u8; 24];
    rand::rng().fill_bytes(&mut secret);
    let endpoint = InternalEndpoint {
        // rumqttd binds its listeners itself and takes only an address: we ask the kernel for a
        // free loopback port, release it and hand the address over. Another process could take
        // the port in between; start() then fails its readiness probe instead of hanging.
        v4: free_loopback_port()?,
        v5: free_loopback_port()?,
        username: RESERVED_CLIENT_ID_PREFIX.to_owned(),
        password: hex::encode(secret),
    };

    let router = Router::new(0, router_config(settings));
    let router_tx = router.spawn();

    // rumqttd only pushes alerts (CursorJump: a subscriber lost messages to log rotation) when
    // something sends it `Event::SendAlerts`, which only the timer inside `Broker::start` does:
    // with Router + Server the alerts link stays quiet. It is registered anyway so the counter
    // moves as soon as rumqttd flushes alerts (see README, "Known gaps").
    let alerts = rumqttd::alerts::AlertsLink::new(router_tx.clone())
        .map_err(|e| RouterError::Alerts(e.to_string()))?;
    let token = shutdown.clone();
    tracker.spawn(async move {
        loop {
            // Cases: shutdown; a batch of alerts; the router is gone.
            tokio::select! {
                _ = token.cancelled() => break,
                batch = alerts.next() => match batch {
                    Ok(batch) => count_lost(&batch, &lost),
                    Err(_) => break,
                },
            }
        }
    });

    for (name, addr, v5) in [("v4", endpoint.v4, false), ("v5", endpoint.v5, true)] {
        let server_settings = server_settings(settings, name, addr, &endpoint.password);
        let tx = router_tx.clone();
        let token = shutdown.clone();
        tracker.spawn(async move {
            let run = async {
                let result = if v5 {
                    Server::new(server_settings, tx, rumqttd::protocol::v5::V5)
                        .start(LinkType::Remote)
                        .await
                } else {
                    Server::new(server_settings, tx, rumqttd::protocol::v4::V4)
                        .start(LinkType::Remote)
                        .await
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, server = name, "internal MQTT server stopped");
                }
            };
            // Cases: shutdown (drops the listener); the server failed.
            tokio::select! {
                _ = token.cancelled() => {}
                _ = run => {}
            }
        });
    }

    for (name, addr, level) in [("v4", endpoint.v4, 4), ("v5", endpoint.v5, 5)] {
        wait_listening(addr, level, &endpoint)
            .await
            .map_err(|_| RouterError::NotListening(name))?;
        match nodelay::set_for_local_addr(addr) {
            Ok(0) => tracing::warn!(
                server = name,
                "rumqttd's listener not found: Nagle stays on for its connections"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(server = name, error = %e, "could not set TCP_NODELAY on rumqttd's listener")
            }
        }
    }
    Ok(endpoint)
}

/// rumqttd 0.20 never sets TCP_NODELAY on the connections it accepts, so every router → edge
/// and router → backend write waits behind the previous one's delayed ACK (40 ms on Linux)
/// whenever two small packets follow each other: a session event and the first audio chunk,
/// consecutive audio chunks. It binds its listeners itself; this finds them among the process's
/// own descriptors by local address and sets the option there, which connections accepted
/// later inherit (Linux copies it from the listening socket).
#[cfg(target_os = "linux")]
mod nodelay {
    use std::net::SocketAddr;
    use std::os::fd::{BorrowedFd, RawFd};

    /// Sets TCP_NODELAY on every socket of this process bound to `addr` (the listener, and
    /// connections it already accepted); returns how many.
    pub(crate) fn set_for_local_addr(addr: SocketAddr) -> std::io::Result<usize> {
        let mut set = 0;
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let Ok(entry) = entry else { continue };
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
                continue;
            };
            if !is_socket {
                continue;
            }
            // SAFETY: `fd` was open a moment ago and is only borrowed for two socket option
            // calls. Were it closed and its number reused in between, the calls would act on
            // that new descriptor, and the option is set only if it is a socket bound to
            // rumqttd's loopback address: the option then is the one intended.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let sock = socket2::SockRef::from(&fd);
            if sock.local_addr().ok().and_then(|a| a.as_socket()) == Some(addr) {
                sock.set_tcp_nodelay(true)?;
                set += 1;
            }
        }
        Ok(set)
    }

    #[cfg(test)]
    mod tests {
        use std::net::{TcpListener, TcpStream};

        #[test]
        fn connections_accepted_after_it_inherit_nodelay() {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let before = TcpStream::connect(addr).unwrap();
            let (early, _) = listener.accept().unwrap();
            assert!(!early.nodelay().unwrap(), "the kernel default is Nagle on");
            // The listener and the connection accepted before, found by address alone.
            assert_eq!(super::set_for_local_addr(addr).unwrap(), 2);
            assert!(early.nodelay().unwrap());
            let _after = TcpStream::connect(addr).unwrap();
            let (late, _) = listener.accept().unwrap();
            assert!(late.nodelay().unwrap(), "inherited from the listener");
            // Sockets elsewhere are left alone.
            assert!(!before.nodelay().unwrap());
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod nodelay {
    pub(crate) fn set_for_local_addr(_: std::net::SocketAddr) -> std::io::Result<usize> {
        Ok(0)
    }
}

fn count_lost(batch: &[rumqttd::Alert], lost: &Counter) {
    for alert in batch {
        if alert.kind.name() == "cursor_jump" {
            tracing::warn!(client_id = %alert.client_id, detail = %alert.kind.description(),
                "router subscriber lost messages to log rotation");
            lost.inc();
        }
    }
}

fn free_loopback_port() -> Result<SocketAddr, RouterError> {
    let listener = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(RouterError::Port)?;
    listener.local_addr().map_err(RouterError::Port)
}

fn router_config(settings: &MqttSettings) -> RouterConfig {
    // One commit log per subscription filter, never freed (rumqtt#1001): fleet-wide filters
    // (`devices/+/<suffix>`, the backend's) get `router_segment_bytes`, everything else (a
    // device's own down topics, dynamic filters) the smaller `router_device_segment_bytes`.
    let fleet = SegmentConfig {
        max_segment_size: settings.router_segment_bytes,
        max_segment_count: settings.router_segment_count,
    };
    let custom: HashMap<String, SegmentConfig> = companion_schema::TopicKind::ALL
        .into_iter()
        .map(|k| (k.all_devices_filter(), fleet.clone()))
        .collect();
    RouterConfig {
        max_connections: settings.max_connections + 1024,
        max_outgoing_packet_count: 200,
        max_segment_size: settings.router_device_segment_bytes,
        max_segment_count: settings.router_segment_count,
        custom_segment: Some(custom),
        initialized_filters: None,
        shared_subscriptions_strategy: Strategy::RoundRobin,
    }
}

fn server_settings(
    settings: &MqttSettings,
    name: &str,
    listen: SocketAddr,
    secret: &str,
) -> ServerSettings {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 5_000,
        // The edge already bounded device packets; the backend may publish up to the payload
        // limit plus headers.
        max_payload_size: settings
            .max_packet_size
            .max(companion_schema::MAX_PAYLOAD + 1024),
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        // Without dynamic filters rumqttd disconnects a client publishing to a topic nobody
        // subscribes to (a device's status before the backend subscribed).
        dynamic_filters: true,
    };
    let secret = secret.to_owned();
    connections.set_auth_handler(move |_client_id, _username, password: String| {
        let ok: bool = password.as_bytes().ct_eq(secret.as_bytes()).into();
        async move { ok }
    });
    ServerSettings {
        name: format!("internal-{name}"),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    }
}

/// Probes a loopback listener with a real MQTT 3.1.1 CONNECT until it answers CONNACK 0.
async fn wait_listening(
    addr: SocketAddr,
    level: u8,
    endpoint: &InternalEndpoint,
) -> Result<(), ()> {
    let deadline = tokio::time::Instant::now() + READY_DEADLINE;
    let mut backoff = Duration::from_millis(2);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Ok(true)) =
            tokio::time::timeout(Duration::from_secs(1), probe(addr, level, endpoint)).await
        {
            return Ok(());
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
    Err(())
}

fn next_probe() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

async fn probe(addr: SocketAddr, level: u8, endpoint: &InternalEndpoint) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect(addr).await?;
    let connect = connect_packet(
        level,
        // A fresh id per attempt: see `edge::pump::UpstreamIds` for the rumqttd trap
        // that a reused id after a failed attempt springs.
        &format!(
            "{RESERVED_CLIENT_ID_PREFIX}-probe-{}-{}",
            addr.port(),
            next_probe()
        ),
        &endpoint.username,
        &endpoint.password,
    )?;
    stream.write_all(&connect).await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    stream.write_all(&[packet::DISCONNECT << 4, 0]).await?;
    // Wait for rumqttd to close the connection; closing first makes its link report a stale
    // disconnect that can drop whoever gets this connection id next (see edge::pump).
    crate::edge::pump::wait_for_eof(&mut stream).await;
    Ok(connack[0] == packet::CONNACK << 4 && connack[3] == 0)
}

/// A minimal CONNECT (level 4 or 5) with clean session and credentials, encoded by rumqttd's
/// own codec (as `packet::ConnectInfo::rewrite` does for devices).
fn connect_packet(
    level: u8,
    client_id: &str,
    username: &str,
    password: &str,
) -> std::io::Result<BytesMut> {
    let connect = Packet::Connect(
        protocol::Connect {
            keep_alive: 30,
            client_id: client_id.to_owned(),
            clean_session: true,
        },
        None,
        None,
        None,
        Some(protocol::Login {
            username: username.to_owned(),
            password: password.to_owned(),
        }),
    );
    let mut out = BytesMut::new();
    let written = if level == 5 {
        protocol::v5::V5.write(connect, &mut out)
    } else {
        protocol::v4::V4.write(connect, &mut out)
    };
    written.map_err(|e| std::io::Error::other(format!("encoding the probe CONNECT: {e:?}")))?;
    Ok(out)
}
