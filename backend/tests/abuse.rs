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
    failed_login_from(LOGINS_FROM, to, tls, client_id, tally).await
}

/// One failed login over TLS from `source`.
async fn failed_login_from(
    source: &str,
    to: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    client_id: &str,
    tally: &LoginTally,
) {
    let attempt = async {
        let tcp = connect_from(source, to).await.ok()?;
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

/// The longest of the device's CONNACKs; a refusal fails the test.
fn slowest_connack(tries: &[Result<Duration, String>]) -> Duration {
    tries
        .iter()
        .map(|t| match t {
            Ok(took) => *took,
            Err(e) => panic!("the device was refused under attack: {e}"),
        })
        .max()
        .unwrap()
}

/// The tests of this file one at a time: the server runs in the test process, and one test
/// reads that process's memory.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _serial = ONE_AT_A_TIME.lock().await;
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
    let slowest = slowest_connack(&tries);
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
    assert_eq!(
        metric(&app, "backend_broker_events_dropped_total").await,
        0.0
    );
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
    let _serial = ONE_AT_A_TIME.lock().await;
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

/// This process's resident memory (the server runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Addresses of a distributed attacker: `127.0.<net>.1` … `127.0.<net>.<n>`.
fn addresses(net: u8, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("127.0.{net}.{i}")).collect()
}

const SPREAD_ADDRESSES: usize = 100;
/// Slow sockets per address: 600 in all, each address under its pending cap (100), all of
/// them under the global one (1,024): every one is admitted and must be reaped by a timeout.
const SLOW_PER_ADDRESS: usize = 6;
/// Failed logins per address: 1,500 in all, each address under the failed-login block (20),
/// so every one reaches the authenticator.
const LOGINS_PER_ADDRESS: usize = 15;
const REAP_AFTER: Duration = Duration::from_millis(1_500);

/// The attack spread over 200 addresses, each under every per-address limit, on the shipped
/// defaults but for shorter handshake and CONNECT timeouts: the held sockets are closed by
/// the server when their timeouts run out (not by the attacker), every failed login is
/// counted and audited in rows bounded by the addresses rather than the attempts, the
/// registered device connects within a second throughout, and memory stays bounded.
async fn a_distributed_attacker_is_timed_out_and_summed_up(kind: DbKind) {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(app) = TestApp::start_with(kind, |s| {
        s.mqtt.tls_handshake_timeout_ms = REAP_AFTER.as_millis() as u64;
        s.mqtt.connect_timeout_ms = REAP_AFTER.as_millis() as u64;
        s.mqtt.auth_failure_window_s = WINDOW_S;
    })
    .await
    else {
        return;
    };
    let (device, token) = app.register("legit").await;
    let (victim, _) = app.register("victim").await;
    Client::connect(app.device_tls(&device, &token))
        .await
        .expect("the device connects before the attack");
    let rss_before = rss_kib();
    let done = Arc::new(AtomicBool::new(false));
    let legit_loop = tokio::spawn(keep_connecting(
        app.device_tls(&device, &token),
        done.clone(),
    ));

    // Slow sockets from 100 addresses: idle, half a ClientHello, a whole one.
    let hello = client_hello(app.client_tls());
    let mut slow = Vec::new();
    for (a, source) in addresses(1, SPREAD_ADDRESSES).iter().enumerate() {
        for i in 0..SLOW_PER_ADDRESS {
            let mut s = connect_from(source, app.mqtts).await.expect("admitted");
            let part = match (a + i) % 3 {
                0 => 0,
                1 => hello.len() / 2,
                _ => hello.len(),
            };
            s.write_all(&hello[..part]).await.unwrap();
            slow.push(s);
        }
    }
    let held = slow.len();

    // Failed logins from 100 other addresses, 16 at a time.
    let tally = Arc::new(LoginTally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let sources = Arc::new(addresses(2, SPREAD_ADDRESSES));
    let connector = tokio_rustls::TlsConnector::from(app.client_tls());
    let total = SPREAD_ADDRESSES * LOGINS_PER_ADDRESS;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (tally, next, connector, sources) = (
            tally.clone(),
            next.clone(),
            connector.clone(),
            sources.clone(),
        );
        let (to, victim) = (app.mqtts, victim.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let source = &sources[i % SPREAD_ADDRESSES];
                let id = if i % 2 == 0 {
                    victim.clone()
                } else {
                    format!("ghost-{i}")
                };
                failed_login_from(source, to, connector.clone(), &id, &tally).await;
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let attack = started.elapsed();
    let tally = Arc::into_inner(tally).unwrap();
    assert_eq!(
        tally.accepted.into_inner(),
        0,
        "no wrong credential accepted"
    );
    assert_eq!(
        tally.refused.into_inner(),
        total,
        "each address stayed under the block: every login answered by CONNACK"
    );

    // The server, not the attacker, closes the held sockets when their timeouts run out.
    let reaped = Instant::now();
    let closed = futures::future::join_all(slow.iter_mut().map(|s| async move {
        let mut buf = [0u8; 4096];
        tokio::time::timeout(DEADLINE, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // the ServerHello for a whole ClientHello
                }
            }
        })
        .await
        .is_ok()
    }))
    .await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(
        open, 0,
        "{open} of {held} held sockets left open by the server"
    );
    let reap_took = reaped.elapsed();
    // A socket silent or stopped inside its handshake is a TLS handshake timeout; one that
    // finished it and sent no CONNECT, a connect timeout.
    let handshakes = metric(
        &app,
        "broker_tls_handshake_failures_total{reason=\"timeout\"}",
    )
    .await;
    let connects = metric(&app, "broker_connects_total{result=\"timeout\"}").await;
    assert!(
        handshakes + connects >= held as f64,
        "{handshakes} handshake and {connects} CONNECT timeouts for {held} held sockets"
    );
    done.store(true, Ordering::Relaxed);
    let tries = legit_loop.await.unwrap();
    // Nothing left pending once the device's last connect is through (the held sockets'
    // slots were given back when the server closed them).
    assert_eq!(metric(&app, "broker_pending_connections").await, 0.0);
    let slowest = slowest_connack(&tries);
    assert!(
        slowest < LEGIT_CONNACK_WITHIN,
        "the device's CONNACK took {slowest:?} under attack: {tries:?}"
    );

    // Every attempt counted once; the audit's rows sum to them, at most a first row and a
    // summary per address, reason and window.
    let counted = auth_failures(&app).await;
    assert_eq!(counted, total as f64, "every attempt counted once");
    let deadline = tokio::time::Instant::now() + DEADLINE + Duration::from_secs(2 * WINDOW_S);
    let rows = loop {
        let rows: Vec<Value> = app
            .audit("mqtt.connect")
            .await
            .into_iter()
            .filter(|r| {
                r["remote_addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.2."))
            })
            .collect();
        let sum: u64 = rows.iter().map(attempts_in).sum();
        if sum == total as u64 {
            break rows;
        }
        assert!(
            sum < total as u64 && tokio::time::Instant::now() < deadline,
            "the audit counts {sum} attempts, the broker refused {total}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let windows = attack.as_secs() / WINDOW_S + 2;
    assert!(
        rows.len() as u64 <= 2 * 2 * SPREAD_ADDRESSES as u64 * windows,
        "{} audit rows for {total} attempts over {attack:?}",
        rows.len()
    );
    assert!(
        rows.len() < total / 2,
        "{} rows for {total} attempts",
        rows.len()
    );

    // Bounded: the tables hold the addresses, and memory does not grow with the attempts.
    assert!(metric(&app, "broker_auth_throttle_addresses").await <= SPREAD_ADDRESSES as f64);
    let rss_after = rss_kib();
    let grew = rss_after.saturating_sub(rss_before);
    assert!(
        grew < 64 * 1024,
        "memory grew by {grew} KiB over {held} held sockets and {total} failed logins"
    );
    eprintln!(
        "distributed attack: {held} slow sockets from {SPREAD_ADDRESSES} addresses all closed by \
         the server {reap_took:?} after the logins ended; {total} failed logins from \
         {SPREAD_ADDRESSES} addresses in {attack:?}, {} audit rows; the device's slowest \
         CONNACK of {} was {slowest:?}; RSS {rss_before} -> {rss_after} KiB",
        rows.len(),
        tries.len(),
    );
    assert_eq!(status(&app, "/ready").await, 200);
    app.stop().await;
}
on_both_databases!(a_distributed_attacker_is_timed_out_and_summed_up);
