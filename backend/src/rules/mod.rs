//! The rules engine: `rules.toml` turns device events into actions.
//!
//! A rule has a `name`, an `on` (event kind), an optional `topic` filter, an optional `if`
//! (a CEL expression over `event`, `device` and `now`, compiled once at load) and a list of
//! `do` actions ([`actions::Action`]). A rule set is validated as a whole before it takes
//! effect: a rule that does not parse or compile is rejected with its name, line and the
//! compiler's message. Evaluation never panics; an expression error is a rule failure.

pub mod actions;
mod condition;
pub mod store;

use std::sync::Arc;

use cel::{Context, Env, Program, Value};
use serde::{Deserialize, Serialize};

pub use actions::{Action, ConfigPatch, PersonaTarget, SessionVerb};
use condition::{compile_condition, device_value, event_fields_named, event_value, rule_env};
pub use condition::{MAX_COMPREHENSION_NESTING, MAX_CONDITION_DEPTH, MAX_CONDITION_LEN};

use crate::personas::PersonaSet;

/// The kinds of event rules can react to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Telemetry,
    Button,
    Status,
    Session,
    Transcript,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        EventKind::Telemetry,
        EventKind::Button,
        EventKind::Status,
        EventKind::Session,
        EventKind::Transcript,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Telemetry => "telemetry",
            EventKind::Button => "button",
            EventKind::Status => "status",
            EventKind::Session => "session",
            EventKind::Transcript => "transcript",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The device topic such events arrive on (transcripts come from the session).
    pub const fn topic_kind(self) -> companion_schema::TopicKind {
        use companion_schema::TopicKind;
        match self {
            EventKind::Telemetry => TopicKind::Telemetry,
            EventKind::Button => TopicKind::Button,
            EventKind::Status => TopicKind::Status,
            EventKind::Session | EventKind::Transcript => TopicKind::SessionUp,
        }
    }
}

/// A field of an event or device, as rules see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Field {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl From<&Field> for Value {
    fn from(f: &Field) -> Value {
        match f {
            Field::Bool(b) => Value::Bool(*b),
            Field::Int(i) => Value::Int(*i),
            Field::Float(x) => Value::Float(*x),
            Field::Text(s) => Value::String(Arc::new(s.clone())),
        }
    }
}

/// An event as the rules engine sees it: its kind, topic and fields.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleEvent {
    pub kind: EventKind,
    pub topic: companion_schema::Topic,
    pub fields: Vec<(&'static str, Field)>,
}

/// The device as rules see it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceView {
    pub id: String,
    pub persona: String,
    pub online: bool,
    pub battery_pct: Option<f64>,
}

/// One rule, compiled.
pub struct Rule {
    pub name: String,
    pub line: usize,
    pub kind: EventKind,
    pub topic: Option<String>,
    pub condition: Option<(String, Program)>,
    pub actions: Vec<Action>,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("line", &self.line)
            .field("kind", &self.kind)
            .field("if", &self.condition.as_ref().map(|c| &c.0))
            .field("actions", &self.actions)
            .finish()
    }
}

/// Why a rule file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{}line {line}: {message}", rule.as_ref().map(|r| format!("rule {r:?}, ")).unwrap_or_default())]
pub struct RuleError {
    pub rule: Option<String>,
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    on: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(rename = "if", default)]
    condition: Option<toml::Spanned<String>>,
    #[serde(rename = "do")]
    actions: Vec<toml::Value>,
}

/// Why evaluating a rule failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalFailure(pub String);

