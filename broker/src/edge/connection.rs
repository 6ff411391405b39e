//! One device connection up to the pump: CONNECT (with a timeout), identity rules,
//! authentication (with a timeout), the Will's ACL, takeover registration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use companion_schema::DeviceId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::admission::Source;
use super::{session, Edge};
use crate::acl;
use crate::auth::{AuthDecision, AuthRequest, DenyReason};
use crate::events::AclAction;
use crate::metrics::result;
use crate::packet::{self, ConnectInfo, PacketError, Refusal};
use crate::RESERVED_CLIENT_ID_PREFIX;

/// Bound on writing a refusal before the socket is closed anyway.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
const READ_BUFFER: usize = 512;

/// `pending` counts the connection as not yet authenticated until it is (or ends).
pub(super) async fn run<S>(
    edge: Arc<Edge>,
    stream: S,
    peer: SocketAddr,
    pending: super::admission::PendingGuard,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Split at once: the stream (over 1 KiB with TLS) then lives in one heap block and the
    // futures of this function and the session hold two pointers to it, not copies of it.
    let (mut reader, mut writer) = tokio::io::split(stream);
    let max = edge.settings.max_packet_size;
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let timeout = Duration::from_millis(edge.settings.connect_timeout_ms);
    // Cases: shutdown; the first packet arrives, fails or times out.
    let first = tokio::select! {
        _ = edge.shutdown.cancelled() => return,
        r = tokio::time::timeout(timeout, read_frame(&mut reader, &mut buf, max)) => r,
    };
    let frame = match first {
        Ok(Ok(Some((h, frame)))) if h.kind() == packet::CONNECT => frame,
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time");
            edge.count_connect(result::TIMEOUT);
            return;
        }
        other => {
            tracing::debug!(%peer, outcome = ?other.map(|r| r.map(|o| o.map(|(h, _)| h))), "first packet is not a CONNECT");
            edge.count_connect(result::PROTOCOL_ERROR);
            return;
        }
    };
    let connect = match packet::connect(&frame, max) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "bad CONNECT");
            edge.count_connect(result::PROTOCOL_ERROR);
            return;
        }
    };

    // A source blocked while this connection was in its handshake is refused before the
    // authenticator (and its database lookup).
    let blocked = edge.throttle.blocked(Source::of(peer.ip()), Instant::now());
    let verdict = if blocked {
        Err(DenyReason::Throttled)
    } else {
        authenticate(&edge, &connect, peer).await
    };
    let device = match verdict {
        Ok(device) => device,
        Err(reason) => {
            edge.login_refused(&connect.client_id, peer, reason);
            let why = match reason {
                DenyReason::Unavailable => Refusal::Unavailable,
                DenyReason::Throttled => Refusal::RateExceeded,
                _ => Refusal::NotAuthorized,
            };
            refuse(&mut writer, connect.v5(), why).await;
            return;
        }
    };
    drop(pending);

    if let Some(topic) = &connect.will_topic {
        if acl::may_publish(&device, topic).is_none() {
            edge.count_connect(result::ACL_DENIED);
            edge.acl_denied(&device, AclAction::Will, topic);
            refuse(&mut writer, connect.v5(), Refusal::NotAuthorized).await;
            return;
        }
    }

    let (control, mailbox) = edge.sessions.register(&device, &edge.shutdown).await;
    session::run(
        &edge, reader, writer, buf, &connect, &device, peer, &control, mailbox,
    )
    .await;
    edge.sessions.finish(&device, &control);
}

/// Applies the identity rules, then asks the [`crate::Authenticator`] (with a timeout).
async fn authenticate(
    edge: &Edge,
    connect: &ConnectInfo,
    peer: SocketAddr,
) -> Result<DeviceId, DenyReason> {
    let client_id = connect.client_id.as_str();
    if client_id.starts_with(RESERVED_CLIENT_ID_PREFIX) {
        return Err(DenyReason::ReservedClientId);
    }
    let username = connect.username.as_deref().unwrap_or_default();
    if username != client_id {
        return Err(DenyReason::IdentityMismatch);
    }
    let device = DeviceId::parse(client_id).map_err(|_| DenyReason::IdentityMismatch)?;
    let password = connect.password.as_deref().ok_or(DenyReason::BadToken)?;
    let req = AuthRequest {
        client_id,
        username,
        password,
        peer,
    };
    let timeout = Duration::from_millis(edge.settings.auth_timeout_ms);
    match tokio::time::timeout(timeout, edge.auth.authenticate(&req)).await {
        Ok(AuthDecision::Allow { device: allowed }) if allowed == device => Ok(device),
        Ok(AuthDecision::Allow { .. }) => Err(DenyReason::IdentityMismatch),
        Ok(AuthDecision::Deny(reason)) => Err(reason),
        Err(_) => {
            tracing::warn!(%peer, "authenticator timed out");
            Err(DenyReason::Unavailable)
        }
    }
}

/// Answers a refusing CONNACK and closes.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, v5: bool, why: Refusal) {
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(&packet::connack_refusal(v5, why)).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await;
}

/// Reads until one complete packet is buffered; `Ok(None)` on a clean end of stream.
pub(super) async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(packet::Header, bytes::Bytes)>, FrameReadError> {
    loop {
        if let Some(frame) = packet::next_frame(buf, max)? {
            return Ok(Some(frame));
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Why reading a packet failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum FrameReadError {
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("packet: {0}")]
    Packet(#[from] PacketError),
}
