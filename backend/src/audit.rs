//! The audit log (`audit_log`): every admin action, failed authentication (REST and MQTT),
//! rotation, enrolment and kick. Never records a secret.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::db::{now_ms, Db};
use crate::registry::tokens::{hash_token, random_token};

/// Outcome of an audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

/// One audit record to write.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub actor: String,
    pub action: &'static str,
    pub target: Option<String>,
    pub outcome: Outcome,
    pub remote_addr: Option<String>,
    pub detail: Option<String>,
}

impl AuditEntry {
    pub fn new(actor: impl Into<String>, action: &'static str, outcome: Outcome) -> Self {
        Self {
            actor: actor.into(),
            action,
            target: None,
            outcome,
            remote_addr: None,
            detail: None,
        }
    }

    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    pub fn remote(mut self, remote: Option<std::net::SocketAddr>) -> Self {
        self.remote_addr = remote.map(|r| r.ip().to_string());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// A stored audit record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRecord {
    pub id: String,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub remote_addr: Option<String>,
    pub detail: Option<String>,
}

/// Filters for reading the log.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub since_ms: Option<i64>,
    pub action: Option<String>,
    pub limit: u32,
}

/// Records kept in memory while the database is unavailable; beyond it, new ones are dropped
/// and counted.
pub const UNWRITTEN_CAPACITY: usize = 10_000;
/// Pause between attempts to write kept records.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Records that could not be written because the database was unavailable, oldest first,
/// each with the time it was recorded.
#[derive(Default)]
struct Unwritten {
    queue: Mutex<VecDeque<(i64, AuditEntry)>>,
    kept: Gauge,
    dropped: Counter,
}

#[derive(Clone)]
pub struct AuditLog {
    db: Db,
    unwritten: Arc<Unwritten>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            unwritten: Arc::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "backend_audit_unwritten",
            "Audit records kept in memory because the database was unavailable",
            self.unwritten.kept.clone(),
        );
        registry.register(
            "backend_audit_dropped",
            "Audit records lost: the database was unavailable and the memory queue full",
            self.unwritten.dropped.clone(),
        );
    }

    /// Writes an entry. A failure is logged, never propagated: auditing must not break the
    /// action it records. While the database is unavailable the entry is kept (with its time)
    /// and written by [`AuditLog::run_retries`] when it returns.
    pub async fn record(&self, entry: AuditEntry) {
        let ts = now_ms();
        match self.insert(ts, &entry).await {
            Ok(()) => {}
            Err(e) if crate::db::unavailable(&e) => self.keep(ts, entry),
            Err(e) => {
                tracing::error!(error = %e, action = entry.action, "writing the audit log failed");
            }
        }
    }

    fn keep(&self, ts: i64, entry: AuditEntry) {
        let Ok(mut queue) = self.unwritten.queue.lock() else {
            return;
        };
        if queue.len() >= UNWRITTEN_CAPACITY {
            self.unwritten.dropped.inc();
            tracing::error!(action = entry.action, "the database is unavailable and {UNWRITTEN_CAPACITY} audit records wait already; this one is lost");
            return;
        }
        if queue.is_empty() {
            tracing::warn!(
                "the database is unavailable; audit records are kept in memory until it returns"
            );
        }
        queue.push_back((ts, entry));
        self.unwritten.kept.set(queue.len() as i64);
    }

    /// How many records wait for the database.
    pub fn unwritten(&self) -> usize {
        self.unwritten.queue.lock().map_or(0, |q| q.len())
    }

    /// Writes kept records, oldest first, until `shutdown` (one last attempt then).
    pub async fn run_retries(self, shutdown: CancellationToken) {
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(RETRY_EVERY) => false,
                _ = shutdown.cancelled() => true,
            };
            self.flush().await;
            if stop {
                let left = self.unwritten();
                if left > 0 {
                    tracing::error!(records = left, "audit records not written before shutdown");
                }
                return;
            }
        }
    }

    async fn flush(&self) {
        loop {
            let next = self
                .unwritten
                .queue
                .lock()
                .ok()
                .and_then(|q| q.front().cloned());
            let Some((ts, entry)) = next else {
                return;
            };
            match self.insert(ts, &entry).await {
                Ok(()) => {}
                Err(e) if crate::db::unavailable(&e) => return,
                Err(e) => {
                    tracing::error!(error = %e, action = entry.action, "writing a kept audit record failed; dropping it");
                    self.unwritten.dropped.inc();
                }
            }
            if let Ok(mut q) = self.unwritten.queue.lock() {
                q.pop_front();
                self.unwritten.kept.set(q.len() as i64);
                if q.is_empty() {
                    tracing::info!("audit records kept during the database outage are written");
                }
            }
        }
    }

    pub async fn try_record(&self, e: &AuditEntry) -> Result<(), sqlx::Error> {
        self.insert(now_ms(), e).await
    }

    async fn insert(&self, ts: i64, e: &AuditEntry) -> Result<(), sqlx::Error> {
        // Time-ordered, unique id: millisecond timestamp then randomness.
        let id = format!("{ts:013}-{}", &hash_token(&random_token())[..12]);
        sqlx::query(
            "INSERT INTO audit_log (audit_id, ts_ms, actor, action, target, outcome, remote_addr, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(ts)
        .bind(&e.actor)
        .bind(e.action)
        .bind(e.target.clone())
        .bind(e.outcome.as_str())
        .bind(e.remote_addr.clone())
        .bind(e.detail.clone())
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Newest first.
    pub async fn query(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT audit_id, ts_ms, actor, action, target, outcome, remote_addr, detail
             FROM audit_log
             WHERE ts_ms >= $1 AND ($2 = '' OR action = $2)
             ORDER BY ts_ms DESC, audit_id DESC
             LIMIT $3",
        )
        .bind(q.since_ms.unwrap_or(0))
        .bind(q.action.clone().unwrap_or_default())
        .bind(i64::from(q.limit))
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: r.try_get("audit_id")?,
                    ts_ms: r.try_get("ts_ms")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    outcome: r.try_get("outcome")?,
                    remote_addr: r.try_get("remote_addr")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}
