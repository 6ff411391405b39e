//! The packet pump of a device connection: device packets are framed, decoded once (rumqttd's
//! codec), checked (ACL on PUBLISH/SUBSCRIBE/UNSUBSCRIBE, v5 topic aliases, publish rate) and
//! handed to the router's local link in batches; the router's notifications are encoded for
//! the device. Runs until the device leaves, breaks a rule, or is closed (kick, takeover,
//! shutdown).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use companion_schema::{DeviceId, Topic, TopicKind};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::counter::Counter;
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Edge;
use crate::acl;
use crate::events::{AclAction, DisconnectReason};
use crate::link::{self, Link};
use crate::metrics::{ClassLabel, ReasonLabel};
use crate::packet::{self, Codec, PacketError};
use crate::sessions::Control;

/// A device may hold at most this many MQTT 5 topic aliases (announced in the CONNACK).
pub(super) const MAX_TOPIC_ALIASES: u16 = 64;
/// A gap this long without a dropped publish ends an over-limit episode.
const OVER_LIMIT_GAP: Duration = Duration::from_secs(1);
const BUFFER: usize = 8 * 1024;

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
    control_limit: DefaultDirectRateLimiter,
    audio_limit: DefaultDirectRateLimiter,
    over_since: Option<Instant>,
    last_drop: Option<Instant>,
    sustained: Duration,
    dropped: Counter,
    counters_in: HashMap<Option<TopicKind>, ClassCounters>,
    counters_out: HashMap<Option<TopicKind>, ClassCounters>,
}

/// The outcome of a batch of packets.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    /// The device sent DISCONNECT.
    Clean,
    Close(DisconnectReason),
}

