//! A device's link cut for 60 s, end to end: the real `companion serve`, a real
//! `companion-agent` daemon over MQTT+TLS sending telemetry every 100 ms, and a TCP proxy the
//! test owns between them. The cut is a black hole (both sockets stay open, nothing is
//! forwarded either way, no FIN; new connections are accepted and hear nothing). Both sides
//! must notice by keep-alive alone; the agent buffers, reconnects by itself once the link is
//! back and replays; the server stores every telemetry seq in order, with no gap
//! (SQLite and PostgreSQL).
//!
//! `COMPANION_TEST_CUT_S` shortens the cut for a local run (at least 30 s, so that both
//! keep-alives still expire inside it); CI runs the real 60 s.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proxy::TcpProxy;
use common::{companion_command, fresh_pg_database, ServerProcess};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// The requirement: the link is down this long (see [`cut_duration`]).
const CUT_S: u64 = 60;
/// The agent's telemetry interval: about 600 messages are produced during the cut.
const TELEMETRY_MS: u64 = 100;
/// The agent's MQTT keep-alive: rumqttc gives up after two unanswered pings (<= 20 s), the
/// server after 1.5 x (15 s); both well inside the cut.
const KEEPALIVE_S: u64 = 10;
/// Waiting for anything that is not the cut itself.
const DEADLINE: Duration = Duration::from_secs(60);
/// Waiting for the agent to come back after the cut: its backoff ceiling (60 s) plus a
/// connection's worth.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(90);

/// The cut: [`CUT_S`], or `COMPANION_TEST_CUT_S` (30 or more) for a shorter local run.
fn cut_duration() -> Duration {
    let s = std::env::var("COMPANION_TEST_CUT_S")
        .ok()
        .map(|v| v.parse::<u64>().expect("COMPANION_TEST_CUT_S: seconds"))
        .unwrap_or(CUT_S);
    assert!(
        s >= 30,
        "COMPANION_TEST_CUT_S must leave both keep-alives time to expire"
    );
    Duration::from_secs(s)
}

#[derive(Clone, Copy, PartialEq)]
enum Db {
    Sqlite,
    Postgres,
}

/// The `companion-agent` daemon on simulated hardware, its log lines collected.
struct Agent {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Vec<String>,
    cache: PathBuf,
}

