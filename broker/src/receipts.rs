//! Acknowledging a device's QoS 1 publish once it is stored, instead of once the router has it.
//!
//! The backend stores telemetry; with [`Receipts`] installed the edge holds the device's
//! PUBACK until the backend says the message is in the database. A crash between the two then
//! costs nothing: the device never saw an acknowledgement and sends the message again when it
//! reconnects. PUBACKs still go out in the order the publishes came (MQTT 3.1.1 §4.6): an
//! acknowledgement that needs no receipt waits behind one that does.

use bytes::Bytes;
use companion_schema::{DeviceId, TopicKind};
use tokio::sync::oneshot;

/// Resolves when the message is settled: `true` stored (acknowledge), `false` refused
/// (acknowledged as dropped, counted). A dropped sender means the backend went away: the edge
/// ends the connection without acknowledging, and the device sends the message again.
pub type Receipt = oneshot::Receiver<bool>;

/// Decides which publishes are acknowledged only once stored.
pub trait Receipts: Send + Sync + 'static {
    /// Called for every QoS 1 publish the edge routes (its ACL and limits passed), before it
    /// goes to the router. `None`: acknowledge once the router has it. Must not block.
    fn hold(&self, device: &DeviceId, kind: TopicKind, payload: &Bytes) -> Option<Receipt>;
}
