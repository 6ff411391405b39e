//! Shared test helpers: databases (SQLite files, fresh PostgreSQL databases) and a running
//! `companion` process.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use rand::Rng;

/// The URL of a PostgreSQL server for tests (`DATABASE_URL`, a `postgres://` URL whose role
/// may `CREATE DATABASE`); each test gets a fresh database on that server. In CI (`CI=true`) a
/// missing URL fails the test; elsewhere the test is skipped with a printed reason.
pub fn pg_admin_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Some(url),
        _ => {
            if in_ci() {
                panic!("CI is set but DATABASE_URL is not a postgres:// URL: PostgreSQL tests are required in CI");
            }
            eprintln!("skipping PostgreSQL test: DATABASE_URL is not a postgres:// URL");
            None
        }
    }
}

/// The value of the sample `name` (with its labels, if any: `foo_total{kind="x"}`) in a
/// Prometheus text exposition. 0 when its family is declared but has no such sample yet (a
/// label set never counted); a name no family declares fails the test, so a misspelt metric
/// cannot pass as zero.
pub fn sample(text: &str, name: &str) -> f64 {
    if let Some(v) = text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
    {
        return v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: not a number: {v:?}"));
    }
    let base = name.split('{').next().unwrap_or(name);
    let family = ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| base.strip_suffix(s))
        .unwrap_or(base);
    let declared = |f: &str| {
        text.lines()
            .any(|l| l.strip_prefix("# TYPE ").and_then(|t| t.split(' ').next()) == Some(f))
    };
    assert!(
        declared(family) || declared(base),
        "no metric family declares {name:?} in /metrics"
    );
    0.0
}

/// Whether the tests run in CI (`CI` set to anything but empty, `0` or `false`), where
/// a missing dependency fails a test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
}

/// Creates a fresh, uniquely named database and returns its URL.
pub async fn fresh_pg_database() -> Option<String> {
    let admin = pg_admin_url()?;
    sqlx::any::install_default_drivers();
    let name = format!("companion_test_{:016x}", rand::rng().random::<u64>());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
        .await
        .expect("connect to the PostgreSQL admin URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    let base = admin
        .rsplit_once('/')
        .map(|(base, _)| base.to_string())
        .expect("admin URL has a database path");
    Some(format!("{base}/{name}"))
}

/// A TLS client configuration that trusts only the CA in `ca_pem` (the server's generated one).
pub fn client_tls_config(ca_pem: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    let pem = std::fs::read(ca_pem).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// rumqttc 3.1.1 options for a device over MQTT+TLS to `localhost:port`, verifying `ca_pem`.
pub fn device_tls_options(ca_pem: &Path, port: u16, id: &str, token: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, "localhost", port);
    o.set_credentials(id, token);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_tls_config(ca_pem)),
    ));
    o
}

/// A `companion` process started by a test, with its stderr collected.
pub struct ServerProcess {
    pub child: Child,
    pub http: SocketAddr,
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    lines: mpsc::UnboundedReceiver<String>,
    pub log: Vec<String>,
}

/// A `Command` for the `companion` binary with a clean environment for `data_dir`.
pub fn companion_command(data_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_companion"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("COMPANION_DATA_DIR", data_dir)
        .env("COMPANION_HTTP__LISTEN", "127.0.0.1:0")
        .env("COMPANION_MQTT__LISTEN", "127.0.0.1:0")
        .env("COMPANION_MQTT__TLS_LISTEN", "127.0.0.1:0")
        .env("COMPANION_MQTT__WS_LISTEN", "127.0.0.1:0")
        .env("COMPANION_MQTT__WSS_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs a command to completion with a deadline, returning its status and stderr.
pub async fn run_to_exit(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("companion exits within 60 s")
        .expect("run companion");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl ServerProcess {
    /// Starts the command and waits (up to 60 s) for the `listening` line.
    pub async fn start(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("spawn companion");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut log = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let line = match tokio::time::timeout_at(deadline, lines.recv()).await {
                Ok(Some(line)) => line,
                _ => panic!(
                    "companion did not report listening; log:\n{}",
                    log.join("\n")
                ),
            };
            log.push(line.clone());
            if let Some(at) = line.find("listening http=") {
                let rest = &line[at + "listening ".len()..];
                let field = |name: &str| -> Option<SocketAddr> {
                    rest.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                        .and_then(|v| v.parse().ok())
                };
                let http = field("http").expect("http address in the listening line");
                return Self {
                    child,
                    http,
                    mqtt: field("mqtt"),
                    mqtts: field("mqtts"),
                    ws: field("ws"),
                    wss: field("wss"),
                    lines,
                    log,
                };
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// Registers a device named `name` through this server's API with `admin_token`: its id
    /// and token.
    pub async fn register(
        &self,
        http: &reqwest::Client,
        admin_token: &str,
        name: &str,
    ) -> (String, String) {
        let resp = http
            .post(self.url("/api/v1/devices"))
            .bearer_auth(admin_token)
            .json(&serde_json::json!({ "name": name, "device_type": "simulated", "capabilities": ["leds", "buttons"] }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let body: serde_json::Value = resp.json().await.unwrap();
        (
            body["device_id"].as_str().unwrap().to_owned(),
            body["auth_token"].as_str().unwrap().to_owned(),
        )
    }

    /// Sends SIGTERM and waits for the exit, returning the status and how long it took.
    pub async fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let pid = self.child.id().expect("running").to_string();
        let start = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("companion exits within 10 s of SIGTERM")
            .expect("wait for companion");
        let took = start.elapsed();
        // The reader task ends with the pipe; collect what it forwarded.
        while let Some(line) = self.lines.recv().await {
            self.log.push(line);
        }
        (status, took)
    }

    /// Collects what the process has logged so far.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        &self.log
    }
}
pub mod agent;
pub mod app;
pub mod device;
pub mod ops;
pub mod proxy;
pub mod rabbitmq;
