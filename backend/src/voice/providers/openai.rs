//! OpenAI: Chat Completions streaming (`stream_options.include_usage`: usage arrives in a
//! final chunk whose `choices` is empty, or `null` on some compatible servers, then
//! `data: [DONE]`), transcription (`/audio/transcriptions`, a multipart WAV upload) and speech
//! (`/audio/speech`, `response_format: pcm`: 24 kHz 16-bit mono, resampled to 16 kHz).

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::http::{join, Http};
use super::sse::{llm_stream, LlmDecoder, SseEvent};
use super::{
    alternating, AudioStream, ChatRequest, LanguageModel, LlmEvent, LlmStream, ProviderError,
    SpeechToText, TextToSpeech, Usage,
};
use crate::personas::Persona;
use crate::secret::Secret;
use crate::voice::audio::{wav_bytes, PcmBytes, SAMPLE_RATE};
use crate::voice::resample::Resampler;

/// The rate of `response_format: pcm`.
pub const SPEECH_PCM_RATE: u32 = 24_000;

/// One OpenAI account (or compatible gateway): chat, transcription and speech.
pub struct OpenAi {
    http: Http,
    base_url: String,
    api_key: Secret,
    pub transcription_model: String,
    pub speech_model: String,
    pub speech_voice: String,
}

