//! Validated registry values: what a device is, as the API accepts and returns it.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceType {
    RaspberryPi,
    Esp32,
    Simulated,
    Other,
}

impl DeviceType {
    pub const ALL: [DeviceType; 4] = [
        DeviceType::RaspberryPi,
        DeviceType::Esp32,
        DeviceType::Simulated,
        DeviceType::Other,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceType::RaspberryPi => "raspberry_pi",
            DeviceType::Esp32 => "esp32",
            DeviceType::Simulated => "simulated",
            DeviceType::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    AudioInput,
    AudioOutput,
    Buttons,
    Leds,
    Display,
}

impl Capability {
    pub const ALL: [Capability; 5] = [
        Capability::AudioInput,
        Capability::AudioOutput,
        Capability::Buttons,
        Capability::Leds,
        Capability::Display,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Capability::AudioInput => "audio_input",
            Capability::AudioOutput => "audio_output",
            Capability::Buttons => "buttons",
            Capability::Leds => "leds",
            Capability::Display => "display",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Stored form of a capability set: sorted, comma-separated.
pub fn capabilities_to_db(caps: &BTreeSet<Capability>) -> String {
    caps.iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn capabilities_from_db(s: &str) -> BTreeSet<Capability> {
    s.split(',').filter_map(Capability::parse).collect()
}

/// A device's display name: 1-64 printable characters.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct DeviceName(String);

impl DeviceName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let n = s.chars().count();
        if n == 0 || n > 64 {
            return Err(format!("name must be 1-64 characters, got {n}"));
        }
        if s.chars().any(char::is_control) {
            return Err("name must contain printable characters only".into());
        }
        if s.trim().is_empty() {
            return Err("name must not be blank".into());
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceName({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(DeviceName::parse("Kitchen Pi ☕").is_ok());
        assert!(DeviceName::parse("").is_err());
        assert!(DeviceName::parse("   ").is_err());
        assert!(DeviceName::parse("a\nb").is_err());
        assert!(DeviceName::parse(&"x".repeat(65)).is_err());
        assert!(DeviceName::parse(&"é".repeat(64)).is_ok());
    }

    #[test]
    fn capabilities_round_trip_through_the_database_form() {
        let caps: BTreeSet<_> = [Capability::Leds, Capability::AudioInput].into();
        let s = capabilities_to_db(&caps);
        assert_eq!(s, "audio_input,leds");
        assert_eq!(capabilities_from_db(&s), caps);
        assert!(capabilities_from_db("").is_empty());
    }
}
