//! Registration throughput and MQTT authentication rate, measured against the real server
//! (in process, port 0) on SQLite and, when `DATABASE_URL` is a postgres:// URL, PostgreSQL.
//!
//! `cargo bench -p companion-backend --bench registry`
//! Environment: `BENCH_REGISTRATIONS` (default 2000), `BENCH_CONCURRENCY` (16),
//! `BENCH_CONNECTS` (500), `BENCH_HOOK_REQUESTS` (20000: external-broker hook calls per kind).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_backend::app::{App, Listeners};
use companion_backend::settings::{Secret, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const HOOK_SECRET: &str = "bench-hook-secret";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(what: &str, n: usize, took: Duration, mut lat: Vec<Duration>) {
    lat.sort();
    println!(
        "{what:<44} {n:>6} in {:>6.2} s = {:>8.0}/s   p50 {:>7.2} ms  p99 {:>7.2} ms",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1000.0,
        percentile(&lat, 0.99).as_secs_f64() * 1000.0,
    );
}

/// A minimal MQTT 3.1.1 CONNECT.
fn connect_packet(id: &str, token: &str) -> Vec<u8> {
    fn put(b: &mut Vec<u8>, s: &[u8]) {
        b.extend_from_slice(&(s.len() as u16).to_be_bytes());
        b.extend_from_slice(s);
    }
    let mut body = Vec::new();
    put(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0b1100_0010, 0, 30]);
    put(&mut body, id.as_bytes());
    put(&mut body, id.as_bytes());
    put(&mut body, token.as_bytes());
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

/// CONNECT → CONNACK accepted, then DISCONNECT.
async fn mqtt_connect(addr: SocketAddr, id: &str, token: &str) -> Duration {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).ok();
    s.write_all(&connect_packet(id, token))
        .await
        .expect("write");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.expect("connack");
    assert_eq!(ack[3], 0, "connection accepted");
    let took = start.elapsed();
    let _ = s.write_all(&[0xe0, 0]).await;
    took
}

async fn run(label: &str, database_url: Option<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings {
        data_dir: dir.path().join("data"),
        ..Settings::default()
    };
    settings.http.rate_limit_per_minute = 1_000_000_000;
    settings.database.url = database_url.map(Secret::new);
    settings.database.max_connections = 16;
    settings.mqtt_hook.secret = Some(Secret::new(HOOK_SECRET));
    settings.mqtt_hook.requests_per_minute = 1_000_000_000;
    let shutdown = CancellationToken::new();
    let app = App::build(
        settings,
        Listeners::ephemeral().await.expect("bind"),
        shutdown.clone(),
    )
    .await
    .expect("server builds");
    let http = app.addrs().http;
    let mqtt = app.addrs().mqtt.expect("plain mqtt");
    let token = app.admin_token().expose().to_owned();
    let ctx = app.context().clone();
    let server = tokio::spawn(app.run());

    let n = env("BENCH_REGISTRATIONS", 2000);
    let c = env("BENCH_CONCURRENCY", 16);
    let client = reqwest::Client::new();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..c {
        let client = client.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut creds = Vec::new();
            for i in (w..n).step_by(c) {
                let t = Instant::now();
                let resp = client
                    .post(format!("http://{http}/api/v1/devices"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({ "name": format!("bench {i}"), "device_type": "simulated" }))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(resp.status(), 201);
                let body: serde_json::Value = resp.json().await.expect("json");
                lat.push(t.elapsed());
                creds.push((
                    body["device_id"].as_str().unwrap_or_default().to_owned(),
                    body["auth_token"].as_str().unwrap_or_default().to_owned(),
                ));
            }
            (lat, creds)
        }));
    }
    let mut lat = Vec::new();
    let mut creds = Vec::new();
    for t in tasks {
        let (l, c) = t.await.expect("task");
        lat.extend(l);
        creds.extend(c);
    }
    report(
        &format!("[{label}] registrations, {c} concurrent"),
        n,
        start.elapsed(),
        lat,
    );

    let m = env("BENCH_CONNECTS", 500).min(creds.len());
    let creds = Arc::new(creds[..m].to_vec());
    for round in ["cold cache", "warm cache"] {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..c {
            let creds = creds.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in (w..creds.len()).step_by(c) {
                    lat.push(mqtt_connect(mqtt, &creds[i].0, &creds[i].1).await);
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("task"));
        }
        report(
            &format!("[{label}] MQTT authentications, {round}"),
            m,
            start.elapsed(),
            lat,
        );
    }
    // The external-broker hooks: an EMQX login and a RabbitMQ topic check per request, as a
    // broker node would send them (one HTTP/1.1 connection per worker, kept alive).
    let requests = env("BENCH_HOOK_REQUESTS", 20_000);
    for (what, path) in [
        ("hook logins (EMQX authn)", "/api/v1/mqtt/emqx/authn"),
        (
            "hook topic checks (RabbitMQ topic)",
            "/api/v1/mqtt/rabbitmq/topic",
        ),
    ] {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..c {
            let creds = creds.clone();
            let client = reqwest::Client::new();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in (w..requests).step_by(c) {
                    let (id, token) = &creds[i % creds.len()];
                    let req = client
                        .post(format!("http://{http}{path}"))
                        .bearer_auth(HOOK_SECRET);
                    let req = if path.ends_with("authn") {
                        req.json(&serde_json::json!({ "clientid": id, "username": id, "password": token }))
                    } else {
                        req.form(&[
                            ("username", id.as_str()),
                            ("vhost", "/"),
                            ("resource", "topic"),
                            ("name", "amq.topic"),
                            ("permission", "write"),
                            ("routing_key", &format!("devices.{id}.telemetry")),
                        ])
                    };
                    let t = Instant::now();
                    let resp = req.send().await.expect("request");
                    assert_eq!(resp.status(), 200);
                    let body = resp.text().await.expect("body");
                    assert!(body.contains("allow"), "{body}");
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("task"));
        }
        report(
            &format!("[{label}] {what}, {c} concurrent"),
            requests,
            start.elapsed(),
            lat,
        );
    }
    let _ = ctx;
    shutdown.cancel();
    let _ = server.await;
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        run("sqlite", None).await;
        match std::env::var("DATABASE_URL") {
            Ok(url) if url.starts_with("postgres") => {
                sqlx::any::install_default_drivers();
                let name = format!("companion_bench_{}", std::process::id());
                let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create the bench database");
                let base = url
                    .rsplit_once('/')
                    .map(|(b, _)| b.to_owned())
                    .unwrap_or(url.clone());
                run("postgres", Some(format!("{base}/{name}"))).await;
            }
            _ => println!("(PostgreSQL skipped: DATABASE_URL is not a postgres:// URL)"),
        }
    });
}
