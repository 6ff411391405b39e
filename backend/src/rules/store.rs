//! Where the active rule set lives: loaded from `rules.path` (the shipped defaults are written
//! there on first start), hot-reloaded when the file changes, replaced over REST (validated,
//! persisted, swapped atomically). A rejected set never replaces the active one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{RuleError, RuleSet, DEFAULT_RULES};
use crate::personas::PersonaSet;

/// How often the rule file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

/// Rule metrics (labels are rule names: bounded by the rule file, never device ids).
#[derive(Clone)]
pub struct RuleMetrics {
    pub matches: Family<RuleLabel, Counter>,
    pub failures: Family<RuleLabel, Counter>,
    pub eval_seconds: Histogram,
}

impl RuleMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            matches: Family::default(),
            failures: Family::default(),
            eval_seconds: Histogram::new(exponential_buckets(0.000_001, 4.0, 12)),
        };
        registry.register(
            "rule_matches",
            "Rules whose condition held, by rule",
            m.matches.clone(),
        );
        registry.register(
            "rule_failures",
            "Rule conditions or actions that failed, by rule",
            m.failures.clone(),
        );
        registry.register(
            "rule_eval_seconds",
            "Time to evaluate the rules for one event",
            m.eval_seconds.clone(),
        );
        m
    }

    /// Creates every rule's series at zero, so a rule that never matched still shows.
    pub fn prime(&self, set: &super::RuleSet) {
        for r in set.rules() {
            let label = RuleLabel {
                rule: r.name.clone(),
            };
            let _ = self.matches.get_or_create(&label);
            let _ = self.failures.get_or_create(&label);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(#[from] RuleError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct RuleStore {
    current: RwLock<Arc<RuleSet>>,
    metrics: RwLock<Option<RuleMetrics>>,
    path: PathBuf,
    personas: Arc<PersonaSet>,
    /// The file contents last seen (loaded or written), to notice edits.
    seen: RwLock<String>,
}

impl RuleStore {
    /// Loads `path`, writing the shipped defaults there first if it does not exist.
    pub fn open(path: &Path, personas: Arc<PersonaSet>) -> Result<Arc<Self>, StoreError> {
        let io = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            std::fs::write(path, DEFAULT_RULES).map_err(io)?;
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let set = RuleSet::parse(&text, &personas)?;
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(set)),
            metrics: RwLock::new(None),
            path: path.to_owned(),
            personas,
            seen: RwLock::new(text),
        }))
    }

    /// The active rule set.
    pub fn current(&self) -> Arc<RuleSet> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Compiles `text` without activating it.
    pub fn validate(&self, text: &str) -> Result<RuleSet, RuleError> {
        RuleSet::parse(text, &self.personas)
    }

    /// Validates, persists (write to a temporary file, then rename) and activates `text`.
    pub fn replace(&self, text: &str) -> Result<Arc<RuleSet>, StoreError> {
        let set = Arc::new(self.validate(text)?);
        let tmp = self.path.with_extension("toml.tmp");
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        self.activate(set.clone(), text);
        Ok(set)
    }

    /// Rule series are created at zero for every rule set that becomes active.
    pub fn attach_metrics(&self, metrics: RuleMetrics) {
        metrics.prime(&self.current());
        if let Ok(mut m) = self.metrics.write() {
            *m = Some(metrics);
        }
    }

    fn activate(&self, set: Arc<RuleSet>, text: &str) {
        if let Ok(m) = self.metrics.read() {
            if let Some(m) = m.as_ref() {
                m.prime(&set);
            }
        }
        if let Ok(mut g) = self.current.write() {
            *g = set;
        }
        if let Ok(mut s) = self.seen.write() {
            *s = text.to_owned();
        }
    }

    /// Re-reads the file; activates it when it changed and compiles. Returns what happened.
    pub fn reload_if_changed(&self) -> Reload {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Reload::Unchanged;
        };
        if self.seen.read().map(|s| *s == text).unwrap_or(false) {
            return Reload::Unchanged;
        }
        match self.validate(&text) {
            Ok(set) => {
                let n = set.rules().len();
                self.activate(Arc::new(set), &text);
                tracing::info!(path = %self.path.display(), rules = n, "rules reloaded");
                Reload::Loaded(n)
            }
            Err(e) => {
                // Remember the bad text so it is reported once, not every interval.
                if let Ok(mut s) = self.seen.write() {
                    *s = text;
                }
                tracing::error!(path = %self.path.display(), error = %e, "rule file rejected; the previous rules stay active");
                Reload::Rejected(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Loaded(usize),
    Rejected(RuleError),
}

/// Watches the rule file until `shutdown`.
pub async fn watch(store: Arc<RuleStore>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Cases: time to look at the file; shutdown.
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let s = store.clone();
        // File I/O and compiling are blocking work that finishes.
        let _ = tokio::task::spawn_blocking(move || s.reload_if_changed()).await;
    }
}