fn quota(per_s: u32, burst: u32) -> Quota {
    let per_s = NonZeroU32::new(per_s.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(per_s);
    Quota::per_second(per_s).allow_burst(burst)
}

impl<'a> Pump<'a> {
    pub(super) fn new(edge: &'a Edge, device: DeviceId, codec: Codec) -> Self {
        let rate = &edge.settings.rate;
        Self {
            edge,
            device,
            codec,
            aliases: HashMap::new(),
            control_limit: RateLimiter::direct(quota(rate.control_per_s, rate.control_burst)),
            audio_limit: RateLimiter::direct(quota(rate.audio_per_s, rate.audio_burst)),
            over_since: None,
            last_drop: None,
            sustained: Duration::from_secs(rate.sustained_over_limit_s),
            dropped: edge
                .metrics
                .dropped
                .get_or_create(&ReasonLabel {
                    reason: "rate_limited",
                })
                .clone(),
            counters_in: HashMap::new(),
            counters_out: HashMap::new(),
        }
    }

    /// Pumps until the connection ends; the reason it ended.
    pub(super) async fn run<R, W>(
        &mut self,
        dr: &mut R,
        dw: &mut W,
        link: &mut Link,
        mut dbuf: BytesMut,
        keepalive: Option<Duration>,
        control: &Control,
    ) -> DisconnectReason
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.edge.settings.max_packet_size;
        let mut to_router: Vec<Packet> = Vec::new();
        let mut to_device = BytesMut::with_capacity(BUFFER);
        let mut notes: Vec<Notification> = Vec::new();
        let mut unscheduled = false;
        let far = Duration::from_secs(365 * 24 * 3600);
        let mut deadline = tokio::time::Instant::now() + keepalive.unwrap_or(far);
        // Packets that arrived with the CONNECT.
        let mut step = self.device_packets(&mut dbuf, max, &mut to_router, &mut to_device);
        loop {
            if !to_device.is_empty() && !write_or_stop(dw, &mut to_device, control).await {
                return write_failed(control);
            }
            if unscheduled {
                unscheduled = false;
                if let Err(e) = link.wake().await {
                    tracing::warn!(device_id = %self.device, error = %e, "router link lost");
                    return DisconnectReason::ProtocolError;
                }
            }
            if let Err(e) = link.send(&mut to_router).await {
                tracing::warn!(device_id = %self.device, error = %e, "router link lost");
                return DisconnectReason::ProtocolError;
            }
            match step {
                Step::Continue => {}
                Step::Clean => return DisconnectReason::Clean,
                Step::Close(reason) => return reason,
            }
            // Cases: closed (kick, takeover, shutdown); bytes from the device; notifications
            // from the router; keep-alive expired.
            tokio::select! {
                _ = control.stop.cancelled() => return stopped_or(control, DisconnectReason::ServerShutdown),
                read = dr.read_buf(&mut dbuf) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return DisconnectReason::NetworkError;
                    }
                    deadline = tokio::time::Instant::now() + keepalive.unwrap_or(far);
                    step = self.device_packets(&mut dbuf, max, &mut to_router, &mut to_device);
                }
                got = link.recv(&mut notes) => {
                    if got.is_err() {
                        tracing::warn!(device_id = %self.device, "the router closed the link");
                        return DisconnectReason::ProtocolError;
                    }
                    (step, unscheduled) = self.router_notes(&mut notes, &mut to_device);
                }
                _ = tokio::time::sleep_until(deadline), if keepalive.is_some() => {
                    return DisconnectReason::KeepaliveTimeout;
                }
            }
        }
    }

    /// Decodes and checks every complete device packet in `buf`; allowed ones go to
    /// `to_router`, the edge's own answers (PINGRESP, PUBACK for a dropped publish) to
    /// `to_device`.
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
            let packet = decoded.packet;
            match packet {
                Packet::Publish(publish, props) => {
                    match self.check_publish(publish, props, len, (qos, packet_id), to_device) {
                        Ok(Some(p)) => to_router.push(p),
                        Ok(None) => {}
                        Err(reason) => return Step::Close(reason),
                    }
                }
                Packet::Subscribe(ref s, _) => {
                    if let Some(bad) = s
                        .filters
                        .iter()
                        .find(|f| !acl::may_subscribe(&self.device, &f.path))
                    {
                        super::connection::acl_denied(
                            self.edge,
                            &self.device,
                            AclAction::Subscribe,
                            &bad.path,
                        );
                        return Step::Close(DisconnectReason::AclViolation);
                    }
                    to_router.push(packet);
                }
                Packet::Unsubscribe(ref u, _) => {
                    if let Some(bad) = u
                        .filters
                        .iter()
                        .find(|f| !acl::may_subscribe(&self.device, f))
                    {
                        super::connection::acl_denied(
                            self.edge,
                            &self.device,
                            AclAction::Subscribe,
                            bad,
                        );
                        return Step::Close(DisconnectReason::AclViolation);
                    }
                    to_router.push(packet);
                }
                // Answered here: the router has nothing to add to a ping.
                Packet::PingReq(_) => to_device.extend_from_slice(&packet::PINGRESP),
                Packet::Disconnect(..) => {
                    to_router.push(packet);
                    return Step::Clean;
                }
                Packet::PubAck(..)
                | Packet::PubRec(..)
                | Packet::PubRel(..)
                | Packet::PubComp(..) => to_router.push(packet),
                // CONNECT twice, or packets only a server sends.
                _ => return Step::Close(DisconnectReason::ProtocolError),
            }
        }
    }

    /// `Ok(Some)`: the publish to route (aliases resolved); `Ok(None)`: dropped (rate limit);
    /// `Err`: close the connection.
    fn check_publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        len: usize,
        ids: (u8, Option<u16>),
        to_device: &mut BytesMut,
    ) -> Result<Option<Packet>, DisconnectReason> {
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
            let topic =
                std::str::from_utf8(&publish.topic).map_err(|_| DisconnectReason::ProtocolError)?;
            let Some(kind) = acl::may_publish(&self.device, topic) else {
                super::connection::acl_denied(self.edge, &self.device, AclAction::Publish, topic);
                return Err(DisconnectReason::AclViolation);
            };
            if let Some(alias) = alias {
                if alias == 0 || alias > MAX_TOPIC_ALIASES {
                    return Err(DisconnectReason::ProtocolError);
                }
                self.aliases.insert(alias, (kind, publish.topic.clone()));
            }
            kind
        };

        let limiter = if kind.is_audio() {
            &self.audio_limit
        } else {
            &self.control_limit
        };
        if limiter.check().is_err() {
            return self.drop_publish(ids, to_device).map(|()| None);
        }
        let counters = class_counters(&mut self.counters_in, Some(kind), || {
            (&self.edge.metrics.messages_in, &self.edge.metrics.bytes_in)
        });
        counters.messages.inc();
        counters.bytes.inc_by(len as u64);
        // Properties without the alias; none at all when nothing else was set.
        let props = props.filter(|p| *p != PublishProperties::default());
        Ok(Some(Packet::Publish(publish, props)))
    }

    /// Drops an over-limit PUBLISH (acknowledging QoS 1); a device over the limit for the
    /// configured time, or flooding at QoS 2, is disconnected.
    fn drop_publish(
        &mut self,
        (qos, packet_id): (u8, Option<u16>),
        to_device: &mut BytesMut,
    ) -> Result<(), DisconnectReason> {
        self.dropped.inc();
        let now = Instant::now();
        let continuing = self
            .last_drop
            .is_some_and(|last| now.duration_since(last) <= OVER_LIMIT_GAP);
        if !continuing {
            self.over_since = Some(now);
        }
        self.last_drop = Some(now);
        if self
            .over_since
            .is_some_and(|since| now.duration_since(since) >= self.sustained)
        {
            tracing::warn!(device_id = %self.device, "publish rate over the limit for too long");
            return Err(DisconnectReason::RateLimited);
        }
        match (qos, packet_id) {
            (0, _) => Ok(()),
            (1, Some(id)) => {
                to_device.extend_from_slice(&packet::puback_dropped(id, self.codec.v5()));
                Ok(())
            }
            _ => Err(DisconnectReason::RateLimited),
        }
    }

    /// Encodes the router's notifications for the device, counting publishes by class.
    /// Returns the step and whether the router unscheduled the link (answer with `wake`).
    fn router_notes(
        &mut self,
        notes: &mut Vec<Notification>,
        to_device: &mut BytesMut,
    ) -> (Step, bool) {
        let mut unscheduled = false;
        for note in notes.drain(..) {
            if let Notification::Disconnect(ref d, _) = note {
                tracing::warn!(device_id = %self.device, reason = ?d.reason_code, "the router dropped the connection");
                return (Step::Close(DisconnectReason::ProtocolError), unscheduled);
            }
            let kind = match &note {
                Notification::Forward(f) => Some(
                    std::str::from_utf8(&f.publish.topic)
                        .ok()
                        .and_then(|t| Topic::parse(t).ok())
                        .map(|t| t.kind),
                ),
                _ => None,
            };
            let Some(packet) = link::into_packet(note) else {
                unscheduled = true;
                continue;
            };
            let before = to_device.len();
            if let Err(e) = self.codec.write(packet, to_device) {
                tracing::warn!(device_id = %self.device, error = %e, "router packet could not be encoded");
                return (Step::Close(DisconnectReason::ProtocolError), unscheduled);
            }
            if let Some(kind) = kind {
                let metrics = &self.edge.metrics;
                let c = class_counters(&mut self.counters_out, kind, || {
                    (&metrics.messages_out, &metrics.bytes_out)
                });
                c.messages.inc();
                c.bytes.inc_by((to_device.len() - before) as u64);
            }
        }
        (Step::Continue, unscheduled)
    }
}

type CounterFamily = prometheus_client::metrics::family::Family<ClassLabel, Counter>;

fn class_counters<'c, 'f>(
    cache: &'c mut HashMap<Option<TopicKind>, ClassCounters>,
    kind: Option<TopicKind>,
    families: impl FnOnce() -> (&'f CounterFamily, &'f CounterFamily),
) -> &'c ClassCounters {
    cache.entry(kind).or_insert_with(|| {
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

/// Writes all of `buf` unless the connection is closed meanwhile. False if it did not.
async fn write_or_stop<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    control: &Control,
) -> bool {
    // Cases: closed while the peer is not reading; the write finishes or fails.
    let ok = tokio::select! {
        _ = control.stop.cancelled() => false,
        r = w.write_all(buf) => r.is_ok(),
    };
    buf.clear();
    ok
}
