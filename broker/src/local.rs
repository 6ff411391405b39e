//! An in-process MQTT client of the embedded router: the backend's connection (and the test
//! harnesses'), a local link under a reserved client id. No socket, no MQTT encoding.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use rumqttd::protocol::{Filter, Packet, Publish, QoS, RetainForwardRule, Subscribe};
use rumqttd::Notification;

use crate::link::{Link, RouterLinkError, RouterPort};

/// What arrives on a [`LocalClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalEvent {
    Publish {
        topic: Bytes,
        payload: Bytes,
        retain: bool,
    },
    /// The router took a SUBSCRIBE.
    SubAck,
}

/// An in-process client of the router. One task owns it (style: one owner per connection).
pub struct LocalClient {
    link: Link,
    ready: VecDeque<Notification>,
    notes: Vec<Notification>,
    wake: bool,
    pkid: u16,
}

impl std::fmt::Debug for LocalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalClient")
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl LocalClient {
    pub(crate) async fn open(
        port: &Arc<RouterPort>,
        client_id: &str,
    ) -> Result<Self, RouterLinkError> {
        Ok(Self {
            link: port.open(client_id).await?,
            ready: VecDeque::new(),
            notes: Vec::new(),
            wake: false,
            pkid: 0,
        })
    }

    fn next_pkid(&mut self) -> u16 {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        self.pkid
    }

    /// Subscribes to `filters` in one SUBSCRIBE, at QoS 0: in process the router's own
    /// buffers are the delivery guarantee (a reader too slow for the commit log is counted in
    /// `broker_messages_lost_total`), and rumqttd keeps a publish's QoS and packet id private.
    pub async fn subscribe(&mut self, filters: &[&str]) -> Result<(), RouterLinkError> {
        let filters = filters
            .iter()
            .map(|path| Filter {
                path: (*path).to_owned(),
                qos: QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        let pkid = self.next_pkid();
        self.link
            .send(&mut vec![Packet::Subscribe(
                Subscribe { pkid, filters },
                None,
            )])
            .await
    }

    /// Publishes each `(topic, payload, retain)` in one batch. In process nothing can be lost
    /// between here and the router's log, so they go in at QoS 0; subscribers get their
    /// subscription's QoS.
    pub async fn publish_batch(
        &mut self,
        publishes: impl IntoIterator<Item = (Bytes, Bytes, bool)>,
    ) -> Result<(), RouterLinkError> {
        let mut packets: Vec<Packet> = publishes
            .into_iter()
            .map(|(topic, payload, retain)| {
                Packet::Publish(Publish::new(topic, payload, retain), None)
            })
            .collect();
        self.link.send(&mut packets).await
    }

    /// One publish.
    pub async fn publish(
        &mut self,
        topic: impl Into<Bytes>,
        payload: impl Into<Bytes>,
        retain: bool,
    ) -> Result<(), RouterLinkError> {
        self.publish_batch([(topic.into(), payload.into(), retain)])
            .await
    }

    /// The next publish or SUBACK from the router. Cancel-safe: use it in `select!`.
    pub async fn next(&mut self) -> Result<LocalEvent, RouterLinkError> {
        loop {
            while let Some(note) = self.ready.pop_front() {
                match note {
                    Notification::Forward(f) => {
                        return Ok(LocalEvent::Publish {
                            topic: f.publish.topic,
                            payload: f.publish.payload,
                            retain: f.publish.retain,
                        });
                    }
                    ack @ Notification::DeviceAck(_) => {
                        if let Some(Packet::SubAck(..)) = Option::<Packet>::from(ack) {
                            return Ok(LocalEvent::SubAck);
                        }
                    }
                    Notification::Unschedule => self.wake = true,
                    Notification::Disconnect(..) => return Err(RouterLinkError::Closed),
                    _ => {}
                }
            }
            if self.wake {
                self.link.wake().await?;
                self.wake = false;
            }
            self.link.recv(&mut self.notes).await?;
            self.ready.extend(self.notes.drain(..));
        }
    }
}
