//! Rule actions: parsed from TOML into an enum once, at load.

use companion_schema::{DeviceConfig, LedCommand, LedPattern, PersonaId, Rgb, TopicKind};
use serde::Serialize;

use crate::personas::PersonaSet;

/// Which persona to switch to.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PersonaTarget {
    Next,
    Previous,
    /// The persona named in the event's `text` (transcript rules: "switch to Sage").
    Named,
    Id(PersonaId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionVerb {
    Start,
    Stop,
    Cancel,
}

/// A change to merge into the retained device config.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConfigPatch {
    pub telemetry_interval_s: Option<u32>,
    pub volume: Option<u8>,
    pub led_brightness: Option<u8>,
    pub buttons: Option<std::collections::BTreeMap<String, String>>,
}

impl ConfigPatch {
    pub fn apply(&self, config: &mut DeviceConfig) {
        if let Some(v) = self.telemetry_interval_s {
            config.telemetry_interval_s = v;
        }
        if let Some(v) = self.volume {
            config.volume = v;
        }
        if let Some(v) = self.led_brightness {
            config.led_brightness = Some(v);
        }
        if let Some(b) = &self.buttons {
            config.buttons.extend(b.clone());
        }
    }
}

/// One thing a rule does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Persona(PersonaTarget),
    Led(LedCommand),
    Session(SessionVerb),
    Say(String),
    /// A payload to one of the device's own down topics (not audio).
    Publish {
        #[serde(serialize_with = "ser_kind")]
        kind: TopicKind,
        payload_json: serde_json::Value,
    },
    Config(ConfigPatch),
    Log(String),
}

fn ser_kind<S: serde::Serializer>(k: &TopicKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.suffix())
}

/// Parses `{ persona = "next" }` and friends.
pub fn parse_action(value: &toml::Value, personas: &PersonaSet) -> Result<Action, String> {
    let table = value
        .as_table()
        .ok_or("each action is a table like { persona = \"next\" }")?;
    if table.len() != 1 {
        return Err(format!(
            "each action has exactly one key, found {}",
            table.len()
        ));
    }
    let (key, v) = table.iter().next().ok_or("empty action")?;
    match key.as_str() {
        "persona" => {
            let s = v
                .as_str()
                .ok_or("persona takes \"next\", \"previous\", \"named\" or an id")?;
            Ok(Action::Persona(match s {
                "next" => PersonaTarget::Next,
                "previous" => PersonaTarget::Previous,
                "named" => PersonaTarget::Named,
                id => {
                    let id = PersonaId::parse(id).map_err(|e| e.to_string())?;
                    if personas.get(&id).is_none() {
                        return Err(format!("no persona {id:?}"));
                    }
                    PersonaTarget::Id(id)
                }
            }))
        }
        "led" => Ok(Action::Led(parse_led(v)?)),
        "session" => Ok(Action::Session(match v.as_str() {
            Some("start") => SessionVerb::Start,
            Some("stop") => SessionVerb::Stop,
            Some("cancel") => SessionVerb::Cancel,
            _ => return Err("session takes \"start\", \"stop\" or \"cancel\"".into()),
        })),
        "say" => {
            let s = v.as_str().ok_or("say takes a string")?;
            if s.trim().is_empty() || s.len() > 1000 {
                return Err("say takes 1-1000 characters".into());
            }
            Ok(Action::Say(s.to_owned()))
        }
        "log" => Ok(Action::Log(
            v.as_str().ok_or("log takes a string")?.to_owned(),
        )),
        "config" => Ok(Action::Config(parse_config(v)?)),
        "publish" => parse_publish(v),
        other => Err(format!(
            "unknown action {other:?}; expected persona, led, session, say, publish, config or log"
        )),
    }
}

fn parse_color(v: &toml::Value) -> Result<Rgb, String> {
    if let Some(s) = v.as_str() {
        let hex = s.strip_prefix('#').unwrap_or(s);
        if hex.len() == 6 {
            if let Ok(n) = u32::from_str_radix(hex, 16) {
                return Ok([(n >> 16) as u8, (n >> 8) as u8, n as u8]);
            }
        }
        return Err(format!("color {s:?} is not #rrggbb"));
    }
    let arr = v.as_array().ok_or("color is [r, g, b] or \"#rrggbb\"")?;
    if arr.len() != 3 {
        return Err("color is [r, g, b]".into());
    }
    let mut out = [0u8; 3];
    for (o, x) in out.iter_mut().zip(arr) {
        *o = x
            .as_integer()
            .and_then(|i| u8::try_from(i).ok())
            .ok_or("color components are 0-255")?;
    }
    Ok(out)
}

