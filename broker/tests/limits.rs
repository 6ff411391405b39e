//! Limits: stalled sockets, packet size, publish rate.

mod common;

use std::time::Duration;

use common::*;
use companion_broker::{BrokerEvent, DisconnectReason, MqttSettings, RateSettings};
use rumqttc::QoS;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn an_idle_tcp_connection_to_the_tls_port_does_not_delay_another_clients_tls_connect() {
    let app = TestApp::start().await;
    // Connected, never says a word (rumqttd's own accept loop would stall here).
    let _idle = TcpStream::connect(app.tls).await.unwrap();
    let _idle2 = TcpStream::connect(app.tls).await.unwrap();
    // Well under the 5 s handshake timeout: only a non-blocking accept loop passes.
    let connected = tokio::time::timeout(
        Duration::from_secs(3),
        Client::connect(app.device_tls("a", "token-a")),
    )
    .await;
    assert!(matches!(connected, Ok(Ok(_))));
}

#[tokio::test]
async fn an_oversized_packet_disconnects() {
    let settings = MqttSettings {
        max_packet_size: 1024,
        ..test_settings()
    };
    let app = TestApp::start_with(settings).await;
    let (mut s, connack) = raw_session(app.plain, &raw_connect("a", "a", "token-a", None)).await;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    // A PUBLISH announcing 100 KB: refused from its header, before the body.
    let mut publish = vec![0x30];
    encode_len(&mut publish, 100_000);
    publish.extend_from_slice(&[0x00, 0x13]);
    publish.extend_from_slice(b"devices/a/telemetry");
    s.write_all(&publish).await.unwrap();
    app.events
        .wait_for(|e| {
            matches!(
                e,
                BrokerEvent::Disconnected {
                    reason: DisconnectReason::PacketTooLarge,
                    ..
                }
            )
        })
        .await;
    wait_eof(&mut s).await;
}

#[tokio::test]
async fn a_flood_over_the_rate_limit_is_dropped_and_counted() {
    let settings = MqttSettings {
        rate: RateSettings {
            control_per_s: 5,
            control_burst: 5,
            sustained_over_limit_s: 3600,
            ..RateSettings::default()
        },
        ..test_settings()
    };
    let app = TestApp::start_with(settings).await;
    let mut backend = app.backend("flood", &["devices/+/telemetry"]).await;
    backend.wait_suback().await;
    let device = Client::connect(app.device_plain("a", "token-a"))
        .await
        .unwrap();
    const SENT: usize = 60;
    for i in 0..SENT {
        device
            .client
            .publish("devices/a/telemetry", QoS::AtMostOnce, false, i.to_string())
            .await
            .unwrap();
    }
    // Everything sent is either delivered or counted as dropped.
    let mut delivered = 0usize;
    tokio::time::timeout(DEADLINE, async {
        loop {
            let dropped =
                app.metric("broker_messages_dropped_total{reason=\"rate_limited\"}") as usize;
            if delivered + dropped == SENT {
                break;
            }
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(100), backend.rx.recv()).await
            {
                delivered += 1;
            }
        }
    })
    .await
    .expect("all publishes accounted for");
    assert!(delivered >= 5, "burst delivered: {delivered}");
    assert!(
        delivered < SENT / 2,
        "most of the flood dropped: {delivered}"
    );
    assert_eq!(
        app.handle.connected_devices(),
        1,
        "a short flood does not disconnect"
    );
}

