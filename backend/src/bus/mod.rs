//! The backend's MQTT connection to the router: one task owns the event loop (subscribing to
//! every device up topic through shared subscriptions, parsing and dispatching what arrives);
//! everyone else publishes through [`Bus`].
//!
//! After a connection error the task backs off with jitter and reconnects the *same* event loop
//! (so publishes queued while it was down are kept and sent after the next CONNACK) under a
//! *new* client id: rumqttd 0.20 can poison a listener when an id is reused after a connection
//! failed between CONNECT and CONNACK (see `companion_broker::edge`).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_schema::{DeviceId, Message, Payload, Qos, Topic, TopicKind, MAX_PAYLOAD};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Request};
use tokio_util::sync::CancellationToken;

use crate::devices::{DeviceEvent, Dispatcher};

mod target;
pub use target::{Target, TargetError};

/// Requests waiting in the client before publishers wait.
pub const CLIENT_QUEUE: usize = 4096;
/// Publishes kept across a reconnect (the rest are dropped and counted).
const KEEP_ACROSS_RECONNECT: usize = 4096;
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

/// Publishing to devices.
pub struct Bus {
    client: AsyncClient,
    metrics: BusMetrics,
}

fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
    }
}

fn client_id() -> String {
    format!(
        "{}-backend-{:08x}",
        companion_broker::RESERVED_CLIENT_ID_PREFIX,
        rand::rng().random::<u32>()
    )
}

