//! Live device connections by id: kicking and takeover by the same id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use companion_schema::{DeviceId, TopicKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::doorbell::{Doorbell, MAIL, STOP};
use crate::events::DisconnectReason;

/// A message for one device.
#[derive(Clone)]
pub(crate) struct Down {
    pub kind: TopicKind,
    pub topic: Bytes,
    pub payload: Bytes,
    /// Sent because the device subscribed (a retained message), not as it was published.
    pub retain: bool,
}

impl std::fmt::Debug for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Down")
            .field("kind", &self.kind)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Messages waiting for one device before the downlink drops them.
pub const MAILBOX: usize = 256;

/// What became of a message for a device.
pub enum Delivery {
    Queued,
    /// The device is not connected here.
    Absent,
    /// Its queue is full.
    Full,
}

/// How long a new connection waits for the one it takes over to finish closing.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(1);

/// One live connection's control: cancelling `stop` (after setting `reason`) closes it;
/// `done` is cancelled when its task has finished.
#[derive(Clone)]
pub struct Control {
    pub id: u64,
    pub stop: CancellationToken,
    pub reason: Arc<Mutex<Option<DisconnectReason>>>,
    pub done: CancellationToken,
    /// Messages from the downlink for this connection.
    pub(crate) mailbox: mpsc::Sender<Box<Down>>,
    /// Rung when the mailbox has mail or the connection is asked to close.
    pub(crate) bell: Arc<Doorbell>,
}

impl Control {
    /// Asks the connection to close with `reason` (the first reason wins).
    pub fn close(&self, reason: DisconnectReason) {
        let mut slot = lock(&self.reason);
        slot.get_or_insert(reason);
        self.stop.cancel();
        self.bell.ring(STOP);
    }

    /// The reason set by [`Control::close`], if any.
    pub fn reason(&self) -> Option<DisconnectReason> {
        *lock(&self.reason)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another connection task panicked mid-update of a plain value.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    live: Mutex<HashMap<DeviceId, Control>>,
}

impl Sessions {
    /// Registers a new connection for `device`, closing (reason takeover) and waiting for the
    /// one it replaces. Returns its control and the receiving end of its mailbox.
    pub(crate) async fn register(
        &self,
        device: &DeviceId,
        shutdown: &CancellationToken,
    ) -> (Control, mpsc::Receiver<Box<Down>>) {
        let (mailbox, rx) = mpsc::channel(MAILBOX);
        let control = Control {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            stop: shutdown.child_token(),
            reason: Arc::default(),
            done: CancellationToken::new(),
            mailbox,
            bell: Arc::default(),
        };
        let previous = lock(&self.live).insert(device.clone(), control.clone());
        // Shutdown closes every connection registered (see `close_all`); one registered
        // after that closes itself.
        if shutdown.is_cancelled() {
            control.close(DisconnectReason::ServerShutdown);
        }
        if let Some(previous) = previous {
            previous.close(DisconnectReason::Takeover);
            let _ = tokio::time::timeout(TAKEOVER_WAIT, previous.done.cancelled()).await;
        }
        (control, rx)
    }

    /// Queues `down` for the device's live connection, if it has one.
    pub(crate) fn deliver(&self, device: &DeviceId, down: Down) -> Delivery {
        match lock(&self.live).get(device) {
            // Boxed: tokio allocates a channel's slots 32 at a time when it is created, and
            // every connected device has one.
            Some(control) => match control.mailbox.try_send(Box::new(down)) {
                Ok(()) => {
                    control.bell.ring(MAIL);
                    Delivery::Queued
                }
                Err(mpsc::error::TrySendError::Full(_)) => Delivery::Full,
                Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Absent,
            },
            None => Delivery::Absent,
        }
    }

    /// Removes `control` (if it is still the device's current connection) and marks it done.
    pub fn finish(&self, device: &DeviceId, control: &Control) {
        let mut live = lock(&self.live);
        if live.get(device).is_some_and(|c| c.id == control.id) {
            live.remove(device);
        }
        drop(live);
        control.done.cancel();
    }

    /// Closes every live connection with `reason` (the edge's shutdown: the shutdown token
    /// must be cancelled first, see `register`).
    pub(crate) fn close_all(&self, reason: DisconnectReason) {
        for control in lock(&self.live).values() {
            control.close(reason);
        }
    }

    /// Closes the device's live connection with `reason`; false if it has none.
    pub fn close(&self, device: &DeviceId, reason: DisconnectReason) -> bool {
        match lock(&self.live).get(device) {
            Some(control) => {
                control.close(reason);
                true
            }
            None => false,
        }
    }
}
