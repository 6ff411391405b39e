//! Devices on a real RabbitMQ (Debian's 3.10, `rabbitmq_mqtt` + `rabbitmq_auth_backend_http`)
//! authenticated and confined by companion's hooks, with the backend behind the same broker
//! (`mqtt.upstream`, plain subscriptions: RabbitMQ 3.x has no `$share`).

mod common;

use std::time::{Duration, Instant};

use common::app::{Client, DbKind, Seen, TestApp};
use common::proxy::TcpProxy;
use common::rabbitmq::{self, mosquitto_pub, RabbitMq};
use companion_backend::settings::{BrokerApiKind, Secret};
use companion_broker::settings::Redacted;
use companion_schema::*;
use reqwest::Method;
use rumqttc::{MqttOptions, QoS};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_rabbitmq_are_authenticated_and_confined_by_companion() {
    if !rabbitmq::available() {
        return;
    }
    // Each needs the other's port: RabbitMQ's MQTT port is chosen first, the backend keeps
    // retrying it until the node is up.
    let mqtt_port = RabbitMq::free_port();
    let management_port = RabbitMq::free_port();
    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        // The test polls the admin API (presence, audit) more than 100 times a minute.
        s.http.rate_limit_per_minute = 100_000;
        s.mqtt_hook.broker_api = BrokerApiKind::Rabbitmq;
        s.mqtt_hook.broker_api_url = format!("http://127.0.0.1:{management_port}");
        s.mqtt_hook.broker_api_username = rabbitmq::BACKEND_USER.into();
        s.mqtt_hook.broker_api_password = Some(Secret::new(rabbitmq::BACKEND_PASS));
        s.mqtt_hook.allow_from =
            companion_broker::proxy::Networks::parse(&["127.0.0.1/32"]).unwrap();
        s.mqtt.upstream = format!("mqtt://127.0.0.1:{mqtt_port}");
        s.mqtt.upstream_username = rabbitmq::BACKEND_USER.into();
        s.mqtt.upstream_password = Some(Redacted(rabbitmq::BACKEND_PASS.into()));
        s.mqtt.upstream_shared = false;
    })
    .await
    .unwrap();
    assert!(app.app_ctx.broker.is_none(), "the embedded broker is off");
    let booting = Instant::now();
    // Devices dial RabbitMQ over TLS with companion's certificate, as in ops/.
    let tls_port = RabbitMq::free_port();
    let tls_dir = app.ca_pem.parent().unwrap().to_owned();
    let broker = RabbitMq::start(
        &format!("http://{}", app.http),
        mqtt_port,
        management_port,
        Some((tls_port, &tls_dir)),
    )
    .await;
    eprintln!("RabbitMQ up in {:.1?}", booting.elapsed());
    let (id, token) = app.register("rabbit").await;
    let (other, other_token) = app.register("rabbit-other").await;
    let device = DeviceId::parse(&id).unwrap();

    // A real device (rumqttc, MQTT 3.1.1 over TLS) with its token: the persona button works
    // end to end through RabbitMQ and the backend.
    let mut dev = Client::connect(common::device_tls_options(
        &app.ca_pem,
        tls_port,
        &id,
        &token,
    ))
    .await
    .unwrap_or_else(|e| panic!("the device connects: {e}\n{}", broker.output()));
    dev.client
        .subscribe(
            Topic::new(device.clone(), TopicKind::Persona).to_string(),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let started = Instant::now();
    let state = dev
        .press_until_persona(&device, Duration::from_secs(30))
        .await;
    eprintln!(
        "first persona answer through RabbitMQ after {:.1?}",
        started.elapsed()
    );
    assert_ne!(
        state.persona_id.as_str(),
        "aria",
        "switched away from the default"
    );

    // Presence follows the device's status (retained) and its Last Will: the device connects
    // through a proxy the test cuts, so RabbitMQ sees the connection die and publishes the
    // Will.
    let proxy = TcpProxy::start(([127, 0, 0, 1], mqtt_port).into()).await;
    let (watched, watched_token) = app.register("rabbit-presence").await;
    let watched_dev = DeviceId::parse(&watched).unwrap();
    let status_topic = Topic::new(watched_dev.clone(), TopicKind::Status).to_string();
    let status = |online: bool| Status {
        v: 1,
        online,
        agent_version: "test".into(),
        boot_id: "boot-1".into(),
        ts_ms: 0,
    };
    let mut opts = MqttOptions::new(watched.clone(), "127.0.0.1", proxy.addr.port());
    opts.set_credentials(watched.clone(), watched_token.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_last_will(rumqttc::LastWill::new(
        status_topic.clone(),
        encode(&status(false)).unwrap(),
        QoS::AtLeastOnce,
        true,
    ));
    let watcher = Client::connect(opts)
        .await
        .expect("connects through the proxy");
    watcher
        .client
        .publish(
            status_topic.clone(),
            QoS::AtLeastOnce,
            true,
            encode(&status(true)).unwrap(),
        )
        .await
        .unwrap();
    let online = app
        .wait_device(&watched, |d| d["presence"]["online"] == true)
        .await;
    assert_eq!(online["presence"]["peer"], Value::Null, "{online}");
    let cut = Instant::now();
    proxy.cut();
    let offline = app
        .wait_device(&watched, |d| d["presence"]["online"] == false)
        .await;
    eprintln!("offline {:.1?} after the cut (Last Will)", cut.elapsed());
    assert_eq!(
        offline["presence"]["last_disconnect_reason"], "reported_offline",
        "{offline}"
    );
    drop(watcher);

    // The other device's topics are out of reach: RabbitMQ closes the publisher.
    let foreign = format!("devices/{other}/telemetry");
    let (code, out) = mosquitto_pub(mqtt_port, &id, &token, &foreign).await;
    assert_ne!(code, 0, "publishing to {foreign} must fail: {out}");
    app.wait_audit("mqtt.acl", |r| {
        r["detail"] == format!("publish {foreign} (external broker)").as_str()
    })
    .await;
    // Its own topic is fine (the payload is not telemetry; the backend drops it, that is not
    // the broker's business).
    let own = format!("devices/{id}/telemetry");
    let (code, out) = mosquitto_pub(mqtt_port, &id, &token, &own).await;
    assert_eq!(code, 0, "{out}");
    // Someone else's client id with this device's credentials, and a wrong token: refused.
    let (code, out) = mosquitto_pub(mqtt_port, &other, &token, &own).await;
    assert_ne!(code, 0, "{out}");
    let (code, out) = mosquitto_pub(mqtt_port, &id, &other_token, &own).await;
    assert_ne!(code, 0, "{out}");
    app.wait_audit("mqtt.connect", |r| {
        r["target"] == id.as_str() && r["detail"] == "bad_token (external broker)"
    })
    .await;

    // Rotation: the live connection is closed through the management API, the old token stops
    // at once, the new one works.
    drop(dev);
    let mut opts = MqttOptions::new(id.clone(), "127.0.0.1", mqtt_port);
    opts.set_credentials(id.clone(), token.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    let mut dev = Client::connect(opts).await.expect("the device reconnects");
    let rotating = Instant::now();
    let resp = app
        .admin(Method::POST, &format!("/api/v1/devices/{id}/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rotated: Value = resp.json().await.unwrap();
    let new_token = rotated["auth_token"].as_str().unwrap().to_owned();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match dev.rx.recv().await {
                Some(Seen::Closed(e)) => return e,
                None => panic!("the client task ended without an error"),
                _ => {}
            }
        }
    })
    .await
    .expect("the rotated device's live connection is closed");
    eprintln!(
        "live connection closed {:.1?} after the rotation request ({closed})",
        rotating.elapsed()
    );
    app.wait_audit("device.token.rotate", |r| {
        r["target"] == id.as_str() && r["detail"] == "kicked"
    })
    .await;
    let (code, out) = mosquitto_pub(mqtt_port, &id, &token, &own).await;
    assert_ne!(code, 0, "the old token must be refused: {out}");
    let (code, out) = mosquitto_pub(mqtt_port, &id, &new_token, &own).await;
    assert_eq!(code, 0, "{out}");

    // The hooks answered all of it.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "backend_mqtt_hook_decisions_total{check=\"login\",result=\"allow\"}",
        "backend_mqtt_hook_decisions_total{check=\"login\",result=\"deny\"}",
        "backend_mqtt_hook_decisions_total{check=\"acl\",result=\"deny\"}",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    app.stop().await;
    drop(broker);
}

/// Two RabbitMQ nodes in one cluster, both authenticating through companion: a device on the
/// second node is served by the backend connected to the first (messages cross the cluster),
/// and the second node enforces the same ACL through the hooks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_rabbitmq_cluster_serves_devices_on_either_node() {
    if !rabbitmq::available() {
        return;
    }
    let (port1, port2) = (RabbitMq::free_port(), RabbitMq::free_port());
    let Some(app) = TestApp::start_with(DbKind::Postgres, |s| {
        s.http.rate_limit_per_minute = 100_000;
        s.mqtt_hook.allow_from =
            companion_broker::proxy::Networks::parse(&["127.0.0.1/32"]).unwrap();
        s.mqtt.upstream = format!("mqtt://127.0.0.1:{port1}");
        s.mqtt.upstream_username = rabbitmq::BACKEND_USER.into();
        s.mqtt.upstream_password = Some(Redacted(rabbitmq::BACKEND_PASS.into()));
        s.mqtt.upstream_shared = false;
    })
    .await
    else {
        return;
    };
    let hook = format!("http://{}", app.http);
    let booting = Instant::now();
    let node1 = RabbitMq::start(&hook, port1, RabbitMq::free_port(), None).await;
    let node2 = RabbitMq::join(&node1, &hook, port2).await;
    eprintln!("two-node cluster up in {:.1?}", booting.elapsed());

    let mut served = Vec::new();
    for (name, port) in [("on-node-1", port1), ("on-node-2", port2)] {
        let (id, token) = app.register(name).await;
        let device = DeviceId::parse(&id).unwrap();
        let mut opts = MqttOptions::new(id.clone(), "127.0.0.1", port);
        opts.set_credentials(id.clone(), token.clone());
        opts.set_keep_alive(Duration::from_secs(30));
        let mut dev = Client::connect(opts)
            .await
            .unwrap_or_else(|e| panic!("{name} connects: {e}\n{}", node2.output()));
        dev.client
            .subscribe(
                Topic::new(device.clone(), TopicKind::Persona).to_string(),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        let started = Instant::now();
        let state = dev
            .press_until_persona(&device, Duration::from_secs(30))
            .await;
        eprintln!("{name}: persona answer after {:.1?}", started.elapsed());
        assert_ne!(state.persona_id.as_str(), "aria");
        served.push((id, token, dev));
    }
    // The device on node 2 cannot reach the one on node 1.
    let (id2, token2, _) = &served[1];
    let foreign = format!("devices/{}/telemetry", served[0].0);
    let (code, out) = mosquitto_pub(port2, id2, token2, &foreign).await;
    assert_ne!(
        code, 0,
        "publishing to {foreign} through node 2 must fail: {out}"
    );
    app.wait_audit("mqtt.acl", |r| {
        r["detail"] == format!("publish {foreign} (external broker)").as_str()
    })
    .await;
    drop(served);
    app.stop().await;
    drop(node2);
    drop(node1);
}