#[tokio::test]
async fn a_qos_1_flood_over_the_rate_limit_is_slowed_down_not_dropped() {
    // A device replaying its offline buffer sends QoS 1 as fast as PUBACKs come back. Dropping
    // the excess would still acknowledge it (3.1.1 has no negative PUBACK) and lose it.
    let settings = MqttSettings {
        rate: RateSettings {
            control_per_s: 20,
            control_burst: 5,
            sustained_over_limit_s: 1,
            ..RateSettings::default()
        },
        ..test_settings()
    };
    let app = TestApp::start_with(settings).await;
    let mut backend = app.backend("replay", &["devices/+/telemetry"]).await;
    backend.wait_suback().await;
    let device = Client::connect(app.device_plain("a", "token-a"))
        .await
        .unwrap();
    const SENT: usize = 40;
    for i in 0..SENT {
        device
            .publish("devices/a/telemetry", i.to_string().as_bytes())
            .await;
    }
    for i in 0..SENT {
        let (_, payload) = backend.next_publish().await;
        assert_eq!(
            String::from_utf8(payload).unwrap(),
            i.to_string(),
            "in order"
        );
    }
    assert_eq!(
        app.metric("broker_messages_dropped_total{reason=\"rate_limited\"}"),
        0.0
    );
    assert!(
        app.metric("broker_publishes_throttled_total") >= (SENT - 5 - 10) as f64,
        "most of the flood went through on credit"
    );
    assert_eq!(
        app.handle.connected_devices(),
        1,
        "a throttled device is not disconnected, however long it is over the limit"
    );
}

#[tokio::test]
async fn a_sustained_flood_disconnects_the_device() {
    let settings = MqttSettings {
        rate: RateSettings {
            control_per_s: 5,
            control_burst: 5,
            sustained_over_limit_s: 1,
            ..RateSettings::default()
        },
        ..test_settings()
    };
    let app = TestApp::start_with(settings).await;
    let device = Client::connect(app.device_plain("a", "token-a"))
        .await
        .unwrap();
    let flood = tokio::spawn(async move {
        loop {
            if device
                .client
                .publish("devices/a/telemetry", QoS::AtMostOnce, false, b"x".to_vec())
                .await
                .is_err()
            {
                return;
            }
            // Pacing, not ordering: ~200 msg/s, forty times the limit.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    app.events
        .wait_for(|e| {
            matches!(
                e,
                BrokerEvent::Disconnected {
                    reason: DisconnectReason::RateLimited,
                    ..
                }
            )
        })
        .await;
    flood.abort();
}

#[tokio::test]
async fn messages_a_slow_subscriber_loses_to_log_rotation_are_counted() {
    // Tiny commit logs: 2 segments of 1 KiB per filter. On an up topic, which only the slow
    // subscriber reads here (the edge's own downlink reads the down topics).
    let settings = MqttSettings {
        router_segment_bytes: 1024,
        router_device_segment_bytes: 1024,
        router_segment_count: 2,
        ..common::test_settings()
    };
    let app = TestApp::start_with(settings).await;
    let mut slow = app.handle.local_client("slow").await.unwrap();
    slow.subscribe(&["devices/a/telemetry"]).await.unwrap();
    assert_eq!(
        tokio::time::timeout(DEADLINE, slow.next())
            .await
            .unwrap()
            .unwrap(),
        companion_broker::LocalEvent::SubAck
    );
    assert_eq!(app.metric("broker_messages_lost_total"), 0.0);

    // 2,000 messages of ~100 bytes while the subscriber reads nothing: the router hands it
    // one buffer's worth, pauses it, and rotates the rest of the log away beneath it.
    let mut fast = app.handle.local_client("fast").await.unwrap();
    const SENT: usize = 2000;
    for i in 0..SENT {
        fast.publish("devices/a/telemetry", format!("{i:0100}"), false)
            .await
            .unwrap();
    }
    // Read until the last message: every message is then delivered or counted lost.
    let last = format!("{:0100}", SENT - 1);
    let mut received = 0;
    // The first delivery seeds the count: whatever rotated away before the subscriber's
    // first read is not seen by it (messages before `first`).
    let mut first = None;
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let companion_broker::LocalEvent::Publish { payload, .. } =
                slow.next().await.unwrap()
            {
                received += 1;
                first.get_or_insert_with(|| {
                    String::from_utf8_lossy(&payload).parse::<usize>().unwrap()
                });
                if payload == last.as_bytes() {
                    return;
                }
            }
        }
    })
    .await
    .expect("the last message arrives");
    let lost = app.metric("broker_messages_lost_total") as usize;
    assert!(
        lost > 0 && received < SENT,
        "received {received}, lost {lost}"
    );
    let first = first.unwrap();
    assert_eq!(
        first + received + lost,
        SENT,
        "first {first}, received {received}, lost {lost}"
    );
}
