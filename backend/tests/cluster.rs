//! Two `companion` replicas (real processes, `cluster.enabled`) on one PostgreSQL behind a
//! two-node RabbitMQ cluster: each device is handled by one replica; `kill -9` of the replica
//! owning most devices while they publish QoS 1 telemetry and one of them is mid-conversation
//! loses no telemetry, and the other replica takes its devices over within a few seconds.

mod common;
mod voice_fake;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::rabbitmq::{self, mosquitto_pub, MosquittoSub, RabbitMq};
use common::{companion_command, fresh_pg_database, ServerProcess};
use companion_schema::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 12;
const ADMIN: &str = "cluster-test-admin-token-0123456789";
/// Lease and heartbeat of the replicas (the defaults).
const LEASE: Duration = Duration::from_secs(3);
/// A registry change on one replica is refused by the other's hook within its 1 s cache
/// (and the time a request takes).
const REVOKED_WITHIN: Duration = Duration::from_millis(1_800);
/// From the kill of the talker's replica to the survivor's answer to its next question.
const TALKER_BACK_WITHIN: Duration = Duration::from_secs(20);

/// Replica `name`'s command: its broker is node 1 or 2 (`broker_port`); kicks go to node 1's
/// management API on `management` (one API serves the whole cluster).
fn replica(
    dir: &Path,
    name: &str,
    pg: &str,
    broker_port: u16,
    management: u16,
) -> tokio::process::Command {
    let mut cmd = companion_command(dir);
    cmd.env("COMPANION_MQTT_HOOK__BROKER_API", "rabbitmq")
        .env(
            "COMPANION_MQTT_HOOK__BROKER_API_URL",
            format!("http://127.0.0.1:{management}"),
        )
        .env(
            "COMPANION_MQTT_HOOK__BROKER_API_USERNAME",
            rabbitmq::BACKEND_USER,
        )
        .env(
            "COMPANION_MQTT_HOOK__BROKER_API_PASSWORD",
            rabbitmq::BACKEND_PASS,
        );
    cmd.env("DATABASE_URL", pg)
        .env("COMPANION_ADMIN__TOKEN", ADMIN)
        .env("COMPANION_HTTP__RATE_LIMIT_PER_MINUTE", "1000000")
        .env(
            "COMPANION_MQTT__UPSTREAM",
            format!("mqtt://127.0.0.1:{broker_port}"),
        )
        .env("COMPANION_MQTT__UPSTREAM_USERNAME", rabbitmq::BACKEND_USER)
        .env("COMPANION_MQTT__UPSTREAM_PASSWORD", rabbitmq::BACKEND_PASS)
        .env("COMPANION_MQTT__UPSTREAM_SHARED", "false")
        .env("COMPANION_MQTT_HOOK__ALLOW_FROM", "127.0.0.1/32")
        .env("COMPANION_CLUSTER__ENABLED", "true")
        .env("COMPANION_CLUSTER__REPLICA_ID", name)
        .env("COMPANION_CLUSTER__LEASE_MS", LEASE.as_millis().to_string());
    cmd
}

/// The brokers' view of companion's HTTP hooks: one address in front of both replicas, each
/// connection going to the first that accepts (what the load balancer does in production).
async fn hook_balancer(replicas: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let replicas = replicas.clone();
            tokio::spawn(async move {
                for r in replicas {
                    if let Ok(mut out) = TcpStream::connect(r).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        return;
                    }
                }
            });
        }
    });
    addr
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

/// A spoken question and a second of silence (the server's VAD ends the utterance).
fn question_wav(dir: &Path) -> std::path::PathBuf {
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

/// One device: telemetry seq 1, 2, … at QoS 1 every 20 ms (the next after the previous
/// one's PUBACK), recording the last acknowledged, until `stop`. The event loop runs on its
/// own task: `EventLoop::poll` must not be cancelled mid-packet.
async fn publisher(
    opts: MqttOptions,
    id: String,
    acked: Arc<Mutex<HashMap<String, u64>>>,
    stop: CancellationToken,
) {
    let (client, mut el) = AsyncClient::new(opts, 16);
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
    let who = id.clone();
    let driver = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    if ack_tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("device {who} lost its broker connection: {e}"),
            }
        }
    });
    let topic = Topic::new(DeviceId::parse(&id).unwrap(), TopicKind::Telemetry).to_string();
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    for seq in 1.. {
        pace.tick().await;
        if stop.is_cancelled() {
            break;
        }
        client
            .publish(&topic, QoS::AtLeastOnce, false, telemetry(seq))
            .await
            .unwrap();
        ack_rx.recv().await.expect("the event loop runs");
        acked.lock().unwrap().insert(id.clone(), seq);
    }
    driver.abort();
}

