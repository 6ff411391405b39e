//! The forwarding half of a device connection: opens the upstream connection to the router
//! (CONNECT with the password rewritten to the internal secret), then pumps framed packets both
//! ways, checking the ACL on PUBLISH/SUBSCRIBE/UNSUBSCRIBE and the publish rate, until the
//! device leaves, breaks a rule, or is closed (kick, takeover, shutdown).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use companion_schema::{DeviceId, Topic, TopicKind};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::connection::{acl_denied, read_frame};
use super::Edge;
use crate::acl;
use crate::events::{AclAction, BrokerEvent, DisconnectReason};
use crate::metrics::{result, ClassLabel, ReasonLabel};
use crate::packet::{self, reason, ConnectInfo, Header, PacketError};
use crate::sessions::Control;

const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest packet accepted from the router (the backend's publishes are bounded by schema).
const MAX_DOWN_PACKET: usize = 4 * 1024 * 1024;
/// A device may hold at most this many MQTT 5 topic aliases.
const MAX_TOPIC_ALIASES: usize = 64;
/// A gap this long without a dropped publish ends an over-limit episode.
const OVER_LIMIT_GAP: Duration = Duration::from_secs(1);
const BUFFER: usize = 8 * 1024;

/// Runs the session after authentication. Emits Connected/Disconnected.
pub(super) async fn session<S>(
    edge: &Edge,
    device_io: S,
    device_buf: BytesMut,
    connect: &ConnectInfo,
    device: &DeviceId,
    peer: SocketAddr,
    control: &Control,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut dr, mut dw) = tokio::io::split(device_io);
    let Some((mut upstream, upstream_id)) = open_upstream(edge, connect, device, &mut dw).await
    else {
        return;
    };
    edge.count_connect(result::ACCEPTED);
    edge.metrics.connected_devices.inc();
    edge.sink.send(BrokerEvent::Connected {
        device: device.clone(),
        peer,
        protocol: connect.level,
    });
    tracing::info!(device_id = %device, %peer, protocol = connect.level, "device connected");

    let mut pump = Pump::new(edge, device.clone(), connect.v5());
    let keepalive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let (mut ur, mut uw) = upstream.split();
    let reason = pump
        .run(
            &mut dr, &mut dw, &mut ur, &mut uw, device_buf, keepalive, control,
        )
        .await;

    // Anything but a clean DISCONNECT drops the upstream without one: rumqttd then publishes
    // the device's Will.
    if connect.v5() && reason != DisconnectReason::Clean {
        let code = v5_code(reason);
        let _ = tokio::time::timeout(
            FINAL_WRITE_TIMEOUT,
            dw.write_all(&packet::disconnect_v5(code)),
        )
        .await;
    }
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, dw.shutdown()).await;
    // Let rumqttd close the upstream: after the forwarded DISCONNECT, or after our FIN (no
    // DISCONNECT, so rumqttd publishes the Will). Closing it first races rumqttd 0.20's
    // router: its link then reports a second disconnect for a connection id the router has
    // already freed and may have handed to a new client, which it then drops (seen as the
    // backend's connection vanishing under load). Seeing its EOF also frees the client id.
    if reason != DisconnectReason::Clean {
        let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, uw.shutdown()).await;
    }
    let closed_by_router = !edge.shutdown.is_cancelled() && wait_for_eof(&mut ur).await;
    drop(upstream);
    if closed_by_router {
        edge.upstream_ids.give_back(upstream_id);
    }

    edge.metrics.connected_devices.dec();
    edge.metrics
        .disconnects
        .get_or_create(&ReasonLabel {
            reason: reason.as_str(),
        })
        .inc();
    tracing::info!(device_id = %device, reason = reason.as_str(), "device disconnected");
    edge.sink.send(BrokerEvent::Disconnected {
        device: device.clone(),
        reason,
    });
}

fn v5_code(reason: DisconnectReason) -> u8 {
    match reason {
        DisconnectReason::AclViolation => reason::NOT_AUTHORIZED,
        DisconnectReason::RateLimited => reason::MESSAGE_RATE_TOO_HIGH,
        DisconnectReason::PacketTooLarge => reason::PACKET_TOO_LARGE,
        DisconnectReason::Kicked => reason::ADMINISTRATIVE_ACTION,
        DisconnectReason::Takeover => reason::SESSION_TAKEN_OVER,
        DisconnectReason::ServerShutdown => reason::SERVER_SHUTTING_DOWN,
        DisconnectReason::KeepaliveTimeout => reason::KEEP_ALIVE_TIMEOUT,
        DisconnectReason::ProtocolError
        | DisconnectReason::NetworkError
        | DisconnectReason::Clean => reason::PROTOCOL_ERROR,
    }
}

