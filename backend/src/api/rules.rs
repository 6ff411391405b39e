//! `GET /api/v1/rules`, `PUT /api/v1/rules`, `POST /api/v1/rules/test`.

use serde::{Deserialize, Serialize};
use warp::http::StatusCode;
use warp::reply::Response;

use crate::api_error::ApiError;
use crate::audit::{AuditEntry, Outcome};
use crate::context::Ctx;
use crate::db::now_ms;
use crate::http::{json, json_no_store, Req};
use crate::rules::store::StoreError;
use crate::rules::{Action, DeviceView, EventKind, Field, RuleEvent, RuleSet};

#[derive(Serialize)]
struct RuleInfo<'a> {
    name: &'a str,
    line: usize,
    on: &'static str,
    topic: Option<&'a str>,
    #[serde(rename = "if")]
    condition: Option<&'a str>,
    #[serde(rename = "do")]
    actions: &'a [Action],
}

fn describe(set: &RuleSet) -> serde_json::Value {
    let rules: Vec<RuleInfo> = set
        .rules()
        .iter()
        .map(|r| RuleInfo {
            name: &r.name,
            line: r.line,
            on: r.kind.as_str(),
            topic: r.topic.as_deref(),
            condition: r.condition.as_ref().map(|c| c.0.as_str()),
            actions: &r.actions,
        })
        .collect();
    serde_json::json!({ "rules": rules, "toml": set.source() })
}

pub async fn get(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    ctx.admin(req.auth.as_deref(), req.remote).await?;
    Ok(json(StatusCode::OK, &describe(&ctx.rules.current())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutRules {
    toml: String,
}

/// The rule file comes as `{ "toml": "..." }` or as the TOML text itself
/// (`Content-Type: application/toml` or `text/plain`).
fn rules_text(req: &Req) -> Result<String, ApiError> {
    let body = req.body.as_ref().map_err(|e| e.clone_for_wire())?;
    // No body is a mistake, not an empty rule file: it would drop every rule.
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "a body is required: the rules as TOML, or { \"toml\": \"...\" }".into(),
        ));
    }
    let trimmed = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|i| body[i]);
    if trimmed == Some(b'{') {
        Ok(req.json::<PutRules>()?.toml)
    } else {
        String::from_utf8(body.to_vec())
            .map_err(|_| ApiError::BadRequest("the rules must be UTF-8".into()))
    }
}

pub async fn put(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    let who = ctx.admin(req.auth.as_deref(), req.remote).await?;
    let text = rules_text(&req)?;
    match ctx.rules.put(text).await {
        Ok(set) => {
            ctx.audit
                .record(
                    AuditEntry::new(&who.name, "rules.replace", Outcome::Success)
                        .remote(req.remote)
                        .detail(format!("{} rules", set.rules().len())),
                )
                .await;
            Ok(json(StatusCode::OK, &describe(&set)))
        }
        Err(StoreError::Invalid(e)) => {
            ctx.audit
                .record(
                    AuditEntry::new(&who.name, "rules.replace", Outcome::Failure)
                        .remote(req.remote)
                        .detail(e.to_string()),
                )
                .await;
            Ok(json_no_store(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({ "error": { "code": "invalid_rules", "message": e.to_string(), "rule": e.rule, "line": e.line } }),
            ))
        }
        // Cluster mode: the other replicas could not be told, so nothing changed.
        Err(StoreError::Shared(e)) => Err(e.into()),
        Err(e) => Err(ApiError::Internal(e.into())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestRequest {
    event: TestEvent,
    #[serde(default, deserialize_with = "crate::http::body::object_or_null")]
    device: Option<TestDevice>,
    /// Rules to test instead of the active ones.
    #[serde(default)]
    toml: Option<String>,
}

#[derive(Deserialize)]
struct TestEvent {
    kind: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(flatten)]
    fields: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TestDevice {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    persona: Option<String>,
    #[serde(default)]
    online: Option<bool>,
    #[serde(default)]
    battery_pct: Option<f64>,
}

/// The event fields rules can see (`POST /rules/test` rejects others; the OpenAPI document
/// lists them).
pub const FIELD_NAMES: [&str; 16] = [
    "seq",
    "ts_ms",
    "uptime_s",
    "battery_pct",
    "cpu_temp_c",
    "rssi_dbm",
    "free_mem_kb",
    "button",
    "action",
    "online",
    "agent_version",
    "boot_id",
    "session_id",
    "text",
    "reason",
    "state",
];

pub async fn test(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    ctx.admin(req.auth.as_deref(), req.remote).await?;
    let body: TestRequest = req.json()?;
    let kind = EventKind::parse(&body.event.kind).ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "event.kind {:?} is not one of telemetry, button, status, session, transcript",
            body.event.kind
        ))
    })?;
    let device = body.device.unwrap_or_default();
    // The id rules see as `device.id`: a device id, whether or not the topic names one.
    let device_id = match device.id {
        Some(id) => companion_schema::DeviceId::parse(&id)
            .map_err(|e| ApiError::Unprocessable(format!("device.id: {e}")))?
            .into_string(),
        None => "test-device".into(),
    };
    let mut fields = Vec::new();
    for (k, v) in body.event.fields {
        let name = FIELD_NAMES.iter().find(|n| **n == k).ok_or_else(|| {
            ApiError::Unprocessable(format!("event.{k} is not a field rules know"))
        })?;
        let f = match v {
            serde_json::Value::Bool(b) => Field::Bool(b),
            serde_json::Value::Number(n) if n.is_i64() => Field::Int(n.as_i64().unwrap_or(0)),
            serde_json::Value::Number(n) => Field::Float(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => Field::Text(s),
            _ => {
                return Err(ApiError::Unprocessable(format!(
                    "event.{k} must be a boolean, number or string"
                )))
            }
        };
        fields.push((*name, f));
    }
    let topic = match body.event.topic {
        Some(t) => companion_schema::Topic::parse(&t)
            .map_err(|e| ApiError::Unprocessable(format!("event.topic: {e}")))?,
        None => {
            let id = companion_schema::DeviceId::parse(&device_id)
                .map_err(|e| ApiError::Unprocessable(format!("device.id: {e}")))?;
            companion_schema::Topic::new(id, kind.topic_kind())
        }
    };
    let event = RuleEvent {
        kind,
        topic,
        fields,
    };
    let view = DeviceView {
        id: device_id,
        persona: device
            .persona
            .unwrap_or_else(|| ctx.personas.default_persona().id.to_string()),
        online: device.online.unwrap_or(true),
        battery_pct: device.battery_pct,
    };
    let candidate;
    let set = match body.toml {
        Some(text) => {
            candidate = std::sync::Arc::new(
                ctx.rules
                    .validate(&text)
                    .map_err(|e| ApiError::Unprocessable(e.to_string()))?,
            );
            candidate
        }
        None => ctx.rules.current(),
    };
    let results: Vec<serde_json::Value> = set
        .evaluate(&event, &view, now_ms())
        .into_iter()
        .map(|(rule, verdict)| match verdict {
            Ok(matched) => serde_json::json!({
                "rule": rule.name, "line": rule.line, "matched": matched,
                "actions": if matched { serde_json::to_value(&rule.actions).unwrap_or_default() } else { serde_json::json!([]) },
            }),
            Err(f) => serde_json::json!({ "rule": rule.name, "line": rule.line, "matched": false, "error": f.0, "actions": [] }),
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "results": results }),
    ))
}
