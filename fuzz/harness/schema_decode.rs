//! Fuzz harness `schema_decode`: the schema's payload decoders and topic parser, as the backend
//! runs them on what devices publish. Shared by `fuzz/fuzz_targets/schema_decode.rs` and the
//! corpus replay test `schema/tests/fuzz_corpus.rs`.
//!
//! Input: the first byte picks the topic kind (modulo the number of kinds); the rest is the
//! payload. The whole input, as text, is also a topic name and an identifier.
//!
//! Checked: nothing panics; a payload that decodes re-encodes, and the re-encoding decodes to
//! a payload that encodes to the same bytes (bytes, not `==`: a decoded `f32` may be NaN);
//! a topic that parses prints as a string that parses to the same topic.

use companion_schema::{DeviceId, Payload, PersonaId, SessionId, Topic, TopicKind};

pub fn run(data: &[u8]) {
    if let Some((&selector, payload)) = data.split_first() {
        let kind = TopicKind::ALL[usize::from(selector) % TopicKind::ALL.len()];
        payload_round_trip(kind, payload);
    }
    let text = String::from_utf8_lossy(data);
    topic_round_trip(&text);
    if let Ok(id) = DeviceId::parse(&text) {
        let printed = id.to_string();
        assert_eq!(printed, text, "an id prints as it was written");
        assert_eq!(DeviceId::parse(&printed).as_ref(), Ok(&id));
    }
    if let Ok(id) = PersonaId::parse(&text) {
        let printed = id.to_string();
        assert_eq!(printed, text, "an id prints as it was written");
        assert_eq!(PersonaId::parse(&printed).as_ref(), Ok(&id));
    }
    if let Ok(id) = SessionId::parse(&text) {
        let printed = id.to_string();
        assert_eq!(printed, text, "an id prints as it was written");
        assert_eq!(SessionId::parse(&printed).as_ref(), Ok(&id));
    }
}

fn payload_round_trip(kind: TopicKind, bytes: &[u8]) {
    let Ok(decoded) = Payload::decode(kind, bytes) else {
        return;
    };
    // A payload that came in under the size limit may re-encode larger (named fields for
    // fields it left out): refusing it then is the encoder's job, not a crash.
    let Ok(encoded) = decoded.encode() else {
        return;
    };
    let again = Payload::decode(kind, &encoded)
        .unwrap_or_else(|e| panic!("{kind:?}: re-encoded payload does not decode: {e}"));
    let encoded_again = again
        .encode()
        .unwrap_or_else(|e| panic!("{kind:?}: decoded payload does not re-encode: {e}"));
    assert_eq!(encoded, encoded_again, "{kind:?}: encoding is not stable");
}

fn topic_round_trip(text: &str) {
    let Ok(topic) = Topic::parse(text) else {
        return;
    };
    let printed = topic.to_string();
    assert_eq!(printed, text, "a parsed topic prints as it was written");
    assert_eq!(Topic::parse(&printed).as_ref(), Ok(&topic));
}
