//! Property tests for the topic contract and the codec.

use std::collections::BTreeMap;

use companion_schema::*;
use proptest::prelude::*;
use serde_bytes::ByteBuf;

fn device_id() -> impl Strategy<Value = DeviceId> {
    "[a-z0-9-]{1,64}".prop_map(|s| DeviceId::parse(&s).expect("grammar"))
}

fn session_id() -> impl Strategy<Value = SessionId> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| SessionId::parse(&s).expect("grammar"))
}

fn persona_id() -> impl Strategy<Value = PersonaId> {
    "[a-z0-9_-]{1,64}".prop_map(|s| PersonaId::parse(&s).expect("grammar"))
}

fn kind() -> impl Strategy<Value = TopicKind> {
    prop::sample::select(TopicKind::ALL.to_vec())
}

fn finite_f32() -> impl Strategy<Value = f32> {
    -1.0e6f32..1.0e6f32
}

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn rgb() -> impl Strategy<Value = Rgb> {
    any::<[u8; 3]>()
}

fn status() -> impl Strategy<Value = Status> {
    (any::<bool>(), text(), text(), any::<u64>()).prop_map(|(online, a, b, ts_ms)| Status {
        v: 1,
        online,
        agent_version: a,
        boot_id: b,
        ts_ms,
    })
}

fn telemetry() -> impl Strategy<Value = Telemetry> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(finite_f32()),
        proptest::option::of(finite_f32()),
        proptest::option::of(any::<i16>()),
        proptest::option::of(any::<u64>()),
        prop::collection::btree_map("[a-z_]{1,10}", -1.0e9f64..1.0e9, 0..4),
    )
        .prop_map(
            |(seq, ts_ms, uptime_s, battery_pct, cpu_temp_c, rssi_dbm, free_mem_kb, extra)| {
                Telemetry {
                    v: 1,
                    seq,
                    ts_ms,
                    uptime_s,
                    battery_pct,
                    cpu_temp_c,
                    rssi_dbm,
                    free_mem_kb,
                    extra,
                }
            },
        )
}

fn button() -> impl Strategy<Value = ButtonEvent> {
    (
        any::<u64>(),
        any::<u64>(),
        "[a-z]{1,10}",
        prop::sample::select(vec![
            ButtonAction::Press,
            ButtonAction::Release,
            ButtonAction::LongPress,
            ButtonAction::DoublePress,
        ]),
    )
        .prop_map(|(seq, ts_ms, button, action)| ButtonEvent {
            v: 1,
            seq,
            ts_ms,
            button,
            action,
        })
}

fn audio() -> impl Strategy<Value = AudioChunk> {
    (
        session_id(),
        any::<u32>(),
        any::<u64>(),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..6),
        any::<bool>(),
    )
        .prop_map(|(session_id, seq, ts_ms, frames, last)| AudioChunk {
            v: 1,
            session_id,
            seq,
            ts_ms,
            codec: Codec::Opus,
            sample_rate: AUDIO_SAMPLE_RATE,
            frame_ms: AUDIO_FRAME_MS,
            frames: frames.into_iter().map(ByteBuf::from).collect(),
            last,
        })
}

fn session_control() -> impl Strategy<Value = SessionControl> {
    (
        session_id(),
        prop::sample::select(vec![
            SessionAction::Start,
            SessionAction::Stop,
            SessionAction::Cancel,
        ]),
        proptest::option::of(text()),
    )
        .prop_map(|(session_id, action, reason)| SessionControl {
            v: 1,
            session_id,
            action,
            reason,
        })
}

fn session_event() -> impl Strategy<Value = SessionEvent> {
    (
        session_id(),
        prop::sample::select(vec![
            SessionState::Listening,
            SessionState::Thinking,
            SessionState::Speaking,
            SessionState::Idle,
            SessionState::Error,
        ]),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
    )
        .prop_map(
            |(session_id, state, transcript, reply_text, error)| SessionEvent {
                v: 1,
                session_id,
                state,
                transcript,
                reply_text,
                error,
            },
        )
}

fn led() -> impl Strategy<Value = LedCommand> {
    (
        prop::sample::select(vec![
            LedPattern::Off,
            LedPattern::Solid,
            LedPattern::Pulse,
            LedPattern::Blink,
            LedPattern::Spin,
        ]),
        rgb(),
        any::<u8>(),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(pattern, color, brightness, duration_ms)| LedCommand {
            v: 1,
            pattern,
            color,
            brightness,
            duration_ms,
        })
}

fn persona() -> impl Strategy<Value = PersonaState> {
    (persona_id(), text(), rgb(), text(), any::<u64>(), text()).prop_map(
        |(persona_id, name, color, voice, switched_at_ms, trigger)| PersonaState {
            v: 1,
            persona_id,
            name,
            color,
            voice,
            switched_at_ms,
            trigger,
        },
    )
}

fn config() -> impl Strategy<Value = DeviceConfig> {
    (
        any::<u32>(),
        0u8..=100,
        prop::collection::btree_map("[a-z]{1,8}", "[a-z]{1,8}", 0..4),
        proptest::option::of(any::<u8>()),
    )
        .prop_map(
            |(telemetry_interval_s, volume, buttons, led_brightness)| DeviceConfig {
                v: 1,
                telemetry_interval_s,
                volume,
                buttons,
                led_brightness,
            },
        )
}