impl OpenAi {
    pub fn new(http: Http, base_url: &str, api_key: Secret) -> Self {
        Self {
            http,
            base_url: base_url.to_owned(),
            api_key,
            transcription_model: "whisper-1".into(),
            speech_model: "tts-1".into(),
            speech_voice: "alloy".into(),
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .client()
            .post(join(&self.base_url, path))
            .bearer_auth(self.api_key.expose())
    }
}

#[derive(Deserialize)]
struct ChunkJson {
    #[serde(default)]
    choices: Option<Vec<ChoiceJson>>,
    #[serde(default)]
    usage: Option<UsageJson>,
    #[serde(default)]
    error: Option<ErrorJson>,
}

#[derive(Deserialize)]
struct ChoiceJson {
    #[serde(default)]
    delta: Option<DeltaJson>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaJson {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct UsageJson {
    prompt_tokens: u64,
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct ErrorJson {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    message: String,
}

#[derive(Default)]
struct ChatDecoder {
    usage: Option<Usage>,
    finished: bool,
}

impl ChatDecoder {
    fn data(&mut self, data: &str) -> Result<Option<LlmEvent>, ProviderError> {
        if data.trim() == "[DONE]" {
            return Ok(Some(LlmEvent::Done(self.usage)));
        }
        let chunk: ChunkJson = match serde_json::from_str(data) {
            Ok(c) => c,
            Err(e) => return Ok(Some(LlmEvent::Skipped(format!("chunk: {e}")))),
        };
        if let Some(err) = chunk.error {
            return Err(ProviderError::Api {
                kind: err.kind.unwrap_or_else(|| "error".into()),
                message: err.message,
            });
        }
        if let Some(u) = chunk.usage {
            // Cumulative where servers repeat it: the last one wins.
            self.usage = Some(Usage {
                input_tokens: u.prompt_tokens,
                output_tokens: u.completion_tokens,
            });
        }
        let mut text = String::new();
        for choice in chunk.choices.unwrap_or_default() {
            if let Some(c) = choice.delta.and_then(|d| d.content) {
                text.push_str(&c);
            }
            if choice.finish_reason.is_some() {
                self.finished = true;
            }
        }
        Ok((!text.is_empty()).then_some(LlmEvent::Text(text)))
    }
}

impl LlmDecoder for ChatDecoder {
    fn event(&mut self, ev: &SseEvent) -> Result<Option<LlmEvent>, ProviderError> {
        self.data(&ev.data)
    }

    /// No `[DONE]`: complete if a choice finished (some compatible servers just close).
    fn eof(&mut self) -> Result<LlmEvent, ProviderError> {
        if self.finished {
            Ok(LlmEvent::Done(self.usage))
        } else {
            Err(ProviderError::Malformed(
                "stream ended before [DONE]".into(),
            ))
        }
    }
}

#[async_trait]
impl LanguageModel for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    async fn stream(&self, request: &ChatRequest<'_>) -> Result<LlmStream, ProviderError> {
        let mut messages =
            vec![json!({ "role": "system", "content": request.persona.system_prompt })];
        messages.extend(
            alternating(request.turns)
                .into_iter()
                .map(|t| json!({ "role": t.role.as_str(), "content": t.content })),
        );
        let body = json!({
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        let resp = self
            .http
            .send(|| self.post("/chat/completions").json(&body))
            .await?;
        Ok(llm_stream(
            "openai",
            self.http.chunks(resp),
            ChatDecoder::default(),
        ))
    }
}

#[derive(Deserialize)]
struct TranscriptionJson {
    text: String,
}

#[async_trait]
impl SpeechToText for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    async fn transcribe(&self, pcm: &[i16]) -> Result<String, ProviderError> {
        let wav = Bytes::from(
            wav_bytes(pcm, SAMPLE_RATE).map_err(|e| ProviderError::Audio(e.to_string()))?,
        );
        let resp = self
            .http
            .send(|| {
                let file = reqwest::multipart::Part::stream(wav.clone())
                    .file_name("audio.wav")
                    .mime_str("audio/wav")
                    .unwrap_or_else(|_| reqwest::multipart::Part::stream(wav.clone()));
                let form = reqwest::multipart::Form::new()
                    .text("model", self.transcription_model.clone())
                    .text("response_format", "json")
                    .part("file", file);
                self.post("/audio/transcriptions").multipart(form)
            })
            .await?;
        let body = self.http.body(resp).await?;
        let parsed: TranscriptionJson = serde_json::from_slice(&body)
            .map_err(|e| ProviderError::Malformed(format!("transcription: {e}")))?;
        Ok(parsed.text.trim().to_owned())
    }
}

#[async_trait]
impl TextToSpeech for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn voice(&self, persona: &Persona) -> Option<String> {
        Some(
            persona
                .voices
                .get("openai")
                .cloned()
                .unwrap_or_else(|| self.speech_voice.clone()),
        )
    }

    async fn synthesize(&self, text: &str, voice: &str) -> Result<AudioStream, ProviderError> {
        let body = json!({
            "model": self.speech_model,
            "input": text,
            "voice": voice,
            "response_format": "pcm",
        });
        let resp = self
            .http
            .send(|| self.post("/audio/speech").json(&body))
            .await?;
        Ok(pcm_stream(self.http.chunks(resp), SPEECH_PCM_RATE))
    }
}

/// Raw little-endian 16-bit mono PCM at `rate` in arbitrary chunks → 16 kHz sample chunks.
pub fn pcm_stream(
    chunks: impl Stream<Item = Result<Bytes, ProviderError>> + Send + 'static,
    rate: u32,
) -> AudioStream {
    let state = (
        Box::pin(chunks),
        PcmBytes::default(),
        Resampler::new(rate, SAMPLE_RATE),
        false,
    );
    Box::pin(
        futures::stream::unfold(state, |(mut chunks, mut bytes, mut rs, done)| async move {
            if done {
                return None;
            }
            match chunks.next().await {
                Some(Ok(b)) => {
                    let out = rs.process(&bytes.push(&b));
                    Some((Ok(out), (chunks, bytes, rs, false)))
                }
                Some(Err(e)) => Some((Err(e), (chunks, bytes, rs, true))),
                None => {
                    let tail = rs.finish();
                    Some((Ok(tail), (chunks, bytes, rs, true)))
                }
            }
        })
        .filter(|item| futures::future::ready(!matches!(item, Ok(v) if v.is_empty()))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_arrives_in_a_final_chunk_with_empty_or_null_choices() {
        for choices in ["[]", "null"] {
            let mut d = ChatDecoder::default();
            let a = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}],"usage":null}"#;
            assert_eq!(d.data(a).unwrap(), Some(LlmEvent::Text("Hi".into())));
            let b = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#;
            assert_eq!(d.data(b).unwrap(), None);
            let u = format!(
                r#"{{"choices":{choices},"usage":{{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}}}"#
            );
            assert_eq!(d.data(&u).unwrap(), None);
            assert_eq!(
                d.data("[DONE]").unwrap(),
                Some(LlmEvent::Done(Some(Usage {
                    input_tokens: 9,
                    output_tokens: 3
                })))
            );
        }
    }

    #[test]
    fn an_error_object_in_the_stream_is_an_api_error() {
        let mut d = ChatDecoder::default();
        let e = d
            .data(r#"{"error":{"message":"server overloaded","type":"server_error"}}"#)
            .unwrap_err();
        assert_eq!(e.kind(), "api_error");
        assert!(matches!(
            d.data("{oops").unwrap(),
            Some(LlmEvent::Skipped(_))
        ));
    }
}
