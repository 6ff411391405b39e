//! [`Pipeline`]: the [`VoicePipeline`] the session layer calls. A reply runs two halves
//! concurrently in the caller's task: the language model's token stream is cut into
//! sentences (bounded queue of [`SENTENCE_QUEUE`]), and a [`Speaker`] speaks each sentence as
//! soon as it is complete, so the first audio leaves before the model has finished.
//! Cancelling the token drops both halves at once: HTTP streams close, child processes die.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::audio::OpusUplink;
use super::metrics::{Stage, VoiceMetrics};
use super::providers::anthropic::Anthropic;
use super::providers::elevenlabs::ElevenLabs;
use super::providers::http::Http;
use super::providers::offline::{Espeak, Pocketsphinx, Scripted};
use super::providers::openai::OpenAi;
use super::providers::{
    ChatRequest, LanguageModel, LlmEvent, ProviderError, SpeechToText, TextToSpeech,
};
use super::sentences::SentenceSplitter;
use super::settings::{LlmChoice, SttChoice, TtsChoice, VoiceSettings};
use super::speaker::Speaker;
use super::{ChatTurn, Reply, Role, UplinkAudio, VoiceError, VoiceOutput, VoicePipeline};
use crate::personas::Persona;
use crate::secret::Secret;

/// Sentences written by the language model and not yet spoken.
pub const SENTENCE_QUEUE: usize = 8;

/// The engines a [`Pipeline`] chooses from. Cloud entries are `None` without a key.
#[derive(Clone)]
pub struct Providers {
    pub anthropic: Option<Arc<dyn LanguageModel>>,
    pub openai: Option<Arc<dyn LanguageModel>>,
    pub offline_llm: Arc<dyn LanguageModel>,
    pub stt: Option<Arc<dyn SpeechToText>>,
    pub offline_stt: Arc<dyn SpeechToText>,
    /// Cloud voices in order of preference; the first with a voice for the persona speaks.
    pub tts: Vec<Arc<dyn TextToSpeech>>,
    pub offline_tts: Arc<dyn TextToSpeech>,
}

impl Providers {
    /// The configured providers; keys from `settings`, else from `env` (the deployment
    /// guide's `ANTHROPIC_API_KEY`, `OPENAI_API_KEY`, `ELEVENLABS_API_KEY`).
    pub fn from_settings(
        settings: &VoiceSettings,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, VoiceError> {
        let http = Http::new(settings).map_err(|e| VoiceError::Provider {
            provider: "http",
            message: e.to_string(),
        })?;
        let key = |configured: &Option<Secret>, var: &str| {
            configured
                .clone()
                .filter(|k| !k.expose().trim().is_empty())
                .or_else(|| env(var).filter(|k| !k.trim().is_empty()).map(Secret::new))
        };
        let anthropic = key(&settings.anthropic.api_key, "ANTHROPIC_API_KEY").map(|k| {
            Arc::new(Anthropic::new(
                http.clone(),
                &settings.anthropic.base_url,
                k,
                &settings.anthropic.version,
            )) as Arc<dyn LanguageModel>
        });
        let openai = key(&settings.openai.api_key, "OPENAI_API_KEY").map(|k| {
            let mut o = OpenAi::new(http.clone(), &settings.openai.base_url, k);
            o.transcription_model = settings.openai.transcription_model.clone();
            o.speech_model = settings.openai.speech_model.clone();
            o.speech_voice = settings.openai.speech_voice.clone();
            Arc::new(o)
        });
        let elevenlabs = key(&settings.elevenlabs.api_key, "ELEVENLABS_API_KEY").map(|k| {
            Arc::new(ElevenLabs::new(
                http.clone(),
                &settings.elevenlabs.base_url,
                k,
                &settings.elevenlabs.model_id,
            )) as Arc<dyn TextToSpeech>
        });
        let openai_tts = openai.clone().map(|o| o as Arc<dyn TextToSpeech>);
        let tts = match settings.tts_provider {
            TtsChoice::Auto => elevenlabs.into_iter().chain(openai_tts).collect(),
            TtsChoice::Elevenlabs => elevenlabs.into_iter().collect(),
            TtsChoice::Openai => openai_tts.into_iter().collect(),
            TtsChoice::Offline => Vec::new(),
        };
        let stt = match settings.stt_provider {
            SttChoice::Auto | SttChoice::Openai => {
                openai.clone().map(|o| o as Arc<dyn SpeechToText>)
            }
            SttChoice::Offline => None,
        };
        Ok(Self {
            anthropic,
            openai: openai.map(|o| o as Arc<dyn LanguageModel>),
            offline_llm: Arc::new(Scripted),
            stt,
            offline_stt: Arc::new(Pocketsphinx::new(&settings.offline)),
            tts,
            offline_tts: Arc::new(Espeak::new(&settings.offline)),
        })
    }
}

/// Speech in, persona answer out (see the module docs).
pub struct Pipeline {
    settings: VoiceSettings,
    providers: Providers,
    metrics: VoiceMetrics,
    /// Picks the next fallback line.
    fallbacks: AtomicUsize,
}

impl Pipeline {
    /// The configured pipeline; API keys from settings or the process environment.
    pub fn new(settings: &VoiceSettings, registry: &mut Registry) -> Result<Arc<Self>, VoiceError> {
        Self::with_env(settings, registry, |var| std::env::var(var).ok())
    }

