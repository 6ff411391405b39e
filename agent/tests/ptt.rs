//! Push-to-talk, replies and LEDs with simulated hardware against the real broker and a
//! backend double.

mod common;

use common::*;
use companion_agent::audio::codec::{Decoder, Encoder};
use companion_agent::controller::Observed;
use companion_agent::hw::FRAME_SAMPLES;
use companion_schema::{
    AudioChunk, ButtonAction, Codec, LedPattern, Payload, PersonaId, PersonaState, SessionAction,
    SessionEvent, SessionId, SessionState, TopicKind,
};
use serde_bytes::ByteBuf;

const DEVICE: &str = "pi-ptt";
const TOKEN: &str = "token-ptt";

async fn setup() -> (TestBroker, Backend, InProcessAgent, tempfile::TempDir) {
    let broker = TestBroker::start(&[(DEVICE, TOKEN)]).await;
    let backend = broker.backend(DEVICE).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = InProcessAgent::start(
        settings(DEVICE, TOKEN, broker.plain, None, &dir.path().join("cache")),
        60_000,
        AgentHw::default(),
    );
    agent
        .wait_for("connected", |o| *o == Observed::Connected(true))
        .await;
    (broker, backend, agent, dir)
}

fn event(session: &SessionId, state: SessionState) -> Payload {
    Payload::SessionEvent(SessionEvent {
        v: 1,
        session_id: session.clone(),
        state,
        transcript: None,
        reply_text: None,
        error: None,
    })
}

/// `n` chunks of three 20 ms frames of a tone.
fn reply_chunks(session: &SessionId, n: u32, last: bool) -> Vec<Payload> {
    let mut enc = Encoder::new(24_000).unwrap();
    (0..n)
        .map(|seq| {
            let frames = (0..3)
                .map(|f| {
                    let mut pcm = [0i16; FRAME_SAMPLES];
                    for (i, s) in pcm.iter_mut().enumerate() {
                        let t = ((seq * 3 + f) as usize * FRAME_SAMPLES + i) as f32 / 16_000.0;
                        *s = (6000.0 * (2.0 * std::f32::consts::PI * 330.0 * t).sin()) as i16;
                    }
                    ByteBuf::from(enc.encode(&pcm).unwrap())
                })
                .collect();
            Payload::Audio(AudioChunk {
                v: 1,
                session_id: session.clone(),
                seq,
                ts_ms: 0,
                codec: Codec::Opus,
                sample_rate: 16_000,
                frame_ms: 20,
                frames,
                last: last && seq == n - 1,
            })
        })
        .collect()
}

