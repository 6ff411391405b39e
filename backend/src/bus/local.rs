//! The backend on the embedded broker, in process. Device messages come straight from the
//! edge: the backend is its [`UpSink`], called on each device's connection task (no device
//! may read an up topic, so routing them would only pass them on to the backend). What the
//! backend publishes goes into the router through a rumqttd local link ([`LocalClient`])
//! owned by one task, which takes publishes from a bounded queue in batches; the edge's
//! downlink takes them from there. No socket, no MQTT encoding, no credentials to leak.

use std::sync::Arc;

use bytes::Bytes;
use companion_broker::{
    BrokerHandle, Ledger, LocalClient, LocalEvent, Receipt, RouterLinkError, UpSink,
};
use companion_schema::{DeviceId, Qos, TopicKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    back_off, BusError, BusMetrics, Connection, OnPublish, Publisher, BACKOFF_MIN, CLIENT_QUEUE,
};

/// Publishes handed to the router in one batch at most.
const BATCH: usize = 256;
/// The backend's name on the router (`companion-internal-backend`).
const CLIENT_NAME: &str = "backend";

type Outgoing = (Bytes, Bytes, bool);

/// The publishing half: a bounded queue to the connection task.
pub struct LocalPublisher(mpsc::Sender<Outgoing>);

#[async_trait::async_trait]
impl Publisher for LocalPublisher {
    async fn publish(
        &self,
        topic: String,
        _qos: Qos,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), BusError> {
        self.0
            .send((topic.into(), payload.into(), retain))
            .await
            .map_err(|_| BusError::Closed)
    }
}

/// The owning half: the link and the queue's receiving end.
pub struct LocalConnection {
    broker: BrokerHandle,
    queue: mpsc::Receiver<Outgoing>,
}

/// A publisher and connection on `broker`'s router; the link is opened by [`Connection::run`].
pub fn connect(broker: BrokerHandle) -> (LocalPublisher, LocalConnection) {
    let (tx, queue) = mpsc::channel(CLIENT_QUEUE);
    (LocalPublisher(tx), LocalConnection { broker, queue })
}

/// The backend as the edge's reader of device up topics.
struct Sink(Arc<OnPublish>);

impl UpSink for Sink {
    fn deliver(&self, topic: &[u8], payload: &[u8]) {
        deliver(topic, payload, &self.0);
    }

    /// The device and kind come parsed from the edge, and the payload is decoded once for the
    /// receipt and the backend.
    fn publish(
        &self,
        device: &DeviceId,
        kind: TopicKind,
        _topic: &[u8],
        payload: &Bytes,
        hold: Option<&Arc<Ledger>>,
    ) -> Option<Receipt> {
        self.0.publish_from(device, kind, payload, hold)
    }
}

/// Takes the edge's up topics back from the backend when the connection task ends.
struct Registered<'a>(&'a BrokerHandle);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.set_up_sink(None);
    }
}

#[async_trait::async_trait]
impl Connection for LocalConnection {
    async fn run(
        mut self: Box<Self>,
        metrics: BusMetrics,
        on_publish: Arc<OnPublish>,
        shutdown: CancellationToken,
    ) {
        // Device messages arrive through the sink from now on, whatever the router link does.
        self.broker
            .set_up_sink(Some(Arc::new(Sink(on_publish.clone()))));
        let broker = self.broker.clone();
        let _registered = Registered(&broker);
        let mut backoff = BACKOFF_MIN;
        let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
        loop {
            let failed = match self.broker.local_client(CLIENT_NAME).await {
                Ok(mut client) => {
                    backoff = BACKOFF_MIN;
                    tracing::info!("backend connected to the embedded router");
                    match pump(
                        &mut client,
                        &mut self.queue,
                        &mut batch,
                        &on_publish,
                        &shutdown,
                    )
                    .await
                    {
                        Ok(()) => return,
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if shutdown.is_cancelled() {
                return;
            }
            metrics.reconnects.inc();
            tracing::warn!(error = %failed, backoff_ms = backoff.as_millis() as u64, "backend router link lost; reopening");
            if !back_off(&mut backoff, &shutdown).await {
                return;
            }
        }
    }
}

/// Moves publishes to the router until shutdown (`Ok`) or the link fails (what the router
/// forwards, should anything on it publish to an up topic, goes to `on_publish`). Publishes still queued stay queued for the next link; a batch the router did
/// not take is kept in `batch` and sent first on the next one.
async fn pump(
    client: &mut LocalClient,
    queue: &mut mpsc::Receiver<Outgoing>,
    batch: &mut Vec<Outgoing>,
    on_publish: &OnPublish,
    shutdown: &CancellationToken,
) -> Result<(), RouterLinkError> {
    loop {
        if !batch.is_empty() {
            client.publish_batch(batch.iter().cloned()).await?;
            batch.clear();
        }
        // Cases: shutdown; publishes to send (taken in a batch); a delivery from the router.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            n = queue.recv_many(batch, BATCH) => {
                if n == 0 {
                    return Ok(()); // every publisher is gone
                }
            }
            event = client.next() => match event? {
                LocalEvent::Publish { topic, payload, .. } => deliver(&topic, &payload, on_publish),
                LocalEvent::SubAck => {}
            },
        }
    }
}

fn deliver(topic: &[u8], payload: &[u8], on_publish: &OnPublish) {
    // Device topics passed the edge's ACL, so they are UTF-8; anything else is counted as an
    // invalid topic by the handler.
    on_publish.publish(std::str::from_utf8(topic).unwrap_or(""), payload);
}
