//! Connecting through the edge: TLS, forwarding, retained messages, Last Will, refusals.

mod common;

use std::time::Duration;

use common::*;
use companion_broker::{BrokerEvent, DenyReason, DisconnectReason};
use rumqttc::{ConnectReturnCode, ConnectionError, LastWill, QoS};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn a_registered_device_publishes_telemetry_over_tls_and_the_backend_receives_it() {
    let app = TestApp::start().await;
    let mut backend = app
        .backend(
            "telemetry",
            &["$share/companion-telemetry/devices/+/telemetry"],
        )
        .await;
    backend.wait_suback().await;

    let device = Client::connect(app.device_tls("a", "token-a"))
        .await
        .unwrap();
    app.events
        .wait_for(|e| matches!(e, BrokerEvent::Connected { device, protocol: 4, .. } if device.as_str() == "a"))
        .await;
    device.publish("devices/a/telemetry", b"t1").await;

    assert_eq!(
        backend.next_publish().await,
        ("devices/a/telemetry".to_owned(), b"t1".to_vec())
    );
    assert_eq!(app.handle.connected_devices(), 1);
    assert!(app.handle.is_up());
    assert!(app.metric("broker_connected_devices") >= 1.0);
    assert!(app.metric("broker_messages_in_total{class=\"telemetry\"}") >= 1.0);
}

#[tokio::test]
async fn a_retained_persona_reaches_the_device_on_subscribe_over_mqtt_5() {
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{mqttbytes::v5::Packet, AsyncClient, Event, MqttOptions};

    let app = TestApp::start().await;
    let backend = app.backend("persona", &[]).await;
    backend
        .client
        .publish("devices/a/persona", QoS::AtLeastOnce, true, b"p1".to_vec())
        .await
        .unwrap();
    // The backend subscribing to the same topic and seeing the retained copy orders the test
    // without sleeping: the router has stored it.
    let mut probe = app.backend("persona-probe", &["devices/a/persona"]).await;
    assert_eq!(probe.next_publish().await.1, b"p1".to_vec());

    let mut o = MqttOptions::new("a", "localhost", app.tls.port());
    o.set_credentials("a", "token-a");
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(app.client_tls()),
    ));
    let (client, mut el) = AsyncClient::new(o, 16);
    client
        .subscribe("devices/a/persona", QoS5::AtLeastOnce)
        .await
        .unwrap();
    let got = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                return (p.topic.to_vec(), p.payload.to_vec());
            }
        }
    })
    .await
    .expect("retained persona in time");
    assert_eq!(got, (b"devices/a/persona".to_vec(), b"p1".to_vec()));
    app.events
        .wait_for(|e| matches!(e, BrokerEvent::Connected { protocol: 5, .. }))
        .await;
}

#[tokio::test]
async fn the_last_will_is_delivered_when_the_device_socket_dies() {
    let app = TestApp::start().await;
    let mut backend = app.backend("status", &["devices/+/status"]).await;
    backend.wait_suback().await;

    let mut o = app.device_tls("a", "token-a");
    o.set_last_will(LastWill::new(
        "devices/a/status",
        b"{\"online\":false}".to_vec(),
        QoS::AtLeastOnce,
        false,
    ));
    let (_client, mut el) = rumqttc::AsyncClient::new(o, 16);
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    // The socket dies without DISCONNECT.
    drop(el);

    assert_eq!(
        backend.next_publish().await,
        (
            "devices/a/status".to_owned(),
            b"{\"online\":false}".to_vec()
        )
    );
    app.events
        .wait_for(|e| {
            matches!(
                e,
                BrokerEvent::Disconnected {
                    reason: DisconnectReason::NetworkError,
                    ..
                }
            )
        })
        .await;
}

async fn assert_refused(app: &TestApp, id: &str, user: &str, token: &str, reason: DenyReason) {
    let expected = match reason {
        DenyReason::Unavailable | DenyReason::Throttled => ConnectReturnCode::ServiceUnavailable,
        _ => ConnectReturnCode::NotAuthorized,
    };
    let mut o = app.device_tls(id, token);
    o.set_credentials(user, token);
    match Client::connect(o).await {
        Err(ConnectionError::ConnectionRefused(code)) => assert_eq!(code, expected),
        Err(other) => panic!("expected a CONNACK refusal, got {other:?}"),
        Ok(_) => panic!("connection accepted"),
    }
    app.events
        .wait_for(|e| matches!(e, BrokerEvent::AuthFailed { reason: r, .. } if *r == reason))
        .await;
    assert!(
        app.metric(&format!(
            "broker_auth_failures_total{{reason=\"{}\"}}",
            reason.as_str()
        )) >= 1.0
    );
}

