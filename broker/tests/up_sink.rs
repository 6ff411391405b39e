//! The direct up path: while an `UpSink` is set, device publishes (and Wills) go to it and not
//! through the router; once it is unset they go through the router again.

mod common;

use std::sync::Arc;

use common::*;
use companion_broker::UpSink;
use rumqttc::{LastWill, QoS};
use tokio::sync::mpsc;

/// Forwards what the edge hands it to the test.
struct ChannelSink(mpsc::UnboundedSender<(String, Vec<u8>)>);

impl UpSink for ChannelSink {
    fn deliver(&self, topic: &[u8], payload: &[u8]) {
        let _ = self.0.send((
            String::from_utf8_lossy(topic).into_owned(),
            payload.to_vec(),
        ));
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>) -> (String, Vec<u8>) {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("the sink gets the publish in time")
        .expect("sink open")
}

#[tokio::test]
async fn up_topics_go_to_the_sink_instead_of_the_router_while_it_is_set() {
    let app = TestApp::start().await;
    // A reader of the same topics on the router: it must see nothing while the sink is set.
    let mut router_reader = app
        .backend("reader", &["devices/+/telemetry", "devices/+/status"])
        .await;
    router_reader.wait_suback().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    app.handle.set_up_sink(Some(Arc::new(ChannelSink(tx))));

    let a = Client::connect(app.device_tls("a", "token-a"))
        .await
        .unwrap();
    a.publish("devices/a/telemetry", b"one").await;
    assert_eq!(
        next(&mut rx).await,
        ("devices/a/telemetry".to_owned(), b"one".to_vec())
    );

    // A Will on an unclean close takes the same path.
    let mut o = app.device_tls("b", "token-b");
    o.set_last_will(LastWill::new(
        "devices/b/status",
        b"gone".to_vec(),
        QoS::AtLeastOnce,
        false,
    ));
    let (_client, mut el) = rumqttc::AsyncClient::new(o, 16);
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    drop(el);
    assert_eq!(
        next(&mut rx).await,
        ("devices/b/status".to_owned(), b"gone".to_vec())
    );

    // Unset: through the router again. The router reader's first message is this one, so
    // nothing sent while the sink was set reached it.
    app.handle.set_up_sink(None);
    a.publish("devices/a/telemetry", b"two").await;
    assert_eq!(
        router_reader.next_publish().await,
        ("devices/a/telemetry".to_owned(), b"two".to_vec())
    );
    assert!(rx.try_recv().is_err(), "the unset sink got a message");
}