    /// Like [`Pipeline::new`] with an explicit environment (tests pass `|_| None`).
    pub fn with_env(
        settings: &VoiceSettings,
        registry: &mut Registry,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Arc<Self>, VoiceError> {
        settings.validate()?;
        let providers = Providers::from_settings(settings, env)?;
        Ok(Self::with_providers(settings, registry, providers))
    }

    /// A pipeline over the given engines (in-process fakes for tests and benches).
    pub fn with_providers(
        settings: &VoiceSettings,
        registry: &mut Registry,
        providers: Providers,
    ) -> Arc<Self> {
        info!(
            anthropic = providers.anthropic.is_some(),
            openai = providers.openai.is_some(),
            stt = providers.stt.as_ref().map_or("offline", |s| s.name()),
            tts = ?providers.tts.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "voice providers"
        );
        let metrics = VoiceMetrics::register(registry);
        metrics.prime(&[
            ("anthropic", settings.anthropic.model.clone()),
            ("openai", settings.openai.chat_model.clone()),
        ]);
        Arc::new(Self {
            settings: settings.clone(),
            providers,
            metrics,
            fallbacks: AtomicUsize::new(0),
        })
    }

    pub fn metrics(&self) -> &VoiceMetrics {
        &self.metrics
    }

    /// The language model and model name that answer as `persona`.
    fn llm_for<'p>(&'p self, persona: &'p Persona) -> (Arc<dyn LanguageModel>, &'p str) {
        let s = &self.settings;
        let (provider, model) = match s.llm_provider {
            LlmChoice::Persona => (persona.llm.provider.as_str(), persona.llm.model.as_str()),
            LlmChoice::Anthropic if persona.llm.provider == "anthropic" => {
                ("anthropic", persona.llm.model.as_str())
            }
            LlmChoice::Anthropic => ("anthropic", s.anthropic.model.as_str()),
            LlmChoice::Openai if persona.llm.provider == "openai" => {
                ("openai", persona.llm.model.as_str())
            }
            LlmChoice::Openai => ("openai", s.openai.chat_model.as_str()),
            LlmChoice::Offline => ("offline", "scripted"),
        };
        let cloud = match provider {
            "anthropic" => self.providers.anthropic.clone(),
            "openai" => self.providers.openai.clone(),
            _ => None,
        };
        match cloud {
            Some(llm) => (llm, model),
            None => (self.providers.offline_llm.clone(), "scripted"),
        }
    }