#[tokio::test]
async fn a_wrong_token_is_refused_with_not_authorized() {
    let app = TestApp::start().await;
    assert_refused(&app, "a", "a", "wrong", DenyReason::BadToken).await;
}

#[tokio::test]
async fn an_unknown_device_is_refused_with_not_authorized() {
    let app = TestApp::start().await;
    assert_refused(&app, "ghost", "ghost", "token-a", DenyReason::UnknownDevice).await;
}

#[tokio::test]
async fn a_client_id_different_from_the_username_is_refused() {
    let app = TestApp::start().await;
    assert_refused(&app, "b", "a", "token-a", DenyReason::IdentityMismatch).await;
}

#[tokio::test]
async fn a_reserved_client_id_is_refused() {
    let app = TestApp::start().await;
    let id = format!("{}-x", companion_broker::RESERVED_CLIENT_ID_PREFIX);
    assert_refused(&app, &id, &id, "token-a", DenyReason::ReservedClientId).await;
}

#[tokio::test]
async fn a_disabled_device_is_refused() {
    let app = TestApp::start().await;
    assert_refused(&app, "off", "off", "token-off", DenyReason::Disabled).await;
}

#[tokio::test]
async fn credentials_that_cannot_be_checked_are_refused_with_server_unavailable() {
    // Not "not authorized": the device's token may be fine, and it should try again later.
    let app = TestApp::start().await;
    assert_refused(
        &app,
        UNREACHABLE,
        UNREACHABLE,
        "any",
        DenyReason::Unavailable,
    )
    .await;
}