async fn control(backend: &mut Backend, action: SessionAction) -> SessionId {
    match backend
        .wait_for(
            "session control",
            |p| matches!(p, Payload::SessionControl(c) if c.action == action),
        )
        .await
    {
        Payload::SessionControl(c) => c.session_id,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_persona_button_press_switches_the_led_to_the_persona_colour() {
    let (_broker, mut backend, mut agent, _dir) = setup().await;
    agent.press("persona", ButtonAction::Press).await;
    let Payload::Button(b) = backend
        .wait_for("button event", |p| matches!(p, Payload::Button(_)))
        .await
    else {
        unreachable!()
    };
    assert_eq!(
        (b.button.as_str(), b.action),
        ("persona", ButtonAction::Press)
    );
    // The backend's rule switches persona and tells the device (retained).
    backend
        .send(
            TopicKind::Persona,
            &Payload::Persona(PersonaState {
                v: 1,
                persona_id: PersonaId::parse("pirate").unwrap(),
                name: "Pirate".into(),
                color: [0, 200, 50],
                voice: "en+m3".into(),
                switched_at_ms: 1,
                trigger: "button".into(),
            }),
        )
        .await;
    agent
        .wait_for("persona", |o| matches!(o, Observed::Persona(_)))
        .await;
    let led = *agent.led.borrow();
    assert_eq!(led.color, [0, 200, 50]);
    assert_eq!(led.pattern, LedPattern::Solid);
    agent.stop().await;
}

#[tokio::test]
async fn push_to_talk_streams_opus_and_a_press_during_the_reply_barges_in() {
    let (_broker, mut backend, mut agent, _dir) = setup().await;
    agent.press("talk", ButtonAction::Press).await;
    let first = control(&mut backend, SessionAction::Start).await;
    assert_eq!(agent.led.borrow().brightness, 255, "listening lights up");

    // Audio arrives in order, three Opus frames per chunk, decodable.
    let mut dec = Decoder::new().unwrap();
    let mut pcm = Vec::new();
    for expected in 0..3u32 {
        let Payload::Audio(c) = backend
            .wait_for("audio", |p| matches!(p, Payload::Audio(_)))
            .await
        else {
            unreachable!()
        };
        assert_eq!(
            (c.session_id.clone(), c.seq, c.frames.len()),
            (first.clone(), expected, 3)
        );
        for f in &c.frames {
            dec.decode(Some(f), &mut pcm).unwrap();
            assert_eq!(pcm.len(), FRAME_SAMPLES);
        }
    }
    agent.press("talk", ButtonAction::Release).await;
    let Payload::Audio(last) = backend
        .wait_for(
            "the last chunk",
            |p| matches!(p, Payload::Audio(c) if c.last),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(last.session_id, first);
    assert_eq!(control(&mut backend, SessionAction::Stop).await, first);

    // The reply starts playing (2.4 s of audio, stream still open).
    backend
        .send(
            TopicKind::SessionDown,
            &event(&first, SessionState::Speaking),
        )
        .await;
    for c in reply_chunks(&first, 40, false) {
        backend.send(TopicKind::AudioDown, &c).await;
    }
    agent
        .wait_for("playback", |o| matches!(o, Observed::PlaybackStarted(_)))
        .await;
    assert_eq!(agent.led.borrow().pattern, LedPattern::Pulse);

    // Barge-in: cancel the reply, stop playback at once, start a new session.
    agent.press("talk", ButtonAction::Press).await;
    assert_eq!(control(&mut backend, SessionAction::Cancel).await, first);
    let second = control(&mut backend, SessionAction::Start).await;
    assert_ne!(second, first);
    let ended = agent
        .wait_for("playback end", |o| {
            matches!(o, Observed::PlaybackEnded { .. })
        })
        .await;
    assert_eq!(
        ended,
        Observed::PlaybackEnded {
            session: first,
            cancelled: true
        }
    );
    agent.press("talk", ButtonAction::Release).await;
    assert_eq!(control(&mut backend, SessionAction::Stop).await, second);
    agent.stop().await;
}

#[tokio::test]
async fn an_idle_event_cuts_an_unfinished_reply_but_a_complete_one_plays_out() {
    let (_broker, mut backend, mut agent, _dir) = setup().await;
    agent.press("talk", ButtonAction::Press).await;
    let s = control(&mut backend, SessionAction::Start).await;
    agent.press("talk", ButtonAction::Release).await;
    control(&mut backend, SessionAction::Stop).await;
    for c in reply_chunks(&s, 40, false) {
        backend.send(TopicKind::AudioDown, &c).await;
    }
    agent
        .wait_for("playback", |o| matches!(o, Observed::PlaybackStarted(_)))
        .await;
    backend
        .send(TopicKind::SessionDown, &event(&s, SessionState::Idle))
        .await;
    let ended = agent
        .wait_for("playback end", |o| {
            matches!(o, Observed::PlaybackEnded { .. })
        })
        .await;
    assert!(matches!(
        ended,
        Observed::PlaybackEnded {
            cancelled: true,
            ..
        }
    ));

    // A complete reply (last chunk seen) followed by idle plays to the end.
    agent.press("talk", ButtonAction::Press).await;
    let s2 = control(&mut backend, SessionAction::Start).await;
    agent.press("talk", ButtonAction::Release).await;
    control(&mut backend, SessionAction::Stop).await;
    for c in reply_chunks(&s2, 5, true) {
        backend.send(TopicKind::AudioDown, &c).await;
    }
    backend
        .send(TopicKind::SessionDown, &event(&s2, SessionState::Idle))
        .await;
    let ended = agent
        .wait_for("playback end", |o| {
            matches!(o, Observed::PlaybackEnded { .. })
        })
        .await;
    assert_eq!(
        ended,
        Observed::PlaybackEnded {
            session: s2,
            cancelled: false
        }
    );
    agent.stop().await;
}