/// A compiled rule set.
pub struct RuleSet {
    rules: Vec<Rule>,
    by_kind: [Vec<usize>; 5],
    env: Arc<Env>,
    source: String,
    /// Whether any condition reads `device` (its map is built only then).
    uses_device: bool,
    /// Per event kind, whether any of its rules has a topic filter (the event's topic is
    /// formatted only then).
    needs_topic: [bool; 5],
    /// The `event` fields some condition names; `None`: all of them. Building the event's
    /// CEL map was most of a telemetry event's cost (about a tenth of the server's CPU at
    /// 10,000 messages/s with all nine fields), and the shipped rules read one.
    event_fields: Option<Vec<String>>,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("rules", &self.rules)
            .finish()
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl RuleSet {
    /// Parses, validates and compiles a whole rule file.
    pub fn parse(text: &str, personas: &PersonaSet) -> Result<Self, RuleError> {
        let file: RuleFile = toml::from_str(text).map_err(|e| RuleError {
            rule: None,
            line: e.span().map_or(0, |s| line_of(text, s.start)),
            message: e.message().to_owned(),
        })?;
        let env = Arc::new(rule_env().map_err(|e| RuleError {
            rule: None,
            line: 0,
            message: format!("building the CEL environment: {e:?}"),
        })?);
        let mut rules = Vec::new();
        let mut names = std::collections::HashSet::new();
        for spanned in file.rule {
            let line = line_of(text, spanned.span().start);
            let raw = spanned.into_inner();
            let err = |line: usize, message: String| RuleError {
                rule: Some(raw.name.clone()),
                line,
                message,
            };
            if raw.name.trim().is_empty() || raw.name.len() > 128 {
                return Err(err(line, "name must be 1-128 characters".into()));
            }
            if !names.insert(raw.name.clone()) {
                return Err(err(line, "a rule with this name exists already".into()));
            }
            let kind = EventKind::parse(&raw.on).ok_or_else(|| {
                err(
                    line,
                    format!(
                        "on = {:?} is not one of telemetry, button, status, session, transcript",
                        raw.on
                    ),
                )
            })?;
            if let Some(t) = &raw.topic {
                if !t.starts_with(companion_schema::topic::DEVICES_ROOT) {
                    return Err(err(
                        line,
                        format!("topic filter {t:?} must start with devices/"),
                    ));
                }
            }
            let condition = match &raw.condition {
                None => None,
                Some(src) => {
                    let cline = line_of(text, src.span().start);
                    let program =
                        compile_condition(&env, src.get_ref()).map_err(|m| err(cline, m))?;
                    Some((src.get_ref().clone(), program))
                }
            };
            if raw.actions.is_empty() {
                return Err(err(line, "do must list at least one action".into()));
            }
            let mut actions = Vec::new();
            for a in &raw.actions {
                actions.push(
                    actions::parse_action(a, personas)
                        .map_err(|m| err(line, format!("do: {m}")))?,
                );
            }
            rules.push(Rule {
                name: raw.name,
                line,
                kind,
                topic: raw.topic,
                condition,
                actions,
            });
        }
        let mut by_kind: [Vec<usize>; 5] = Default::default();
        for (i, r) in rules.iter().enumerate() {
            by_kind[r.kind.index()].push(i);
        }
        let needs_topic = by_kind
            .each_ref()
            .map(|ids| ids.iter().any(|&i| rules[i].topic.is_some()));
        let uses_device = rules.iter().any(|r| {
            r.condition
                .as_ref()
                .is_some_and(|(_, p)| p.references().has_variable("device"))
        });
        let mut names = Vec::new();
        let every_field = rules.iter().any(|r| {
            r.condition
                .as_ref()
                .is_some_and(|(_, p)| !event_fields_named(p.expression(), &mut names))
        });
        Ok(Self {
            rules,
            by_kind,
            env,
            source: text.to_owned(),
            uses_device,
            needs_topic,
            event_fields: (!every_field).then_some(names),
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The TOML text this set was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether some condition reads `device`: without one, [`RuleSet::evaluate`] does not look
    /// at the view it is given (a caller may pass a default one instead of building it).
    pub fn uses_device(&self) -> bool {
        self.uses_device
    }

    /// Evaluates every rule for `event`'s kind. Returns, in file order, each rule whose
    /// `on`/`topic` matched together with its condition's verdict.
    pub fn evaluate(
        &self,
        event: &RuleEvent,
        device: &DeviceView,
        now_ms: i64,
    ) -> Vec<(&Rule, Result<bool, EvalFailure>)> {
        self.evaluate_indexed(event, device, now_ms)
            .into_iter()
            .map(|(i, verdict)| (&self.rules[i], verdict))
            .collect()
    }

    /// [`RuleSet::evaluate`] with each rule given by its index in [`RuleSet::rules`], so the
    /// answer does not borrow the set.
    pub fn evaluate_indexed(
        &self,
        event: &RuleEvent,
        device: &DeviceView,
        now_ms: i64,
    ) -> Vec<(usize, Result<bool, EvalFailure>)> {
        let candidates = &self.by_kind[event.kind.index()];
        if candidates.is_empty() {
            return Vec::new();
        }
        let mut ctx = Context::with_env(self.env.clone());
        ctx.add_variable_from_value("event", event_value(event, self.event_fields.as_deref()));
        if self.uses_device {
            ctx.add_variable_from_value("device", device_value(device));
        }
        ctx.add_variable_from_value("now", Value::Int(now_ms));
        let topic = self.needs_topic[event.kind.index()].then(|| event.topic.to_string());
        candidates
            .iter()
            .map(|&i| (i, &self.rules[i]))
            .filter(|(_, r)| match (r.topic.as_deref(), topic.as_deref()) {
                (Some(filter), Some(topic)) => topic_matches(filter, topic),
                _ => true,
            })
            .map(|(i, r)| {
                let verdict = match &r.condition {
                    None => Ok(true),
                    Some((_, program)) => match program.execute(&ctx) {
                        Ok(Value::Bool(b)) => Ok(b),
                        Ok(other) => Err(EvalFailure(format!(
                            "condition gave {other:?}, not a boolean"
                        ))),
                        Err(e) => Err(EvalFailure(e.to_string())),
                    },
                };
                (i, verdict)
            })
            .collect()
    }
}

/// MQTT filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The rules shipped by default (written to `rules.path` on first start).
pub const DEFAULT_RULES: &str = include_str!("../../rules.toml");

#[cfg(test)]
mod tests {
    use super::condition::REGEXES;
    use super::*;
    use companion_schema::{DeviceId, Topic, TopicKind};

    pub(super) fn personas() -> PersonaSet {
        PersonaSet::load(None, "aria").unwrap()
    }

    pub(super) fn button(name: &str, action: &str) -> RuleEvent {
        RuleEvent {
            kind: EventKind::Button,
            topic: Topic::new(DeviceId::parse("pi-1").unwrap(), TopicKind::Button),
            fields: vec![
                ("button", Field::Text(name.into())),
                ("action", Field::Text(action.into())),
                ("seq", Field::Int(1)),
            ],
        }
    }

    fn transcript(text: &str) -> RuleEvent {
        RuleEvent {
            kind: EventKind::Transcript,
            topic: Topic::new(DeviceId::parse("pi-1").unwrap(), TopicKind::SessionUp),
            fields: vec![("text", Field::Text(text.into()))],
        }
    }

    /// A rule with a topic filter sees only the events on matching topics; rules without one
    /// see every event of their kind, also in a set where no rule of that kind has a filter
    /// (the topic is not even formatted then).
    #[test]
    fn topic_filters_select_events_by_device() {
        let text = "[[rule]]\nname = \"pi-1 only\"\non = \"button\"\ntopic = \"devices/pi-1/+\"\ndo = [{ log = \"x\" }]\n\
                    [[rule]]\nname = \"any button\"\non = \"button\"\ndo = [{ log = \"x\" }]\n\
                    [[rule]]\nname = \"any transcript\"\non = \"transcript\"\ndo = [{ log = \"x\" }]\n";
        let set = RuleSet::parse(text, &personas()).unwrap();
        let names = |event: &RuleEvent| {
            set.evaluate(event, &DeviceView::default(), 0)
                .into_iter()
                .map(|(r, v)| (r.name.clone(), v))
                .collect::<Vec<_>>()
        };
        let mut other = button("talk", "press");
        other.topic = Topic::new(DeviceId::parse("pi-2").unwrap(), TopicKind::Button);
        assert_eq!(
            names(&button("talk", "press")),
            vec![
                ("pi-1 only".to_owned(), Ok(true)),
                ("any button".to_owned(), Ok(true))
            ]
        );
        assert_eq!(names(&other), vec![("any button".to_owned(), Ok(true))]);
        assert_eq!(
            names(&transcript("hello")),
            vec![("any transcript".to_owned(), Ok(true))]
        );
        assert!(!set.uses_device());
    }

    #[test]
    fn matches_uses_cached_patterns_and_reports_bad_ones() {
        let set = RuleSet::parse(DEFAULT_RULES, &personas()).unwrap();
        let d = DeviceView::default();
        let verdict = |text: &str| {
            set.evaluate(&transcript(text), &d, 0)
                .into_iter()
                .find(|(r, _)| r.name == "switch persona by voice")
                .map(|(_, v)| v)
                .unwrap()
        };
        assert_eq!(verdict("Could you SWITCH to Sage please"), Ok(true));
        assert_eq!(verdict("what is the weather like"), Ok(false));
        assert_eq!(verdict("switchto sage"), Ok(false), "\\b is honoured");
        assert!(REGEXES
            .read()
            .unwrap()
            .contains_key(r"(?i)\b(switch|talk|change) to\b"));

        let bad = RuleSet::parse(
            "[[rule]]\nname = \"bad\"\non = \"transcript\"\nif = 'event.text.matches(\"(unclosed\")'\ndo = [{ log = \"x\" }]\n",
            &personas(),
        )
        .unwrap();
        let (_, v) = bad.evaluate(&transcript("hello"), &d, 0).pop().unwrap();
        let err = v.unwrap_err().0;
        assert!(err.contains("not a valid regex"), "{err}");
    }

    #[test]
    fn the_default_rules_compile() {
        let set = RuleSet::parse(DEFAULT_RULES, &personas()).unwrap();
        assert!(set.rules().len() >= 4);
    }

    #[test]
    fn a_button_rule_matches_only_its_button() {
        let set = RuleSet::parse(DEFAULT_RULES, &personas()).unwrap();
        let d = DeviceView::default();
        let hits: Vec<_> = set
            .evaluate(&button("persona", "press"), &d, 0)
            .into_iter()
            .filter(|(_, v)| *v == Ok(true))
            .map(|(r, _)| r.name.clone())
            .collect();
        assert_eq!(hits, ["persona button cycles persona"]);
        let none = set
            .evaluate(&button("volume", "press"), &d, 0)
            .into_iter()
            .filter(|(_, v)| *v == Ok(true))
            .count();
        assert_eq!(none, 0);
    }

    #[test]
    fn a_bad_rule_is_rejected_with_its_name_and_line() {
        let text = "[[rule]]\nname = \"ok\"\non = \"button\"\ndo = [{ log = \"x\" }]\n\n[[rule]]\nname = \"broken\"\non = \"button\"\nif = 'event.button == '\ndo = [{ log = \"x\" }]\n";
        let err = RuleSet::parse(text, &personas()).unwrap_err();
        assert_eq!(err.rule.as_deref(), Some("broken"));
        assert_eq!(err.line, 9, "{err}");
        for (bad, msg) in [
            ("[[rule]]\nname = \"x\"\non = \"sneeze\"\ndo = [{ log = \"x\" }]\n", "sneeze"),
            ("[[rule]]\nname = \"x\"\non = \"button\"\ndo = [{ persona = \"nobody\" }]\n", "nobody"),
            ("[[rule]]\nname = \"x\"\non = \"button\"\ndo = [{ publish = { topic = \"telemetry\", payload = {} } }]\n", "down topics"),
            ("[[rule]]\nname = \"x\"\non = \"button\"\ndo = [{ led = { pattern = \"disco\" } }]\n", "pattern"),
            ("[[rule]]\nname = \"x\"\non = \"button\"\ndo = []\n", "at least one"),
            ("[[rule]]\nname = \"x\"\non = \"button\"\ndo = [{ explode = 1 }]\n", "unknown action"),
            ("[[rule]\n", "line"),
        ] {
            let err = RuleSet::parse(bad, &personas()).unwrap_err();
            assert!(err.to_string().contains(msg), "{bad}: {err}");
        }
    }

    #[test]
    fn expression_errors_are_failures_not_panics() {
        let text = "[[rule]]\nname = \"t\"\non = \"telemetry\"\nif = 'event.battery_pct < 15.0'\ndo = [{ log = \"low\" }]\n";
        let set = RuleSet::parse(text, &personas()).unwrap();
        let ev = RuleEvent {
            kind: EventKind::Telemetry,
            topic: Topic::parse("devices/a/telemetry").unwrap(),
            fields: vec![("seq", Field::Int(1))],
        };
        let out = set.evaluate(&ev, &DeviceView::default(), 0);
        assert!(out[0].1.is_err(), "{:?}", out[0].1);
        let ev = RuleEvent {
            fields: vec![("battery_pct", Field::Float(9.0))],
            ..ev
        };
        assert_eq!(set.evaluate(&ev, &DeviceView::default(), 0)[0].1, Ok(true));
    }

    #[test]
    fn topic_filters_match_like_mqtt() {
        assert!(topic_matches("devices/+/button", "devices/a/button"));
        assert!(topic_matches("devices/#", "devices/a/button"));
        assert!(!topic_matches("devices/b/button", "devices/a/button"));
        assert!(!topic_matches("devices/+", "devices/a/button"));
    }
}
