//! MQTT over WebSocket: the same edge behind an HTTP upgrade (`ws` and `wss` listeners).

mod common;

use std::time::Duration;

use async_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue, Message};
use common::*;
use companion_broker::{AclAction, BrokerEvent, DisconnectReason, MqttSettings};
use companion_schema::DeviceId;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_device_over_wss_and_ws_talks_to_the_backend_on_its_own_topics() {
    let app = TestApp::start().await;
    let mut backend = app.backend("ws", &["devices/+/telemetry"]).await;
    backend.wait_suback().await;

    let mut a = Client::connect(app.device_ws("a", "token-a", true))
        .await
        .unwrap();
    a.subscribe("devices/a/led").await;
    a.wait_suback().await;
    a.publish("devices/a/telemetry", b"over-wss").await;
    assert_eq!(
        backend.next_publish().await,
        ("devices/a/telemetry".to_owned(), b"over-wss".to_vec())
    );
    backend.publish("devices/a/led", b"blink").await;
    assert_eq!(
        a.next_publish().await,
        ("devices/a/led".to_owned(), b"blink".to_vec())
    );

    let b = Client::connect(app.device_ws("b", "token-b", false))
        .await
        .unwrap();
    b.publish("devices/b/telemetry", b"over-ws").await;
    assert_eq!(
        backend.next_publish().await,
        ("devices/b/telemetry".to_owned(), b"over-ws".to_vec())
    );
    assert!(app.metric("broker_connected_devices") >= 2.0);
}

#[tokio::test]
async fn a_device_over_websocket_cannot_touch_another_devices_topics() {
    let app = TestApp::start().await;
    let mut b = Client::connect(app.device_ws("b", "token-b", true))
        .await
        .unwrap();
    b.subscribe("devices/b/led").await;
    b.wait_suback().await;

    // Publishing to B's topic: disconnected, and B never sees it.
    let mut a = Client::connect(app.device_ws("a", "token-a", true))
        .await
        .unwrap();
    a.publish("devices/b/led", b"from-a").await;
    app.events
        .wait_for(|e| {
            matches!(e, BrokerEvent::AclDenied { device, action: AclAction::Publish, topic }
                if device.as_str() == "a" && topic == "devices/b/led")
        })
        .await;
    a.wait_closed().await;
    let backend = app.backend("legit", &[]).await;
    backend.publish("devices/b/led", b"marker").await;
    assert_eq!(
        b.next_publish().await,
        ("devices/b/led".to_owned(), b"marker".to_vec())
    );

    // Subscribing to B's topics: disconnected too.
    let mut a = Client::connect(app.device_ws("a", "token-a", false))
        .await
        .unwrap();
    a.subscribe("devices/+/audio/down").await;
    app.events
        .wait_for(|e| {
            matches!(e, BrokerEvent::Disconnected { device, reason: DisconnectReason::AclViolation }
                if device.as_str() == "a")
        })
        .await;
    a.wait_closed().await;
    assert!(app.metric("broker_acl_denied_total{action=\"subscribe\"}") >= 1.0);
}

#[tokio::test]
async fn a_wrong_token_over_websocket_is_refused() {
    let app = TestApp::start().await;
    let refused = Client::connect(app.device_ws("a", "token-b", true)).await;
    let err = refused.err().expect("refused").to_string();
    assert!(err.to_lowercase().contains("refused"), "{err}");
    app.events
        .wait_for(|e| matches!(e, BrokerEvent::AuthFailed { client_id, .. } if client_id == "a"))
        .await;
}

#[tokio::test]
async fn takeover_and_kick_work_across_transports() {
    let app = TestApp::start().await;
    let mut over_tcp = Client::connect(app.device_tls("a", "token-a"))
        .await
        .unwrap();
    let mut over_ws = Client::connect(app.device_ws("a", "token-a", true))
        .await
        .unwrap();
    over_tcp.wait_closed().await;
    app.events
        .wait_for(|e| {
            matches!(e, BrokerEvent::Disconnected { device, reason: DisconnectReason::Takeover }
                if device.as_str() == "a")
        })
        .await;
    assert!(app.handle.kick(&DeviceId::parse("a").unwrap()));
    over_ws.wait_closed().await;
    app.events
        .wait_for(|e| {
            matches!(e, BrokerEvent::Disconnected { device, reason: DisconnectReason::Kicked }
                if device.as_str() == "a")
        })
        .await;
}

/// Sends an upgrade request by hand; returns the response's status code.
async fn upgrade_status(port: u16, path: &str, extra: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("an answer in time");
    let text = String::from_utf8_lossy(&head);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[tokio::test]
async fn the_upgrade_checks_path_subprotocol_and_origin() {
    let settings = MqttSettings {
        ws_allowed_origins: vec!["https://app.example.com".into()],
        ..test_settings()
    };
    let app = TestApp::start_with(settings).await;
    let port = app.ws.port();
    let mqtt = "Sec-WebSocket-Protocol: mqtt\r\n";
    assert_eq!(upgrade_status(port, "/mqtt", mqtt).await, 101);
    assert_eq!(upgrade_status(port, "/elsewhere", mqtt).await, 404);
    assert_eq!(upgrade_status(port, "/mqtt", "").await, 400);
    let evil = format!("{mqtt}Origin: https://evil.example\r\n");
    assert_eq!(upgrade_status(port, "/mqtt", &evil).await, 403);
    let ours = format!("{mqtt}Origin: https://app.example.com\r\n");
    assert_eq!(upgrade_status(port, "/mqtt", &ours).await, 101);
    assert_eq!(
        app.metric("broker_connects_total{result=\"websocket_refused\"}"),
        3.0
    );
    // Plain TCP MQTT on the WebSocket port is not an upgrade.
    let mut s = TcpStream::connect(app.ws).await.unwrap();
    s.write_all(&raw_connect("a", "a", "token-a", None))
        .await
        .unwrap();
    wait_eof(&mut s).await;
}

#[tokio::test]
async fn packets_may_span_websocket_messages_and_text_frames_close_the_connection() {
    let app = TestApp::start().await;
    let tcp = TcpStream::connect(app.ws).await.unwrap();
    let mut req = format!("ws://127.0.0.1:{}/mqtt", app.ws.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
    let (mut ws, resp) = async_tungstenite::tokio::client_async(req, tcp)
        .await
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");

    // CONNECT in two messages, then a PINGREQ and half a PUBLISH header in one.
    let connect = raw_connect("a", "a", "token-a", None);
    let (first, rest) = connect.split_at(5);
    ws.send(Message::binary(first.to_vec())).await.unwrap();
    ws.send(Message::binary(rest.to_vec())).await.unwrap();
    let mut received = Vec::new();
    while received.len() < 4 {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => received.extend_from_slice(&b),
            other => panic!("no CONNACK: {other:?}"),
        }
    }
    assert_eq!(&received[..4], &[0x20, 2, 0, 0], "CONNACK accepted");
    ws.send(Message::binary(vec![0xC0, 0x00])).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => assert_eq!(&b[..], &[0xD0, 0x00], "PINGRESP"),
        other => panic!("no PINGRESP: {other:?}"),
    }

    // MQTT over WebSocket is binary only.
    ws.send(Message::text("hello")).await.unwrap();
    // The server answers with a Close frame; reading on completes the close handshake.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut close_frame = false;
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return close_frame,
                Some(Ok(Message::Close(_))) => close_frame = true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "a text frame closes the connection");
    app.events
        .wait_for(
            |e| matches!(e, BrokerEvent::Disconnected { device, .. } if device.as_str() == "a"),
        )
        .await;
}
