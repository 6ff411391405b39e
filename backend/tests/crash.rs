//! `kill -9` of `companion serve` under load, then a restart on the same data directory
//! (SQLite and PostgreSQL): 100 devices publish QoS 1 telemetry one message at a time and an
//! agent is mid-utterance when the server dies. Nothing a device saw acknowledged is missing
//! after the restart, the database is intact, the agent comes back by itself (its backoff)
//! and talks again; a second server on the same data directory refuses to start.

mod common;
mod voice_fake;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::{companion_command, fresh_pg_database, run_to_exit, ServerProcess};
use companion_schema::{encode, DeviceId, Telemetry, Topic, TopicKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const DEVICES: usize = 100;
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq)]
enum Db {
    Sqlite,
    Postgres,
}

struct Node {
    data: PathBuf,
    pg: Option<String>,
}

impl Node {
    /// The server command; `pinned` keeps the HTTP and MQTT+TLS ports of an earlier run (the
    /// devices reconnect to the address they know).
    fn command(&self, pinned: Option<&ServerProcess>) -> tokio::process::Command {
        let mut cmd = companion_command(&self.data);
        cmd.env("COMPANION_HTTP__RATE_LIMIT_PER_MINUTE", "1000000");
        // The publishers send as fast as they are acknowledged: far over the per-device limit,
        // whose drops a 3.1.1 device cannot tell from an acknowledgement.
        cmd.env("COMPANION_MQTT__RATE__CONTROL_PER_S", "1000000");
        cmd.env("COMPANION_MQTT__RATE__CONTROL_BURST", "1000000");
        if let Ok(filter) = std::env::var("CRASH_SERVER_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        if let Some(url) = &self.pg {
            cmd.env("DATABASE_URL", url);
        }
        if let Some(old) = pinned {
            cmd.env("COMPANION_HTTP__LISTEN", old.http.to_string());
            cmd.env(
                "COMPANION_MQTT__TLS_LISTEN",
                old.mqtts.expect("mqtts").to_string(),
            );
        }
        cmd
    }
}

fn admin_token(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_owned()
}

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

/// One device: publishes seq 1, 2, … at QoS 1, each after the previous one's PUBACK, and
/// records the last acknowledged sequence number, until its connection fails.
async fn publisher(
    opts: MqttOptions,
    id: String,
    acked: Arc<Mutex<HashMap<String, u64>>>,
    progress: mpsc::UnboundedSender<()>,
) {
    let (client, mut el) = AsyncClient::new(opts, 16);
    let topic = Topic::new(DeviceId::parse(&id).unwrap(), TopicKind::Telemetry).to_string();
    let mut seq = 1u64;
    let mut connected = false;
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                if client
                    .try_publish(&topic, QoS::AtLeastOnce, false, telemetry(seq))
                    .is_err()
                {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) if connected => {
                acked.lock().unwrap().insert(id.clone(), seq);
                let _ = progress.send(());
                seq += 1;
                if client
                    .try_publish(&topic, QoS::AtLeastOnce, false, telemetry(seq))
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return, // the server died
        }
    }
}

