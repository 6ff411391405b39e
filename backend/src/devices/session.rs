//! The conversation session state machine of one device:
//! `idle → listening → thinking → speaking → idle`.
//!
//! Listening buffers the uplink audio (reordered by `seq`, duplicates dropped, late chunks
//! counted) into the voice pipeline's decoder, and ends on `stop`, the decoder's end of
//! speech, the last chunk, or the listening limit. Thinking and speaking run in a turn task
//! (transcribe → rules see the transcript → respond, streamed to `audio/down`); `cancel` or a
//! new `start` cancels it (barge-in). Every transition is published on `session/down` and
//! drives the LED.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use companion_schema::{
    AudioChunk, DeviceId, LedCommand, LedPattern, SessionAction, SessionControl, SessionEvent,
    SessionId, SessionState, TopicKind, SCHEMA_VERSION,
};
use rand::Rng;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::metrics::ReasonLabel;
use super::worker::Worker;
use super::Runtime;
use crate::db::now_ms;
use crate::personas::Persona;
use crate::rules::{EventKind, Field, RuleEvent, SessionVerb};
use crate::voice::{ChatTurn, Reply, Role, UplinkAudio};

/// Messages from a device's turn task to its worker.
pub const INTERNAL_QUEUE: usize = 16;
/// Most out-of-order chunks held while waiting for a missing one.
const MAX_PENDING_CHUNKS: usize = 64;
/// After `stop`, how long to wait for the stream's `last` chunk. The router does not keep
/// order across topics, so a `stop` on `session/up` can overtake the final chunks on
/// `audio/up`.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(400);

pub enum Internal {
    /// Speech became text; the worker runs the rules and answers with the plan.
    Transcribed {
        session: SessionId,
        text: String,
        reply: oneshot::Sender<TurnPlan>,
    },
    /// The turn finished (or failed).
    Done {
        session: SessionId,
        outcome: TurnOutcome,
    },
}

/// What to answer with, decided after the transcript went through the rules.
pub struct TurnPlan {
    pub persona: Arc<Persona>,
    /// The persona changed because of what was said: greet in the new voice.
    pub greet: bool,
}

pub enum TurnOutcome {
    Replied { transcript: String, reply: Reply },
    Spoke { text: String },
    Failed(String),
}

struct Listening {
    id: SessionId,
    deadline: tokio::time::Instant,
    /// Set by `stop`: end when the `last` chunk arrives or at this instant.
    stop_deadline: Option<tokio::time::Instant>,
    next_seq: u32,
    pending: BTreeMap<u32, AudioChunk>,
    // In a Mutex only to make the worker `Sync` (the decoder is `Send`, not `Sync`).
    uplink: std::sync::Mutex<Box<dyn UplinkAudio>>,
    frames: usize,
}

struct Busy {
    id: SessionId,
    cancel: CancellationToken,
    deadline: tokio::time::Instant,
}

#[derive(Default)]
enum Phase {
    #[default]
    Idle,
    Listening(Listening),
    Busy(Busy),
}

#[derive(Default)]
pub struct Session {
    phase: Phase,
    /// The last few sessions started, newest last: a straggling chunk of one of them never
    /// opens a session of its own.
    recent: std::collections::VecDeque<SessionId>,
}

/// Session ids remembered in [`Session::recent`].
const RECENT_SESSIONS: usize = 8;

impl Session {
    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }

    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        match &self.phase {
            Phase::Idle => None,
            Phase::Listening(l) => Some(l.stop_deadline.map_or(l.deadline, |s| s.min(l.deadline))),
            Phase::Busy(b) => Some(b.deadline),
        }
    }

    /// Drops the session without announcing anything (worker exit, shutdown).
    pub fn abandon(&mut self, rt: &Runtime) {
        match std::mem::take(&mut self.phase) {
            Phase::Idle => {}
            Phase::Listening(_) => {
                rt.metrics.active_sessions.dec();
            }
            Phase::Busy(b) => {
                b.cancel.cancel();
                rt.metrics.active_sessions.dec();
            }
        };
    }
}

fn new_session_id() -> SessionId {
    let n: u64 = rand::rng().random();
    SessionId::parse(&format!("s{n:016x}"))
        .unwrap_or_else(|_| SessionId::parse("s").expect("valid literal"))
}

/// The LEDs for a session state in `persona`'s colour (idle is also the persona at rest).
pub(super) fn led_for(state: SessionState, persona: &Persona) -> LedCommand {
    let (pattern, color, brightness) = match state {
        SessionState::Listening => (LedPattern::Pulse, persona.color, 255),
        SessionState::Thinking => (LedPattern::Spin, persona.color, 255),
        SessionState::Speaking => (LedPattern::Solid, persona.color, 255),
        SessionState::Idle => (LedPattern::Solid, persona.color, 96),
        SessionState::Error => (LedPattern::Blink, [255, 40, 40], 255),
    };
    LedCommand {
        v: SCHEMA_VERSION,
        pattern,
        color,
        brightness,
        duration_ms: matches!(state, SessionState::Error).then_some(2000),
    }
}

