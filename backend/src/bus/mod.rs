//! The backend's MQTT connection: one task owns it (subscribing to every device up topic,
//! parsing and dispatching what arrives); everyone else publishes through [`Bus`].
//!
//! Two transports behind one pair of traits, so nothing outside this module knows which:
//! - [`local`]: the embedded router, in process (a rumqttd local link, no socket, no MQTT
//!   encoding) — the default;
//! - [`upstream`]: an external broker over MQTT (rumqttc), `mqtt.upstream`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_broker::{Ledger, Receipt};
use companion_schema::{DeviceId, Message, Payload, Qos, Topic, TopicKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::metrics::KindLabel;

pub mod local;
mod target;
pub mod upstream;
pub use target::{Target, TargetError};
pub use upstream::network_options;

/// Publishes waiting for the connection task before publishers wait.
pub const CLIENT_QUEUE: usize = 4096;
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Intake and publish metrics.
#[derive(Clone, Default)]
pub struct BusMetrics {
    pub invalid: Family<KindLabel, Counter>,
    pub received: Family<KindLabel, Counter>,
    pub published: Family<KindLabel, Counter>,
    pub publish_failed: Family<KindLabel, Counter>,
    pub reconnects: Counter,
    pub dropped_on_reconnect: Counter,
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
        registry.register(
            "backend_publishes_dropped_on_reconnect",
            "Queued publishes dropped because more than the reconnect buffer waited for the broker",
            m.dropped_on_reconnect.clone(),
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

/// The publishing half of a transport: hands a publish to the task that owns the connection.
#[async_trait::async_trait]
pub trait Publisher: Send + Sync {
    /// Waits for room in the connection task's queue; `Err(Closed)` once it is gone.
    async fn publish(
        &self,
        topic: String,
        qos: Qos,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), BusError>;
}

/// Where the bus hands every decoded device message: the device runtime implements it, so the
/// MQTT layer knows nothing of what happens next.
pub trait Inbox: Send + Sync {
    /// `payload` (of an up topic's kind) arrived from `device` at `arrived`. Must not wait:
    /// it is called on the connection task.
    fn deliver(&self, device: &DeviceId, payload: Payload, arrived: Instant);

    /// [`Inbox::deliver`] for a QoS 1 publish from a device whose receipt ledger is `ledger`;
    /// the receipt its PUBACK waits for (`None`: acknowledge now). Nothing waits by default.
    fn deliver_held(
        &self,
        device: &DeviceId,
        payload: Payload,
        arrived: Instant,
        ledger: &Arc<Ledger>,
    ) -> Option<Receipt> {
        let _ = ledger;
        self.deliver(device, payload, arrived);
        None
    }

    /// Events held for `device` elsewhere (a cluster takeover's shadow), in order. Delivered
    /// one by one unless the inbox can take them whole: a backlog longer than a device's queue
    /// must not overflow it.
    fn replay(&self, device: &DeviceId, events: Vec<(Payload, Instant)>) {
        for (payload, arrived) in events {
            self.deliver(device, payload, arrived);
        }
    }
}

/// What a transport hands every device message to: counted, decoded and delivered to the
/// [`Inbox`]. Must not wait: on the embedded broker it is called on the publishing device's
/// connection task (see `companion_broker::UpSink`), elsewhere on the connection task.
pub struct OnPublish {
    counters: IntakeCounters,
    inbox: Box<dyn Inbox>,
    invalid_log: std::sync::Mutex<InvalidLog>,
}

impl OnPublish {
    fn new(metrics: &BusMetrics, inbox: Box<dyn Inbox>) -> Self {
        Self {
            counters: IntakeCounters::new(metrics),
            inbox,
            invalid_log: std::sync::Mutex::new(InvalidLog {
                last: HashMap::new(),
            }),
        }
    }

    /// A message as a broker delivered it: its topic names the device and the kind.
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        match Topic::parse(topic) {
            Ok(t) => {
                self.publish_from(&t.device, t.kind, payload, None);
            }
            Err(_) => {
                self.counters.bad_topic.inc();
            }
        }
    }

    /// A message from `device` to its own up topic of `kind` (the embedded broker's edge has
    /// parsed and checked the topic), decoded once. With `hold` (the device's receipt ledger,
    /// for a QoS 1 publish), a telemetry message gets the receipt its PUBACK waits for: it
    /// settles once the message is stored.
    pub fn publish_from(
        &self,
        device: &DeviceId,
        kind: TopicKind,
        payload: &[u8],
        hold: Option<&Arc<Ledger>>,
    ) -> Option<Receipt> {
        if kind.direction() != companion_schema::Direction::Up {
            self.counters.bad_topic.inc();
            return None;
        }
        let (received, invalid) = self.counters.by_kind.get(kind as usize)?;
        received.inc();
        let arrived = Instant::now();
        match Payload::decode(kind, payload) {
            Ok(payload) => match hold {
                Some(ledger) => self.inbox.deliver_held(device, payload, arrived, ledger),
                None => {
                    self.inbox.deliver(device, payload, arrived);
                    None
                }
            },
            Err(e) => {
                // Nothing will be stored: nothing to wait for.
                invalid.inc();
                let log = self
                    .invalid_log
                    .lock()
                    .map(|mut l| l.should_log(device.as_str()))
                    .unwrap_or(false);
                if log {
                    tracing::warn!(device_id = %device, kind = kind.label(), error = %e, "undecodable payload dropped (logged once a minute per device)");
                }
                None
            }
        }
    }
}

/// The owning half of a transport: runs the connection until `shutdown`, subscribed to every
/// device up topic, calling `on_publish(topic, payload)` for what arrives and reconnecting
/// (with backoff) when the connection fails.
#[async_trait::async_trait]
pub trait Connection: Send {
    async fn run(
        self: Box<Self>,
        metrics: BusMetrics,
        on_publish: Arc<OnPublish>,
        shutdown: CancellationToken,
    );
}

/// Publishing to devices.
pub struct Bus {
    publisher: Box<dyn Publisher>,
    metrics: BusMetrics,
}

/// Waits before a reconnect attempt (with jitter) and doubles `backoff` up to the maximum.
/// False if shutdown came first.
async fn back_off(backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
    let jitter = rand::rng().random_range(0.5..1.0);
    let wait = backoff.mul_f64(jitter);
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    // Cases: the wait is over; shutdown.
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = shutdown.cancelled() => false,
    }
}

impl Bus {
    /// A bus over `publisher`; its connection task is the transport's [`Connection`].
    pub fn new(publisher: Box<dyn Publisher>, metrics: BusMetrics) -> Arc<Self> {
        Arc::new(Self { publisher, metrics })
    }

    /// Publishes `msg` on the device's `kind` topic with the contract's QoS and retain flag.
    /// Waits for room in the connection task's queue.
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
            .publisher
            .publish(topic, kind.qos(), kind.retained(), payload)
            .await
        {
            Ok(()) => {
                self.metrics.published.get_or_create(&label).inc();
                Ok(())
            }
            Err(e) => {
                self.metrics.publish_failed.get_or_create(&label).inc();
                Err(e)
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

/// Runs `connection` until `shutdown`, handing device messages to `inbox`.
pub async fn run(
    bus: Arc<Bus>,
    connection: Box<dyn Connection>,
    inbox: Box<dyn Inbox>,
    shutdown: CancellationToken,
) {
    let on_publish = Arc::new(OnPublish::new(&bus.metrics, inbox));
    connection
        .run(bus.metrics.clone(), on_publish, shutdown)
        .await;
}

/// The intake counters of every kind, looked up once: a `Family` lookup per message takes a
/// lock and hashes the label, on every device task at once.
struct IntakeCounters {
    /// By `TopicKind as usize`: (received, invalid).
    by_kind: Vec<(Counter, Counter)>,
    bad_topic: Counter,
}

impl IntakeCounters {
    fn new(metrics: &BusMetrics) -> Self {
        Self {
            by_kind: TopicKind::ALL
                .into_iter()
                .map(|kind| {
                    let label = KindLabel { kind: kind.label() };
                    (
                        metrics.received.get_or_create(&label).clone(),
                        metrics.invalid.get_or_create(&label).clone(),
                    )
                })
                .collect(),
            bad_topic: metrics
                .invalid
                .get_or_create(&KindLabel { kind: "topic" })
                .clone(),
        }
    }
}
