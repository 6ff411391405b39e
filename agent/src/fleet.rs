//! `companion-agent fleet`: N simulated devices in one process, the project's load tool.
//!
//! Each device has two tasks: one owns its rumqttc event loop (acks, incoming messages), one
//! drives it (telemetry every T, a persona button press now and then, and for the first K
//! devices push-to-talk sessions streaming Opus). Counting is honest: "acked" means the broker
//! returned a PUBACK, "received" means the message came back over MQTT; latencies are measured
//! on this host's clock. With `--observe-*` (a client allowed on `devices/+/telemetry`, e.g.
//! the broker's internal endpoint in a local run) telemetry arrivals and ingest latency are
//! counted on the receiving side as well.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use companion_schema::{
    decode, encode, AudioChunk, ButtonAction, ButtonEvent, Codec, DeviceId, PersonaState,
    SessionAction, SessionControl, SessionId, Status, Telemetry, Topic, TopicKind, SCHEMA_VERSION,
};
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, Transport};
use serde_bytes::ByteBuf;
use tokio_util::sync::CancellationToken;

use crate::audio::codec::Encoder;
use crate::config::BrokerUrl;
use crate::hw::FRAME_SAMPLES;
use crate::link::{now_ms, qos, tls_config};

/// Requests buffered per simulated device.
pub const DEVICE_REQUEST_CAPACITY: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Number of simulated devices (at most the lines in the credentials file).
    #[arg(long)]
    pub devices: usize,
    #[arg(long, default_value_t = 1000)]
    pub telemetry_interval_ms: u64,
    /// Devices that also run push-to-talk sessions.
    #[arg(long, default_value_t = 0)]
    pub talkers: usize,
    /// Seconds to run after the ramp.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// `device_id,token` per line.
    #[arg(long)]
    pub credentials: PathBuf,
    #[arg(long, env = "CONTROL_PLANE_URL")]
    pub url: String,
    #[arg(long, env = "CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Seconds between persona button presses per device (0: never).
    #[arg(long, default_value_t = 10)]
    pub persona_every_s: u64,
    /// Seconds over which devices connect.
    #[arg(long, default_value_t = 2)]
    pub ramp_s: u64,
    /// Seconds of speech per talk session.
    #[arg(long, default_value_t = 2)]
    pub talk_s: u64,
    /// An observer allowed to subscribe to `devices/+/telemetry` (plain MQTT, loopback).
    #[arg(long)]
    pub observe_addr: Option<String>,
    #[arg(long)]
    pub observe_user: Option<String>,
    #[arg(long)]
    pub observe_pass: Option<String>,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `device_id,token`")]
    Line { path: PathBuf, line: usize },
    #[error("--devices {want} but the credentials file has {have}")]
    TooFew { want: usize, have: usize },
    #[error("--url: {0}")]
    Url(String),
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
}

/// Reads `device_id,token` lines (blank lines and `#` comments skipped).
pub fn read_credentials(path: &PathBuf) -> Result<Vec<(DeviceId, String)>, FleetError> {
    let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || FleetError::Line {
            path: path.clone(),
            line: i + 1,
        };
        let (id, token) = line.split_once(',').ok_or_else(bad)?;
        let id = DeviceId::parse(id.trim()).map_err(|_| bad())?;
        out.push((id, token.trim().to_owned()));
    }
    Ok(out)
}

fn histogram() -> Mutex<Histogram<u64>> {
    Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
}

/// Counters and latency histograms (microseconds) of a run.
pub struct FleetStats {
    pub connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub telemetry_sent: AtomicU64,
    pub telemetry_acked: AtomicU64,
    pub telemetry_observed: AtomicU64,
    pub buttons_sent: AtomicU64,
    pub buttons_acked: AtomicU64,
    pub persona_received: AtomicU64,
    pub sessions_started: AtomicU64,
    pub audio_up_sent: AtomicU64,
    pub audio_up_dropped: AtomicU64,
    pub reply_audio_received: AtomicU64,
    pub replies: AtomicU64,
    pub publish_errors: AtomicU64,
    pub telemetry_puback: Mutex<Histogram<u64>>,
    pub telemetry_ingest: Mutex<Histogram<u64>>,
    pub persona_rtt: Mutex<Histogram<u64>>,
    pub first_audio: Mutex<Histogram<u64>>,
}

