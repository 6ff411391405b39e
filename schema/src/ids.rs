//! Validated identifiers. Once you hold one, it is valid.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} characters long; the maximum is {max}")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} contains {found:?}; allowed are {allowed}")]
    BadChar {
        kind: &'static str,
        found: char,
        allowed: &'static str,
    },
}

macro_rules! validated_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $allowed:literal, $pred:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Longest accepted identifier, in characters.
            pub const MAX_LEN: usize = $max;

            /// Validates `s` and wraps it.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                if s.is_empty() {
                    return Err(IdError::Empty { kind: $kind });
                }
                if s.len() > $max {
                    return Err(IdError::TooLong { kind: $kind, len: s.chars().count(), max: $max });
                }
                let ok: fn(char) -> bool = $pred;
                if let Some(found) = s.chars().find(|c| !ok(*c)) {
                    return Err(IdError::BadChar { kind: $kind, found, allowed: $allowed });
                }
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_id!(
    /// A device's identity: 1-64 characters of `[a-z0-9-]`. It is also the device's MQTT
    /// client id and username.
    DeviceId,
    "device id",
    64,
    "a-z, 0-9 and '-'",
    |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
);

validated_id!(
    /// A persona's identity: 1-64 characters of `[a-z0-9_-]`.
    PersonaId,
    "persona id",
    64,
    "a-z, 0-9, '-' and '_'",
    |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
);

validated_id!(
    /// A conversation session: 1-64 characters of `[A-Za-z0-9_-]`, chosen by whoever opens it.
    SessionId,
    "session id",
    64,
    "A-Z, a-z, 0-9, '-' and '_'",
    |c| c.is_ascii_alphanumeric() || c == '-' || c == '_'
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_follow_the_grammar() {
        assert!(DeviceId::parse("pi-kitchen-01").is_ok());
        assert!(DeviceId::parse(&"a".repeat(64)).is_ok());
        assert!(matches!(DeviceId::parse(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            DeviceId::parse(&"a".repeat(65)),
            Err(IdError::TooLong { .. })
        ));
        for bad in ["Pi", "a/b", "a+b", "#", "a b", "a_b", "é"] {
            assert!(
                matches!(DeviceId::parse(bad), Err(IdError::BadChar { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_session_id_allows_mixed_case() {
        assert!(SessionId::parse("Ab_9-x").is_ok());
        assert!(SessionId::parse("a.b").is_err());
    }
}
