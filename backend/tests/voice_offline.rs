//! Offline end to end at the pipeline level: espeak-ng speech → Opus frames → uplink with VAD
//! → pocketsphinx → the persona's scripted answer → espeak-ng → Opus frames that decode to
//! non-silent audio. Needs Debian's espeak-ng, pocketsphinx and pocketsphinx-en-us.

mod voice_fake;

use companion_backend::personas::PersonaSet;
use companion_backend::voice::audio::{decode_frames, encode_frames, rms};
use companion_backend::voice::settings::{LlmChoice, SttChoice, TtsChoice};
use companion_backend::voice::{Pipeline, VoiceOutput, VoicePipeline, VoiceSettings, OUTPUT_QUEUE};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voice_fake::spoken;

fn offline_settings() -> VoiceSettings {
    VoiceSettings {
        llm_provider: LlmChoice::Offline,
        stt_provider: SttChoice::Offline,
        tts_provider: TtsChoice::Offline,
        ..VoiceSettings::default()
    }
}

#[tokio::test]
async fn offline_speech_is_heard_transcribed_answered_and_spoken_back() {
    let mut registry = Registry::default();
    let pipeline = Pipeline::with_env(&offline_settings(), &mut registry, |_| None).unwrap();

    // The device streams its utterance, then keeps sending silence: VAD must end it.
    let mut pcm = vec![0i16; 4_800];
    pcm.extend(spoken("hello, what is the weather like today"));
    pcm.extend(vec![0i16; 32_000]);
    let frames = encode_frames(&pcm, 24_000).unwrap();
    let mut uplink = pipeline.uplink();
    let mut ended_at = None;
    for (i, frame) in frames.iter().enumerate() {
        if uplink.push(frame).unwrap() {
            ended_at = Some(i);
            break;
        }
    }
    let ended_at = ended_at.expect("voice activity detection ended the utterance");
    let speech_frames = frames.len() - 32_000 / 320;
    assert!(
        ended_at > speech_frames,
        "ended at frame {ended_at} of {speech_frames} speech frames"
    );
    assert!(
        ended_at <= speech_frames + 40,
        "ended at {ended_at}, speech ends at {speech_frames}"
    );

    let cancel = CancellationToken::new();
    let heard = pipeline
        .transcribe(&uplink.take_pcm(), &cancel)
        .await
        .unwrap();
    eprintln!("transcript: {heard:?}");
    assert!(
        heard.to_lowercase().contains("weather"),
        "transcript {heard:?}"
    );

    let personas = PersonaSet::load(None, "aria").unwrap();
    let persona = personas.default_persona();
    let (tx, mut rx) = mpsc::channel(OUTPUT_QUEUE);
    let collect = tokio::spawn(async move {
        let mut items = Vec::new();
        while let Some(item) = rx.recv().await {
            items.push(item);
        }
        items
    });
    let reply = pipeline
        .respond(persona, &[], &heard, &tx, &cancel)
        .await
        .unwrap();
    drop(tx);
    let items = collect.await.unwrap();
    assert_eq!(reply.degraded, None);
    assert_eq!(reply.text, persona.fallback_reply(0));
    assert_eq!(
        items.first(),
        Some(&VoiceOutput::Sentence(split_first(&reply.text)))
    );
    let frames: Vec<Vec<u8>> = items
        .into_iter()
        .filter_map(|i| match i {
            VoiceOutput::Audio(f) => Some(f),
            _ => None,
        })
        .inspect(|f| assert!((1..=5).contains(&f.len())))
        .flatten()
        .collect();
    let pcm = decode_frames(frames.iter().map(Vec::as_slice)).unwrap();
    assert!(pcm.len() > 16_000, "{} samples", pcm.len());
    assert!(rms(&pcm) > 500.0, "rms {}", rms(&pcm));
}

/// The first sentence of `text`.
fn split_first(text: &str) -> String {
    let mut s = companion_backend::voice::sentences::SentenceSplitter::default();
    s.push(text)
        .into_iter()
        .next()
        .or_else(|| s.finish())
        .unwrap()
}
