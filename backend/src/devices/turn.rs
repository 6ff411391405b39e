//! A conversation turn's task: everything after listening ends (speech to text, the worker's
//! plan after the rules saw the transcript, the streamed reply on `audio/down`), and the
//! messages it exchanges with its device's worker.

use std::sync::Arc;
use std::time::Instant;

use companion_schema::{
    AudioChunk, Codec, DeviceId, SessionId, SessionState, TopicKind, AUDIO_FRAME_MS,
    AUDIO_SAMPLE_RATE, SCHEMA_VERSION,
};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::signal::{announce, event};
use super::Runtime;
use crate::db::now_ms;
use crate::personas::Persona;
use crate::voice::{ChatTurn, Reply, Role, VoiceError, VoiceOutput, OUTPUT_QUEUE};

/// Messages from a device's turn task to its worker.
pub const INTERNAL_QUEUE: usize = 16;

/// What a turn task tells its worker.
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

/// One turn's task: everything after listening ends.
pub(super) struct Turn {
    pub(super) rt: Arc<Runtime>,
    pub(super) device: DeviceId,
    pub(super) session: SessionId,
    pub(super) internal: mpsc::Sender<Box<Internal>>,
    pub(super) cancel: CancellationToken,
    pub(super) end_of_speech: Instant,
}

impl Turn {
    async fn done(&self, outcome: TurnOutcome) {
        let _ = self
            .internal
            .send(Box::new(Internal::Done {
                session: self.session.clone(),
                outcome,
            }))
            .await;
    }

    pub(super) async fn listen_and_reply(self, pcm: Vec<i16>) {
        let voice = &self.rt.voice;
        let (text, history) = tokio::join!(
            voice.transcribe(&pcm, &self.cancel),
            history(&self.rt, &self.device)
        );
        let text = match text {
            Ok(t) => t,
            Err(VoiceError::Cancelled) => return,
            Err(e) => {
                return self
                    .done(TurnOutcome::Failed(format!(
                        "speech recognition failed: {e}"
                    )))
                    .await
            }
        };
        let (tx, rx) = oneshot::channel();
        let asked = self
            .internal
            .send(Box::new(Internal::Transcribed {
                session: self.session.clone(),
                text: text.clone(),
                reply: tx,
            }))
            .await;
        let Ok(plan) = (match asked {
            Ok(()) => rx.await,
            Err(_) => return,
        }) else {
            return; // the session was cancelled
        };
        let (out_tx, out_rx) = mpsc::channel(OUTPUT_QUEUE);
        let producer = async {
            let r = if plan.greet {
                voice
                    .speak(&plan.persona, &plan.persona.greeting, &out_tx, &self.cancel)
                    .await
                    .map(|()| Reply {
                        text: plan.persona.greeting.clone(),
                        degraded: None,
                    })
            } else {
                voice
                    .respond(&plan.persona, &history, &text, &out_tx, &self.cancel)
                    .await
            };
            drop(out_tx);
            r
        };
        let (reply, _) = tokio::join!(producer, self.stream(out_rx, &plan.persona));
        match reply {
            _ if self.cancel.is_cancelled() => {}
            Ok(reply) => {
                self.done(TurnOutcome::Replied {
                    transcript: text,
                    reply,
                })
                .await
            }
            Err(e) => self.done(TurnOutcome::Failed(e.to_string())).await,
        }
    }

    pub(super) async fn say(self, persona: Arc<Persona>, text: String) {
        let voice = &self.rt.voice;
        let (out_tx, out_rx) = mpsc::channel(OUTPUT_QUEUE);
        let producer = async {
            let r = voice.speak(&persona, &text, &out_tx, &self.cancel).await;
            drop(out_tx);
            r
        };
        let (r, _) = tokio::join!(producer, self.stream(out_rx, &persona));
        match r {
            _ if self.cancel.is_cancelled() => {}
            Ok(()) => self.done(TurnOutcome::Spoke { text }).await,
            Err(e) => self.done(TurnOutcome::Failed(e.to_string())).await,
        }
    }

    /// Publishes the reply as it is produced: `speaking` before the first audio, chunks with
    /// increasing `seq`, and a final empty chunk with `last = true`.
    async fn stream(&self, mut out: mpsc::Receiver<VoiceOutput>, persona: &Persona) {
        let mut seq: u32 = 0;
        let mut first_sentence: Option<String> = None;
        let mut speaking = false;
        loop {
            // Cases: the next output; cancellation (stop at once).
            let item = tokio::select! {
                item = out.recv() => item,
                _ = self.cancel.cancelled() => return,
            };
            let Some(item) = item else { break };
            match item {
                VoiceOutput::Sentence(s) => {
                    first_sentence.get_or_insert(s);
                }
                VoiceOutput::Audio(frames) => {
                    if self.cancel.is_cancelled() {
                        return;
                    }
                    if !speaking {
                        speaking = true;
                        self.rt
                            .voice
                            .observe_end_of_speech_to_first_audio(self.end_of_speech.elapsed());
                        let mut ev = event(&self.session, SessionState::Speaking);
                        ev.reply_text = first_sentence.clone();
                        announce(&self.rt, &self.device, persona, ev).await;
                    }
                    let chunk = self.chunk(seq, frames, false);
                    seq = seq.wrapping_add(1);
                    if let Err(e) = self
                        .rt
                        .bus
                        .publish(&self.device, TopicKind::AudioDown, &chunk)
                        .await
                    {
                        tracing::warn!(device_id = %self.device, error = %e, "publishing reply audio failed");
                    }
                }
            }
        }
        if !self.cancel.is_cancelled() {
            let last = self.chunk(seq, Vec::new(), true);
            let _ = self
                .rt
                .bus
                .publish(&self.device, TopicKind::AudioDown, &last)
                .await;
        }
    }

    fn chunk(&self, seq: u32, frames: Vec<Vec<u8>>, last: bool) -> AudioChunk {
        AudioChunk {
            v: SCHEMA_VERSION,
            session_id: self.session.clone(),
            seq,
            ts_ms: u64::try_from(now_ms()).unwrap_or(0),
            codec: Codec::Opus,
            sample_rate: AUDIO_SAMPLE_RATE,
            frame_ms: AUDIO_FRAME_MS,
            frames: frames.into_iter().map(ByteBuf::from).collect(),
            last,
        }
    }
}

/// The device's recent conversation, oldest first. Read by the turn while speech is being
/// transcribed (the previous turn was stored before this session could start), so it costs
/// the reply nothing; a failed read answers without history.
async fn history(rt: &Runtime, device: &DeviceId) -> Vec<ChatTurn> {
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
