//! Personas: who a device speaks as. Each is a TOML file (`backend/personas/*.toml` ships
//! three, embedded in the binary; `personas.dir` replaces them), loaded and validated at
//! start-up; a bad file is an error naming the file and the field.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use companion_schema::{PersonaId, Rgb};
use serde::{Deserialize, Serialize};

/// The personas shipped with the binary.
pub const EMBEDDED: [(&str, &str); 3] = [
    ("aria.toml", include_str!("../personas/aria.toml")),
    ("sage.toml", include_str!("../personas/sage.toml")),
    ("pip.toml", include_str!("../personas/pip.toml")),
];

/// Which language model answers as this persona.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmChoice {
    /// `anthropic`, `openai` or `offline` (scripted replies).
    pub provider: String,
    pub model: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersonaFile {
    id: String,
    name: String,
    #[serde(default)]
    order: i64,
    color: Rgb,
    voice: String,
    greeting: String,
    system_prompt: String,
    fallback_replies: Vec<String>,
    llm: LlmChoice,
    #[serde(default)]
    voices: BTreeMap<String, String>,
}

/// A validated persona.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Persona {
    pub id: PersonaId,
    pub name: String,
    pub color: Rgb,
    /// The persona's voice for the offline speech engine (espeak-ng voice name).
    pub voice: String,
    /// Provider-specific voice ids (`elevenlabs`, `openai`).
    pub voices: BTreeMap<String, String>,
    pub greeting: String,
    pub system_prompt: String,
    pub fallback_replies: Vec<String>,
    pub llm: LlmChoice,
}

impl Persona {
    /// The voice to use with `provider`, falling back to the generic one.
    pub fn voice_for(&self, provider: &str) -> &str {
        self.voices
            .get(provider)
            .map(String::as_str)
            .unwrap_or(&self.voice)
    }

    /// A scripted reply, chosen by `n` (e.g. a turn counter).
    pub fn fallback_reply(&self, n: usize) -> &str {
        self.fallback_replies
            .get(n % self.fallback_replies.len().max(1))
            .map(String::as_str)
            .unwrap_or(&self.greeting)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PersonaError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: field `{field}`: {message}")]
    Field {
        file: String,
        field: &'static str,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no personas found in {0}")]
    Empty(String),
    #[error("default persona {0:?} does not exist")]
    NoDefault(String),
}

fn field(file: &str, field: &'static str, message: impl Into<String>) -> PersonaError {
    PersonaError::Field {
        file: file.to_owned(),
        field,
        message: message.into(),
    }
}

/// Parses and validates one persona file.
pub fn parse(file: &str, text: &str) -> Result<(i64, Persona), PersonaError> {
    let raw: PersonaFile = toml::from_str(text).map_err(|e| PersonaError::Parse {
        file: file.to_owned(),
        message: e.to_string(),
    })?;
    let id = PersonaId::parse(&raw.id).map_err(|e| field(file, "id", e.to_string()))?;
    let check_text = |name: &'static str, value: &str, max: usize| {
        if value.trim().is_empty() {
            Err(field(file, name, "must not be empty"))
        } else if value.chars().count() > max {
            Err(field(file, name, format!("longer than {max} characters")))
        } else {
            Ok(())
        }
    };
    check_text("name", &raw.name, 64)?;
    check_text("voice", &raw.voice, 64)?;
    check_text("greeting", &raw.greeting, 500)?;
    check_text("system_prompt", &raw.system_prompt, 8000)?;
    if raw.fallback_replies.is_empty() {
        return Err(field(file, "fallback_replies", "needs at least one reply"));
    }
    for r in &raw.fallback_replies {
        check_text("fallback_replies", r, 500)?;
    }
    if !["anthropic", "openai", "offline"].contains(&raw.llm.provider.as_str()) {
        return Err(field(
            file,
            "llm",
            format!(
                "provider {:?} is not one of anthropic, openai, offline",
                raw.llm.provider
            ),
        ));
    }
    check_text("llm", &raw.llm.model, 128)?;
    Ok((
        raw.order,
        Persona {
            id,
            name: raw.name.trim().to_owned(),
            color: raw.color,
            voice: raw.voice,
            voices: raw.voices,
            greeting: raw.greeting,
            system_prompt: raw.system_prompt.trim().to_owned(),
            fallback_replies: raw.fallback_replies,
            llm: raw.llm,
        },
    ))
}

/// The loaded personas, in cycling order.
#[derive(Debug, Clone)]
pub struct PersonaSet {
    list: Vec<Arc<Persona>>,
    default: PersonaId,
}

impl PersonaSet {
    /// From `dir`'s `*.toml` files, or the embedded ones when `dir` is `None`.
    pub fn load(dir: Option<&Path>, default: &str) -> Result<Self, PersonaError> {
        let mut files: Vec<(String, String)> = Vec::new();
        match dir {
            None => {
                files.extend(EMBEDDED.iter().map(|(n, t)| (n.to_string(), t.to_string())));
            }
            Some(dir) => {
                let entries = std::fs::read_dir(dir).map_err(|source| PersonaError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
                for entry in entries {
                    let entry = entry.map_err(|source| PersonaError::Io {
                        path: dir.to_owned(),
                        source,
                    })?;
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "toml") {
                        let text =
                            std::fs::read_to_string(&path).map_err(|source| PersonaError::Io {
                                path: path.clone(),
                                source,
                            })?;
                        files.push((path.display().to_string(), text));
                    }
                }
            }
        }
        Self::from_texts(
            &files,
            default,
            &dir.map_or("the embedded set".into(), |d| d.display().to_string()),
        )
    }

