//! `companion-broker`: the MQTT edge in front of an embedded rumqttd router.
//! (Work in progress: see the broker issue.)

pub mod auth;
pub mod events;
pub mod settings;

pub use auth::{AuthDecision, AuthRequest, Authenticator, DenyReason};
pub use events::{AclAction, BrokerEvent, DisconnectReason, EventSink, NullSink};
pub use settings::{MqttSettings, RateSettings, TlsFiles};
