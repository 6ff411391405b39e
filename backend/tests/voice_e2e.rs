//! Voice conversations end to end: a real device (rumqttc over TLS) streams Opus through the
//! broker edge; the backend runs the session, the rules and the voice pipeline (offline
//! engines, or cloud providers faked by local HTTP servers) and streams the reply back.

mod common;
mod voice_fake;

use std::time::{Duration, Instant};

use common::app::{DbKind, Seen, TestApp};
use common::device::Device;
use companion_backend::voice::audio::{decode_frames, encode_frames, rms};
use companion_backend::voice::settings::{LlmChoice, SttChoice};
use companion_schema::*;
use serde_bytes::ByteBuf;
use voice_fake::{
    anthropic_end, anthropic_start, anthropic_text, spoken, Canned, FakeServer, Part,
};

fn control(session: &str, action: SessionAction) -> SessionControl {
    SessionControl {
        v: 1,
        session_id: SessionId::parse(session).unwrap(),
        action,
        reason: None,
    }
}

/// Streams `pcm` as an utterance: start, Opus chunks of 5 frames, stop.
async fn say(dev: &Device, session: &str, pcm: &[i16]) {
    dev.send(
        TopicKind::SessionUp,
        &control(session, SessionAction::Start),
    )
    .await;
    send_audio(dev, session, pcm).await;
    dev.send(TopicKind::SessionUp, &control(session, SessionAction::Stop))
        .await;
}

/// `pcm` as Opus chunks of 5 frames, the last one marked `last`.
async fn send_audio(dev: &Device, session: &str, pcm: &[i16]) {
    let sid = SessionId::parse(session).unwrap();
    let frames = encode_frames(pcm, 24_000).unwrap();
    let chunks = frames.chunks(5).count();
    for (seq, batch) in frames.chunks(5).enumerate() {
        let chunk = AudioChunk {
            v: 1,
            session_id: sid.clone(),
            seq: seq as u32,
            ts_ms: 0,
            codec: Codec::Opus,
            sample_rate: AUDIO_SAMPLE_RATE,
            frame_ms: AUDIO_FRAME_MS,
            frames: batch.iter().map(|f| ByteBuf::from(f.clone())).collect(),
            last: seq + 1 == chunks,
        };
        dev.send(TopicKind::AudioUp, &chunk).await;
    }
}

/// Everything the device heard for one session, until `idle` and the last audio chunk.
#[derive(Default, Debug)]
struct Heard {
    events: Vec<SessionEvent>,
    chunks: Vec<AudioChunk>,
    personas: Vec<PersonaState>,
    first_audio_at: Option<Instant>,
}

impl Heard {
    fn states(&self) -> Vec<SessionState> {
        let mut s: Vec<SessionState> = self.events.iter().map(|e| e.state).collect();
        s.dedup();
        s
    }

    fn idle(&self) -> &SessionEvent {
        self.events
            .iter()
            .rev()
            .find(|e| e.state == SessionState::Idle)
            .expect("idle")
    }

    fn pcm(&self) -> Vec<i16> {
        let frames: Vec<&[u8]> = self
            .chunks
            .iter()
            .flat_map(|c| c.frames.iter().map(|f| f.as_slice()))
            .collect();
        decode_frames(frames).unwrap()
    }
}

