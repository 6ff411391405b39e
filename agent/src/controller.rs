//! The device controller: push-to-talk, playback of replies, the LED, and the agent's reaction
//! to every down-topic message. One task owns all of it; hardware threads and the link talk to
//! it over bounded channels.
//!
//! Push-to-talk: talk press → `SessionControl start` and streaming (a few 20 ms Opus frames per
//! `AudioChunk`); release (or the end of a WAV input) → a final chunk with `last` and `stop`;
//! a press while a reply is pending or playing → `cancel` for it (barge-in), then a new `start`.
//! Playback stops at once on barge-in and on `error`. On `idle` a reply whose last chunk
//! arrived plays out; an unfinished one stops once no audio of it came for [`IDLE_GRACE_MS`]
//! (at once if none is arriving): rumqttd does not keep the order between a device's
//! subscriptions, so `idle` on `session/down` can overtake the reply's tail on `audio/down`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use companion_schema::{
    encode, AudioChunk, ButtonAction, ButtonEvent, Codec, DeviceConfig, Direction, Payload,
    PersonaState, SessionAction, SessionControl, SessionEvent, SessionId, SessionState, TopicKind,
    AUDIO_FRAME_MS, AUDIO_SAMPLE_RATE, SCHEMA_VERSION,
};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::audio::{start_capture, start_playback, Capture, Playback};
use crate::hw::pattern::LedPolicy;
use crate::hw::{AudioIn, AudioOut, ButtonInput, LedState, Leds};
use crate::link::{now_ms, Inbound, Uplink};
use crate::pump::Durable;
use crate::telemetry::SeqStore;

/// Opus frames per uplink `AudioChunk` (3 x 20 ms = 60 ms).
pub const FRAMES_PER_CHUNK: usize = 3;
/// Observations for tools and tests.
pub const OBSERVER_CAPACITY: usize = 256;
/// How long an unfinished reply may still receive audio after `idle`.
pub const IDLE_GRACE_MS: u64 = 500;
/// The button whose role is push-to-talk unless the config says otherwise.
pub const DEFAULT_TALK_BUTTON: &str = "talk";

/// What the controller did, for `talk` and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// The MQTT link went up (true) or down.
    Connected(bool),
    Started(SessionId),
    Stopped {
        session: SessionId,
        chunks: u32,
    },
    Cancelled(SessionId),
    Session(SessionEvent),
    Persona(PersonaState),
    PlaybackStarted(SessionId),
    PlaybackEnded {
        session: SessionId,
        cancelled: bool,
    },
    /// The device is done with this session's reply (played, cut, or none came).
    ReplyClosed(SessionId),
    Led(LedState),
}

pub struct Controller {
    pub uplink: Uplink,
    pub durable: mpsc::Sender<Durable>,
    pub button_seq: SeqStore,
    pub audio_in: Arc<dyn AudioIn>,
    pub audio_out: Arc<dyn AudioOut>,
    pub leds: Box<dyn Leds>,
    pub bitrate: i32,
    pub config: watch::Sender<DeviceConfig>,
    pub observer: Option<mpsc::Sender<Observed>>,
    pub policy: LedPolicy,
    pub volume: Arc<AtomicU8>,
    talk: Option<Talk>,
    /// The session whose reply we are waiting for or playing.
    reply: Option<Reply>,
    /// The latest session this device opened (its events are ours even after the reply).
    recent: Option<SessionId>,
    undecodable: u64,
}

struct Talk {
    session: SessionId,
    capture: Capture,
    pending: Vec<ByteBuf>,
    seq: u32,
}

struct Reply {
    session: SessionId,
    playback: Option<Playback>,
    stream_ended: bool,
    /// When `idle` came for an unfinished stream.
    idle_at: Option<u64>,
    last_chunk_at: u64,
}

impl Reply {
    fn new(session: SessionId) -> Self {
        Self {
            session,
            playback: None,
            stream_ended: false,
            idle_at: None,
            last_chunk_at: 0,
        }
    }

    /// When an unfinished reply is given up after `idle`.
    fn give_up_at(&self) -> Option<u64> {
        let idle = self.idle_at?;
        (!self.stream_ended).then(|| idle.max(self.last_chunk_at) + IDLE_GRACE_MS)
    }
}

