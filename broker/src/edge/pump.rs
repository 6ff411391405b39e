//! The packet pump of a device connection: device packets are framed, decoded once (rumqttd's
//! codec) and checked (ACL on PUBLISH/SUBSCRIBE/UNSUBSCRIBE, v5 topic aliases, publish rate);
//! publishes go to the router through the edge's shared uplink in batches and are
//! acknowledged once the router has them, or once stored where a [`Receipts`] hook asks for it
//! (telemetry, in `companion serve`). The edge is the device's MQTT session: it answers
//! SUBSCRIBE, UNSUBSCRIBE and PINGREQ itself, and writes what the downlink queues for the
//! device (with its own packet ids for QoS 1). Runs until the device leaves, breaks a rule, or
//! is closed (kick, takeover, shutdown).

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use companion_schema::{DeviceId, Topic, TopicKind};
use prometheus_client::metrics::counter::Counter;
use rumqttd::protocol::{Packet, Publish, PublishProperties, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFuture;

use super::acks::{Acks, ReceiptLost, MAX_HELD};
use super::limits::PublishLimits;
use super::sessions::{Control, Down};
use super::Edge;
use crate::acl;
use crate::doorbell::{Doorbell, MAIL, STOP};
use crate::events::{AclAction, DisconnectReason};
use crate::link::SinkCache;
use crate::metrics::{ClassLabel, ReasonLabel};
use crate::packet::{self, Codec, PacketError};
#[cfg(doc)]
use crate::receipts::Receipts;
use crate::receipts::{Attached, Ledger, Receipt};

/// A device may hold at most this many MQTT 5 topic aliases (announced in the CONNACK).
pub(super) const MAX_TOPIC_ALIASES: u16 = 64;
const BUFFER: usize = 512;
/// QoS 1 messages sent to a device and not yet acknowledged, at most; past it the device is
/// not reading and further QoS 1 messages are dropped (and counted as lost).
const MAX_DOWN_INFLIGHT: usize = 64;
/// Messages taken from the mailbox in one go.
const DOWN_BATCH: usize = 64;

/// Per-class counters, resolved once per connection.
struct ClassCounters {
    messages: Counter,
    bytes: Counter,
}

pub(super) struct Pump<'a> {
    edge: &'a Edge,
    device: DeviceId,
    codec: Codec,
    /// MQTT 5 topic aliases the device set: alias → (kind, topic).
    aliases: HashMap<u16, (TopicKind, Bytes)>,
    /// The last topic that passed the ACL, with its kind: a device publishes to the same
    /// topic over and over, and the check parses the topic and builds a device id (~1.5 % of
    /// the server's CPU at 10,000 msg/s). A copy: a slice would keep the read buffer alive.
    last_topic: Option<(Bytes, TopicKind)>,
    limits: PublishLimits,
    dropped: Counter,
    throttled: Counter,
    counters_in: ClassCache,
    counters_out: ClassCache,
    /// Down kinds the device subscribed to, with the QoS granted.
    subscriptions: HashMap<TopicKind, u8>,
    /// Packet ids of QoS 1 messages sent to the device and not yet acknowledged.
    inflight: HashSet<u16>,
    next_packet_id: u16,
    /// Acknowledgements of the device's QoS 1 publishes that wait for a receipt.
    acks: Acks,
    /// The device's receipt ledger, where a [`Receipts`] hook holds acknowledgements.
    ledger: Option<Arc<Ledger>>,
    /// The connection's doorbell: mail, a request to close, a receipt settled.
    bell: Arc<Doorbell>,
    /// The ledgers whose receipts the connection waits on, ringing `bell` when they change:
    /// the device's, and any other a hook gave a receipt on.
    attached: Vec<Attached>,
    /// The edge's up sink, as last read.
    sink: SinkCache,
}

/// The outcome of a batch of packets.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    /// The device sent DISCONNECT.
    Clean,
    Close(DisconnectReason),
}

