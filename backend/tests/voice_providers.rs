//! Provider clients against local servers speaking each provider's documented wire format.

mod voice_fake;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use companion_backend::personas::{Persona, PersonaSet};
use companion_backend::settings::Secret;
use companion_backend::voice::providers::anthropic::Anthropic;
use companion_backend::voice::providers::elevenlabs::ElevenLabs;
use companion_backend::voice::providers::http::Http;
use companion_backend::voice::providers::openai::OpenAi;
use companion_backend::voice::providers::{
    ChatRequest, LanguageModel, LlmEvent, ProviderError, SpeechToText, TextToSpeech, Usage,
};
use companion_backend::voice::{ChatTurn, Role, VoiceSettings};
use futures::StreamExt;
use voice_fake::*;

fn settings() -> VoiceSettings {
    VoiceSettings {
        request_timeout_ms: 500,
        stream_idle_timeout_ms: 500,
        ..VoiceSettings::default()
    }
}

fn persona() -> Arc<Persona> {
    PersonaSet::load(None, "aria")
        .unwrap()
        .default_persona()
        .clone()
}

fn turns() -> Vec<ChatTurn> {
    vec![ChatTurn {
        role: Role::User,
        content: "What is the weather like?".into(),
    }]
}

fn anthropic(server: &FakeServer) -> Anthropic {
    Anthropic::new(
        Http::new(&settings()).unwrap(),
        &server.url(),
        Secret::new("sk-ant-test"),
        "2023-06-01",
    )
}

fn openai(server: &FakeServer) -> OpenAi {
    OpenAi::new(
        Http::new(&settings()).unwrap(),
        &format!("{}/v1", server.url()),
        Secret::new("sk-openai-test"),
    )
}

