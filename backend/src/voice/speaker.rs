//! Speaking one reply: each sentence goes out as [`VoiceOutput::Sentence`] followed by its
//! audio, synthesised by the chosen engine, streamed, Opus-encoded on a blocking thread and
//! batched into [`VoiceOutput::Audio`]. When the engine fails, the rest of the reply (and the
//! sentence, if none of it was heard yet) is spoken by the offline voice instead.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::warn;

use super::audio::OpusFramer;
use super::metrics::{Stage, VoiceMetrics};
use super::providers::{ProviderError, TextToSpeech};
use super::{VoiceError, VoiceOutput};

/// Why speaking a sentence with one engine stopped.
enum SayError {
    /// The engine failed; `heard` tells whether any of its audio went out.
    Engine { error: ProviderError, heard: bool },
    /// The reply cannot go on (output closed, encoder broken).
    Fatal(VoiceError),
}

impl From<VoiceError> for SayError {
    fn from(e: VoiceError) -> Self {
        SayError::Fatal(e)
    }
}

/// Speaks the sentences of one reply through one output channel.
pub struct Speaker<'a> {
    metrics: &'a VoiceMetrics,
    out: &'a mpsc::Sender<VoiceOutput>,
    engine: Option<(Arc<dyn TextToSpeech>, String)>,
    offline: (Arc<dyn TextToSpeech>, String),
    framer: Option<OpusFramer>,
    /// What was said, sentence by sentence.
    pub spoken: Vec<String>,
    /// Set when an engine failed and the offline voice took over.
    pub degraded: Option<String>,
}

impl<'a> Speaker<'a> {
    /// `engine` is the preferred voice (`None`: offline only); `offline` the fallback.
    pub fn new(
        metrics: &'a VoiceMetrics,
        out: &'a mpsc::Sender<VoiceOutput>,
        engine: Option<(Arc<dyn TextToSpeech>, String)>,
        offline: (Arc<dyn TextToSpeech>, String),
        bitrate: u32,
    ) -> Result<Self, VoiceError> {
        Ok(Self {
            metrics,
            out,
            engine,
            offline,
            framer: Some(OpusFramer::new(bitrate)?),
            spoken: Vec::new(),
            degraded: None,
        })
    }

    /// Speaks every sentence `rx` yields, until it closes.
    pub async fn speak_all(&mut self, mut rx: mpsc::Receiver<String>) -> Result<(), VoiceError> {
        while let Some(sentence) = rx.recv().await {
            self.say(&sentence).await?;
        }
        Ok(())
    }

    /// Speaks one sentence with the preferred engine, falling back to the offline voice.
    pub async fn say(&mut self, text: &str) -> Result<(), VoiceError> {
        send(self.out, VoiceOutput::Sentence(text.to_owned())).await?;
        if let Some((engine, voice)) = self.engine.clone() {
            match self.say_with(engine.as_ref(), &voice, text).await {
                Ok(()) => {
                    self.spoken.push(text.to_owned());
                    return Ok(());
                }
                Err(SayError::Fatal(e)) => return Err(e),
                Err(SayError::Engine { error, heard }) => {
                    warn!(provider = engine.name(), error = %error, "speech failed; using the offline voice");
                    self.metrics.provider_error(engine.name(), error.kind());
                    self.degraded = Some(format!("{}: {error}", engine.name()));
                    self.engine = None;
                    if heard {
                        self.spoken.push(text.to_owned());
                        return Ok(());
                    }
                }
            }
        }
        self.offline_audio(text).await
    }

    /// Speaks one sentence with the offline voice only.
    pub async fn say_offline(&mut self, text: &str) -> Result<(), VoiceError> {
        send(self.out, VoiceOutput::Sentence(text.to_owned())).await?;
        self.offline_audio(text).await
    }

    async fn offline_audio(&mut self, text: &str) -> Result<(), VoiceError> {
        let (engine, voice) = self.offline.clone();
        match self.say_with(engine.as_ref(), &voice, text).await {
            Ok(()) => {
                self.spoken.push(text.to_owned());
                Ok(())
            }
            Err(SayError::Fatal(e)) => Err(e),
            Err(SayError::Engine { error, .. }) => {
                self.metrics.provider_error(engine.name(), error.kind());
                Err(VoiceError::Provider {
                    provider: engine.name(),
                    message: error.to_string(),
                })
            }
        }
    }

    async fn say_with(
        &mut self,
        engine: &dyn TextToSpeech,
        voice: &str,
        text: &str,
    ) -> Result<(), SayError> {
        let started = Instant::now();
        let mut heard = false;
        let result = async {
            let mut audio = engine.synthesize(text, voice).await?;
            let mut first = true;
            while let Some(chunk) = audio.next().await {
                let pcm = chunk?;
                if first {
                    self.metrics
                        .stage(Stage::tts_first_audio, started.elapsed());
                    first = false;
                }
                heard |= self
                    .encode_and_send(pcm)
                    .await
                    .map_err(ProviderErrorOrFatal::Fatal)?;
            }
            Ok::<(), ProviderErrorOrFatal>(())
        }
        .await;
        // The sentence's last partial frame, padded, whatever happened.
        heard |= self.flush().await?;
        match result {
            Ok(()) => Ok(()),
            Err(ProviderErrorOrFatal::Provider(error)) => Err(SayError::Engine { error, heard }),
            Err(ProviderErrorOrFatal::Fatal(e)) => Err(SayError::Fatal(e)),
        }
    }

    /// Encodes on a blocking thread; returns whether audio went out.
    async fn encode_and_send(&mut self, pcm: Vec<i16>) -> Result<bool, VoiceError> {
        let mut framer = self.take_framer()?;
        let (framer, batches) = tokio::task::spawn_blocking(move || {
            let r = framer.push(&pcm);
            (framer, r)
        })
        .await
        .map_err(|e| VoiceError::Audio(format!("encoder thread: {e}")))?;
        self.framer = Some(framer);
        let batches = batches?;
        let heard = !batches.is_empty();
        for b in batches {
            send(self.out, VoiceOutput::Audio(b)).await?;
        }
        Ok(heard)
    }

    async fn flush(&mut self) -> Result<bool, VoiceError> {
        let framer = self.framer.as_mut().ok_or_else(lost_encoder)?;
        match framer.flush()? {
            Some(batch) => {
                send(self.out, VoiceOutput::Audio(batch)).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn take_framer(&mut self) -> Result<OpusFramer, VoiceError> {
        self.framer.take().ok_or_else(lost_encoder)
    }
}

async fn send(out: &mpsc::Sender<VoiceOutput>, item: VoiceOutput) -> Result<(), VoiceError> {
    // The session layer dropped the receiver: nobody listens any more.
    out.send(item).await.map_err(|_| VoiceError::Cancelled)
}

fn lost_encoder() -> VoiceError {
    VoiceError::Audio("encoder lost after a failed batch".into())
}

enum ProviderErrorOrFatal {
    Provider(ProviderError),
    Fatal(VoiceError),
}

impl From<ProviderError> for ProviderErrorOrFatal {
    fn from(e: ProviderError) -> Self {
        ProviderErrorOrFatal::Provider(e)
    }
}