async fn owners(pool: &sqlx::PgPool) -> HashMap<String, String> {
    sqlx::query_as::<_, (String, String)>("SELECT device_id, owner FROM device_owners")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// `GET /api/v1/rules` of `server`.
async fn rules(http: &reqwest::Client, server: &ServerProcess) -> Value {
    http.get(server.url("/api/v1/rules"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn has_rule(rules: &Value, name: &str) -> bool {
    rules["rules"]
        .as_array()
        .is_some_and(|rs| rs.iter().any(|r| r["name"] == name))
}

async fn metric(http: &reqwest::Client, server: &ServerProcess, name: &str) -> f64 {
    let text = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_loses_no_telemetry_and_the_other_takes_its_devices() {
    let Some(pg) = fresh_pg_database().await else {
        return;
    };
    if !rabbitmq::available() {
        return;
    }
    let pool = sqlx::PgPool::connect(&pg).await.unwrap();
    let http = reqwest::Client::new();
    let (port1, port2) = (RabbitMq::free_port(), RabbitMq::free_port());
    let management = RabbitMq::free_port();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut servers = [
        ServerProcess::start(replica(dir_a.path(), "a", &pg, port1, management)).await,
        ServerProcess::start(replica(dir_b.path(), "b", &pg, port2, management)).await,
    ];
    let hook = format!(
        "http://{}",
        hook_balancer(vec![servers[0].http, servers[1].http]).await
    );
    let booting = Instant::now();
    // Node 1 also takes devices over TLS with replica a's certificate (the agent's way in).
    let tls_port = RabbitMq::free_port();
    let tls_dir = dir_a.path().join("tls");
    let node1 = RabbitMq::start(&hook, port1, management, Some((tls_port, &tls_dir))).await;
    let node2 = RabbitMq::join(&node1, &hook, port2).await;
    eprintln!("two-node cluster up in {:.1?}", booting.elapsed());
    // Both replicas subscribed (each retries with backoff while the nodes boot): a replica
    // keeps a shadow only of what it receives.
    let deadline = Instant::now() + Duration::from_secs(30);
    for server in servers.iter_mut() {
        while !server
            .drain()
            .iter()
            .any(|l| l.contains("backend connected to the broker"))
        {
            assert!(
                Instant::now() < deadline,
                "replica never reached the broker"
            );
            tokio::task::yield_now().await;
        }
    }

    // Devices on either node, registered through either replica.
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let server = &servers[i % 2];
        let resp = http
            .post(server.url("/api/v1/devices"))
            .bearer_auth(ADMIN)
            .json(&json!({ "name": format!("dev-{i}"), "device_type": "simulated", "capabilities": ["leds", "buttons"] }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let body: Value = resp.json().await.unwrap();
        let id = body["device_id"].as_str().unwrap().to_owned();
        let token = body["auth_token"].as_str().unwrap().to_owned();
        let port = if i % 2 == 0 { port1 } else { port2 };
        devices.push((id, token, port));
    }
    // The talker: a real companion-agent daemon over TLS through node 1.
    let (talker_id, talker_token, _) = devices.pop().unwrap();
    let agent_dir = dir_a.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let mut agent = Agent::start(
        &agent_dir,
        &talker_id,
        &talker_token,
        &format!("mqtts://localhost:{tls_port}"),
        &tls_dir.join("ca.pem"),
        &question_wav(&agent_dir),
    )
    .await;
    agent.wait_line("connected").await;
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let stop = CancellationToken::new();
    let mut publishers = Vec::new();
    for (id, token, port) in &devices {
        let mut opts = MqttOptions::new(id.clone(), "127.0.0.1", *port);
        opts.set_credentials(id.clone(), token.clone());
        opts.set_keep_alive(Duration::from_secs(30));
        publishers.push(tokio::spawn(publisher(
            opts,
            id.clone(),
            acked.clone(),
            stop.clone(),
        )));
    }
    // Everyone owned, by the replica each hashes to: claims race (each replica sees every
    // event), and the rebalancing that follows must be over before the test picks its victim.
    let names = vec!["a".to_owned(), "b".to_owned()];
    let deadline = Instant::now() + Duration::from_secs(30);
    let owned = loop {
        let owned = owners(&pool).await;
        let settled = owned.iter().all(|(d, o)| {
            let d = DeviceId::parse(d).unwrap();
            companion_backend::cluster::preferred_replica(&names, &d) == Some(o)
        });
        if owned.len() == DEVICES && settled {
            break owned;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = servers.iter_mut().map(|s| s.drain().join("\n")).collect();
            panic!(
                "only {} of {DEVICES} devices owned; acked {:?}\nlogs:\n{}\n{}",
                owned.len(),
                acked.lock().unwrap(),
                logs[0],
                logs[1]
            );
        }
        tokio::task::yield_now().await;
    };
    let by_a = owned.values().filter(|o| *o == "a").count();
    eprintln!("owned: a {by_a}, b {}", DEVICES - by_a);
    let victim_name = owned[&talker_id].clone();
    let (victim, survivor) = if victim_name == "a" { (0, 1) } else { (1, 0) };
    let survivor_name = if victim == 0 { "b" } else { "a" };
    let victims: Vec<String> = owned
        .iter()
        .filter(|(_, o)| **o == victim_name)
        .map(|(d, _)| d.clone())
        .collect();

    // A persona set through the replica that does not own the talker reaches its owner's
    // worker (pg_notify): the owner's next press cycles on from it (pip -> aria), not from
    // the default it had loaded (aria -> sage).
    let resp = http
        .put(servers[survivor].url(&format!("/api/v1/devices/{talker_id}/persona")))
        .bearer_auth(ADMIN)
        .json(&json!({ "persona_id": "pip" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    agent.wait_line("persona=pip").await;
    agent.button("persona press").await;
    // The press's answer: the persona after pip. A stale owner answers sage; a second copy of
    // pip would be a side effect repeated.
    let line = agent.wait_line("persona=").await;
    if line.contains("persona=pip") {
        for (i, s) in servers.iter_mut().enumerate() {
            for l in s.drain() {
                if l.contains(talker_id.as_str()) || l.contains("cluster") {
                    eprintln!("DUP server {i}: {l}");
                }
            }
        }
        let next = agent.wait_line("persona=").await;
        eprintln!("DUP then: {next}");
        panic!("pip twice");
    }
    assert!(
        line.contains("persona=aria"),
        "{victim_name} cycled from a stale persona: {line}"
    );

    // Registry changes made on one replica reach the other's hook within its 1 s credential
    // cache, and the broker applies them to live connections.
    registry_changes_reach_every_replica(&http, &servers, &pool, port1, port2).await;

    // Rules put on one replica run on the other too (shared through the database).
    {
        let toml = rules(&http, &servers[1]).await["toml"]
            .as_str()
            .unwrap()
            .to_owned();
        let toml = format!(
            "{toml}\n[[rule]]\nname = \"put on b\"\non = \"status\"\ndo = [{{ log = \"status\" }}]\n"
        );
        let resp = http
            .put(servers[1].url("/api/v1/rules"))
            .bearer_auth(ADMIN)
            .json(&json!({ "toml": toml }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        let put = Instant::now();
        loop {
            let on_a = rules(&http, &servers[0]).await;
            if has_rule(&on_a, "put on b") {
                break;
            }
            assert!(
                put.elapsed() < Duration::from_secs(5),
                "replica a never ran the rules put on b: {on_a}"
            );
            tokio::task::yield_now().await;
        }
        eprintln!(
            "rules put on b run on a after {} ms",
            put.elapsed().as_millis()
        );
    }

    // The talker starts a conversation with its owner and is mid-utterance at the kill.
    agent.button("talk press").await;
    agent.wait_line("listening").await;

    // Telemetry flows to both replicas for a moment, then the talker's owner dies.
    let before_kill = acked.lock().unwrap().clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now = acked.lock().unwrap().clone();
            if devices
                .iter()
                .all(|(id, _, _)| now.get(id) > before_kill.get(id).or(Some(&0)))
            {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "every device publishes: before {before_kill:?}, now {:?}",
            acked.lock().unwrap()
        )
    });
    let killed = Instant::now();
    let status = tokio::process::Command::new("kill")
        .args(["-9", &servers[victim].child.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let _ = servers[victim].child.wait().await;

    // The survivor owns every publishing device within lease + heartbeat (+ its claim); the
    // talker, silent meanwhile, is claimed on its next message.
    let failover = loop {
        let owned = owners(&pool).await;
        if victims
            .iter()
            .all(|d| *d == talker_id || owned[d] == survivor_name)
        {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < LEASE * 3,
            "{survivor_name} took only some of {victim_name}'s devices: {owned:?}"
        );
        tokio::task::yield_now().await;
    };
    eprintln!(
        "{survivor_name} owns {victim_name}'s {} devices {failover:.1?} after the kill",
        victims.len()
    );

    // The utterance the kill interrupted ends (the survivor answers what reached it of it,
    // or the agent gives up waiting), and the talker holds a whole conversation with the
    // survivor.
    agent
        .wait_line_with(&["state=Idle", "Blink #ff2828"], &mut servers[survivor])
        .await;
    let answered = Instant::now();
    agent.button("talk press").await;
    agent.wait_line("listening").await;
    let line = agent
        .wait_line_with(&["state=Idle transcript=Some"], &mut servers[survivor])
        .await;
    // The talker is the survivor's and talking again within a few seconds of the kill (a
    // lease, a heartbeat, the interrupted utterance's end, a whole question and answer).
    assert!(
        killed.elapsed() < TALKER_BACK_WITHIN,
        "the talker's next answer came {:?} after the kill",
        killed.elapsed()
    );
    eprintln!(
        "talker's next conversation answered by {survivor_name} in {:.1?} ({:.1?} after the kill)",
        answered.elapsed(),
        killed.elapsed()
    );
    assert!(line.to_lowercase().contains("weather"), "{line}");
    assert!(line.contains("reply=Some"), "the persona answered: {line}");
    assert_eq!(owners(&pool).await[&talker_id], survivor_name);
    // Nothing done twice across the takeover: at most one question and one answer stored
    // per conversation, and the one persona switch made through the API audited once.
    let doubled: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT session_id, role, COUNT(*) FROM conversation_messages WHERE device_id = $1 \
         GROUP BY session_id, role HAVING COUNT(*) > 1",
    )
    .bind(&talker_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        doubled.is_empty(),
        "conversation lines stored twice: {doubled:?}"
    );
    let switches: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE action = 'device.persona' AND target = $1",
    )
    .bind(&talker_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(switches, 1, "the API's persona switch audited once");

    // The killed replica comes back: once up for two leases and receiving, the survivor
    // hands it the quiet devices that hash to it (the talker, just in a conversation, stays).
    // Handoffs so far (the rebalancing after the first claims) are not the ones looked for.
    let handed_before = metric(&http, &servers[survivor], "backend_cluster_handoffs_total").await;
    let restarted = Instant::now();
    let (victim_dir, victim_port) = if victim == 0 {
        (dir_a.path(), port1)
    } else {
        (dir_b.path(), port2)
    };
    servers[victim] = ServerProcess::start(replica(
        victim_dir,
        &victim_name,
        &pg,
        victim_port,
        management,
    ))
    .await;
    let back = loop {
        let owned = owners(&pool).await;
        let back: Vec<String> = owned
            .iter()
            .filter(|(_, o)| **o == victim_name)
            .map(|(d, _)| d.clone())
            .collect();
        if !back.is_empty()
            && metric(&http, &servers[survivor], "backend_cluster_handoffs_total").await
                - handed_before
                == back.len() as f64
        {
            break back;
        }
        if restarted.elapsed() > Duration::from_secs(30) {
            let log = servers[victim].drain().join("\n");
            panic!("{survivor_name} handed nothing back to the restarted {victim_name}: {owned:?}\n{log}");
        }
        tokio::task::yield_now().await;
    };
    eprintln!(
        "{victim_name} restarted; {survivor_name} began handing devices back after {:.1?}",
        restarted.elapsed()
    );
    assert!(!back.contains(&talker_id), "the talker was busy");
    let on_restarted = rules(&http, &servers[victim]).await;
    assert!(
        has_rule(&on_restarted, "put on b"),
        "the restarted replica runs the cluster's rules: {on_restarted}"
    );

    // Publish a while longer, stop, and every acknowledged message is stored.
    let more = acked.lock().unwrap().clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now = acked.lock().unwrap().clone();
            if devices.iter().all(|(id, _, _)| now.get(id) > more.get(id)) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("devices keep publishing through the failover");
    stop.cancel();
    for p in publishers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored: HashMap<String, i64> =
            sqlx::query_as::<_, (String, i64)>("SELECT device_id, seq FROM telemetry_latest")
                .fetch_all(&pool)
                .await
                .unwrap()
                .into_iter()
                .collect();
        let behind: Vec<_> = devices
            .iter()
            .filter(|(id, _, _)| stored.get(id).copied().unwrap_or(0) as u64 != acked[id])
            .map(|(id, _, _)| (id, stored.get(id), acked[id]))
            .collect();
        if behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stored telemetry behind the acknowledged: {behind:?}"
        );
        tokio::task::yield_now().await;
    }
    let total: u64 = acked.values().sum();
    // Handoffs may have gone on meanwhile: every device handed off was taken, and is owned
    // by the restarted replica.
    let handed_in = metric(&http, &servers[victim], "backend_cluster_handed_in_total").await;
    let handoffs =
        metric(&http, &servers[survivor], "backend_cluster_handoffs_total").await - handed_before;
    let owned = owners(&pool).await;
    let back: Vec<&String> = owned
        .iter()
        .filter(|(_, o)| **o == victim_name)
        .map(|(d, _)| d)
        .collect();
    assert_eq!(
        (handed_in as usize, handoffs as usize),
        (back.len(), back.len()),
        "every handed device taken: {owned:?}"
    );
    assert!(!back.contains(&&talker_id), "the talker was busy");
    eprintln!(
        "{survivor_name} handed {} devices back to {victim_name}",
        back.len()
    );
    for name in [
        "telemetry_gaps_total",
        "backend_device_events_dropped_total{kind=\"telemetry\"}",
        "backend_device_events_dropped_total{kind=\"replay\"}",
    ] {
        assert_eq!(
            metric(&http, &servers[victim], name).await,
            0.0,
            "{name} on the restarted replica"
        );
    }
    let survivor_server = &servers[survivor];
    let gaps = metric(&http, survivor_server, "telemetry_gaps_total").await;
    let takeovers = metric(&http, survivor_server, "backend_cluster_takeovers_total").await;
    let replayed = metric(&http, survivor_server, "backend_cluster_replayed_total").await;
    eprintln!(
        "{total} telemetry messages acknowledged, all stored; gaps {gaps}; takeovers {takeovers}; replayed {replayed}"
    );
    let dropped = [
        "backend_device_events_dropped_total{kind=\"telemetry\"}",
        "backend_device_events_dropped_total{kind=\"replay\"}",
    ];
    for name in dropped {
        assert_eq!(metric(&http, survivor_server, name).await, 0.0, "{name}");
    }
    if gaps != 0.0 {
        let log = servers[survivor].drain().join("\n");
        panic!("the survivor missed {gaps} sequence numbers; its log:\n{log}");
    }
    assert_eq!(takeovers as usize, victims.len());
    let _ = agent.child.kill().await;
    drop(node2);
    drop(node1);
}

/// RabbitMQ's login question (`rabbitmq/user`) for `id` with `token`, put to `server`'s hook:
/// whether it allows.
async fn hook_allows(
    http: &reqwest::Client,
    server: &ServerProcess,
    id: &str,
    token: &str,
) -> bool {
    let form = [
        ("username", id),
        ("password", token),
        ("vhost", "/"),
        ("client_id", id),
    ];
    http.post(server.url("/api/v1/mqtt/rabbitmq/user"))
        .form(&form)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .starts_with("allow")
}

/// Waits until `server`'s hook refuses `id` with `token` after a change made at `since`: how
/// long it took (the other replica's cached answer lives 1 s).
async fn refused_within(
    http: &reqwest::Client,
    server: &ServerProcess,
    id: &str,
    token: &str,
    since: Instant,
    what: &str,
) -> Duration {
    while hook_allows(http, server, id, token).await {
        assert!(
            since.elapsed() < REVOKED_WITHIN,
            "{what}: the other replica's hook still allows after {:?}",
            since.elapsed()
        );
        tokio::task::yield_now().await;
    }
    since.elapsed()
}

/// Rotation, disabling and deletion made on one replica: refused by the other's hook within
/// its cache; a rotated device connected through node 2 is disconnected (through node 1's
/// management API) and its old token refused at node 1, its new one taken. Through the
/// cluster, a device reads its own topics and not another's (`mosquitto_sub`).
async fn registry_changes_reach_every_replica(
    http: &reqwest::Client,
    servers: &[ServerProcess; 2],
    pool: &sqlx::PgPool,
    port1: u16,
    port2: u16,
) {
    let (id, old) = servers[0].register(http, ADMIN, "rotated").await;
    let (other, other_token) = servers[0].register(http, ADMIN, "other").await;
    // Warm replica b's cache: the change must not be hidden by a cold one.
    assert!(hook_allows(http, &servers[1], &id, &old).await);

    // A device on node 2 reads its own topics: a persona set through replica b arrives.
    let own = format!("devices/{id}/persona");
    let mut sub = MosquittoSub::start(port2, &id, &old, &own);
    sub.wait_line("received SUBACK").await;
    let resp = http
        .put(servers[1].url(&format!("/api/v1/devices/{id}/persona")))
        .bearer_auth(ADMIN)
        .json(&json!({ "persona_id": "sage" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sub.wait_line(&format!("message {own} ")).await;
    // Another device cannot read them, through either node: refused and audited.
    for port in [port1, port2] {
        // RabbitMQ closes the connection; mosquitto_sub would come back and try again.
        let mut spy = MosquittoSub::start_with(port, &other, &other_token, &own, &["-W", "3"]);
        let (_, out) = spy.exit(Duration::from_secs(20)).await;
        assert!(
            !out.contains("message "),
            "{other} read {own} through {port}: {out}"
        );
    }
    let denied: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE action = 'mqtt.acl' AND target = $1 AND detail LIKE $2",
    )
    .bind(&other)
    .bind(format!("% {own} (external broker)"))
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(denied >= 2, "{denied} audited refusals of {own} to {other}");

    // Rotated through replica b: the connection on node 2 is closed, and the old token is
    // refused when it comes back.
    let resp = http
        .post(servers[1].url(&format!("/api/v1/devices/{id}/token")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rotated = Instant::now();
    let new = resp.json::<Value>().await.unwrap()["auth_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, out) = sub.exit(Duration::from_secs(20)).await;
    eprintln!(
        "rotated on b: the live connection on node 2 closed and its comeback refused after {:.1?}",
        rotated.elapsed()
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("Connection Refused"), "{out}");
    let kicked: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE action = 'device.token.rotate' AND target = $1 \
         AND detail = 'kicked'",
    )
    .bind(&id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(kicked, 1, "the rotation kicked the device");
    let took = refused_within(http, &servers[0], &id, &old, rotated, "rotation").await;
    eprintln!(
        "rotated on b, refused by a's hook after {} ms",
        took.as_millis()
    );
    let (code, out) = mosquitto_pub(port1, &id, &old, &format!("devices/{id}/telemetry")).await;
    assert_ne!(code, 0, "the old token at node 1: {out}");
    let (code, out) = mosquitto_pub(port1, &id, &new, &format!("devices/{id}/telemetry")).await;
    assert_eq!(code, 0, "the new token at node 1: {out}");

    // Disabled, and deleted, through replica a: refused by b's hook within its cache.
    for change in ["disable", "delete"] {
        let (id, token) = servers[0].register(http, ADMIN, change).await;
        assert!(hook_allows(http, &servers[1], &id, &token).await);
        let req = match change {
            "disable" => http
                .patch(servers[0].url(&format!("/api/v1/devices/{id}")))
                .json(&json!({ "enabled": false })),
            _ => http.delete(servers[0].url(&format!("/api/v1/devices/{id}"))),
        };
        let resp = req.bearer_auth(ADMIN).send().await.unwrap();
        assert!(resp.status().is_success(), "{change}: {}", resp.status());
        let at = Instant::now();
        let took = refused_within(http, &servers[1], &id, &token, at, change).await;
        eprintln!(
            "{change}d on a, refused by b's hook after {} ms",
            took.as_millis()
        );
    }
}
