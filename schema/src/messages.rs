//! Payload types of the topic contract. All are MessagePack maps with named fields and a
//! schema version `v`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::ids::{PersonaId, SessionId};
use crate::topic::TopicKind;

/// Current schema version written into every payload.
pub const SCHEMA_VERSION: u8 = 1;

/// An RGB colour.
pub type Rgb = [u8; 3];

/// A payload type of the topic contract.
pub trait Message: Serialize + for<'de> Deserialize<'de> {
    /// The topic kind this payload travels on.
    const KIND: TopicKind;
    /// The schema version carried in the payload.
    fn version(&self) -> u8;
}

macro_rules! message {
    ($ty:ident, $kind:expr) => {
        impl Message for $ty {
            const KIND: TopicKind = $kind;
            fn version(&self) -> u8 {
                self.v
            }
        }
    };
}

/// `devices/{id}/status`: retained presence, also the Last Will (`online: false`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub v: u8,
    pub online: bool,
    pub agent_version: String,
    pub boot_id: String,
    pub ts_ms: u64,
}
message!(Status, TopicKind::Status);

/// `devices/{id}/telemetry`. `seq` increases by one per message and survives reconnects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub v: u8,
    pub seq: u64,
    pub ts_ms: u64,
    pub uptime_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_pct: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_temp_c: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rssi_dbm: Option<i16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_mem_kb: Option<u64>,
    #[serde(default)]
    pub extra: BTreeMap<String, f64>,
}
message!(Telemetry, TopicKind::Telemetry);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ButtonAction {
    Press,
    Release,
    LongPress,
    DoublePress,
}

impl ButtonAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            ButtonAction::Press => "press",
            ButtonAction::Release => "release",
            ButtonAction::LongPress => "long_press",
            ButtonAction::DoublePress => "double_press",
        }
    }
}

/// `devices/{id}/button`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ButtonEvent {
    pub v: u8,
    pub seq: u64,
    pub ts_ms: u64,
    pub button: String,
    pub action: ButtonAction,
}
message!(ButtonEvent, TopicKind::Button);

/// The only codec carried in [`AudioChunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    Opus,
}

/// Sample rate of every audio stream, in Hz.
pub const AUDIO_SAMPLE_RATE: u32 = 16_000;
/// Duration of one Opus frame, in milliseconds.
pub const AUDIO_FRAME_MS: u16 = 20;

/// `devices/{id}/audio/up` and `audio/down`: one or more 20 ms Opus frames.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioChunk {
    pub v: u8,
    pub session_id: SessionId,
    pub seq: u32,
    pub ts_ms: u64,
    pub codec: Codec,
    pub sample_rate: u32,
    pub frame_ms: u16,
    pub frames: Vec<ByteBuf>,
    pub last: bool,
}

impl Message for AudioChunk {
    // Audio travels both ways; `KIND` names the uplink.
    const KIND: TopicKind = TopicKind::AudioUp;
    fn version(&self) -> u8 {
        self.v
    }
}

impl AudioChunk {
    /// Total Opus bytes in this chunk.
    pub fn payload_len(&self) -> usize {
        self.frames.iter().map(|f| f.len()).sum()
    }
}

impl fmt::Debug for AudioChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AudioChunk")
            .field("v", &self.v)
            .field("session_id", &self.session_id)
            .field("seq", &self.seq)
            .field("ts_ms", &self.ts_ms)
            .field("codec", &self.codec)
            .field("sample_rate", &self.sample_rate)
            .field("frame_ms", &self.frame_ms)
            .field("frames", &self.frames.len())
            .field("bytes", &self.payload_len())
            .field("last", &self.last)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionAction {
    Start,
    Stop,
    Cancel,
}

/// `devices/{id}/session/up`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionControl {
    pub v: u8,
    pub session_id: SessionId,
    pub action: SessionAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
message!(SessionControl, TopicKind::SessionUp);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Listening,
    Thinking,
    Speaking,
    Idle,
    Error,
}

/// `devices/{id}/session/down`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEvent {
    pub v: u8,
    pub session_id: SessionId,
    pub state: SessionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcript: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
message!(SessionEvent, TopicKind::SessionDown);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedPattern {
    Off,
    Solid,
    Pulse,
    Blink,
    Spin,
}

/// `devices/{id}/led`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedCommand {
    pub v: u8,
    pub pattern: LedPattern,
    pub color: Rgb,
    pub brightness: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u32>,
}
message!(LedCommand, TopicKind::Led);

/// `devices/{id}/persona` (retained): the device's current persona.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonaState {
    pub v: u8,
    pub persona_id: PersonaId,
    pub name: String,
    pub color: Rgb,
    pub voice: String,
    pub switched_at_ms: u64,
    pub trigger: String,
}
message!(PersonaState, TopicKind::Persona);

/// `devices/{id}/config` (retained): settings the agent applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceConfig {
    pub v: u8,
    pub telemetry_interval_s: u32,
    /// Playback volume, 0-100.
    pub volume: u8,
    /// Button name to role (`talk`, `persona`, ...).
    #[serde(default)]
    pub buttons: BTreeMap<String, String>,
    /// LED brightness ceiling, 0-255.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub led_brightness: Option<u8>,
}
message!(DeviceConfig, TopicKind::Config);

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            v: SCHEMA_VERSION,
            telemetry_interval_s: 30,
            volume: 70,
            buttons: BTreeMap::new(),
            led_brightness: None,
        }
    }
}
