//! Server-sent events (the WHATWG `text/event-stream` format) parsed incrementally from
//! arbitrary byte chunks.

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::{LlmEvent, LlmStream, ProviderError};

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:`; empty when absent (the spec's default type is "message").
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// An incremental parser: feed bytes, take complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
    /// The previous byte was `\r` (a following `\n` belongs to the same line end).
    after_cr: bool,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out);
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line.starts_with(':') {
            return; // comment
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // id, retry, unknown fields
        }
    }
}

/// A provider's event decoder for [`llm_stream`].
pub trait LlmDecoder: Send + 'static {
    /// One event: an item to emit, nothing, or an error (which ends the stream). An emitted
    /// `Done` ends the stream too.
    fn event(&mut self, ev: &SseEvent) -> Result<Option<LlmEvent>, ProviderError>;
    /// The body ended before any `Done`: the last item, `Done` when the reply was complete
    /// after all, an error when it was cut short.
    fn eof(&mut self) -> Result<LlmEvent, ProviderError>;
}

/// Turns a streaming response body into [`LlmEvent`]s with `decoder`; ends after the first
/// `Done` or error.
pub fn llm_stream<D: LlmDecoder>(
    provider: &'static str,
    chunks: impl Stream<Item = Result<Bytes, ProviderError>> + Send + 'static,
    decoder: D,
) -> LlmStream {
    struct State<D> {
        chunks: Pin<Box<dyn Stream<Item = Result<Bytes, ProviderError>> + Send>>,
        parser: SseParser,
        decoder: D,
        queue: VecDeque<Result<LlmEvent, ProviderError>>,
        ended: bool,
    }
    let state = State {
        chunks: Box::pin(chunks),
        parser: SseParser::default(),
        decoder,
        queue: VecDeque::new(),
        ended: false,
    };
    Box::pin(futures::stream::unfold(state, move |mut st| async move {
        loop {
            if let Some(item) = st.queue.pop_front() {
                if item.is_err() || matches!(item, Ok(LlmEvent::Done(_))) {
                    st.ended = true;
                    st.queue.clear();
                }
                return Some((item, st));
            }
            if st.ended {
                return None;
            }
            match st.chunks.next().await {
                Some(Ok(bytes)) => {
                    for ev in st.parser.push(&bytes) {
                        tracing::debug!(provider, event = %ev.event, "llm stream event");
                        if let Some(item) = st.decoder.event(&ev).transpose() {
                            st.queue.push_back(item);
                        }
                    }
                }
                Some(Err(e)) => st.queue.push_back(Err(e)),
                None => {
                    let last = st.decoder.eof();
                    st.queue.push_back(last);
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_line_endings_parse() {
        let text =
            "event: ping\r\ndata: {}\r\n\r\n: comment\n\nevent: a\ndata: x\ndata: y\n\ndata:z\r\r";
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(3) {
            out.extend(p.push(chunk));
        }
        assert_eq!(
            out,
            [
                SseEvent {
                    event: "ping".into(),
                    data: "{}".into()
                },
                SseEvent {
                    event: "a".into(),
                    data: "x\ny".into()
                },
                SseEvent {
                    event: "".into(),
                    data: "z".into()
                },
            ]
        );
    }

    #[test]
    fn multibyte_text_split_mid_character_survives() {
        let text = "data: café ☕\n\n".as_bytes();
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for chunk in text.chunks(1) {
            out.extend(p.push(chunk));
        }
        assert_eq!(out[0].data, "café ☕");
    }
}
