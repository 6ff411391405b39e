//! The router's network layer, in process: rumqttd's local links (`LinkBuilder`, `LinkTx`,
//! `LinkRx`), which are what rumqttd's own network link is built on, driven from async code.
//!
//! rumqttd 0.20 keeps the async halves of that API crate-private (`LinkTx::notify`,
//! `LinkRx::exchange`) and leaves blocking ones public, so this module supplies the rest:
//! - opening a link blocks until the router thread answers: it runs on tokio's blocking pool;
//! - `LinkTx::send` makes a *blocking* send on the router's bounded (1,000) event channel: a
//!   batch goes out only after [`RouterPort::wait_for_room`] saw room for it, so the send never
//!   waits in practice (the router thread never waits on links: it only `try_send`s to them);
//! - notifications are taken a batch at a time (`LinkRx::next` for the first, then polled
//!   without waiting for the rest);
//! - `Notification::Unschedule` (the link's buffer was full and the router paused it) is
//!   answered with `wake` once the batch is written, or delivery to the link stops;
//! - every forwarded publish carries its offset in the filter's commit log, so a jump in
//!   offsets is messages the router dropped before this link read them (a slow reader whose
//!   log segment was rotated away): counted in `broker_messages_lost_total`. The first
//!   delivery on a filter seeds the count, so what rotates away before a subscriber's very
//!   first read is not seen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use companion_schema::{DeviceId, Topic, TopicKind};
use futures::FutureExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::Packet;
use rumqttd::Notification;

use crate::receipts::{Ledger, Receipt};

/// Capacity of rumqttd 0.20's router event channel (`Router::new`: `bounded(1000)`).
const ROUTER_QUEUE: usize = 1000;
/// Room left for senders that checked at the same moment (tokio workers, blocking threads).
const ROUTER_QUEUE_HEADROOM: usize = 64;
/// How long a sender waits for room before the router counts as gone.
const ROUTER_STALL_LIMIT: Duration = Duration::from_secs(10);
const ROOM_POLL: Duration = Duration::from_millis(1);

/// Why a link stopped working.
#[derive(Debug, thiserror::Error)]
pub enum RouterLinkError {
    #[error("the router refused the link: {0}")]
    Open(String),
    #[error("the router closed the link")]
    Closed,
    #[error("the router has not taken events for {0:?}")]
    Stalled(Duration),
}

/// Opens a link (blocking); the error is rumqttd's, as text.
type BuildFn = dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync + 'static;

/// The way into a running router: opens links and watches its event queue. rumqttd's
/// `Router::spawn` hands out a sender whose event type is private, so it lives in closures.
pub struct RouterPort {
    build: Box<BuildFn>,
    queued: Box<dyn Fn() -> usize + Send + Sync>,
    lost: Counter,
    /// Client ids the router has seen (it keeps a small record per id for good), counted in
    /// `broker_router_client_ids`.
    ids: std::sync::Mutex<std::collections::HashSet<String>>,
    ids_gauge: Gauge,
}

impl RouterPort {
    pub(crate) fn new(
        build: Box<BuildFn>,
        queued: Box<dyn Fn() -> usize + Send + Sync>,
        lost: Counter,
        ids_gauge: Gauge,
    ) -> Self {
        Self {
            build,
            queued,
            lost,
            ids: Default::default(),
            ids_gauge,
        }
    }

