//! Voice metrics on the shared registry. Labels are providers, models and stages; never a
//! device. Counters are registered without `_total` (the encoder adds it).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::providers::Usage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmRequestLabels {
    pub provider: &'static str,
    pub model: String,
    /// `ok`, `error`, `timeout` or `cancelled`.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmModelLabels {
    pub provider: &'static str,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: &'static str,
    /// `input` or `output`.
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: Stage,
}

/// A timed step of a conversation turn.
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum Stage {
    /// Speech-to-text of one utterance.
    stt,
    /// Language model request sent → first text.
    llm_first_token,
    /// Speech request sent → first audio.
    tts_first_audio,
    /// End of speech → first audio chunk leaves for the device (observed by the session
    /// layer through [`crate::voice::Pipeline::observe_end_of_speech_to_first_audio`]).
    end_of_speech_to_first_audio,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderErrorLabels {
    pub provider: &'static str,
    pub kind: &'static str,
}

/// The voice pipeline's metric families.
#[derive(Clone, Debug)]
pub struct VoiceMetrics {
    llm_requests: Family<LlmRequestLabels, Counter>,
    llm_latency: Family<LlmModelLabels, Histogram>,
    llm_tokens: Family<TokenLabels, Counter>,
    stages: Family<StageLabels, Histogram>,
    provider_errors: Family<ProviderErrorLabels, Counter>,
}

impl VoiceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let llm_requests = Family::<LlmRequestLabels, Counter>::default();
        let llm_latency = Family::<LlmModelLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 10))
        });
        let llm_tokens = Family::<TokenLabels, Counter>::default();
        let stages = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let provider_errors = Family::<ProviderErrorLabels, Counter>::default();
        registry.register(
            "llm_requests",
            "Language model requests by provider, model and outcome",
            llm_requests.clone(),
        );
        registry.register(
            "llm_request_latency_seconds",
            "Language model request duration, start to end of stream",
            llm_latency.clone(),
        );
        registry.register(
            "llm_tokens",
            "Language model tokens by provider and type (input, output), as reported",
            llm_tokens.clone(),
        );
        registry.register(
            "voice_stage_seconds",
            "Duration of voice stages: stt, llm_first_token, tts_first_audio, end_of_speech_to_first_audio",
            stages.clone(),
        );
        registry.register(
            "voice_provider_errors",
            "Speech and language provider failures by provider and kind",
            provider_errors.clone(),
        );
        Self {
            llm_requests,
            llm_latency,
            llm_tokens,
            stages,
            provider_errors,
        }
    }

    /// Creates the known series at zero (prometheus-client prints nothing for a labelled
    /// family until a series exists): every stage, and requests/latency/tokens for the
    /// configured models.
    pub fn prime(&self, models: &[(&'static str, String)]) {
        for stage in [
            Stage::stt,
            Stage::llm_first_token,
            Stage::tts_first_audio,
            Stage::end_of_speech_to_first_audio,
        ] {
            let _ = self.stages.get_or_create(&StageLabels { stage });
        }
        for (provider, model) in models {
            let _ = self.llm_requests.get_or_create(&LlmRequestLabels {
                provider,
                model: model.clone(),
                status: "ok",
            });
            let _ = self.llm_latency.get_or_create(&LlmModelLabels {
                provider,
                model: model.clone(),
            });
            for r#type in ["input", "output"] {
                let _ = self
                    .llm_tokens
                    .get_or_create(&TokenLabels { provider, r#type });
            }
        }
    }

    pub fn llm_request(
        &self,
        provider: &'static str,
        model: &str,
        status: &'static str,
        took: Duration,
    ) {
        self.llm_requests
            .get_or_create(&LlmRequestLabels {
                provider,
                model: model.to_owned(),
                status,
            })
            .inc();
        self.llm_latency
            .get_or_create(&LlmModelLabels {
                provider,
                model: model.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn tokens(&self, provider: &'static str, usage: Usage) {
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            self.llm_tokens
                .get_or_create(&TokenLabels {
                    provider,
                    r#type: kind,
                })
                .inc_by(n);
        }
    }

    pub fn stage(&self, stage: Stage, took: Duration) {
        self.stages
            .get_or_create(&StageLabels { stage })
            .observe(took.as_secs_f64());
    }

    pub fn provider_error(&self, provider: &'static str, kind: &'static str) {
        self.provider_errors
            .get_or_create(&ProviderErrorLabels { provider, kind })
            .inc();
    }
}