impl<'a> Pump<'a> {
    pub(super) fn new(edge: &'a Edge, device: DeviceId, codec: Codec, bell: Arc<Doorbell>) -> Self {
        let ledger = edge.receipts.as_ref().map(|r| r.ledger(&device));
        let attached = ledger.iter().map(|l| l.attach(&bell)).collect();
        Self {
            edge,
            codec,
            aliases: HashMap::new(),
            last_topic: None,
            limits: PublishLimits::new(&edge.settings.rate),
            dropped: edge
                .metrics
                .dropped
                .get_or_create(&ReasonLabel {
                    reason: "rate_limited",
                })
                .clone(),
            throttled: edge.metrics.throttled.clone(),
            counters_in: ClassCache::default(),
            counters_out: ClassCache::default(),
            subscriptions: HashMap::new(),
            inflight: HashSet::new(),
            next_packet_id: 0,
            acks: Acks::default(),
            ledger,
            bell,
            attached,
            sink: SinkCache::default(),
            device,
        }
    }

    /// Pumps until the connection ends; the reason it ended.
    pub(super) async fn run<R, W>(
        &mut self,
        dr: &mut R,
        dw: &mut W,
        mailbox: &mut mpsc::Receiver<Box<Down>>,
        mut dbuf: BytesMut,
        keepalive: Option<Duration>,
        control: &Control,
    ) -> DisconnectReason
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.edge.settings.max_packet_size;
        // A Packet is ~400 bytes: room for one (the usual read) is kept between reads, more
        // is given back after each batch (10,000 idle connections would otherwise each keep
        // the largest batch they ever read).
        let mut to_router: Vec<Packet> = Vec::with_capacity(1);
        let mut to_device = BytesMut::with_capacity(BUFFER);
        // Keep-alive: one timer for the connection, moved only when it fires (resetting it per
        // packet would cost two timer-wheel operations a message). `heard` is when the device
        // last sent something; the timer fires at the earliest possible expiry.
        let far = Duration::from_secs(365 * 24 * 3600);
        let limit = keepalive.unwrap_or(far);
        let mut heard = tokio::time::Instant::now();
        let expiry = tokio::time::sleep_until(heard + limit);
        tokio::pin!(expiry);
        // Aborts a write the device does not read (kick, takeover, shutdown). Created once: a
        // new one per write would register and unregister with the token.
        let stopped = control.stop.cancelled();
        tokio::pin!(stopped);
        let bell = self.bell.clone();
        // Packets that arrived with the CONNECT.
        let mut step = self.device_packets(&mut dbuf, max, &mut to_router, &mut to_device);
        loop {
            // The router first: acknowledgements in `to_device` promise it has the publishes.
            if let Err(e) = self.edge.uplink.push(&mut to_router).await {
                tracing::warn!(device_id = %self.device, error = %e, "router uplink lost");
                return DisconnectReason::ProtocolError;
            }
            to_router.shrink_to(1);
            match self.acks.release(&mut to_device, self.codec.v5()) {
                Ok(0) => {}
                Ok(refused) => self.refused(refused),
                Err(ReceiptLost) => {
                    tracing::warn!(device_id = %self.device, "a held message was not stored; closing so the device sends it again");
                    return stopped_or(control, DisconnectReason::ServerShutdown);
                }
            }
            if !to_device.is_empty() && !write_or_stop(dw, &mut to_device, stopped.as_mut()).await {
                return write_failed(control);
            }
            match step {
                Step::Continue => {}
                Step::Clean => return DisconnectReason::Clean,
                Step::Close(reason) => return reason,
            }
            // Cases: the doorbell (closed: kick, takeover, shutdown; messages for the device; a
            // receipt settled, released above); bytes from the device (unless too many
            // acknowledgements wait or rate-limit tokens are owed); an owed token; keep-alive
            // expired.
            let reading = self.acks.len() < MAX_HELD && !self.limits.in_debt();
            tokio::select! {
                rung = bell.rung() => {
                    if rung & STOP != 0 {
                        return stopped_or(control, DisconnectReason::ServerShutdown);
                    }
                    if rung & MAIL != 0 {
                        for _ in 0..DOWN_BATCH {
                            match mailbox.try_recv() {
                                Ok(down) => self.deliver(*down, &mut to_device),
                                Err(mpsc::error::TryRecvError::Empty) => break,
                                Err(mpsc::error::TryRecvError::Disconnected) => {
                                    return stopped_or(control, DisconnectReason::Takeover);
                                }
                            }
                        }
                        if !mailbox.is_empty() {
                            // More than a batch: the rest after this one is written.
                            bell.ring(MAIL);
                        }
                    }
                }
                read = dr.read_buf(&mut dbuf), if reading => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return DisconnectReason::NetworkError;
                    }
                    heard = tokio::time::Instant::now();
                    step = self.device_packets(&mut dbuf, max, &mut to_router, &mut to_device);
                }
                _ = self.limits.repay(), if self.limits.in_debt() => {
                    // The device is not silent; we are not listening.
                    heard = tokio::time::Instant::now();
                }
                _ = &mut expiry, if keepalive.is_some() => {
                    let due = heard + limit;
                    if due <= tokio::time::Instant::now() {
                        return DisconnectReason::KeepaliveTimeout;
                    }
                    expiry.as_mut().reset(due);
                }
            }
        }
    }

    /// Decodes and checks every complete device packet in `buf`; publishes for the router go
    /// to `to_router`, the edge's answers (acknowledgements, SUBACK, PINGRESP, retained
    /// messages) to `to_device`.
    fn device_packets(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
        to_router: &mut Vec<Packet>,
        to_device: &mut BytesMut,
    ) -> Step {
        loop {
            let decoded = match self.codec.next_packet(buf, max) {
                Ok(Some(p)) => p,
                Ok(None) => return Step::Continue,
                Err(PacketError::TooLarge(len)) => {
                    tracing::warn!(device_id = %self.device, len, max, "packet too large");
                    return Step::Close(DisconnectReason::PacketTooLarge);
                }
                Err(e) => {
                    tracing::debug!(device_id = %self.device, error = %e, "bad packet");
                    return Step::Close(DisconnectReason::ProtocolError);
                }
            };
            let (len, qos, packet_id) = (decoded.len, decoded.qos, decoded.packet_id);
            match decoded.packet {
                Packet::Publish(publish, props) => {
                    match self.check_publish(publish, props, len, qos) {
                        Ok(Some((kind, publish, props))) => {
                            let hold = if qos == 1 { self.ledger.as_ref() } else { None };
                            // To the sink now, or to the router with the next batch; either
                            // way before the acknowledgement below is written.
                            let receipt = match self.edge.uplink.sink(&mut self.sink) {
                                Some(sink) => sink.publish(
                                    &self.device,
                                    kind,
                                    &publish.topic,
                                    &publish.payload,
                                    hold,
                                ),
                                None => {
                                    let receipt = match (&self.edge.receipts, hold) {
                                        (Some(r), Some(ledger)) => {
                                            r.hold(ledger, kind, &publish.payload)
                                        }
                                        _ => None,
                                    };
                                    to_router.push(Packet::Publish(publish, props));
                                    receipt
                                }
                            };
                            if let Some(r) = &receipt {
                                self.watch(r);
                            }
                            match (qos, packet_id) {
                                (1, Some(id)) if self.acks.ack(id, receipt) => {
                                    packet::put_ack(to_device, packet::PUBACK, id);
                                }
                                (2, Some(id)) => packet::put_ack(to_device, packet::PUBREC, id),
                                _ => {}
                            }
                        }
                        Ok(None) => {}
                        Err(reason) => return Step::Close(reason),
                    }
                }
                Packet::Subscribe(s, _) => {
                    if let Some(bad) = s
                        .filters
                        .iter()
                        .find(|f| !acl::may_subscribe(&self.device, &f.path))
                    {
                        self.edge
                            .acl_denied(&self.device, AclAction::Subscribe, &bad.path);
                        return Step::Close(DisconnectReason::AclViolation);
                    }
                    self.subscribe(s, to_device);
                }
                Packet::Unsubscribe(u, _) => {
                    if let Some(bad) = u
                        .filters
                        .iter()
                        .find(|f| !acl::may_subscribe(&self.device, f))
                    {
                        self.edge
                            .acl_denied(&self.device, AclAction::Subscribe, bad);
                        return Step::Close(DisconnectReason::AclViolation);
                    }
                    for filter in &u.filters {
                        if let Ok(t) = Topic::parse(filter) {
                            self.subscriptions.remove(&t.kind);
                        }
                    }
                    packet::put_unsuback(to_device, u.pkid, u.filters.len(), self.codec.v5());
                }
                Packet::PubAck(ack, _) => {
                    self.inflight.remove(&ack.pkid);
                }
                // The second half of a QoS 2 publish from the device.
                Packet::PubRel(rel, _) => packet::put_ack(to_device, packet::PUBCOMP, rel.pkid),
                // The edge never sends QoS 2: nothing to do.
                Packet::PubRec(..) | Packet::PubComp(..) => {}
                Packet::PingReq(_) => to_device.extend_from_slice(&packet::PINGRESP),
                Packet::Disconnect(..) => return Step::Clean,
                // CONNECT twice, or packets only a server sends.
                _ => return Step::Close(DisconnectReason::ProtocolError),
            }
        }
    }

    /// Makes sure the doorbell rings when `receipt` settles: its ledger is the device's (the
    /// usual case), or is attached once.
    fn watch(&mut self, receipt: &Receipt) {
        if !self.attached.iter().any(|a| receipt.is_on(a.ledger())) {
            self.attached.push(receipt.ledger().attach(&self.bell));
        }
    }

    /// Records a SUBSCRIBE (its filters passed the ACL: each is one of the device's own down
    /// topics), answers SUBACK, then sends the retained messages of those topics.
    fn subscribe(&mut self, s: rumqttd::protocol::Subscribe, to_device: &mut BytesMut) {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut kinds = Vec::with_capacity(s.filters.len());
        for f in &s.filters {
            let granted = match f.qos {
                QoS::AtMostOnce => 0,
                QoS::AtLeastOnce | QoS::ExactlyOnce => 1,
            };
            codes.push(granted);
            if let Ok(t) = Topic::parse(&f.path) {
                self.subscriptions.insert(t.kind, granted);
                kinds.push(t.kind);
            }
        }
        packet::put_suback(to_device, s.pkid, &codes, self.codec.v5());
        for kind in kinds {
            if let Some(down) = self.edge.retained.get(&self.device, kind) {
                self.deliver(down, to_device);
            }
        }
    }

    /// Writes a message for the device if it subscribed to its topic: QoS is the lower of the
    /// contract's and the subscription's.
    fn deliver(&mut self, down: Down, to_device: &mut BytesMut) {
        let Some(&granted) = self.subscriptions.get(&down.kind) else {
            return;
        };
        let qos = granted.min(match down.kind.qos() {
            companion_schema::Qos::AtMostOnce => 0,
            companion_schema::Qos::AtLeastOnce => 1,
        });
        let mut id = 0;
        if qos == 1 {
            if self.inflight.len() >= MAX_DOWN_INFLIGHT {
                tracing::warn!(device_id = %self.device, "device does not acknowledge; message dropped");
                self.edge.metrics.lost.inc();
                self.edge
                    .metrics
                    .dropped
                    .get_or_create(&ReasonLabel {
                        reason: "device_inflight_full",
                    })
                    .inc();
                return;
            }
            id = self.packet_id();
            self.inflight.insert(id);
        }
        let before = to_device.len();
        packet::put_publish(
            to_device,
            &down.topic,
            &down.payload,
            qos,
            id,
            down.retain,
            self.codec.v5(),
        );
        let metrics = &self.edge.metrics;
        let c = class_counters(&mut self.counters_out, Some(down.kind), || {
            (&metrics.messages_out, &metrics.bytes_out)
        });
        c.messages.inc();
        c.bytes.inc_by((to_device.len() - before) as u64);
    }

    /// The next packet id not in flight (1..=65535).
    fn packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains(&self.next_packet_id) {
                return self.next_packet_id;
            }
        }
    }

    /// `Ok(Some)`: the publish to route (aliases resolved, at QoS 0) with its kind;
    /// `Ok(None)`: dropped (QoS 0 over the rate limit); `Err`: close the connection.
    fn check_publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        len: usize,
        qos: u8,
    ) -> Result<Option<(TopicKind, Publish, Option<PublishProperties>)>, DisconnectReason> {
        let alias = props.as_mut().and_then(|p| p.topic_alias.take());
        let kind = if publish.topic.is_empty() {
            // MQTT 5: a topic alias set earlier (its topic passed the ACL then).
            let alias = alias.ok_or(DisconnectReason::ProtocolError)?;
            let (kind, topic) = self
                .aliases
                .get(&alias)
                .ok_or(DisconnectReason::ProtocolError)?;
            publish.topic = topic.clone();
            *kind
        } else {
            let kind = match &self.last_topic {
                Some((last, kind)) if *last == publish.topic => *kind,
                _ => {
                    let topic = std::str::from_utf8(&publish.topic)
                        .map_err(|_| DisconnectReason::ProtocolError)?;
                    let Some(kind) = acl::may_publish(&self.device, topic) else {
                        self.edge
                            .acl_denied(&self.device, AclAction::Publish, topic);
                        return Err(DisconnectReason::AclViolation);
                    };
                    self.last_topic = Some((Bytes::copy_from_slice(&publish.topic), kind));
                    kind
                }
            };
            if let Some(alias) = alias {
                if alias == 0 || alias > MAX_TOPIC_ALIASES {
                    return Err(DisconnectReason::ProtocolError);
                }
                self.aliases.insert(alias, (kind, publish.topic.clone()));
            }
            kind
        };

        if !self.limits.allow(kind) {
            if qos != 1 {
                return self.drop_publish(qos).map(|()| None);
            }
            // QoS 1: through on credit; the connection is not read until it is paid.
            self.limits.owe(kind);
            self.throttled.inc();
        }
        let counters = class_counters(&mut self.counters_in, Some(kind), || {
            (&self.edge.metrics.messages_in, &self.edge.metrics.bytes_in)
        });
        counters.messages.inc();
        counters.bytes.inc_by(len as u64);
        // Into the router at QoS 0: the edge acknowledges the device itself once the router
        // has the message. Properties without the alias; none when nothing else was set.
        let props = props.filter(|p| *p != PublishProperties::default());
        Ok(Some((
            kind,
            Publish::new(publish.topic, publish.payload, publish.retain),
            props,
        )))
    }

    /// Counts publishes the backend refused to store (acknowledged as dropped).
    fn refused(&self, n: u64) {
        tracing::warn!(device_id = %self.device, n, "publishes not stored; acknowledged as dropped");
        self.edge.metrics.lost.inc_by(n);
        self.edge
            .metrics
            .dropped
            .get_or_create(&ReasonLabel {
                reason: "not_stored",
            })
            .inc_by(n);
    }

    /// Drops an over-limit QoS 0 PUBLISH; a device over the limit for the configured time, or
    /// flooding at QoS 2, is disconnected. (Over-limit QoS 1 publishes are not dropped: they
    /// are throttled, see [`PublishLimits::owe`].)
    fn drop_publish(&mut self, qos: u8) -> Result<(), DisconnectReason> {
        self.dropped.inc();
        if self.limits.dropped(Instant::now()) {
            tracing::warn!(device_id = %self.device, "publish rate over the limit for too long");
            return Err(DisconnectReason::RateLimited);
        }
        match qos {
            0 => Ok(()),
            _ => Err(DisconnectReason::RateLimited),
        }
    }
}

