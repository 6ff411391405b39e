//! ElevenLabs streaming speech: `POST {base}/v1/text-to-speech/{voice_id}/stream
//! ?output_format=pcm_16000` with the `xi-api-key` header; the body is raw 16 kHz 16-bit mono
//! PCM in chunks.

use async_trait::async_trait;
use serde_json::json;

use super::http::{join, Http};
use super::openai::pcm_stream;
use super::{AudioStream, ProviderError, TextToSpeech};
use crate::personas::Persona;
use crate::secret::Secret;
use crate::voice::audio::SAMPLE_RATE;

pub struct ElevenLabs {
    http: Http,
    base_url: String,
    api_key: Secret,
    model_id: String,
}

impl ElevenLabs {
    pub fn new(http: Http, base_url: &str, api_key: Secret, model_id: &str) -> Self {
        Self {
            http,
            base_url: base_url.to_owned(),
            api_key,
            model_id: model_id.to_owned(),
        }
    }
}

#[async_trait]
impl TextToSpeech for ElevenLabs {
    fn name(&self) -> &'static str {
        "elevenlabs"
    }

    /// Only personas with a `voices.elevenlabs` id.
    fn voice(&self, persona: &Persona) -> Option<String> {
        persona.voices.get("elevenlabs").cloned()
    }

    async fn synthesize(&self, text: &str, voice: &str) -> Result<AudioStream, ProviderError> {
        let voice: String = voice
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        let url = join(
            &self.base_url,
            &format!("/v1/text-to-speech/{voice}/stream?output_format=pcm_16000"),
        );
        let body = json!({ "text": text, "model_id": self.model_id });
        let resp = self
            .http
            .send(|| {
                self.http
                    .client()
                    .post(&url)
                    .header("xi-api-key", self.api_key.expose())
                    .json(&body)
            })
            .await?;
        Ok(pcm_stream(self.http.chunks(resp), SAMPLE_RATE))
    }
}