/// Streams a reply to the end; returns the events and the terminal error, if any.
async fn run(llm: &dyn LanguageModel) -> (Vec<LlmEvent>, Option<ProviderError>) {
    let persona = persona();
    let turns = turns();
    let req = ChatRequest {
        persona: &persona,
        model: "test-model",
        turns: &turns,
        max_tokens: 100,
    };
    let mut stream = match llm.stream(&req).await {
        Ok(s) => s,
        Err(e) => return (vec![], Some(e)),
    };
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(e) => events.push(e),
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

fn text_of(events: &[LlmEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            LlmEvent::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn anthropic_streams_text_ignores_pings_and_unknown_events_and_keeps_the_last_usage() {
    let mut parts = anthropic_start(25);
    parts.push(sse("ping", r#"{"type": "ping"}"#));
    parts.push(anthropic_text("Hello"));
    parts.push(sse(
        "brand_new_event",
        r#"{"type":"brand_new_event","x":1}"#,
    ));
    parts.push(sse(
        "message_delta",
        r#"{"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":3}}"#,
    ));
    parts.push(anthropic_text(" there."));
    parts.extend(anthropic_end(12));
    let server = FakeServer::always(Canned::new(200, "text/event-stream", parts)).await;
    let (events, err) = run(&anthropic(&server)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "Hello there.");
    assert_eq!(
        events.last(),
        Some(&LlmEvent::Done(Some(Usage {
            input_tokens: 25,
            output_tokens: 12
        })))
    );
    let req = &server.requests()[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.uri, "/v1/messages");
    assert_eq!(req.header("x-api-key"), Some("sk-ant-test"));
    assert_eq!(req.header("anthropic-version"), Some("2023-06-01"));
    let body = req.json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["model"], "test-model");
    assert!(body["system"].as_str().unwrap().contains("Aria"));
    assert_eq!(body["messages"][0]["role"], "user");
}

#[tokio::test]
async fn an_anthropic_overloaded_error_mid_stream_ends_the_reply_with_an_api_error() {
    let mut parts = anthropic_start(5);
    parts.push(anthropic_text("Let me think"));
    parts.push(sse(
        "error",
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    ));
    parts.push(anthropic_text("never seen"));
    let server = FakeServer::always(Canned::new(200, "text/event-stream", parts)).await;
    let (events, err) = run(&anthropic(&server)).await;
    assert_eq!(text_of(&events), "Let me think");
    let err = err.expect("an error");
    assert_eq!(err.kind(), "api_error");
    assert!(err.to_string().contains("overloaded_error"), "{err}");
}

#[tokio::test]
async fn a_malformed_anthropic_event_is_skipped_and_the_rest_of_the_reply_kept() {
    let mut parts = anthropic_start(5);
    parts.push(anthropic_text("One."));
    parts.push(sse(
        "content_block_delta",
        "{\"type\":\"content_block_delta\",\"delta\":",
    ));
    parts.push(anthropic_text(" Two."));
    parts.extend(anthropic_end(4));
    let server = FakeServer::always(Canned::new(200, "text/event-stream", parts)).await;
    let (events, err) = run(&anthropic(&server)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "One. Two.");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, LlmEvent::Skipped(_)))
            .count(),
        1
    );
}

#[tokio::test]
async fn a_stream_cut_before_message_stop_is_malformed() {
    let mut parts = anthropic_start(5);
    parts.push(anthropic_text("Half a"));
    let server = FakeServer::always(Canned::new(200, "text/event-stream", parts)).await;
    let (_, err) = run(&anthropic(&server)).await;
    assert_eq!(err.expect("an error").kind(), "malformed");
}

#[tokio::test]
async fn an_http_500_is_a_server_error_and_is_not_retried() {
    let server = FakeServer::always(Canned::json(
        500,
        r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#,
    ))
    .await;
    let (_, err) = run(&anthropic(&server)).await;
    let err = err.expect("an error");
    assert_eq!(err.kind(), "server_error");
    assert!(err.to_string().contains("Internal server error"), "{err}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn an_overloaded_529_before_the_stream_is_retried_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let server = FakeServer::start(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Canned::json(
                529,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            )
        } else {
            anthropic_reply(&["Back again."])
        }
    })
    .await;
    let (events, err) = run(&anthropic(&server)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "Back again.");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn a_provider_that_never_answers_times_out() {
    let server = FakeServer::always(Canned::hang()).await;
    let (_, err) = run(&anthropic(&server)).await;
    assert_eq!(err.expect("an error").kind(), "timeout");
    assert_eq!(server.requests().len(), 1, "timeouts are not retried");
}

#[tokio::test]
async fn a_stream_that_stalls_mid_reply_times_out() {
    let mut parts = anthropic_start(5);
    parts.push(anthropic_text("And then"));
    parts.push(Part::Hang);
    let server = FakeServer::always(Canned::new(200, "text/event-stream", parts)).await;
    let (events, err) = run(&anthropic(&server)).await;
    assert_eq!(text_of(&events), "And then");
    assert_eq!(err.expect("an error").kind(), "timeout");
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let llm = Anthropic::new(
        Http::new(&VoiceSettings {
            max_retries: 0,
            ..settings()
        })
        .unwrap(),
        &format!("http://{addr}"),
        Secret::new("k"),
        "2023-06-01",
    );
    let (_, err) = run(&llm).await;
    assert_eq!(err.expect("an error").kind(), "connect");
}

#[tokio::test]
async fn openai_chat_streams_text_and_reads_usage_from_a_final_chunk_with_null_choices() {
    let parts = vec![
        data(
            r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#,
        ),
        data(
            r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Sunny"},"finish_reason":null}],"usage":null}"#,
        ),
        data("{malformed"),
        data(
            r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" today."},"finish_reason":null}],"usage":null}"#,
        ),
        data(
            r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
        ),
        data(
            r#"{"id":"c1","object":"chat.completion.chunk","choices":null,"usage":{"prompt_tokens":31,"completion_tokens":4,"total_tokens":35}}"#,
        ),
        data("[DONE]"),
    ];
    let server = FakeServer::always(Canned::new(200, "text/event-stream", parts)).await;
    let (events, err) = run(&openai(&server)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&events), "Sunny today.");
    assert_eq!(
        events.last(),
        Some(&LlmEvent::Done(Some(Usage {
            input_tokens: 31,
            output_tokens: 4
        })))
    );
    let req = &server.requests()[0];
    assert_eq!(req.uri, "/v1/chat/completions");
    assert_eq!(req.header("authorization"), Some("Bearer sk-openai-test"));
    let body = req.json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["content"], "What is the weather like?");
}

