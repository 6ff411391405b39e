//! Metrics of the device runtime.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::metrics::KindLabel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SwitchLabels {
    pub from_persona: String,
    pub to_persona: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PersonaLabel {
    pub persona_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone)]
pub struct DeviceMetrics {
    pub persona_switches: Family<SwitchLabels, Counter>,
    pub persona_switch_latency: Family<PersonaLabel, Histogram>,
    pub telemetry_gaps: Counter,
    pub telemetry_duplicates: Counter,
    pub events_dropped: Family<KindLabel, Counter>,
    pub active_sessions: Gauge,
    pub sessions: Family<ReasonLabel, Counter>,
    pub audio_chunks_late: Counter,
    pub audio_chunks_duplicate: Counter,
    pub workers: Gauge,
    pub action_failures: Counter,
}

impl DeviceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            persona_switches: Family::default(),
            persona_switch_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
            telemetry_gaps: Counter::default(),
            telemetry_duplicates: Counter::default(),
            events_dropped: Family::default(),
            active_sessions: Gauge::default(),
            sessions: Family::default(),
            audio_chunks_late: Counter::default(),
            audio_chunks_duplicate: Counter::default(),
            workers: Gauge::default(),
            action_failures: Counter::default(),
        };
        registry.register(
            "persona_switches",
            "Persona switches by previous and new persona",
            m.persona_switches.clone(),
        );
        registry.register(
            "persona_switch_latency_seconds",
            "From the trigger's arrival to the persona publish being handed to the MQTT client",
            m.persona_switch_latency.clone(),
        );
        registry.register(
            "telemetry_gaps",
            "Telemetry messages missing according to their sequence numbers",
            m.telemetry_gaps.clone(),
        );
        registry.register(
            "telemetry_duplicates",
            "Telemetry messages dropped as duplicates",
            m.telemetry_duplicates.clone(),
        );
        registry.register(
            "backend_device_events_dropped",
            "Device events dropped because the device's queue was full, by kind",
            m.events_dropped.clone(),
        );
        registry.register(
            "active_sessions",
            "Conversation sessions not idle now",
            m.active_sessions.clone(),
        );
        registry.register(
            "sessions_ended",
            "Conversation sessions ended, by how they ended",
            m.sessions.clone(),
        );
        registry.register(
            "audio_chunks_late",
            "Uplink audio chunks that arrived after their place in the stream had passed",
            m.audio_chunks_late.clone(),
        );
        registry.register(
            "audio_chunks_duplicate",
            "Uplink audio chunks dropped as duplicates",
            m.audio_chunks_duplicate.clone(),
        );
        registry.register(
            "backend_device_workers",
            "Device worker tasks alive now",
            m.workers.clone(),
        );
        registry.register(
            "backend_rule_action_failures",
            "Rule actions that failed (all rules)",
            m.action_failures.clone(),
        );
        m
    }

    /// Creates the known series at zero (prometheus-client prints nothing for a labelled
    /// family until a series exists).
    pub fn prime(&self, personas: &crate::personas::PersonaSet) {
        for from in personas.all() {
            let _ = self.persona_switch_latency.get_or_create(&PersonaLabel {
                persona_id: from.id.to_string(),
            });
            for to in personas.all() {
                if from.id != to.id {
                    let _ = self.persona_switches.get_or_create(&SwitchLabels {
                        from_persona: from.id.to_string(),
                        to_persona: to.id.to_string(),
                    });
                }
            }
        }
        for reason in [
            "replied",
            "spoke",
            "degraded",
            "error",
            "cancelled",
            "watchdog",
        ] {
            let _ = self.sessions.get_or_create(&ReasonLabel { reason });
        }
        for kind in [
            "telemetry",
            "button",
            "status",
            "audio_up",
            "session_up",
            "presence",
            "command",
            "replay",
        ] {
            let _ = self.events_dropped.get_or_create(&KindLabel { kind });
        }
    }

    pub fn dropped(&self, kind: &'static str) {
        self.events_dropped.get_or_create(&KindLabel { kind }).inc();
    }
}
