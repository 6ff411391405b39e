//! The device ACL (DESIGN.md): a device publishes only to its own up topics and subscribes
//! only to its own down topics. Wildcards, shared subscriptions and foreign topics never pass.

use companion_schema::{DeviceId, Direction, Topic, TopicKind};

/// The topic kind a device may publish to, or `None` if `topic` is outside its ACL.
pub fn may_publish(device: &DeviceId, topic: &str) -> Option<TopicKind> {
    own_topic(device, topic, Direction::Up)
}

/// Whether a device may subscribe to (or unsubscribe from) `filter`.
pub fn may_subscribe(device: &DeviceId, filter: &str) -> bool {
    own_topic(device, filter, Direction::Down).is_some()
}

fn own_topic(device: &DeviceId, topic: &str, direction: Direction) -> Option<TopicKind> {
    // `Topic::parse` refuses wildcards, `$share/...` and anything outside `devices/`.
    let topic = Topic::parse(topic).ok()?;
    (topic.device == *device && topic.direction() == direction).then_some(topic.kind)
}

/// Truncates what a client presented before it goes into an event or a log line.
pub fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_publishes_only_to_its_own_up_topics() {
        let a = DeviceId::parse("a").unwrap();
        assert_eq!(
            may_publish(&a, "devices/a/telemetry"),
            Some(TopicKind::Telemetry)
        );
        assert_eq!(
            may_publish(&a, "devices/a/audio/up"),
            Some(TopicKind::AudioUp)
        );
        for t in [
            "devices/b/telemetry",
            "devices/a/led",
            "other/x",
            "devices/+/telemetry",
            "#",
            "",
        ] {
            assert_eq!(may_publish(&a, t), None, "{t}");
        }
    }

    #[test]
    fn a_device_subscribes_only_to_its_own_down_topics() {
        let a = DeviceId::parse("a").unwrap();
        assert!(may_subscribe(&a, "devices/a/led"));
        assert!(may_subscribe(&a, "devices/a/audio/down"));
        for f in [
            "devices/b/led",
            "devices/+/audio/down",
            "devices/#",
            "#",
            "devices/a/#",
            "devices/a/+",
            "devices/a/telemetry",
            "$share/g/devices/a/led",
        ] {
            assert!(!may_subscribe(&a, f), "{f}");
        }
    }
}
