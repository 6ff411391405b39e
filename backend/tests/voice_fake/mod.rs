//! A local HTTP server (hyper, port 0) that plays scripted responses in the providers'
//! documented wire formats, recording every request it receives; and the test audio the
//! voice tests feed it ([`spoken`], [`tone_pcm`]).
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

/// Frames buffered between the script and the connection.
const BODY_QUEUE: usize = 16;

/// One step of a scripted response body.
#[derive(Clone)]
pub enum Part {
    Bytes(Vec<u8>),
    /// Server-side pause before the next part.
    Delay(Duration),
    /// Wait until the test notifies.
    Gate(Arc<Notify>),
    /// Never send anything again (a stalled stream).
    Hang,
    /// Record that the script got here (in [`FakeServer::marks`]).
    Mark(&'static str),
}

/// A scripted response.
#[derive(Clone)]
pub struct Canned {
    pub status: u16,
    pub content_type: &'static str,
    pub parts: Vec<Part>,
    /// Never send the response headers.
    pub hang_before_headers: bool,
}

impl Canned {
    pub fn new(status: u16, content_type: &'static str, parts: Vec<Part>) -> Self {
        Self {
            status,
            content_type,
            parts,
            hang_before_headers: false,
        }
    }

    pub fn hang() -> Self {
        Self {
            hang_before_headers: true,
            ..Self::new(200, "text/plain", vec![])
        }
    }

    pub fn json(status: u16, body: &str) -> Self {
        Self::new(
            status,
            "application/json",
            vec![Part::Bytes(body.as_bytes().to_vec())],
        )
    }
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON request body")
    }
}

pub struct FakeServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    marks: Arc<Mutex<Vec<&'static str>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Handler = dyn Fn(&Recorded) -> Canned + Send + Sync;

impl FakeServer {
    /// Serves `handler`'s responses on 127.0.0.1, port 0.
    pub async fn start(handler: impl Fn(&Recorded) -> Canned + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let marks = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (reqs, mks) = (requests.clone(), marks.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Like real provider front ends: without it Nagle holds each small SSE event
                // behind the previous one's delayed ACK (40 ms on Linux).
                let _ = stream.set_nodelay(true);
                let (handler, reqs, mks) = (handler.clone(), reqs.clone(), mks.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (handler, reqs, mks) = (handler.clone(), reqs.clone(), mks.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let rec = Recorded {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                            };
                            let canned = handler(&rec);
                            reqs.lock().unwrap().push(rec);
                            respond(canned, mks).await
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            marks,
            task,
        }
    }

    /// Always the same response.
    pub async fn always(canned: Canned) -> Self {
        Self::start(move |_| canned.clone()).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn marks(&self) -> Vec<&'static str> {
        self.marks.lock().unwrap().clone()
    }
}

type Body = StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

async fn respond(
    canned: Canned,
    marks: Arc<Mutex<Vec<&'static str>>>,
) -> Result<hyper::Response<Body>, Infallible> {
    if canned.hang_before_headers {
        std::future::pending::<()>().await;
    }
    let (tx, rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
    tokio::spawn(async move {
        for part in canned.parts {
            match part {
                Part::Bytes(b) => {
                    if tx.send(Bytes::from(b)).await.is_err() {
                        return;
                    }
                }
                Part::Delay(d) => tokio::time::sleep(d).await,
                Part::Gate(n) => n.notified().await,
                Part::Hang => std::future::pending::<()>().await,
                Part::Mark(m) => marks.lock().unwrap().push(m),
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let b = rx.recv().await?;
        Some((Ok(Frame::data(b)), rx))
    });
    let body: Body = StreamBody::new(Box::pin(stream) as futures::stream::BoxStream<'static, _>);
    let resp = hyper::Response::builder()
        .status(canned.status)
        .header("content-type", canned.content_type)
        .body(body)
        .expect("response");
    Ok(resp)
}

/// One server-sent event.
pub fn sse(event: &str, data: &str) -> Part {
    Part::Bytes(format!("event: {event}\ndata: {data}\n\n").into_bytes())
}

/// One `data:`-only event (OpenAI).
pub fn data(data: &str) -> Part {
    Part::Bytes(format!("data: {data}\n\n").into_bytes())
}

/// An Anthropic text delta.
pub fn anthropic_text(text: &str) -> Part {
    sse(
        "content_block_delta",
        &serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":text}}).to_string(),
    )
}

pub fn anthropic_start(input_tokens: u64) -> Vec<Part> {
    vec![
        sse(
            "message_start",
            &format!(
                r#"{{"type":"message_start","message":{{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-test","stop_reason":null,"usage":{{"input_tokens":{input_tokens},"output_tokens":1}}}}}}"#
            ),
        ),
        sse(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
    ]
}

pub fn anthropic_end(output_tokens: u64) -> Vec<Part> {
    vec![
        sse(
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        sse(
            "message_delta",
            &format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{output_tokens}}}}}"#
            ),
        ),
        sse("message_stop", r#"{"type":"message_stop"}"#),
    ]
}

/// A whole Anthropic reply streaming `texts`.
pub fn anthropic_reply(texts: &[&str]) -> Canned {
    let mut parts = anthropic_start(10);
    parts.extend(texts.iter().map(|t| anthropic_text(t)));
    parts.extend(anthropic_end(7));
    Canned::new(200, "text/event-stream", parts)
}

/// 16-bit little-endian PCM of a tone.
pub fn tone_pcm(rate: u32, secs: f64) -> Vec<u8> {
    let n = (f64::from(rate) * secs) as usize;
    (0..n)
        .flat_map(|i| {
            let v = (8_000.0
                * (2.0 * std::f64::consts::PI * 220.0 * i as f64 / f64::from(rate)).sin())
                as i16;
            v.to_le_bytes()
        })
        .collect()
}

/// PCM split into odd-sized chunks (a sample straddles each boundary).
pub fn chunked(pcm: &[u8], size: usize) -> Vec<Part> {
    pcm.chunks(size).map(|c| Part::Bytes(c.to_vec())).collect()
}

/// A sentence as 16 kHz PCM, spoken by espeak-ng.
pub fn spoken(sentence: &str) -> Vec<i16> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("said.wav");
    let status = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "150", "-w"])
        .arg(&path)
        .arg(sentence)
        .status()
        .expect("espeak-ng is installed (apt-get install espeak-ng)");
    assert!(status.success());
    let (pcm, rate) =
        companion_backend::voice::audio::read_wav(&std::fs::read(&path).unwrap()).unwrap();
    companion_backend::voice::resample::resample(&pcm, rate, 16_000)
}