    pub fn from_texts(
        files: &[(String, String)],
        default: &str,
        origin: &str,
    ) -> Result<Self, PersonaError> {
        let mut parsed = Vec::new();
        let mut seen = HashSet::new();
        for (file, text) in files {
            let (order, persona) = parse(file, text)?;
            if !seen.insert(persona.id.clone()) {
                return Err(field(file, "id", format!("{} is used twice", persona.id)));
            }
            parsed.push((order, file.clone(), persona));
        }
        if parsed.is_empty() {
            return Err(PersonaError::Empty(origin.to_owned()));
        }
        parsed.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let list: Vec<Arc<Persona>> = parsed.into_iter().map(|(_, _, p)| Arc::new(p)).collect();
        let default = PersonaId::parse(default)
            .ok()
            .filter(|d| list.iter().any(|p| &p.id == d))
            .ok_or_else(|| PersonaError::NoDefault(default.to_owned()))?;
        Ok(Self { list, default })
    }

    pub fn all(&self) -> &[Arc<Persona>] {
        &self.list
    }

    pub fn get(&self, id: &PersonaId) -> Option<&Arc<Persona>> {
        self.list.iter().find(|p| &p.id == id)
    }

    pub fn default_persona(&self) -> &Arc<Persona> {
        self.get(&self.default).unwrap_or(&self.list[0])
    }

    fn position(&self, id: &PersonaId) -> usize {
        self.list.iter().position(|p| &p.id == id).unwrap_or(0)
    }

    /// The persona after `id` in cycling order.
    pub fn next(&self, id: &PersonaId) -> &Arc<Persona> {
        &self.list[(self.position(id) + 1) % self.list.len()]
    }

    /// The persona before `id` in cycling order.
    pub fn previous(&self, id: &PersonaId) -> &Arc<Persona> {
        let n = self.list.len();
        &self.list[(self.position(id) + n - 1) % n]
    }

    /// A persona named in a phrase like "switch to Sage" / "talk to pip" (case-insensitive,
    /// whole words).
    pub fn named_in(&self, phrase: &str) -> Option<&Arc<Persona>> {
        let words: Vec<String> = phrase
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        self.list.iter().find(|p| {
            let name = p.name.to_lowercase();
            words.contains(&name) || words.iter().any(|w| w == p.id.as_str())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_personas_load_and_differ() {
        let set = PersonaSet::load(None, "aria").unwrap();
        assert_eq!(set.all().len(), 3);
        let colors: HashSet<_> = set.all().iter().map(|p| p.color).collect();
        let voices: HashSet<_> = set.all().iter().map(|p| p.voice.clone()).collect();
        assert_eq!(colors.len(), 3);
        assert_eq!(voices.len(), 3);
        assert_eq!(set.default_persona().id.as_str(), "aria");
    }

    #[test]
    fn cycling_wraps_both_ways() {
        let set = PersonaSet::load(None, "aria").unwrap();
        let ids: Vec<_> = set.all().iter().map(|p| p.id.to_string()).collect();
        assert_eq!(ids, ["aria", "sage", "pip"]);
        let pip = PersonaId::parse("pip").unwrap();
        assert_eq!(set.next(&pip).id.as_str(), "aria");
        let aria = PersonaId::parse("aria").unwrap();
        assert_eq!(set.previous(&aria).id.as_str(), "pip");
    }

    #[test]
    fn a_phrase_names_a_persona() {
        let set = PersonaSet::load(None, "aria").unwrap();
        assert_eq!(
            set.named_in("Switch to Sage, please").unwrap().id.as_str(),
            "sage"
        );
        assert!(set.named_in("sagebrush").is_none());
    }

    #[test]
    fn bad_files_name_the_file_and_field() {
        let good = EMBEDDED[0].1;
        let cases = [
            (good.replace("id = \"aria\"", "id = \"Bad Id\""), "id"),
            (good.replace("name = \"Aria\"", "name = \"\""), "name"),
            (
                good.replace("provider = \"anthropic\"", "provider = \"skynet\""),
                "llm",
            ),
            (
                good.replace("fallback_replies = [", "fallback_replies = []\nunused = ["),
                "fallback_replies",
            ),
        ];
        for (text, key) in cases {
            let err = PersonaSet::from_texts(&[("x.toml".into(), text)], "aria", "t").unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("x.toml"), "{msg}");
            assert!(msg.contains(key), "{key}: {msg}");
        }
        let err =
            PersonaSet::from_texts(&[("x.toml".into(), "id = 1".into())], "aria", "t").unwrap_err();
        assert!(err.to_string().contains("x.toml"));
        let err = PersonaSet::load(None, "nobody").unwrap_err();
        assert!(err.to_string().contains("nobody"));
    }
}