/// Publishes a session event and the matching LED command.
pub(super) async fn announce(
    rt: &Runtime,
    device: &DeviceId,
    persona: &Persona,
    event: SessionEvent,
) {
    let state = event.state;
    if let Err(e) = rt.bus.publish(device, TopicKind::SessionDown, &event).await {
        tracing::warn!(device_id = %device, error = %e, "publishing a session event failed");
    }
    let _ = rt
        .bus
        .publish(device, TopicKind::Led, &led_for(state, persona))
        .await;
}

pub(super) fn event(id: &SessionId, state: SessionState) -> SessionEvent {
    SessionEvent {
        v: SCHEMA_VERSION,
        session_id: id.clone(),
        state,
        transcript: None,
        reply_text: None,
        error: None,
    }
}

/// The device's recent conversation, oldest first. Read by the turn while speech is being
/// transcribed (the previous turn was stored before this session could start), so it costs
/// the reply nothing; a failed read answers without history.
pub(super) async fn history(rt: &Runtime, device: &DeviceId) -> Vec<ChatTurn> {
    let rows: Result<Vec<(String, String)>, _> = sqlx::query_as(
        "SELECT role, content FROM conversation_messages WHERE device_id = $1
         ORDER BY created_at_ms DESC, message_id DESC LIMIT $2",
    )
    .bind(device.as_str())
    .bind(i64::try_from(rt.limits.history).unwrap_or(20))
    .fetch_all(rt.db.pool())
    .await;
    let rows = rows.unwrap_or_else(|e| {
        tracing::warn!(device_id = %device, error = %e, "reading conversation history failed; answering without it");
        Vec::new()
    });
    rows.into_iter()
        .rev()
        .map(|(role, content)| ChatTurn {
            role: if role == "assistant" {
                Role::Assistant
            } else {
                Role::User
            },
            content,
        })
        .collect()
}

impl Worker {
    async fn announce(&self, ev: SessionEvent) {
        announce(&self.rt, &self.device, &self.persona, ev).await;
    }

    fn end_metric(&self, reason: &'static str) {
        self.rt
            .metrics
            .sessions
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Back to idle, counting the session's end under `reason`.
    fn end_session(&mut self, reason: &'static str) {
        self.session.phase = Phase::Idle;
        self.rt.metrics.active_sessions.dec();
        self.end_metric(reason);
    }

    /// A `SessionControl` from the device.
    pub(super) async fn control(&mut self, c: SessionControl) {
        match c.action {
            SessionAction::Start => self.start(Some(c.session_id)).await,
            SessionAction::Stop => self.stop(Some(&c.session_id)).await,
            SessionAction::Cancel => self.cancel(Some(&c.session_id)).await,
        }
    }

    /// A `session` rule action. Safe to run twice: starting while listening, or stopping
    /// when not listening, changes nothing.
    pub(super) async fn rule_session(&mut self, verb: SessionVerb) {
        match verb {
            SessionVerb::Start => {
                if !matches!(self.session.phase, Phase::Listening(_)) {
                    self.start(None).await;
                }
            }
            SessionVerb::Stop => self.stop(None).await,
            SessionVerb::Cancel => self.cancel(None).await,
        }
    }

    async fn start(&mut self, id: Option<SessionId>) {
        if id.as_ref().is_some_and(|i| self.session.recent.contains(i)) {
            // A repeat of a session already opened (a QoS 1 redelivery, or its audio overtook
            // this `start`; the current session is always the newest in `recent`): it must not
            // barge in on itself.
            return;
        }
        if matches!(self.session.phase, Phase::Busy(_)) {
            self.cancel(None).await; // barge-in
        }
        if self.session.is_idle() {
            self.rt.metrics.active_sessions.inc();
        }
        let id = id.unwrap_or_else(new_session_id);
        if self.session.recent.len() >= RECENT_SESSIONS {
            self.session.recent.pop_front();
        }
        self.session.recent.push_back(id.clone());
        let uplink = std::sync::Mutex::new(self.rt.voice.uplink());
        self.session.phase = Phase::Listening(Listening {
            id: id.clone(),
            deadline: tokio::time::Instant::now() + self.rt.limits.max_listen,
            stop_deadline: None,
            next_seq: 0,
            pending: BTreeMap::new(),
            uplink,
            frames: 0,
        });
        self.announce(event(&id, SessionState::Listening)).await;
    }

    async fn cancel(&mut self, id: Option<&SessionId>) {
        let current = match &self.session.phase {
            Phase::Idle => return,
            Phase::Listening(l) => l.id.clone(),
            Phase::Busy(b) => b.id.clone(),
        };
        if id.is_some_and(|i| *i != current) {
            return;
        }
        if let Phase::Busy(b) = &self.session.phase {
            b.cancel.cancel();
        }
        self.end_session("cancelled");
        let mut ev = event(&current, SessionState::Idle);
        ev.error = Some("cancelled".into());
        self.announce(ev).await;
    }

    async fn stop(&mut self, id: Option<&SessionId>) {
        let Phase::Listening(l) = &mut self.session.phase else {
            return;
        };
        if id.is_some_and(|i| *i != l.id) {
            return;
        }
        // Wait briefly for the stream's `last` chunk (see STOP_GRACE).
        l.stop_deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + STOP_GRACE);
    }