impl Default for FleetStats {
    fn default() -> Self {
        Self {
            connected: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            telemetry_sent: AtomicU64::new(0),
            telemetry_acked: AtomicU64::new(0),
            telemetry_observed: AtomicU64::new(0),
            buttons_sent: AtomicU64::new(0),
            buttons_acked: AtomicU64::new(0),
            persona_received: AtomicU64::new(0),
            sessions_started: AtomicU64::new(0),
            audio_up_sent: AtomicU64::new(0),
            audio_up_dropped: AtomicU64::new(0),
            reply_audio_received: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            telemetry_puback: histogram(),
            telemetry_ingest: histogram(),
            persona_rtt: histogram(),
            first_audio: histogram(),
        }
    }
}

fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
    let us = (d.as_micros() as u64).max(1);
    let _ = h.lock().unwrap_or_else(|p| p.into_inner()).record(us);
}

/// Per-device state shared by its two tasks.
#[derive(Default)]
struct DevState {
    /// QoS 1 publishes handed to rumqttc and not yet numbered: (kind, sent at).
    fifo: VecDeque<(TopicKind, Instant)>,
    pkids: HashMap<u16, (TopicKind, Instant)>,
    persona_pressed: Option<Instant>,
    /// The talk session waiting for its first reply audio, and when speech ended.
    awaiting_reply: Option<(SessionId, Instant)>,
}

struct Device {
    id: DeviceId,
    client: AsyncClient,
    state: Arc<Mutex<DevState>>,
    stats: Arc<FleetStats>,
}

