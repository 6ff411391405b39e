//! MessagePack encoding with named fields, the 64 KiB limit and the version check.

use crate::messages::{
    AudioChunk, ButtonEvent, DeviceConfig, LedCommand, Message, PersonaState, SessionControl,
    SessionEvent, Status, Telemetry, SCHEMA_VERSION,
};
use crate::topic::TopicKind;

/// Largest payload accepted or produced, in bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("payload is {len} bytes; the maximum is {MAX_PAYLOAD}")]
    TooLarge { len: usize },
    #[error("cannot encode payload: {0}")]
    Serialize(#[from] rmp_serde::encode::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is {len} bytes; the maximum is {MAX_PAYLOAD}")]
    TooLarge { len: usize },
    #[error("malformed payload: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("unsupported schema version {0}")]
    Version(u8),
}

impl DecodeError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Version(_) => "version",
        }
    }
}

/// Encodes a payload as a MessagePack map with named fields.
pub fn encode<T: Message>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let bytes = rmp_serde::to_vec_named(msg)?;
    if bytes.len() > MAX_PAYLOAD {
        return Err(EncodeError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes a payload. Never panics, whatever the bytes.
pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge { len: bytes.len() });
    }
    let msg: T = rmp_serde::from_slice(bytes)?;
    match msg.version() {
        0 => Err(DecodeError::Version(0)),
        // Newer versions only add fields, which we ignore.
        _ => Ok(msg),
    }
}

/// Any payload, as decoded by its topic kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Status(Status),
    Telemetry(Telemetry),
    Button(ButtonEvent),
    Audio(AudioChunk),
    SessionControl(SessionControl),
    SessionEvent(SessionEvent),
    Led(LedCommand),
    Persona(PersonaState),
    Config(DeviceConfig),
}

impl Payload {
    /// Decodes `bytes` as the payload type that `kind` carries.
    pub fn decode(kind: TopicKind, bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(match kind {
            TopicKind::Status => Payload::Status(decode(bytes)?),
            TopicKind::Telemetry => Payload::Telemetry(decode(bytes)?),
            TopicKind::Button => Payload::Button(decode(bytes)?),
            TopicKind::AudioUp | TopicKind::AudioDown => Payload::Audio(decode(bytes)?),
            TopicKind::SessionUp => Payload::SessionControl(decode(bytes)?),
            TopicKind::SessionDown => Payload::SessionEvent(decode(bytes)?),
            TopicKind::Led => Payload::Led(decode(bytes)?),
            TopicKind::Persona => Payload::Persona(decode(bytes)?),
            TopicKind::Config => Payload::Config(decode(bytes)?),
        })
    }

    /// Encodes the payload.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        match self {
            Payload::Status(m) => encode(m),
            Payload::Telemetry(m) => encode(m),
            Payload::Button(m) => encode(m),
            Payload::Audio(m) => encode(m),
            Payload::SessionControl(m) => encode(m),
            Payload::SessionEvent(m) => encode(m),
            Payload::Led(m) => encode(m),
            Payload::Persona(m) => encode(m),
            Payload::Config(m) => encode(m),
        }
    }
}

/// The version to write in new payloads.
pub const fn current_version() -> u8 {
    SCHEMA_VERSION
}