/// A spoken question and a second of silence (the server's VAD ends the utterance).
fn question_wav(dir: &Path) -> PathBuf {
    let wav = dir.join("mic.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&wav, spec).unwrap();
    let pcm = voice_fake::spoken("what is the weather like today");
    for sample in pcm.iter().chain(std::iter::repeat_n(&0i16, 16_000)) {
        w.write_sample(*sample).unwrap();
    }
    w.finalize().unwrap();
    wav
}

async fn kill_9(server: &mut ServerProcess) {
    let pid = server.child.id().expect("running").to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let _ = server.child.wait().await;
}

async fn stored_seqs(node: &Node) -> HashMap<String, u64> {
    sqlx::any::install_default_drivers();
    let url = match &node.pg {
        Some(url) => url.clone(),
        None => format!(
            "sqlite://{}?mode=ro",
            node.data.join("companion.db").display()
        ),
    };
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("open the database");
    if node.pg.is_none() {
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(check, "ok", "SQLite integrity_check after kill -9");
        let orphans: Vec<(String,)> = sqlx::query_as("PRAGMA foreign_key_check")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert!(orphans.is_empty(), "rows without their device: {orphans:?}");
    }
    // Both databases: no registration half written (every device has its token, so it can
    // come back), every device row readable whole.
    let tokenless: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM devices d LEFT JOIN device_tokens t ON t.device_id = d.device_id \
         WHERE t.device_id IS NULL",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(tokenless, 0, "devices registered without a token");
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT device_id, seq FROM telemetry_latest")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    rows.into_iter().map(|(d, s)| (d, s as u64)).collect()
}

async fn kill_9_loses_nothing_acknowledged(db: Db) {
    let pg = match db {
        Db::Sqlite => None,
        Db::Postgres => match fresh_pg_database().await {
            Some(url) => Some(url),
            None => return,
        },
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let node = Node {
        data: dir.path().join("data"),
        pg,
    };
    let mut server = ServerProcess::start(node.command(None)).await;
    let token = admin_token(&node.data);
    let ca = node.data.join("tls").join("ca.pem");
    let mqtts = server.mqtts.expect("mqtts").port();
    let http = reqwest::Client::new();

    // A second server on the same data directory refuses to start, and says why.
    let (status, stderr) = run_to_exit(node.command(None)).await;
    assert!(!status.success(), "a second server started: {stderr}");
    assert!(
        stderr.contains("in use by another companion server"),
        "{stderr}"
    );

    // The agent, connected and mid-utterance.
    let (agent_id, agent_token) = server.register(&http, &token, "talker").await;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let mut agent = Agent::start(
        &agent_dir,
        &agent_id,
        &agent_token,
        &format!("mqtts://localhost:{mqtts}"),
        &ca,
        &question_wav(&agent_dir),
    )
    .await;
    agent.wait_line("connected").await;

    // 100 devices publishing.
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let (progress, mut progress_rx) = mpsc::unbounded_channel();
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let (id, tok) = server.register(&http, &token, &format!("pub-{i}")).await;
        devices.push(tokio::spawn(publisher(
            common::device_tls_options(&ca, mqtts, &id, &tok),
            id,
            acked.clone(),
            progress.clone(),
        )));
    }
    // Every device has had a few messages acknowledged: the server is busy.
    tokio::time::timeout(DEADLINE, async {
        loop {
            {
                let a = acked.lock().unwrap();
                if a.len() == DEVICES && a.values().all(|&s| s >= 3) {
                    return;
                }
            }
            progress_rx.recv().await;
        }
    })
    .await
    .expect("every device publishes");

    agent.button("talk press").await;
    agent.wait_line("listening").await;
    kill_9(&mut server).await;
    for d in devices {
        tokio::time::timeout(DEADLINE, d)
            .await
            .expect("publishers notice the server died")
            .unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let total: u64 = acked.values().sum();

    // Restart on the same data directory and ports.
    let mut server = ServerProcess::start(node.command(Some(&server))).await;
    let stored = stored_seqs(&node).await;
    let missing: Vec<_> = acked
        .iter()
        .filter(|(id, &seq)| stored.get(*id).copied().unwrap_or(0) < seq)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged before kill -9 but not stored ({} of {DEVICES} devices, {total} messages acknowledged): {missing:?}",
        missing.len()
    );

    // The agent comes back by itself and talks again: its half-finished utterance did not
    // leave it (or the server) stuck.
    agent.wait_line("connected").await;
    // The utterance the kill interrupted ends, and the new server says so: `idle` (it
    // answered what reached it of the utterance, or a stop for a session it never opened,
    // "unknown session"), or its error LED, #ff2828 (what reached it could not be answered).
    let back = Instant::now();
    let ended = agent
        .wait_line_with(&["state=Idle", "Blink #ff2828"], &mut server)
        .await;
    eprintln!(
        "the interrupted utterance ended {:.1?} after the agent reconnected: {ended}",
        back.elapsed()
    );
    agent.button("talk press").await;
    agent.wait_line("listening").await;
    let line = agent
        .wait_line_with(&["state=Idle transcript=Some"], &mut server)
        .await;
    assert!(line.to_lowercase().contains("weather"), "{line}");
    assert!(line.contains("reply=Some"), "the persona answered: {line}");
    let _ = agent.child.kill().await;
    let (status, _) = server.terminate().await;
    assert!(status.success(), "clean stop after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged_on_sqlite() {
    kill_9_loses_nothing_acknowledged(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged_on_postgres() {
    kill_9_loses_nothing_acknowledged(Db::Postgres).await;
}