fn parse_led(v: &toml::Value) -> Result<LedCommand, String> {
    let t = v
        .as_table()
        .ok_or("led takes { pattern, color, brightness?, duration_ms? }")?;
    for k in t.keys() {
        if !["pattern", "color", "brightness", "duration_ms"].contains(&k.as_str()) {
            return Err(format!("led: unknown field {k:?}"));
        }
    }
    let pattern = match t.get("pattern").and_then(|p| p.as_str()) {
        Some("off") => LedPattern::Off,
        Some("solid") => LedPattern::Solid,
        Some("pulse") => LedPattern::Pulse,
        Some("blink") => LedPattern::Blink,
        Some("spin") => LedPattern::Spin,
        _ => return Err("led.pattern is one of off, solid, pulse, blink, spin".into()),
    };
    let color = match t.get("color") {
        Some(c) => parse_color(c)?,
        None if pattern == LedPattern::Off => [0, 0, 0],
        None => return Err("led.color is required".into()),
    };
    let brightness = match t.get("brightness") {
        None => 255,
        Some(b) => b
            .as_integer()
            .and_then(|i| u8::try_from(i).ok())
            .ok_or("led.brightness is 0-255")?,
    };
    let duration_ms = t
        .get("duration_ms")
        .map(|d| {
            d.as_integer()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or("led.duration_ms is a positive integer")
        })
        .transpose()?;
    Ok(LedCommand {
        v: companion_schema::SCHEMA_VERSION,
        pattern,
        color,
        brightness,
        duration_ms,
    })
}

fn parse_config(v: &toml::Value) -> Result<ConfigPatch, String> {
    let t = v.as_table().ok_or("config takes a table")?;
    let mut p = ConfigPatch::default();
    for (k, x) in t {
        match k.as_str() {
            "telemetry_interval_s" => {
                p.telemetry_interval_s = Some(
                    x.as_integer()
                        .and_then(|i| u32::try_from(i).ok())
                        .filter(|i| (1..=86_400).contains(i))
                        .ok_or("config.telemetry_interval_s is 1-86400")?,
                )
            }
            "volume" => {
                p.volume = Some(
                    x.as_integer()
                        .and_then(|i| u8::try_from(i).ok())
                        .filter(|i| *i <= 100)
                        .ok_or("config.volume is 0-100")?,
                )
            }
            "led_brightness" => {
                p.led_brightness = Some(
                    x.as_integer()
                        .and_then(|i| u8::try_from(i).ok())
                        .ok_or("config.led_brightness is 0-255")?,
                )
            }
            "buttons" => {
                let bt = x.as_table().ok_or("config.buttons is a table of strings")?;
                let mut m = std::collections::BTreeMap::new();
                for (b, role) in bt {
                    m.insert(
                        b.clone(),
                        role.as_str()
                            .ok_or("config.buttons values are strings")?
                            .to_owned(),
                    );
                }
                p.buttons = Some(m);
            }
            other => return Err(format!("config: unknown field {other:?}")),
        }
    }
    Ok(p)
}

fn parse_publish(v: &toml::Value) -> Result<Action, String> {
    let t = v.as_table().ok_or("publish takes { topic, payload }")?;
    let topic = t.get("topic").and_then(|x| x.as_str()).ok_or(
        "publish.topic is one of the device's down topics: led, persona, config, session/down",
    )?;
    let kind = TopicKind::ALL
        .into_iter()
        .find(|k| k.suffix() == topic)
        .filter(|k| k.direction() == companion_schema::Direction::Down && !k.is_audio())
        .ok_or_else(|| {
            format!("publish.topic {topic:?} is not one of the device's own down topics (led, persona, config, session/down)")
        })?;
    let payload = t.get("payload").ok_or("publish.payload is required")?;
    let mut json = serde_json::to_value(payload).map_err(|e| e.to_string())?;
    if let Some(obj) = json.as_object_mut() {
        obj.entry("v").or_insert(serde_json::json!(1));
    }
    // The payload must be a valid message of that topic's type.
    let check = |r: Result<(), serde_json::Error>| r.map_err(|e| format!("publish.payload: {e}"));
    match kind {
        TopicKind::Led => check(serde_json::from_value::<LedCommand>(json.clone()).map(|_| ()))?,
        TopicKind::Config => {
            check(serde_json::from_value::<DeviceConfig>(json.clone()).map(|_| ()))?
        }
        TopicKind::Persona => check(
            serde_json::from_value::<companion_schema::PersonaState>(json.clone()).map(|_| ()),
        )?,
        TopicKind::SessionDown => check(
            serde_json::from_value::<companion_schema::SessionEvent>(json.clone()).map(|_| ()),
        )?,
        _ => return Err("publish.topic is not publishable".into()),
    }
    Ok(Action::Publish {
        kind,
        payload_json: json,
    })
}
