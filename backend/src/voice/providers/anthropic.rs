//! Anthropic Messages API, streamed: `POST {base}/v1/messages` with `stream: true`; the
//! reply arrives as server-sent events `message_start` (input usage), `content_block_delta`
//! (`text_delta`), `message_delta` (cumulative usage: the last value wins), `message_stop`,
//! `ping` and, mid-stream, `error` (e.g. `overloaded_error`). Other events are ignored.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::http::{join, Http};
use super::sse::{llm_stream, LlmDecoder, SseEvent};
use super::{alternating, ChatRequest, LanguageModel, LlmEvent, LlmStream, ProviderError, Usage};
use crate::secret::Secret;

pub struct Anthropic {
    http: Http,
    base_url: String,
    api_key: Secret,
    version: String,
}

impl Anthropic {
    pub fn new(http: Http, base_url: &str, api_key: Secret, version: &str) -> Self {
        Self {
            http,
            base_url: base_url.to_owned(),
            api_key,
            version: version.to_owned(),
        }
    }
}

#[derive(Deserialize)]
struct UsageJson {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: MessageJson,
    },
    ContentBlockDelta {
        delta: DeltaJson,
    },
    MessageDelta {
        usage: Option<UsageJson>,
    },
    MessageStop,
    Ping,
    Error {
        error: ErrorJson,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageJson {
    usage: Option<UsageJson>,
}

#[derive(Deserialize)]
struct DeltaJson {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct ErrorJson {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Folds events into [`LlmEvent`]s, keeping the usage state.
#[derive(Default)]
struct Decoder {
    usage: Option<Usage>,
    done: bool,
}

impl LlmDecoder for Decoder {
    fn event(&mut self, sse: &SseEvent) -> Result<Option<LlmEvent>, ProviderError> {
        let parsed: Event = match serde_json::from_str(&sse.data) {
            Ok(e) => e,
            Err(e) => {
                if sse.event == "error" {
                    return Err(ProviderError::Api {
                        kind: "error".into(),
                        message: sse.data.chars().take(200).collect(),
                    });
                }
                return Ok(Some(LlmEvent::Skipped(format!(
                    "event {:?}: {e}",
                    sse.event
                ))));
            }
        };
        Ok(match parsed {
            Event::MessageStart { message } => {
                if let Some(u) = message.usage {
                    self.merge(u);
                }
                None
            }
            Event::ContentBlockDelta { delta } if delta.kind == "text_delta" => {
                (!delta.text.is_empty()).then_some(LlmEvent::Text(delta.text))
            }
            Event::ContentBlockDelta { .. } => None,
            Event::MessageDelta { usage } => {
                if let Some(u) = usage {
                    self.merge(u);
                }
                None
            }
            Event::MessageStop => {
                self.done = true;
                Some(LlmEvent::Done(self.usage))
            }
            Event::Ping | Event::Other => None,
            Event::Error { error } => {
                return Err(ProviderError::Api {
                    kind: error.kind,
                    message: error.message,
                })
            }
        })
    }

    fn eof(&mut self) -> Result<LlmEvent, ProviderError> {
        // `message_stop` would have ended the stream with `Done` already.
        Err(ProviderError::Malformed(
            "stream ended before message_stop".into(),
        ))
    }
}

impl Decoder {
    /// Usage figures are cumulative: each one replaces the last.
    fn merge(&mut self, u: UsageJson) {
        let cur = self.usage.get_or_insert_with(Usage::default);
        if let Some(i) = u.input_tokens {
            cur.input_tokens = i;
        }
        if let Some(o) = u.output_tokens {
            cur.output_tokens = o;
        }
    }
}

#[async_trait]
impl LanguageModel for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    async fn stream(&self, request: &ChatRequest<'_>) -> Result<LlmStream, ProviderError> {
        let messages: Vec<_> = alternating(request.turns)
            .into_iter()
            .map(|t| json!({ "role": t.role.as_str(), "content": t.content }))
            .collect();
        let body = json!({
            "model": request.model,
            "max_tokens": request.max_tokens,
            "system": request.persona.system_prompt,
            "messages": messages,
            "stream": true,
        });
        let url = join(&self.base_url, "/v1/messages");
        let resp = self
            .http
            .send(|| {
                self.http
                    .client()
                    .post(&url)
                    .header("x-api-key", self.api_key.expose())
                    .header("anthropic-version", &self.version)
                    .header("accept", "text/event-stream")
                    .json(&body)
            })
            .await?;
        Ok(llm_stream(
            "anthropic",
            self.http.chunks(resp),
            Decoder::default(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn usage_is_the_last_cumulative_value_not_a_sum() {
        let mut d = Decoder::default();
        let start = r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"output_tokens":1}}}"#;
        assert_eq!(d.event(&ev("message_start", start)).unwrap(), None);
        let delta =
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#;
        assert_eq!(
            d.event(&ev("content_block_delta", delta)).unwrap(),
            Some(LlmEvent::Text("Hi".into()))
        );
        for n in [5, 12] {
            let md = format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":null}},"usage":{{"output_tokens":{n}}}}}"#
            );
            d.event(&ev("message_delta", &md)).unwrap();
        }
        assert_eq!(
            d.event(&ev("message_stop", r#"{"type":"message_stop"}"#))
                .unwrap(),
            Some(LlmEvent::Done(Some(Usage {
                input_tokens: 25,
                output_tokens: 12
            })))
        );
    }

    #[test]
    fn unknown_events_and_pings_are_ignored_and_errors_surface() {
        let mut d = Decoder::default();
        assert_eq!(d.event(&ev("ping", r#"{"type":"ping"}"#)).unwrap(), None);
        assert_eq!(
            d.event(&ev("future_thing", r#"{"type":"future_thing","x":1}"#))
                .unwrap(),
            None
        );
        let err = d
            .event(&ev(
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ))
            .unwrap_err();
        assert_eq!(err.to_string(), "overloaded_error: Overloaded");
        assert!(matches!(
            d.event(&ev("content_block_delta", "{not json")).unwrap(),
            Some(LlmEvent::Skipped(_))
        ));
    }
}
