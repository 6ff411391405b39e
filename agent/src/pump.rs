//! The outbox pump: the task that owns the [`Outbox`], appends every durable message to it,
//! sends what is unacknowledged (oldest first, a bounded window in flight) whenever the link is
//! up, and removes messages as their `PubAck`s come back.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use companion_schema::TopicKind;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::link::{Conn, Uplink};
use crate::outbox::Outbox;

/// Durable messages waiting to be written to the outbox.
pub const DURABLE_CAPACITY: usize = 256;
/// Most outbox messages sent and not yet acknowledged.
pub const WINDOW: usize = 32;

/// A QoS 1 message that must survive disconnections and restarts.
pub struct Durable {
    pub kind: TopicKind,
    pub payload: Vec<u8>,
}

/// Counters of the pump, readable from other tasks (telemetry reports them).
#[derive(Debug, Default)]
pub struct PumpStats {
    pub queued: AtomicU64,
    pub dropped: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub write_errors: AtomicU64,
}

pub struct Pump {
    outbox: Outbox,
    uplink: Uplink,
    /// Next outbox id to send.
    next: u64,
    inflight: BTreeSet<u64>,
    /// The connection the messages in flight went out on.
    sent_generation: u64,
    stats: Arc<PumpStats>,
}

impl Pump {
    pub fn new(outbox: Outbox, uplink: Uplink, stats: Arc<PumpStats>) -> Self {
        stats.queued.store(outbox.len() as u64, Ordering::Relaxed);
        Self {
            outbox,
            uplink,
            next: 0,
            inflight: BTreeSet::new(),
            sent_generation: 0,
            stats,
        }
    }

    pub async fn run(
        mut self,
        mut durable: mpsc::Receiver<Durable>,
        mut acks: mpsc::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let mut conn = self.uplink.connection();
        loop {
            self.fill();
            // Cases: shutdown; a new durable message; an acknowledgement; the link went up or
            // down.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(m) = durable.recv() => self.push(m),
                Some(id) = acks.recv() => self.ack(id),
                Ok(()) = conn.changed() => {
                    let c: Conn = *conn.borrow_and_update();
                    self.on_link(c);
                }
            }
        }
        // Keep what was produced up to the end.
        while let Ok(m) = durable.try_recv() {
            self.push(m);
        }
    }

    fn push(&mut self, m: Durable) {
        if let Err(e) = self.outbox.push(m.kind, &m.payload) {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "writing to the offline buffer failed");
        }
        self.update_stats();
    }

    fn ack(&mut self, id: u64) {
        self.inflight.remove(&id);
        if let Err(e) = self.outbox.ack(id) {
            tracing::error!(error = %e, "updating the offline buffer failed");
        }
        self.stats.acked.fetch_add(1, Ordering::Relaxed);
        self.update_stats();
    }

    fn on_link(&mut self, c: Conn) {
        if c.connected && !self.outbox.is_empty() {
            tracing::info!(buffered = self.outbox.len(), "replaying the offline buffer");
        }
    }

    fn fill(&mut self) {
        let generation = self.uplink.generation();
        if generation != self.sent_generation {
            // A new connection: what was in flight on the old one is sent again, oldest first.
            self.sent_generation = generation;
            self.inflight.clear();
            self.next = 0;
        }
        while self.inflight.len() < WINDOW {
            let Some(e) = self.outbox.next_from(self.next) else {
                return;
            };
            let id = e.id;
            match self.uplink.publish(e.kind, e.payload.clone(), Some(id)) {
                Ok(g) if g == generation => {}
                // The link went down, or came back up since we looked: start over next time.
                _ => return,
            }
            self.inflight.insert(id);
            self.next = id + 1;
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn update_stats(&self) {
        self.stats
            .queued
            .store(self.outbox.len() as u64, Ordering::Relaxed);
        self.stats
            .dropped
            .store(self.outbox.dropped(), Ordering::Relaxed);
    }
}
