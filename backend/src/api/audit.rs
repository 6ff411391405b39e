//! `GET /api/v1/audit?since=&action=&limit=`.

use serde::{Deserialize, Serialize};
use warp::http::StatusCode;
use warp::reply::Response;

use crate::api_error::ApiError;
use crate::audit::{AuditQuery, AuditRecord};
use crate::context::Ctx;
use crate::http::{json, Req};

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    /// Milliseconds since the epoch, or an RFC 3339 time.
    since: Option<String>,
    action: Option<String>,
    limit: Option<u32>,
}

#[derive(Serialize)]
struct Entries {
    entries: Vec<AuditRecord>,
}

fn parse_since(s: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
        .map_err(|_| ApiError::BadRequest("since must be milliseconds or an RFC 3339 time".into()))
}

pub async fn list(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    ctx.admin(req.auth.as_deref(), req.remote).await?;
    let q: Query = req.query()?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!("limit must be 1-{MAX_LIMIT}")));
    }
    let since_ms = q.since.as_deref().map(parse_since).transpose()?;
    let entries = ctx
        .audit
        .query(&AuditQuery {
            since_ms,
            action: q.action,
            limit,
        })
        .await?;
    Ok(json(StatusCode::OK, &Entries { entries }))
}