    /// An uplink audio chunk.
    pub(super) async fn audio(&mut self, chunk: AudioChunk) {
        if self.session.is_idle() && !self.session.recent.contains(&chunk.session_id) {
            // The chunk overtook its `start`: they travel on different topics, which MQTT does
            // not order between, and under load the audio often wins. The chunk opens the
            // session; the `start` that follows is then a repeat.
            tracing::debug!(device_id = %self.device, session_id = %chunk.session_id, "audio before start: opening the session");
            self.start(Some(chunk.session_id.clone())).await;
        }
        let Phase::Listening(l) = &mut self.session.phase else {
            self.rt.metrics.audio_chunks_late.inc();
            return;
        };
        if chunk.session_id != l.id {
            self.rt.metrics.audio_chunks_late.inc();
            return;
        }
        if chunk.seq < l.next_seq || l.pending.contains_key(&chunk.seq) {
            self.rt.metrics.audio_chunks_duplicate.inc();
            return;
        }
        l.pending.insert(chunk.seq, chunk);
        if l.pending.len() > MAX_PENDING_CHUNKS {
            // A chunk is lost for good: skip to the oldest one held.
            if let Some(&first) = l.pending.keys().next() {
                self.rt.metrics.audio_chunks_late.inc();
                l.next_seq = first;
            }
        }
        let mut ended = false;
        while let Some(chunk) = l.pending.remove(&l.next_seq) {
            l.next_seq = l.next_seq.wrapping_add(1);
            for frame in &chunk.frames {
                l.frames += 1;
                if let Ok(up) = l.uplink.get_mut() {
                    match up.push(frame) {
                        Ok(true) => ended = true,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(device_id = %self.device, error = %e, "undecodable uplink frame")
                        }
                    }
                }
            }
            if chunk.last {
                ended = true;
            }
        }
        if ended {
            self.end_listening("end_of_speech").await;
        }
    }

    /// The listening limit or the watchdog fired.
    pub(super) async fn session_deadline(&mut self) {
        match &self.session.phase {
            Phase::Listening(l) => {
                let why = if l.stop_deadline.is_some() {
                    "stop"
                } else {
                    "timeout"
                };
                self.end_listening(why).await
            }
            Phase::Busy(b) => {
                let id = b.id.clone();
                b.cancel.cancel();
                self.fail(&id, "watchdog", "the reply took too long").await;
            }
            Phase::Idle => {}
        }
    }

    async fn end_listening(&mut self, why: &'static str) {
        let Phase::Listening(mut l) = std::mem::take(&mut self.session.phase) else {
            return;
        };
        let end_of_speech = Instant::now();
        let pcm = l.uplink.get_mut().map(|u| u.take_pcm()).unwrap_or_default();
        tracing::debug!(device_id = %self.device, session_id = %l.id, why, frames = l.frames, "listening ended");
        self.announce(event(&l.id, SessionState::Thinking)).await;
        if pcm.is_empty() {
            return self.fail(&l.id, "error", "no audio was received").await;
        }
        let cancel = CancellationToken::new();
        self.session.phase = Phase::Busy(Busy {
            id: l.id.clone(),
            cancel: cancel.clone(),
            deadline: tokio::time::Instant::now() + self.rt.limits.watchdog,
        });
        let turn = super::turn::Turn {
            rt: self.rt.clone(),
            device: self.device.clone(),
            session: l.id,
            internal: self.internal_tx.clone(),
            cancel,
            end_of_speech,
        };
        tokio::spawn(turn.listen_and_reply(pcm));
    }

    /// The rule action `say`: speaks in the current persona's voice when no session runs.
    pub(super) async fn say(&mut self, text: &str) -> Result<(), String> {
        if !self.session.is_idle() {
            return Err("a session is running".into());
        }
        let id = new_session_id();
        let cancel = CancellationToken::new();
        self.rt.metrics.active_sessions.inc();
        self.session.phase = Phase::Busy(Busy {
            id: id.clone(),
            cancel: cancel.clone(),
            deadline: tokio::time::Instant::now() + self.rt.limits.watchdog,
        });
        let turn = super::turn::Turn {
            rt: self.rt.clone(),
            device: self.device.clone(),
            session: id,
            internal: self.internal_tx.clone(),
            cancel,
            end_of_speech: Instant::now(),
        };
        tokio::spawn(turn.say(self.persona.clone(), text.to_owned()));
        Ok(())
    }

    /// Ends the session (counted under `reason`): `error` with `message`, then `idle`.
    async fn fail(&mut self, id: &SessionId, reason: &'static str, message: &str) {
        self.end_session(reason);
        self.announce_error(id, message.to_owned()).await;
        self.announce(event(id, SessionState::Idle)).await;
    }

    async fn announce_error(&self, id: &SessionId, message: String) {
        let mut ev = event(id, SessionState::Error);
        ev.error = Some(message);
        self.announce(ev).await;
    }

    pub(super) async fn handle_internal(&mut self, msg: Internal) {
        let current = match &self.session.phase {
            Phase::Busy(b) => Some(b.id.clone()),
            _ => None,
        };
        match msg {
            Internal::Transcribed {
                session,
                text,
                reply,
            } => {
                if current.as_ref() != Some(&session) {
                    return; // cancelled meanwhile; dropping `reply` ends the task
                }
                let mut ev = event(&session, SessionState::Thinking);
                ev.transcript = Some(text.clone());
                self.announce(ev).await;
                let before = self.persona.id.clone();
                let rule_event = RuleEvent {
                    kind: EventKind::Transcript,
                    topic: companion_schema::Topic::new(self.device.clone(), TopicKind::SessionUp)
                        .to_string(),
                    fields: vec![
                        ("session_id", Field::Text(session.to_string())),
                        ("text", Field::Text(text)),
                    ],
                };
                self.run_rules(rule_event, Instant::now()).await;
                let plan = TurnPlan {
                    persona: self.persona.clone(),
                    greet: self.persona.id != before,
                };
                let _ = reply.send(plan);
            }
            Internal::Done { session, outcome } => {
                if current.as_ref() != Some(&session) {
                    return;
                }
                self.session.phase = Phase::Idle;
                self.rt.metrics.active_sessions.dec();
                let mut idle = event(&session, SessionState::Idle);
                match outcome {
                    TurnOutcome::Replied { transcript, reply } => {
                        self.remember(&session, &transcript, &reply.text).await;
                        idle.transcript = Some(transcript);
                        idle.reply_text = Some(reply.text);
                        if let Some(why) = reply.degraded {
                            self.end_metric("degraded");
                            self.announce_error(&session, why).await;
                        } else {
                            self.end_metric("replied");
                        }
                    }
                    TurnOutcome::Spoke { text } => {
                        idle.reply_text = Some(text);
                        self.end_metric("spoke");
                    }
                    TurnOutcome::Failed(why) => {
                        self.end_metric("error");
                        self.announce_error(&session, why).await;
                    }
                }
                self.announce(idle).await;
            }
        }
    }

    /// Stores a question and its answer, and trims the device's history to its bound: one
    /// transaction, so a failure stores neither half of the pair (and SQLite syncs once).
    async fn remember(&self, session: &SessionId, user: &str, assistant: &str) {
        if let Err(e) = self.try_remember(session, user, assistant).await {
            tracing::warn!(device_id = %self.device, error = %e, "storing conversation history failed");
        }
    }

    async fn try_remember(
        &self,
        session: &SessionId,
        user: &str,
        assistant: &str,
    ) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let mut tx = self.rt.db.pool().begin().await?;
        for (i, (role, content)) in [(Role::User, user), (Role::Assistant, assistant)]
            .into_iter()
            .enumerate()
        {
            let id = format!("{now:013}-{i}-{:08x}", rand::rng().random::<u32>());
            sqlx::query(
                "INSERT INTO conversation_messages (message_id, device_id, session_id, persona_id, role, content, created_at_ms)
                 SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = $2)",
            )
            .bind(id)
            .bind(self.device.as_str())
            .bind(session.as_str())
            .bind(self.persona.id.as_str())
            .bind(role.as_str())
            .bind(content)
            .bind(now + i as i64)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "DELETE FROM conversation_messages WHERE device_id = $1 AND message_id NOT IN
               (SELECT message_id FROM conversation_messages WHERE device_id = $1
                ORDER BY created_at_ms DESC, message_id DESC LIMIT $2)",
        )
        .bind(self.device.as_str())
        .bind(i64::try_from(self.rt.limits.history).unwrap_or(20))
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }
}
