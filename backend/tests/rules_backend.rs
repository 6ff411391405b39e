//! The rule-driven backend end to end: real devices (rumqttc over TLS) through the broker
//! edge, the backend's MQTT intake, rules, personas, telemetry, presence and sessions.

mod common;

use std::time::Duration;

use common::app::{DbKind, TestApp, DEADLINE};
use common::device::{eventually, metric, Device};
use companion_schema::*;
use reqwest::Method;
use rumqttc::QoS;
use serde_json::{json, Value};

async fn personas_switch_by_button_and_rest_and_survive_a_restart(kind: DbKind) {
    let Some(app) = TestApp::start(kind).await else {
        return;
    };
    let mut dev = Device::register(&app, "persona test").await;
    // On connect the backend announces the current (default) persona.
    let first = dev.next_persona().await;
    assert_eq!(first.persona_id.as_str(), "aria");

    dev.press(1, "persona", ButtonAction::Press).await;
    let switched = dev.next_persona().await;
    assert_eq!(switched.persona_id.as_str(), "sage");
    assert_eq!(switched.trigger, "rule:persona button cycles persona");
    let led = loop {
        let led = dev.next_led().await;
        if led.color == switched.color {
            break led;
        }
    };
    assert_eq!(led.pattern, LedPattern::Solid);
    // A release does not switch.
    dev.press(2, "persona", ButtonAction::Release).await;

    // REST switch.
    let resp = app
        .admin(Method::PUT, &format!("/api/v1/devices/{}/persona", dev.id))
        .json(&json!({ "persona_id": "pip" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let by_rest = dev.next_persona().await;
    assert_eq!(
        by_rest.persona_id.as_str(),
        "pip",
        "the release did not switch; REST did"
    );
    assert_eq!(by_rest.trigger, "api");
    let resp = app
        .admin(Method::PUT, &format!("/api/v1/devices/{}/persona", dev.id))
        .json(&json!({ "persona_id": "nobody" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    assert!(app
        .audit("device.persona")
        .await
        .iter()
        .any(|r| r["target"] == dev.id.as_str()));
    let got: Value = app
        .admin(Method::GET, &format!("/api/v1/devices/{}", dev.id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["persona"]["persona_id"], "pip");
    assert!(
        metric(
            &app,
            "persona_switches_total{from_persona=\"aria\",to_persona=\"sage\"}"
        )
        .await
            >= 1.0
    );
    assert!(
        metric(
            &app,
            "persona_switch_latency_seconds_count{persona_id=\"pip\"}"
        )
        .await
            >= 1.0
    );

    // Restart the server; the device reconnects and is told its stored persona.
    let (id, token) = (dev.id.clone(), dev.token.clone());
    drop(dev);
    let (settings, dir) = app.stop().await;
    let app = TestApp::start_settings(settings, dir).await;
    let mut dev = Device::connect(&app, &id, &token).await;
    assert_eq!(dev.next_persona().await.persona_id.as_str(), "pip");
    app.stop().await;
}
on_both_databases!(personas_switch_by_button_and_rest_and_survive_a_restart);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_edits_take_effect_without_restart_and_bad_rules_are_rejected() {
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let mut dev = Device::register(&app, "rules").await;
    let path = app.settings.rules_path();
    let original = std::fs::read_to_string(&path).unwrap();

    // Edit the file: a new rule that blinks green on the "hello" button.
    let edited = format!(
        "{original}\n[[rule]]\nname = \"hello blinks\"\non = \"button\"\nif = 'event.button == \"hello\"'\ndo = [{{ led = {{ pattern = \"blink\", color = \"#00ff00\" }} }}]\n"
    );
    std::fs::write(&path, &edited).unwrap();
    eventually("the edited rules are active", || async {
        let rules: Value = app
            .admin(Method::GET, "/api/v1/rules")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "hello blinks")
    })
    .await;
    dev.press(1, "hello", ButtonAction::Press).await;
    let led = dev.next_led().await;
    assert_eq!((led.pattern, led.color), (LedPattern::Blink, [0, 255, 0]));

    // An invalid rule over REST: rejected with its line; the old rules keep working.
    let bad = format!("{edited}\n[[rule]]\nname = \"broken\"\non = \"button\"\nif = 'event.button =='\ndo = [{{ log = \"x\" }}]\n");
    let resp = app
        .admin(Method::PUT, "/api/v1/rules")
        .header("content-type", "application/toml")
        .body(bad.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["rule"], "broken");
    let expected_line = bad
        .lines()
        .position(|l| l.starts_with("if = 'event.button =='"))
        .unwrap()
        + 1;
    assert_eq!(err["error"]["line"], expected_line);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        edited,
        "a rejected set is not persisted"
    );
    // The same in the file: rejected on reload, old rules still active.
    std::fs::write(&path, &bad).unwrap();
    dev.press(2, "hello", ButtonAction::Press).await;
    let led = dev.next_led().await;
    assert_eq!(led.pattern, LedPattern::Blink);

    // rules/test reports matches and publishes nothing.
    let resp = app
        .admin(Method::POST, "/api/v1/rules/test")
        .json(&json!({ "event": { "kind": "button", "button": "hello", "action": "press" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: Value = resp.json().await.unwrap();
    let matched: Vec<_> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["matched"] == true)
        .map(|r| r["rule"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(matched, ["hello blinks"]);
    // If the test had published, this marker would not be the next LED message.
    let marker = LedCommand {
        v: 1,
        pattern: LedPattern::Spin,
        color: [1, 2, 3],
        brightness: 7,
        duration_ms: None,
    };
    let resp = app
        .admin(Method::PUT, "/api/v1/rules")
        .json(&json!({ "toml": format!("{original}\n[[rule]]\nname = \"marker\"\non = \"button\"\nif = 'event.button == \"marker\"'\ndo = [{{ led = {{ pattern = \"spin\", color = [1, 2, 3], brightness = 7 }} }}]\n") }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    dev.press(3, "marker", ButtonAction::Press).await;
    assert_eq!(dev.next_led().await, marker);
    assert!(!app.audit("rules.replace").await.is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_condition_fires_and_a_failing_action_does_not_stop_the_next_rule() {
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let rules = r#"
[[rule]]
name = "fails first"
on = "telemetry"
do = [{ persona = "named" }]

[[rule]]
name = "low battery"
on = "telemetry"
if = 'has(event.battery_pct) && event.battery_pct < 15.0'
do = [{ led = { pattern = "pulse", color = [255, 160, 0] } }]
"#;
    let resp = app
        .admin(Method::PUT, "/api/v1/rules")
        .body(rules)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut dev = Device::register(&app, "battery").await;
    let t = |seq, battery| Telemetry {
        v: 1,
        seq,
        ts_ms: 0,
        uptime_s: 1,
        battery_pct: Some(battery),
        cpu_temp_c: None,
        rssi_dbm: None,
        free_mem_kb: None,
        extra: Default::default(),
    };
    dev.send(TopicKind::Telemetry, &t(1, 80.0)).await;
    dev.send(TopicKind::Telemetry, &t(2, 9.5)).await;
    let led = loop {
        let led = dev.next_led().await;
        if led.pattern == LedPattern::Pulse {
            break led;
        }
    };
    assert_eq!(led.color, [255, 160, 0]);
    assert!(metric(&app, "rule_failures_total{rule=\"fails first\"}").await >= 2.0);
    assert_eq!(
        metric(&app, "rule_matches_total{rule=\"low battery\"}").await,
        1.0
    );
    app.stop().await;
}

async fn telemetry_gaps_and_duplicates_are_counted_and_latest_values_shown(kind: DbKind) {
    let Some(app) = TestApp::start(kind).await else {
        return;
    };
    let dev = Device::register(&app, "telemetry").await;
    for seq in [1u64, 2, 2, 5, 4] {
        dev.send(
            TopicKind::Telemetry,
            &Telemetry {
                v: 1,
                seq,
                ts_ms: seq * 1000,
                uptime_s: seq,
                battery_pct: Some(50.0),
                cpu_temp_c: Some(41.5),
                rssi_dbm: Some(-60),
                free_mem_kb: Some(1000),
                extra: [("fan_rpm".to_string(), 1200.0)].into(),
            },
        )
        .await;
    }
    let url = format!("/api/v1/devices/{}", dev.id);
    eventually("latest telemetry is seq 5", || async {
        let got: Value = app
            .admin(Method::GET, &url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        got["telemetry"]["seq"] == 5
    })
    .await;
    let got: Value = app
        .admin(Method::GET, &url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["telemetry"]["cpu_temp_c"], 41.5);
    assert_eq!(got["telemetry"]["extra"]["fan_rpm"], 1200.0);
    assert_eq!(
        metric(&app, "telemetry_duplicates_total").await,
        2.0,
        "2 again and 4 after 5"
    );
    assert_eq!(
        metric(&app, "telemetry_gaps_total").await,
        2.0,
        "3 and 4 missing before 5"
    );
    app.stop().await;
}
on_both_databases!(telemetry_gaps_and_duplicates_are_counted_and_latest_values_shown);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_shows_connects_and_disconnect_reasons() {
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let mut dev = Device::register(&app, "presence").await;
    let url = format!("/api/v1/devices/{}", dev.id);
    eventually("online", || async {
        let got: Value = app
            .admin(Method::GET, &url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        got["presence"]["online"] == true && got["presence"]["connected_since_ms"].is_i64()
    })
    .await;
    assert!(app
        .app_ctx
        .broker
        .as_ref()
        .unwrap()
        .kick(&DeviceId::parse(&dev.id).unwrap()));
    dev.client.wait_closed_within(Duration::from_secs(1)).await;
    eventually("offline, kicked", || async {
        let got: Value = app
            .admin(Method::GET, &url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        got["presence"]["online"] == false && got["presence"]["last_disconnect_reason"] == "kicked"
    })
    .await;
    let dev = Device::connect(&app, &dev.id, &dev.token).await;
    dev.client.client.disconnect().await.unwrap();
    eventually("offline, clean", || async {
        let got: Value = app
            .admin(Method::GET, &url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        got["presence"]["last_disconnect_reason"] == "clean"
    })
    .await;
    let offline: Value = app
        .admin(Method::GET, "/api/v1/devices?online=false")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(offline["devices"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_transitions_are_published_for_start_stop_cancel_and_timeout() {
    let app = TestApp::start_with(DbKind::Sqlite, |s| s.sessions.max_listen_ms = 400)
        .await
        .unwrap();
    let mut dev = Device::register(&app, "sessions").await;
    let sid = |s: &str| SessionId::parse(s).unwrap();
    let control = |id: &str, action| SessionControl {
        v: 1,
        session_id: sid(id),
        action,
        reason: None,
    };

    // start → listening; cancel → idle (cancelled).
    dev.send(TopicKind::SessionUp, &control("one", SessionAction::Start))
        .await;
    let ev = dev.next_session().await;
    assert_eq!(
        (ev.session_id.as_str(), ev.state),
        ("one", SessionState::Listening)
    );
    dev.send(TopicKind::SessionUp, &control("one", SessionAction::Cancel))
        .await;
    let ev = dev.next_session().await;
    assert_eq!(ev.state, SessionState::Idle);
    assert_eq!(ev.error.as_deref(), Some("cancelled"));

    // start → stop: listening → thinking → (no audio) error → idle.
    dev.send(TopicKind::SessionUp, &control("two", SessionAction::Start))
        .await;
    assert_eq!(dev.next_session().await.state, SessionState::Listening);
    dev.send(TopicKind::SessionUp, &control("two", SessionAction::Stop))
        .await;
    let states: Vec<_> = [
        dev.next_session().await,
        dev.next_session().await,
        dev.next_session().await,
    ]
    .iter()
    .map(|e| e.state)
    .collect();
    assert_eq!(
        states,
        [
            SessionState::Thinking,
            SessionState::Error,
            SessionState::Idle
        ]
    );

    // The listening limit ends listening by itself.
    dev.send(
        TopicKind::SessionUp,
        &control("three", SessionAction::Start),
    )
    .await;
    assert_eq!(dev.next_session().await.state, SessionState::Listening);
    let ev = dev.next_session().await;
    assert_eq!(
        (ev.session_id.as_str(), ev.state),
        ("three", SessionState::Thinking)
    );
    assert_eq!(dev.next_session().await.state, SessionState::Error);
    assert_eq!(dev.next_session().await.state, SessionState::Idle);

    // The talk button drives a session through the shipped rules.
    dev.press(1, "talk", ButtonAction::Press).await;
    assert_eq!(dev.next_session().await.state, SessionState::Listening);
    dev.press(2, "talk", ButtonAction::Release).await;
    assert_eq!(dev.next_session().await.state, SessionState::Thinking);
    assert_eq!(
        metric(&app, "active_sessions").await,
        0.0,
        "no active session label per device, back to zero"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sending_garbage_is_counted_and_does_not_disturb_others() {
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let bad = Device::register(&app, "garbage").await;
    let mut good = Device::register(&app, "good").await;
    assert_eq!(good.next_persona().await.persona_id.as_str(), "aria");
    // 30 messages: within the edge's per-device burst, so all of them reach the backend.
    for i in 0..15u8 {
        bad.client
            .client
            .publish(
                bad.topic(TopicKind::Telemetry),
                QoS::AtLeastOnce,
                false,
                vec![0xc1, i, 0xff],
            )
            .await
            .unwrap();
        bad.client
            .client
            .publish(
                bad.topic(TopicKind::Button),
                QoS::AtLeastOnce,
                false,
                b"not msgpack".to_vec(),
            )
            .await
            .unwrap();
    }
    good.press(1, "persona", ButtonAction::Press).await;
    assert_eq!(good.next_persona().await.persona_id.as_str(), "sage");
    eventually("garbage counted", || async {
        metric(&app, "backend_messages_invalid_total{kind=\"telemetry\"}").await == 15.0
            && metric(&app, "backend_messages_invalid_total{kind=\"button\"}").await == 15.0
    })
    .await;
    app.stop().await;
}

/// With the embedded broker a PUBACK means "stored": the moment the device sees it, the row
/// with that sequence number (or a later one) is in the database. A crash after the PUBACK
/// cannot lose it; before the PUBACK the device still holds it.
async fn telemetry_is_acknowledged_only_once_stored(kind: DbKind) {
    let Some(app) = TestApp::start(kind).await else {
        return;
    };
    let (id, token) = app.register("durable").await;
    let (client, mut el) = rumqttc::AsyncClient::new(app.device_tls(&id, &token), 64);
    let topic = Topic::new(DeviceId::parse(&id).unwrap(), TopicKind::Telemetry).to_string();
    const N: u64 = 30;
    for seq in 1..=N {
        let t = Telemetry {
            v: 1,
            seq,
            ts_ms: seq,
            uptime_s: seq,
            battery_pct: None,
            cpu_temp_c: None,
            rssi_dbm: None,
            free_mem_kb: None,
            extra: Default::default(),
        };
        client
            .publish(
                &topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                encode(&t).unwrap(),
            )
            .await
            .unwrap();
    }
    // rumqttc numbers the publishes 1.. in the order they were queued: packet id = seq.
    let mut acked = 0;
    tokio::time::timeout(DEADLINE, async {
        while acked < N {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack)) =
                el.poll().await.expect("connection stays up")
            {
                let seq = u64::from(ack.pkid);
                let stored: Option<i64> =
                    sqlx::query_scalar("SELECT seq FROM telemetry_latest WHERE device_id = $1")
                        .bind(&id)
                        .fetch_optional(app.app_ctx.db.pool())
                        .await
                        .unwrap();
                let stored = stored.unwrap_or(0) as u64;
                assert!(
                    stored >= seq,
                    "PUBACK for seq {seq} but the database holds {stored}"
                );
                acked += 1;
            }
        }
    })
    .await
    .expect("every publish acknowledged");
    assert_eq!(metric(&app, "broker_messages_lost_total").await, 0.0);
    app.stop().await;
}
on_both_databases!(telemetry_is_acknowledged_only_once_stored);