impl Agent {
    async fn start(dir: &Path, id: &str, token: &str, url: &str, ca: &Path) -> Agent {
        let cache = dir.join("cache");
        let env = dir.join("agent.env");
        std::fs::write(
            &env,
            format!(
                "DEVICE_ID={id}\nDEVICE_AUTH_TOKEN={token}\nCONTROL_PLANE_URL={url}\nCA_CERT={}\nCACHE_DIR={}\nMQTT_KEEPALIVE_S={KEEPALIVE_S}\n",
                ca.display(),
                cache.display()
            ),
        )
        .unwrap();
        let mut child = tokio::process::Command::new(common::ops::agent_binary().await)
            .env_clear()
            .env("RUST_LOG", "info")
            .arg("--env-file")
            .arg(&env)
            .arg("--hardware")
            .arg("sim")
            .arg("--button-socket")
            .arg(dir.join("buttons.sock"))
            .arg("--telemetry-interval-ms")
            .arg(TELEMETRY_MS.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent {
            child,
            lines,
            log: Vec::new(),
            cache,
        }
    }

    /// Waits for a log line containing `what` (after those already seen); returns it.
    async fn wait_line(&mut self, what: &str, deadline: Duration) -> String {
        let seen_before = self.log.len();
        let got = tokio::time::timeout(deadline, async {
            while let Some(line) = self.lines.recv().await {
                self.log.push(line.clone());
                if line.contains(what) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match got {
            Ok(Some(line)) => line,
            _ => panic!(
                "no agent line with {what:?} within {deadline:?}; agent log since:\n{}",
                self.log[seen_before..].join("\n")
            ),
        }
    }

    /// Collects what the agent logged so far.
    fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// The next telemetry seq the agent will produce (its persisted counter).
    fn next_seq(&self) -> u64 {
        std::fs::read_to_string(self.cache.join("telemetry.seq"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    async fn terminate(&mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the agent stops within the deadline of SIGTERM")
            .unwrap();
        assert!(status.success(), "agent exit: {status}");
        self.drain();
    }
}

/// The server's view of the device: presence and the stored telemetry.
#[derive(Debug, Clone)]
struct View {
    online: bool,
    reason: Option<String>,
    seq: Option<u64>,
    outbox_dropped: Option<f64>,
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
    device: String,
}

impl Api {
    async fn view(&self) -> View {
        let resp = self
            .http
            .get(format!("{}/api/v1/devices/{}", self.base, self.device))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET /devices/{id}");
        assert_eq!(resp.status(), 200, "GET /devices/{{id}}");
        let body: Value = resp.json().await.expect("a JSON device");
        View {
            online: body["presence"]["online"].as_bool().unwrap_or(false),
            reason: body["presence"]["last_disconnect_reason"]
                .as_str()
                .map(str::to_owned),
            seq: body["telemetry"]["seq"].as_u64(),
            outbox_dropped: body["telemetry"]["extra"]["outbox_dropped"].as_f64(),
        }
    }

    /// Polls the device until `ok` holds, failing after `deadline` with the last view.
    async fn wait(&self, what: &str, deadline: Duration, ok: impl Fn(&View) -> bool) -> View {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let v = self.view().await;
            if ok(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "timed out after {deadline:?} waiting for {what}; last view {v:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap()
    }
}

fn metric(text: &str, name: &str) -> f64 {
    common::sample(text, name)
}

async fn a_60_s_black_hole_loses_no_telemetry(db: Db) {
    let pg = match db {
        Db::Sqlite => None,
        Db::Postgres => match fresh_pg_database().await {
            Some(url) => Some(url),
            None => return,
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cmd = companion_command(&data);
    // The test reads the device back every 100 ms.
    cmd.env("COMPANION_HTTP__RATE_LIMIT_PER_MINUTE", "1000000");
    if let Some(url) = &pg {
        cmd.env("DATABASE_URL", url);
    }
    let mut server = ServerProcess::start(cmd).await;
    let token = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_owned();
    let ca = data.join("tls").join("ca.pem");
    let http = reqwest::Client::new();
    let resp = http
        .post(server.url("/api/v1/devices"))
        .bearer_auth(&token)
        .json(&json!({ "name": "cut", "device_type": "simulated", "capabilities": ["buttons"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    let id = body["device_id"].as_str().unwrap().to_owned();
    let device_token = body["auth_token"].as_str().unwrap().to_owned();
    let api = Api {
        http,
        base: format!("http://{}", server.http),
        token,
        device: id.clone(),
    };

    let proxy = TcpProxy::start(server.mqtts.expect("mqtts")).await;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let mut agent = Agent::start(
        &agent_dir,
        &id,
        &device_token,
        &format!("mqtts://localhost:{}", proxy.addr.port()),
        &ca,
    )
    .await;
    agent.wait_line("connected", DEADLINE).await;
    api.wait("telemetry stored before the cut", DEADLINE, |v| {
        v.online && v.seq >= Some(20)
    })
    .await;

    // Watch the stored seq all along: it never goes back.
    let history = Arc::new(Mutex::new(Vec::<u64>::new()));
    let watcher = {
        let history = history.clone();
        let api = Api {
            http: api.http.clone(),
            base: api.base.clone(),
            token: api.token.clone(),
            device: id.clone(),
        };
        tokio::spawn(async move {
            loop {
                if let Some(s) = api.view().await.seq {
                    let mut h = history.lock().unwrap();
                    if h.last() != Some(&s) {
                        h.push(s);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // The cut.
    let cut = cut_duration();
    let produced_before = agent.next_seq();
    let cut_at = tokio::time::Instant::now();
    proxy.black_hole();
    agent.wait_line("connection lost", cut).await;
    let agent_noticed = cut_at.elapsed();
    let offline = api
        .wait("the server to notice the dead connection", cut, |v| {
            !v.online
        })
        .await;
    let server_noticed = cut_at.elapsed();
    assert_eq!(
        offline.reason.as_deref(),
        Some("keepalive_timeout"),
        "the server dropped the half-open connection by keep-alive: {offline:?}"
    );
    let m = api.metrics().await;
    assert_eq!(
        metric(&m, "broker_connected_devices"),
        0.0,
        "no session is held for the dead connection"
    );
    // The rest of the cut (the fault itself lasts this long; nothing is ordered by it): the
    // agent keeps producing, and keeps failing to connect.
    tokio::time::sleep_until(cut_at + cut).await;
    let produced_during = agent.next_seq() - produced_before;
    let stored_during = api.view().await.seq.unwrap_or(0);
    assert!(
        stored_during < produced_before,
        "nothing crossed the black hole: stored {stored_during}, produced {produced_before} before the cut"
    );
    let log = agent.drain().to_vec();
    let refused = log.iter().filter(|l| l.contains("connect failed")).count();
    assert!(refused >= 1, "the agent tried to reconnect during the cut");
    assert!(
        produced_during >= cut.as_millis() as u64 / TELEMETRY_MS / 2,
        "the agent kept producing during the cut: {produced_during}"
    );

    // Restore: the agent comes back by itself and replays.
    proxy.restore();
    let restored_at = tokio::time::Instant::now();
    agent.wait_line("generation=2", RECONNECT_DEADLINE).await;
    let reconnected = restored_at.elapsed();
    api.wait("the device online again", DEADLINE, |v| v.online)
        .await;
    // Some telemetry after the cut, then everything up to it stored.
    let after = agent.next_seq() + 50;
    let until = tokio::time::Instant::now() + DEADLINE;
    while agent.next_seq() < after {
        assert!(
            tokio::time::Instant::now() < until,
            "the agent stopped producing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last_produced = agent.next_seq() - 1;
    let caught_up = api
        .wait("every seq produced so far to be stored", DEADLINE, |v| {
            v.seq >= Some(last_produced)
        })
        .await;
    assert_eq!(
        caught_up.outbox_dropped,
        Some(0.0),
        "the agent's offline buffer dropped nothing"
    );

    // Stop the agent, let the last acknowledgements settle, and count.
    agent.terminate().await;
    watcher.abort();
    // One consistent snapshot: the stored seq read before and after the metrics, unchanged
    // (a message still landing between two reads made the counts differ by one).
    let (stored, received, duplicates, gaps, invalid, lost, throttled) = {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let stored_before = api.view().await.seq.expect("telemetry stored");
            let m = api.metrics().await;
            let received = metric(&m, "backend_messages_received_total{kind=\"telemetry\"}");
            let duplicates = metric(&m, "telemetry_duplicates_total");
            let stored_now = api.view().await.seq.unwrap_or(0);
            if (stored_now == stored_before && received - duplicates == (stored_now + 1) as f64)
                || tokio::time::Instant::now() > until
            {
                break (
                    stored_now,
                    received,
                    duplicates,
                    metric(&m, "telemetry_gaps_total"),
                    metric(&m, "backend_messages_invalid_total{kind=\"telemetry\"}"),
                    metric(&m, "broker_messages_lost_total"),
                    metric(&m, "broker_publishes_throttled_total"),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let history = history.lock().unwrap().clone();
    let summary = format!(
        "agent noticed the cut after {agent_noticed:?}, the server after {server_noticed:?}; \
         {produced_during} produced during the cut; reconnected {reconnected:?} after the restore; \
         stored seq {stored}, received {received}, duplicates {duplicates}, gaps {gaps}, \
         invalid {invalid}, lost {lost}, throttled {throttled}; proxy connections {}",
        proxy.accepted()
    );
    eprintln!("{summary}");
    assert_eq!(gaps, 0.0, "telemetry_gaps_total: {summary}");
    assert_eq!(invalid, 0.0, "{summary}");
    assert_eq!(lost, 0.0, "broker_messages_lost_total: {summary}");
    // The worker accepts a seq only above the last one and counts any skipped seq as a gap:
    // with no gap, seqs 0..=stored were each accepted once, in order.
    assert_eq!(
        received - duplicates,
        (stored + 1) as f64,
        "every received telemetry message is either stored in order or a duplicate: {summary}"
    );
    assert!(stored >= last_produced, "{summary}");
    assert!(
        history.windows(2).all(|w| w[0] < w[1]),
        "the stored seq went back: {history:?}"
    );
    let connects = agent
        .log
        .iter()
        .filter(|l| l.contains(" connected") && l.contains("generation="))
        .count();
    assert_eq!(connects, 2, "one connection before the cut, one after");
    let (status, _) = server.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_s_black_hole_loses_no_telemetry_on_sqlite() {
    a_60_s_black_hole_loses_no_telemetry(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_s_black_hole_loses_no_telemetry_on_postgres() {
    a_60_s_black_hole_loses_no_telemetry(Db::Postgres).await;
}
