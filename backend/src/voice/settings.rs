//! The `[voice]` configuration section: providers, keys, base URLs, timeouts, audio.
//!
//! API keys come from here or, when unset, from `ANTHROPIC_API_KEY`, `OPENAI_API_KEY` and
//! `ELEVENLABS_API_KEY` (read by [`crate::voice::Pipeline::new`]). A provider without a key is
//! not used: the offline engines take its place.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::VoiceError;
use crate::secret::Secret;

/// Which language model answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmChoice {
    /// Each persona's own `llm` (provider and model).
    #[default]
    Persona,
    Anthropic,
    Openai,
    /// The persona's scripted replies.
    Offline,
}

/// Which speech-to-text engine transcribes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SttChoice {
    /// OpenAI when it has a key, else pocketsphinx.
    #[default]
    Auto,
    Openai,
    Offline,
}

/// Which text-to-speech engine speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TtsChoice {
    /// ElevenLabs when it has a key, else OpenAI when it has one, else espeak-ng.
    #[default]
    Auto,
    Elevenlabs,
    Openai,
    Offline,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VoiceSettings {
    pub llm_provider: LlmChoice,
    pub stt_provider: SttChoice,
    pub tts_provider: TtsChoice,
    pub anthropic: AnthropicSettings,
    pub openai: OpenAiSettings,
    pub elevenlabs: ElevenLabsSettings,
    pub offline: OfflineSettings,
    /// TCP + TLS connect timeout for provider requests.
    pub connect_timeout_ms: u64,
    /// Until the response headers arrive (streams), or the whole exchange (transcription).
    pub request_timeout_ms: u64,
    /// Longest gap between two pieces of a streamed response.
    pub stream_idle_timeout_ms: u64,
    /// Extra attempts for requests that are safe to retry (connect failures, 429/502/503/504/529
    /// before any of the response was used).
    pub max_retries: u32,
    /// Outgoing Opus bitrate in bits per second.
    pub opus_bitrate: u32,
    /// Silence after speech that ends an utterance.
    pub vad_silence_ms: u32,
    /// Voice activity score (0..1) above which a 16 ms window counts as speech.
    pub vad_threshold: f32,
    /// Most history turns sent to a language model.
    pub max_history_turns: usize,
    /// `max_tokens` for a reply.
    pub max_reply_tokens: u32,
}