async fn listen(app: &TestApp, dev: &mut Device, session: &str, until_last_audio: bool) -> Heard {
    let mut heard = Heard::default();
    let audio = dev.topic(TopicKind::AudioDown);
    let events = dev.topic(TopicKind::SessionDown);
    let persona = dev.topic(TopicKind::Persona);
    let finished = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let idle = heard
                .events
                .iter()
                .any(|e| e.state == SessionState::Idle && e.session_id.as_str() == session);
            let last = heard.chunks.iter().any(|c| c.last);
            if idle && (last || !until_last_audio) {
                return;
            }
            match dev.recv().await {
                Some(Seen::Publish { topic, payload }) if topic == audio => {
                    let c: AudioChunk = decode(&payload).unwrap();
                    if c.session_id.as_str() == session {
                        heard.first_audio_at.get_or_insert_with(Instant::now);
                        heard.chunks.push(c);
                    }
                }
                Some(Seen::Publish { topic, payload }) if topic == events => {
                    let e: SessionEvent = decode(&payload).unwrap();
                    if e.session_id.as_str() == session {
                        heard.events.push(e);
                    }
                }
                Some(Seen::Publish { topic, payload }) if topic == persona => {
                    heard.personas.push(decode(&payload).unwrap());
                }
                Some(Seen::Closed(e)) => panic!("closed: {e}"),
                None => panic!("ended"),
                _ => {}
            }
        }
    })
    .await;
    if finished.is_err() {
        let metrics = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let interesting: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && !l.ends_with(" 0")
                    && (l.starts_with("broker_")
                        || l.starts_with("backend_")
                        || l.starts_with("sessions_")
                        || l.starts_with("audio_"))
            })
            .collect();
        panic!(
            "session {session} did not finish; heard {:?}\n{}",
            heard.states(),
            interesting.join("\n")
        );
    }
    heard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_conversation_runs_end_to_end_through_the_broker() {
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let mut dev = Device::register(&app, "voice").await;
    let mut pcm = vec![0i16; 3_200];
    pcm.extend(spoken("hello, what is the weather like today"));
    pcm.extend(vec![0i16; 3_200]);
    say(&dev, "talk-1", &pcm).await;
    let heard = listen(&app, &mut dev, "talk-1", true).await;

    assert_eq!(
        heard.states(),
        [
            SessionState::Listening,
            SessionState::Thinking,
            SessionState::Speaking,
            SessionState::Idle
        ]
    );
    let transcript = heard
        .events
        .iter()
        .find_map(|e| e.transcript.clone())
        .expect("a transcript");
    assert!(
        transcript.to_lowercase().contains("weather"),
        "transcript {transcript:?}"
    );
    let aria = companion_backend::personas::PersonaSet::load(None, "aria").unwrap();
    let reply = heard.idle().reply_text.clone().expect("reply text");
    assert!(
        aria.default_persona().fallback_replies.contains(&reply),
        "the scripted answer: {reply:?}"
    );
    let last = heard.chunks.last().unwrap();
    assert!(last.last, "the stream ends with last");
    let seqs: Vec<u32> = heard.chunks.iter().map(|c| c.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "seq increases: {seqs:?}"
    );
    assert!(heard.chunks.iter().all(|c| c.frames.len() <= 5));
    let out = heard.pcm();
    assert!(out.len() > 16_000 / 2, "at least half a second of speech");
    assert!(
        rms(&out) > 300.0,
        "the reply is not silent: rms {}",
        rms(&out)
    );

    // The exchange is remembered as history.
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conversation_messages")
        .fetch_one(app.app_ctx.db.pool())
        .await
        .unwrap();
    assert_eq!(rows, 2);
    app.stop().await;
}

/// A fake OpenAI transcription endpoint that hears `text`, and a fake Anthropic endpoint.
async fn fake_cloud(text: &'static str, llm: Canned) -> (FakeServer, FakeServer) {
    let stt = FakeServer::always(Canned::json(200, &format!("{{\"text\":\"{text}\"}}"))).await;
    let llm = FakeServer::always(llm).await;
    (stt, llm)
}

