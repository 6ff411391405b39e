//! A browser-style MQTT over WebSocket client against the real server: Python's paho-mqtt
//! (Debian's `python3-paho-mqtt`) with `transport="websockets"` and an `Origin` header, as a
//! web page would connect, authenticates with a device token and gets its persona.

mod common;

use std::time::Duration;

use common::app::{DbKind, TestApp};
use companion_schema::PersonaState;

const ORIGIN: &str = "https://app.example.com";

/// Connects with paho over `wss://localhost:{port}/mqtt` (with `origin`, MQTT `version` 311
/// or 5), subscribes to `topic` and prints the first message's payload in hex; exits 3 when
/// refused.
const PAHO: &str = r#"
import sys, ssl, threading
import paho.mqtt.client as mqtt
port, ca, dev, token, topic, origin, version = sys.argv[1:8]
got = threading.Event()
result = {}
def on_connect(c, u, flags, rc, properties=None):
    result["rc"] = rc
    if rc == 0:
        c.subscribe(topic, qos=1)
    else:
        got.set()
def on_message(c, u, msg):
    result["payload"] = msg.payload.hex()
    result["retain"] = msg.retain
    got.set()
protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
c = mqtt.Client(client_id=dev, transport="websockets", protocol=protocol)
c.ws_set_options(path="/mqtt", headers={"Origin": origin})
c.tls_set(ca_certs=ca)
c.username_pw_set(dev, token)
c.on_connect = on_connect
c.on_message = on_message
try:
    c.connect("localhost", int(port), keepalive=30)
except Exception as e:
    print("connect failed:", e)
    sys.exit(3)
c.loop_start()
if not got.wait(15):
    print("timed out", result)
    sys.exit(2)
c.loop_stop()
if result.get("rc", 0) != 0:
    print("refused rc", result["rc"])
    sys.exit(3)
print("payload", result["payload"])
"#;

/// Debian's Python, where `apt-get install python3-paho-mqtt` puts the library.
const PYTHON: &str = "/usr/bin/python3";

async fn paho(
    app: &TestApp,
    device: &str,
    token: &str,
    origin: &str,
    version: &str,
) -> (i32, String) {
    let topic = format!("devices/{device}/persona");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(PYTHON)
            .arg("-c")
            .arg(PAHO)
            .arg(app.wss.port().to_string())
            .arg(&app.ca_pem)
            .arg(device)
            .arg(token)
            .arg(&topic)
            .arg(origin)
            .arg(version)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("paho finishes in time")
    .unwrap_or_else(|e| panic!("{PYTHON} must run (apt-get install python3-paho-mqtt): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "python3-paho-mqtt is required: {stderr}"
    );
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_style_websocket_client_connects_with_a_token_and_gets_its_persona() {
    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        s.mqtt.ws_allowed_origins = vec![ORIGIN.into()];
    })
    .await
    .unwrap();
    let (id, token) = app.register("browser").await;

    for version in ["311", "5"] {
        let (code, out) = paho(&app, &id, &token, ORIGIN, version).await;
        assert_eq!(code, 0, "MQTT {version}: {out}");
        let hex = out
            .lines()
            .find_map(|l| l.strip_prefix("payload "))
            .unwrap_or_else(|| panic!("no payload in {out}"));
        let bytes = hex::decode(hex.trim()).unwrap();
        let persona: PersonaState = companion_schema::decode(&bytes).unwrap();
        assert_eq!(persona.persona_id.as_str(), "aria", "the default persona");
    }

    // A page from another origin is refused at the upgrade, a wrong token at CONNECT.
    let (code, out) = paho(&app, &id, &token, "https://evil.example", "311").await;
    assert_eq!(code, 3, "{out}");
    let (code, out) = paho(&app, &id, "not-the-token", ORIGIN, "5").await;
    assert_eq!(code, 3, "{out}");
    app.stop().await;
}