    /// Waits until the router's event queue has room for one more event from every thread
    /// that may be sending at this moment.
    async fn wait_for_room(&self) -> Result<(), RouterLinkError> {
        if (self.queued)() + ROUTER_QUEUE_HEADROOM < ROUTER_QUEUE {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + ROUTER_STALL_LIMIT;
        while (self.queued)() + ROUTER_QUEUE_HEADROOM >= ROUTER_QUEUE {
            if tokio::time::Instant::now() >= deadline {
                return Err(RouterLinkError::Stalled(ROUTER_STALL_LIMIT));
            }
            tokio::time::sleep(ROOM_POLL).await;
        }
        Ok(())
    }

    /// The two halves of a new link (see [`RouterPort::open`]).
    async fn open_parts(
        self: &Arc<Self>,
        client_id: &str,
    ) -> Result<(LinkTx, LinkRx), RouterLinkError> {
        self.wait_for_room().await?;
        if let Ok(mut ids) = self.ids.lock() {
            if !ids.contains(client_id) {
                ids.insert(client_id.to_owned());
                self.ids_gauge.inc();
            }
        }
        let port = self.clone();
        let id = client_id.to_owned();
        // Blocks until the router thread has registered the connection.
        let built = tokio::task::spawn_blocking(move || (port.build)(&id))
            .await
            .map_err(|e| RouterLinkError::Open(e.to_string()))?;
        built.map_err(RouterLinkError::Open)
    }

    /// Opens a clean-session link for `client_id` (dynamic filters on: publishing where nobody
    /// subscribes yet is allowed). A link with the same id is replaced by the router.
    pub async fn open(self: &Arc<Self>, client_id: &str) -> Result<Link, RouterLinkError> {
        let (tx, rx) = self.open_parts(client_id).await?;
        Ok(Link {
            tx,
            rx,
            port: self.clone(),
            offsets: HashMap::new(),
            gone: false,
        })
    }
}

/// One connection to the router: packets in, notifications out.
pub struct Link {
    tx: LinkTx,
    rx: LinkRx,
    port: Arc<RouterPort>,
    /// Last commit-log offset forwarded per filter, by topic kind: a link subscribes to one
    /// filter per kind (a device to its own topic, the backend to `devices/+/<kind>`).
    offsets: HashMap<TopicKind, u64>,
    /// The router has let this connection go (DISCONNECT sent, or it dropped the link):
    /// anything sent after would be an event for a connection id it may have reused.
    gone: bool,
}

impl Link {
    /// Hands `packets` (drained) to the router as one batch.
    pub async fn send(&mut self, packets: &mut Vec<Packet>) -> Result<(), RouterLinkError> {
        if self.gone {
            packets.clear();
            return Err(RouterLinkError::Closed);
        }
        if packets.is_empty() {
            return Ok(());
        }
        // The only await: nothing is taken from `packets` before it (cancel-safe).
        self.port.wait_for_room().await?;
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        self.gone = matches!(last, Packet::Disconnect(..))
            || packets.iter().any(|p| matches!(p, Packet::Disconnect(..)));
        self.tx.buffer().extend(packets.drain(..));
        // Pushes `last` and one DeviceData event for the whole batch; the queue has room.
        self.tx
            .send(last)
            .await
            .map(|_| ())
            .map_err(|_| RouterLinkError::Closed)
    }

    /// Waits for notifications and moves every one that is ready into `out`.
    /// Cancel-safe: nothing is taken from the router until the first one is ready.
    pub async fn recv(&mut self, out: &mut Vec<Notification>) -> Result<(), RouterLinkError> {
        loop {
            match self.rx.next().await {
                Ok(Some(n)) => {
                    self.observe(&n);
                    out.push(n);
                    break;
                }
                // Woken for a batch already taken.
                Ok(None) => {}
                Err(_) => {
                    self.gone = true;
                    return Err(RouterLinkError::Closed);
                }
            }
        }
        while let Some(Ok(Some(n))) = self.rx.next().now_or_never() {
            self.observe(&n);
            out.push(n);
        }
        Ok(())
    }

    /// Tells the router this link has room again (the answer to `Notification::Unschedule`).
    pub async fn wake(&self) -> Result<(), RouterLinkError> {
        self.port.wait_for_room().await?;
        self.rx.wake().await.map_err(|_| RouterLinkError::Closed)
    }

    /// Counts messages the router skipped for this link (offset jumps within a filter).
    fn observe(&mut self, n: &Notification) {
        let forward = match n {
            Notification::Forward(forward) => forward,
            Notification::Disconnect(..) => {
                self.gone = true;
                return;
            }
            _ => return,
        };
        let Some((_, offset)) = forward.cursor else {
            return; // retained: not from the log
        };
        let Some(kind) = std::str::from_utf8(&forward.publish.topic)
            .ok()
            .and_then(|t| Topic::parse(t).ok())
            .map(|t| t.kind)
        else {
            return;
        };
        if let Some(previous) = self.offsets.insert(kind, offset) {
            let skipped = offset.saturating_sub(previous).saturating_sub(1);
            if skipped > 0 {
                tracing::warn!(
                    kind = kind.label(),
                    skipped,
                    "router dropped messages before this link read them"
                );
                self.port.lost.inc_by(skipped);
            }
        }
    }
}

/// The in-process reader of every device up topic: the embedded backend. While one is set
/// (`BrokerHandle::set_up_sink`) the edge hands device publishes, Wills included, straight to
/// it instead of through the router. The ACL lets no device subscribe to an up topic, so the
/// router would have this one reader only, and the hop cost a router-thread wake-up (a futex
/// round trip), a commit-log append and a notification to the reader's task per message: a
/// fifth of the server's CPU at 10,000 telemetry messages/s.
pub trait UpSink: Send + Sync {
    /// A publish from a device (authenticated, ACL-checked, aliases resolved): its Will.
    /// Called on the device's connection task: must not wait.
    fn deliver(&self, topic: &[u8], payload: &[u8]);

