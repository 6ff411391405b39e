//! The backend on the embedded router, in process: a rumqttd local link ([`LocalClient`])
//! owned by one task, which takes publishes from a bounded queue in batches and dispatches
//! what the router forwards. No socket, no MQTT encoding, no credentials to leak.

use bytes::Bytes;
use companion_broker::{BrokerHandle, LocalClient, LocalEvent, RouterLinkError};
use companion_schema::{Direction, Qos, TopicKind};
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

/// Every device up topic, one filter per kind. One backend per router: no share groups, so
/// the router reads each filter's log in runs instead of a message at a time.
fn filters() -> Vec<String> {
    TopicKind::ALL
        .into_iter()
        .filter(|k| k.direction() == Direction::Up)
        .map(|k| k.all_devices_filter())
        .collect()
}

async fn open(broker: &BrokerHandle) -> Result<LocalClient, RouterLinkError> {
    let mut client = broker.local_client(CLIENT_NAME).await?;
    let filters = filters();
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    client.subscribe(&filters).await?;
    Ok(client)
}

#[async_trait::async_trait]
impl Connection for LocalConnection {
    async fn run(
        mut self: Box<Self>,
        metrics: BusMetrics,
        mut on_publish: Box<OnPublish>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = BACKOFF_MIN;
        let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
        loop {
            let failed = match open(&self.broker).await {
                Ok(mut client) => {
                    backoff = BACKOFF_MIN;
                    tracing::info!("backend connected to the embedded router");
                    match pump(
                        &mut client,
                        &mut self.queue,
                        &mut batch,
                        &mut *on_publish,
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

/// Moves publishes to the router and deliveries to `on_publish` until shutdown (`Ok`) or the
/// link fails. Publishes still queued stay queued for the next link; a batch the router did
/// not take is kept in `batch` and sent first on the next one.
async fn pump(
    client: &mut LocalClient,
    queue: &mut mpsc::Receiver<Outgoing>,
    batch: &mut Vec<Outgoing>,
    on_publish: &mut OnPublish,
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

fn deliver(topic: &[u8], payload: &[u8], on_publish: &mut OnPublish) {
    // Device topics passed the edge's ACL, so they are UTF-8; anything else is counted as an
    // invalid topic by the handler.
    on_publish(std::str::from_utf8(topic).unwrap_or(""), payload);
}
