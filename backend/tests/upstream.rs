//! `mqtt.upstream`: the backend as a client of an external broker (Debian's mosquitto here)
//! instead of the embedded one, with the same device runtime and rules.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::app::{Client, DbKind, TestApp};
use companion_schema::*;
use rumqttc::{MqttOptions, QoS};

/// Mosquitto on a free loopback port, killed on drop.
struct Mosquitto {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    async fn start() -> Self {
        // Learn a free port, then hand it to mosquitto (it cannot take a bound socket).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = tokio::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto is installed (Debian package mosquitto)");
        // Wait until it accepts connections.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_upstream_broker_the_backend_serves_devices_through_it() {
    let mosquitto = Mosquitto::start().await;
    let url = format!("mqtt://127.0.0.1:{}", mosquitto.port);
    let app = TestApp::start_with(DbKind::Sqlite, |s| s.mqtt.upstream = url.clone())
        .await
        .unwrap();
    assert!(app.app_ctx.broker.is_none(), "the embedded broker is off");
    let (id, _token) = app.register("upstream").await;

    // The device talks to mosquitto directly (its authentication is mosquitto's business).
    let mut opts = MqttOptions::new(id.clone(), "127.0.0.1", mosquitto.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let mut dev = Client::connect(opts)
        .await
        .expect("device connects to mosquitto");
    let device = DeviceId::parse(&id).unwrap();
    let persona_topic = Topic::new(device.clone(), TopicKind::Persona).to_string();
    dev.client
        .subscribe(persona_topic.clone(), QoS::AtLeastOnce)
        .await
        .unwrap();

    // Press the persona button until the backend's subscription is in place and it answers.
    let state = dev
        .press_until_persona(&device, Duration::from_secs(20))
        .await;
    assert_ne!(
        state.persona_id.as_str(),
        "aria",
        "the button switched away from the default"
    );
    assert!(state.trigger.starts_with("rule:"));
    app.stop().await;
    drop(mosquitto.child);
}
