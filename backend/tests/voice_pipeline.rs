//! The streaming pipeline against fake providers: first audio before the language model
//! finishes, cancellation, fallbacks on provider failure, metrics.

mod voice_fake;

use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_backend::metrics::render;
use companion_backend::personas::{Persona, PersonaSet};
use companion_backend::settings::Secret;
use companion_backend::voice::audio::{decode_frames, rms};
use companion_backend::voice::settings::{SttChoice, TtsChoice};
use companion_backend::voice::{
    Pipeline, Reply, VoiceError, VoiceOutput, VoicePipeline, VoiceSettings, OUTPUT_QUEUE,
};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use voice_fake::*;

/// How long a test waits for something that should happen at once.
const DEADLINE: Duration = Duration::from_secs(20);

fn settings(llm: &FakeServer, tts: Option<&FakeServer>) -> VoiceSettings {
    let mut s = VoiceSettings {
        stt_provider: SttChoice::Offline,
        tts_provider: if tts.is_some() {
            TtsChoice::Elevenlabs
        } else {
            TtsChoice::Offline
        },
        request_timeout_ms: 400,
        stream_idle_timeout_ms: 2_000,
        max_retries: 0,
        ..VoiceSettings::default()
    };
    s.anthropic.api_key = Some(Secret::new("sk-ant-test"));
    s.anthropic.base_url = llm.url();
    if let Some(tts) = tts {
        s.elevenlabs.api_key = Some(Secret::new("xi-test"));
        s.elevenlabs.base_url = tts.url();
    }
    s
}

fn aria() -> Arc<Persona> {
    PersonaSet::load(None, "aria")
        .unwrap()
        .default_persona()
        .clone()
}

/// A voice that streams half a second of tone per request, in chunks.
async fn fake_voice() -> FakeServer {
    let pcm = tone_pcm(16_000, 0.5);
    FakeServer::always(Canned::new(200, "audio/pcm", chunked(&pcm, 3_201))).await
}

/// Runs `respond` to the end, collecting its output.
async fn respond_all(
    pipeline: &Pipeline,
    persona: &Persona,
    text: &str,
) -> (Result<Reply, VoiceError>, Vec<VoiceOutput>) {
    let (tx, mut rx) = mpsc::channel(OUTPUT_QUEUE);
    let cancel = CancellationToken::new();
    let collect = async {
        let mut items = Vec::new();
        while let Some(item) = rx.recv().await {
            items.push(item);
        }
        items
    };
    let respond = async {
        let r = pipeline.respond(persona, &[], text, &tx, &cancel).await;
        drop(tx);
        r
    };
    tokio::time::timeout(DEADLINE, async { tokio::join!(respond, collect) })
        .await
        .expect("the reply finished")
}

