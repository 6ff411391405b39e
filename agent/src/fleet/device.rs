//! One simulated device: the task owning its event loop and the task driving it, plus the
//! optional telemetry observer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use companion_schema::{
    decode, encode, AudioChunk, ButtonAction, ButtonEvent, Codec, DeviceId, PersonaState,
    SessionAction, SessionControl, SessionId, Status, Telemetry, Topic, TopicKind, AUDIO_FRAME_MS,
    AUDIO_SAMPLE_RATE, SCHEMA_VERSION,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_bytes::ByteBuf;
use tokio_util::sync::CancellationToken;

use super::stats::{record, FleetStats};
use super::FleetArgs;
use crate::audio::codec::Encoder;
use crate::hw::FRAME_SAMPLES;
use crate::link::{now_ms, qos};

/// Per-device state shared by its two tasks.
#[derive(Default)]
pub(crate) struct DevState {
    /// Between a CONNACK and the next connection error.
    connected: bool,
    /// The driver asked for a clean disconnect (churn): the error that follows is expected.
    churning: bool,
    /// A clean disconnect is due once the QoS 1 publishes in flight are acknowledged; nothing
    /// new is sent meanwhile (a device that disconnects with a publish in flight never learns
    /// whether it arrived).
    leaving: bool,
    /// QoS 1 publishes handed to rumqttc and not yet numbered: (kind, sent at).
    fifo: VecDeque<(TopicKind, Instant)>,
    pkids: HashMap<u16, (TopicKind, Instant)>,
    persona_pressed: Option<Instant>,
    /// The talk session waiting for its first reply audio, and when speech ended.
    awaiting_reply: Option<(SessionId, Instant)>,
}

pub(crate) struct Device {
    pub(crate) id: DeviceId,
    pub(crate) client: AsyncClient,
    pub(crate) state: Arc<Mutex<DevState>>,
    pub(crate) stats: Arc<FleetStats>,
    /// Signalled at the first CONNACK; the driver starts then.
    pub(crate) ready: tokio::sync::Notify,
    /// The token for the next connection attempt (the credentials file may change it).
    pub(crate) token: Mutex<String>,
    /// Signalled when the token changes: a device waiting out its backoff after a refusal
    /// tries the new token at once.
    pub(crate) token_changed: tokio::sync::Notify,
}

impl Device {
    fn state(&self) -> std::sync::MutexGuard<'_, DevState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the token; true when it changed.
    pub(crate) fn set_token(&self, token: String) -> bool {
        let mut t = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if *t == token {
            return false;
        }
        *t = token;
        drop(t);
        self.token_changed.notify_one();
        true
    }

