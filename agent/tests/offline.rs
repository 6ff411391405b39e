//! The offline buffer against the real broker behind a cuttable proxy: what the agent produces
//! while the server is unreachable arrives afterwards, in order, none lost — also across an
//! agent restart.

mod common;

use common::*;
use companion_agent::controller::Observed;
use companion_schema::{ButtonAction, Payload};

const DEVICE: &str = "pi-offline";
const TOKEN: &str = "token-offline";

/// Collects telemetry and button seqs from the backend until `done` holds.
async fn collect_until(
    backend: &mut Backend,
    telemetry: &mut Vec<u64>,
    buttons: &mut Vec<(u64, String)>,
    done: impl Fn(&[u64], &[(u64, String)]) -> bool,
) {
    tokio::time::timeout(DEADLINE, async {
        while !done(telemetry, buttons) {
            let (_, p) = backend.rx.recv().await.expect("backend running");
            match p {
                Payload::Telemetry(t) => telemetry.push(t.seq),
                Payload::Button(b) if b.action == ButtonAction::Press => {
                    buttons.push((b.seq, b.button))
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("collected telemetry {telemetry:?} buttons {buttons:?}"));
}

/// Every seq from the first up to `upto` arrived, in order (duplicates of at-least-once
/// delivery allowed, and removed here).
fn assert_complete_in_order(seqs: &[u64], from: u64, upto: u64) {
    let mut dedup: Vec<u64> = Vec::new();
    for s in seqs {
        if dedup.last() != Some(s) && !dedup.contains(s) {
            dedup.push(*s);
        }
    }
    let expected: Vec<u64> = (from..=upto).collect();
    assert_eq!(
        &dedup[..expected.len().min(dedup.len())],
        &expected[..],
        "got {seqs:?}"
    );
    assert!(dedup.len() >= expected.len(), "got {seqs:?}");
}

#[tokio::test]
async fn telemetry_and_buttons_produced_while_the_server_is_down_all_arrive_in_order() {
    let broker = TestBroker::start(&[(DEVICE, TOKEN)]).await;
    let mut backend = broker.backend(DEVICE).await;
    let proxy = Proxy::start(broker.plain).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut agent = InProcessAgent::start(
        settings(DEVICE, TOKEN, proxy.addr, None, &cache),
        100,
        AgentHw::default(),
    );
    agent
        .wait_for("connected", |o| *o == Observed::Connected(true))
        .await;
    let (mut telemetry, mut buttons) = (Vec::new(), Vec::new());
    collect_until(&mut backend, &mut telemetry, &mut buttons, |t, _| {
        t.len() >= 2
    })
    .await;

    proxy.cut();
    agent
        .wait_for("disconnected", |o| *o == Observed::Connected(false))
        .await;
    let offline_from = seq_file(&cache, "telemetry.seq");
    for b in ["persona", "persona", "volume"] {
        agent.press(b, ButtonAction::Press).await;
    }
    wait_until("5 telemetry messages produced offline", || {
        seq_file(&cache, "telemetry.seq") >= offline_from + 5
    })
    .await;
    wait_until("3 button events produced offline", || {
        seq_file(&cache, "button.seq") >= 3
    })
    .await;
    let produced_offline = seq_file(&cache, "telemetry.seq") - 1;

    proxy.restore();
    agent
        .wait_for("reconnected", |o| *o == Observed::Connected(true))
        .await;
    collect_until(&mut backend, &mut telemetry, &mut buttons, |t, b| {
        t.contains(&produced_offline) && b.len() >= 3
    })
    .await;
    assert_complete_in_order(&telemetry, telemetry[0], produced_offline);
    let names: Vec<_> = buttons.iter().map(|(s, n)| (*s, n.as_str())).collect();
    assert_eq!(names, [(0, "persona"), (1, "persona"), (2, "volume")]);
    agent.stop().await;
}

#[tokio::test]
async fn the_offline_buffer_survives_an_agent_restart() {
    let broker = TestBroker::start(&[(DEVICE, TOKEN)]).await;
    let mut backend = broker.backend(DEVICE).await;
    let proxy = Proxy::start(broker.plain).await;
    proxy.cut();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");

    // First run: never reaches the server.
    let agent = InProcessAgent::start(
        settings(DEVICE, TOKEN, proxy.addr, None, &cache),
        50,
        AgentHw::default(),
    );
    agent.press("persona", ButtonAction::Press).await;
    agent.press("persona", ButtonAction::Press).await;
    wait_until("4 telemetry messages produced", || {
        seq_file(&cache, "telemetry.seq") >= 4
    })
    .await;
    wait_until("2 button events produced", || {
        seq_file(&cache, "button.seq") >= 2
    })
    .await;
    agent.stop().await;
    let produced = seq_file(&cache, "telemetry.seq");
    assert!(
        std::fs::read_dir(cache.join("outbox")).unwrap().count() > 0,
        "the outbox is on disk"
    );

    // Second run: the server is back.
    proxy.restore();
    let mut agent = InProcessAgent::start(
        settings(DEVICE, TOKEN, proxy.addr, None, &cache),
        60_000,
        AgentHw::default(),
    );
    agent
        .wait_for("connected", |o| *o == Observed::Connected(true))
        .await;
    let (mut telemetry, mut buttons) = (Vec::new(), Vec::new());
    collect_until(&mut backend, &mut telemetry, &mut buttons, |t, b| {
        t.contains(&(produced - 1)) && b.len() >= 2
    })
    .await;
    assert_complete_in_order(&telemetry, 0, produced - 1);
    assert_eq!(buttons.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [0, 1]);
    // The second run continues the sequence instead of starting over.
    collect_until(&mut backend, &mut telemetry, &mut buttons, |t, _| {
        t.contains(&produced)
    })
    .await;
    agent.stop().await;
}
