//! The fleet tool against the real broker, with a backend double that answers persona presses
//! and talk sessions, which also counts the telemetry that reached the router. Checks
//! that the counts are honest: everything sent is acknowledged and observed.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use companion_agent::fleet::{run_with, FleetArgs, FleetStats};
use companion_broker::LocalEvent;
use companion_schema::{
    decode, encode, AudioChunk, ButtonEvent, Codec, PersonaId, PersonaState, SessionAction,
    SessionControl, Topic, TopicKind,
};
use serde_bytes::ByteBuf;

/// Answers every persona press with a `PersonaState` and every `stop` with one audio chunk,
/// and counts the telemetry that reached the router (the observer, in process).
async fn backend_double(broker: &TestBroker) -> Arc<AtomicU64> {
    let mut client = broker.handle.local_client("fleet-double").await.unwrap();
    client
        .subscribe(&[
            &TopicKind::Button.all_devices_filter(),
            &TopicKind::SessionUp.all_devices_filter(),
            &TopicKind::Telemetry.all_devices_filter(),
        ])
        .await
        .unwrap();
    loop {
        if let Ok(LocalEvent::SubAck) = client.next().await {
            break;
        }
    }
    let observed = Arc::new(AtomicU64::new(0));
    let counter = observed.clone();
    tokio::spawn(async move {
        loop {
            let Ok(LocalEvent::Publish { topic, payload, .. }) = client.next().await else {
                return;
            };
            let Ok(t) = Topic::parse(&String::from_utf8_lossy(&topic)) else {
                continue;
            };
            let (kind, payload) = match t.kind {
                TopicKind::Button => {
                    let Ok(_b) = decode::<ButtonEvent>(&payload) else {
                        continue;
                    };
                    let state = PersonaState {
                        v: 1,
                        persona_id: PersonaId::parse("robot").unwrap(),
                        name: "Robot".into(),
                        color: [1, 2, 3],
                        voice: "v".into(),
                        switched_at_ms: 0,
                        trigger: "button".into(),
                    };
                    (TopicKind::Persona, encode(&state).unwrap())
                }
                TopicKind::SessionUp => {
                    let Ok(c) = decode::<SessionControl>(&payload) else {
                        continue;
                    };
                    if c.action != SessionAction::Stop {
                        continue;
                    }
                    let chunk = AudioChunk {
                        v: 1,
                        session_id: c.session_id,
                        seq: 0,
                        ts_ms: 0,
                        codec: Codec::Opus,
                        sample_rate: 16_000,
                        frame_ms: 20,
                        frames: vec![ByteBuf::from(vec![0xf8, 0xff, 0xfe])],
                        last: true,
                    };
                    (TopicKind::AudioDown, encode(&chunk).unwrap())
                }
                TopicKind::Telemetry => {
                    counter.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                _ => continue,
            };
            let topic = Topic::new(t.device, kind).to_string();
            if client.publish(topic, payload, false).await.is_err() {
                return;
            }
        }
    });
    observed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_counts_what_really_arrived_and_reports_percentiles() {
    let devices: Vec<(String, String)> = (0..6)
        .map(|i| (format!("fleet-{i}"), format!("token-{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = devices
        .iter()
        .map(|(d, t)| (d.as_str(), t.as_str()))
        .collect();
    let broker = TestBroker::start(&refs).await;
    let observed = backend_double(&broker).await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds.csv");
    let text: String = devices.iter().map(|(d, t)| format!("{d},{t}\n")).collect();
    std::fs::write(&creds, format!("# device_id,token\n{text}")).unwrap();
    let args = FleetArgs {
        devices: 5,
        telemetry_interval_ms: 100,
        talkers: 2,
        duration: 3,
        credentials: creds,
        url: format!("mqtts://localhost:{}", broker.tls.port()),
        ca_cert: Some(broker.ca_pem.clone()),
        persona_every_s: 1,
        ramp_s: 0,
        talk_s: 1,
        observe_addr: None,
        observe_user: None,
        observe_pass: None,
        quiet: true,
    };
    let stats = Arc::new(FleetStats::default());
    let report = tokio::time::timeout(Duration::from_secs(30), run_with(args, stats.clone()))
        .await
        .expect("the run ends by itself")
        .unwrap();
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    assert_eq!(g(&stats.connected), 5, "{report}");
    assert_eq!(g(&stats.connect_errors), 0, "{report}");
    let sent = g(&stats.telemetry_sent);
    assert!(sent >= 5 * 20, "{report}");
    assert_eq!(g(&stats.telemetry_acked), sent, "{report}");
    // Everything acknowledged reached the router's subscriber.
    tokio::time::timeout(Duration::from_secs(10), async {
        while g(&observed) < sent {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("observed {} of {sent}: {report}", g(&observed)));
    assert_eq!(g(&observed), sent, "{report}");
    assert!(g(&stats.buttons_sent) >= 5, "{report}");
    assert_eq!(
        g(&stats.persona_received),
        g(&stats.buttons_sent),
        "{report}"
    );
    assert!(g(&stats.replies) >= 2, "{report}");
    assert_eq!(g(&stats.replies), g(&stats.sessions_started), "{report}");
    assert!(
        report.contains("p99") && report.contains("persona switch round trip"),
        "{report}"
    );
    let connects = stats.connect.lock().unwrap().len();
    assert_eq!(
        connects,
        g(&stats.connected),
        "one connect time per connection: {report}"
    );
}

#[test]
fn a_bad_credentials_line_is_reported_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.csv");
    std::fs::write(&p, "pi-1,tok\n\nnot a line\n").unwrap();
    let err = companion_agent::fleet::read_credentials(&p)
        .unwrap_err()
        .to_string();
    assert!(err.ends_with(":3: expected `device_id,token`"), "{err}");
}
