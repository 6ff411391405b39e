//! The backend's MQTT connection to the router: one task owns the event loop (subscribing to
//! every device up topic through shared subscriptions, parsing and dispatching what arrives);
//! everyone else publishes through [`Bus`].
//!
//! After a connection error the task backs off with jitter and reconnects with a *new* client
//! id: rumqttd 0.20 can poison a listener when an id is reused after a connection failed
//! between CONNECT and CONNACK (see `companion_broker::edge`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use companion_broker::InternalEndpoint;
use companion_schema::{DeviceId, Message, Payload, Qos, Topic, TopicKind, MAX_PAYLOAD};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::devices::{DeviceEvent, Dispatcher};

/// Requests waiting in the client before publishers wait.
pub const CLIENT_QUEUE: usize = 4096;
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Intake and publish metrics.
#[derive(Clone, Default)]
pub struct BusMetrics {
    pub invalid: Family<KindLabel, Counter>,
    pub received: Family<KindLabel, Counter>,
    pub published: Family<KindLabel, Counter>,
    pub publish_failed: Family<KindLabel, Counter>,
    pub reconnects: Counter,
}

impl BusMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "backend_messages_invalid",
            "Device messages dropped because their topic or payload did not decode, by kind",
            m.invalid.clone(),
        );
        registry.register(
            "backend_messages_received",
            "Device messages received by the backend, by kind",
            m.received.clone(),
        );
        registry.register(
            "backend_messages_published",
            "Messages the backend published to devices, by kind",
            m.published.clone(),
        );
        registry.register(
            "backend_publish_failures",
            "Publishes the backend could not hand to its MQTT client, by kind",
            m.publish_failed.clone(),
        );
        registry.register(
            "backend_mqtt_reconnects",
            "Times the backend reconnected to the broker",
            m.reconnects.clone(),
        );
        // Known series at zero: prometheus-client prints nothing for a labelled family
        // until a series exists.
        for kind in TopicKind::ALL {
            let label = KindLabel { kind: kind.label() };
            if kind.direction() == companion_schema::Direction::Up {
                let _ = m.invalid.get_or_create(&label);
                let _ = m.received.get_or_create(&label);
            } else {
                let _ = m.published.get_or_create(&label);
            }
        }
        let _ = m.invalid.get_or_create(&KindLabel { kind: "topic" });
        m
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("encoding: {0}")]
    Encode(#[from] companion_schema::EncodeError),
    #[error("the MQTT client is closed")]
    Closed,
}

/// Publishing to devices.
pub struct Bus {
    client: RwLock<AsyncClient>,
    metrics: BusMetrics,
}

fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
    }
}

/// Where the backend's MQTT connection goes: the embedded router, or an external broker.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
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

impl From<&InternalEndpoint> for Target {
    fn from(e: &InternalEndpoint) -> Self {
        Self {
            host: e.v4.ip().to_string(),
            port: e.v4.port(),
            username: e.username.clone(),
            password: e.password.clone(),
            tls: None,
        }
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
        }))
    }
}

fn options(target: &Target) -> MqttOptions {
    let id = format!(
        "{}-backend-{:08x}",
        companion_broker::RESERVED_CLIENT_ID_PREFIX,
        rand::rng().random::<u32>()
    );
    let mut o = MqttOptions::new(id, target.host.clone(), target.port);
    if !target.username.is_empty() {
        o.set_credentials(target.username.clone(), target.password.clone());
    }
    if let Some(tls) = &target.tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(MAX_PAYLOAD + 4096, MAX_PAYLOAD + 4096);
    o.set_inflight(200);
    o
}

impl Bus {
    /// A bus whose first connection is made by [`run`].
    pub fn new(target: &Target, metrics: BusMetrics) -> (Arc<Self>, EventLoop) {
        let (client, eventloop) = AsyncClient::new(options(target), CLIENT_QUEUE);
        (
            Arc::new(Self {
                client: RwLock::new(client),
                metrics,
            }),
            eventloop,
        )
    }