fn options(target: &Target) -> MqttOptions {
    let mut o = MqttOptions::new(client_id(), target.host.clone(), target.port);
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

/// TCP_NODELAY: audio chunks and session events are small writes in quick succession, and
/// Nagle's algorithm would hold each behind the previous one's (delayed, up to 40 ms) ACK.
pub fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

impl Bus {
    /// A bus whose first connection is made by [`run`].
    pub fn new(target: &Target, metrics: BusMetrics) -> (Arc<Self>, EventLoop) {
        let (client, mut eventloop) = AsyncClient::new(options(target), CLIENT_QUEUE);
        eventloop.set_network_options(network_options());
        (Arc::new(Self { client, metrics }), eventloop)
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
            .client
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
/// messages, reconnects with backoff and a fresh client id, and resends the publishes that were
/// queued or unacknowledged when the connection went down (retained persona/config
/// announcements must not be lost to a broker blip).
pub async fn run(
    bus: Arc<Bus>,
    eventloop: EventLoop,
    dispatcher: Arc<Dispatcher>,
    shutdown: CancellationToken,
) {
    let mut invalid_log = InvalidLog {
        last: HashMap::new(),
    };
    let metrics = bus.metrics.clone();
    drive(bus, eventloop, shutdown, |p| {
        handle_publish(
            &p.topic,
            &p.payload,
            &metrics,
            &dispatcher,
            &mut invalid_log,
        )
    })
    .await;
}

/// The connection loop behind [`run`], with what to do with each incoming publish.
async fn drive(
    bus: Arc<Bus>,
    mut eventloop: EventLoop,
    shutdown: CancellationToken,
    mut on_publish: impl FnMut(&rumqttc::Publish),
) {
    let mut backoff = BACKOFF_MIN;
    // Publishes carried over a reconnect: rumqttc clears its pending queue when a clean session
    // is acknowledged, so they are set aside on the error and put back after the CONNACK.
    let mut carried: VecDeque<Request> = VecDeque::new();
    loop {
        // Cases: the next MQTT event; shutdown.
        let event = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = shutdown.cancelled() => {
                let _ = bus.client.try_disconnect();
                return;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_MIN;
                // Straight into the event loop's own queue, ahead of everything else: going
                // through the client could wait forever on a request channel that only this
                // task drains.
                eventloop.pending.extend(subscriptions());
                eventloop.pending.extend(carried.drain(..));
                tracing::info!("backend connected to the broker");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&p),
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
                carry_over(&mut eventloop, &mut carried, &bus.metrics);
                eventloop.mqtt_options.set_client_id(client_id());
            }
        }
    }
}

/// Moves the publishes rumqttc holds for the next session (its pending queue, filled from the
/// unacknowledged and queued requests when the connection failed) aside, keeping at most
/// [`KEEP_ACROSS_RECONNECT`]; subscriptions are dropped because every CONNACK subscribes again.
fn carry_over(eventloop: &mut EventLoop, carried: &mut VecDeque<Request>, metrics: &BusMetrics) {
    for req in eventloop.pending.drain(..) {
        if let Request::Publish(p) = req {
            if carried.len() >= KEEP_ACROSS_RECONNECT {
                metrics.dropped_on_reconnect.inc();
                continue;
            }
            carried.push_back(Request::Publish(p));
        }
    }
}

/// The backend's subscriptions: every device up topic, one share group per filter (rumqttd keys
/// shared groups by name alone).
fn subscriptions() -> impl Iterator<Item = Request> {
    TopicKind::ALL
        .into_iter()
        .filter(|kind| kind.direction() == companion_schema::Direction::Up)
        .map(|kind| {
            let filter = kind.shared_filter(&format!("companion-{}", kind.label()));
            Request::Subscribe(rumqttc::Subscribe::new(filter, qos(kind.qos())))
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet as Wire};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// One side of a fake broker connection: reads whole MQTT 3.1.1 packets.
    struct Peer {
        stream: TcpStream,
        buf: BytesMut,
    }

    impl Peer {
        async fn accept(listener: &TcpListener) -> Self {
            let (stream, _) = listener.accept().await.unwrap();
            Self {
                stream,
                buf: BytesMut::new(),
            }
        }

        async fn read(&mut self) -> Option<Wire> {
            loop {
                match Wire::read(&mut self.buf, 1 << 20) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("bad packet from the backend: {e:?}"),
                }
                let read = tokio::time::timeout(
                    Duration::from_secs(10),
                    self.stream.read_buf(&mut self.buf),
                )
                .await
                .expect("the backend sent nothing for 10 s");
                if read.ok()? == 0 {
                    return None;
                }
            }
        }

        async fn connect(&mut self) -> String {
            match self.read().await {
                Some(Wire::Connect(c)) => c.client_id,
                other => panic!("expected CONNECT, got {other:?}"),
            }
        }

        async fn connack(&mut self) {
            let mut out = BytesMut::new();
            ConnAck::new(ConnectReturnCode::Success, false)
                .write(&mut out)
                .unwrap();
            self.stream.write_all(&out).await.unwrap();
        }

        /// The packets up to and including the first PUBLISH: (subscribe filters, publish).
        async fn until_publish(&mut self) -> (Vec<String>, rumqttc::Publish) {
            let mut filters = Vec::new();
            loop {
                match self.read().await {
                    Some(Wire::Subscribe(s)) => {
                        filters.extend(s.filters.into_iter().map(|f| f.path))
                    }
                    Some(Wire::Publish(p)) => return (filters, p),
                    Some(Wire::PingReq) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    fn test_bus(port: u16) -> (Arc<Bus>, EventLoop) {
        let target = Target {
            host: "127.0.0.1".into(),
            port,
            username: String::new(),
            password: String::new(),
            tls: None,
        };
        Bus::new(&target, BusMetrics::default())
    }

    fn topic() -> String {
        Topic::new(DeviceId::parse("d1").unwrap(), TopicKind::Persona).to_string()
    }

    #[tokio::test]
    async fn publishes_queued_while_down_survive_failed_and_dropped_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (bus, eventloop) = test_bus(port);
        // Queued before the first connection, as a presence announcement at startup is.
        bus.client
            .publish(topic(), QoS::AtLeastOnce, true, b"pip".to_vec())
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(drive(bus.clone(), eventloop, shutdown.clone(), |_| {}));

        // 1: the connection fails between CONNECT and CONNACK.
        let mut first = Peer::accept(&listener).await;
        let id1 = first.connect().await;
        drop(first);

        // 2: a fresh client id; subscriptions first, then the queued publish. It is never
        // acknowledged: the connection drops with it in flight.
        let mut second = Peer::accept(&listener).await;
        let id2 = second.connect().await;
        assert_ne!(id1, id2, "a failed id must not be reused (rumqttd trap)");
        second.connack().await;
        let (filters, publish) = second.until_publish().await;
        let ups = TopicKind::ALL
            .iter()
            .filter(|k| k.direction() == companion_schema::Direction::Up)
            .count();
        assert_eq!(filters.len(), ups, "{filters:?}");
        assert!(filters.iter().all(|f| f.starts_with("$share/companion-")));
        assert_eq!(publish.topic, topic());
        assert_eq!(&publish.payload[..], b"pip");
        assert!(publish.retain);
        drop(second);

        // 3: resubscribed, and the unacknowledged publish is sent again.
        let mut third = Peer::accept(&listener).await;
        let id3 = third.connect().await;
        assert_ne!(id2, id3);
        third.connack().await;
        let (filters, publish) = third.until_publish().await;
        assert_eq!(filters.len(), ups);
        assert_eq!(publish.topic, topic());
        assert_eq!(&publish.payload[..], b"pip");
        assert!(bus.metrics.reconnects.get() >= 2);

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_request_queue_does_not_stop_the_loop_from_subscribing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (bus, eventloop) = test_bus(port);
        // Fill the client's request channel while the broker is unreachable.
        for i in 0..CLIENT_QUEUE {
            bus.client
                .try_publish(topic(), QoS::AtMostOnce, false, i.to_be_bytes().to_vec())
                .unwrap();
        }
        assert!(bus
            .client
            .try_publish(topic(), QoS::AtMostOnce, false, vec![])
            .is_err());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(drive(bus.clone(), eventloop, shutdown.clone(), |_| {}));
        let mut peer = Peer::accept(&listener).await;
        peer.connect().await;
        peer.connack().await;
        let (filters, first) = peer.until_publish().await;
        assert!(
            !filters.is_empty(),
            "subscribed before the queued publishes"
        );
        assert_eq!(&first.payload[..], &0usize.to_be_bytes()[..]);
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn carry_over_keeps_publishes_only_and_is_bounded() {
        let (_bus, mut eventloop) = test_bus(1);
        let metrics = BusMetrics::default();
        let mut carried = VecDeque::new();
        eventloop
            .pending
            .push_back(Request::Subscribe(rumqttc::Subscribe::new(
                "a",
                QoS::AtLeastOnce,
            )));
        for i in 0..KEEP_ACROSS_RECONNECT + 3 {
            eventloop
                .pending
                .push_back(Request::Publish(rumqttc::Publish::new(
                    topic(),
                    QoS::AtLeastOnce,
                    i.to_be_bytes().to_vec(),
                )));
        }
        carry_over(&mut eventloop, &mut carried, &metrics);
        assert!(eventloop.pending.is_empty());
        assert_eq!(carried.len(), KEEP_ACROSS_RECONNECT);
        assert!(carried.iter().all(|r| matches!(r, Request::Publish(_))));
        assert_eq!(metrics.dropped_on_reconnect.get(), 3);
    }
}
