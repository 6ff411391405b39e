//! The agent as a real process: TLS connect, status and telemetry; Last Will on SIGKILL;
//! clean offline on SIGTERM; exit 64 on bad configuration.

mod common;

use std::process::Stdio;

use common::*;
use companion_schema::Payload;

const DEVICE: &str = "pi-proc";
const TOKEN: &str = "token-proc-0123456789";

fn tls_env(broker: &TestBroker, dir: &std::path::Path) -> std::path::PathBuf {
    env_file(
        dir,
        &[
            ("DEVICE_ID", DEVICE.into()),
            (
                "CONTROL_PLANE_URL",
                format!("mqtts://localhost:{}", broker.tls.port()),
            ),
            ("DEVICE_AUTH_TOKEN", TOKEN.into()),
            ("CA_CERT", broker.ca_pem.display().to_string()),
            ("CACHE_DIR", dir.join("cache").display().to_string()),
            ("MQTT_KEEPALIVE_S", "5".into()),
        ],
    )
}

fn spawn(env: &std::path::Path) -> tokio::process::Child {
    agent_command(env)
        .args(["--hardware", "sim", "--telemetry-interval-ms", "200"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn is_status(online: bool) -> impl Fn(&Payload) -> bool {
    move |p| matches!(p, Payload::Status(s) if s.online == online)
}

#[tokio::test]
async fn an_agent_connects_over_tls_and_its_status_and_telemetry_arrive_then_sigkill_delivers_the_will(
) {
    let broker = TestBroker::start(&[(DEVICE, TOKEN)]).await;
    let mut backend = broker.backend(DEVICE).await;
    let dir = tempfile::tempdir().unwrap();
    let env = tls_env(&broker, dir.path());
    let mut child = spawn(&env);

    backend.wait_for("online status", is_status(true)).await;
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        if let Payload::Telemetry(t) = backend
            .wait_for("telemetry", |p| matches!(p, Payload::Telemetry(_)))
            .await
        {
            assert!(t.uptime_s > 0);
            assert!(t.free_mem_kb.is_some());
            seqs.push(t.seq);
        }
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    child.start_kill().unwrap();
    child.wait().await.unwrap();
    backend.wait_for("the offline Will", is_status(false)).await;
}

#[tokio::test]
async fn sigterm_publishes_offline_and_exits_zero() {
    let broker = TestBroker::start(&[(DEVICE, TOKEN)]).await;
    let mut backend = broker.backend(DEVICE).await;
    let dir = tempfile::tempdir().unwrap();
    let env = tls_env(&broker, dir.path());
    let mut child = spawn(&env);
    backend.wait_for("online status", is_status(true)).await;
    let pid = child.id().unwrap() as libc::pid_t;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    backend.wait_for("offline status", is_status(false)).await;
}

#[tokio::test]
async fn bad_configuration_exits_64_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let good = |skip: &str| -> Vec<(&'static str, String)> {
        [
            ("DEVICE_ID", "pi-1".to_owned()),
            ("CONTROL_PLANE_URL", "mqtt://127.0.0.1:1".to_owned()),
            ("DEVICE_AUTH_TOKEN", "super-secret-token".to_owned()),
            ("CACHE_DIR", dir.path().display().to_string()),
        ]
        .into_iter()
        .filter(|(k, _)| *k != skip)
        .collect()
    };
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("DEVICE_ID", good("DEVICE_ID")),
        ("CACHE_DIR", good("CACHE_DIR")),
        ("CONTROL_PLANE_URL", {
            let mut v = good("CONTROL_PLANE_URL");
            v.push(("CONTROL_PLANE_URL", "mqtt://10.1.2.3:1883".into()));
            v
        }),
        ("AUDIO_SAMPLE_RATE", {
            let mut v = good("");
            v.push(("AUDIO_SAMPLE_RATE", "48000".into()));
            v
        }),
        ("CA_CERT", {
            let mut v = good("CONTROL_PLANE_URL");
            v.push(("CONTROL_PLANE_URL", "mqtts://companion.example".into()));
            v
        }),
    ];
    for (var, lines) in cases {
        let env = env_file(dir.path(), &lines);
        let out = agent_command(&env)
            .args(["--hardware", "sim"])
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{var}: {stderr}");
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert!(!stderr.contains("super-secret-token"), "{stderr}");
    }
    // A missing env file that was asked for by name is an error too.
    let out = agent_command(&dir.path().join("nope.env"))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}
