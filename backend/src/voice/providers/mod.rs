//! Speech and language providers behind three traits. Cloud clients speak each provider's
//! documented wire format over reqwest; the offline engines run local programs.
//!
//! Every method is cancellable by dropping its future or stream: that closes the HTTP
//! connection or kills the child process.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

use super::ChatTurn;
use crate::personas::Persona;

pub mod anthropic;
pub mod elevenlabs;
pub mod http;
pub mod offline;
pub mod openai;
pub mod sse;

/// Why a provider call failed. [`ProviderError::kind`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    /// An error reported inside a stream (`event: error`, `{"error": ..}`).
    #[error("{kind}: {message}")]
    Api { kind: String, message: String },
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("transport: {0}")]
    Transport(String),
    #[error("{program}: {message}")]
    Process {
        program: &'static str,
        message: String,
    },
    #[error("audio: {0}")]
    Audio(String),
}

impl ProviderError {
    /// The `kind` label of `voice_provider_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Connect(_) => "connect",
            ProviderError::Status { status, .. } if *status == 429 => "rate_limited",
            ProviderError::Status { status, .. } if *status >= 500 => "server_error",
            ProviderError::Status { .. } => "client_error",
            ProviderError::Api { .. } => "api_error",
            ProviderError::Malformed(_) => "malformed",
            ProviderError::Transport(_) => "transport",
            ProviderError::Process { .. } => "process",
            ProviderError::Audio(_) => "audio",
        }
    }
}

/// Token usage of one reply, as the provider reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One item of a streamed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmEvent {
    /// Text to append.
    Text(String),
    /// The reply is complete; usage is the final (not summed) figure when the provider sent one.
    Done(Option<Usage>),
    /// A stream item was unusable and skipped (counted, logged; the reply goes on).
    Skipped(String),
}

pub type LlmStream = Pin<Box<dyn Stream<Item = Result<LlmEvent, ProviderError>> + Send>>;
/// 16 kHz mono PCM, chunk by chunk.
pub type AudioStream = Pin<Box<dyn Stream<Item = Result<Vec<i16>, ProviderError>> + Send>>;

/// What a language model is asked.
#[derive(Debug, Clone)]
pub struct ChatRequest<'a> {
    pub persona: &'a Persona,
    pub model: &'a str,
    /// The history followed by the user's new turn; alternating, starting with the user.
    pub turns: &'a [ChatTurn],
    pub max_tokens: u32,
}

#[async_trait]
pub trait SpeechToText: Send + Sync + 'static {
    /// The `provider` label.
    fn name(&self) -> &'static str;
    /// 16 kHz mono PCM to text.
    async fn transcribe(&self, pcm: &[i16]) -> Result<String, ProviderError>;
}

#[async_trait]
pub trait LanguageModel: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Starts a reply; the stream ends after [`LlmEvent::Done`] or an error.
    async fn stream(&self, request: &ChatRequest<'_>) -> Result<LlmStream, ProviderError>;
}

#[async_trait]
pub trait TextToSpeech: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Whether this engine has a voice for `persona` (cloud engines need a voice id).
    fn voice(&self, persona: &Persona) -> Option<String>;
    /// Speaks `text` in `voice`, streaming 16 kHz PCM.
    async fn synthesize(&self, text: &str, voice: &str) -> Result<AudioStream, ProviderError>;
}

/// Merges consecutive turns of one role and drops leading assistant turns, which the
/// Messages API rejects.
pub fn alternating(turns: &[ChatTurn]) -> Vec<ChatTurn> {
    let mut out: Vec<ChatTurn> = Vec::with_capacity(turns.len());
    for t in turns {
        if t.content.trim().is_empty() {
            continue;
        }
        if out.is_empty() && t.role == super::Role::Assistant {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.role == t.role => {
                last.content.push('\n');
                last.content.push_str(&t.content);
            }
            _ => out.push(t.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::voice::Role;

    fn turn(role: Role, content: &str) -> ChatTurn {
        ChatTurn {
            role,
            content: content.into(),
        }
    }

    #[test]
    fn turns_are_made_to_alternate_starting_with_the_user() {
        let out = alternating(&[
            turn(Role::Assistant, "Hi, I'm Aria."),
            turn(Role::User, "hello"),
            turn(Role::User, "are you there"),
            turn(Role::Assistant, "Yes."),
            turn(Role::User, " "),
            turn(Role::User, "good"),
        ]);
        assert_eq!(
            out,
            [
                turn(Role::User, "hello\nare you there"),
                turn(Role::Assistant, "Yes."),
                turn(Role::User, "good"),
            ]
        );
    }
}
