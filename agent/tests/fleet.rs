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
        reconnect_every_s: 0,
        reload_credentials_s: 0,
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

/// Fleet arguments for `n` devices from `creds` against the test broker's TLS listener.
fn churn_args(broker: &TestBroker, creds: std::path::PathBuf, n: usize, secs: u64) -> FleetArgs {
    FleetArgs {
        devices: n,
        telemetry_interval_ms: 100,
        talkers: 0,
        duration: secs,
        credentials: creds,
        url: format!("mqtts://localhost:{}", broker.tls.port()),
        ca_cert: Some(broker.ca_pem.clone()),
        persona_every_s: 0,
        ramp_s: 0,
        talk_s: 1,
        observe_addr: None,
        observe_user: None,
        observe_pass: None,
        quiet: true,
        reconnect_every_s: 0,
        reload_credentials_s: 0,
    }
}

fn write_credentials(path: &std::path::Path, devices: &[(String, String)]) {
    let text: String = devices.iter().map(|(d, t)| format!("{d},{t}\n")).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_reconnect_by_themselves_lose_nothing_acknowledged() {
    let devices: Vec<(String, String)> = (0..3)
        .map(|i| (format!("churn-{i}"), format!("token-{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = devices
        .iter()
        .map(|(d, t)| (d.as_str(), t.as_str()))
        .collect();
    let broker = TestBroker::start(&refs).await;
    let observed = backend_double(&broker).await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds.csv");
    write_credentials(&creds, &devices);
    let mut args = churn_args(&broker, creds, 3, 5);
    args.reconnect_every_s = 1;
    let stats = Arc::new(FleetStats::default());
    let report = tokio::time::timeout(Duration::from_secs(30), run_with(args, stats.clone()))
        .await
        .expect("the run ends by itself")
        .unwrap();
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let churned = g(&stats.churn_disconnects);
    assert!(
        churned >= 6,
        "each device reconnected a few times: {report}"
    );
    assert_eq!(g(&stats.connect_errors), 0, "{report}");
    // Every own disconnect was followed by a reconnection, but perhaps the last ones.
    assert!(g(&stats.connected) + 3 >= 3 + churned, "{report}");
    let sent = g(&stats.telemetry_sent);
    assert_eq!(g(&stats.telemetry_acked), sent, "{report}");
    tokio::time::timeout(Duration::from_secs(10), async {
        while g(&observed) < sent {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("observed {} of {sent}: {report}", g(&observed)));
    assert!(report.contains("own reconnects"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_device_connects_once_the_credentials_file_has_its_new_token() {
    let devices: Vec<(String, String)> = (0..2)
        .map(|i| (format!("rot-{i}"), format!("token-{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = devices
        .iter()
        .map(|(d, t)| (d.as_str(), t.as_str()))
        .collect();
    let broker = TestBroker::start(&refs).await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds.csv");
    // rot-1 starts with a token the broker does not know (as after a rotation).
    let mut stale = devices.clone();
    stale[1].1 = "token-old".into();
    write_credentials(&creds, &stale);
    let mut args = churn_args(&broker, creds.clone(), 2, 10);
    args.reload_credentials_s = 1;
    let stats = Arc::new(FleetStats::default());
    let run = tokio::spawn(run_with(args, stats.clone()));
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(10), async {
        while g(&stats.refused) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the stale token is refused");
    write_credentials(&creds, &devices);
    let report = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run ends by itself")
        .unwrap()
        .unwrap();
    assert_eq!(g(&stats.tokens_reloaded), 1, "{report}");
    assert_eq!(g(&stats.connected), 2, "both devices connected: {report}");
    assert!(g(&stats.refused) >= 1, "{report}");
    assert!(
        report.contains("connected at the end 2"),
        "the rotated device is connected at the end: {report}"
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
