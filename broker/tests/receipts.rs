//! QoS 1 acknowledgements held until the message is stored (a `Receipts` hook): the device
//! sees no PUBACK before its receipt settles, PUBACKs keep the publishes' order, a refusal is
//! acknowledged as dropped and counted, and a lost receipt closes the connection unacknowledged.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use companion_broker::{Ledger, Receipt, Receipts};
use companion_schema::{DeviceId, TopicKind};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Holds every telemetry publish (its payload is its mark, in decimal); the test settles them
/// through the device's ledger by hand.
#[derive(Default)]
struct Held {
    ledgers: Mutex<HashMap<DeviceId, Arc<Ledger>>>,
    held: Mutex<Vec<Bytes>>,
    notify: Notify,
}

impl Receipts for Held {
    fn ledger(&self, device: &DeviceId) -> Arc<Ledger> {
        self.ledgers
            .lock()
            .unwrap()
            .entry(device.clone())
            .or_insert_with(|| Arc::new(Ledger::new(Gauge::default())))
            .clone()
    }

    fn hold(&self, ledger: &Arc<Ledger>, kind: TopicKind, payload: &Bytes) -> Option<Receipt> {
        if kind != TopicKind::Telemetry {
            return None;
        }
        let mark: u64 = std::str::from_utf8(payload).ok()?.parse().ok()?;
        let receipt = ledger.hold(mark, |stored| stored.is_some_and(|s| s >= mark));
        self.held.lock().unwrap().push(payload.clone());
        self.notify.notify_one();
        receipt
    }
}

impl Held {
    /// Waits until `n` messages are held; their payloads.
    async fn wait(&self, n: usize) -> Vec<Bytes> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let notified = self.notify.notified();
                {
                    let w = self.held.lock().unwrap();
                    if w.len() >= n {
                        return w.clone();
                    }
                }
                notified.await;
            }
        })
        .await
        .expect("the edge holds the publishes")
    }

    fn device(&self, device: &str) -> Arc<Ledger> {
        self.ledger(&DeviceId::parse(device).unwrap())
    }
}

fn publish_q1(topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(payload);
    let mut out = vec![0x32];
    encode_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

const PINGREQ: [u8; 2] = [0xC0, 0x00];
const PINGRESP: [u8; 2] = [0xD0, 0x00];

async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("bytes from the edge in time")
        .expect("read");
    buf
}

async fn start() -> (TestApp, Arc<Held>, TcpStream) {
    let held = Arc::new(Held::default());
    let app =
        TestApp::start_with_receipts(test_settings(), Some(held.clone() as Arc<dyn Receipts>))
            .await;
    let (s, connack) = raw_session(app.plain, &raw_connect("a", "a", "token-a", None)).await;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    (app, held, s)
}

#[tokio::test]
async fn the_puback_waits_for_the_receipt_and_keeps_the_publish_order() {
    let (app, held, mut s) = start().await;
    let mut out = Vec::new();
    out.extend(publish_q1("devices/a/telemetry", 1, b"1"));
    // Not held itself, but acknowledged after 1 (PUBACKs go out in order).
    out.extend(publish_q1("devices/a/status", 2, b"{\"online\":true}"));
    out.extend(publish_q1("devices/a/telemetry", 3, b"3"));
    out.extend(PINGREQ);
    s.write_all(&out).await.unwrap();
    assert_eq!(held.wait(2).await, vec![Bytes::from("1"), Bytes::from("3")]);
    // The edge answered the PINGREQ sent after the publishes, and no PUBACK came before it.
    assert_eq!(
        read_n(&mut s, 2).await,
        PINGRESP,
        "no PUBACK before the receipt"
    );

    // 3 is refused first, but its acknowledgement waits behind 1's.
    let ledger = held.device("a");
    ledger.refuse(3);
    s.write_all(&PINGREQ).await.unwrap();
    assert_eq!(read_n(&mut s, 2).await, PINGRESP, "3 waits behind 1");

    ledger.store(1);
    let acks = read_n(&mut s, 12).await;
    assert_eq!(
        acks,
        [0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3],
        "PUBACK 1, 2, 3 in order (3.1.1 has no negative acknowledgement)"
    );
    assert_eq!(
        app.metric("broker_messages_lost_total"),
        1.0,
        "3 was refused"
    );

    // A copy of what is stored is acknowledged at once; a new mark waits for its store.
    let mut out = publish_q1("devices/a/telemetry", 4, b"1");
    out.extend(publish_q1("devices/a/telemetry", 5, b"6"));
    out.extend(PINGREQ);
    s.write_all(&out).await.unwrap();
    assert_eq!(read_n(&mut s, 6).await, [0x40, 2, 0, 4, 0xD0, 0]);
    ledger.store(7);
    assert_eq!(read_n(&mut s, 4).await, [0x40, 2, 0, 5]);
    app.shutdown.cancel();
}