    fn speaker<'a>(
        &'a self,
        persona: &Persona,
        out: &'a mpsc::Sender<VoiceOutput>,
    ) -> Result<Speaker<'a>, VoiceError> {
        let engine = self
            .providers
            .tts
            .iter()
            .find_map(|t| t.voice(persona).map(|v| (t.clone(), v)));
        let offline = (self.providers.offline_tts.clone(), persona.voice.clone());
        Speaker::new(
            &self.metrics,
            out,
            engine,
            offline,
            self.settings.opus_bitrate,
        )
    }

    fn next_fallback<'p>(&self, persona: &'p Persona) -> &'p str {
        persona.fallback_reply(self.fallbacks.fetch_add(1, Ordering::Relaxed))
    }

    async fn transcribe_inner(&self, pcm: &[i16]) -> Result<String, VoiceError> {
        let started = Instant::now();
        if let Some(stt) = &self.providers.stt {
            match stt.transcribe(pcm).await {
                Ok(text) => {
                    self.metrics.stage(Stage::stt, started.elapsed());
                    return Ok(text);
                }
                Err(e) => {
                    warn!(provider = stt.name(), error = %e, "transcription failed; using pocketsphinx");
                    self.metrics.provider_error(stt.name(), e.kind());
                }
            }
        }
        let offline = &self.providers.offline_stt;
        match offline.transcribe(pcm).await {
            Ok(text) => {
                self.metrics.stage(Stage::stt, started.elapsed());
                Ok(text)
            }
            Err(e) => {
                self.metrics.provider_error(offline.name(), e.kind());
                Err(VoiceError::Provider {
                    provider: offline.name(),
                    message: e.to_string(),
                })
            }
        }
    }

    async fn respond_inner(
        &self,
        persona: &Persona,
        history: &[ChatTurn],
        user_text: &str,
        out: &mpsc::Sender<VoiceOutput>,
    ) -> Result<Reply, VoiceError> {
        let skip = history
            .len()
            .saturating_sub(self.settings.max_history_turns);
        let mut turns: Vec<ChatTurn> = history[skip..].to_vec();
        turns.push(ChatTurn {
            role: Role::User,
            content: user_text.to_owned(),
        });
        let (llm, model) = self.llm_for(persona);
        let request = ChatRequest {
            persona,
            model,
            turns: &turns,
            max_tokens: self.settings.max_reply_tokens,
        };
        let mut speaker = self.speaker(persona, out)?;
        let (tx, rx) = mpsc::channel(SENTENCE_QUEUE);
        let (llm_result, spoken) = tokio::join!(
            self.produce(llm.as_ref(), &request, tx),
            speaker.speak_all(rx)
        );
        spoken?;
        let mut degraded = speaker.degraded.take();
        let failure = match llm_result {
            Err(e) => Some(format!("{}: {e}", llm.name())),
            Ok(()) if speaker.spoken.is_empty() => Some(format!("{}: empty reply", llm.name())),
            Ok(()) => None,
        };
        if let Some(failure) = failure {
            // Never leave the device in silence: the scripted line in the offline voice.
            for sentence in split(self.next_fallback(persona)) {
                speaker.say_offline(&sentence).await?;
            }
            degraded = Some(failure);
        }
        Ok(Reply {
            text: speaker.spoken.join(" "),
            degraded,
        })
    }

    /// Streams the reply into sentences on `tx`; records the request's metrics.
    async fn produce(
        &self,
        llm: &dyn LanguageModel,
        request: &ChatRequest<'_>,
        tx: mpsc::Sender<String>,
    ) -> Result<(), ProviderError> {
        let mut call = LlmCall::start(&self.metrics, llm.name(), request.model);
        let result = async {
            let mut stream = llm.stream(request).await?;
            let mut splitter = SentenceSplitter::default();
            let mut first = true;
            while let Some(item) = stream.next().await {
                match item? {
                    LlmEvent::Text(text) => {
                        if first {
                            self.metrics
                                .stage(Stage::llm_first_token, call.started.elapsed());
                            first = false;
                        }
                        for sentence in splitter.push(&text) {
                            if tx.send(sentence).await.is_err() {
                                return Ok(false);
                            }
                        }
                    }
                    LlmEvent::Skipped(why) => {
                        warn!(provider = llm.name(), why = %why, "skipped a malformed stream item");
                        self.metrics.provider_error(llm.name(), "malformed");
                    }
                    LlmEvent::Done(usage) => {
                        if let Some(usage) = usage {
                            self.metrics.tokens(llm.name(), usage);
                        }
                        break;
                    }
                }
            }
            if let Some(rest) = splitter.finish() {
                if tx.send(rest).await.is_err() {
                    return Ok(false);
                }
            }
            Ok::<bool, ProviderError>(true)
        }
        .await;
        match result {
            Ok(true) => call.finish("ok"),
            Ok(false) => call.finish("cancelled"),
            Err(ref e) => {
                warn!(provider = llm.name(), error = %e, "language model failed");
                self.metrics.provider_error(llm.name(), e.kind());
                call.finish(if matches!(e, ProviderError::Timeout(_)) {
                    "timeout"
                } else {
                    "error"
                });
            }
        }
        result.map(|_| ())
    }
}

