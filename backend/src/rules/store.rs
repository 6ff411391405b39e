//! Where the active rule set lives: loaded from `rules.path` (the shipped defaults are written
//! there on first start), hot-reloaded when the file changes, replaced over REST (validated,
//! persisted, swapped atomically). A rejected set never replaces the active one.
//!
//! With several replicas (`cluster.enabled`) the rule set is shared through the database
//! (`cluster_rules`, one numbered row): a set put over REST or an edit of any replica's file
//! becomes the cluster's, and every replica activates it (and writes it to its own file)
//! within [`RELOAD_INTERVAL`]. A replica that starts adopts the cluster's set over its file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{RuleError, RuleSet, DEFAULT_RULES};
use crate::db::{now_ms, Db};
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
    #[error("sharing the rules with the other replicas failed: {0}")]
    Shared(#[from] sqlx::Error),
}

/// Cluster mode: the database row every replica follows.
struct Shared {
    db: Db,
    /// The row's version last activated or written here; `None` until the first sync.
    version: Mutex<Option<i64>>,
    /// The database did not answer at the last sync (reported once, not every interval).
    failing: std::sync::atomic::AtomicBool,
}

pub struct RuleStore {
    current: RwLock<Arc<RuleSet>>,
    metrics: RwLock<Option<RuleMetrics>>,
    path: PathBuf,
    personas: Arc<PersonaSet>,
    /// The file contents last seen (loaded or written), to notice edits.
    seen: RwLock<String>,
    shared: OnceLock<Shared>,
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
            shared: OnceLock::new(),
        }))
    }

    /// Cluster mode: from now on the rule set is the one in `db`, shared by every replica
    /// ([`watch`] follows it). Adopts the cluster's set now (or makes ours the cluster's when
    /// there is none yet).
    pub async fn share(self: &Arc<Self>, db: Db) {
        let _ = self.shared.set(Shared {
            db,
            version: Mutex::new(None),
            failing: Default::default(),
        });
        if let Some(shared) = self.shared.get() {
            // Twice: the first may only have made ours the cluster's.
            self.sync(shared).await;
            self.sync(shared).await;
        }
    }

    /// Validates `text`, makes it the cluster's (in cluster mode), persists and activates it.
    /// Nothing changes when it is invalid or the database does not take it.
    pub async fn put(self: &Arc<Self>, text: String) -> Result<Arc<RuleSet>, StoreError> {
        let store = self.clone();
        let checked = tokio::task::spawn_blocking(move || store.validate(&text).map(|_| text))
            .await
            .map_err(|e| StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })?;
        let text = checked?;
        let version = match self.shared.get() {
            Some(shared) => Some(push(&shared.db, &text).await?),
            None => None,
        };
        let store = self.clone();
        let set = tokio::task::spawn_blocking(move || store.replace(&text))
            .await
            .map_err(|e| StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })??;
        if let (Some(shared), Some(v)) = (self.shared.get(), version) {
            if let Ok(mut mine) = shared.version.lock() {
                *mine = Some(mine.map_or(v, |m| m.max(v)));
            }
        }
        Ok(set)
    }

    /// One cluster sync: an edit of our file becomes the cluster's; a newer cluster set is
    /// activated and written to our file.
    async fn sync(self: &Arc<Self>, shared: &Shared) {
        use std::sync::atomic::Ordering;
        let store = self.clone();
        // The file, when it changed since we last read or wrote it and compiles.
        let edited = tokio::task::spawn_blocking(move || store.edited_file())
            .await
            .ok()
            .flatten();
        let result = async {
            if let Some(text) = edited {
                let v = push(&shared.db, &text).await?;
                let store = self.clone();
                let n = tokio::task::spawn_blocking(move || {
                    let set = store.validate(&text).ok()?;
                    let n = set.rules().len();
                    store.activate(Arc::new(set), &text);
                    Some(n)
                })
                .await
                .ok()
                .flatten();
                if let Ok(mut mine) = shared.version.lock() {
                    *mine = Some(v);
                }
                tracing::info!(path = %self.path.display(), rules = n, version = v, "rule file edited here; the other replicas follow");
                return Ok(());
            }
            let row: Option<(i64, String)> =
                sqlx::query_as("SELECT version, toml FROM cluster_rules WHERE id = 1")
                    .fetch_optional(shared.db.pool())
                    .await?;
            let (version, text) = match row {
                Some(row) => row,
                None => {
                    // The first replica of the cluster: its rules become the cluster's.
                    let ours = self.seen.read().map(|s| s.clone()).unwrap_or_default();
                    sqlx::query(
                        "INSERT INTO cluster_rules (id, toml, version, updated_at_ms) \
                         VALUES (1, $1, 1, $2) ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(&ours)
                    .bind(now_ms())
                    .execute(shared.db.pool())
                    .await?;
                    return Ok(());
                }
            };
            let known = shared.version.lock().ok().and_then(|v| *v);
            if known.is_some_and(|k| k >= version) {
                return Ok(());
            }
            if let Ok(mut mine) = shared.version.lock() {
                *mine = Some(version);
            }
            let store = self.clone();
            let adopted = tokio::task::spawn_blocking(move || store.adopt(&text)).await;
            match adopted {
                Ok(Ok(Some(n))) => {
                    tracing::info!(rules = n, version, "rules from the cluster activated")
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, version, "the cluster's rules do not compile here (personas differ?); the previous rules stay active")
                }
                Err(_) => {}
            }
            Ok::<(), sqlx::Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                if shared.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the cluster's rules are readable again");
                }
            }
            Err(e) => {
                if !shared.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "reading the cluster's rules failed; the active rules stay until the database answers");
                }
            }
        }
    }

    /// The rule file's text when it changed since last read or written here and compiles
    /// (a file that does not compile is reported once and left alone).
    fn edited_file(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        if self.seen.read().map(|s| *s == text).unwrap_or(false) {
            return None;
        }
        match self.validate(&text) {
            Ok(_) => Some(text),
            Err(e) => {
                if let Ok(mut s) = self.seen.write() {
                    *s = text;
                }
                tracing::error!(path = %self.path.display(), error = %e, "rule file rejected; the cluster's rules stay active");
                None
            }
        }
    }

    /// Activates the cluster's `text` and writes it to our file; `Ok(None)` when it is what
    /// runs already.
    fn adopt(&self, text: &str) -> Result<Option<usize>, StoreError> {
        if self.current().source() == text {
            if let Ok(mut s) = self.seen.write() {
                *s = text.to_owned();
            }
            return Ok(None);
        }
        let set = self.replace(text)?;
        Ok(Some(set.rules().len()))
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

/// Makes `text` the cluster's rule set; returns its version.
async fn push(db: &Db, text: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO cluster_rules (id, toml, version, updated_at_ms) VALUES (1, $1, 1, $2) \
         ON CONFLICT (id) DO UPDATE SET toml = excluded.toml, \
         version = cluster_rules.version + 1, updated_at_ms = excluded.updated_at_ms \
         RETURNING version",
    )
    .bind(text)
    .bind(now_ms())
    .fetch_one(db.pool())
    .await
}

