//! A device session after authentication: the device gets its CONNACK, the pump runs, and
//! unless the device said DISCONNECT its Will goes to the router. The router keeps nothing
//! per device: publishes go through the edge's uplink, messages for the device come from the
//! downlink through the session's mailbox. Emits Connected/Disconnected.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use companion_schema::DeviceId;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::pump::{Pump, MAX_TOPIC_ALIASES};
use super::sessions::{Control, Down};
use super::Edge;
use crate::events::{BrokerEvent, DisconnectReason};
use crate::metrics::{result, ReasonLabel};
use crate::packet::{self, reason, ConnectInfo};

const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs the session after authentication until the device is gone.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run<R, W>(
    edge: &Edge,
    mut dr: R,
    mut dw: W,
    device_buf: BytesMut,
    connect: &ConnectInfo,
    device: &DeviceId,
    peer: SocketAddr,
    control: &Control,
    mut mailbox: mpsc::Receiver<Box<Down>>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let connack = match connect.codec().connack_accepted(MAX_TOPIC_ALIASES) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(device_id = %device, error = %e, "CONNACK could not be encoded");
            edge.count_connect(result::PROTOCOL_ERROR);
            return;
        }
    };
    if tokio::time::timeout(FINAL_WRITE_TIMEOUT, dw.write_all(&connack))
        .await
        .map_or(true, |r| r.is_err())
    {
        edge.count_connect(result::PROTOCOL_ERROR);
        return;
    }
    edge.count_connect(result::ACCEPTED);
    edge.metrics.connected_devices.inc();
    edge.sink.send(BrokerEvent::Connected {
        device: device.clone(),
        peer,
        protocol: connect.level,
    });
    tracing::info!(device_id = %device, %peer, protocol = connect.level, "device connected");

    let mut pump = Pump::new(edge, device.clone(), connect.codec(), control.bell.clone());
    let keepalive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let reason = pump
        .run(
            &mut dr,
            &mut dw,
            &mut mailbox,
            device_buf,
            keepalive,
            control,
        )
        .await;

    if connect.v5() && reason != DisconnectReason::Clean {
        let _ = tokio::time::timeout(
            FINAL_WRITE_TIMEOUT,
            dw.write_all(&packet::disconnect_v5(v5_code(reason))),
        )
        .await;
    }
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, dw.shutdown()).await;
    if reason != DisconnectReason::Clean {
        if let Some(will) = connect.will() {
            if let Err(e) = edge.uplink.push(&mut vec![will]).await {
                tracing::warn!(device_id = %device, error = %e, "the Will could not be published");
            }
        }
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
        | DisconnectReason::Clean
        | DisconnectReason::ReportedOffline => reason::PROTOCOL_ERROR,
    }
}
