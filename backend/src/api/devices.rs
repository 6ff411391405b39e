//! `/api/v1/devices`: register, list, read, change, delete, rotate tokens.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::{device_id_param, validate_new_device};
use crate::api_error::ApiError;
use crate::audit::{AuditEntry, Outcome};
use crate::context::{Ctx, Kick, MqttInfo};
use crate::http::{json, json_no_store, Req};
use crate::registry::model::DeviceName;
use crate::registry::{Device, StoreError};

/// Default and largest page size of `GET /devices`.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDevice {
    pub device_id: Option<String>,
    pub name: String,
    pub device_type: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// The registration answer: the token appears here and nowhere else, ever.
#[derive(Serialize)]
pub struct Registered<'a> {
    pub device_id: &'a str,
    pub auth_token: &'a str,
    pub mqtt: &'a MqttInfo,
}

pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Conflict(m) => ApiError::Conflict(m),
        other => ApiError::Internal(other.into()),
    }
}

pub async fn create(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    let who = ctx.admin(req.auth.as_deref(), req.remote).await?;
    let body: CreateDevice = req.json()?;
    let new = validate_new_device(
        body.device_id.as_deref(),
        &body.name,
        &body.device_type,
        &body.capabilities,
    )?;
    let result = ctx.devices.create(&new).await;
    let (device, token) = match result {
        Ok(ok) => ok,
        Err(e) => {
            ctx.audit
                .record(
                    AuditEntry::new(&who.name, "device.create", Outcome::Failure)
                        .target(new.device_id.map(|d| d.to_string()).unwrap_or_default())
                        .remote(req.remote)
                        .detail(e.to_string()),
                )
                .await;
            return Err(store_error(e));
        }
    };
    ctx.audit
        .record(
            AuditEntry::new(&who.name, "device.create", Outcome::Success)
                .target(device.device_id.to_string())
                .remote(req.remote),
        )
        .await;
    tracing::info!(device_id = %device.device_id, actor = %who.name, "device registered");
    Ok(json_no_store(
        StatusCode::CREATED,
        &Registered {
            device_id: device.device_id.as_str(),
            auth_token: token.expose(),
            mqtt: &ctx.mqtt,
        },
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
    cursor: Option<String>,
    online: Option<bool>,
}

#[derive(Serialize)]
struct DeviceList {
    devices: Vec<Device>,
    next_cursor: Option<String>,
}

pub async fn list(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    ctx.admin(req.auth.as_deref(), req.remote).await?;
    let q: ListQuery = req.query()?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!("limit must be 1-{MAX_LIMIT}")));
    }
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| {
            companion_schema::DeviceId::parse(c)
                .map_err(|_| ApiError::BadRequest("invalid cursor".into()))
        })
        .transpose()?;
    let devices = ctx
        .devices
        .list(limit, cursor.as_ref(), q.online)
        .await
        .map_err(store_error)?;
    let next_cursor = (devices.len() == limit as usize)
        .then(|| devices.last().map(|d| d.device_id.to_string()))
        .flatten();
    Ok(json(
        StatusCode::OK,
        &DeviceList {
            devices,
            next_cursor,
        },
    ))
}

#[derive(Serialize, Default)]
struct Presence {
    online: bool,
    last_seen_ms: Option<i64>,
    connected_since_ms: Option<i64>,
    last_disconnect_ms: Option<i64>,
    last_disconnect_reason: Option<String>,
    /// The address of the device's last connection (the device's own behind a PROXY protocol
    /// proxy, `mqtt.proxy_protocol_from`).
    peer: Option<String>,
}

#[derive(Serialize)]
struct PersonaRef {
    persona_id: String,
    switched_at_ms: i64,
    trigger: String,
}

