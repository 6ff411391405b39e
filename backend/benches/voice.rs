//! Voice costs, printed as figures (not run in CI):
//! - Opus encode and decode (+ VAD) CPU per second of 16 kHz speech;
//! - resampling 24 kHz → 16 kHz per second of audio;
//! - the pipeline's own overhead with instant in-process providers: respond() call → first
//!   `VoiceOutput::Audio`, and CPU per reply.
//!
//! `cargo bench -p companion-backend --bench voice`

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use companion_backend::personas::{Persona, PersonaSet};
use companion_backend::voice::audio::{encode_frames, OpusUplink};
use companion_backend::voice::providers::offline::{Espeak, Pocketsphinx, Scripted};
use companion_backend::voice::providers::{
    AudioStream, ChatRequest, LanguageModel, LlmEvent, LlmStream, ProviderError, TextToSpeech,
    Usage,
};
use companion_backend::voice::resample::resample;
use companion_backend::voice::{
    Pipeline, Providers, UplinkAudio, VoiceOutput, VoicePipeline, VoiceSettings, OUTPUT_QUEUE,
};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SECONDS: usize = 60;

/// Speech-like test audio: espeak-ng when installed, else a modulated harmonic tone.
fn speech(seconds: usize) -> Vec<i16> {
    let text = "The quick brown fox jumps over the lazy dog while the weather stays fine. ";
    let out = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us", "--stdout"])
        .arg(text.repeat(4))
        .output();
    let mut base = match out {
        Ok(o) if o.status.success() && o.stdout.len() > 44 => {
            let pcm: Vec<i16> = o.stdout[44..]
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect();
            resample(&pcm, 22_050, 16_000)
        }
        _ => (0..16_000 * 5)
            .map(|i| {
                let t = i as f64 / 16_000.0;
                let env = 0.5 + 0.5 * (2.0 * std::f64::consts::PI * 3.0 * t).sin();
                (6_000.0
                    * env
                    * ((2.0 * std::f64::consts::PI * 150.0 * t).sin()
                        + 0.5 * (2.0 * std::f64::consts::PI * 450.0 * t).sin()))
                    as i16
            })
            .collect(),
    };
    let n = 16_000 * seconds;
    while base.len() < n {
        base.extend_from_within(..base.len().min(n - base.len()));
    }
    base.truncate(n);
    base
}

fn per_second(took: Duration, seconds: usize) -> f64 {
    took.as_secs_f64() * 1_000.0 / seconds as f64
}

struct InstantLlm;

#[async_trait]
impl LanguageModel for InstantLlm {
    fn name(&self) -> &'static str {
        "anthropic"
    }
    async fn stream(&self, _r: &ChatRequest<'_>) -> Result<LlmStream, ProviderError> {
        let words = "Sure. It is sunny today and warm. Tomorrow it will rain a little.";
        let mut items: Vec<Result<LlmEvent, ProviderError>> = words
            .split_inclusive(' ')
            .map(|w| Ok(LlmEvent::Text(w.to_owned())))
            .collect();
        items.push(Ok(LlmEvent::Done(Some(Usage {
            input_tokens: 50,
            output_tokens: 15,
        }))));
        Ok(Box::pin(futures::stream::iter(items)))
    }
}

/// Returns one second of audio per sentence, in 100 ms chunks, at once.
struct InstantTts(Arc<Vec<i16>>);

