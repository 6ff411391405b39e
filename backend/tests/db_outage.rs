//! PostgreSQL goes away for 30 s mid-run (a proxy the test controls closes every database
//! connection and refuses new ones) and comes back. Meanwhile: `/ready` says 503, connected
//! devices stay connected and keep their personas, a device the server has not seen lately is
//! refused clearly, a device that reconnects at once gets in on the short credential cache,
//! telemetry is held unacknowledged (the device keeps it) and counted — never acknowledged
//! and dropped — and the admin API answers 503. Afterwards everything recovers by itself:
//! every held message is stored and acknowledged, presence is right, the refused device gets
//! in. `OUTAGE_S` shortens the outage when debugging.

mod common;

use std::time::{Duration, Instant};

use common::app::{Client, DbKind, Seen, TestApp};
use common::device::{metric, Device};
use common::proxy::TcpProxy;
use companion_backend::settings::Secret;
use companion_schema::*;
use reqwest::Method;
use serde_json::{json, Value};

const RECOVERY: Duration = Duration::from_secs(20);

fn telemetry(seq: u64) -> Vec<u8> {
    encode(&Telemetry {
        v: 1,
        seq,
        ts_ms: seq,
        uptime_s: seq,
        battery_pct: Some(80.0),
        cpu_temp_c: None,
        rssi_dbm: None,
        free_mem_kb: None,
        extra: Default::default(),
    })
    .unwrap()
}