async fn next_frame(talk: &mut Option<Talk>) -> Option<Vec<u8>> {
    match talk {
        Some(t) => t.capture.frames.recv().await,
        None => std::future::pending().await,
    }
}

async fn playback_done(reply: &mut Option<Reply>) {
    match reply.as_mut().and_then(|r| r.playback.as_mut()) {
        Some(p) => p.finished().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_ms(at: Option<u64>) {
    let ms = at.unwrap_or(0).saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(ms)).await
}

fn new_session_id() -> SessionId {
    let id = format!("s{:016x}", rand::random::<u64>());
    SessionId::parse(&id).expect("hex is a valid session id")
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        uplink: Uplink,
        durable: mpsc::Sender<Durable>,
        button_seq: SeqStore,
        audio_in: Arc<dyn AudioIn>,
        audio_out: Arc<dyn AudioOut>,
        leds: Box<dyn Leds>,
        bitrate: i32,
        config: watch::Sender<DeviceConfig>,
    ) -> Self {
        Self {
            uplink,
            durable,
            button_seq,
            audio_in,
            audio_out,
            leds,
            bitrate,
            config,
            observer: None,
            policy: LedPolicy::default(),
            volume: Arc::new(AtomicU8::new(DeviceConfig::default().volume)),
            talk: None,
            reply: None,
            recent: None,
            undecodable: 0,
        }
    }

    pub fn with_observer(mut self, tx: mpsc::Sender<Observed>) -> Self {
        self.observer = Some(tx);
        self
    }

    fn observe(&self, o: Observed) {
        if let Some(tx) = &self.observer {
            let _ = tx.try_send(o);
        }
    }

    pub async fn run(
        mut self,
        mut buttons: mpsc::Receiver<ButtonInput>,
        mut inbound: mpsc::Receiver<Inbound>,
        shutdown: CancellationToken,
    ) {
        self.refresh_led();
        loop {
            let expiry = self.policy.expires_at();
            let give_up = self.reply.as_ref().and_then(Reply::give_up_at);
            // Cases: shutdown; a button gesture; a down-topic message; an encoded microphone
            // frame (or the end of the input); the reply finished playing; an unfinished
            // reply's grace after `idle` ran out; a timed LED command expired.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(b) = buttons.recv() => self.on_button(b).await,
                Some(m) = inbound.recv() => self.on_inbound(m),
                f = next_frame(&mut self.talk) => match f {
                    Some(frame) => self.on_frame(frame),
                    None => self.stop_talk("end of input"),
                },
                _ = playback_done(&mut self.reply) => self.on_playback_done(),
                _ = sleep_until_ms(give_up), if give_up.is_some() => self.close_reply(true),
                _ = sleep_until_ms(expiry), if expiry.is_some() => self.refresh_led(),
            }
        }
        if let Some(t) = self.talk.take() {
            t.capture.stop();
        }
        self.stop_playback(true);
        self.leds.show(LedState::OFF);
    }

    fn refresh_led(&mut self) {
        let s = self.policy.state(now_ms());
        self.leds.show(s);
        self.observe(Observed::Led(s));
    }

    async fn on_button(&mut self, b: ButtonInput) {
        self.publish_button(&b).await;
        let role = self
            .config
            .borrow()
            .buttons
            .get(&b.button)
            .cloned()
            .unwrap_or_else(|| b.button.clone());
        if role == DEFAULT_TALK_BUTTON {
            match b.action {
                ButtonAction::Press => self.start_talk(),
                ButtonAction::Release => self.stop_talk("released"),
                _ => {}
            }
        }
    }

    async fn publish_button(&mut self, b: &ButtonInput) {
        let seq = match self.button_seq.take() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "persisting the button seq failed");
                return;
            }
        };
        let ev = ButtonEvent {
            v: SCHEMA_VERSION,
            seq,
            ts_ms: now_ms(),
            button: b.button.clone(),
            action: b.action,
        };
        match encode(&ev) {
            Ok(payload) => {
                let _ = self
                    .durable
                    .send(Durable {
                        kind: TopicKind::Button,
                        payload,
                    })
                    .await;
            }
            Err(e) => tracing::error!(error = %e, "encoding a button event failed"),
        }
    }

    fn control(&self, session: &SessionId, action: SessionAction, reason: &str) -> bool {
        let msg = SessionControl {
            v: SCHEMA_VERSION,
            session_id: session.clone(),
            action,
            reason: Some(reason.to_owned()),
        };
        let sent = encode(&msg).map_err(|e| e.to_string()).and_then(|p| {
            self.uplink
                .publish(TopicKind::SessionUp, p, None)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = &sent {
            tracing::warn!(error = %e, ?action, "session control not sent");
        }
        sent.is_ok()
    }

    /// Talk pressed: barge in on a pending reply, then open a new session and stream.
    pub fn start_talk(&mut self) {
        if self.talk.is_some() {
            return;
        }
        if let Some(r) = &self.reply {
            self.control(&r.session, SessionAction::Cancel, "barge-in");
            self.observe(Observed::Cancelled(r.session.clone()));
            self.close_reply(true);
        }
        let session = new_session_id();
        if !self.control(&session, SessionAction::Start, "talk button") {
            self.policy.set_session(SessionState::Error);
            self.refresh_led();
            return;
        }
        let capture = match start_capture(self.audio_in.as_ref(), self.bitrate) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the microphone");
                self.control(&session, SessionAction::Cancel, "microphone failed");
                self.policy.set_session(SessionState::Error);
                self.refresh_led();
                return;
            }
        };
        tracing::info!(session_id = %session, "listening");
        self.observe(Observed::Started(session.clone()));
        self.recent = Some(session.clone());
        self.talk = Some(Talk {
            session,
            capture,
            pending: Vec::with_capacity(FRAMES_PER_CHUNK),
            seq: 0,
        });
        self.policy.set_session(SessionState::Listening);
        self.refresh_led();
    }

    fn on_frame(&mut self, frame: Vec<u8>) {
        let Some(t) = &mut self.talk else { return };
        t.pending.push(ByteBuf::from(frame));
        if t.pending.len() >= FRAMES_PER_CHUNK {
            self.flush_chunk(false);
        }
    }

    fn flush_chunk(&mut self, last: bool) {
        let Some(t) = &mut self.talk else { return };
        let chunk = AudioChunk {
            v: SCHEMA_VERSION,
            session_id: t.session.clone(),
            seq: t.seq,
            ts_ms: now_ms(),
            codec: Codec::Opus,
            sample_rate: AUDIO_SAMPLE_RATE,
            frame_ms: AUDIO_FRAME_MS,
            frames: std::mem::take(&mut t.pending),
            last,
        };
        t.seq += 1;
        match encode(&chunk) {
            Ok(p) => {
                self.uplink.publish_audio(p);
            }
            Err(e) => tracing::warn!(error = %e, "encoding an audio chunk failed"),
        }
    }

    /// Talk released (or the input ended): last chunk, `stop`, wait for the reply.
    pub fn stop_talk(&mut self, reason: &str) {
        if self.talk.is_none() {
            return;
        }
        if let Some(t) = &self.talk {
            t.capture.stop();
        }
        self.flush_chunk(true);
        let Some(t) = self.talk.take() else { return };
        let dropped = t.capture.dropped.load(Ordering::Relaxed);
        self.control(&t.session, SessionAction::Stop, reason);
        tracing::info!(session_id = %t.session, chunks = t.seq, dropped, "utterance sent");
        self.observe(Observed::Stopped {
            session: t.session.clone(),
            chunks: t.seq,
        });
        self.reply = Some(Reply::new(t.session));
        self.policy.set_session(SessionState::Thinking);
        self.refresh_led();
    }

    fn on_inbound(&mut self, m: Inbound) {
        // Only down topics are handled; anything else is ignored without decoding.
        if m.kind.direction() != Direction::Down {
            return;
        }
        match Payload::decode(m.kind, &m.payload) {
            Ok(Payload::SessionEvent(e)) => self.on_session(e),
            Ok(Payload::Audio(c)) => self.on_audio(c),
            Ok(Payload::Persona(p)) => self.on_persona(p),
            Ok(Payload::Led(c)) => {
                self.policy.set_command(c, now_ms());
                self.refresh_led();
            }
            Ok(Payload::Config(c)) => self.on_config(c),
            // Up-topic payloads; unreachable past the direction check.
            Ok(
                Payload::Status(_)
                | Payload::Telemetry(_)
                | Payload::Button(_)
                | Payload::SessionControl(_),
            ) => {}
            Err(e) => {
                self.undecodable += 1;
                if self.undecodable.is_power_of_two() {
                    tracing::warn!(kind = m.kind.label(), error = %e, total = self.undecodable, "dropping an undecodable message");
                }
            }
        }
    }

    fn on_session(&mut self, e: SessionEvent) {
        let ours = self.recent.as_ref() == Some(&e.session_id)
            || self.reply.as_ref().map(|r| &r.session) == Some(&e.session_id);
        if !ours {
            tracing::debug!(session_id = %e.session_id, "event for another session");
            return;
        }
        tracing::info!(session_id = %e.session_id, state = ?e.state, transcript = ?e.transcript, reply = ?e.reply_text, "session");
        if matches!(e.state, SessionState::Idle | SessionState::Error) {
            if let Some(t) = self.talk.take() {
                t.capture.stop();
            }
        }
        let reply_is_this = self
            .reply
            .as_ref()
            .is_some_and(|r| r.session == e.session_id);
        match e.state {
            SessionState::Error if reply_is_this => self.close_reply(true),
            SessionState::Idle if reply_is_this => {
                let now = now_ms();
                if let Some(r) = &mut self.reply {
                    if !r.stream_ended {
                        r.idle_at = Some(now);
                    }
                }
            }
            _ => {}
        }
        self.policy.set_session(e.state);
        self.refresh_led();
        self.observe(Observed::Session(e));
    }

    /// Ends the current reply: stops playback (at once when `cut`) and forgets the session.
    fn close_reply(&mut self, cut: bool) {
        self.stop_playback(cut);
        if let Some(r) = self.reply.take() {
            self.observe(Observed::ReplyClosed(r.session));
        }
    }

    fn on_audio(&mut self, c: AudioChunk) {
        let for_reply = self
            .reply
            .as_ref()
            .is_some_and(|r| r.session == c.session_id);
        if !for_reply {
            // Speech the backend starts on its own (a `say` rule) plays when we are idle.
            if self.talk.is_some()
                || self.reply.is_some()
                || self.recent.as_ref() == Some(&c.session_id)
            {
                return;
            }
            self.reply = Some(Reply::new(c.session_id.clone()));
        }
        let Some(r) = &mut self.reply else { return };
        if r.playback.is_none() {
            if r.stream_ended {
                return;
            }
            match start_playback(self.audio_out.as_ref(), self.volume.clone()) {
                Ok(p) => r.playback = Some(p),
                Err(e) => {
                    tracing::error!(error = %e, "cannot open the speaker");
                    return;
                }
            }
            let s = r.session.clone();
            self.observe(Observed::PlaybackStarted(s));
        }
        let Some(r) = &mut self.reply else { return };
        r.last_chunk_at = now_ms();
        if c.last {
            r.stream_ended = true;
        }
        if let Some(p) = &mut r.playback {
            let frames = c.frames.into_iter().map(ByteBuf::into_vec).collect();
            p.push(c.seq, frames, c.last);
        }
    }

    fn stop_playback(&mut self, cancel: bool) {
        let Some(r) = &mut self.reply else { return };
        if let Some(mut p) = r.playback.take() {
            if cancel {
                p.cancel();
            }
            let session = r.session.clone();
            // The thread stops within one frame; join off the async thread.
            tokio::task::spawn_blocking(move || p.join());
            self.observe(Observed::PlaybackEnded {
                session,
                cancelled: cancel,
            });
        }
    }

    fn on_playback_done(&mut self) {
        let Some(r) = &mut self.reply else { return };
        let Some(p) = r.playback.take() else { return };
        let report = p.join();
        tracing::info!(session_id = %r.session, frames = report.frames_played, lost = report.lost, "reply played");
        let session = r.session.clone();
        let ended = r.stream_ended;
        self.observe(Observed::PlaybackEnded {
            session,
            cancelled: report.cancelled,
        });
        if ended {
            self.close_reply(false);
        }
    }

    fn on_persona(&mut self, p: PersonaState) {
        tracing::info!(persona = %p.persona_id, name = %p.name, "persona");
        self.policy.persona_color = p.color;
        self.refresh_led();
        self.observe(Observed::Persona(p));
    }

    fn on_config(&mut self, c: DeviceConfig) {
        self.volume.store(c.volume.min(100), Ordering::Relaxed);
        self.policy.ceiling = c.led_brightness.unwrap_or(255);
        self.config.send_replace(c);
        self.refresh_led();
    }
}
