//! The MQTT link: options (TLS verifying `CA_CERT`, client id = username = device id, Last
//! Will), the one task that owns rumqttc's event loop, and [`Uplink`], the cheap handle other
//! tasks publish through.
//!
//! Acknowledgement tracking: every QoS 1 publish goes through [`Uplink::publish`], which, under
//! one lock, checks that the link is up, hands the request to rumqttc and queues the message's
//! outbox id (or `None`). rumqttc handles requests in order and reports
//! `Outgoing::Publish(pkid)` for each, so the event loop task pairs pkids with ids, and turns
//! each `PubAck` into an outbox acknowledgement. On a connection error the task, under the same
//! lock, marks the link down and discards whatever rumqttc still queued (the session is clean;
//! the outbox resends from disk after reconnecting), so no stale request can shift the pairing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use companion_schema::{
    encode, DeviceId, Direction, Qos, Status, Topic, TopicKind, SCHEMA_VERSION,
};
use rand::{rngs::StdRng, SeedableRng};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    Transport,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{BrokerUrl, Settings};

/// Requests rumqttc buffers between clients and its event loop.
pub const REQUEST_CAPACITY: usize = 128;
/// Down-topic messages waiting for the controller.
pub const INBOUND_CAPACITY: usize = 256;
/// Acknowledged outbox ids waiting for the pump.
pub const ACK_CAPACITY: usize = 1024;
/// How long a clean shutdown waits for the offline status and DISCONNECT to be written.
pub const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("reading the CA certificate {path}: {error}")]
    CaRead {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{0} holds no usable CA certificate")]
    CaEmpty(std::path::PathBuf),
    #[error("building the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("encoding: {0}")]
    Encode(#[from] companion_schema::EncodeError),
    #[error("the link is down")]
    NotConnected,
    #[error("the request queue is full")]
    Busy,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The kernel's boot id (stable until reboot), or a random one.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| format!("{:016x}", rand::random::<u64>()))
}

pub fn status_payload(online: bool, boot_id: &str) -> Result<Vec<u8>, LinkError> {
    Ok(encode(&Status {
        v: SCHEMA_VERSION,
        online,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: boot_id.to_owned(),
        ts_ms: now_ms(),
    })?)
}

pub fn qos(kind: TopicKind) -> QoS {
    match kind.qos() {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
    }
}

/// A rustls client configuration trusting exactly the CAs in `ca_pem`.
pub fn tls_config(ca_pem: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    let pem = std::fs::read(ca_pem).map_err(|error| LinkError::CaRead {
        path: ca_pem.to_owned(),
        error,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(LinkError::CaEmpty(ca_pem.to_owned()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// rumqttc options for this device: identity, clean session, keepalive, Will, transport.
pub fn mqtt_options(settings: &Settings, boot_id: &str) -> Result<MqttOptions, LinkError> {
    let id = settings.device_id.as_str();
    let mut o = MqttOptions::new(id, settings.url.broker_addr(), settings.url.port);
    o.set_credentials(id, settings.token.expose());
    o.set_keep_alive(Duration::from_secs(settings.keepalive_s));
    o.set_clean_session(true);
    o.set_max_packet_size(
        companion_schema::MAX_PAYLOAD + 1024,
        companion_schema::MAX_PAYLOAD + 1024,
    );
    o.set_request_channel_capacity(REQUEST_CAPACITY);
    o.set_last_will(LastWill::new(
        Topic::new(settings.device_id.clone(), TopicKind::Status).to_string(),
        status_payload(false, boot_id)?,
        QoS::AtLeastOnce,
        true,
    ));
    let tls = match settings.url.tls {
        true => {
            let ca = settings
                .ca_cert
                .as_deref()
                .ok_or_else(|| LinkError::CaEmpty("CA_CERT".into()))?;
            Some(tls_config(ca)?)
        }
        false => None,
    };
    o.set_transport(transport(&settings.url, tls));
    Ok(o)
}

/// The rumqttc transport for `url`: TCP or WebSocket, with `tls` when the URL has TLS.
pub fn transport(url: &BrokerUrl, tls: Option<Arc<rustls::ClientConfig>>) -> Transport {
    let tls = tls.map(rumqttc::TlsConfiguration::Rustls);
    match (url.websocket, tls) {
        (false, None) => Transport::Tcp,
        (false, Some(t)) => Transport::tls_with_config(t),
        (true, None) => Transport::Ws,
        (true, Some(t)) => Transport::wss_with_config(t),
    }
}

/// Whether the link is up, and how many times it came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Conn {
    pub connected: bool,
    pub generation: u64,
}

/// A message on one of this device's down topics.
pub struct Inbound {
    pub kind: TopicKind,
    pub payload: Vec<u8>,
}

#[derive(Default)]
struct LinkState {
    connected: bool,
    /// Counts connections; a publish reports the one it went out on.
    generation: u64,
    /// Outbox ids (or `None`) of QoS 1 publishes handed to rumqttc, not yet given a pkid.
    fifo: VecDeque<Option<u64>>,
    /// pkid to outbox id, until acknowledged.
    pkids: HashMap<u16, u64>,
}

/// Counters of the link.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub connects: AtomicU64,
    pub errors: AtomicU64,
    pub audio_dropped: AtomicU64,
    pub inbound_dropped: AtomicU64,
    pub undecodable: AtomicU64,
}

/// The publishing side of the link. Cheap to clone.
#[derive(Clone)]
pub struct Uplink {
    client: AsyncClient,
    device: DeviceId,
    state: Arc<Mutex<LinkState>>,
    conn: watch::Receiver<Conn>,
    pub stats: Arc<LinkStats>,
}

impl Uplink {
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Publishes on one of this device's topics with the contract's QoS and retain flag.
    /// QoS 1 messages from the outbox pass their id to be acknowledged later. Returns the
    /// generation of the connection the message was handed to.
    pub fn publish(
        &self,
        kind: TopicKind,
        payload: Vec<u8>,
        outbox_id: Option<u64>,
    ) -> Result<u64, LinkError> {
        let topic = Topic::new(self.device.clone(), kind).to_string();
        let q = qos(kind);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.connected {
            return Err(LinkError::NotConnected);
        }
        self.client
            .try_publish(topic, q, kind.retained(), payload)
            .map_err(|_| LinkError::Busy)?;
        if q != QoS::AtMostOnce {
            st.fifo.push_back(outbox_id);
        }
        Ok(st.generation)
    }

    /// Publishes an audio chunk, dropping (and counting) it when the link is down or busy.
    pub fn publish_audio(&self, payload: Vec<u8>) -> bool {
        let ok = self.publish(TopicKind::AudioUp, payload, None).is_ok();
        if !ok {
            self.stats.audio_dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// The current connection's generation (0 before the first).
    pub fn generation(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    pub fn connection(&self) -> watch::Receiver<Conn> {
        self.conn.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.conn.borrow().connected
    }
}

/// What the event loop task needs from rumqttc; a trait so the backoff can be tested on a
/// paused clock without a network.
pub trait Poller: Send {
    fn poll(&mut self) -> impl std::future::Future<Output = Result<Event, ConnectionError>> + Send;
    /// Forgets every queued request (called with the link marked down).
    fn discard_queued(&mut self);
}

impl Poller for EventLoop {
    fn poll(&mut self) -> impl std::future::Future<Output = Result<Event, ConnectionError>> + Send {
        EventLoop::poll(self)
    }
    fn discard_queued(&mut self) {
        self.clean();
        self.pending.clear();
    }
}

/// The event loop task and its outputs.
pub struct LinkTask<P> {
    poller: P,
    uplink: Uplink,
    boot_id: String,
    inbound: mpsc::Sender<Inbound>,
    acks: mpsc::Sender<u64>,
    conn_tx: watch::Sender<Conn>,
    backoff: Backoff,
    rng: StdRng,
}

/// Receivers of what the link task produces.
pub struct LinkOutputs {
    pub inbound: mpsc::Receiver<Inbound>,
    pub acks: mpsc::Receiver<u64>,
}

/// TCP_NODELAY: audio chunks (one every 100 ms) and control messages are small writes, and
/// Nagle's algorithm would hold each behind the previous one's delayed ACK (up to 40 ms).
pub fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// Builds the client and the task owning its event loop.
pub fn build(settings: &Settings) -> Result<(Uplink, LinkTask<EventLoop>, LinkOutputs), LinkError> {
    let boot = boot_id();
    let options = mqtt_options(settings, &boot)?;
    let (client, mut el) = AsyncClient::new(options, REQUEST_CAPACITY);
    el.set_network_options(network_options());
    Ok(with_poller(client, el, settings.device_id.clone(), boot))
}

/// Wires a task around any poller (tests use a failing one).
pub fn with_poller<P: Poller>(
    client: AsyncClient,
    poller: P,
    device: DeviceId,
    boot_id: String,
) -> (Uplink, LinkTask<P>, LinkOutputs) {
    let (conn_tx, conn_rx) = watch::channel(Conn::default());
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
    let (ack_tx, ack_rx) = mpsc::channel(ACK_CAPACITY);
    let uplink = Uplink {
        client,
        device,
        state: Arc::new(Mutex::new(LinkState::default())),
        conn: conn_rx,
        stats: Arc::new(LinkStats::default()),
    };
    let task = LinkTask {
        poller,
        uplink: uplink.clone(),
        boot_id,
        inbound: inbound_tx,
        acks: ack_tx,
        conn_tx,
        backoff: Backoff::default(),
        rng: StdRng::from_os_rng(),
    };
    (
        uplink,
        task,
        LinkOutputs {
            inbound: inbound_rx,
            acks: ack_rx,
        },
    )
}

impl<P: Poller> LinkTask<P> {
    /// Uses `rng` for the jitter (tests pass a seeded one).
    pub fn with_rng(mut self, rng: StdRng) -> Self {
        self.rng = rng;
        self
    }

    /// Polls forever: network errors back off and retry; only `shutdown` ends the task, after
    /// publishing the offline status and disconnecting.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            // Cases: shutdown requested; the next event or error from the connection.
            let polled = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.poller.poll() => r,
            };
            match polled {
                Ok(event) => self.on_event(event),
                Err(error) => {
                    let delay = self.on_error(&error);
                    // Cases: shutdown while waiting; the delay passed.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.goodbye().await;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.uplink.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => self.on_connected(),
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                let mut st = self.state();
                if let Some(Some(id)) = st.fifo.pop_front() {
                    st.pkids.insert(pkid, id);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let id = self.state().pkids.remove(&ack.pkid);
                if let Some(id) = id {
                    // A full queue only means the message is sent again after a reconnect.
                    let _ = self.acks.try_send(id);
                }
            }
            Event::Incoming(Packet::Publish(p)) => self.on_publish(&p.topic, p.payload.to_vec()),
            _ => {}
        }
    }

    fn on_connected(&mut self) {
        self.backoff.reset();
        let device = self.uplink.device.clone();
        let generation = self.conn_tx.borrow().generation + 1;
        {
            let mut st = self.state();
            st.connected = true;
            st.generation = generation;
            st.fifo.clear();
            st.pkids.clear();
        }
        match status_payload(true, &self.boot_id) {
            Ok(p) => {
                if let Err(e) = self.uplink.publish(TopicKind::Status, p, None) {
                    tracing::warn!(error = %e, "publishing the online status failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "encoding the status failed"),
        }
        let subs = TopicKind::ALL
            .into_iter()
            .filter(|k| k.direction() == Direction::Down)
            .map(|k| {
                rumqttc::SubscribeFilter::new(Topic::new(device.clone(), k).to_string(), qos(k))
            });
        if let Err(e) = self.uplink.client.try_subscribe_many(subs) {
            tracing::warn!(error = %e, "subscribing failed");
        }
        self.uplink.stats.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(device_id = %device, generation, "connected");
        self.conn_tx.send_replace(Conn {
            connected: true,
            generation,
        });
    }

    fn on_error(&mut self, error: &ConnectionError) -> Duration {
        let was_connected = {
            let state = self.uplink.state.clone();
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            let was = st.connected;
            st.connected = false;
            st.fifo.clear();
            st.pkids.clear();
            self.poller.discard_queued();
            was
        };
        let generation = self.conn_tx.borrow().generation;
        self.conn_tx.send_replace(Conn {
            connected: false,
            generation,
        });
        self.uplink.stats.errors.fetch_add(1, Ordering::Relaxed);
        let delay = self.backoff.next_delay(&mut self.rng);
        if was_connected {
            tracing::warn!(error = %error, "connection lost; reconnecting in {delay:?}");
        } else {
            tracing::info!(error = %error, attempt = self.backoff.attempt(), "connect failed; retrying in {delay:?}");
        }
        delay
    }

    fn on_publish(&mut self, topic: &str, payload: Vec<u8>) {
        match Topic::parse(topic) {
            Ok(t) if t.device == self.uplink.device && t.direction() == Direction::Down => {
                if self
                    .inbound
                    .try_send(Inbound {
                        kind: t.kind,
                        payload,
                    })
                    .is_err()
                {
                    self.uplink
                        .stats
                        .inbound_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => tracing::debug!(topic, "ignoring a message on a foreign topic"),
        }
    }

    /// Publishes `online: false`, sends DISCONNECT and polls until both are written.
    async fn goodbye(mut self) {
        if !self.uplink.is_connected() {
            return;
        }
        if let Ok(p) = status_payload(false, &self.boot_id) {
            let _ = self.uplink.publish(TopicKind::Status, p, None);
        }
        if self.uplink.client.try_disconnect().is_err() {
            return;
        }
        let done = async {
            loop {
                match self.poller.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        if tokio::time::timeout(GOODBYE_TIMEOUT, done).await.is_err() {
            tracing::warn!("the broker did not take the DISCONNECT in time");
        } else {
            tracing::info!("disconnected");
        }
    }
}
