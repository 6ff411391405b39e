//! `GET /api/v1/personas`, `PUT /api/v1/devices/{id}/persona`.

use std::time::Instant;

use companion_schema::PersonaId;
use serde::{Deserialize, Serialize};
use warp::http::StatusCode;
use warp::reply::Response;

use super::device_id_param;
use super::devices::store_error;
use crate::api_error::ApiError;
use crate::context::Ctx;
use crate::devices::{Command, SwitchError};
use crate::http::{json, Req};

#[derive(Serialize)]
struct PersonaInfo<'a> {
    id: &'a str,
    name: &'a str,
    color: [u8; 3],
    voice: &'a str,
    greeting: &'a str,
    llm: &'a crate::personas::LlmChoice,
    default: bool,
}

pub async fn list(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    ctx.admin(req.auth.as_deref(), req.remote).await?;
    let default = ctx.personas.default_persona().id.clone();
    let personas: Vec<PersonaInfo> = ctx
        .personas
        .all()
        .iter()
        .map(|p| PersonaInfo {
            id: p.id.as_str(),
            name: &p.name,
            color: p.color,
            voice: &p.voice,
            greeting: &p.greeting,
            llm: &p.llm,
            default: p.id == default,
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "personas": personas }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPersona {
    persona_id: String,
}

pub async fn set(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    let started = Instant::now();
    let who = ctx.admin(req.auth.as_deref(), req.remote).await?;
    let id = device_id_param(req.param(0))?;
    let body: SetPersona = req.json()?;
    let persona = PersonaId::parse(&body.persona_id)
        .ok()
        .filter(|p| ctx.personas.get(p).is_some())
        .ok_or_else(|| {
            ApiError::Unprocessable(format!("persona_id: no persona {:?}", body.persona_id))
        })?;
    if ctx.devices.get(&id).await.map_err(store_error)?.is_none() {
        return Err(ApiError::NotFound(format!("no device {id}")));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let queued = ctx
        .dispatcher
        .command(
            &id,
            Command::SwitchPersona {
                persona,
                actor: who.name.clone(),
                remote: req.remote,
                started,
                reply: tx,
            },
        )
        .await;
    if !queued {
        return Err(ApiError::Unavailable(
            "the device runtime is shutting down".into(),
        ));
    }
    match rx.await {
        Ok(Ok(state)) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "device_id": id.as_str(),
                "persona_id": state.persona_id.as_str(),
                "name": state.name,
                "color": state.color,
                "voice": state.voice,
                "switched_at_ms": state.switched_at_ms,
                "trigger": state.trigger,
            }),
        )),
        Ok(Err(SwitchError::UnknownPersona(p))) => {
            Err(ApiError::Unprocessable(format!("no persona {p:?}")))
        }
        Ok(Err(e)) => Err(ApiError::Internal(e.into())),
        Err(_) => Err(ApiError::Unavailable(
            "the device runtime is shutting down".into(),
        )),
    }
}