impl Device {
    fn state(&self) -> std::sync::MutexGuard<'_, DevState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, kind: TopicKind, payload: Vec<u8>) -> bool {
        let topic = Topic::new(self.id.clone(), kind).to_string();
        let mut st = self.state();
        match self
            .client
            .try_publish(topic, qos(kind), kind.retained(), payload)
        {
            Ok(()) => {
                if kind.qos() != companion_schema::Qos::AtMostOnce {
                    st.fifo.push_back((kind, Instant::now()));
                }
                true
            }
            Err(_) => {
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Runs the fleet and returns the printed report.
pub async fn run(args: FleetArgs) -> anyhow::Result<String> {
    let stats = Arc::new(FleetStats::default());
    let report = run_with(args, stats.clone()).await?;
    Ok(report)
}

/// Runs the fleet, filling `stats`; returns the report.
pub async fn run_with(args: FleetArgs, stats: Arc<FleetStats>) -> Result<String, FleetError> {
    let creds = read_credentials(&args.credentials)?;
    if creds.len() < args.devices {
        return Err(FleetError::TooFew {
            want: args.devices,
            have: creds.len(),
        });
    }
    let url = BrokerUrl::parse(&args.url).map_err(FleetError::Url)?;
    let tls = match (&url.tls, &args.ca_cert) {
        (true, Some(ca)) => Some(tls_config(ca)?),
        (true, None) => return Err(FleetError::Url("mqtts:// needs --ca-cert".into())),
        _ => None,
    };
    let shutdown = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    if let (Some(addr), Some(user), Some(pass)) =
        (&args.observe_addr, &args.observe_user, &args.observe_pass)
    {
        tracker.spawn(observe(
            addr.clone(),
            user.clone(),
            pass.clone(),
            stats.clone(),
            shutdown.clone(),
        ));
    }
    let ramp = Duration::from_secs(args.ramp_s);
    let start = tokio::time::Instant::now();
    for (i, (id, token)) in creds.into_iter().take(args.devices).enumerate() {
        let mut o = MqttOptions::new(id.as_str(), url.host.clone(), url.port);
        o.set_credentials(id.as_str(), token);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        if let Some(t) = &tls {
            o.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(t.clone()),
            ));
        }
        let (client, el) = AsyncClient::new(o, DEVICE_REQUEST_CAPACITY);
        let dev = Arc::new(Device {
            id,
            client,
            state: Arc::new(Mutex::new(DevState::default())),
            stats: stats.clone(),
        });
        let at = start + ramp.mul_f64(i as f64 / args.devices.max(1) as f64);
        let talker = i < args.talkers;
        tracker.spawn(event_loop(dev.clone(), el, shutdown.clone(), at));
        tracker.spawn(drive(dev, args.clone(), talker, shutdown.clone(), at));
    }
    tracker.close();
    let total = ramp + Duration::from_secs(args.duration);
    let bar = (!args.quiet).then(|| {
        let b = indicatif::ProgressBar::new(total.as_secs());
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len}s {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let end = start + total;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500).min(end - tokio::time::Instant::now())).await;
        if let Some(b) = &bar {
            b.set_position(start.elapsed().as_secs());
            b.set_message(format!(
                "connected {} telemetry {}/{} persona {} errors {}",
                stats.connected.load(Ordering::Relaxed),
                stats.telemetry_acked.load(Ordering::Relaxed),
                stats.telemetry_sent.load(Ordering::Relaxed),
                stats.persona_received.load(Ordering::Relaxed),
                stats.connect_errors.load(Ordering::Relaxed)
                    + stats.publish_errors.load(Ordering::Relaxed),
            ));
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // Let the acknowledgements of the last messages come in before counting.
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    Ok(report(&args, &stats))
}

async fn event_loop(
    dev: Arc<Device>,
    mut el: rumqttc::EventLoop,
    shutdown: CancellationToken,
    at: tokio::time::Instant,
) {
    tokio::time::sleep_until(at).await;
    let mut backoff = crate::backoff::Backoff::default();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    let mut draining: Option<tokio::time::Instant> = None;
    loop {
        // Cases: shutdown (keep polling for up to 2 s so the last acks arrive); an event.
        let polled = tokio::select! {
            _ = shutdown.cancelled(), if draining.is_none() => {
                draining = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                continue;
            }
            _ = tokio::time::sleep_until(draining.unwrap_or_else(tokio::time::Instant::now)), if draining.is_some() => {
                let _ = dev.client.try_disconnect();
                return;
            }
            r = el.poll() => r,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                dev.stats.connected.fetch_add(1, Ordering::Relaxed);
                on_connected(&dev);
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                let mut st = dev.state();
                if let Some(e) = st.fifo.pop_front() {
                    st.pkids.insert(pkid, e);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                let e = dev.state().pkids.remove(&a.pkid);
                match e {
                    Some((TopicKind::Telemetry, t0)) => {
                        dev.stats.telemetry_acked.fetch_add(1, Ordering::Relaxed);
                        record(&dev.stats.telemetry_puback, t0.elapsed());
                    }
                    Some((TopicKind::Button, _)) => {
                        dev.stats.buttons_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => on_message(&dev, &p.topic, &p.payload),
            Ok(_) => {}
            Err(e) => {
                if draining.is_some() {
                    return;
                }
                dev.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                {
                    let mut st = dev.state();
                    st.fifo.clear();
                    st.pkids.clear();
                }
                el.clean();
                el.pending.clear();
                let d = backoff.next_delay(&mut rng);
                tracing::debug!(device_id = %dev.id, error = %e, "fleet device connection error");
                // Cases: shutdown; the backoff delay passed.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
}

fn on_connected(dev: &Device) {
    let status = Status {
        v: SCHEMA_VERSION,
        online: true,
        agent_version: concat!("fleet-", env!("CARGO_PKG_VERSION")).into(),
        boot_id: "fleet".into(),
        ts_ms: now_ms(),
    };
    if let Ok(p) = encode(&status) {
        dev.publish(TopicKind::Status, p);
    }
    let subs = [
        TopicKind::Persona,
        TopicKind::SessionDown,
        TopicKind::AudioDown,
    ]
    .into_iter()
    .map(|k| rumqttc::SubscribeFilter::new(Topic::new(dev.id.clone(), k).to_string(), qos(k)));
    let _ = dev.client.try_subscribe_many(subs);
}

fn on_message(dev: &Device, topic: &str, payload: &[u8]) {
    let Ok(t) = Topic::parse(topic) else { return };
    match t.kind {
        TopicKind::Persona if decode::<PersonaState>(payload).is_ok() => {
            let pressed = dev.state().persona_pressed.take();
            if let Some(t0) = pressed {
                dev.stats.persona_received.fetch_add(1, Ordering::Relaxed);
                record(&dev.stats.persona_rtt, t0.elapsed());
            }
        }
        TopicKind::AudioDown => {
            if let Ok(c) = decode::<AudioChunk>(payload) {
                dev.stats
                    .reply_audio_received
                    .fetch_add(1, Ordering::Relaxed);
                let mut st = dev.state();
                if st
                    .awaiting_reply
                    .as_ref()
                    .is_some_and(|(s, _)| *s == c.session_id)
                {
                    if let Some((_, t0)) = st.awaiting_reply.take() {
                        dev.stats.replies.fetch_add(1, Ordering::Relaxed);
                        record(&dev.stats.first_audio, t0.elapsed());
                    }
                }
            }
        }
        _ => {}
    }
}

async fn drive(
    dev: Arc<Device>,
    args: FleetArgs,
    talker: bool,
    shutdown: CancellationToken,
    at: tokio::time::Instant,
) {
    tokio::time::sleep_until(at).await;
    let mut telemetry =
        tokio::time::interval(Duration::from_millis(args.telemetry_interval_ms.max(1)));
    telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let persona_period = Duration::from_secs(args.persona_every_s.max(1));
    let persona_start = tokio::time::Instant::now() + persona_period.mul_f64(rand::random::<f64>());
    let mut persona = tokio::time::interval_at(persona_start, persona_period);
    let mut talk = tokio::time::interval(Duration::from_secs(args.talk_s + 3));
    let (mut seq, mut button_seq) = (0u64, 0u64);
    let mut encoder = Encoder::new(24_000).ok();
    loop {
        // Cases: shutdown; telemetry due; a persona press due; a talk session due (talkers).
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = telemetry.tick() => {
                if send_telemetry(&dev, seq) {
                    seq += 1;
                }
            }
            _ = persona.tick(), if args.persona_every_s > 0 => {
                let ev = ButtonEvent { v: SCHEMA_VERSION, seq: button_seq, ts_ms: now_ms(), button: "persona".into(), action: ButtonAction::Press };
                button_seq += 1;
                if let Ok(p) = encode(&ev) {
                    dev.state().persona_pressed = Some(Instant::now());
                    if dev.publish(TopicKind::Button, p) {
                        dev.stats.buttons_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = talk.tick(), if talker => {
                if let Some(enc) = encoder.as_mut() {
                    talk_once(&dev, enc, args.talk_s, &shutdown).await;
                }
            }
        }
    }
}

fn send_telemetry(dev: &Device, seq: u64) -> bool {
    let t = Telemetry {
        v: SCHEMA_VERSION,
        seq,
        ts_ms: now_ms(),
        uptime_s: seq,
        battery_pct: None,
        cpu_temp_c: Some(45.0),
        rssi_dbm: Some(-60),
        free_mem_kb: Some(100_000),
        extra: Default::default(),
    };
    let ok = encode(&t).is_ok_and(|p| dev.publish(TopicKind::Telemetry, p));
    if ok {
        dev.stats.telemetry_sent.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

/// One push-to-talk session: start, `seconds` of a tone at real-time pace, last chunk, stop.
async fn talk_once(dev: &Device, enc: &mut Encoder, seconds: u64, shutdown: &CancellationToken) {
    let session = match SessionId::parse(&format!("f{:015x}", rand::random::<u64>() >> 4)) {
        Ok(s) => s,
        Err(_) => return,
    };
    let control = |action| SessionControl {
        v: SCHEMA_VERSION,
        session_id: session.clone(),
        action,
        reason: Some("fleet".into()),
    };
    if !encode(&control(SessionAction::Start)).is_ok_and(|p| dev.publish(TopicKind::SessionUp, p)) {
        return;
    }
    dev.stats.sessions_started.fetch_add(1, Ordering::Relaxed);
    let chunks = (seconds * 1000 / 60).max(1) as u32;
    let mut tick = tokio::time::interval(Duration::from_millis(60));
    for seq in 0..chunks {
        // Cases: shutdown; the next 60 ms of speech is due.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let frames = (0..3)
            .filter_map(|f| {
                let mut pcm = [0i16; FRAME_SAMPLES];
                for (i, s) in pcm.iter_mut().enumerate() {
                    let t = ((seq * 3 + f) as usize * FRAME_SAMPLES + i) as f32 / 16e3;
                    *s = (3000.0 * (2.0 * std::f32::consts::PI * 200.0 * t).sin()) as i16;
                }
                enc.encode(&pcm).ok().map(ByteBuf::from)
            })
            .collect();
        let chunk = AudioChunk {
            v: SCHEMA_VERSION,
            session_id: session.clone(),
            seq,
            ts_ms: now_ms(),
            codec: Codec::Opus,
            sample_rate: 16_000,
            frame_ms: 20,
            frames,
            last: seq + 1 == chunks,
        };
        let sent = encode(&chunk).is_ok_and(|p| dev.publish(TopicKind::AudioUp, p));
        let counter = if sent {
            &dev.stats.audio_up_sent
        } else {
            &dev.stats.audio_up_dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    dev.state().awaiting_reply = Some((session.clone(), Instant::now()));
    if let Ok(p) = encode(&control(SessionAction::Stop)) {
        dev.publish(TopicKind::SessionUp, p);
    }
}

async fn observe(
    addr: String,
    user: String,
    pass: String,
    stats: Arc<FleetStats>,
    shutdown: CancellationToken,
) {
    let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
        tracing::error!(addr, "--observe-addr is not host:port");
        return;
    };
    let mut o = MqttOptions::new(
        format!("companion-internal-fleet-{:08x}", rand::random::<u32>()),
        sock.ip().to_string(),
        sock.port(),
    );
    o.set_credentials(user, pass);
    let (client, mut el) = AsyncClient::new(o, 16);
    let _ = client.try_subscribe(TopicKind::Telemetry.all_devices_filter(), QoS::AtLeastOnce);
    loop {
        // Cases: shutdown (after the devices' last acks); an event.
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = el.poll() => e,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Ok(t) = decode::<Telemetry>(&p.payload) {
                    stats.telemetry_observed.fetch_add(1, Ordering::Relaxed);
                    record(
                        &stats.telemetry_ingest,
                        Duration::from_millis(now_ms().saturating_sub(t.ts_ms)),
                    );
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn percentiles(h: &Mutex<Histogram<u64>>) -> String {
    let h = h.lock().unwrap_or_else(|p| p.into_inner());
    if h.is_empty() {
        return format!("{:>9} {:>9} {:>9} {:>9} {:>8}", "-", "-", "-", "-", 0);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "{:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8}",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        h.len()
    )
}

/// The end-of-run table.
pub fn report(args: &FleetArgs, s: &FleetStats) -> String {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet: {} devices ({} talkers), {} s after a {} s ramp, telemetry every {} ms",
        args.devices, args.talkers, args.duration, args.ramp_s, args.telemetry_interval_ms
    );
    let _ = writeln!(
        out,
        "connections {:>10}   connection errors {}   publish errors {}",
        g(&s.connected),
        g(&s.connect_errors),
        g(&s.publish_errors)
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "messages", "sent", "acked/recv"
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "telemetry (puback)",
        g(&s.telemetry_sent),
        g(&s.telemetry_acked)
    );
    if args.observe_addr.is_some() {
        let _ = writeln!(
            out,
            "{:<22} {:>10} {:>12}",
            "telemetry (observed)",
            g(&s.telemetry_sent),
            g(&s.telemetry_observed)
        );
    }
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "persona press/reply",
        g(&s.buttons_sent),
        g(&s.persona_received)
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "button (puback)",
        g(&s.buttons_sent),
        g(&s.buttons_acked)
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "talk sessions/replies",
        g(&s.sessions_started),
        g(&s.replies)
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "audio up/down chunks",
        g(&s.audio_up_sent),
        g(&s.reply_audio_received)
    );
    let elapsed = args.duration.max(1) as f64;
    let _ = writeln!(
        out,
        "telemetry throughput   {:.1} msg/s acked",
        g(&s.telemetry_acked) as f64 / elapsed
    );
    let _ = writeln!(
        out,
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "latency (ms)", "p50", "p95", "p99", "max", "n"
    );
    let _ = writeln!(
        out,
        "{:<28} {}",
        "telemetry puback",
        percentiles(&s.telemetry_puback)
    );
    if args.observe_addr.is_some() {
        let _ = writeln!(
            out,
            "{:<28} {}",
            "telemetry ingest (observer)",
            percentiles(&s.telemetry_ingest)
        );
    }
    let _ = writeln!(
        out,
        "{:<28} {}",
        "persona switch round trip",
        percentiles(&s.persona_rtt)
    );
    let _ = write!(
        out,
        "{:<28} {}",
        "first reply audio",
        percentiles(&s.first_audio)
    );
    out
}
