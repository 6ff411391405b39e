//! MQTT over WebSocket (RFC 6455; MQTT 3.1.1 and 5, section 6): the HTTP upgrade and its
//! checks, then a byte stream the rest of the edge reads exactly like a TCP one. Binary
//! messages only (a text message closes the connection); MQTT packets may span messages.

use std::net::SocketAddr;

use async_tungstenite::tokio::TokioAdapter;
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use ws_stream_tungstenite::WsStream;

use crate::proxy::{forwarded_client, Networks};
use crate::settings::MqttSettings;

/// The subprotocol MQTT over WebSocket uses (MQTT 3.1.1 and 5 alike).
pub const SUBPROTOCOL: &str = "mqtt";
/// The read buffer tungstenite allocates per connection (its default is 128 KiB); it grows to
/// a frame's length when one is longer.
const READ_BUFFER: usize = 4 * 1024;

/// What an upgrade request must look like.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    path: String,
    origins: Vec<String>,
    trusted_proxies: Networks,
    config: WebSocketConfig,
}

impl Policy {
    pub(crate) fn new(settings: &MqttSettings) -> Self {
        // A message (or frame) holds at most one largest packet plus a little framing; a
        // packet split over several messages is still bounded by the packet limit.
        let max = settings.max_packet_size + 64;
        Self {
            path: settings.ws_path.clone(),
            origins: settings.ws_allowed_origins.clone(),
            trusted_proxies: settings.ws_trusted_proxies.clone(),
            config: WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                // Every write is one packet batch the pump wants on the wire now.
                .write_buffer_size(0)
                .max_write_buffer_size(4 * max)
                .max_message_size(Some(max))
                .max_frame_size(Some(max)),
        }
    }
}

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// The request was answered with an HTTP error (wrong path, origin or subprotocol).
    #[error("{status}: {reason}")]
    Rejected { status: StatusCode, reason: String },
    #[error("handshake: {0}")]
    Handshake(#[from] async_tungstenite::tungstenite::Error),
}

/// An upgraded connection, read and written as bytes.
pub(crate) type Stream<S> = WsStream<TokioAdapter<S>>;

/// Answers the upgrade on `stream` from `peer`. Returns the byte stream and the client's
/// address (from `X-Forwarded-For` when `peer` is a trusted proxy).
// tungstenite's callback returns its `ErrorResponse` (a whole HTTP response) as the error.
#[allow(clippy::result_large_err)]
pub(crate) async fn accept<S>(
    stream: S,
    policy: &Policy,
    peer: SocketAddr,
) -> Result<(Stream<S>, SocketAddr), Refused>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut client = peer;
    let mut refused = None;
    let check = |req: &Request, resp: Response| match check(req, resp, policy, peer) {
        Ok((resp, addr)) => {
            client = addr;
            Ok(resp)
        }
        Err((status, reason)) => {
            refused = Some(Refused::Rejected {
                status,
                reason: reason.clone(),
            });
            let mut err = ErrorResponse::new(Some(reason));
            *err.status_mut() = status;
            Err(err)
        }
    };
    let result =
        async_tungstenite::tokio::accept_hdr_async_with_config(stream, check, Some(policy.config))
            .await;
    match (result, refused) {
        (_, Some(refused)) => Err(refused),
        (Ok(ws), None) => Ok((WsStream::new(ws), client)),
        (Err(e), None) => Err(Refused::Handshake(e)),
    }
}

/// The checks on the upgrade request: path, origin, subprotocol. On success, the response
/// (with the chosen subprotocol) and the client's address.
fn check(
    req: &Request,
    mut resp: Response,
    policy: &Policy,
    peer: SocketAddr,
) -> Result<(Response, SocketAddr), (StatusCode, String)> {
    if req.uri().path() != policy.path {
        return Err((
            StatusCode::NOT_FOUND,
            format!("MQTT over WebSocket is served on {}", policy.path),
        ));
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !policy.origins.is_empty() && !policy.origins.iter().any(|o| o == origin) {
            return Err((StatusCode::FORBIDDEN, "origin not allowed".into()));
        }
    }
    let offers_mqtt = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(SUBPROTOCOL));
    if !offers_mqtt {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("the WebSocket subprotocol must be `{SUBPROTOCOL}`"),
        ));
    }
    resp.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect::<Vec<_>>();
    let client = forwarded_client(peer, forwarded, &policy.trusted_proxies);
    Ok((resp, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], trusted: &[&str]) -> Policy {
        let settings = MqttSettings {
            ws_allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            ws_trusted_proxies: Networks::parse(trusted).unwrap(),
            ..MqttSettings::default()
        };
        Policy::new(&settings)
    }

    fn request(path: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn status(r: Result<(Response, SocketAddr), (StatusCode, String)>) -> u16 {
        match r {
            Ok(_) => 101,
            Err((s, _)) => s.as_u16(),
        }
    }

    #[test]
    fn the_path_origin_and_subprotocol_are_checked() {
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let open = policy(&[], &[]);
        let strict = policy(&["https://app.example.com"], &[]);
        let mqtt = ("sec-websocket-protocol", "mqtt");
        let cases = [
            (&open, request("/mqtt", &[mqtt]), 101),
            (&open, request("/mqtt?x=1", &[mqtt]), 101),
            (
                &open,
                request("/mqtt", &[("sec-websocket-protocol", "wamp, MQTT")]),
                101,
            ),
            (&open, request("/other", &[mqtt]), 404),
            (&open, request("/mqtt", &[]), 400),
            (
                &open,
                request("/mqtt", &[("sec-websocket-protocol", "mqttv3.1x")]),
                400,
            ),
            (&strict, request("/mqtt", &[mqtt]), 101),
            (
                &strict,
                request("/mqtt", &[mqtt, ("origin", "https://app.example.com")]),
                101,
            ),
            (
                &strict,
                request("/mqtt", &[mqtt, ("origin", "https://evil.example")]),
                403,
            ),
        ];
        for (i, (policy, req, want)) in cases.into_iter().enumerate() {
            let got = status(check(&req, Response::new(()), policy, peer));
            assert_eq!(got, want, "case {i}: {:?} {:?}", req.uri(), req.headers());
        }
        let (resp, _) = check(&request("/mqtt", &[mqtt]), Response::new(()), &open, peer).unwrap();
        assert_eq!(resp.headers()[header::SEC_WEBSOCKET_PROTOCOL], "mqtt");
    }

    #[test]
    fn x_forwarded_for_counts_only_from_a_trusted_proxy() {
        let req = request(
            "/mqtt",
            &[
                ("sec-websocket-protocol", "mqtt"),
                ("x-forwarded-for", "198.51.100.7, 10.0.0.2"),
            ],
        );
        let proxy: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let trusting = policy(&[], &["10.0.0.0/8"]);
        let (_, client) = check(&req, Response::new(()), &trusting, proxy).unwrap();
        assert_eq!(client, "198.51.100.7:0".parse().unwrap());
        let (_, client) = check(&req, Response::new(()), &policy(&[], &[]), proxy).unwrap();
        assert_eq!(client, proxy, "an untrusted peer's header is ignored");
    }
}