/// Connects to the router's port for the device's protocol version, sends the rewritten
/// CONNECT and relays the CONNACK. `None` if the device is not connected (the client id used
/// is then burned: see [`UpstreamIds`]).
async fn open_upstream<W: AsyncWrite + Unpin>(
    edge: &Edge,
    connect: &ConnectInfo,
    device: &DeviceId,
    dw: &mut W,
) -> Option<(TcpStream, UpstreamId)> {
    let addr = if connect.v5() {
        edge.internal.v5
    } else {
        edge.internal.v4
    };
    let id = edge.upstream_ids.take(device);
    let attempt = async {
        let mut up = TcpStream::connect(addr).await?;
        up.set_nodelay(true)?;
        let rewritten = connect
            .rewrite(&id.to_string(), device.as_str(), &edge.internal.password)
            .map_err(std::io::Error::other)?;
        up.write_all(&rewritten).await?;
        let mut buf = BytesMut::with_capacity(64);
        match read_frame(&mut up, &mut buf, MAX_DOWN_PACKET).await {
            Ok(Some((h, frame))) if h.kind() == packet::CONNACK => Ok((up, h, frame)),
            other => Err(std::io::Error::other(format!(
                "no CONNACK from router: {other:?}"
            ))),
        }
    };
    let (up, header, connack) = match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            tracing::error!(device_id = %device, error = %e, "router connection failed");
            edge.count_connect(result::UPSTREAM_ERROR);
            return None;
        }
        Err(_) => {
            tracing::error!(device_id = %device, "router connection timed out");
            edge.count_connect(result::UPSTREAM_ERROR);
            return None;
        }
    };
    let code = packet::connack_code(&header, &connack).unwrap_or(u8::MAX);
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, dw.write_all(&connack)).await;
    if code != 0 {
        tracing::warn!(device_id = %device, code, "router refused the connection");
        edge.count_connect(result::ROUTER_REFUSED);
        return None;
    }
    Some((up, id))
}

/// Per-class counters, resolved once per connection.
struct ClassCounters {
    messages: Counter,
    bytes: Counter,
}

struct Pump<'a> {
    edge: &'a Edge,
    device: DeviceId,
    v5: bool,
    aliases: HashMap<u16, TopicKind>,
    control_limit: DefaultDirectRateLimiter,
    audio_limit: DefaultDirectRateLimiter,
    over_since: Option<Instant>,
    last_drop: Option<Instant>,
    sustained: Duration,
    dropped: Counter,
    counters_in: HashMap<Option<TopicKind>, ClassCounters>,
    counters_out: HashMap<Option<TopicKind>, ClassCounters>,
}

/// The outcome of a batch of device packets.
enum Step {
    Continue,
    /// The device sent DISCONNECT (forwarded).
    Clean,
    Close(DisconnectReason),
}

fn quota(per_s: u32, burst: u32) -> Quota {
    let per_s = NonZeroU32::new(per_s).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(per_s);
    Quota::per_second(per_s).allow_burst(burst)
}

