//! Rule evaluation throughput with the shipped rules and typical events.
//!
//! `cargo bench -p companion-backend --bench rules`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use companion_backend::personas::PersonaSet;
use companion_backend::rules::{DeviceView, EventKind, Field, RuleEvent, RuleSet, DEFAULT_RULES};
use companion_schema::Topic;

fn events() -> (RuleEvent, RuleEvent) {
    let button = RuleEvent {
        kind: EventKind::Button,
        topic: Topic::parse("devices/pi-1/button").unwrap(),
        fields: vec![
            ("seq", Field::Int(7)),
            ("ts_ms", Field::Int(1_700_000_000_000)),
            ("button", Field::Text("persona".into())),
            ("action", Field::Text("press".into())),
        ],
    };
    let telemetry = RuleEvent {
        kind: EventKind::Telemetry,
        topic: Topic::parse("devices/pi-1/telemetry").unwrap(),
        fields: vec![
            ("seq", Field::Int(7)),
            ("ts_ms", Field::Int(1_700_000_000_000)),
            ("uptime_s", Field::Int(3600)),
            ("battery_pct", Field::Float(42.0)),
            ("cpu_temp_c", Field::Float(48.5)),
        ],
    };
    (button, telemetry)
}

fn bench(c: &mut Criterion) {
    let personas = PersonaSet::load(None, "aria").expect("personas");
    let set = RuleSet::parse(DEFAULT_RULES, &personas).expect("rules");
    let device = DeviceView {
        id: "pi-1".into(),
        persona: "aria".into(),
        online: true,
        battery_pct: Some(42.0),
    };
    let (button, telemetry) = events();
    let button_rules = set.evaluate(&button, &device, 0).len() as u64;
    let telemetry_rules = set.evaluate(&telemetry, &device, 0).len() as u64;

    let mut g = c.benchmark_group("rules");
    // Throughput counts rule evaluations (conditions run), not events.
    g.throughput(Throughput::Elements(button_rules));
    g.bench_function("button event (3 button rules)", |b| {
        b.iter(|| set.evaluate(std::hint::black_box(&button), &device, 0))
    });
    g.throughput(Throughput::Elements(telemetry_rules));
    g.bench_function("telemetry event (1 telemetry rule)", |b| {
        b.iter(|| set.evaluate(std::hint::black_box(&telemetry), &device, 0))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