impl Default for VoiceSettings {
    fn default() -> Self {
        Self {
            llm_provider: LlmChoice::default(),
            stt_provider: SttChoice::default(),
            tts_provider: TtsChoice::default(),
            anthropic: AnthropicSettings::default(),
            openai: OpenAiSettings::default(),
            elevenlabs: ElevenLabsSettings::default(),
            offline: OfflineSettings::default(),
            connect_timeout_ms: 3_000,
            request_timeout_ms: 10_000,
            stream_idle_timeout_ms: 10_000,
            max_retries: 1,
            opus_bitrate: 24_000,
            vad_silence_ms: 500,
            vad_threshold: 0.5,
            max_history_turns: 20,
            max_reply_tokens: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnthropicSettings {
    pub api_key: Option<Secret>,
    /// Without `/v1` (the Anthropic SDKs' convention).
    pub base_url: String,
    /// Used when `llm_provider = "anthropic"` overrides a persona of another provider.
    pub model: String,
    /// The `anthropic-version` header.
    pub version: String,
}

impl Default for AnthropicSettings {
    fn default() -> Self {
        Self {
            api_key: None,
            base_url: "https://api.anthropic.com".into(),
            model: "claude-3-5-haiku-latest".into(),
            version: "2023-06-01".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiSettings {
    pub api_key: Option<Secret>,
    /// With `/v1` (the OpenAI SDKs' convention; compatible gateways differ here).
    pub base_url: String,
    /// Used when `llm_provider = "openai"` overrides a persona of another provider.
    pub chat_model: String,
    pub transcription_model: String,
    pub speech_model: String,
    /// The speech voice for personas without a `voices.openai`.
    pub speech_voice: String,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            api_key: None,
            base_url: "https://api.openai.com/v1".into(),
            chat_model: "gpt-4o-mini".into(),
            transcription_model: "whisper-1".into(),
            speech_model: "tts-1".into(),
            speech_voice: "alloy".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ElevenLabsSettings {
    pub api_key: Option<Secret>,
    pub base_url: String,
    pub model_id: String,
}

impl Default for ElevenLabsSettings {
    fn default() -> Self {
        Self {
            api_key: None,
            base_url: "https://api.elevenlabs.io".into(),
            model_id: "eleven_flash_v2_5".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OfflineSettings {
    pub espeak_ng: PathBuf,
    pub pocketsphinx: PathBuf,
    /// Holds `en-us/` (acoustic model), `en-us.lm.bin` and `cmudict-en-us.dict`.
    pub pocketsphinx_model_dir: PathBuf,
    /// Longest an offline engine may run for one request.
    pub timeout_ms: u64,
}

impl Default for OfflineSettings {
    fn default() -> Self {
        Self {
            espeak_ng: "espeak-ng".into(),
            pocketsphinx: "pocketsphinx_continuous".into(),
            pocketsphinx_model_dir: "/usr/share/pocketsphinx/model/en-us".into(),
            timeout_ms: 30_000,
        }
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> VoiceError {
    VoiceError::Config {
        key,
        message: message.into(),
    }
}

impl VoiceSettings {
    /// Checks everything that can be checked without I/O.
    pub fn validate(&self) -> Result<(), VoiceError> {
        if !(6_000..=510_000).contains(&self.opus_bitrate) {
            return Err(invalid("opus_bitrate", "must be between 6000 and 510000"));
        }
        if !(100..=10_000).contains(&self.vad_silence_ms) {
            return Err(invalid("vad_silence_ms", "must be between 100 and 10000"));
        }
        if !(0.0..1.0).contains(&self.vad_threshold) {
            return Err(invalid("vad_threshold", "must be in [0, 1)"));
        }
        for (key, ms) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("stream_idle_timeout_ms", self.stream_idle_timeout_ms),
            ("offline.timeout_ms", self.offline.timeout_ms),
        ] {
            if ms == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_retries > 5 {
            return Err(invalid("max_retries", "must be at most 5"));
        }
        for (key, url) in [
            ("anthropic.base_url", &self.anthropic.base_url),
            ("openai.base_url", &self.openai.base_url),
            ("elevenlabs.base_url", &self.elevenlabs.base_url),
        ] {
            if reqwest::Url::parse(url).is_err() {
                return Err(invalid(key, format!("{url:?} is not a URL")));
            }
        }
        Ok(())
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.stream_idle_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_keys_do_not_print() {
        let mut s = VoiceSettings::default();
        s.validate().unwrap();
        s.anthropic.api_key = Some(Secret::new("sk-ant-very-secret"));
        assert!(!format!("{s:?}").contains("very-secret"));
    }

    #[test]
    fn a_voice_section_parses_from_toml_and_rejects_unknown_keys() {
        let s: VoiceSettings = toml::from_str(
            "llm_provider = \"offline\"\nvad_silence_ms = 700\n[openai]\nbase_url = \"http://127.0.0.1:9/v1\"\n",
        )
        .unwrap();
        assert_eq!(s.llm_provider, LlmChoice::Offline);
        assert_eq!(s.vad_silence_ms, 700);
        assert_eq!(s.openai.base_url, "http://127.0.0.1:9/v1");
        assert!(toml::from_str::<VoiceSettings>("vad_silence = 3").is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        let s = VoiceSettings {
            opus_bitrate: 10,
            ..VoiceSettings::default()
        };
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("opus_bitrate"));
    }
}