impl<'a> Pump<'a> {
    fn new(edge: &'a Edge, device: DeviceId, v5: bool) -> Self {
        let rate = &edge.settings.rate;
        Self {
            edge,
            device,
            v5,
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

    #[allow(clippy::too_many_arguments)]
    async fn run<DR, DW, UR, UW>(
        &mut self,
        dr: &mut DR,
        dw: &mut DW,
        ur: &mut UR,
        uw: &mut UW,
        mut dbuf: BytesMut,
        keepalive: Option<Duration>,
        control: &Control,
    ) -> DisconnectReason
    where
        DR: AsyncRead + Unpin,
        DW: AsyncWrite + Unpin,
        UR: AsyncRead + Unpin,
        UW: AsyncWrite + Unpin,
    {
        let max = self.edge.settings.max_packet_size;
        let mut ubuf = BytesMut::with_capacity(BUFFER);
        let mut to_router = BytesMut::with_capacity(BUFFER);
        let mut to_device = BytesMut::with_capacity(BUFFER);
        let far = Duration::from_secs(365 * 24 * 3600);
        let mut deadline = tokio::time::Instant::now() + keepalive.unwrap_or(far);
        // Bytes that arrived with the CONNECT.
        let mut step = self.check_from_device(&mut dbuf, max, &mut to_router, &mut to_device);
        loop {
            if !to_device.is_empty() && !write_or_stop(dw, &mut to_device, control).await {
                return write_failed(control);
            }
            if !to_router.is_empty() && !write_or_stop(uw, &mut to_router, control).await {
                return write_failed(control);
            }
            match step {
                Step::Continue => {}
                Step::Clean => return DisconnectReason::Clean,
                Step::Close(reason) => return reason,
            }
            // Cases: closed (kick, takeover, shutdown); bytes from the device; bytes from the
            // router; keep-alive expired.
            tokio::select! {
                _ = control.stop.cancelled() => return stopped_or(control, DisconnectReason::ServerShutdown),
                read = dr.read_buf(&mut dbuf) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return DisconnectReason::NetworkError;
                    }
                    deadline = tokio::time::Instant::now() + keepalive.unwrap_or(far);
                    step = self.check_from_device(&mut dbuf, max, &mut to_router, &mut to_device);
                }
                read = ur.read_buf(&mut ubuf) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        tracing::debug!(device_id = %self.device, "router closed the connection");
                        return DisconnectReason::NetworkError;
                    }
                    step = match self.frame_from_router(&mut ubuf, &mut to_device) {
                        Ok(()) => Step::Continue,
                        Err(_) => Step::Close(DisconnectReason::ProtocolError),
                    };
                }
                _ = tokio::time::sleep_until(deadline), if keepalive.is_some() => {
                    return DisconnectReason::KeepaliveTimeout;
                }
            }
        }
    }

    /// Checks every complete device packet in `buf`; allowed ones go to `to_router`, the
    /// edge's own answers (PUBACK for a dropped publish) to `to_device`.
    fn check_from_device(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
        to_router: &mut BytesMut,
        to_device: &mut BytesMut,
    ) -> Step {
        loop {
            let (header, frame) = match packet::next_frame(buf, max) {
                Ok(Some(f)) => f,
                Ok(None) => return Step::Continue,
                Err(PacketError::TooLarge(len)) => {
                    tracing::warn!(device_id = %self.device, len, max, "packet too large");
                    return Step::Close(DisconnectReason::PacketTooLarge);
                }
                Err(_) => return Step::Close(DisconnectReason::ProtocolError),
            };
            match header.kind() {
                packet::PUBLISH => match self.check_publish(&header, &frame, to_device) {
                    Ok(true) => to_router.extend_from_slice(&frame),
                    Ok(false) => {}
                    Err(reason) => return Step::Close(reason),
                },
                packet::SUBSCRIBE | packet::UNSUBSCRIBE => {
                    let Ok(filters) = packet::filters(&header, &frame, self.v5) else {
                        return Step::Close(DisconnectReason::ProtocolError);
                    };
                    if let Some(bad) = filters
                        .iter()
                        .find(|f| !acl::may_subscribe(&self.device, f))
                    {
                        acl_denied(self.edge, &self.device, AclAction::Subscribe, bad);
                        return Step::Close(DisconnectReason::AclViolation);
                    }
                    to_router.extend_from_slice(&frame);
                }
                packet::CONNECT => return Step::Close(DisconnectReason::ProtocolError),
                packet::DISCONNECT => {
                    to_router.extend_from_slice(&frame);
                    return Step::Clean;
                }
                _ => to_router.extend_from_slice(&frame),
            }
        }
    }

    /// `Ok(true)`: forward; `Ok(false)`: dropped (rate limit); `Err`: close the connection.
    fn check_publish(
        &mut self,
        header: &Header,
        frame: &Bytes,
        to_device: &mut BytesMut,
    ) -> Result<bool, DisconnectReason> {
        let info = packet::publish_info(header, frame, self.v5)
            .map_err(|_| DisconnectReason::ProtocolError)?;
        let kind = if info.topic.is_empty() {
            // MQTT 5: a topic alias set earlier (its topic passed the ACL then).
            let alias = info.topic_alias.ok_or(DisconnectReason::ProtocolError)?;
            *self
                .aliases
                .get(&alias)
                .ok_or(DisconnectReason::ProtocolError)?
        } else {
            let Some(kind) = acl::may_publish(&self.device, info.topic) else {
                acl_denied(self.edge, &self.device, AclAction::Publish, info.topic);
                return Err(DisconnectReason::AclViolation);
            };
            if let Some(alias) = info.topic_alias {
                if self.aliases.len() >= MAX_TOPIC_ALIASES && !self.aliases.contains_key(&alias) {
                    return Err(DisconnectReason::ProtocolError);
                }
                self.aliases.insert(alias, kind);
            }
            kind
        };

        let limiter = if kind.is_audio() {
            &self.audio_limit
        } else {
            &self.control_limit
        };
        if limiter.check().is_err() {
            return self
                .drop_publish(header, info.packet_id, to_device)
                .map(|()| false);
        }
        let counters = class_counters(&mut self.counters_in, Some(kind), || {
            (&self.edge.metrics.messages_in, &self.edge.metrics.bytes_in)
        });
        counters.messages.inc();
        counters.bytes.inc_by(frame.len() as u64);
        Ok(true)
    }

    /// Drops an over-limit PUBLISH (acknowledging QoS 1); a device over the limit for the
    /// configured time, or flooding at QoS 2, is disconnected.
    fn drop_publish(
        &mut self,
        header: &Header,
        packet_id: Option<u16>,
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
        match (header.qos(), packet_id) {
            (0, _) => Ok(()),
            (1, Some(id)) => {
                to_device.extend_from_slice(&packet::puback_dropped(id, self.v5));
                Ok(())
            }
            _ => Err(DisconnectReason::RateLimited),
        }
    }

    /// Frames router packets for the device, counting publishes by class.
    fn frame_from_router(
        &mut self,
        buf: &mut BytesMut,
        to_device: &mut BytesMut,
    ) -> Result<(), PacketError> {
        while let Some((header, frame)) = packet::next_frame(buf, MAX_DOWN_PACKET)? {
            if header.kind() == packet::PUBLISH {
                let kind = packet::publish_info(&header, &frame, self.v5)
                    .ok()
                    .and_then(|i| Topic::parse(i.topic).ok())
                    .map(|t| t.kind);
                let metrics = &self.edge.metrics;
                let c = class_counters(&mut self.counters_out, kind, || {
                    (&metrics.messages_out, &metrics.bytes_out)
                });
                c.messages.inc();
                c.bytes.inc_by(frame.len() as u64);
            }
            to_device.extend_from_slice(&frame);
        }
        Ok(())
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

/// Client ids for the upstream (router) connections: `{device}~{n}`, reused only when safe.
///
/// rumqttd 0.20 keeps a Will handler per client id and, when a connection fails between
/// CONNECT and CONNACK, leaves a dead one behind; the next CONNECT with that id then panics
/// inside rumqttd while holding its lock, poisoning it, and every later connection to that
/// listener panics too. A reused id whose old connection the router still holds is a takeover
/// inside rumqttd, whose late disconnect can drop an unrelated connection. So an id goes back
/// to its device's pool only after its connection got CONNACK 0 and ended with rumqttd
/// closing the socket (EOF seen: the router has let the connection go); any other ending burns
/// it. Takeover by the same device id is the edge's job (`sessions`), not rumqttd's.
///
/// Reuse matters because rumqttd also keeps a record for every client id that ever
/// disconnected and never drops it: with a fresh id per connection that was a slow leak of a
/// few hundred bytes per device connection. `broker_router_client_ids` counts the ids issued.
pub(crate) struct UpstreamIds {
    free: std::sync::Mutex<HashMap<DeviceId, Vec<u64>>>,
    next: std::sync::atomic::AtomicU64,
    /// `broker_router_client_ids`.
    issued: prometheus_client::metrics::gauge::Gauge,
}

impl UpstreamIds {
    pub(crate) fn new(issued: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            free: Default::default(),
            next: Default::default(),
            issued,
        }
    }

    /// An id for a new upstream connection of `device`: a free one, or a fresh one (counted).
    pub(crate) fn take(&self, device: &DeviceId) -> UpstreamId {
        let reused = self.free.lock().ok().and_then(|mut free| {
            let slots = free.get_mut(device)?;
            let n = slots.pop();
            if slots.is_empty() {
                free.remove(device);
            }
            n
        });
        let n = reused.unwrap_or_else(|| {
            self.issued.inc();
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        });
        UpstreamId {
            device: device.clone(),
            n,
        }
    }

    /// Returns an id whose connection ended safely (see the type's documentation).
    pub(crate) fn give_back(&self, id: UpstreamId) {
        if let Ok(mut free) = self.free.lock() {
            free.entry(id.device).or_default().push(id.n);
        }
    }
}

/// One upstream client id, `{device}~{n}`.
pub(crate) struct UpstreamId {
    device: DeviceId,
    n: u64,
}

impl std::fmt::Display for UpstreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}~{}", self.device, self.n)
    }
}

/// How long to wait for rumqttd to close a connection after a DISCONNECT.
pub(crate) const UPSTREAM_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Reads and discards until the peer closes (or [`UPSTREAM_CLOSE_WAIT`] passes). Whether it
/// closed in time.
pub(crate) async fn wait_for_eof<R: AsyncRead + Unpin>(r: &mut R) -> bool {
    let mut sink = [0u8; 512];
    tokio::time::timeout(UPSTREAM_CLOSE_WAIT, async {
        loop {
            match r.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}