#[tokio::test]
async fn a_refused_message_is_acknowledged_as_dropped_and_counted() {
    let (app, held, mut s) = start().await;
    s.write_all(&publish_q1("devices/a/telemetry", 7, b"7"))
        .await
        .unwrap();
    held.wait(1).await;
    held.device("a").refuse(7);
    // MQTT 3.1.1 has no negative acknowledgement: a PUBACK, and the loss is counted.
    assert_eq!(read_n(&mut s, 4).await, [0x40, 2, 0, 7]);
    assert_eq!(
        app.metric("broker_messages_dropped_total{reason=\"not_stored\"}"),
        1.0
    );
    assert_eq!(app.metric("broker_messages_lost_total"), 1.0);
    app.shutdown.cancel();
}

#[tokio::test]
async fn a_lost_receipt_closes_the_connection_without_an_acknowledgement() {
    let (app, held, mut s) = start().await;
    s.write_all(&publish_q1("devices/a/telemetry", 9, b"9"))
        .await
        .unwrap();
    held.wait(1).await;
    held.device("a").close();
    // The socket closes and nothing was acknowledged: the device will send it again.
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .ok();
    assert!(!rest.starts_with(&[0x40]), "no PUBACK: {rest:?}");
    app.shutdown.cancel();
}

/// An up sink that keeps what it is given and holds every QoS 1 publish at mark 1.
struct HoldingSink(Mutex<Vec<(String, TopicKind, bool)>>);

impl companion_broker::UpSink for HoldingSink {
    fn deliver(&self, _: &[u8], _: &[u8]) {}

    fn publish(
        &self,
        device: &DeviceId,
        kind: TopicKind,
        _topic: &[u8],
        _payload: &Bytes,
        hold: Option<&Arc<Ledger>>,
    ) -> Option<Receipt> {
        self.0
            .lock()
            .unwrap()
            .push((device.to_string(), kind, hold.is_some()));
        hold?.hold(1, |stored| stored.is_some())
    }
}

/// While an up sink is set it decides the receipt: the edge hands it the device, the kind and
/// the device's ledger for a QoS 1 publish (none for QoS 0), and the PUBACK waits for what it
/// returned.
#[tokio::test]
async fn an_up_sink_holds_the_puback_of_what_it_is_given() {
    let (app, held, mut s) = start().await;
    let sink = Arc::new(HoldingSink(Mutex::new(Vec::new())));
    app.handle.set_up_sink(Some(sink.clone()));
    let mut out = publish_q1("devices/a/telemetry", 1, b"x");
    // QoS 0: nothing to hold.
    out.extend([0x30, 2 + 19 + 1, 0, 19]);
    out.extend(b"devices/a/telemetry");
    out.push(b'y');
    out.extend(PINGREQ);
    s.write_all(&out).await.unwrap();
    assert_eq!(read_n(&mut s, 2).await, PINGRESP, "no PUBACK yet");
    assert_eq!(
        *sink.0.lock().unwrap(),
        vec![
            ("a".to_owned(), TopicKind::Telemetry, true),
            ("a".to_owned(), TopicKind::Telemetry, false)
        ]
    );
    assert!(
        held.held.lock().unwrap().is_empty(),
        "the hook's hold is not asked while a sink is set"
    );
    held.device("a").store(1);
    assert_eq!(read_n(&mut s, 4).await, [0x40, 2, 0, 1]);
    app.shutdown.cancel();
}