    fn client(&self) -> AsyncClient {
        match self.client.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Publishes `msg` on the device's `kind` topic with the contract's QoS and retain flag.
    /// Waits for room in the client's queue.
    pub async fn publish<T: Message>(
        &self,
        device: &DeviceId,
        kind: TopicKind,
        msg: &T,
    ) -> Result<(), BusError> {
        let payload = companion_schema::encode(msg)?;
        let topic = Topic::new(device.clone(), kind).to_string();
        let label = KindLabel { kind: kind.label() };
        match self
            .client()
            .publish(topic, qos(kind.qos()), kind.retained(), payload)
            .await
        {
            Ok(()) => {
                self.metrics.published.get_or_create(&label).inc();
                Ok(())
            }
            Err(_) => {
                self.metrics.publish_failed.get_or_create(&label).inc();
                Err(BusError::Closed)
            }
        }
    }
}

/// Rate-limits "undecodable payload" logs to one per device per minute.
struct InvalidLog {
    last: HashMap<String, Instant>,
}

impl InvalidLog {
    fn should_log(&mut self, key: &str) -> bool {
        if self.last.len() > 10_000 {
            self.last.clear();
        }
        match self.last.get(key) {
            Some(t) if t.elapsed() < Duration::from_secs(60) => false,
            _ => {
                self.last.insert(key.to_owned(), Instant::now());
                true
            }
        }
    }
}

/// Owns the event loop until `shutdown`: subscribes after every CONNACK, dispatches device
/// messages, reconnects with backoff and a fresh client id.
pub async fn run(
    target: Target,
    bus: Arc<Bus>,
    mut eventloop: EventLoop,
    dispatcher: Arc<Dispatcher>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut invalid_log = InvalidLog {
        last: HashMap::new(),
    };
    loop {
        // Cases: the next MQTT event; shutdown.
        let event = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = shutdown.cancelled() => {
                let _ = bus.client().try_disconnect();
                return;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_MIN;
                subscribe(&bus).await;
                tracing::info!("backend connected to the broker");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                handle_publish(
                    &p.topic,
                    &p.payload,
                    &bus.metrics,
                    &dispatcher,
                    &mut invalid_log,
                );
            }
            Ok(_) => {}
            Err(e) => {
                bus.metrics.reconnects.inc();
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "backend MQTT connection lost; reconnecting");
                let jitter = rand::rng().random_range(0.5..1.0);
                let wait = backoff.mul_f64(jitter);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                let (client, el) = AsyncClient::new(options(&target), CLIENT_QUEUE);
                if let Ok(mut c) = bus.client.write() {
                    *c = client;
                }
                eventloop = el;
            }
        }
    }
}

async fn subscribe(bus: &Bus) {
    let client = bus.client();
    for kind in TopicKind::ALL {
        if kind.direction() != companion_schema::Direction::Up {
            continue;
        }
        // One share group per filter: rumqttd keys shared groups by name alone.
        let filter = kind.shared_filter(&format!("companion-{}", kind.label()));
        if let Err(e) = client.subscribe(filter, qos(kind.qos())).await {
            tracing::error!(error = %e, "subscribing failed");
        }
    }
}

fn handle_publish(
    topic: &str,
    payload: &[u8],
    metrics: &BusMetrics,
    dispatcher: &Arc<Dispatcher>,
    invalid_log: &mut InvalidLog,
) {
    let topic = match Topic::parse(topic) {
        Ok(t) if t.kind.direction() == companion_schema::Direction::Up => t,
        _ => {
            metrics
                .invalid
                .get_or_create(&KindLabel { kind: "topic" })
                .inc();
            return;
        }
    };
    let label = KindLabel {
        kind: topic.kind.label(),
    };
    metrics.received.get_or_create(&label).inc();
    let arrived = Instant::now();
    let event = match Payload::decode(topic.kind, payload) {
        Ok(Payload::Telemetry(t)) => DeviceEvent::Telemetry(t),
        Ok(Payload::Button(b)) => DeviceEvent::Button(b, arrived),
        Ok(Payload::Status(s)) => DeviceEvent::Status(s),
        Ok(Payload::Audio(a)) => DeviceEvent::Audio(a),
        Ok(Payload::SessionControl(c)) => DeviceEvent::SessionControl(c, arrived),
        Ok(_) => {
            metrics.invalid.get_or_create(&label).inc();
            return;
        }
        Err(e) => {
            metrics.invalid.get_or_create(&label).inc();
            if invalid_log.should_log(topic.device.as_str()) {
                tracing::warn!(device_id = %topic.device, kind = topic.kind.label(), error = %e, "undecodable payload dropped (logged once a minute per device)");
            }
            return;
        }
    };
    dispatcher.dispatch(&topic.device, event);
}
