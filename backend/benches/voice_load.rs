//! Voice sessions against the real `companion serve` with instant fake cloud providers (issue #6
//! "Measure"). Not run in CI.
//!
//! The server runs as its own process (release build, SQLite, embedded broker); the fake
//! providers (OpenAI transcription, Anthropic streaming messages, ElevenLabs PCM speech, all in
//! their documented wire formats, answering at once) and the simulated devices (rumqttc over
//! TLS, streaming pre-encoded Opus at real-time pace) run in this process, on the same two
//! cores. Two phases:
//!
//! 1. **Latency**: one device, sequential sessions. End of speech (the device hands its `last`
//!    audio chunk to its MQTT client) → the first reply audio chunk arrives at the device. With
//!    instant providers this is the platform's own share: broker hops, session state machine,
//!    provider round trips on loopback, sentence split, Opus encode, publish. The server's own
//!    view, `voice_stage_seconds{stage="end_of_speech_to_first_audio"}`, is read from /metrics.
//! 2. **Load**: K devices each in back-to-back sessions (2 s of speech streamed at real time,
//!    a 2 s spoken reply, a short pause), for increasing K. A level is *sustained* when every
//!    session ends with its full reply and no error, the first reply audio p95 stays under
//!    300 ms, and every reply is delivered faster than real time (no underrun at the device).
//!
//! `cargo bench -p companion-backend --bench voice_load [-- --levels 10,50,100 --seconds 20]`

#[path = "../tests/voice_fake/mod.rs"]
mod voice_fake;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use companion_backend::voice::audio::encode_frames;
use companion_schema::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use voice_fake::{anthropic_reply, chunked, spoken, tone_pcm, Canned, FakeServer};

const SPEECH: &str = "what is the weather like today, is it warm outside";
const REPLY: [&str; 2] = ["It is sunny and mild today. ", "A fine day for a walk."];
/// Seconds of speech the fake TTS returns per sentence.
const TTS_SECONDS_PER_SENTENCE: f64 = 1.0;
const SESSION_TIMEOUT: Duration = Duration::from_secs(15);
const STAGES: [&str; 4] = [
    "stt",
    "llm_first_token",
    "tts_first_audio",
    "end_of_speech_to_first_audio",
];
const FIRST_AUDIO_P95_LIMIT: Duration = Duration::from_millis(300);

struct Args {
    levels: Vec<usize>,
    seconds: u64,
    latency_sessions: usize,
}

fn args() -> Args {
    let mut a = Args {
        levels: vec![10, 25, 50, 100, 150, 200],
        seconds: 20,
        latency_sessions: 50,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--levels" => {
                a.levels = value.split(',').filter_map(|v| v.parse().ok()).collect();
                i += 1;
            }
            "--seconds" => {
                a.seconds = value.parse().unwrap_or(a.seconds);
                i += 1;
            }
            "--latency-sessions" => {
                a.latency_sessions = value.parse().unwrap_or(a.latency_sessions);
                i += 1;
            }
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    a
}

/// The uplink utterance: espeak-ng speech as 16 kHz Opus frames (encoded once, shared).
fn utterance() -> Vec<ByteBuf> {
    encode_frames(&spoken(SPEECH), 24_000)
        .expect("opus")
        .into_iter()
        .map(ByteBuf::from)
        .collect()
}

