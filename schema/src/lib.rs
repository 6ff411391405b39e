//! `companion-schema`: the topic contract and payload types shared by the broker, backend and
//! agent.
//!
//! - [`ids`]: validated identifiers (`DeviceId`, `PersonaId`, `SessionId`).
//! - [`topic`]: [`Topic`] and [`TopicKind`], the only place topic strings exist.
//! - [`messages`]: the payload structs, each with a schema version `v`.
//! - [`codec`]: MessagePack `encode`/`decode` with named fields and the 64 KiB limit.
//!
//! Pure: no I/O, no async runtime, no clock. Decoding never panics.

pub mod codec;
pub mod ids;
pub mod messages;
pub mod topic;

pub use codec::{decode, encode, DecodeError, EncodeError, Payload, MAX_PAYLOAD};
pub use ids::{DeviceId, IdError, PersonaId, SessionId};
pub use messages::*;
pub use topic::{Direction, Qos, Topic, TopicError, TopicKind};