fn sentences(items: &[VoiceOutput]) -> Vec<&str> {
    items
        .iter()
        .filter_map(|i| match i {
            VoiceOutput::Sentence(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

fn audio_pcm(items: &[VoiceOutput]) -> Vec<i16> {
    let frames: Vec<&[u8]> = items
        .iter()
        .filter_map(|i| match i {
            VoiceOutput::Audio(f) => Some(f),
            _ => None,
        })
        .flatten()
        .map(Vec::as_slice)
        .collect();
    decode_frames(frames).unwrap()
}

#[tokio::test]
async fn the_first_audio_leaves_before_the_language_model_finishes() {
    let gate = Arc::new(Notify::new());
    let mut parts = anthropic_start(10);
    parts.push(anthropic_text("It is sunny"));
    parts.push(Part::Delay(Duration::from_millis(30)));
    parts.push(anthropic_text(" today. "));
    // The rest waits until the test has heard the first audio.
    parts.push(Part::Gate(gate.clone()));
    for t in ["Tomorrow", " it", " will", " rain."] {
        parts.push(Part::Delay(Duration::from_millis(30)));
        parts.push(anthropic_text(t));
    }
    parts.extend(anthropic_end(9));
    parts.push(Part::Mark("llm finished"));
    let llm = FakeServer::always(Canned::new(200, "text/event-stream", parts)).await;
    let tts = fake_voice().await;
    let pipeline = Pipeline::with_env(
        &settings(&llm, Some(&tts)),
        &mut Registry::default(),
        |_| None,
    )
    .unwrap();
    let persona = aria();

    let (tx, mut rx) = mpsc::channel(OUTPUT_QUEUE);
    let cancel = CancellationToken::new();
    let respond = async {
        let r = pipeline
            .respond(&persona, &[], "Weather?", &tx, &cancel)
            .await;
        drop(tx);
        r
    };
    let listen = async {
        let mut items = Vec::new();
        let mut llm_done_at_first_audio = None;
        while let Some(item) = rx.recv().await {
            if matches!(item, VoiceOutput::Audio(_)) && llm_done_at_first_audio.is_none() {
                llm_done_at_first_audio = Some(llm.marks().contains(&"llm finished"));
                gate.notify_one();
            }
            items.push(item);
        }
        (items, llm_done_at_first_audio)
    };
    let (reply, (items, llm_done)) =
        tokio::time::timeout(DEADLINE, async { tokio::join!(respond, listen) })
            .await
            .expect("the first audio must not wait for the end of the model's stream");
    assert_eq!(llm_done, Some(false));
    let reply = reply.unwrap();
    assert_eq!(reply.text, "It is sunny today. Tomorrow it will rain.");
    assert_eq!(reply.degraded, None);
    assert_eq!(
        sentences(&items),
        ["It is sunny today.", "Tomorrow it will rain."]
    );
    assert!(matches!(items[1], VoiceOutput::Audio(_)));
    assert!(llm.marks().contains(&"llm finished"));
    let pcm = audio_pcm(&items);
    assert!(pcm.len() >= 16_000, "{} samples", pcm.len());
    assert!(rms(&pcm) > 1_000.0);
}

#[tokio::test]
async fn cancelling_a_reply_stops_its_output_within_100_ms() {
    let mut parts = anthropic_start(10);
    parts.push(anthropic_text("This is a long story. "));
    for _ in 0..50 {
        parts.push(Part::Delay(Duration::from_millis(50)));
        parts.push(anthropic_text("More and more. "));
    }
    parts.extend(anthropic_end(100));
    let llm = FakeServer::always(Canned::new(200, "text/event-stream", parts)).await;
    // A voice that trickles audio for ten seconds.
    let pcm = tone_pcm(16_000, 10.0);
    let mut voice = Vec::new();
    for c in pcm.chunks(3_200) {
        voice.push(Part::Bytes(c.to_vec()));
        voice.push(Part::Delay(Duration::from_millis(20)));
    }
    let tts = FakeServer::always(Canned::new(200, "audio/pcm", voice)).await;
    let mut registry = Registry::default();
    let pipeline =
        Pipeline::with_env(&settings(&llm, Some(&tts)), &mut registry, |_| None).unwrap();
    let persona = aria();

    let (tx, mut rx) = mpsc::channel(OUTPUT_QUEUE);
    let cancel = CancellationToken::new();
    let task = {
        let (pipeline, persona, cancel) = (pipeline.clone(), persona.clone(), cancel.clone());
        tokio::spawn(async move {
            let r = pipeline
                .respond(&persona, &[], "Tell me a story", &tx, &cancel)
                .await;
            (r, Instant::now())
        })
    };
    let mut cancelled_at = None;
    let mut audio_after_cancel = 0usize;
    let collect = async {
        while let Some(item) = rx.recv().await {
            if let VoiceOutput::Audio(_) = item {
                match cancelled_at {
                    None => {
                        cancel.cancel();
                        cancelled_at = Some(Instant::now());
                    }
                    Some(_) => audio_after_cancel += 1,
                }
            }
        }
    };
    tokio::time::timeout(DEADLINE, collect)
        .await
        .expect("output stopped");
    let (result, returned_at) = task.await.unwrap();
    let cancelled_at = cancelled_at.expect("audio arrived");
    assert!(matches!(result, Err(VoiceError::Cancelled)), "{result:?}");
    let took = returned_at.duration_since(cancelled_at);
    assert!(
        took < Duration::from_millis(100),
        "respond returned {took:?} after the cancel"
    );
    // At most what was already queued when the cancel was observed.
    assert!(audio_after_cancel < OUTPUT_QUEUE, "{audio_after_cancel}");
    let metrics = render(&registry).unwrap();
    assert!(
        metrics.contains(r#"llm_requests_total{provider="anthropic",model="claude-3-5-haiku-latest",status="cancelled"} 1"#),
        "{metrics}"
    );
}

async fn assert_fallback_spoken(llm: FakeServer, kind: &str) {
    let mut registry = Registry::default();
    let pipeline = Pipeline::with_env(&settings(&llm, None), &mut registry, |_| None).unwrap();
    let persona = aria();
    let (reply, items) = respond_all(&pipeline, &persona, "Hello?").await;
    let reply = reply.unwrap();
    let degraded = reply.degraded.expect("degraded");
    assert!(degraded.starts_with("anthropic"), "{degraded}");
    assert_eq!(reply.text, persona.fallback_reply(0));
    assert_eq!(sentences(&items).join(" "), persona.fallback_reply(0));
    let pcm = audio_pcm(&items);
    assert!(
        pcm.len() > 8_000 && rms(&pcm) > 500.0,
        "{} samples",
        pcm.len()
    );
    let metrics = render(&registry).unwrap();
    assert!(
        metrics.contains(&format!(
            r#"voice_provider_errors_total{{provider="anthropic",kind="{kind}"}} 1"#
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_language_model_answering_500_gets_the_fallback_line_spoken() {
    let llm = FakeServer::always(Canned::json(
        500,
        r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#,
    ))
    .await;
    assert_fallback_spoken(llm, "server_error").await;
}

#[tokio::test]
async fn a_language_model_that_times_out_gets_the_fallback_line_spoken() {
    let llm = FakeServer::always(Canned::hang()).await;
    assert_fallback_spoken(llm, "timeout").await;
}

#[tokio::test]
async fn an_error_mid_reply_keeps_what_was_said_and_adds_the_fallback_line() {
    let mut parts = anthropic_start(10);
    parts.push(anthropic_text("First things first. "));
    parts.push(anthropic_text("Then"));
    parts.push(sse(
        "error",
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    ));
    let llm = FakeServer::always(Canned::new(200, "text/event-stream", parts)).await;
    let pipeline =
        Pipeline::with_env(&settings(&llm, None), &mut Registry::default(), |_| None).unwrap();
    let persona = aria();
    let (reply, items) = respond_all(&pipeline, &persona, "Hello?").await;
    let reply = reply.unwrap();
    assert!(reply.degraded.unwrap().contains("overloaded_error"));
    assert_eq!(sentences(&items)[0], "First things first.");
    assert_eq!(
        reply.text,
        format!("First things first. {}", persona.fallback_reply(0))
    );
}

#[tokio::test]
async fn a_failing_voice_hands_over_to_the_offline_voice() {
    let llm = FakeServer::always(anthropic_reply(&["Hello there. ", "Nice to meet you."])).await;
    let tts = FakeServer::always(Canned::json(500, r#"{"detail":"down"}"#)).await;
    let mut registry = Registry::default();
    let pipeline =
        Pipeline::with_env(&settings(&llm, Some(&tts)), &mut registry, |_| None).unwrap();
    let persona = aria();
    let (reply, items) = respond_all(&pipeline, &persona, "Hi").await;
    let reply = reply.unwrap();
    assert!(reply.degraded.unwrap().starts_with("elevenlabs"));
    assert_eq!(reply.text, "Hello there. Nice to meet you.");
    let pcm = audio_pcm(&items);
    assert!(pcm.len() > 16_000 && rms(&pcm) > 500.0);
    // The broken voice is not asked again within the reply.
    assert_eq!(tts.requests().len(), 1);
}

#[tokio::test]
async fn tokens_are_counted_once_and_stages_are_timed() {
    let llm = FakeServer::always(anthropic_reply(&["Hello", " there."])).await;
    let tts = fake_voice().await;
    let mut registry = Registry::default();
    let pipeline =
        Pipeline::with_env(&settings(&llm, Some(&tts)), &mut registry, |_| None).unwrap();
    let persona = aria();
    let (reply, _) = respond_all(&pipeline, &persona, "Hi").await;
    assert_eq!(reply.unwrap().degraded, None);
    pipeline.observe_end_of_speech_to_first_audio(Duration::from_millis(250));
    let m = render(&registry).unwrap();
    for line in [
        r#"llm_tokens_total{provider="anthropic",type="input"} 10"#,
        r#"llm_tokens_total{provider="anthropic",type="output"} 7"#,
        r#"llm_requests_total{provider="anthropic",model="claude-3-5-haiku-latest",status="ok"} 1"#,
        r#"llm_request_latency_seconds_count{provider="anthropic",model="claude-3-5-haiku-latest"} 1"#,
        r#"voice_stage_seconds_count{stage="llm_first_token"} 1"#,
        r#"voice_stage_seconds_count{stage="tts_first_audio"} 1"#,
        r#"voice_stage_seconds_count{stage="end_of_speech_to_first_audio"} 1"#,
    ] {
        assert!(m.contains(line), "missing {line}\n{m}");
    }
    assert!(!m.contains("voice_provider_errors_total{"), "{m}");
}

#[tokio::test]
async fn without_keys_a_persona_answers_offline_and_is_not_degraded() {
    let mut registry = Registry::default();
    let pipeline = Pipeline::with_env(&VoiceSettings::default(), &mut registry, |_| None).unwrap();
    let persona = aria();
    let (reply, items) = respond_all(&pipeline, &persona, "Hi").await;
    let reply = reply.unwrap();
    assert_eq!(reply.degraded, None);
    assert_eq!(reply.text, persona.fallback_reply(0));
    assert!(rms(&audio_pcm(&items)) > 500.0);
    assert!(render(&registry)
        .unwrap()
        .contains(r#"llm_requests_total{provider="offline",model="scripted",status="ok"} 1"#));
}

#[tokio::test]
async fn speak_says_a_greeting_sentence_by_sentence_in_the_persona_voice() {
    let pipeline = Pipeline::with_env(&VoiceSettings::default(), &mut Registry::default(), |_| {
        None
    })
    .unwrap();
    let persona = aria();
    let (tx, mut rx) = mpsc::channel(OUTPUT_QUEUE);
    let cancel = CancellationToken::new();
    let speak = async {
        let r = pipeline
            .speak(&persona, &persona.greeting, &tx, &cancel)
            .await;
        drop(tx);
        r
    };
    let collect = async {
        let mut items = Vec::new();
        while let Some(i) = rx.recv().await {
            items.push(i);
        }
        items
    };
    let (r, items) = tokio::join!(speak, collect);
    r.unwrap();
    assert_eq!(sentences(&items), ["Hi, I'm Aria.", "What's on your mind?"]);
    assert!(rms(&audio_pcm(&items)) > 500.0);
}
