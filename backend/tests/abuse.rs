//! Connection abuse on the TLS MQTT port, against the real server with real TLS (issue #14).
//! An attacker holds hundreds of idle sockets and half-finished TLS handshakes from 127.0.0.2
//! and runs thousands of failed logins from 127.0.0.3 (a second address of its own, so that
//! the failed-login throttle is reached rather than the first address's pending cap);
//! meanwhile a registered device keeps connecting from 127.0.0.1. The device gets its CONNACK
//! within a second every time, the throttle refuses the flood before the database, the audit
//! log holds a few aggregated rows whose counts add up to every refused attempt, the tables
//! stay bounded and the server stays healthy.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::app::{Client, DbKind, TestApp, DEADLINE};
use common::device::metric;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Where the idle sockets and the half-finished handshakes come from.
const SLOW_FROM: &str = "127.0.0.2";
/// Where the failed logins come from.
const LOGINS_FROM: &str = "127.0.0.3";
const IDLE: usize = 300;
const HALF_HANDSHAKES: usize = 300;
const FAILED_LOGINS: usize = 3_000;
/// Failed logins in flight at once.
const WORKERS: usize = 16;
/// A deployment smaller than the default, so that the slow sockets alone could fill it.
const MAX_CONNECTIONS: usize = 500;
const PENDING_PER_IP: usize = 100;
const FAILURES_PER_IP: u32 = 20;
/// Short, so that the summaries of the attack's windows are written while the test waits.
const WINDOW_S: u64 = 3;
/// The device's CONNACK, every time.
const LEGIT_CONNACK_WITHIN: Duration = Duration::from_secs(1);

/// A TCP connection to `to` from the local address `source` (any 127.x.y.z works on Linux).
async fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0))?;
    socket.connect(to).await
}

