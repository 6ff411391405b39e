//! `POST /api/v1/auth/token`: exchange an admin token for a JWT (24 hours).

use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::Response;

use crate::api_error::ApiError;
use crate::audit::{AuditEntry, Outcome};
use crate::context::Ctx;
use crate::http::{json_no_store, Req};

#[derive(Serialize)]
struct Issued<'a> {
    token: &'a str,
    token_type: &'static str,
    expires_at: String,
    expires_at_ms: i64,
}

pub async fn exchange(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    let who = ctx.admin(req.auth.as_deref(), req.remote).await?;
    let (token, expires_at_ms) = ctx
        .admin
        .issue_jwt(&who, ctx.jwt_lifetime)
        .map_err(|e| ApiError::Internal(e.into()))?;
    ctx.audit
        .record(AuditEntry::new(&who.name, "auth.token", Outcome::Success).remote(req.remote))
        .await;
    Ok(json_no_store(
        StatusCode::OK,
        &Issued {
            token: token.expose(),
            token_type: "Bearer",
            expires_at: super::enroll::rfc3339(expires_at_ms),
            expires_at_ms,
        },
    ))
}