type CounterFamily = prometheus_client::metrics::family::Family<ClassLabel, Counter>;

/// A connection's counters per topic class (each kind, and `None` for the rest), resolved
/// on first use. An array indexed by kind: a hash map's lookup (SipHash of the key) was ~1 %
/// of the server's CPU at 10,000 msg/s.
#[derive(Default)]
struct ClassCache([Option<ClassCounters>; TopicKind::ALL.len() + 1]);

fn class_counters<'c, 'f>(
    cache: &'c mut ClassCache,
    kind: Option<TopicKind>,
    families: impl FnOnce() -> (&'f CounterFamily, &'f CounterFamily),
) -> &'c ClassCounters {
    let at = kind.map_or(TopicKind::ALL.len(), |k| k as usize);
    cache.0[at].get_or_insert_with(|| {
        let (messages, bytes) = families();
        let label = ClassLabel::of(kind);
        ClassCounters {
            messages: messages.get_or_create(&label).clone(),
            bytes: bytes.get_or_create(&label).clone(),
        }
    })
}

/// The reason set by whoever closed the connection, or `fallback`.
fn stopped_or(control: &Control, fallback: DisconnectReason) -> DisconnectReason {
    control.reason().unwrap_or(fallback)
}

/// Why a write did not finish: the connection was closed meanwhile, or the network failed.
fn write_failed(control: &Control) -> DisconnectReason {
    if control.stop.is_cancelled() {
        stopped_or(control, DisconnectReason::ServerShutdown)
    } else {
        DisconnectReason::NetworkError
    }
}

/// Writes all of `buf` unless the connection is closed (`stopped` completes) meanwhile. False
/// if it did not.
async fn write_or_stop<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    stopped: Pin<&mut WaitForCancellationFuture<'_>>,
) -> bool {
    // Cases, in order: the write finishes or fails (most do at once, and the token is not
    // polled); closed while the peer is not reading.
    let ok = tokio::select! {
        biased;
        r = w.write_all(buf) => r.is_ok(),
        _ = stopped => false,
    };
    buf.clear();
    ok
}
