//! The link task's bookkeeping, driven by a scripted event source: PUBACKs are paired with the
//! outbox ids of the publishes they acknowledge; a connection error forgets what was in flight
//! and refuses new publishes until the next CONNACK.

use companion_agent::link::{with_poller, LinkError, Poller};
use companion_schema::{DeviceId, TopicKind};
use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, ConnectionError, Event, MqttOptions, Outgoing, Packet,
    PubAck,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Scripted {
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
}

impl Poller for Scripted {
    async fn poll(&mut self) -> Result<Event, ConnectionError> {
        match self.events.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }
    fn discard_queued(&mut self) {}
}

#[allow(clippy::result_large_err)]
fn connack() -> Result<Event, ConnectionError> {
    Ok(Event::Incoming(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    ))))
}

#[tokio::test(start_paused = true)]
async fn pubacks_are_paired_with_outbox_ids_and_errors_forget_what_was_in_flight() {
    let (client, _el) = AsyncClient::new(MqttOptions::new("pi-l", "127.0.0.1", 1), 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (uplink, task, mut out) = with_poller(
        client,
        Scripted { events: rx },
        DeviceId::parse("pi-l").unwrap(),
        "boot".into(),
    );
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(task.run(shutdown.clone()));
    let mut conn = uplink.connection();

    assert!(matches!(
        uplink.publish(TopicKind::Telemetry, vec![1], Some(7)),
        Err(LinkError::NotConnected)
    ));
    tx.send(connack()).unwrap();
    conn.wait_for(|c| c.connected).await.unwrap();
    // The link published the online status itself (pkid 1); then ours get 2 and 3.
    uplink
        .publish(TopicKind::Telemetry, vec![1], Some(7))
        .unwrap();
    uplink.publish(TopicKind::Button, vec![2], Some(8)).unwrap();
    uplink.publish(TopicKind::AudioUp, vec![3], None).unwrap(); // QoS 0: no pkid
    for pkid in [1, 2, 0, 3] {
        tx.send(Ok(Event::Outgoing(Outgoing::Publish(pkid))))
            .unwrap();
    }
    tx.send(Ok(Event::Incoming(Packet::PubAck(PubAck::new(3)))))
        .unwrap();
    tx.send(Ok(Event::Incoming(Packet::PubAck(PubAck::new(1)))))
        .unwrap();
    tx.send(Ok(Event::Incoming(Packet::PubAck(PubAck::new(2)))))
        .unwrap();
    assert_eq!(out.acks.recv().await, Some(8));
    assert_eq!(out.acks.recv().await, Some(7));

    // In flight when the connection drops: never acknowledged, refused until reconnected.
    uplink
        .publish(TopicKind::Telemetry, vec![4], Some(9))
        .unwrap();
    tx.send(Ok(Event::Outgoing(Outgoing::Publish(4)))).unwrap();
    tx.send(Err(ConnectionError::NetworkTimeout)).unwrap();
    conn.wait_for(|c| !c.connected).await.unwrap();
    assert!(uplink
        .publish(TopicKind::Telemetry, vec![5], Some(10))
        .is_err());
    tx.send(Ok(Event::Incoming(Packet::PubAck(PubAck::new(4)))))
        .unwrap();
    tx.send(connack()).unwrap();
    conn.wait_for(|c| c.connected && c.generation == 2)
        .await
        .unwrap();
    assert_eq!(uplink.generation(), 2);
    assert!(
        out.acks.try_recv().is_err(),
        "a stale PUBACK acknowledges nothing"
    );
    shutdown.cancel();
    handle.await.unwrap();
}