async fn ready_status(app: &TestApp) -> u16 {
    app.client
        .get(app.url("/ready"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls until `f` holds or `limit` passes.
async fn within<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Packet ids acknowledged so far (drains what arrived); panics if the connection closed.
fn acks(client: &mut Client, into: &mut Vec<u16>) {
    while let Ok(seen) = client.rx.try_recv() {
        match seen {
            Seen::PubAck(id) => into.push(id),
            Seen::Closed(e) => panic!("the publishing device was disconnected: {e}"),
            _ => {}
        }
    }
}

async fn device_json(app: &TestApp, id: &str) -> Value {
    app.admin(Method::GET, &format!("/api/v1/devices/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_for_30_s() {
    let Some(url) = common::fresh_pg_database().await else {
        return;
    };
    let outage = Duration::from_secs(
        std::env::var("OUTAGE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    // postgres://user:pass@host:port/db → the same through the proxy.
    let (creds, rest) = url.split_once('@').unwrap();
    let (host_port, db) = rest.split_once('/').unwrap();
    let target = tokio::net::lookup_host(host_port)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = TcpProxy::start(target).await;
    let proxied = format!("{creds}@{}/{db}", proxy.addr);
    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        s.database.url = Some(Secret::new(proxied));
    })
    .await
    .unwrap();

    // Before: a device with a persona of its own, a publisher, one that will leave and one
    // that will come back during the outage, and one registered but never connected.
    let mut steady = Device::register(&app, "steady").await;
    let resp = app
        .admin(
            Method::PUT,
            &format!("/api/v1/devices/{}/persona", steady.id),
        )
        .json(&json!({ "persona_id": "pip" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    while steady.next_persona().await.persona_id.as_str() != "pip" {}
    let (pub_id, pub_token) = app.register("publisher").await;
    let mut publisher = Client::connect(app.device_tls(&pub_id, &pub_token))
        .await
        .unwrap();
    let topic = Topic::new(DeviceId::parse(&pub_id).unwrap(), TopicKind::Telemetry).to_string();
    let leaver = Device::register(&app, "leaver").await;
    let returner = Device::register(&app, "returner").await;
    let (new_id, new_token) = app.register("newcomer").await;
    // rumqttc numbers QoS 1 publishes 1, 2, … in order: packet id = seq.
    let mut acked = Vec::new();
    for seq in 1..=3 {
        publisher.publish(&topic, &telemetry(seq)).await;
    }
    within("the first telemetry is acknowledged", RECOVERY, || {
        acks(&mut publisher, &mut acked);
        let n = acked.len();
        async move { n == 3 }
    })
    .await;
    assert_eq!(ready_status(&app).await, 200);

    // The database goes away.
    proxy.cut();
    let cut_at = Instant::now();
    within("/ready says 503", RECOVERY, || async {
        ready_status(&app).await == 503
    })
    .await;
    let noticed = cut_at.elapsed();

    // The admin API answers 503 "unavailable", not 500.
    let resp = app
        .admin(Method::GET, &format!("/api/v1/devices/{}", steady.id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "{:?}", resp.text().await);

    // A device that reconnects at once gets in on the cached credential; one the server has
    // not seen is refused within the authentication timeout.
    leaver.client.client.disconnect().await.unwrap();
    returner.client.client.disconnect().await.unwrap();
    let (returner_id, returner_token) = (returner.id.clone(), returner.token.clone());
    drop(returner);
    let returner = Device::connect(&app, &returner_id, &returner_token).await;
    let started = Instant::now();
    let refused = Client::connect(app.device_tls(&new_id, &new_token)).await;
    // "Server unavailable", not "not authorized": the device's token is fine, and it retries.
    assert!(
        matches!(
            refused,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::ServiceUnavailable
            ))
        ),
        "an unverifiable device: {:?}",
        refused.as_ref().err()
    );
    let refusal_took = started.elapsed();
    assert!(
        refusal_took < Duration::from_secs(5),
        "refusal took {refusal_took:?}"
    );

    // A persona press cannot be stored: the device keeps the persona it has.
    steady.press(1, "persona", ButtonAction::Press).await;

    // Telemetry during the outage: held, not acknowledged, counted.
    let mut seq = 3;
    while cut_at.elapsed() < outage {
        seq += 1;
        publisher.publish(&topic, &telemetry(seq)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        acks(&mut publisher, &mut acked);
    }
    let last = seq;
    assert_eq!(
        acked,
        vec![1, 2, 3],
        "telemetry acknowledged while it could not be stored"
    );
    assert!(
        metric(&app, "backend_telemetry_unstored").await >= 1.0,
        "held telemetry is visible on /metrics"
    );
    // The newcomer's refusal could not be audited yet: kept in memory, visible.
    assert!(
        metric(&app, "backend_audit_unwritten").await >= 1.0,
        "audit records kept during the outage are visible on /metrics"
    );

    // The database comes back: everything recovers by itself.
    proxy.restore();
    let restored_at = Instant::now();
    let restored_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    within("/ready says 200", RECOVERY, || async {
        ready_status(&app).await == 200
    })
    .await;
    within("every held message is acknowledged", RECOVERY, || {
        acks(&mut publisher, &mut acked);
        let n = acked.len() as u64;
        async move { n == last }
    })
    .await;
    let recovered = restored_at.elapsed();
    eprintln!(
        "outage {outage:?}: /ready 503 after {noticed:?}; newcomer refused in {refusal_took:?}; \
         {} held messages stored and acknowledged {recovered:?} after the database returned",
        last - 3
    );
    let stored = device_json(&app, &pub_id).await;
    assert_eq!(stored["telemetry"]["seq"], json!(last), "{stored}");
    assert_eq!(metric(&app, "telemetry_gaps_total").await, 0.0);
    assert_eq!(metric(&app, "broker_messages_lost_total").await, 0.0);

    // The steady device was never disconnected and kept its persona.
    let got = device_json(&app, &steady.id).await;
    assert_eq!(got["persona"]["persona_id"], "pip", "{got}");
    assert_eq!(got["presence"]["online"], true, "{got}");
    while let Ok(seen) = steady.client.rx.try_recv() {
        if let Seen::Closed(e) = seen {
            panic!("the steady device was disconnected: {e}");
        }
        if let Seen::Publish { topic, payload } = seen {
            if topic.ends_with("/persona") {
                let p: PersonaState = decode(&payload).unwrap();
                assert_eq!(
                    p.persona_id.as_str(),
                    "pip",
                    "persona changed under the device"
                );
            }
        }
    }
    // Presence that could not be written meanwhile is written now: the device that left
    // is offline (it said goodbye), the one that came back is online.
    app.wait_device(&leaver.id, |d| {
        d["presence"]["online"] == false && d["presence"]["last_disconnect_reason"] == "clean"
    })
    .await;
    app.wait_device(&returner.id, |d| d["presence"]["online"] == true)
        .await;
    // The rules and persona path work again: a press switches.
    steady.press(2, "persona", ButtonAction::Press).await;
    let next = steady.next_persona().await;
    assert_ne!(next.persona_id.as_str(), "pip");
    assert_eq!(next.trigger, "rule:persona button cycles persona");
    // The refusal during the outage reached the audit log afterwards, with its own time.
    let refusal = app
        .wait_audit("mqtt.connect", |r| {
            r["target"] == new_id.as_str() && r["detail"] == "unavailable"
        })
        .await;
    assert!(
        refusal["ts_ms"].as_i64().unwrap() < restored_ms,
        "recorded when it happened: {refusal}"
    );
    within("no audit record waits any more", RECOVERY, || async {
        metric(&app, "backend_audit_unwritten").await == 0.0
    })
    .await;
    // The refused device gets in now.
    Client::connect(app.device_tls(&new_id, &new_token))
        .await
        .expect("the newcomer connects once the database is back");
    app.stop().await;
}
