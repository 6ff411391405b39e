//! A device session after authentication: the router link is opened under the device's own
//! client id, the device gets its CONNACK, the pump runs, and the link is closed — with the
//! device's Will published first unless it said DISCONNECT. Emits Connected/Disconnected.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use companion_schema::DeviceId;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::pump::{Pump, MAX_TOPIC_ALIASES};
use super::Edge;
use crate::events::{BrokerEvent, DisconnectReason};
use crate::link::Link;
use crate::metrics::{result, ReasonLabel};
use crate::packet::{self, reason, ConnectInfo};
use crate::sessions::Control;

/// Bound on opening the router link (the router thread answers in microseconds when well).
const LINK_TIMEOUT: Duration = Duration::from_secs(5);
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs the session after authentication until the device is gone.
pub(super) async fn run<S>(
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
    let Some(mut link) = open_link(edge, connect, device, &mut dw).await else {
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

    let mut pump = Pump::new(edge, device.clone(), connect.codec());
    let keepalive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let reason = pump
        .run(&mut dr, &mut dw, &mut link, device_buf, keepalive, control)
        .await;

    if connect.v5() && reason != DisconnectReason::Clean {
        let _ = tokio::time::timeout(
            FINAL_WRITE_TIMEOUT,
            dw.write_all(&packet::disconnect_v5(v5_code(reason))),
        )
        .await;
    }
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, dw.shutdown()).await;
    close_link(&mut link, connect, device, reason).await;

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

/// Opens the device's router link and sends the device its CONNACK. `None` if the device is
/// not connected (it was told the server is unavailable).
async fn open_link<W: AsyncWrite + Unpin>(
    edge: &Edge,
    connect: &ConnectInfo,
    device: &DeviceId,
    dw: &mut W,
) -> Option<Link> {
    let opened = tokio::time::timeout(LINK_TIMEOUT, edge.router.open(device.as_str())).await;
    let link = match opened {
        Ok(Ok(link)) => Some(link),
        Ok(Err(e)) => {
            tracing::error!(device_id = %device, error = %e, "router link failed");
            None
        }
        Err(_) => {
            tracing::error!(device_id = %device, "router link timed out");
            None
        }
    };
    let connack = connect.codec().connack_accepted(MAX_TOPIC_ALIASES);
    match (link, connack) {
        (Some(link), Ok(connack)) => {
            let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, dw.write_all(&connack)).await;
            Some(link)
        }
        (link, _) => {
            if let Some(mut link) = link {
                close_link(&mut link, connect, device, DisconnectReason::ProtocolError).await;
            }
            edge.count_connect(result::UPSTREAM_ERROR);
            let refusal = packet::connack_unavailable(connect.v5());
            let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, async {
                dw.write_all(&refusal).await?;
                dw.shutdown().await
            })
            .await;
            None
        }
    }
}

/// Leaves the router: the Will first unless the device said DISCONNECT, then DISCONNECT (the
/// router drops the connection's state). Both go into the link's own buffer, so a link the
/// router already dropped just ignores them.
async fn close_link(
    link: &mut Link,
    connect: &ConnectInfo,
    device: &DeviceId,
    reason: DisconnectReason,
) {
    if link.is_gone() {
        return; // the device's own DISCONNECT went through, or the router dropped the link
    }
    let mut last = Vec::with_capacity(2);
    if reason != DisconnectReason::Clean {
        last.extend(connect.will());
    }
    last.push(Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    ));
    if let Err(e) = link.send(&mut last).await {
        tracing::warn!(device_id = %device, error = %e, "closing the router link failed");
    }
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
