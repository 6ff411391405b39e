//! Enrolment: `POST /enrollments` (admin) makes a one-time code; `POST /enroll` (no admin
//! credentials) exchanges it for a device's own credentials.

use serde::{Deserialize, Serialize};
use warp::http::StatusCode;
use warp::reply::Response;

use super::devices::{store_error, Registered};
use super::validate_new_device;
use crate::api_error::ApiError;
use crate::audit::{AuditEntry, Outcome};
use crate::context::Ctx;
use crate::http::{json_no_store, Req};
use crate::registry::enrollments::MAX_EXPIRES_IN_S;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCode {
    #[serde(default, deserialize_with = "crate::http::body::opt_integer")]
    expires_in_s: Option<u64>,
    #[serde(default, deserialize_with = "crate::http::body::opt_integer")]
    uses: Option<u32>,
    name_prefix: Option<String>,
}

#[derive(Serialize)]
struct CodeCreated<'a> {
    code: &'a str,
    expires_at: String,
    expires_at_ms: i64,
    uses: u32,
}

/// Largest number of uses one code may have.
pub const MAX_USES: u32 = 10_000;

pub async fn create_code(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    let who = ctx.admin(req.auth.as_deref(), req.remote).await?;
    let body: CreateCode = match &req.body {
        Ok(b) if b.is_empty() => CreateCode {
            expires_in_s: None,
            uses: None,
            name_prefix: None,
        },
        _ => req.json()?,
    };
    let expires_in_s = body.expires_in_s.unwrap_or(3600);
    if expires_in_s == 0 || expires_in_s > MAX_EXPIRES_IN_S {
        return Err(ApiError::Unprocessable(format!(
            "expires_in_s must be 1-{MAX_EXPIRES_IN_S}"
        )));
    }
    let uses = body.uses.unwrap_or(1);
    if uses == 0 || uses > MAX_USES {
        return Err(ApiError::Unprocessable(format!(
            "uses must be 1-{MAX_USES}"
        )));
    }
    if let Some(p) = &body.name_prefix {
        if p.chars().count() > 32 || p.chars().any(char::is_control) {
            return Err(ApiError::Unprocessable(
                "name_prefix must be at most 32 printable characters".into(),
            ));
        }
    }
    let code = ctx
        .enrollments
        .create(expires_in_s, uses, body.name_prefix.as_deref(), &who.name)
        .await
        .map_err(store_error)?;
    ctx.audit
        .record(
            AuditEntry::new(&who.name, "enrollment.create", Outcome::Success)
                .remote(req.remote)
                .detail(format!("uses={uses} expires_in_s={expires_in_s}")),
        )
        .await;
    Ok(json_no_store(
        StatusCode::CREATED,
        &CodeCreated {
            code: code.code.expose(),
            expires_at: rfc3339(code.expires_at_ms),
            expires_at_ms: code.expires_at_ms,
            uses,
        },
    ))
}

pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Enroll {
    code: String,
    name: String,
    device_type: String,
    #[serde(default)]
    capabilities: Vec<String>,
}

pub async fn enroll(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    ctx.public_limit(req.remote)?;
    let body: Enroll = req.json()?;
    // Validate before using the code up, so a typo in the body does not burn it.
    let mut new = validate_new_device(None, &body.name, &body.device_type, &body.capabilities)?;
    let redeemed = ctx
        .enrollments
        .redeem(&body.code)
        .await
        .map_err(store_error)?;
    let redeemed = match redeemed {
        Ok(r) => r,
        Err(why) => {
            ctx.audit
                .record(
                    AuditEntry::new("anonymous", "enrollment.redeem", Outcome::Denied)
                        .remote(req.remote)
                        .detail(why.as_str()),
                )
                .await;
            ctx.enroll_failure_limit(req.remote)?;
            return Err(ApiError::Forbidden(
                "the enrolment code is unknown, expired or used up".into(),
            ));
        }
    };
    if let Some(prefix) = redeemed.name_prefix.filter(|p| !p.is_empty()) {
        let named: String = format!("{prefix}{}", body.name).chars().take(64).collect();
        if let Ok(n) = crate::registry::model::DeviceName::parse(&named) {
            new.name = n;
        }
    }
    let (device, token) = ctx.devices.create(&new).await.map_err(store_error)?;
    ctx.audit
        .record(
            AuditEntry::new(
                format!("enroll:{}", device.device_id),
                "enrollment.redeem",
                Outcome::Success,
            )
            .target(device.device_id.to_string())
            .remote(req.remote),
        )
        .await;
    tracing::info!(device_id = %device.device_id, "device enrolled");
    Ok(json_no_store(
        StatusCode::CREATED,
        &Registered {
            device_id: device.device_id.as_str(),
            auth_token: token.expose(),
            mqtt: &ctx.mqtt,
        },
    ))
}
