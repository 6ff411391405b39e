//! What a device is shown of its conversation: `session/down` events and the LED pattern for
//! each session state, in the current persona's colour.

use companion_schema::{
    DeviceId, LedCommand, LedPattern, SessionEvent, SessionId, SessionState, TopicKind,
    SCHEMA_VERSION,
};

use super::Runtime;
use crate::personas::Persona;

/// The LEDs for a session state in `persona`'s colour (idle is also the persona at rest).
pub(super) fn led_for(state: SessionState, persona: &Persona) -> LedCommand {
    let (pattern, color, brightness) = match state {
        SessionState::Listening => (LedPattern::Pulse, persona.color, 255),
        SessionState::Thinking => (LedPattern::Spin, persona.color, 255),
        SessionState::Speaking => (LedPattern::Solid, persona.color, 255),
        SessionState::Idle => (LedPattern::Solid, persona.color, 96),
        SessionState::Error => (LedPattern::Blink, [255, 40, 40], 255),
    };
    LedCommand {
        v: SCHEMA_VERSION,
        pattern,
        color,
        brightness,
        duration_ms: matches!(state, SessionState::Error).then_some(2000),
    }
}

/// A session event in `state` with nothing else set.
pub(super) fn event(id: &SessionId, state: SessionState) -> SessionEvent {
    SessionEvent {
        v: SCHEMA_VERSION,
        session_id: id.clone(),
        state,
        transcript: None,
        reply_text: None,
        error: None,
    }
}

/// Publishes a session event and the matching LED command.
pub(super) async fn announce(
    rt: &Runtime,
    device: &DeviceId,
    persona: &Persona,
    event: SessionEvent,
) {
    let state = event.state;
    if let Err(e) = rt.bus.publish(device, TopicKind::SessionDown, &event).await {
        tracing::warn!(device_id = %device, error = %e, "publishing a session event failed");
    }
    let _ = rt
        .bus
        .publish(device, TopicKind::Led, &led_for(state, persona))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_blink_red_for_two_seconds_whatever_the_persona() {
        let personas = crate::personas::PersonaSet::load(None, "aria").expect("built-in personas");
        let persona = personas.default_persona();
        let led = led_for(SessionState::Error, persona);
        assert_eq!(led.pattern, LedPattern::Blink);
        assert_eq!(led.color, [255, 40, 40]);
        assert_eq!(led.duration_ms, Some(2000));
        let idle = led_for(SessionState::Idle, persona);
        assert_eq!(idle.color, persona.color);
        assert!(idle.brightness < led_for(SessionState::Speaking, persona).brightness);
        assert_eq!(idle.duration_ms, None);
    }
}
