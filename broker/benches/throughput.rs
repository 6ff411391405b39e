//! Throughput bench: N devices x M msg/s of 160-byte telemetry (QoS 0) through (1) the edge
//! and its embedded router, (2) Mosquitto, one after the other in the same run. The broker
//! under test runs in a child process (this binary re-executed with `--serve-broker`;
//! Mosquitto is its own process) so its CPU time is measured alone from `/proc/<pid>/stat`.
//! Publishers are rumqttc clients in this process. The subscriber on `devices/+/telemetry` is
//! where the backend would be: for the edge an in-process router client inside the child (so
//! its cost counts for the edge), for Mosquitto a rumqttc client in this process. Payloads
//! carry the wall-clock send time, so latency is measured across processes.
//!
//! `cargo bench -p companion-broker --bench throughput`
//! Environment: BENCH_DEVICES (default 100), BENCH_RATE msg/s per device (20), BENCH_SECS (15).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const PAYLOAD: usize = 160;

/// Wall-clock nanoseconds (both processes read the same clock).
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--serve-broker") {
        serve_broker();
        return;
    }
    let devices = env("BENCH_DEVICES", 100) as usize;
    let rate = env("BENCH_RATE", 20);
    let secs = env("BENCH_SECS", 15);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "{devices} devices x {rate} msg/s x {secs} s, {PAYLOAD}-byte QoS 0 telemetry, one subscriber on devices/+/telemetry"
    );
    println!(
        "{:<10} {:>10} {:>8} {:>14} {:>9} {:>9} {:>9}",
        "target", "received", "lost", "cpu s/M msg", "p50 ms", "p99 ms", "rss MiB"
    );
    for target in ["edge", "mosquitto"] {
        let r = rt.block_on(run_target(target, devices, rate, secs));
        println!(
            "{:<10} {:>10} {:>8} {:>14.2} {:>9.2} {:>9.2} {:>9.1}",
            target, r.received, r.lost, r.cpu_per_million, r.p50_ms, r.p99_ms, r.rss_mib
        );
    }
}

struct Report {
    received: usize,
    lost: usize,
    cpu_per_million: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
}

/// Where clients connect and how each device identifies itself.
struct Target {
    child: Child,
    port: u16,
    creds: Box<dyn Fn(usize) -> Option<(String, String)> + Send + Sync>,
    /// The child's stdout, for the edge: its in-process subscriber reports there.
    report: Option<BufReader<std::process::ChildStdout>>,
    _dir: Option<tempfile::TempDir>,
}