fn use_fakes(s: &mut companion_backend::settings::Settings, stt: &FakeServer, llm: &FakeServer) {
    use companion_backend::settings::Secret;
    s.voice.stt_provider = SttChoice::Openai;
    s.voice.openai.api_key = Some(Secret::new("sk-test-openai"));
    s.voice.openai.base_url = format!("{}/v1", stt.url());
    s.voice.llm_provider = LlmChoice::Anthropic;
    s.voice.anthropic.api_key = Some(Secret::new("sk-test-anthropic"));
    s.voice.anthropic.base_url = llm.url();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_persona_switch_answers_in_the_new_persona_and_the_next_reply_uses_its_prompt() {
    let (stt, llm) = fake_cloud(
        "could you switch to sage please",
        voice_fake::anthropic_reply(&["Of course. ", "Let us sit a while."]),
    )
    .await;
    let app = TestApp::start_with(DbKind::Sqlite, |s| use_fakes(s, &stt, &llm))
        .await
        .unwrap();
    let mut dev = Device::register(&app, "switcher").await;
    let pcm = spoken("switch to sage");

    say(&dev, "talk-1", &pcm).await;
    let heard = listen(&app, &mut dev, "talk-1", true).await;
    assert!(heard.personas.iter().any(|p| p.persona_id.as_str() == "sage" && p.trigger == "rule:switch persona by voice"), "{:?}", heard.personas);
    let sage = companion_backend::personas::PersonaSet::load(None, "aria").unwrap();
    let sage = sage
        .get(&PersonaId::parse("sage").unwrap())
        .unwrap()
        .clone();
    assert_eq!(
        heard.idle().reply_text.as_deref(),
        Some(sage.greeting.as_str()),
        "greeted by the new persona"
    );
    assert!(rms(&heard.pcm()) > 300.0);
    assert!(llm.requests().is_empty(), "the greeting needs no model");

    // The next utterance goes to the model with Sage's prompt.
    say(&dev, "talk-2", &pcm).await;
    let heard = listen(&app, &mut dev, "talk-2", true).await;
    assert_eq!(
        heard.idle().reply_text.as_deref(),
        Some("Of course. Let us sit a while.")
    );
    let sent = llm.requests().last().unwrap().json();
    assert!(
        sent["system"]
            .as_str()
            .unwrap_or_default()
            .contains("You are Sage"),
        "{sent}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_that_overtakes_its_start_opens_the_session_and_the_late_start_changes_nothing() {
    let (stt, llm) = fake_cloud(
        "hello there",
        voice_fake::anthropic_reply(&["Hello to you too."]),
    )
    .await;
    let app = TestApp::start_with(DbKind::Sqlite, |s| use_fakes(s, &stt, &llm))
        .await
        .unwrap();
    let mut dev = Device::register(&app, "overtaken").await;
    // Every chunk, `last` included, is published before the `start` (audio/up and
    // session/up are different topics: nothing orders them between each other).
    send_audio(&dev, "talk-early", &spoken("hello there")).await;
    dev.send(
        TopicKind::SessionUp,
        &control("talk-early", SessionAction::Start),
    )
    .await;
    dev.send(
        TopicKind::SessionUp,
        &control("talk-early", SessionAction::Stop),
    )
    .await;
    let heard = listen(&app, &mut dev, "talk-early", true).await;
    assert!(
        heard.events.iter().all(|e| e.error.is_none()),
        "no error, no self-cancel: {:?}",
        heard.events
    );
    assert_eq!(
        heard.idle().reply_text.as_deref(),
        Some("Hello to you too.")
    );
    assert!(rms(&heard.pcm()) > 300.0);
    // The transcription got the whole utterance.
    let sent = &stt.requests()[0];
    assert!(
        sent.body.len() > 16_000,
        "{} bytes of upload",
        sent.body.len()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_audio_reaches_the_device_before_the_model_has_finished() {
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut parts = anthropic_start(10);
    parts.push(anthropic_text("Hello there. "));
    parts.push(Part::Gate(gate.clone()));
    parts.push(anthropic_text("And more after the gate."));
    parts.extend(anthropic_end(9));
    let (stt, llm) = fake_cloud(
        "tell me something",
        Canned::new(200, "text/event-stream", parts),
    )
    .await;
    let app = TestApp::start_with(DbKind::Sqlite, |s| use_fakes(s, &stt, &llm))
        .await
        .unwrap();
    let mut dev = Device::register(&app, "streamer").await;
    say(&dev, "talk-1", &spoken("tell me something")).await;
    // Wait for audio while the model is held at the gate: a server that waited for the
    // whole answer would never send any.
    let audio = dev.topic(TopicKind::AudioDown);
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(Seen::Publish { topic, .. }) = dev.recv().await {
                if topic == audio {
                    return;
                }
            }
        }
    })
    .await
    .expect("audio arrives while the model is still streaming");
    gate.notify_one();
    let heard = listen(&app, &mut dev, "talk-1", false).await;
    assert_eq!(
        heard.idle().reply_text.as_deref(),
        Some("Hello there. And more after the gate.")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_speaking_stops_the_reply_audio_within_100_ms() {
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut parts = anthropic_start(10);
    parts.push(anthropic_text(
        "This is the first sentence of a long answer. ",
    ));
    parts.push(Part::Gate(gate.clone()));
    for _ in 0..20 {
        parts.push(anthropic_text(
            "And here is yet another sentence to speak. ",
        ));
    }
    parts.extend(anthropic_end(200));
    let (stt, llm) = fake_cloud(
        "talk for a long time",
        Canned::new(200, "text/event-stream", parts),
    )
    .await;
    let app = TestApp::start_with(DbKind::Sqlite, |s| use_fakes(s, &stt, &llm))
        .await
        .unwrap();
    let mut dev = Device::register(&app, "barge").await;
    say(&dev, "talk-1", &spoken("talk for a long time")).await;
    let audio = dev.topic(TopicKind::AudioDown);
    let events = dev.topic(TopicKind::SessionDown);
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(Seen::Publish { topic, .. }) = dev.recv().await {
                if topic == audio {
                    return;
                }
            }
        }
    })
    .await
    .expect("speaking started");
    // Let the model go on, and barge in at once.
    gate.notify_one();
    dev.send(
        TopicKind::SessionUp,
        &control("talk-1", SessionAction::Cancel),
    )
    .await;
    let sent = Instant::now();
    let mut last_audio = None;
    let idle_at = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match dev.recv().await {
                Some(Seen::Publish { topic, .. }) if topic == audio => {
                    last_audio = Some(Instant::now())
                }
                Some(Seen::Publish { topic, payload }) if topic == events => {
                    let e: SessionEvent = decode(&payload).unwrap();
                    if e.state == SessionState::Idle {
                        assert_eq!(e.error.as_deref(), Some("cancelled"));
                        return Instant::now();
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .expect("idle after cancel");
    // Chunks already in flight may still land; nothing is produced after the cancel arrives.
    // Drain what is left for a moment bounded by a second MQTT round trip: a marker.
    let marker = LedCommand {
        v: 1,
        pattern: LedPattern::Off,
        color: [0, 0, 0],
        brightness: 0,
        duration_ms: None,
    };
    let _ = marker;
    if let Some(t) = last_audio {
        let after = t.saturating_duration_since(sent);
        assert!(
            after < Duration::from_millis(100),
            "audio kept coming {after:?} after the cancel"
        );
    }
    assert!(idle_at.duration_since(sent) < Duration::from_secs(2));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_gets_the_fallback_line_spoken_then_error_and_idle() {
    let (stt, llm) = fake_cloud(
        "what time is it",
        Canned::json(
            500,
            "{\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"boom\"}}",
        ),
    )
    .await;
    let app = TestApp::start_with(DbKind::Sqlite, |s| use_fakes(s, &stt, &llm))
        .await
        .unwrap();
    let mut dev = Device::register(&app, "fallback").await;
    say(&dev, "talk-1", &spoken("what time is it")).await;
    let heard = listen(&app, &mut dev, "talk-1", true).await;
    assert_eq!(
        heard.states(),
        [
            SessionState::Listening,
            SessionState::Thinking,
            SessionState::Speaking,
            SessionState::Error,
            SessionState::Idle
        ]
    );
    let aria = companion_backend::personas::PersonaSet::load(None, "aria").unwrap();
    let reply = heard.idle().reply_text.clone().unwrap();
    assert!(
        aria.default_persona()
            .fallback_replies
            .iter()
            .any(|f| reply.contains(f.as_str())),
        "{reply:?}"
    );
    assert!(rms(&heard.pcm()) > 300.0, "the fallback line is heard");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_hears_the_recent_history_and_the_history_stays_within_its_bound() {
    let (stt, llm) = fake_cloud(
        "tell me a story",
        voice_fake::anthropic_reply(&["Once upon a time."]),
    )
    .await;
    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        use_fakes(s, &stt, &llm);
        s.sessions.history = 2;
    })
    .await
    .unwrap();
    let mut dev = Device::register(&app, "storyteller").await;
    let pcm = spoken("tell me a story");
    for (i, session) in ["s-1", "s-2", "s-3"].into_iter().enumerate() {
        say(&dev, session, &pcm).await;
        let heard = listen(&app, &mut dev, session, true).await;
        assert_eq!(
            heard.idle().reply_text.as_deref(),
            Some("Once upon a time.")
        );
        let sent = llm.requests()[i].json();
        let messages: Vec<(String, String)> = sent["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_owned(),
                    m["content"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let turn = |role: &str, text: &str| (role.to_owned(), text.to_owned());
        let mut expected = Vec::new();
        if i > 0 {
            // The bound (2 lines) keeps the last exchange only.
            expected.push(turn("user", "tell me a story"));
            expected.push(turn("assistant", "Once upon a time."));
        }
        expected.push(turn("user", "tell me a story"));
        assert_eq!(messages, expected, "request {i}: {sent}");
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT session_id, role FROM conversation_messages ORDER BY created_at_ms, message_id",
    )
    .fetch_all(app.app_ctx.db.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("s-3".to_owned(), "user".to_owned()),
            ("s-3".to_owned(), "assistant".to_owned())
        ]
    );
    app.stop().await;
}
