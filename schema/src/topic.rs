//! The topic contract (v1). This is the only place topic strings are written or read.
//!
//! Every device topic is `devices/{device_id}/{suffix}`; [`TopicKind`] names the suffix and
//! carries the per-kind contract (direction, QoS, retained).

use std::fmt;

use crate::ids::{DeviceId, IdError};

/// The first level of every device topic.
pub const DEVICES_ROOT: &str = "devices";

/// Which way a topic flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Device to backend.
    Up,
    /// Backend to device.
    Down,
}

/// MQTT quality of service level used on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
}

/// The kind of a device topic: the part after `devices/{id}/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicKind {
    Status,
    Telemetry,
    Button,
    AudioUp,
    SessionUp,
    AudioDown,
    SessionDown,
    Led,
    Persona,
    Config,
}

impl TopicKind {
    pub const ALL: [TopicKind; 10] = [
        TopicKind::Status,
        TopicKind::Telemetry,
        TopicKind::Button,
        TopicKind::AudioUp,
        TopicKind::SessionUp,
        TopicKind::AudioDown,
        TopicKind::SessionDown,
        TopicKind::Led,
        TopicKind::Persona,
        TopicKind::Config,
    ];

    /// The topic levels after the device id.
    pub const fn suffix(self) -> &'static str {
        match self {
            TopicKind::Status => "status",
            TopicKind::Telemetry => "telemetry",
            TopicKind::Button => "button",
            TopicKind::AudioUp => "audio/up",
            TopicKind::SessionUp => "session/up",
            TopicKind::AudioDown => "audio/down",
            TopicKind::SessionDown => "session/down",
            TopicKind::Led => "led",
            TopicKind::Persona => "persona",
            TopicKind::Config => "config",
        }
    }

    /// A short label for metrics and logs (`audio_up`, `telemetry`, ...).
    pub const fn label(self) -> &'static str {
        match self {
            TopicKind::Status => "status",
            TopicKind::Telemetry => "telemetry",
            TopicKind::Button => "button",
            TopicKind::AudioUp => "audio_up",
            TopicKind::SessionUp => "session_up",
            TopicKind::AudioDown => "audio_down",
            TopicKind::SessionDown => "session_down",
            TopicKind::Led => "led",
            TopicKind::Persona => "persona",
            TopicKind::Config => "config",
        }
    }

    pub const fn direction(self) -> Direction {
        match self {
            TopicKind::Status
            | TopicKind::Telemetry
            | TopicKind::Button
            | TopicKind::AudioUp
            | TopicKind::SessionUp => Direction::Up,
            TopicKind::AudioDown
            | TopicKind::SessionDown
            | TopicKind::Led
            | TopicKind::Persona
            | TopicKind::Config => Direction::Down,
        }
    }

    pub const fn qos(self) -> Qos {
        match self {
            TopicKind::AudioUp | TopicKind::AudioDown => Qos::AtMostOnce,
            _ => Qos::AtLeastOnce,
        }
    }

    pub const fn retained(self) -> bool {
        matches!(
            self,
            TopicKind::Status | TopicKind::Persona | TopicKind::Config
        )
    }

    /// Whether this kind carries audio (the high-rate class for limits and metrics).
    pub const fn is_audio(self) -> bool {
        matches!(self, TopicKind::AudioUp | TopicKind::AudioDown)
    }

    fn from_suffix(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.suffix() == s)
    }

    /// The filter matching this kind for every device: `devices/+/{suffix}`.
    pub fn all_devices_filter(self) -> String {
        format!("{DEVICES_ROOT}/+/{}", self.suffix())
    }

    /// A shared-subscription filter: `$share/{group}/devices/+/{suffix}`.
    pub fn shared_filter(self, group: &str) -> String {
        format!("$share/{group}/{}", self.all_devices_filter())
    }
}

/// A concrete device topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    pub device: DeviceId,
    pub kind: TopicKind,
}

/// Why a string is not a device topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic does not start with '{DEVICES_ROOT}/'")]
    Foreign,
    #[error("topic has no device id")]
    MissingDevice,
    #[error("invalid device id in topic: {0}")]
    BadDevice(#[from] IdError),
    #[error("unknown topic suffix {0:?}")]
    UnknownSuffix(String),
    #[error("wildcards are not allowed here")]
    Wildcard,
}

impl Topic {
    pub fn new(device: DeviceId, kind: TopicKind) -> Self {
        Self { device, kind }
    }

    /// Parses a concrete topic name. Wildcards (`+`, `#`) are rejected.
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        if s.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        let rest = s
            .strip_prefix(DEVICES_ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(TopicError::Foreign)?;
        let (device, suffix) = rest.split_once('/').ok_or(TopicError::MissingDevice)?;
        let device = DeviceId::parse(device)?;
        let kind = TopicKind::from_suffix(suffix)
            .ok_or_else(|| TopicError::UnknownSuffix(truncate(suffix, 64)))?;
        Ok(Self { device, kind })
    }

    pub fn direction(&self) -> Direction {
        self.kind.direction()
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DEVICES_ROOT}/{}/{}", self.device, self.kind.suffix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn every_kind_round_trips() {
        for kind in TopicKind::ALL {
            let t = Topic::new(dev("pi-1"), kind);
            assert_eq!(Topic::parse(&t.to_string()).unwrap(), t);
        }
        assert_eq!(
            Topic::new(dev("pi-1"), TopicKind::AudioDown).to_string(),
            "devices/pi-1/audio/down"
        );
    }

    #[test]
    fn foreign_and_wildcard_topics_are_rejected() {
        assert_eq!(Topic::parse("foo/bar"), Err(TopicError::Foreign));
        assert_eq!(Topic::parse("devices"), Err(TopicError::Foreign));
        assert_eq!(Topic::parse("devices/x"), Err(TopicError::MissingDevice));
        assert_eq!(Topic::parse("devices/+/led"), Err(TopicError::Wildcard));
        assert_eq!(Topic::parse("devices/a/#"), Err(TopicError::Wildcard));
        assert!(matches!(
            Topic::parse("devices/A/led"),
            Err(TopicError::BadDevice(_))
        ));
        assert!(matches!(
            Topic::parse("devices/a/led/extra"),
            Err(TopicError::UnknownSuffix(_))
        ));
        assert!(matches!(
            Topic::parse("devices/a/audio"),
            Err(TopicError::UnknownSuffix(_))
        ));
    }

    #[test]
    fn contract_attributes_match_design() {
        assert_eq!(TopicKind::AudioUp.qos(), Qos::AtMostOnce);
        assert_eq!(TopicKind::Telemetry.qos(), Qos::AtLeastOnce);
        assert!(TopicKind::Persona.retained());
        assert!(!TopicKind::Led.retained());
        assert_eq!(TopicKind::Button.direction(), Direction::Up);
        assert_eq!(TopicKind::Config.direction(), Direction::Down);
        assert_eq!(
            TopicKind::Telemetry.shared_filter("companion-telemetry"),
            "$share/companion-telemetry/devices/+/telemetry"
        );
    }
}