fn start_target(name: &str) -> Target {
    match name {
        "mosquitto" => {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_type error\nmax_queued_messages 100000\n"),
            )
            .expect("write config");
            let child = Command::new("/usr/sbin/mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("/usr/sbin/mosquitto");
            wait_port(port);
            Target {
                child,
                port,
                creds: Box::new(|_| None),
                report: None,
                _dir: Some(dir),
            }
        }
        _ => {
            let mut child = Command::new(std::env::current_exe().expect("current exe"))
                .arg("--serve-broker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("re-exec");
            let mut out = BufReader::new(child.stdout.take().expect("stdout"));
            let mut line = String::new();
            out.read_line(&mut line).expect("READY line");
            let port = line
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .expect("READY <port>");
            Target {
                child,
                port,
                creds: Box::new(|i| Some((format!("dev-{i}"), "token".into()))),
                report: Some(out),
                _dir: None,
            }
        }
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "broker did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// utime + stime of a process, in seconds (clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

async fn run_target(name: &str, devices: usize, rate: u64, secs: u64) -> Report {
    let mut target = start_target(name);
    let pid = target.child.id();

    // Subscriber (Mosquitto only; the edge's runs inside the child).
    let latencies = Arc::new(Mutex::new(Vec::<u64>::with_capacity(1 << 20)));
    let receiver = if target.report.is_none() {
        let mut o = MqttOptions::new(format!("bench-sub-{name}"), "127.0.0.1", target.port);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (sub, mut sub_el) = AsyncClient::new(o, 1024);
        sub.subscribe("devices/+/telemetry", QoS::AtMostOnce)
            .await
            .expect("subscribe");
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = sub_el.poll().await {
                break;
            }
        }
        let lat = latencies.clone();
        Some(tokio::spawn(async move {
            let _keep = sub;
            while let Ok(ev) = sub_el.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    lat.lock().unwrap().push(latency(&p.payload));
                }
            }
        }))
    } else {
        None
    };

    // Publishers, all connected before the measured window.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..devices {
        let id = format!("dev-{i}");
        let mut o = MqttOptions::new(id.clone(), "127.0.0.1", target.port);
        o.set_keep_alive(Duration::from_secs(60));
        if let Some((u, p)) = (target.creds)(i) {
            o.set_credentials(u, p);
        }
        let (client, mut el) = AsyncClient::new(o, 64);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("{name}: device {i} could not connect: {e}"),
            }
        }
        tokio::spawn(async move { while el.poll().await.is_ok() {} });
        clients.push((id, client));
    }

    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (id, client) in clients {
        let stop = stop.clone();
        let topic = format!("devices/{id}/telemetry");
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let mut payload = vec![0x5Au8; PAYLOAD];
                let ts = now_ns();
                payload[..8].copy_from_slice(&ts.to_be_bytes());
                if client
                    .publish(&topic, QoS::AtMostOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            let _ = client.disconnect().await;
            sent
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap_or(0);
    }
    // Let in-flight messages drain: wait until the count stops growing.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = match &target.report {
            Some(_) => cpu_seconds(pid).to_bits() as usize,
            None => latencies.lock().unwrap().len(),
        };
        if n == last {
            break;
        }
        last = n;
    }
    let elapsed_cpu = cpu_seconds(pid) - cpu_before;
    let rss = rss_mib(pid);
    let _ = started;
    if let Some(r) = receiver {
        r.abort();
    }
    let mut lat = match target.report.as_mut() {
        // The child prints its subscriber's latencies (ns), one per line, then "END".
        Some(out) => {
            if let Some(stdin) = target.child.stdin.as_mut() {
                let _ = stdin.write_all(b"report\n");
                let _ = stdin.flush();
            }
            let mut lat = Vec::new();
            let mut line = String::new();
            while out.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim() != "END" {
                if let Ok(n) = line.trim().parse() {
                    lat.push(n);
                }
                line.clear();
            }
            lat
        }
        None => std::mem::take(&mut *latencies.lock().unwrap()),
    };
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&n| n as f64 / 1e6)
    };
    let report = Report {
        received: lat.len(),
        lost: sent.saturating_sub(lat.len()),
        cpu_per_million: elapsed_cpu / (lat.len().max(1) as f64) * 1e6,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        rss_mib: rss,
    };
    if let Some(mut stdin) = target.child.stdin.take() {
        let _ = stdin.write_all(b"stop\n");
    }
    let _ = target.child.kill();
    let _ = target.child.wait();
    report
}

/// Child mode: run the broker (edge on a plain port, any `dev-*` device with token `token`)
/// until stdin closes.
fn serve_broker() {
    use companion_broker::{AuthDecision, AuthRequest, Authenticator, DenyReason};

    struct AnyDevice;
    #[async_trait::async_trait]
    impl Authenticator for AnyDevice {
        async fn authenticate(&self, req: &AuthRequest<'_>) -> AuthDecision {
            match companion_schema::DeviceId::parse(req.username) {
                Ok(device) if req.password == b"token" => AuthDecision::Allow { device },
                _ => AuthDecision::Deny(DenyReason::BadToken),
            }
        }
    }

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let settings = companion_broker::MqttSettings {
            max_connections: 100_000,
            ..Default::default()
        };
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let edge_port = plain.local_addr().expect("addr").port();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let mut registry = prometheus_client::registry::Registry::default();
        let handle = companion_broker::start(
            &settings,
            None,
            companion_broker::EdgeListeners {
                plain: Some(plain),
                ..Default::default()
            },
            companion_broker::Hooks::new(Arc::new(AnyDevice), Arc::new(companion_broker::NullSink)),
            &mut registry,
            shutdown.clone(),
            &tracker,
        )
        .await
        .expect("broker starts");
        let mut sub = handle.local_client("bench").await.expect("local client");
        sub.subscribe(&["devices/+/telemetry"])
            .await
            .expect("subscribe");
        let latencies = Arc::new(Mutex::new(Vec::<u64>::with_capacity(1 << 20)));
        let lat = latencies.clone();
        tokio::spawn(async move {
            while let Ok(ev) = sub.next().await {
                if let companion_broker::LocalEvent::Publish { payload, .. } = ev {
                    lat.lock().unwrap().push(latency(&payload));
                }
            }
        });
        println!("READY {edge_port}");
        let _ = std::io::stdout().flush();
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await;
        let mut out = std::io::stdout().lock();
        for n in latencies.lock().unwrap().iter() {
            let _ = writeln!(out, "{n}");
        }
        let _ = writeln!(out, "END");
        let _ = out.flush();
        shutdown.cancel();
    });
}

/// Send-to-receive latency of a bench payload (wall-clock ns in its first 8 bytes).
fn latency(payload: &[u8]) -> u64 {
    let mut ts = [0u8; 8];
    if let Some(b) = payload.get(..8) {
        ts.copy_from_slice(b);
    }
    now_ns().saturating_sub(u64::from_be_bytes(ts))
}