#[tokio::test]
async fn openai_transcription_uploads_a_multipart_wav_and_reads_the_text() {
    let server = FakeServer::always(Canned::json(200, r#"{"text":" hello world "}"#)).await;
    let pcm: Vec<i16> = (0..16_000).map(|i| ((i % 100) * 50) as i16).collect();
    let text = openai(&server).transcribe(&pcm).await.unwrap();
    assert_eq!(text, "hello world");
    let req = &server.requests()[0];
    assert_eq!(req.uri, "/v1/audio/transcriptions");
    assert!(req
        .header("content-type")
        .unwrap()
        .starts_with("multipart/form-data; boundary="));
    let body = String::from_utf8_lossy(&req.body);
    assert!(
        body.contains("name=\"model\"\r\n\r\nwhisper-1"),
        "{body:.300}"
    );
    assert!(body.contains("filename=\"audio.wav\""));
    assert!(body.contains("Content-Type: audio/wav"));
    assert!(body.contains("RIFF") && body.contains("WAVE"));
    assert!(req.body.len() > 32_000);
}

#[tokio::test]
async fn openai_speech_at_24khz_arrives_chunked_and_is_resampled_to_16khz() {
    let pcm = tone_pcm(24_000, 1.0);
    let server = FakeServer::always(Canned::new(200, "audio/pcm", chunked(&pcm, 1_001))).await;
    let tts = openai(&server);
    let mut audio = tts.synthesize("Hello.", "nova").await.unwrap();
    let mut samples = Vec::new();
    while let Some(chunk) = audio.next().await {
        samples.extend(chunk.unwrap());
    }
    assert!(
        (samples.len() as i64 - 16_000).abs() <= 2,
        "{}",
        samples.len()
    );
    let body = server.requests()[0].json();
    assert_eq!(body["response_format"], "pcm");
    assert_eq!(body["voice"], "nova");
    assert_eq!(body["input"], "Hello.");
    assert_eq!(server.requests()[0].uri, "/v1/audio/speech");
}

#[tokio::test]
async fn elevenlabs_streams_pcm_16000_with_the_xi_api_key_header() {
    let pcm = tone_pcm(16_000, 0.5);
    let server = FakeServer::always(Canned::new(200, "audio/pcm", chunked(&pcm, 777))).await;
    let tts = ElevenLabs::new(
        Http::new(&settings()).unwrap(),
        &server.url(),
        Secret::new("xi-test"),
        "eleven_flash_v2_5",
    );
    let persona = persona();
    let voice = tts.voice(&persona).expect("aria has an ElevenLabs voice");
    let mut audio = tts.synthesize("Hi there.", &voice).await.unwrap();
    let mut samples = Vec::new();
    while let Some(chunk) = audio.next().await {
        samples.extend(chunk.unwrap());
    }
    let expected: Vec<i16> = pcm
        .chunks(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert_eq!(samples, expected);
    let req = &server.requests()[0];
    assert_eq!(
        req.uri,
        format!("/v1/text-to-speech/{voice}/stream?output_format=pcm_16000")
    );
    assert_eq!(req.header("xi-api-key"), Some("xi-test"));
    assert_eq!(req.json()["text"], "Hi there.");
}

#[tokio::test]
async fn a_speech_stream_that_fails_with_500_reports_a_server_error() {
    let server = FakeServer::always(Canned::json(500, r#"{"detail":"boom"}"#)).await;
    let tts = openai(&server);
    let err = tts.synthesize("Hi.", "nova").await.err().expect("an error");
    assert_eq!(err.kind(), "server_error");
}