    fn token(&self) -> String {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Disconnects cleanly if connected (churn), once what is in flight is acknowledged; the
    /// event loop reconnects at once.
    fn churn(&self) {
        let mut st = self.state();
        if !st.connected || st.churning {
            return;
        }
        st.leaving = true;
        self.leave_if_settled(&mut st);
    }

    /// The clean disconnect [`Device::churn`] asked for, if nothing is in flight any more.
    fn leave_if_settled(&self, st: &mut DevState) {
        if !st.leaving || !st.fifo.is_empty() || !st.pkids.is_empty() {
            return;
        }
        if self.client.try_disconnect().is_ok() {
            st.connected = false;
            st.churning = true;
            st.leaving = false;
            self.stats.churn_disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn publish(&self, kind: TopicKind, payload: Vec<u8>) -> bool {
        let topic = Topic::new(self.id.clone(), kind).to_string();
        let mut st = self.state();
        if !st.connected || st.leaving {
            // Not counted as sent: nothing can carry it now.
            self.stats.skipped_offline.fetch_add(1, Ordering::Relaxed);
            return false;
        }
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

pub(crate) async fn event_loop(
    dev: Arc<Device>,
    mut el: rumqttc::EventLoop,
    shutdown: CancellationToken,
    at: tokio::time::Instant,
) {
    tokio::time::sleep_until(at).await;
    let mut backoff = crate::backoff::Backoff::default();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    let mut draining: Option<tokio::time::Instant> = None;
    // When the current connection attempt started (TCP, TLS, WebSocket upgrade, CONNECT).
    let mut attempt: Option<tokio::time::Instant> = None;
    let mut up = false;
    loop {
        if !up && attempt.is_none() {
            attempt = Some(tokio::time::Instant::now());
        }
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
                if let Some(t0) = attempt.take() {
                    record(&dev.stats.connect, t0.elapsed());
                }
                up = true;
                dev.state().connected = true;
                dev.ready.notify_one();
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
                let e = {
                    let mut st = dev.state();
                    let e = st.pkids.remove(&a.pkid);
                    dev.leave_if_settled(&mut st);
                    e
                };
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
                if up {
                    dev.stats.disconnected.fetch_add(1, Ordering::Relaxed);
                }
                up = false;
                attempt = None;
                let churned = {
                    let mut st = dev.state();
                    st.connected = false;
                    st.leaving = false;
                    st.fifo.clear();
                    st.pkids.clear();
                    std::mem::take(&mut st.churning)
                };
                if churned {
                    // Our own clean disconnect: reconnect at once, as a restarted device would.
                    backoff.reset();
                } else {
                    dev.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                }
                let refused = matches!(e, rumqttc::ConnectionError::ConnectionRefused(_));
                if refused {
                    dev.stats.refused.fetch_add(1, Ordering::Relaxed);
                }
                el.clean();
                el.pending.clear();
                let d = if churned {
                    Duration::ZERO
                } else {
                    backoff.next_delay(&mut rng)
                };
                tracing::debug!(device_id = %dev.id, error = %e, "fleet device connection error");
                // Cases: shutdown; the backoff delay passed; after a refusal, a new token
                // arrived (no point waiting longer with the one that was refused).
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                    _ = dev.token_changed.notified(), if refused => {}
                }
                // The token is read now, not at the error: the credentials file may have
                // given a new one while the device waited.
                el.mqtt_options
                    .set_credentials(dev.id.as_str(), dev.token());
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

pub(crate) async fn drive(
    dev: Arc<Device>,
    args: FleetArgs,
    talker: bool,
    shutdown: CancellationToken,
    at: tokio::time::Instant,
) {
    tokio::time::sleep_until(at).await;
    // Cases: shutdown before connecting; the first CONNACK.
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = dev.ready.notified() => {}
    }
    let mut telemetry =
        tokio::time::interval(Duration::from_millis(args.telemetry_interval_ms.max(1)));
    telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let persona_period = Duration::from_secs(args.persona_every_s.max(1));
    let persona_start = tokio::time::Instant::now() + persona_period.mul_f64(rand::random::<f64>());
    let mut persona = tokio::time::interval_at(persona_start, persona_period);
    let mut talk = tokio::time::interval(Duration::from_secs(args.talk_s + 3));
    // Own reconnects: a uniformly random time in [0.5, 1.5] x the period after the last.
    let churn_period = Duration::from_secs(args.reconnect_every_s.max(1));
    let next_churn =
        || tokio::time::Instant::now() + churn_period.mul_f64(0.5 + rand::random::<f64>());
    let churn = tokio::time::sleep_until(next_churn());
    tokio::pin!(churn);
    let (mut seq, mut button_seq) = (0u64, 0u64);
    let mut encoder = Encoder::new(24_000).ok();
    loop {
        // Cases: shutdown; telemetry due; a persona press due; an own reconnect due (churn);
        // a talk session due (talkers).
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
                    } else {
                        dev.state().persona_pressed = None;
                    }
                }
            }
            _ = &mut churn, if args.reconnect_every_s > 0 => {
                dev.churn();
                churn.as_mut().reset(next_churn());
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
            sample_rate: AUDIO_SAMPLE_RATE,
            frame_ms: AUDIO_FRAME_MS,
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

pub(crate) async fn observe(
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
