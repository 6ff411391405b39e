//! Fuzz harness `rule_parse`: the rules engine on a rule file, as `PUT /api/v1/rules` and
//! `POST /api/v1/rules/test` run it on an administrator's text: TOML, validation, the CEL
//! compiler, the actions, then evaluation of what compiled against sample events. Shared by
//! `fuzz/fuzz_targets/rule_parse.rs` and the corpus replay test `backend/tests/fuzz_corpus.rs`.
//!
//! Input: the rule file (UTF-8; other bytes are not a rule file, as the API says).
//!
//! Checked: nothing panics or hangs; an error names a line inside the file; a rule set that
//! compiled evaluates (an expression error is a failed verdict, not a panic) and its actions
//! serialize as the API returns them.

use std::sync::LazyLock;

use companion_backend::personas::PersonaSet;
use companion_backend::rules::{DeviceView, EventKind, Field, RuleEvent, RuleSet};
use companion_schema::{DeviceId, Topic};

static PERSONAS: LazyLock<PersonaSet> =
    LazyLock::new(|| PersonaSet::load(None, "aria").expect("the embedded personas load"));

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count().max(1) + 1;
    let set = match RuleSet::parse(text, &PERSONAS) {
        Ok(set) => set,
        Err(e) => {
            assert!(e.line <= lines, "error on line {} of {lines}: {e}", e.line);
            return;
        }
    };
    for rule in set.rules() {
        assert!(
            rule.line >= 1 && rule.line <= lines,
            "rule on line {}",
            rule.line
        );
        let _ = serde_json::to_value(&rule.actions);
    }
    let device = DeviceView {
        id: "pi-1".into(),
        persona: "aria".into(),
        online: true,
        battery_pct: Some(12.5),
    };
    for event in events() {
        let _ = set.evaluate(&event, &device, 1_700_000_000_000);
    }
}

fn events() -> Vec<RuleEvent> {
    let id = DeviceId::parse("pi-1").expect("a valid device id");
    EventKind::ALL
        .into_iter()
        .map(|kind| RuleEvent {
            kind,
            topic: Topic::new(id.clone(), kind.topic_kind()),
            fields: vec![
                ("seq", Field::Int(7)),
                ("ts_ms", Field::Int(1_700_000_000_000)),
                ("battery_pct", Field::Float(9.5)),
                ("button", Field::Text("talk".into())),
                ("action", Field::Text("press".into())),
                ("text", Field::Text("switch to Sage please".into())),
                ("online", Field::Bool(true)),
            ],
        })
        .collect()
}
