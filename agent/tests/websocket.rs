//! The agent over MQTT over WebSocket (`wss://`, and `ws://` on loopback): the same
//! telemetry, buttons and persona as over MQTT+TLS.

mod common;

use common::*;
use companion_agent::controller::Observed;
use companion_schema::{ButtonAction, Payload, PersonaId, PersonaState, TopicKind};

const DEVICE: &str = "pi-ws";
const TOKEN: &str = "token-ws";

async fn run_over(broker: &TestBroker, tls: bool) {
    let mut backend = broker.backend(DEVICE).await;
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = if tls {
        (broker.wss, Some(broker.ca_pem.as_path()))
    } else {
        (broker.ws, None)
    };
    let mut s = settings(DEVICE, TOKEN, addr, ca, &dir.path().join("cache"));
    s.url.websocket = true;
    s.url.path = "/mqtt".into();
    let mut agent = InProcessAgent::start(s, 200, AgentHw::default());
    agent
        .wait_for("connected", |o| *o == Observed::Connected(true))
        .await;

    backend
        .wait_for("telemetry", |p| matches!(p, Payload::Telemetry(_)))
        .await;
    agent.press("persona", ButtonAction::Press).await;
    backend
        .wait_for(
            "button",
            |p| matches!(p, Payload::Button(b) if b.button == "persona"),
        )
        .await;
    backend
        .send(
            TopicKind::Persona,
            &Payload::Persona(PersonaState {
                v: 1,
                persona_id: PersonaId::parse("pirate").unwrap(),
                name: "Pirate".into(),
                color: [0, 200, 50],
                voice: "en+m3".into(),
                switched_at_ms: 1,
                trigger: "button".into(),
            }),
        )
        .await;
    agent
        .wait_for("persona", |o| matches!(o, Observed::Persona(_)))
        .await;
    assert_eq!(agent.led.borrow().color, [0, 200, 50]);
    agent.stop().await;
}

#[tokio::test]
async fn the_agent_works_over_wss() {
    let broker = TestBroker::start(&[(DEVICE, TOKEN)]).await;
    run_over(&broker, true).await;
}

#[tokio::test]
async fn the_agent_works_over_plain_ws_on_loopback() {
    let broker = TestBroker::start(&[(DEVICE, TOKEN)]).await;
    run_over(&broker, false).await;
}