/// The bytes of a real TLS ClientHello for `localhost`.
fn client_hello(tls: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(tls, "localhost".try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// An MQTT 3.1.1 CONNECT (clean session, keepalive 30 s) with a username and password.
fn connect_packet(client_id: &str, password: &str) -> Vec<u8> {
    fn put(b: &mut Vec<u8>, s: &[u8]) {
        b.extend_from_slice(&(s.len() as u16).to_be_bytes());
        b.extend_from_slice(s);
    }
    let mut body = Vec::new();
    put(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 30]);
    put(&mut body, client_id.as_bytes());
    put(&mut body, client_id.as_bytes());
    put(&mut body, password.as_bytes());
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

#[derive(Debug, Default)]
struct LoginTally {
    /// Answered with a refusing CONNACK.
    refused: AtomicUsize,
    /// Closed without a CONNACK (refused before the TLS handshake or the CONNECT).
    closed: AtomicUsize,
    accepted: AtomicUsize,
}

/// One failed login over TLS from `LOGINS_FROM`.
async fn failed_login(
    to: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    client_id: &str,
    tally: &LoginTally,
) {
    let attempt = async {
        let tcp = connect_from(LOGINS_FROM, to).await.ok()?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut stream = tls.connect(name, tcp).await.ok()?;
        stream
            .write_all(&connect_packet(client_id, "not-the-token"))
            .await
            .ok()?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await.ok()?;
        Some(connack)
    };
    match tokio::time::timeout(DEADLINE, attempt).await {
        Ok(Some([0x20, 0x02, _, 0])) => tally.accepted.fetch_add(1, Ordering::Relaxed),
        Ok(Some([0x20, 0x02, _, _])) => tally.refused.fetch_add(1, Ordering::Relaxed),
        Ok(other) => {
            assert!(other.is_none(), "not a CONNACK: {other:?}");
            tally.closed.fetch_add(1, Ordering::Relaxed)
        }
        Err(_) => panic!("a failed login neither answered nor closed within {DEADLINE:?}"),
    };
}

/// How many attempts an `mqtt.connect` audit row stands for: 1, or 1 + N for
/// "<reason> (N more attempts in W s)" (the first attempt of a window has its own row).
fn attempts_in(row: &Value) -> u64 {
    let detail = row["detail"].as_str().unwrap_or_default();
    match detail.split_once(" (") {
        None => 1,
        Some((_, rest)) => {
            let n = rest.split_whitespace().next().unwrap();
            n.parse::<u64>()
                .unwrap_or_else(|_| panic!("no count in {detail:?}"))
        }
    }
}

const DENY_REASONS: [&str; 7] = [
    "unknown_device",
    "bad_token",
    "disabled",
    "identity_mismatch",
    "reserved_client_id",
    "unavailable",
    "throttled",
];

async fn auth_failures(app: &TestApp) -> f64 {
    let mut sum = 0.0;
    for reason in DENY_REASONS {
        let sample = format!("broker_auth_failures_total{{reason=\"{reason}\"}}");
        sum += metric(app, &sample).await;
    }
    sum
}

async fn status(app: &TestApp, path: &str) -> u16 {
    let resp = app.client.get(app.url(path)).send().await.unwrap();
    resp.status().as_u16()
}

/// Connects the device again and again from 127.0.0.1 until `done` (and at least 5 times);
/// how long each CONNACK took.
async fn keep_connecting(
    options: rumqttc::MqttOptions,
    done: Arc<AtomicBool>,
) -> Vec<Result<Duration, String>> {
    let mut tries = Vec::new();
    while !done.load(Ordering::Relaxed) || tries.len() < 5 {
        let t = Instant::now();
        match Client::connect(options.clone()).await {
            Ok(c) => {
                tries.push(Ok(t.elapsed()));
                let _ = c.client.disconnect().await;
            }
            Err(e) => tries.push(Err(e.to_string())),
        }
    }
    tries
}

async fn an_abusive_attacker_neither_locks_devices_out_nor_floods_the_audit_log(kind: DbKind) {
    let Some(app) = TestApp::start_with(kind, |s| {
        s.mqtt.max_connections = MAX_CONNECTIONS;
        s.mqtt.max_pending_per_ip = PENDING_PER_IP;
        s.mqtt.auth_failures_per_ip = FAILURES_PER_IP;
        s.mqtt.auth_failure_window_s = WINDOW_S;
        s.mqtt.auth_block_s = 60;
    })
    .await
    else {
        return;
    };
    let (device, token) = app.register("legit").await;
    let (victim, _) = app.register("victim").await;
    let legit = Client::connect(app.device_tls(&device, &token))
        .await
        .expect("the device connects before the attack");
    let _ = legit.client.disconnect().await;

    // 1. Idle sockets and half-finished handshakes, all from one address.
    let hello = client_hello(app.client_tls());
    let mut slow = Vec::new();
    for i in 0..IDLE + HALF_HANDSHAKES {
        let Ok(mut s) = connect_from(SLOW_FROM, app.mqtts).await else {
            continue;
        };
        if i >= IDLE {
            // Half of them stop inside the ClientHello, half after it (the server has
            // answered and holds the handshake's state, waiting for the client's next flight).
            let part = if i % 2 == 0 {
                hello.len() / 2
            } else {
                hello.len()
            };
            let _ = s.write_all(&hello[..part]).await;
        }
        slow.push(s);
    }
    let started = Instant::now();

    // 2. Failed logins from the second address, as fast as the server answers them: half a
    // wrong token for a real device, half devices that do not exist. Meanwhile the registered
    // device keeps connecting.
    let tally = Arc::new(LoginTally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let connector = tokio_rustls::TlsConnector::from(app.client_tls());
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (tally, next, connector) = (tally.clone(), next.clone(), connector.clone());
        let (to, victim) = (app.mqtts, victim.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= FAILED_LOGINS {
                    return;
                }
                let id = if i % 2 == 0 {
                    victim.clone()
                } else {
                    format!("ghost-{i}")
                };
                failed_login(to, connector.clone(), &id, &tally).await;
            }
        }));
    }
    let legit_loop = tokio::spawn(keep_connecting(
        app.device_tls(&device, &token),
        done.clone(),
    ));
    let mut pending_peak: f64 = 0.0;
    for w in workers {
        pending_peak = pending_peak.max(metric(&app, "broker_pending_connections").await);
        w.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let tries = legit_loop.await.unwrap();
    let attack = started.elapsed();

    let tally = Arc::into_inner(tally).unwrap();
    let (refused, closed) = (tally.refused.into_inner(), tally.closed.into_inner());
    assert_eq!(
        tally.accepted.into_inner(),
        0,
        "no wrong credential accepted"
    );
    assert_eq!(refused + closed, FAILED_LOGINS);

    // The device got its CONNACK within a second, every time.
    let slowest = tries
        .iter()
        .map(|t| match t {
            Ok(took) => *took,
            Err(e) => panic!("the device was refused under attack: {e}"),
        })
        .max()
        .unwrap();
    assert!(
        slowest < LEGIT_CONNACK_WITHIN,
        "the device's CONNACK took {slowest:?} under attack: {tries:?}"
    );

    // The slow address got its share of pending slots and no more.
    let too_many = metric(&app, "broker_connects_total{result=\"too_many_pending\"}").await;
    assert!(
        too_many >= (IDLE + HALF_HANDSHAKES - 2 * PENDING_PER_IP) as f64,
        "slow sockets over the per-address cap refused: {too_many}"
    );
    assert!(
        pending_peak <= (PENDING_PER_IP + WORKERS + 2) as f64,
        "{pending_peak}"
    );
    assert_eq!(
        metric(&app, "broker_connects_total{result=\"over_capacity\"}").await,
        0.0
    );

    // Few logins reached the authenticator (and the database): the rest were refused first.
    let looked_up = metric(&app, "broker_auth_failures_total{reason=\"bad_token\"}").await
        + metric(
            &app,
            "broker_auth_failures_total{reason=\"unknown_device\"}",
        )
        .await;
    assert!(
        looked_up <= f64::from(FAILURES_PER_IP) + WORKERS as f64,
        "{looked_up} failed logins reached the authenticator"
    );
    let throttled = metric(&app, "broker_auth_failures_total{reason=\"throttled\"}").await;
    assert!(throttled > 0.0);
    assert!(metric(&app, "broker_auth_throttle_blocks_total").await >= 1.0);
    let counted = auth_failures(&app).await;
    assert_eq!(counted, FAILED_LOGINS as f64, "every attempt counted once");

    // Bounded: the per-address tables hold a few entries.
    assert!(metric(&app, "broker_auth_throttle_addresses").await <= 2.0);
    assert!(metric(&app, "backend_audit_pending_summaries").await <= 2.0 * 3.0);

    // The audit log: a few rows, and their counts add up to every refused attempt. The last
    // windows' summaries are written when those windows close.
    let deadline = tokio::time::Instant::now() + DEADLINE + Duration::from_secs(2 * WINDOW_S);
    let rows = loop {
        let rows: Vec<Value> = app
            .audit("mqtt.connect")
            .await
            .into_iter()
            .filter(|r| r["remote_addr"] == LOGINS_FROM)
            .collect();
        let sum: u64 = rows.iter().map(attempts_in).sum();
        if sum as f64 == counted {
            break rows;
        }
        assert!(
            sum as f64 <= counted,
            "the audit counts {sum} attempts, the broker refused {counted}: {rows:#?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the audit counts {sum} attempts, the broker refused {counted}: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(rows.iter().all(|r| r["outcome"] == "denied"));
    let aggregated = rows.iter().filter(|r| attempts_in(r) > 1).count();
    assert!(aggregated >= 1, "no aggregated row: {rows:#?}");
    // At most a first row and a summary per (address, reason) and window: three reasons.
    let windows = attack.as_secs() / WINDOW_S + 2;
    assert!(
        rows.len() as u64 <= 2 * 3 * windows,
        "{} audit rows for {FAILED_LOGINS} attempts over {attack:?}: {rows:#?}",
        rows.len()
    );
    for row in &rows {
        let text = row.to_string();
        assert!(
            !text.contains("not-the-token"),
            "a secret in the audit: {text}"
        );
    }
    assert_eq!(metric(&app, "backend_broker_events_dropped").await, 0.0);
    eprintln!(
        "attack of {attack:?}: {FAILED_LOGINS} failed logins ({refused} refused by CONNACK, \
         {closed} closed before one; {looked_up} reached the authenticator), {} audit rows \
         ({aggregated} aggregated); the device's slowest CONNACK of {} was {slowest:?}",
        rows.len(),
        tries.len(),
    );

    // Healthy: alive, ready, and once the slow sockets go nothing is left pending and the
    // device still connects.
    assert_eq!(status(&app, "/health").await, 200);
    assert_eq!(status(&app, "/ready").await, 200);
    drop(slow);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while metric(&app, "broker_pending_connections").await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pending connections left behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Client::connect(app.device_tls(&device, &token))
        .await
        .expect("the device connects after the attack");
    app.stop().await;
}
on_both_databases!(an_abusive_attacker_neither_locks_devices_out_nor_floods_the_audit_log);

/// At shutdown the summaries of open windows are written, so no refused attempt goes
/// uncounted in the audit log.
async fn refused_logins_still_counted_are_written_at_shutdown(kind: DbKind) {
    let Some(app) = TestApp::start_with(kind, |s| {
        s.mqtt.auth_failure_window_s = 3_600;
    })
    .await
    else {
        return;
    };
    let connector = tokio_rustls::TlsConnector::from(app.client_tls());
    let tally = LoginTally::default();
    for i in 0..5 {
        failed_login(app.mqtts, connector.clone(), &format!("ghost-{i}"), &tally).await;
    }
    assert_eq!(tally.refused.load(Ordering::Relaxed), 5);
    // Only the window's first row so far.
    let first = app
        .wait_audit("mqtt.connect", |r| r["remote_addr"] == LOGINS_FROM)
        .await;
    assert_eq!(first["detail"], "unknown_device");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while metric(&app, "backend_audit_pending_summaries").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "no open window");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.audit("mqtt.connect").await.len(), 1);

    // Stop, and read the log from the same data directory (and database) after a restart.
    let (settings, dir) = app.stop().await;
    let app = TestApp::start_settings(settings, dir).await;
    let details: Vec<Value> = app
        .audit("mqtt.connect")
        .await
        .into_iter()
        .map(|r| r["detail"].clone())
        .collect();
    assert_eq!(
        details,
        [
            "unknown_device (4 more attempts in 3600 s)",
            "unknown_device"
        ]
    );
    app.stop().await;
}
on_both_databases!(refused_logins_still_counted_are_written_at_shutdown);
