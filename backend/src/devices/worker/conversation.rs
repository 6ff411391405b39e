//! The worker's side of a conversation: drives the device's [`Session`] from `session/up`,
//! audio, rules and its turn task, announcing every transition on `session/down` and the LED.

use std::time::Instant;

use companion_schema::{
    AudioChunk, SessionAction, SessionControl, SessionEvent, SessionId, SessionState, TopicKind,
};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::db::now_ms;
use crate::devices::metrics::ReasonLabel;
use crate::devices::session::{new_session_id, AudioVerdict, Expired};
use crate::devices::signal::{announce, event};
use crate::devices::turn::{Internal, Turn, TurnOutcome, TurnPlan};
use crate::rules::{EventKind, Field, RuleEvent, SessionVerb};
use crate::voice::Role;

/// After `stop`, how long to wait for the stream's `last` chunk. The router does not keep
/// order across topics, so a `stop` on `session/up` can overtake the final chunks on
/// `audio/up`.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(400);

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

    /// A session ended (already idle): counted under `reason`.
    fn ended(&self, reason: &'static str) {
        self.rt.metrics.active_sessions.dec();
        self.end_metric(reason);
    }

    /// Drops the session without announcing anything (worker exit, shutdown).
    pub(super) fn abandon_session(&mut self) {
        if self.session.abandon() {
            self.rt.metrics.active_sessions.dec();
        }
    }

    /// A `SessionControl` from the device.
    pub(super) async fn control(&mut self, c: SessionControl) {
        match c.action {
            SessionAction::Start => self.start(Some(c.session_id)).await,
            SessionAction::Stop | SessionAction::Cancel
                if self.session.is_idle() && !self.session.is_recent(&c.session_id) =>
            {
                self.unknown_session(&c.session_id).await
            }
            SessionAction::Stop => self.stop(Some(&c.session_id)),
            SessionAction::Cancel => self.cancel(Some(&c.session_id)).await,
        }
    }

    /// A `stop` or `cancel` for a session this server never opened (it restarted while the
    /// device was talking, say): the device is told it ended, instead of waiting for a reply
    /// that cannot come.
    async fn unknown_session(&mut self, id: &SessionId) {
        tracing::info!(device_id = %self.device, session_id = %id, "stop for an unknown session; telling the device it ended");
        let mut ev = event(id, SessionState::Idle);
        ev.error = Some("unknown session (the server restarted?)".into());
        self.announce(ev).await;
    }

    /// A `session` rule action. Safe to run twice: starting while listening, or stopping
    /// when not listening, changes nothing.
    pub(super) async fn rule_session(&mut self, verb: SessionVerb) {
        match verb {
            SessionVerb::Start => {
                if !self.session.is_listening() {
                    self.start(None).await;
                }
            }
            SessionVerb::Stop => self.stop(None),
            SessionVerb::Cancel => self.cancel(None).await,
        }
    }

    async fn start(&mut self, id: Option<SessionId>) {
        if id.as_ref().is_some_and(|i| self.session.is_recent(i)) {
            // A repeat of a session already opened (a QoS 1 redelivery, or its audio overtook
            // this `start`; the current session is always the newest remembered): it must not
            // barge in on itself.
            return;
        }
        if self.session.is_busy() {
            self.cancel(None).await; // barge-in
        }
        if self.session.is_idle() {
            self.rt.metrics.active_sessions.inc();
        }
        let id = id.unwrap_or_else(new_session_id);
        let deadline = tokio::time::Instant::now() + self.rt.limits.max_listen;
        self.session
            .listen(id.clone(), self.rt.voice.uplink(), deadline);
        self.announce(event(&id, SessionState::Listening)).await;
    }

    async fn cancel(&mut self, id: Option<&SessionId>) {
        let Some(current) = self.session.cancel(id) else {
            return;
        };
        self.ended("cancelled");
        let mut ev = event(&current, SessionState::Idle);
        ev.error = Some("cancelled".into());
        self.announce(ev).await;
    }

    fn stop(&mut self, id: Option<&SessionId>) {
        // Wait briefly for the stream's `last` chunk (see STOP_GRACE).
        self.session
            .stop(id, tokio::time::Instant::now() + STOP_GRACE);
    }

    /// An uplink audio chunk.
    pub(super) async fn audio(&mut self, chunk: AudioChunk) {
        if self.session.is_idle() && !self.session.is_recent(&chunk.session_id) {
            // The chunk overtook its `start`: they travel on different topics, which MQTT does
            // not order between, and under load the audio often wins. The chunk opens the
            // session; the `start` that follows is then a repeat.
            tracing::debug!(device_id = %self.device, session_id = %chunk.session_id, "audio before start: opening the session");
            self.start(Some(chunk.session_id.clone())).await;
        }
        match self.session.audio(chunk) {
            AudioVerdict::Late => {
                self.rt.metrics.audio_chunks_late.inc();
            }
            AudioVerdict::Duplicate => {
                self.rt.metrics.audio_chunks_duplicate.inc();
            }
            AudioVerdict::Accepted { skipped, ended } => {
                if skipped {
                    self.rt.metrics.audio_chunks_late.inc();
                }
                if ended {
                    self.end_listening("end_of_speech").await;
                }
            }
        }
    }

    /// The listening limit or the watchdog fired.
    pub(super) async fn session_deadline(&mut self) {
        match self.session.expire() {
            Some(Expired::Listening { after_stop }) => {
                self.end_listening(if after_stop { "stop" } else { "timeout" })
                    .await
            }
            Some(Expired::Busy(id)) => {
                self.session.finish(&id);
                self.fail(&id, "watchdog", "the reply took too long").await;
            }
            None => {}
        }
    }

    async fn end_listening(&mut self, why: &'static str) {
        let Some(utterance) = self.session.end_listening() else {
            return;
        };
        let end_of_speech = Instant::now();
        let id = utterance.id;
        tracing::debug!(device_id = %self.device, session_id = %id, why, frames = utterance.frames, "listening ended");
        self.announce(event(&id, SessionState::Thinking)).await;
        if utterance.pcm.is_empty() {
            return self.fail(&id, "error", "no audio was received").await;
        }
        let turn = self.turn(id, end_of_speech);
        tokio::spawn(turn.listen_and_reply(utterance.pcm));
    }

    /// The rule action `say`: speaks in the current persona's voice when no session runs.
    pub(super) async fn say(&mut self, text: &str) -> Result<(), String> {
        if !self.session.is_idle() {
            return Err("a session is running".into());
        }
        self.rt.metrics.active_sessions.inc();
        let turn = self.turn(new_session_id(), Instant::now());
        tokio::spawn(turn.say(self.persona.clone(), text.to_owned()));
        Ok(())
    }

    /// Makes session `id` busy with a new turn (not yet spawned).
    fn turn(&mut self, id: SessionId, end_of_speech: Instant) -> Turn {
        let cancel = CancellationToken::new();
        self.session.busy(
            id.clone(),
            cancel.clone(),
            tokio::time::Instant::now() + self.rt.limits.watchdog,
        );
        Turn {
            rt: self.rt.clone(),
            device: self.device.clone(),
            session: id,
            internal: self.internal_tx.clone(),
            cancel,
            end_of_speech,
        }
    }

    /// Ends the session (already idle; counted under `reason`): `error` with `message`, then
    /// `idle`.
    async fn fail(&mut self, id: &SessionId, reason: &'static str, message: &str) {
        self.ended(reason);
        self.announce_error(id, message.to_owned()).await;
        self.announce(event(id, SessionState::Idle)).await;
    }

    async fn announce_error(&self, id: &SessionId, message: String) {
        let mut ev = event(id, SessionState::Error);
        ev.error = Some(message);
        self.announce(ev).await;
    }

    pub(super) async fn handle_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Transcribed {
                session,
                text,
                reply,
            } => {
                if self.session.busy_id() != Some(&session) {
                    return; // cancelled meanwhile; dropping `reply` ends the task
                }
                let mut ev = event(&session, SessionState::Thinking);
                ev.transcript = Some(text.clone());
                self.announce(ev).await;
                let before = self.persona.id.clone();
                let rule_event = RuleEvent {
                    kind: EventKind::Transcript,
                    topic: companion_schema::Topic::new(self.device.clone(), TopicKind::SessionUp),
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
                if !self.session.finish(&session) {
                    return;
                }
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