fn payload() -> impl Strategy<Value = (TopicKind, Payload)> {
    prop_oneof![
        status().prop_map(|m| (TopicKind::Status, Payload::Status(m))),
        telemetry().prop_map(|m| (TopicKind::Telemetry, Payload::Telemetry(m))),
        button().prop_map(|m| (TopicKind::Button, Payload::Button(m))),
        audio().prop_map(|m| (TopicKind::AudioUp, Payload::Audio(m))),
        audio().prop_map(|m| (TopicKind::AudioDown, Payload::Audio(m))),
        session_control().prop_map(|m| (TopicKind::SessionUp, Payload::SessionControl(m))),
        session_event().prop_map(|m| (TopicKind::SessionDown, Payload::SessionEvent(m))),
        led().prop_map(|m| (TopicKind::Led, Payload::Led(m))),
        persona().prop_map(|m| (TopicKind::Persona, Payload::Persona(m))),
        config().prop_map(|m| (TopicKind::Config, Payload::Config(m))),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips((kind, msg) in payload()) {
        let bytes = msg.encode().expect("encodes");
        prop_assert!(bytes.len() <= MAX_PAYLOAD);
        let back = Payload::decode(kind, &bytes).expect("decodes");
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn random_bytes_never_panic(k in kind(), bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        // Either outcome is fine; panicking is not.
        let _ = Payload::decode(k, &bytes);
    }

    #[test]
    fn mutated_valid_payloads_never_panic(
        (kind, msg) in payload(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = msg.encode().expect("encodes");
        if !bytes.is_empty() {
            for (i, b) in flips {
                let at = i.index(bytes.len());
                bytes[at] = b;
            }
        }
        let _ = Payload::decode(kind, &bytes);
    }

    #[test]
    fn every_topic_round_trips(d in device_id(), k in kind()) {
        let t = Topic::new(d, k);
        prop_assert_eq!(Topic::parse(&t.to_string()), Ok(t));
    }

    #[test]
    fn invalid_device_ids_are_rejected(s in "[^a-z0-9-]{1,3}|[a-z0-9-]{65,80}|") {
        prop_assert!(DeviceId::parse(&s).is_err());
        let topic = format!("devices/{s}/telemetry");
        prop_assert!(Topic::parse(&topic).is_err());
    }

    #[test]
    fn foreign_topics_are_rejected(s in "[a-zA-Z0-9/+#$]{0,40}") {
        prop_assume!(!s.starts_with("devices/"));
        prop_assert!(Topic::parse(&s).is_err());
    }
}

#[test]
fn payloads_are_maps_with_named_fields() {
    let msg = LedCommand {
        v: 1,
        pattern: LedPattern::Pulse,
        color: [255, 160, 0],
        brightness: 200,
        duration_ms: None,
    };
    let bytes = encode(&msg).unwrap();
    // 0x8N: a fixmap with N entries, keys are strings.
    assert_eq!(bytes[0] & 0xf0, 0x80);
    let as_map: BTreeMap<String, rmpv_free::Any> = rmp_serde::from_slice(&bytes).unwrap();
    assert!(as_map.contains_key("pattern"));
    assert!(as_map.contains_key("v"));
}

#[test]
fn an_oversized_payload_is_refused_both_ways() {
    let chunk = AudioChunk {
        v: 1,
        session_id: SessionId::parse("s").unwrap(),
        seq: 0,
        ts_ms: 0,
        codec: Codec::Opus,
        sample_rate: AUDIO_SAMPLE_RATE,
        frame_ms: AUDIO_FRAME_MS,
        frames: vec![ByteBuf::from(vec![0u8; MAX_PAYLOAD])],
        last: false,
    };
    assert!(matches!(encode(&chunk), Err(EncodeError::TooLarge { .. })));
    let big = vec![0u8; MAX_PAYLOAD + 1];
    assert!(matches!(
        decode::<AudioChunk>(&big),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn version_zero_is_rejected_and_newer_versions_with_extra_fields_are_read() {
    #[derive(serde::Serialize)]
    struct FutureButton<'a> {
        v: u8,
        seq: u64,
        ts_ms: u64,
        button: &'a str,
        action: &'a str,
        pressure: f32,
    }
    let future = rmp_serde::to_vec_named(&FutureButton {
        v: 2,
        seq: 1,
        ts_ms: 2,
        button: "talk",
        action: "press",
        pressure: 0.5,
    })
    .unwrap();
    let read: ButtonEvent = decode(&future).unwrap();
    assert_eq!(read.action, ButtonAction::Press);

    let zero = rmp_serde::to_vec_named(&FutureButton {
        v: 0,
        seq: 1,
        ts_ms: 2,
        button: "talk",
        action: "press",
        pressure: 0.5,
    })
    .unwrap();
    assert!(matches!(
        decode::<ButtonEvent>(&zero),
        Err(DecodeError::Version(0))
    ));
}

#[test]
fn audio_chunk_debug_prints_lengths_not_bytes() {
    let chunk = AudioChunk {
        v: 1,
        session_id: SessionId::parse("s1").unwrap(),
        seq: 3,
        ts_ms: 0,
        codec: Codec::Opus,
        sample_rate: AUDIO_SAMPLE_RATE,
        frame_ms: AUDIO_FRAME_MS,
        frames: vec![ByteBuf::from(vec![0xAB; 10]), ByteBuf::from(vec![0xCD; 5])],
        last: true,
    };
    let dbg = format!("{chunk:?}");
    assert!(dbg.contains("frames: 2"), "{dbg}");
    assert!(dbg.contains("bytes: 15"), "{dbg}");
    assert!(!dbg.contains("171"), "{dbg}");
}

mod rmpv_free {
    /// Accepts any MessagePack value without keeping it.
    pub type Any = serde::de::IgnoredAny;
}