#[derive(Serialize)]
struct TelemetryLatest {
    seq: i64,
    ts_ms: i64,
    received_at_ms: i64,
    uptime_s: i64,
    battery_pct: Option<f64>,
    cpu_temp_c: Option<f64>,
    rssi_dbm: Option<i64>,
    free_mem_kb: Option<i64>,
    extra: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct DeviceDetail {
    #[serde(flatten)]
    device: Device,
    presence: Presence,
    persona: Option<PersonaRef>,
    telemetry: Option<TelemetryLatest>,
}

async fn detail(ctx: &Ctx, device: Device) -> Result<DeviceDetail, sqlx::Error> {
    const PRESENCE: &str = "SELECT online, last_seen_ms, connected_since_ms, last_disconnect_ms, \
        last_disconnect_reason, peer FROM presence WHERE device_id = $1";
    const PERSONA: &str = "SELECT persona_id, switched_at_ms, switch_trigger \
        FROM device_personas WHERE device_id = $1";
    const TELEMETRY: &str = "SELECT seq, ts_ms, received_at_ms, uptime_s, battery_pct, \
        cpu_temp_c, rssi_dbm, free_mem_kb, extra_json FROM telemetry_latest WHERE device_id = $1";
    let id = device.device_id.as_str();
    let pool = ctx.db.pool();
    // Three independent reads, on three pool connections at once.
    let (presence, persona, telemetry) = tokio::try_join!(
        sqlx::query(PRESENCE).bind(id).fetch_optional(pool),
        sqlx::query(PERSONA).bind(id).fetch_optional(pool),
        sqlx::query(TELEMETRY).bind(id).fetch_optional(pool),
    )?;
    let presence = presence
        .map(|r| -> Result<Presence, sqlx::Error> {
            Ok(Presence {
                online: r.try_get::<i64, _>("online")? != 0,
                last_seen_ms: r.try_get("last_seen_ms")?,
                connected_since_ms: r.try_get("connected_since_ms")?,
                last_disconnect_ms: r.try_get("last_disconnect_ms")?,
                last_disconnect_reason: r.try_get("last_disconnect_reason")?,
                peer: r.try_get("peer")?,
            })
        })
        .transpose()?
        .unwrap_or_default();
    let persona = persona
        .map(|r| -> Result<PersonaRef, sqlx::Error> {
            Ok(PersonaRef {
                persona_id: r.try_get("persona_id")?,
                switched_at_ms: r.try_get("switched_at_ms")?,
                trigger: r.try_get("switch_trigger")?,
            })
        })
        .transpose()?;
    let telemetry = telemetry
        .map(|r| -> Result<TelemetryLatest, sqlx::Error> {
            let extra: Option<String> = r.try_get("extra_json")?;
            Ok(TelemetryLatest {
                seq: r.try_get("seq")?,
                ts_ms: r.try_get("ts_ms")?,
                received_at_ms: r.try_get("received_at_ms")?,
                uptime_s: r.try_get("uptime_s")?,
                battery_pct: r.try_get("battery_pct")?,
                cpu_temp_c: r.try_get("cpu_temp_c")?,
                rssi_dbm: r.try_get("rssi_dbm")?,
                free_mem_kb: r.try_get("free_mem_kb")?,
                extra: extra.and_then(|e| serde_json::from_str(&e).ok()),
            })
        })
        .transpose()?;
    Ok(DeviceDetail {
        device,
        presence,
        persona,
        telemetry,
    })
}

pub async fn get(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    ctx.admin(req.auth.as_deref(), req.remote).await?;
    let id = device_id_param(req.param(0))?;
    let device = ctx
        .devices
        .get(&id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::NotFound(format!("no device {id}")))?;
    let detail = detail(&ctx, device).await?;
    Ok(json(StatusCode::OK, &detail))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchDevice {
    name: Option<String>,
    enabled: Option<bool>,
}

pub async fn patch(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    let who = ctx.admin(req.auth.as_deref(), req.remote).await?;
    let id = device_id_param(req.param(0))?;
    let body: PatchDevice = req.json()?;
    let name = body
        .name
        .as_deref()
        .map(|n| DeviceName::parse(n).map_err(|e| ApiError::Unprocessable(format!("name: {e}"))))
        .transpose()?;
    let device = ctx
        .devices
        .update(&id, name.as_ref(), body.enabled)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::NotFound(format!("no device {id}")))?;
    let mut detail = String::new();
    if let Some(enabled) = body.enabled {
        detail.push_str(if enabled { "enabled" } else { "disabled" });
        // The external-broker hook's cache may hold the old state.
        ctx.hook.invalidate(&id);
    }
    if body.name.is_some() {
        detail.push_str(if detail.is_empty() {
            "renamed"
        } else {
            ", renamed"
        });
    }
    if body.enabled == Some(false) {
        match ctx.kick(&id).await {
            Kick::NotConnected => {}
            kick => {
                detail.push_str(", ");
                detail.push_str(kick.as_str());
            }
        }
    }
    ctx.audit
        .record(
            AuditEntry::new(&who.name, "device.update", Outcome::Success)
                .target(id.to_string())
                .remote(req.remote)
                .detail(detail),
        )
        .await;
    Ok(json(StatusCode::OK, &device))
}

pub async fn delete(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    let who = ctx.admin(req.auth.as_deref(), req.remote).await?;
    let id = device_id_param(req.param(0))?;
    if !ctx.devices.delete(&id).await.map_err(store_error)? {
        return Err(ApiError::NotFound(format!("no device {id}")));
    }
    let kick = ctx.kick(&id).await;
    ctx.audit
        .record(
            AuditEntry::new(&who.name, "device.delete", Outcome::Success)
                .target(id.to_string())
                .remote(req.remote)
                .detail(kick.as_str()),
        )
        .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Serialize)]
struct Rotated<'a> {
    device_id: &'a str,
    auth_token: &'a str,
}

pub async fn rotate(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    let who = ctx.admin(req.auth.as_deref(), req.remote).await?;
    let id = device_id_param(req.param(0))?;
    let token = ctx
        .devices
        .rotate_token(&id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::NotFound(format!("no device {id}")))?;
    let kick = ctx.kick(&id).await;
    ctx.audit
        .record(
            AuditEntry::new(&who.name, "device.token.rotate", Outcome::Success)
                .target(id.to_string())
                .remote(req.remote)
                .detail(kick.as_str()),
        )
        .await;
    Ok(json_no_store(
        StatusCode::OK,
        &Rotated {
            device_id: id.as_str(),
            auth_token: token.expose(),
        },
    ))
}