#[async_trait]
impl TextToSpeech for InstantTts {
    fn name(&self) -> &'static str {
        "elevenlabs"
    }
    fn voice(&self, _p: &Persona) -> Option<String> {
        Some("v".into())
    }
    async fn synthesize(&self, _t: &str, _v: &str) -> Result<AudioStream, ProviderError> {
        let chunks: Vec<Result<Vec<i16>, ProviderError>> =
            self.0.chunks(1_600).map(|c| Ok(c.to_vec())).collect();
        Ok(Box::pin(futures::stream::iter(chunks)))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let pcm = speech(SECONDS);

    // Opus encode, 20 ms VOIP frames at 24 kbps.
    let t = Instant::now();
    let frames = encode_frames(&pcm, 24_000).expect("encode");
    let encode = t.elapsed();
    let bytes: usize = frames.iter().map(Vec::len).sum();

    // Uplink: Opus decode + earshot VAD, frame by frame as the session layer calls it.
    let t = Instant::now();
    let mut up = OpusUplink::new(500, 0.5).expect("decoder");
    for f in &frames {
        up.push(f).expect("decode");
    }
    let decode = t.elapsed();
    assert_eq!(up.take_pcm().len(), pcm.len());

    let at24 = resample(&pcm, 16_000, 24_000);
    let t = Instant::now();
    let _ = resample(&at24, 24_000, 16_000);
    let rs = t.elapsed();

    println!("audio ({SECONDS} s of speech, 16 kHz mono):");
    println!(
        "  opus encode (VOIP 24 kbps, 20 ms): {:.2} ms CPU per second of audio ({} bytes/s)",
        per_second(encode, SECONDS),
        bytes / SECONDS
    );
    println!(
        "  opus decode + VAD (uplink push):   {:.2} ms CPU per second of audio",
        per_second(decode, SECONDS)
    );
    println!(
        "  resample 24 kHz -> 16 kHz:         {:.2} ms CPU per second of audio",
        per_second(rs, SECONDS)
    );

    // Pipeline overhead with instant providers.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let settings = VoiceSettings::default();
    let tts_pcm = Arc::new(pcm[..16_000].to_vec());
    let providers = Providers {
        anthropic: Some(Arc::new(InstantLlm)),
        openai: None,
        offline_llm: Arc::new(Scripted),
        stt: None,
        offline_stt: Arc::new(Pocketsphinx::new(&settings.offline)),
        tts: vec![Arc::new(InstantTts(tts_pcm))],
        offline_tts: Arc::new(Espeak::new(&settings.offline)),
    };
    let pipeline = Pipeline::with_providers(&settings, &mut Registry::default(), providers);
    let persona = PersonaSet::load(None, "aria")
        .expect("personas")
        .default_persona()
        .clone();
    let runs = 300;
    let (first, total) = rt.block_on(async {
        let mut first = Vec::with_capacity(runs);
        let mut total = Vec::with_capacity(runs);
        for _ in 0..runs + 20 {
            let (tx, mut rx) = mpsc::channel(OUTPUT_QUEUE);
            let cancel = CancellationToken::new();
            let start = Instant::now();
            let respond = async {
                let r = pipeline
                    .respond(&persona, &[], "Weather?", &tx, &cancel)
                    .await;
                drop(tx);
                r.expect("reply");
                start.elapsed()
            };
            let listen = async {
                let mut first = None;
                while let Some(item) = rx.recv().await {
                    if first.is_none() && matches!(item, VoiceOutput::Audio(_)) {
                        first = Some(start.elapsed());
                    }
                }
                first.expect("audio")
            };
            let (t, f) = tokio::join!(respond, listen);
            first.push(f);
            total.push(t);
        }
        (first[20..].to_vec(), total[20..].to_vec())
    });
    let mut first_sorted = first.clone();
    first_sorted.sort();
    let mut total_sorted = total.clone();
    total_sorted.sort();
    println!("pipeline with instant providers ({runs} replies, 3 sentences, 3 s of audio each):");
    println!(
        "  respond() -> first Audio: p50 {:.3} ms, p95 {:.3} ms",
        percentile(&first_sorted, 0.5).as_secs_f64() * 1e3,
        percentile(&first_sorted, 0.95).as_secs_f64() * 1e3
    );
    println!(
        "  whole reply (encode 3 s):  p50 {:.2} ms, p95 {:.2} ms",
        percentile(&total_sorted, 0.5).as_secs_f64() * 1e3,
        percentile(&total_sorted, 0.95).as_secs_f64() * 1e3
    );
    let per_audio_second = percentile(&total_sorted, 0.5).as_secs_f64() * 1e3 / 3.0;
    println!(
        "  => {per_audio_second:.2} ms per second of reply audio; two cores keep up with about {:.0} replies speaking at once",
        2_000.0 / per_audio_second
    );
}