async fn fake_providers() -> FakeServer {
    let speech = tone_pcm(16_000, TTS_SECONDS_PER_SENTENCE);
    FakeServer::start(move |req| {
        if req.uri.contains("/audio/transcriptions") {
            Canned::json(200, &format!("{{\"text\":\"{SPEECH}\"}}"))
        } else if req.uri.contains("/messages") {
            anthropic_reply(&REPLY)
        } else if req.uri.contains("/text-to-speech/") {
            Canned::new(200, "application/octet-stream", chunked(&speech, 4_096))
        } else {
            Canned::json(404, r#"{"error":"unknown path"}"#)
        }
    })
    .await
}

struct Server {
    child: tokio::process::Child,
    http: String,
    mqtts_port: u16,
    ca: PathBuf,
    creds: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

fn server_env(cmd: &mut tokio::process::Command, data: &Path, fake: &str) {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "RUST_LOG",
            std::env::var("VOICE_LOAD_SERVER_LOG")
                .unwrap_or_else(|_| "warn,companion_backend::app=info".into()),
        )
        .env("COMPANION_DATA_DIR", data)
        .env("COMPANION_HTTP__LISTEN", "127.0.0.1:0")
        .env("COMPANION_MQTT__LISTEN", "127.0.0.1:0")
        .env("COMPANION_MQTT__TLS_LISTEN", "127.0.0.1:0")
        .env("COMPANION_VOICE__STT_PROVIDER", "openai")
        .env("COMPANION_VOICE__LLM_PROVIDER", "anthropic")
        .env("COMPANION_VOICE__TTS_PROVIDER", "elevenlabs")
        .env("COMPANION_VOICE__OPENAI__API_KEY", "sk-bench")
        .env("COMPANION_VOICE__OPENAI__BASE_URL", format!("{fake}/v1"))
        .env("COMPANION_VOICE__ANTHROPIC__API_KEY", "sk-bench")
        .env("COMPANION_VOICE__ANTHROPIC__BASE_URL", fake)
        .env("COMPANION_VOICE__ELEVENLABS__API_KEY", "sk-bench")
        .env("COMPANION_VOICE__ELEVENLABS__BASE_URL", fake)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
}

async fn start_server(fake: &str, devices: usize) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let creds_path = dir.path().join("creds.csv");
    let mut create = tokio::process::Command::new(env!("CARGO_BIN_EXE_companion"));
    server_env(&mut create, &data, fake);
    create.args([
        "devices",
        "bulk-create",
        "--count",
        &devices.to_string(),
        "--out",
    ]);
    create.arg(&creds_path);
    let out = create.output().await.expect("bulk-create");
    assert!(
        out.status.success(),
        "bulk-create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let creds = std::fs::read_to_string(&creds_path)
        .expect("credentials")
        .lines()
        .filter_map(|l| l.split_once(','))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();

    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_companion"));
    server_env(&mut cmd, &data, fake);
    cmd.arg("serve")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn companion serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let (http, mqtts_port) = loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the server reports listening within 60 s")
            .expect("stderr")
            .expect("the server exited");
        let line = strip_ansi(&line);
        if let Some(at) = line.find("listening http=") {
            let field = |name: &str| {
                line[at..]
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned)
                    .expect("address in the listening line")
            };
            let mqtts = field("mqtts");
            let port = mqtts.rsplit(':').next().and_then(|p| p.parse().ok());
            break (field("http"), port.expect("mqtts port"));
        }
    };
    // Keep draining the server's log so it never blocks on a full pipe; show warnings (and
    // everything with VOICE_LOAD_SERVER_LOG set).
    let verbose = std::env::var_os("VOICE_LOAD_SERVER_LOG").is_some();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if verbose || line.contains("WARN") || line.contains("ERROR") {
                eprintln!("server: {}", strip_ansi(&line));
            }
        }
    });
    Server {
        child,
        http,
        mqtts_port,
        ca: data.join("tls/ca.pem"),
        creds,
        _dir: dir,
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// CPU seconds (user + system) and resident MiB of a process.
fn cpu_and_rss(pid: u32, ticks_per_s: f64) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(14) + ticks(15)) / ticks_per_s;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kb / 1024.0)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// What a device hears, by topic kind.
type Inbox = mpsc::UnboundedReceiver<(TopicKind, Vec<u8>)>;

struct Dev {
    id: DeviceId,
    client: AsyncClient,
    inbox: Inbox,
}

