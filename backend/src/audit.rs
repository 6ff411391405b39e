//! The audit log (`audit_log`): every admin action, failed authentication (REST and MQTT),
//! rotation, enrolment and kick. Never records a secret.

use serde::Serialize;
use sqlx::Row;

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

#[derive(Clone, Debug)]
pub struct AuditLog {
    db: Db,
}

impl AuditLog {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Writes an entry. A failure is logged, never propagated: auditing must not break the
    /// action it records.
    pub async fn record(&self, entry: AuditEntry) {
        if let Err(e) = self.try_record(&entry).await {
            tracing::error!(error = %e, action = entry.action, "writing the audit log failed");
        }
    }

    pub async fn try_record(&self, e: &AuditEntry) -> Result<(), sqlx::Error> {
        // Time-ordered, unique id: millisecond timestamp then randomness.
        let ts = now_ms();
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
