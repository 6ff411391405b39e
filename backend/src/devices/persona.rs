//! A device's current persona: stored, switched, announced.

use std::sync::Arc;
use std::time::Instant;

use companion_schema::{
    DeviceId, PersonaId, PersonaState, SessionState, TopicKind, SCHEMA_VERSION,
};
use sqlx::Row;

use super::metrics::{PersonaLabel, SwitchLabels};
use super::signal::led_for;
use super::Runtime;
use crate::audit::{AuditEntry, Outcome};
use crate::db::now_ms;
use crate::personas::Persona;

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("no persona {0:?}")]
    UnknownPersona(String),
    #[error("storing the persona failed: {0}")]
    Db(#[from] sqlx::Error),
    #[error("publishing failed: {0}")]
    Publish(#[from] crate::bus::BusError),
}

/// The stored persona of a device (with when and why it was set), or the default when none
/// is stored. An error when the database cannot say: the caller must not mistake that for
/// "the default".
pub async fn load(
    rt: &Runtime,
    device: &DeviceId,
) -> Result<(Arc<Persona>, u64, String), sqlx::Error> {
    let row = sqlx::query(
        "SELECT persona_id, switched_at_ms, switch_trigger FROM device_personas WHERE device_id = $1",
    )
    .bind(device.as_str())
    .fetch_optional(rt.db.pool())
    .await?;
    Ok(match row {
        Some(r) => {
            let id: String = r.try_get("persona_id").unwrap_or_default();
            let at: i64 = r.try_get("switched_at_ms").unwrap_or(0);
            let trigger: String = r.try_get("switch_trigger").unwrap_or_default();
            let persona = PersonaId::parse(&id)
                .ok()
                .and_then(|id| rt.personas.get(&id).cloned())
                .unwrap_or_else(|| rt.personas.default_persona().clone());
            (persona, u64::try_from(at).unwrap_or(0), trigger)
        }
        None => (rt.personas.default_persona().clone(), 0, "default".into()),
    })
}

pub fn state(persona: &Persona, switched_at_ms: u64, trigger: &str) -> PersonaState {
    PersonaState {
        v: SCHEMA_VERSION,
        persona_id: persona.id.clone(),
        name: persona.name.clone(),
        color: persona.color,
        voice: persona.voice.clone(),
        switched_at_ms,
        trigger: trigger.to_owned(),
    }
}

/// Who asked for a switch, for the audit log.
async fn store(
    rt: &Runtime,
    device: &DeviceId,
    to: &Persona,
    now: i64,
    trigger: &str,
) -> Result<(), sqlx::Error> {
    // SQLite has one writer: wait in line in process rather than in SQLite's busy handler,
    // which sleeps 1, 2, 5, 10, 20 ms between tries (~15 ms on the persona round trip's p95
    // at 10,000 devices, behind the telemetry batches).
    let _gate = rt.db.write_gate().await;
    sqlx::query(
        "INSERT INTO device_personas (device_id, persona_id, switched_at_ms, switch_trigger)
         SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = $1)
         ON CONFLICT (device_id) DO UPDATE SET
            persona_id = excluded.persona_id, switched_at_ms = excluded.switched_at_ms,
            switch_trigger = excluded.switch_trigger",
    )
    .bind(device.as_str())
    .bind(to.id.as_str())
    .bind(now)
    .bind(trigger)
    .execute(rt.db.pool())
    .await
    .map(drop)
}

pub struct Actor<'a> {
    pub name: &'a str,
    pub remote: Option<std::net::SocketAddr>,
}

/// Stores, publishes (retained `persona`, then an LED command in its colour), measures and
/// (for people) audits a switch. Switching to the current persona re-announces it and
/// counts nothing.
pub async fn switch(
    rt: &Runtime,
    device: &DeviceId,
    from: &Persona,
    to: &Arc<Persona>,
    trigger: &str,
    started: Instant,
    actor: Option<Actor<'_>>,
) -> Result<PersonaState, SwitchError> {
    let now = now_ms();
    let state = state(to, u64::try_from(now).unwrap_or(0), trigger);
    store(rt, device, to, now, trigger).await?;
    rt.bus.publish(device, TopicKind::Persona, &state).await?;
    if from.id != to.id {
        rt.metrics
            .persona_switch_latency
            .get_or_create(&PersonaLabel {
                persona_id: to.id.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
        rt.metrics
            .persona_switches
            .get_or_create(&SwitchLabels {
                from_persona: from.id.to_string(),
                to_persona: to.id.to_string(),
            })
            .inc();
    }
    rt.bus
        .publish(device, TopicKind::Led, &led_for(SessionState::Idle, to))
        .await?;
    if let Some(actor) = actor {
        rt.audit
            .record(
                AuditEntry::new(actor.name, "device.persona", Outcome::Success)
                    .target(device.to_string())
                    .remote(actor.remote)
                    .detail(format!("{} -> {}", from.id, to.id)),
            )
            .await;
    }
    tracing::info!(device_id = %device, from = %from.id, to = %to.id, trigger, "persona switched");
    Ok(state)
}
