//! Voice conversations: the boundary between the session state machine (`crate::sessions`)
//! and speech/LLM providers.
//!
//! The session layer feeds each uplink Opus frame to an [`UplinkAudio`] (decode + voice
//! activity detection), then calls [`VoicePipeline::transcribe`] at end of speech, publishes
//! the transcript, lets the rules engine see it, and calls [`VoicePipeline::respond`] (or
//! [`VoicePipeline::speak`] for greetings and the `say` action). Replies stream back through a
//! bounded channel of [`VoiceOutput`]s as they are produced, so the first audio leaves before
//! the language model has finished. Cancelling the token stops everything in flight.
//!
//! Layout: [`audio`] (Opus, VAD, WAV), [`resample`], [`sentences`] (chunking the token
//! stream), [`providers`] (the `SpeechToText` / `LanguageModel` / `TextToSpeech` traits, the
//! Anthropic, OpenAI and ElevenLabs clients, the offline engines), [`speaker`] (one reply's
//! audio out), [`pipeline`] ([`Pipeline`], the implementation), [`metrics`], [`settings`]
//! (the `[voice]` section).

pub mod audio;
pub mod metrics;
pub mod pipeline;
pub mod providers;
pub mod resample;
pub mod sentences;
pub mod settings;
pub mod speaker;

pub use pipeline::{Pipeline, Providers};
pub use settings::VoiceSettings;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::personas::Persona;

/// Capacity of the channel carrying a reply's output to the session layer.
pub const OUTPUT_QUEUE: usize = 64;

/// Who said a line of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One line of the device's conversation history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: Role,
    pub content: String,
}

/// What a reply produces, in order.
#[derive(Clone, PartialEq, Eq)]
pub enum VoiceOutput {
    /// The text of the sentence about to be spoken.
    Sentence(String),
    /// Up to five 20 ms Opus frames (16 kHz mono) of speech.
    Audio(Vec<Vec<u8>>),
}

impl std::fmt::Debug for VoiceOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VoiceOutput::Sentence(s) => f.debug_tuple("Sentence").field(s).finish(),
            VoiceOutput::Audio(frames) => write!(
                f,
                "Audio({} frames, {} bytes)",
                frames.len(),
                frames.iter().map(Vec::len).sum::<usize>()
            ),
        }
    }
}

/// A finished reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Everything that was said.
    pub text: String,
    /// Set when a provider failed and a fallback (the persona's scripted line, the offline
    /// voice) was used instead: the session ends with `error` then `idle`.
    pub degraded: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum VoiceError {
    #[error("cancelled")]
    Cancelled,
    #[error("{provider}: {message}")]
    Provider {
        provider: &'static str,
        message: String,
    },
    #[error("audio: {0}")]
    Audio(String),
    #[error("configuration key `voice.{key}`: {message}")]
    Config { key: &'static str, message: String },
}

/// Decodes one utterance's uplink Opus frames and detects its end.
pub trait UplinkAudio: Send {
    /// Adds one 20 ms Opus frame; returns true once voice activity detection has seen the
    /// configured silence after speech (end of utterance).
    fn push(&mut self, opus_frame: &[u8]) -> Result<bool, VoiceError>;
    /// The decoded 16 kHz mono PCM so far.
    fn take_pcm(&mut self) -> Vec<i16>;
}

/// Speech in, persona answer out.
#[async_trait]
pub trait VoicePipeline: Send + Sync + 'static {
    /// A decoder/VAD for a new utterance.
    fn uplink(&self) -> Box<dyn UplinkAudio>;

    /// 16 kHz mono PCM of one utterance to text.
    async fn transcribe(
        &self,
        pcm: &[i16],
        cancel: &CancellationToken,
    ) -> Result<String, VoiceError>;

    /// The persona's answer to `user_text` given `history`, streamed through `out`.
    async fn respond(
        &self,
        persona: &Persona,
        history: &[ChatTurn],
        user_text: &str,
        out: &mpsc::Sender<VoiceOutput>,
        cancel: &CancellationToken,
    ) -> Result<Reply, VoiceError>;

    /// Speaks `text` in the persona's voice (greetings, the rule action `say`).
    async fn speak(
        &self,
        persona: &Persona,
        text: &str,
        out: &mpsc::Sender<VoiceOutput>,
        cancel: &CancellationToken,
    ) -> Result<(), VoiceError>;

    /// Records the session layer's end of speech → first audio chunk sent, in the same
    /// `voice_stage_seconds` family as the pipeline's own stages.
    fn observe_end_of_speech_to_first_audio(&self, _took: Duration) {}
}