/// Watches the rule file (and in cluster mode the cluster's rules) until `shutdown`.
pub async fn watch(store: Arc<RuleStore>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Cases: time to look at the file; shutdown.
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Some(shared) = store.shared.get() {
            store.sync(shared).await;
            continue;
        }
        let s = store.clone();
        // File I/O and compiling are blocking work that finishes.
        let _ = tokio::task::spawn_blocking(move || s.reload_if_changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTRA: &str = r#"
[[rule]]
name = "added"
on = "telemetry"
do = [{ log = "seen" }]
"#;

    fn personas() -> Arc<PersonaSet> {
        Arc::new(PersonaSet::load(None, "aria").unwrap())
    }

    fn names(store: &RuleStore) -> Vec<String> {
        store
            .current()
            .rules()
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    /// Two replicas with different rule files on one database end up running one set: the
    /// first one's, then one put over REST on the other, then an edit of the first's file.
    async fn replicas_follow_one_rule_set(db: Db) {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let file_b = dir_b.path().join("rules.toml");
        std::fs::write(&file_b, format!("{DEFAULT_RULES}{EXTRA}")).unwrap();
        let a = RuleStore::open(&dir_a.path().join("rules.toml"), personas()).unwrap();
        let b = RuleStore::open(&file_b, personas()).unwrap();
        assert_ne!(names(&a), names(&b));

        a.share(db.clone()).await;
        b.share(db.clone()).await;
        assert_eq!(
            names(&b),
            names(&a),
            "the later replica adopts the cluster's set"
        );
        assert_eq!(std::fs::read_to_string(&file_b).unwrap(), DEFAULT_RULES);

        // Put on b: the cluster's now; a follows on its next sync, file included.
        let put = format!("{DEFAULT_RULES}{}", EXTRA.replace("added", "put on b"));
        b.put(put.clone()).await.unwrap();
        a.sync(a.shared.get().unwrap()).await;
        assert!(
            names(&a).contains(&"put on b".to_owned()),
            "{:?}",
            names(&a)
        );
        assert_eq!(std::fs::read_to_string(a.path()).unwrap(), put);

        // A set that does not compile changes nothing anywhere.
        let bad = b.put("[[rule]]\nname = 1".into()).await;
        assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");
        a.sync(a.shared.get().unwrap()).await;
        assert!(names(&a).contains(&"put on b".to_owned()));

        // An operator edits a's file: it becomes the cluster's, and b follows.
        let edit = format!("{DEFAULT_RULES}{}", EXTRA.replace("added", "edited on a"));
        std::fs::write(a.path(), &edit).unwrap();
        a.sync(a.shared.get().unwrap()).await;
        assert!(names(&a).contains(&"edited on a".to_owned()));
        b.sync(b.shared.get().unwrap()).await;
        assert!(
            names(&b).contains(&"edited on a".to_owned()),
            "{:?}",
            names(&b)
        );
        assert_eq!(std::fs::read_to_string(&file_b).unwrap(), edit);
        let version: i64 = sqlx::query_scalar("SELECT version FROM cluster_rules")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(version, 3, "first set, put, edit");
    }

    async fn db(settings: crate::settings::Settings) -> Db {
        let db = Db::connect(&settings).await.unwrap();
        db.migrate().await.unwrap();
        db
    }

    #[tokio::test]
    async fn replicas_follow_one_rule_set_on_postgres() {
        let Some(url) = crate::db::test_pg::fresh_database().await else {
            return;
        };
        let mut settings = crate::settings::Settings::default();
        settings.database.url = Some(crate::settings::Secret::new(url));
        replicas_follow_one_rule_set(db(settings).await).await;
    }

    #[tokio::test]
    async fn replicas_follow_one_rule_set_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::settings::Settings {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        };
        replicas_follow_one_rule_set(db(settings).await).await;
    }
}