/// The reason code an MQTT 5 client `id` with `token` is refused with.
async fn v5_refusal(
    app: &TestApp,
    id: &str,
    token: &str,
) -> rumqttc::v5::mqttbytes::v5::ConnectReturnCode {
    use rumqttc::v5::{AsyncClient, ConnectionError as Error5, MqttOptions};

    let mut o = MqttOptions::new(id, "127.0.0.1", app.plain.port());
    o.set_credentials(id, token);
    let (_client, mut el) = AsyncClient::new(o, 16);
    let err = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Err(e) = el.poll().await {
                return e;
            }
        }
    })
    .await
    .unwrap();
    match err {
        Error5::ConnectionRefused(code) => code,
        other => panic!("expected a CONNACK refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_mqtt_5_client_gets_reason_code_0x87() {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code5;
    let app = TestApp::start().await;
    assert_eq!(v5_refusal(&app, "a", "wrong").await, Code5::NotAuthorized);
}

#[tokio::test]
async fn an_unanswered_mqtt_5_login_gets_reason_code_0x88() {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code5;
    let app = TestApp::start().await;
    assert_eq!(
        v5_refusal(&app, UNREACHABLE, "any").await,
        Code5::ServerUnavailable
    );
}

#[tokio::test]
async fn mosquitto_clients_publish_and_subscribe_through_the_tls_edge() {
    let app = TestApp::start().await;
    let mut backend = app.backend("mosq", &["devices/+/telemetry"]).await;
    backend.wait_suback().await;

    let port = app.tls.port().to_string();
    let ca = app.ca_pem.to_str().unwrap().to_owned();
    let common = |id: &str| -> Vec<String> {
        [
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
            "-i",
            id,
            "-u",
            id,
            "-P",
            "token-b",
            "-V",
            "mqttv311",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // mosquitto_sub as device b on its own led topic, exiting after one message.
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args(common("b"))
        .args(["-t", "devices/b/led", "-C", "1", "-W", "10"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub is installed");
    app.events
        .wait_for(|e| matches!(e, BrokerEvent::Connected { device, .. } if device.as_str() == "b"))
        .await;
    // Its SUBSCRIBE is in flight; publishing until it arrives avoids sleeping.
    let reader = tokio::spawn(async move {
        let out = sub.wait_with_output().await.unwrap();
        String::from_utf8(out.stdout).unwrap()
    });
    let got = tokio::time::timeout(DEADLINE, async {
        loop {
            backend
                .client
                .publish("devices/b/led", QoS::AtLeastOnce, false, b"on".to_vec())
                .await
                .unwrap();
            if reader.is_finished() {
                return reader.await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("mosquitto_sub receives");
    assert_eq!(got.trim(), "on");

    // mosquitto_pub, a second connection as b, publishes telemetry.
    let status = tokio::process::Command::new("mosquitto_pub")
        .args(common("b"))
        .args(["-t", "devices/b/telemetry", "-m", "hello", "-q", "1"])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(
        backend.next_publish().await,
        ("devices/b/telemetry".to_owned(), b"hello".to_vec())
    );
}

#[tokio::test]
async fn a_device_that_aborts_its_handshakes_again_and_again_can_still_connect() {
    // rumqttd 0.20 poisons a listener when a client id is reused after a connection died
    // between CONNECT and CONNACK; the edge must never let a device trigger that.
    let app = TestApp::start().await;
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(app.plain).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(&common::raw_connect("a", "a", "token-a", None))
            .await
            .unwrap();
        drop(s);
    }
    for _ in 0..3 {
        let device = Client::connect(app.device_plain("a", "token-a"))
            .await
            .expect("the device still connects");
        device.client.disconnect().await.unwrap();
    }
    let mut backend = app.backend("after", &["devices/+/telemetry"]).await;
    backend.wait_suback().await;
    let other = Client::connect(app.device_plain("b", "token-b"))
        .await
        .unwrap();
    other.publish("devices/b/telemetry", b"still-routing").await;
    assert_eq!(
        backend.next_publish().await,
        ("devices/b/telemetry".to_owned(), b"still-routing".to_vec())
    );
}

#[tokio::test]
async fn devices_leave_no_state_in_the_router_however_often_they_reconnect() {
    let app = TestApp::start().await;
    // The router knows the platform's own links only (uplink, downlink).
    let ids = app.metric("broker_router_client_ids");
    assert!(ids >= 2.0, "{ids}");
    let connect = raw_connect("a", "a", "token-a", None);
    let is_a_gone = |e: &BrokerEvent| matches!(e, BrokerEvent::Disconnected { device, .. } if device.as_str() == "a");
    for i in 0..12 {
        let (mut s, connack) = raw_session(app.plain, &connect).await;
        assert_eq!(connack, [0x20, 2, 0, 0], "round {i}");
        if i % 2 == 0 {
            // Clean: DISCONNECT, then the edge closes.
            s.write_all(&[0xe0, 0]).await.unwrap();
            wait_eof(&mut s).await;
        } else {
            // The device just vanishes.
            drop(s);
        }
        app.events.wait_count(i + 1, is_a_gone).await;
    }
    // Takeovers too.
    for _ in 0..3 {
        let (mut first, _) = raw_session(app.plain, &connect).await;
        let (second, connack) = raw_session(app.plain, &connect).await;
        assert_eq!(connack, [0x20, 2, 0, 0]);
        wait_eof(&mut first).await;
        drop(second);
    }
    app.events.wait_count(18, is_a_gone).await;
    assert_eq!(app.metric("broker_router_client_ids"), ids);

    // And traffic still flows both ways.
    let mut backend = app.backend("t", &["devices/+/telemetry"]).await;
    backend.wait_suback().await;
    let mut device = Client::connect(app.device_plain("a", "token-a"))
        .await
        .unwrap();
    device.publish("devices/a/telemetry", b"still here").await;
    assert_eq!(backend.next_publish().await.1, b"still here".to_vec());
    device.subscribe("devices/a/led").await;
    device.wait_suback().await;
    backend
        .client
        .publish("devices/a/led", QoS::AtLeastOnce, false, b"on".to_vec())
        .await
        .unwrap();
    assert_eq!(
        device.next_publish().await,
        ("devices/a/led".to_owned(), b"on".to_vec())
    );
    assert_eq!(app.metric("broker_router_client_ids"), ids + 1.0);
}

#[tokio::test]
async fn a_qos_2_publish_completes_its_handshake_at_the_edge() {
    let app = TestApp::start().await;
    let mut backend = app.backend("q2", &["devices/+/telemetry"]).await;
    backend.wait_suback().await;
    let (client, mut el) = rumqttc::AsyncClient::new(app.device_plain("a", "token-a"), 10);
    client
        .publish(
            "devices/a/telemetry",
            QoS::ExactlyOnce,
            false,
            b"q2".to_vec(),
        )
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_)) = el.poll().await.unwrap()
            {
                return;
            }
        }
    })
    .await
    .expect("PUBREC, PUBREL, PUBCOMP");
    assert_eq!(
        backend.next_publish().await,
        ("devices/a/telemetry".to_owned(), b"q2".to_vec())
    );
}

#[tokio::test]
async fn more_qos_1_messages_than_the_inflight_window_reach_a_device_that_acknowledges() {
    let app = TestApp::start().await;
    let mut device = Client::connect(app.device_plain("a", "token-a"))
        .await
        .unwrap();
    device.subscribe("devices/a/led").await;
    device.wait_suback().await;
    let backend = app.backend("many", &[]).await;
    // 200 > the edge's 64 unacknowledged messages: packet ids must be freed by PUBACKs.
    for i in 0..200u32 {
        backend
            .client
            .publish(
                "devices/a/led",
                QoS::AtLeastOnce,
                false,
                i.to_be_bytes().to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(device.next_publish().await.1, i.to_be_bytes().to_vec());
    }
    assert_eq!(app.metric("broker_messages_lost_total"), 0.0);
}
