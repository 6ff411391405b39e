//! `companion-agent talk --wav` as a real process against the real broker and a backend double
//! that answers like the voice pipeline: thinking (transcript), speaking (reply text), reply
//! audio, idle.

mod common;

use std::process::Stdio;

use common::*;
use companion_agent::audio::codec::Encoder;
use companion_agent::hw::FRAME_SAMPLES;
use companion_schema::{
    AudioChunk, Codec, Payload, SessionAction, SessionEvent, SessionId, SessionState, TopicKind,
};
use serde_bytes::ByteBuf;

const DEVICE: &str = "pi-talk";
const TOKEN: &str = "token-talk";

fn event(
    s: &SessionId,
    state: SessionState,
    transcript: Option<&str>,
    reply: Option<&str>,
) -> Payload {
    Payload::SessionEvent(SessionEvent {
        v: 1,
        session_id: s.clone(),
        state,
        transcript: transcript.map(Into::into),
        reply_text: reply.map(Into::into),
        error: None,
    })
}

/// Answers one utterance; returns how many audio chunks it received. The router does not keep
/// order across topics, so audio may overtake its `start` and the `stop` may overtake the
/// audio (the real backend copes the same way): chunks are counted by session, and the
/// answer goes out once the `stop` and the chunk marked `last` are both in.
async fn voice_double(mut backend: Backend) -> usize {
    let mut counts: std::collections::HashMap<SessionId, usize> = Default::default();
    let mut last_seen = None;
    let mut stopped = None;
    loop {
        if let Some(s) = stopped.as_ref().filter(|s| last_seen.as_ref() == Some(*s)) {
            answer(&backend, s).await;
            return counts.get(s).copied().unwrap_or(0);
        }
        let (_, p) = backend.rx.recv().await.expect("backend running");
        match p {
            Payload::SessionControl(c) if c.action == SessionAction::Start => {
                backend
                    .send(
                        TopicKind::SessionDown,
                        &event(&c.session_id, SessionState::Listening, None, None),
                    )
                    .await;
            }
            Payload::Audio(a) => {
                *counts.entry(a.session_id.clone()).or_default() += 1;
                if a.last {
                    last_seen = Some(a.session_id);
                }
            }
            Payload::SessionControl(c) if c.action == SessionAction::Stop => {
                stopped = Some(c.session_id);
            }
            _ => {}
        }
    }
}

/// The double's answer to one utterance: thinking, speaking, reply audio, idle.
async fn answer(backend: &Backend, s: &SessionId) {
    backend
        .send(
            TopicKind::SessionDown,
            &event(s, SessionState::Thinking, Some("what time is it"), None),
        )
        .await;
    backend
        .send(
            TopicKind::SessionDown,
            &event(s, SessionState::Speaking, None, Some("Time for tea.")),
        )
        .await;
    let mut enc = Encoder::new(24_000).unwrap();
    let n = 20u32;
    for seq in 0..n {
        let frames = (0..3)
            .map(|f| {
                let mut pcm = [0i16; FRAME_SAMPLES];
                for (i, x) in pcm.iter_mut().enumerate() {
                    let t = ((seq * 3 + f) as usize * FRAME_SAMPLES + i) as f32 / 16e3;
                    *x = (8000.0 * (2.0 * std::f32::consts::PI * 300.0 * t).sin()) as i16;
                }
                ByteBuf::from(enc.encode(&pcm).unwrap())
            })
            .collect();
        let chunk = AudioChunk {
            v: 1,
            session_id: s.clone(),
            seq,
            ts_ms: 0,
            codec: Codec::Opus,
            sample_rate: 16_000,
            frame_ms: 20,
            frames,
            last: seq == n - 1,
        };
        backend
            .send(TopicKind::AudioDown, &Payload::Audio(chunk))
            .await;
    }
    backend
        .send(
            TopicKind::SessionDown,
            &event(s, SessionState::Idle, None, None),
        )
        .await;
}

fn write_tone(path: &std::path::Path, seconds: f32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..(16_000.0 * seconds) as usize {
        let t = i as f32 / 16e3;
        w.write_sample((5000.0 * (2.0 * std::f32::consts::PI * 220.0 * t).sin()) as i16)
            .unwrap();
    }
    w.finalize().unwrap();
}

#[tokio::test]
async fn talk_with_a_wav_prints_the_session_and_writes_a_non_silent_reply() {
    let broker = TestBroker::start(&[(DEVICE, TOKEN)]).await;
    let backend = broker.backend(DEVICE).await;
    let double = tokio::spawn(voice_double(backend));
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.wav");
    let reply = dir.path().join("reply.wav");
    write_tone(&input, 1.0);
    let env = env_file(
        dir.path(),
        &[
            ("DEVICE_ID", DEVICE.into()),
            (
                "CONTROL_PLANE_URL",
                format!("mqtts://localhost:{}", broker.tls.port()),
            ),
            ("DEVICE_AUTH_TOKEN", TOKEN.into()),
            ("CA_CERT", broker.ca_pem.display().to_string()),
            ("CACHE_DIR", dir.path().join("cache").display().to_string()),
        ],
    );
    let out = tokio::time::timeout(
        DEADLINE,
        agent_command(&env)
            .arg("talk")
            .arg("--wav")
            .arg(&input)
            .arg("--out")
            .arg(&reply)
            .arg("--fast")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("talk finishes in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("transcript: what time is it"), "{stdout}");
    assert!(stdout.contains("reply: Time for tea."), "{stdout}");
    // 1 s of input is 50 frames: 16 full chunks and a last one with the remainder.
    assert_eq!(double.await.unwrap(), 17);

    let samples: Vec<i16> = hound::WavReader::open(&reply)
        .unwrap()
        .into_samples::<i16>()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        samples.len(),
        60 * FRAME_SAMPLES,
        "every reply frame was played"
    );
    let rms =
        (samples.iter().map(|s| (*s as f64).powi(2)).sum::<f64>() / samples.len() as f64).sqrt();
    assert!(rms > 1000.0, "the reply is not silent (rms {rms})");
}