    /// A device's publish to its own up topic of `kind` (authenticated, ACL-checked, aliases
    /// resolved), on its connection task: must not wait. `hold` is the device's receipt
    /// ledger for a QoS 1 publish where a [`crate::Receipts`] hook is installed: the sink
    /// decides whether the PUBACK waits (the returned receipt) while it is set, so that it can
    /// read the payload once for both. The default delivers and acknowledges at once.
    fn publish(
        &self,
        device: &DeviceId,
        kind: TopicKind,
        topic: &[u8],
        payload: &Bytes,
        hold: Option<&Arc<Ledger>>,
    ) -> Option<Receipt> {
        let _ = (device, kind, hold);
        self.deliver(topic, payload);
        None
    }
}

/// The edge's shared way in: every device's publishes go into the router through this one
/// link (the edge has already authenticated and checked them; the router needs no
/// per-device state for them), or to the [`UpSink`] while one is set. A batch announces
/// itself with an event only when the link's buffer was empty: otherwise the router has an
/// event pending that will take it too.
pub struct Uplink {
    port: Arc<RouterPort>,
    tx: std::sync::Mutex<Option<LinkTx>>,
    client_id: String,
    sink: std::sync::RwLock<Option<Arc<dyn UpSink>>>,
    /// Bumped by every [`Uplink::set_sink`]: a connection's [`SinkCache`] is stale when it
    /// differs. A connection reads it (a line nobody writes while the sink stays) instead of
    /// taking the lock and cloning the sink per publish: two threads' read-modify-writes on
    /// the same lock word and reference count cost a cache-line transfer each.
    generation: std::sync::atomic::AtomicU64,
}

/// A connection's copy of the uplink's sink, and the generation it was taken at.
pub struct SinkCache {
    generation: u64,
    sink: Option<Arc<dyn UpSink>>,
}

impl Default for SinkCache {
    fn default() -> Self {
        Self {
            generation: u64::MAX, // never an uplink's: the first use reads the sink
            sink: None,
        }
    }
}

impl Uplink {
    /// Opens the link; a task from [`Uplink::watch`] keeps it open.
    pub(crate) async fn open(
        port: &Arc<RouterPort>,
        client_id: &str,
    ) -> Result<(Arc<Self>, LinkRx), RouterLinkError> {
        let (tx, rx) = port.open_parts(client_id).await?;
        let uplink = Arc::new(Self {
            port: port.clone(),
            tx: std::sync::Mutex::new(Some(tx)),
            client_id: client_id.to_owned(),
            sink: std::sync::RwLock::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
        });
        Ok((uplink, rx))
    }

    /// Sends up topics to `sink` from now on (`None`: through the router again).
    pub(crate) fn set_sink(&self, sink: Option<Arc<dyn UpSink>>) {
        let mut current = self.sink.write().unwrap_or_else(|p| p.into_inner());
        *current = sink;
        // Under the lock: a reader that sees the new generation reads the new sink.
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The sink now, through `cache`.
    pub(crate) fn sink<'c>(&self, cache: &'c mut SinkCache) -> Option<&'c Arc<dyn UpSink>> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        if cache.generation != generation {
            let current = self.sink.read().unwrap_or_else(|p| p.into_inner());
            cache.sink = current.clone();
            cache.generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        }
        cache.sink.as_ref()
    }

    /// Hands `packets` (drained) to the router, or to the sink if one was set since they
    /// were taken (a device connection gives its publishes to a set sink itself).
    pub async fn push(&self, packets: &mut Vec<Packet>) -> Result<(), RouterLinkError> {
        if packets.is_empty() {
            return Ok(());
        }
        if let Some(sink) = self.sink(&mut SinkCache::default()) {
            for packet in packets.drain(..) {
                if let Packet::Publish(publish, _) = packet {
                    sink.deliver(&publish.topic, &publish.payload);
                }
            }
            return Ok(());
        }
        // The only await; nothing is taken from `packets` before it (cancel-safe).
        self.port.wait_for_room().await?;
        let mut slot = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let tx = slot.as_mut().ok_or(RouterLinkError::Closed)?;
        let announce = {
            let mut buffer = tx.buffer();
            let was_empty = buffer.is_empty();
            buffer.extend(packets.drain(..));
            was_empty
        };
        if announce {
            // `send` pushes one more packet and the event; the queue has room, so its blocking
            // channel send returns at once and the future is ready on its first poll.
            let Some(last) = tx.buffer().pop_back() else {
                return Ok(());
            };
            match tx.send(last).now_or_never() {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    *slot = None;
                    return Err(RouterLinkError::Closed);
                }
            }
        }
        Ok(())
    }

    /// Drains the link's notifications (it subscribes to nothing; the router only writes to it
    /// to drop it) and reopens it if the router lets it go, until `shutdown`.
    pub(crate) async fn watch(
        self: Arc<Self>,
        mut rx: LinkRx,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            // Cases: shutdown; a notification or the link's end.
            let ended = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = rx.next() => match n {
                    Ok(Some(Notification::Disconnect(..))) | Err(_) => true,
                    Ok(_) => false,
                },
            };
            if !ended {
                continue;
            }
            tracing::error!("the router dropped the edge's uplink; reopening it");
            *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
            loop {
                match self.port.open_parts(&self.client_id).await {
                    Ok((tx, new_rx)) => {
                        *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
                        rx = new_rx;
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reopening the uplink failed");
                        // Cases: shutdown; retry after a pause.
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                }
            }
        }
    }
}