/// Records one language model request exactly once; dropped unfinished (the reply was
/// cancelled), it records `cancelled`.
struct LlmCall<'a> {
    metrics: &'a VoiceMetrics,
    provider: &'static str,
    model: &'a str,
    started: Instant,
    finished: bool,
}

impl<'a> LlmCall<'a> {
    fn start(metrics: &'a VoiceMetrics, provider: &'static str, model: &'a str) -> Self {
        Self {
            metrics,
            provider,
            model,
            started: Instant::now(),
            finished: false,
        }
    }

    fn finish(&mut self, status: &'static str) {
        if !self.finished {
            self.finished = true;
            self.metrics
                .llm_request(self.provider, self.model, status, self.started.elapsed());
        }
    }
}

impl Drop for LlmCall<'_> {
    fn drop(&mut self) {
        self.finish("cancelled");
    }
}

/// Runs `work` unless `cancel` fires first; then `work` is dropped (and everything in it).
async fn cancellable<T>(
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = Result<T, VoiceError>>,
) -> Result<T, VoiceError> {
    if cancel.is_cancelled() {
        return Err(VoiceError::Cancelled);
    }
    // Cases: the token is cancelled (checked first), or the work finishes.
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(VoiceError::Cancelled),
        r = work => r,
    }
}

#[async_trait]
impl VoicePipeline for Pipeline {
    fn uplink(&self) -> Box<dyn UplinkAudio> {
        match OpusUplink::new(self.settings.vad_silence_ms, self.settings.vad_threshold) {
            Ok(u) => Box::new(u),
            Err(e) => {
                // libopus refuses only invalid rates/channels, which are constants here.
                warn!(error = %e, "cannot create an Opus decoder");
                Box::new(BrokenUplink(e.to_string()))
            }
        }
    }

    async fn transcribe(
        &self,
        pcm: &[i16],
        cancel: &CancellationToken,
    ) -> Result<String, VoiceError> {
        cancellable(cancel, self.transcribe_inner(pcm)).await
    }

    async fn respond(
        &self,
        persona: &Persona,
        history: &[ChatTurn],
        user_text: &str,
        out: &mpsc::Sender<VoiceOutput>,
        cancel: &CancellationToken,
    ) -> Result<Reply, VoiceError> {
        cancellable(cancel, self.respond_inner(persona, history, user_text, out)).await
    }

    async fn speak(
        &self,
        persona: &Persona,
        text: &str,
        out: &mpsc::Sender<VoiceOutput>,
        cancel: &CancellationToken,
    ) -> Result<(), VoiceError> {
        cancellable(cancel, async {
            let mut speaker = self.speaker(persona, out)?;
            for sentence in split(text) {
                speaker.say(&sentence).await?;
            }
            if let Some(d) = speaker.degraded {
                warn!(degraded = %d, "spoke with the offline voice");
            }
            Ok(())
        })
        .await
    }

    fn observe_end_of_speech_to_first_audio(&self, took: Duration) {
        self.metrics
            .stage(Stage::end_of_speech_to_first_audio, took);
    }
}

/// The sentences of a whole text.
fn split(text: &str) -> Vec<String> {
    let mut splitter = SentenceSplitter::default();
    let mut sentences = splitter.push(text);
    sentences.extend(splitter.finish());
    sentences
}

/// Stands in when no decoder could be made: every frame is an error.
struct BrokenUplink(String);

impl UplinkAudio for BrokenUplink {
    fn push(&mut self, _opus_frame: &[u8]) -> Result<bool, VoiceError> {
        Err(VoiceError::Audio(self.0.clone()))
    }

    fn take_pcm(&mut self) -> Vec<i16> {
        Vec::new()
    }
}
