//! The backend as an MQTT client (rumqttc) of an external broker (`mqtt.upstream`).
//!
//! After a connection error the task backs off with jitter and reconnects the *same* event loop
//! (so publishes queued while it was down are kept and sent after the next CONNACK) under a
//! *new* client id, and subscribes through shared subscriptions (`$share/companion-<kind>/...`)
//! so that several backend replicas split the fleet's messages.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use companion_schema::{Qos, TopicKind, MAX_PAYLOAD};
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Request};
use tokio_util::sync::CancellationToken;

use super::{
    back_off, BusError, BusMetrics, Connection, OnPublish, Publisher, Target, BACKOFF_MIN,
    CLIENT_QUEUE,
};

/// Publishes kept across a reconnect (the rest are dropped and counted).
const KEEP_ACROSS_RECONNECT: usize = 4096;

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

/// The publishing half: rumqttc's client.
pub struct ClientPublisher(AsyncClient);

#[async_trait::async_trait]
impl Publisher for ClientPublisher {
    async fn publish(
        &self,
        topic: String,
        qos: Qos,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), BusError> {
        self.0
            .publish(topic, self::qos(qos), retain, payload)
            .await
            .map_err(|_| BusError::Closed)
    }
}

/// The owning half: rumqttc's event loop.
pub struct ClientConnection {
    shared: bool,
    client: AsyncClient,
    eventloop: EventLoop,
}

/// A publisher and connection for the broker at `target`; the first connection is made by
/// [`Connection::run`].
pub fn connect(target: &Target) -> (ClientPublisher, ClientConnection) {
    let (client, mut eventloop) = AsyncClient::new(options(target), CLIENT_QUEUE);
    eventloop.set_network_options(network_options());
    (
        ClientPublisher(client.clone()),
        ClientConnection {
            shared: target.shared,
            client,
            eventloop,
        },
    )
}

#[async_trait::async_trait]
impl Connection for ClientConnection {
    async fn run(
        self: Box<Self>,
        metrics: BusMetrics,
        on_publish: Arc<OnPublish>,
        shutdown: CancellationToken,
    ) {
        drive(
            self.client,
            self.eventloop,
            self.shared,
            &metrics,
            shutdown,
            |p| on_publish.publish(&p.topic, &p.payload),
        )
        .await;
    }
}

/// The connection loop, with what to do with each incoming publish.
async fn drive(
    client: AsyncClient,
    mut eventloop: EventLoop,
    shared: bool,
    metrics: &BusMetrics,
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
                let _ = client.try_disconnect();
                return;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_MIN;
                // Straight into the event loop's own queue, ahead of everything else: going
                // through the client could wait forever on a request channel that only this
                // task drains.
                eventloop.pending.extend(subscriptions(shared));
                eventloop.pending.extend(carried.drain(..));
                tracing::info!("backend connected to the broker");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&p),
            Ok(_) => {}
            Err(e) => {
                metrics.reconnects.inc();
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "backend MQTT connection lost; reconnecting");
                if !back_off(&mut backoff, &shutdown).await {
                    return;
                }
                carry_over(&mut eventloop, &mut carried, metrics);
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
/// shared groups by name alone), or the plain filters for a broker without shared
/// subscriptions.
fn subscriptions(shared: bool) -> impl Iterator<Item = Request> {
    TopicKind::ALL
        .into_iter()
        .filter(|kind| kind.direction() == companion_schema::Direction::Up)
        .map(move |kind| {
            let filter = if shared {
                kind.shared_filter(&format!("companion-{}", kind.label()))
            } else {
                kind.all_devices_filter()
            };
            Request::Subscribe(rumqttc::Subscribe::new(filter, qos(kind.qos())))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use companion_schema::{DeviceId, Topic};
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

    fn test_bus(port: u16) -> (AsyncClient, EventLoop) {
        let target = Target {
            host: "127.0.0.1".into(),
            port,
            username: String::new(),
            password: String::new(),
            tls: None,
            shared: true,
        };
        let (_, connection) = connect(&target);
        (connection.client, connection.eventloop)
    }

    fn topic() -> String {
        Topic::new(DeviceId::parse("d1").unwrap(), TopicKind::Persona).to_string()
    }

    #[tokio::test]
    async fn publishes_queued_while_down_survive_failed_and_dropped_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (client, eventloop) = test_bus(port);
        let metrics = BusMetrics::default();
        // Queued before the first connection, as a presence announcement at startup is.
        client
            .publish(topic(), QoS::AtLeastOnce, true, b"pip".to_vec())
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let m = metrics.clone();
        let c = client.clone();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move { drive(c, eventloop, true, &m, stop, |_| {}).await });

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
        assert!(metrics.reconnects.get() >= 2);

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_request_queue_does_not_stop_the_loop_from_subscribing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (client, eventloop) = test_bus(port);
        // Fill the client's request channel while the broker is unreachable.
        for i in 0..CLIENT_QUEUE {
            client
                .try_publish(topic(), QoS::AtMostOnce, false, i.to_be_bytes().to_vec())
                .unwrap();
        }
        assert!(client
            .try_publish(topic(), QoS::AtMostOnce, false, vec![])
            .is_err());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            drive(
                client,
                eventloop,
                true,
                &BusMetrics::default(),
                stop,
                |_| {},
            )
            .await
        });
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
        let (_client, mut eventloop) = test_bus(1);
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
