//! Kicking, takeover and shutdown.

mod common;

use std::time::Duration;

use common::*;
use companion_broker::{BrokerEvent, DisconnectReason};
use companion_schema::DeviceId;

#[tokio::test]
async fn kick_disconnects_the_device_within_one_second() {
    let app = TestApp::start().await;
    let mut device = Client::connect(app.device_tls("a", "token-a"))
        .await
        .unwrap();
    app.events
        .wait_for(|e| matches!(e, BrokerEvent::Connected { .. }))
        .await;
    let a = DeviceId::parse("a").unwrap();
    assert!(app.handle.kick(&a));
    app.events
        .wait_for_within(Duration::from_secs(1), |e| {
            matches!(
                e,
                BrokerEvent::Disconnected {
                    reason: DisconnectReason::Kicked,
                    ..
                }
            )
        })
        .await;
    device.wait_closed().await;
    assert_eq!(app.handle.connected_devices(), 0);
    assert!(!app.handle.kick(&DeviceId::parse("b").unwrap()));
}

#[tokio::test]
async fn a_second_connection_with_the_same_id_takes_over_the_first() {
    let app = TestApp::start().await;
    let mut backend = app.backend("t", &["devices/+/telemetry"]).await;
    backend.wait_suback().await;
    let mut first = Client::connect(app.device_plain("a", "token-a"))
        .await
        .unwrap();
    let second = Client::connect(app.device_tls("a", "token-a"))
        .await
        .unwrap();
    app.events
        .wait_for(|e| {
            matches!(
                e,
                BrokerEvent::Disconnected {
                    reason: DisconnectReason::Takeover,
                    ..
                }
            )
        })
        .await;
    first.wait_closed().await;

    second.publish("devices/a/telemetry", b"still here").await;
    assert_eq!(backend.next_publish().await.1, b"still here".to_vec());
    assert_eq!(app.handle.connected_devices(), 1);
}

#[tokio::test]
async fn cancelling_shutdown_closes_listeners_and_live_connections() {
    let app = TestApp::start().await;
    let mut device = Client::connect(app.device_plain("a", "token-a"))
        .await
        .unwrap();
    app.events
        .wait_for(|e| matches!(e, BrokerEvent::Connected { .. }))
        .await;

    app.shutdown.cancel();
    app.events
        .wait_for(|e| {
            matches!(
                e,
                BrokerEvent::Disconnected {
                    reason: DisconnectReason::ServerShutdown,
                    ..
                }
            )
        })
        .await;
    device.wait_closed().await;
    app.tracker.close();
    tokio::time::timeout(DEADLINE, app.tracker.wait())
        .await
        .expect("every task ends");
    assert!(!app.handle.is_up());
    assert!(tokio::net::TcpStream::connect(app.plain).await.is_err());
    assert!(tokio::net::TcpStream::connect(app.tls).await.is_err());
}