async fn connect(server: &Server, id: &str, token: &str, tls: Arc<rustls::ClientConfig>) -> Dev {
    let mut o = MqttOptions::new(id, "localhost", server.mqtts_port);
    o.set_credentials(id, token);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(MAX_PAYLOAD + 4096, MAX_PAYLOAD + 4096);
    o.set_transport(Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut el) = AsyncClient::new(o, 256);
    el.set_network_options(companion_backend::bus::network_options());
    let device = DeviceId::parse(id).expect("device id");
    for kind in [TopicKind::SessionDown, TopicKind::AudioDown] {
        let topic = Topic::new(device.clone(), kind).to_string();
        client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let (tx, inbox) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        let mut subacks = 0;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subacks += 1;
                    if subacks == 2 {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(t) = Topic::parse(&p.topic) {
                        if tx.send((t.kind, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => return, // the session waiting on the inbox reports it
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("SUBACKs within 30 s")
        .expect("the device's event loop ended");
    Dev {
        id: device,
        client,
        inbox,
    }
}

/// One session's outcome as the device saw it.
#[derive(Debug, Clone, Default)]
struct Outcome {
    first_audio: Option<Duration>,
    /// First → last reply chunk.
    delivery: Duration,
    /// Seconds of reply audio received.
    audio_s: f64,
    complete: bool,
    error: Option<String>,
}

/// start → the utterance at real-time pace (5 frames per chunk, one chunk every 100 ms) → stop,
/// then everything until `idle` and the reply's `last` chunk.
async fn session(dev: &mut Dev, frames: &[ByteBuf]) -> Outcome {
    let sid = SessionId::parse(&format!("b{:015x}", rand::random::<u64>() >> 4)).expect("sid");
    let control = |action| SessionControl {
        v: SCHEMA_VERSION,
        session_id: sid.clone(),
        action,
        reason: None,
    };
    let publish = |kind: TopicKind, payload: Vec<u8>| {
        let qos = match kind.qos() {
            Qos::AtMostOnce => QoS::AtMostOnce,
            Qos::AtLeastOnce => QoS::AtLeastOnce,
        };
        dev.client.publish(
            Topic::new(dev.id.clone(), kind).to_string(),
            qos,
            false,
            payload,
        )
    };
    publish(
        TopicKind::SessionUp,
        encode(&control(SessionAction::Start)).expect("encode"),
    )
    .await
    .expect("publish");
    let chunks: Vec<&[ByteBuf]> = frames.chunks(5).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for (seq, batch) in chunks.iter().enumerate() {
        tick.tick().await;
        let chunk = AudioChunk {
            v: SCHEMA_VERSION,
            session_id: sid.clone(),
            seq: seq as u32,
            ts_ms: 0,
            codec: Codec::Opus,
            sample_rate: AUDIO_SAMPLE_RATE,
            frame_ms: AUDIO_FRAME_MS,
            frames: batch.to_vec(),
            last: seq + 1 == chunks.len(),
        };
        publish(TopicKind::AudioUp, encode(&chunk).expect("encode"))
            .await
            .expect("publish");
    }
    let end_of_speech = Instant::now();
    publish(
        TopicKind::SessionUp,
        encode(&control(SessionAction::Stop)).expect("encode"),
    )
    .await
    .expect("publish");

    let mut out = Outcome::default();
    let (mut first_at, mut idle, mut last) = (None::<Instant>, false, false);
    let mut frames_heard = 0usize;
    let waited = tokio::time::timeout(SESSION_TIMEOUT, async {
        while !(idle && (last || out.error.is_some())) {
            let Some((kind, payload)) = dev.inbox.recv().await else {
                out.error = Some("connection ended".into());
                return;
            };
            match kind {
                TopicKind::AudioDown => {
                    let Ok(c) = decode::<AudioChunk>(&payload) else {
                        continue;
                    };
                    if c.session_id != sid {
                        continue;
                    }
                    let now = Instant::now();
                    let first = *first_at.get_or_insert(now);
                    out.first_audio.get_or_insert(now - end_of_speech);
                    frames_heard += c.frames.len();
                    if c.last {
                        last = true;
                        out.delivery = now - first;
                    }
                }
                TopicKind::SessionDown => {
                    let Ok(e) = decode::<SessionEvent>(&payload) else {
                        continue;
                    };
                    if e.session_id != sid {
                        continue;
                    }
                    if let Some(err) = e.error {
                        out.error = Some(err);
                    }
                    if e.state == SessionState::Error && out.error.is_none() {
                        out.error = Some("error state".into());
                    }
                    if e.state == SessionState::Idle {
                        idle = true;
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    if waited.is_err() {
        out.error.get_or_insert_with(|| "timed out".into());
    }
    out.audio_s = frames_heard as f64 * f64::from(AUDIO_FRAME_MS) / 1000.0;
    out.complete = idle && last && out.error.is_none();
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One `voice_stage_seconds` histogram from the server: (count, sum seconds, buckets).
async fn server_stage(
    http: &reqwest::Client,
    url: &str,
    stage: &str,
) -> (f64, f64, Vec<(f64, f64)>) {
    let label = format!("stage=\"{stage}\"");
    let text = match http.get(url).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let mut count = 0.0;
    let mut sum = 0.0;
    let mut buckets = Vec::new();
    for line in text.lines() {
        if !line.contains(&label) {
            continue;
        }
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if line.starts_with("voice_stage_seconds_count") {
            count = value;
        } else if line.starts_with("voice_stage_seconds_sum") {
            sum = value;
        } else if let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            buckets.push((le, value));
        }
    }
    (count, sum, buckets)
}

/// Bucket upper bound holding quantile `q` of the difference between two scrapes.
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let total =
        after.last().map(|b| b.1).unwrap_or(0.0) - before.last().map(|b| b.1).unwrap_or(0.0);
    for (i, (le, n)) in after.iter().enumerate() {
        let prev = before.get(i).map(|b| b.1).unwrap_or(0.0);
        if n - prev >= total * q {
            return *le;
        }
    }
    f64::INFINITY
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = args();
    let max_devices = args.levels.iter().copied().max().unwrap_or(1).max(1);
    let frames = Arc::new(utterance());
    let fake = fake_providers().await;
    let server = start_server(&fake.url(), max_devices).await;
    let pid = server.child.id().expect("server pid");
    let ticks = clock_ticks();
    let http = reqwest::Client::new();
    let metrics_url = format!("http://{}/metrics", server.http);

    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&server.ca).expect("CA");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("CA cert")).expect("CA cert");
    }
    let tls = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    println!(
        "voice_load: utterance {:.2} s ({} Opus frames), reply {:.1} s of speech in {} sentences",
        frames.len() as f64 * 0.02,
        frames.len(),
        TTS_SECONDS_PER_SENTENCE * REPLY.len() as f64,
        REPLY.len()
    );

    // Phase 1: latency, one device, sessions back to back, speech streamed at real time (sent
    // at once it would trip the edge's per-device audio rate limit, as it should).
    let (id, token) = server.creds[0].clone();
    let mut dev = connect(&server, &id, &token, tls.clone()).await;
    for _ in 0..2 {
        session(&mut dev, &frames).await; // warm up connections and caches
    }
    let mut before = Vec::new();
    for stage in STAGES {
        before.push(server_stage(&http, &metrics_url, stage).await);
    }
    let mut firsts = Vec::new();
    let mut failed = 0;
    for _ in 0..args.latency_sessions {
        let o = session(&mut dev, &frames).await;
        match (o.complete, o.first_audio) {
            (true, Some(f)) => firsts.push(f),
            _ => failed += 1,
        }
    }
    firsts.sort();
    println!(
        "latency ({} sessions, {failed} failed): end of speech → first reply audio at the device p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        firsts.len(),
        ms(pct(&firsts, 0.5)),
        ms(pct(&firsts, 0.95)),
        ms(pct(&firsts, 0.99)),
        ms(pct(&firsts, 1.0)),
    );
    let mut view = Vec::new();
    for (stage, (c0, s0, b0)) in STAGES.iter().zip(&before) {
        let (c1, s1, b1) = server_stage(&http, &metrics_url, stage).await;
        if c1 > *c0 {
            view.push(format!(
                "{stage} mean {:.1} ms (p95 ≤ {} ms)",
                (s1 - s0) / (c1 - c0) * 1000.0,
                bucket_quantile(b0, &b1, 0.95) * 1000.0
            ));
        }
    }
    println!("  server view (voice_stage_seconds): {}", view.join("; "));
    drop(dev);

    // Phase 2: K devices in back-to-back sessions at real-time pace.
    println!(
        "load ({} s per level; devices and fake providers share the two cores with the server):",
        args.seconds
    );
    println!(
        "  {:>5} {:>9} {:>7} {:>9} {:>9} {:>9} {:>10} {:>11} {:>9} {:>8}  verdict",
        "K",
        "sessions",
        "failed",
        "first p50",
        "first p95",
        "first p99",
        "deliv p95",
        "server CPU",
        "self CPU",
        "RSS MiB"
    );
    let mut devices: Vec<Dev> = Vec::new();
    let mut best = 0;
    for &k in &args.levels {
        while devices.len() < k {
            let (id, token) = server.creds[devices.len()].clone();
            devices.push(connect(&server, &id, &token, tls.clone()).await);
        }
        let results = Arc::new(Mutex::new(Vec::<Outcome>::new()));
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let (cpu0, _) = cpu_and_rss(pid, ticks);
        let (self0, _) = cpu_and_rss(std::process::id(), ticks);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (i, mut dev) in devices.drain(..).enumerate() {
            let (frames, results) = (frames.clone(), results.clone());
            let stagger = Duration::from_millis((i as u64 * 2_000) / k as u64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                while Instant::now() < deadline {
                    let o = session(&mut dev, &frames).await;
                    results.lock().expect("results").push(o);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                dev
            }));
        }
        for t in tasks {
            devices.push(t.await.expect("device task"));
        }
        let wall = t0.elapsed().as_secs_f64();
        let (cpu1, rss) = cpu_and_rss(pid, ticks);
        let (self1, _) = cpu_and_rss(std::process::id(), ticks);
        let results = results.lock().expect("results").clone();
        let failed: Vec<&Outcome> = results.iter().filter(|o| !o.complete).collect();
        let mut firsts: Vec<Duration> = results.iter().filter_map(|o| o.first_audio).collect();
        firsts.sort();
        // Delivery time as a share of the reply's length: > 1 means slower than real time.
        let mut delivery: Vec<Duration> = results
            .iter()
            .filter(|o| o.complete && o.audio_s > 0.0)
            .map(|o| Duration::from_secs_f64(o.delivery.as_secs_f64() / o.audio_s))
            .collect();
        delivery.sort();
        let sustained = failed.is_empty()
            && !results.is_empty()
            && pct(&firsts, 0.95) <= FIRST_AUDIO_P95_LIMIT
            && pct(&delivery, 0.95) < Duration::from_secs(1);
        if sustained {
            best = best.max(k);
        }
        println!(
            "  {:>5} {:>9} {:>7} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>9.2}x {:>10.0}% {:>8.0}% {:>8.0}  {}",
            k,
            results.len(),
            failed.len(),
            ms(pct(&firsts, 0.5)),
            ms(pct(&firsts, 0.95)),
            ms(pct(&firsts, 0.99)),
            pct(&delivery, 0.95).as_secs_f64(),
            (cpu1 - cpu0) / wall * 100.0,
            (self1 - self0) / wall * 100.0,
            rss,
            if sustained { "sustained" } else { "NOT sustained" }
        );
        if !failed.is_empty() {
            let mut why: HashMap<String, usize> = HashMap::new();
            for o in &failed {
                *why.entry(o.error.clone().unwrap_or_else(|| "incomplete".into()))
                    .or_default() += 1;
            }
            println!("        failures: {why:?}");
        }
        if !sustained && k > best.max(1) * 2 {
            break; // far past the knee
        }
    }
    println!("concurrent sessions sustained on this machine: {best}");
}
