//! Devices behind a TCP proxy that speaks the PROXY protocol (what nginx's `stream` module does
//! with `proxy_protocol on;`): the edge sees each device at its own address, refuses a trusted
//! proxy's connection without a header, and believes no header from anyone else.

mod common;

use std::net::SocketAddr;

use common::*;
use companion_broker::proxy::Networks;
use companion_broker::{BrokerEvent, DenyReason};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A one-connection-at-a-time TCP proxy on port 0 that writes `header` to the upstream, then
/// forwards both ways, like nginx `stream { proxy_protocol on; }`.
async fn proxy(upstream: SocketAddr, header: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            let header = header.clone();
            tokio::spawn(async move {
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                if up.write_all(&header).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    addr
}

fn behind_local_proxy() -> companion_broker::MqttSettings {
    companion_broker::MqttSettings {
        proxy_protocol_from: Networks::parse(&["127.0.0.0/8"]).unwrap(),
        ..test_settings()
    }
}

fn v2_tcp4(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&8883u16.to_be_bytes());
    h
}

#[tokio::test]
async fn a_device_behind_a_v1_proxy_over_tls_is_seen_at_its_own_address() {
    let app = TestApp::start_with(behind_local_proxy()).await;
    let via = proxy(
        app.tls,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 8883\r\n".to_vec(),
    )
    .await;
    let mut opts = MqttOptions::new("a", "localhost", via.port());
    opts.set_credentials("a", "token-a");
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        app.client_tls(),
    )));
    let device = Client::connect(opts).await.unwrap();

    let event = app
        .events
        .wait_for(|e| matches!(e, BrokerEvent::Connected { .. }))
        .await;
    let BrokerEvent::Connected {
        peer, device: id, ..
    } = event
    else {
        unreachable!()
    };
    assert_eq!(id.as_str(), "a");
    assert_eq!(peer, "203.0.113.7:40001".parse::<SocketAddr>().unwrap());

    // The connection works end to end after the header.
    let mut backend = app.backend("t", &["devices/+/telemetry"]).await;
    backend.wait_suback().await;
    device.publish("devices/a/telemetry", b"t").await;
    assert_eq!(backend.next_publish().await.1, b"t".to_vec());
}

#[tokio::test]
async fn a_refused_device_behind_a_v2_proxy_is_reported_at_its_own_address() {
    let app = TestApp::start_with(behind_local_proxy()).await;
    let via = proxy(app.plain, v2_tcp4([198, 51, 100, 20], 50_000)).await;
    let mut opts = MqttOptions::new("a", "127.0.0.1", via.port());
    opts.set_credentials("a", "wrong-token");
    assert!(Client::connect(opts).await.is_err());

    let event = app
        .events
        .wait_for(|e| matches!(e, BrokerEvent::AuthFailed { .. }))
        .await;
    assert_eq!(
        event,
        BrokerEvent::AuthFailed {
            client_id: "a".into(),
            peer: "198.51.100.20:50000".parse().unwrap(),
            reason: DenyReason::BadToken,
        }
    );
}

#[tokio::test]
async fn a_trusted_proxy_connection_without_a_header_is_refused() {
    let app = TestApp::start_with(behind_local_proxy()).await;
    // Straight from 127.0.0.1 (a trusted proxy address) with no header.
    assert!(Client::connect(app.device_plain("a", "token-a"))
        .await
        .is_err());
    assert_eq!(
        app.metric("broker_connects_total{result=\"proxy_header\"}"),
        1.0
    );
    assert_eq!(
        app.metric("broker_connects_total{result=\"accepted\"}"),
        0.0
    );
}

#[tokio::test]
async fn a_header_from_a_peer_that_is_not_a_trusted_proxy_is_not_believed() {
    // No trusted proxies: a header is just bytes that are not an MQTT CONNECT ("PR" reads as
    // a PUBREL of 82 bytes, so the edge waits for the rest until its CONNECT timeout).
    let app = TestApp::start_with(companion_broker::MqttSettings {
        connect_timeout_ms: 300,
        ..test_settings()
    })
    .await;
    let via = proxy(
        app.plain,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 40002 1883\r\n".to_vec(),
    )
    .await;
    let mut opts = MqttOptions::new("a", "127.0.0.1", via.port());
    opts.set_credentials("a", "token-a");
    assert!(Client::connect(opts).await.is_err());
    let refused = app.metric("broker_connects_total{result=\"protocol_error\"}")
        + app.metric("broker_connects_total{result=\"timeout\"}");
    assert_eq!(refused, 1.0);
    assert_eq!(
        app.metric("broker_connects_total{result=\"accepted\"}"),
        0.0
    );
    assert!(!app
        .events
        .all()
        .iter()
        .any(|e| matches!(e, BrokerEvent::Connected { .. })));
}
