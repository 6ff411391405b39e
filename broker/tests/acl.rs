//! The attacker matrix: device A, holding its own valid token, tries to reach B.

mod common;

use common::*;
use companion_broker::{AclAction, BrokerEvent, DisconnectReason};
use tokio::io::AsyncWriteExt;

async fn a_is_disconnected_for(app: &TestApp, action: AclAction, topic: &str) {
    app.events
        .wait_for(|e| {
            matches!(e, BrokerEvent::AclDenied { device, action: a, topic: t }
            if device.as_str() == "a" && *a == action && t == topic)
        })
        .await;
    if action != AclAction::Will {
        app.events
            .wait_for(|e| matches!(e, BrokerEvent::Disconnected { device, reason: DisconnectReason::AclViolation }
                if device.as_str() == "a"))
            .await;
    }
    assert!(
        app.metric(&format!(
            "broker_acl_denied_total{{action=\"{}\"}}",
            action.as_str()
        )) >= 1.0
    );
}

async fn subscribing_is_refused(filter: &str) {
    let app = TestApp::start().await;
    let mut a = Client::connect(app.device_tls("a", "token-a"))
        .await
        .unwrap();
    a.subscribe(filter).await;
    a_is_disconnected_for(&app, AclAction::Subscribe, filter).await;
    a.wait_closed().await;
}

#[tokio::test]
async fn subscribing_to_another_devices_led_disconnects() {
    subscribing_is_refused("devices/b/led").await;
}

#[tokio::test]
async fn subscribing_to_every_devices_audio_disconnects() {
    subscribing_is_refused("devices/+/audio/down").await;
}

#[tokio::test]
async fn subscribing_to_all_devices_disconnects() {
    subscribing_is_refused("devices/#").await;
}

#[tokio::test]
async fn subscribing_to_everything_disconnects() {
    subscribing_is_refused("#").await;
}

/// A publishes to `topic`; then `marker` is published to the same topic by a legitimate
/// party; the subscriber's first message must be the marker.
async fn publishing_is_refused(topic: &str, subscriber_is_device_b: bool) {
    publishing_is_refused_after(&[], topic, subscriber_is_device_b).await;
}

/// As `publishing_is_refused`, A having published to each of `own` first (the edge remembers
/// the last topic that passed its ACL).
async fn publishing_is_refused_after(own: &[&str], topic: &str, subscriber_is_device_b: bool) {
    let app = TestApp::start().await;
    let mut subscriber = if subscriber_is_device_b {
        Client::connect(app.device_plain("b", "token-b"))
            .await
            .unwrap()
    } else {
        app.backend("watch", &[]).await
    };
    subscriber.subscribe(topic).await;
    subscriber.wait_suback().await;

    let mut a = Client::connect(app.device_plain("a", "token-a"))
        .await
        .unwrap();
    for own in own {
        a.publish(own, b"own").await;
    }
    a.publish(topic, b"from-a").await;
    a_is_disconnected_for(&app, AclAction::Publish, topic).await;
    a.wait_closed().await;

    // The legitimate publisher: device B for its own up topics, the backend otherwise.
    let b_owns_it =
        companion_broker::acl::may_publish(&companion_schema::DeviceId::parse("b").unwrap(), topic)
            .is_some();
    if b_owns_it && !subscriber_is_device_b {
        let b = Client::connect(app.device_plain("b", "token-b"))
            .await
            .unwrap();
        b.publish(topic, b"marker").await;
    } else {
        let backend = app.backend("legit", &[]).await;
        backend.publish(topic, b"marker").await;
    }
    assert_eq!(
        subscriber.next_publish().await,
        (topic.to_owned(), b"marker".to_vec())
    );
}

#[tokio::test]
async fn publishing_to_another_devices_telemetry_disconnects_and_is_not_delivered() {
    publishing_is_refused("devices/b/telemetry", false).await;
}

#[tokio::test]
async fn publishing_to_another_devices_telemetry_after_its_own_disconnects() {
    publishing_is_refused_after(
        &["devices/a/telemetry", "devices/a/telemetry"],
        "devices/b/telemetry",
        false,
    )
    .await;
}

#[tokio::test]
async fn publishing_to_another_devices_led_disconnects_and_is_not_delivered() {
    publishing_is_refused("devices/b/led", true).await;
}

#[tokio::test]
async fn publishing_outside_devices_disconnects_and_is_not_delivered() {
    publishing_is_refused("other/topic", false).await;
}

#[tokio::test]
async fn publishing_to_its_own_down_topic_disconnects() {
    publishing_is_refused("devices/a/led", false).await;
}

#[tokio::test]
async fn a_will_on_another_devices_status_is_refused_and_never_published() {
    let app = TestApp::start().await;
    let mut backend = app.backend("status", &["devices/+/status"]).await;
    backend.wait_suback().await;

    let connect = raw_connect("a", "a", "token-a", Some("devices/b/status"));
    let (mut socket, connack) = raw_session(app.plain, &connect).await;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x05]);
    a_is_disconnected_for(&app, AclAction::Will, "devices/b/status").await;
    wait_eof(&mut socket).await;
    let _ = socket.shutdown().await;

    let b = Client::connect(app.device_plain("b", "token-b"))
        .await
        .unwrap();
    b.publish("devices/b/status", b"marker").await;
    assert_eq!(
        backend.next_publish().await,
        ("devices/b/status".to_owned(), b"marker".to_vec())
    );
}
