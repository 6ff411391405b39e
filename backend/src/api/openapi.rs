//! The OpenAPI 3.1 document, served at `/api/v1/openapi.json`. A test compares its paths and
//! methods with the route table, so the two cannot drift apart; `tests/api_schemathesis.rs`
//! drives the server from it and checks every answer (status, content type, body) against it.
//!
//! So request schemas say what the handlers accept — no more (valid input is accepted), no
//! less (invalid input is refused) — and response schemas list every field with
//! `additionalProperties: false`, so a new field cannot appear on the wire unnoticed. The
//! enumerations come from the code (device types, capabilities, event kinds, topics) and, for
//! personas, from the personas this server loaded.

use serde_json::{json, Map, Value};
use warp::http::StatusCode;
use warp::reply::Response;

use crate::api_error::ApiError;
use crate::context::Ctx;
use crate::http::{json as json_reply, Req, MAX_BODY};
use crate::registry::enrollments::MAX_EXPIRES_IN_S;
use crate::registry::model::{Capability, DeviceType};
use crate::rules::EventKind;

/// `DeviceId::parse`: 1-64 of a-z, 0-9 and '-'.
const DEVICE_ID_PATTERN: &str = "^[a-z0-9-]{1,64}$";
/// `DeviceName::parse`: no control character, not only white space (lengths beside it).
const NAME_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$";
/// A name prefix of an enrolment code: no control character.
const PRINTABLE_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*$";
/// `since` as milliseconds (an `i64` with at most 18 digits, so it always fits).
const MILLIS_PATTERN: &str = "^-?[0-9]{1,18}$";

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn err(desc: &str) -> Value {
    json!({ "description": desc, "content": { "application/json": { "schema": schema_ref("Error") } } })
}

fn ok(desc: &str, schema: &str) -> Value {
    json!({ "description": desc, "content": { "application/json": { "schema": schema_ref(schema) } } })
}

fn body(schema: &str) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": schema_ref(schema) } } })
}

fn insert(mut responses: Value, extra: &[(&str, Value)]) -> Value {
    let map = responses.as_object_mut().expect("responses are an object");
    for (code, resp) in extra {
        map.entry(*code).or_insert_with(|| resp.clone());
    }
    responses
}

/// What every route with admin authentication may also answer.
fn admin_errors(responses: Value) -> Value {
    insert(
        responses,
        &[
            (
                "401",
                err("missing, invalid, expired or revoked admin credentials"),
            ),
            ("429", err("rate limited; see Retry-After")),
            (
                "503",
                err("the database is unavailable or the server is shutting down; see Retry-After"),
            ),
        ],
    )
}

/// What every route that reads a body may also answer.
fn body_errors(responses: Value) -> Value {
    insert(
        responses,
        &[
            (
                "400",
                err("missing or malformed body (not JSON, not UTF-8)"),
            ),
            ("413", err(&format!("body over {MAX_BODY} bytes"))),
        ],
    )
}

fn id_param() -> Value {
    json!([{ "name": "id", "in": "path", "required": true, "schema": schema_ref("DeviceId") }])
}

/// An object schema that lists all of its properties and requires `required`.
fn object(required: &[&str], properties: Value) -> Value {
    json!({ "type": "object", "additionalProperties": false, "required": required, "properties": properties })
}

/// `schema` or `null` (an optional request field: `null` is the same as leaving it out).
fn nullable(mut schema: Value) -> Value {
    let map = schema.as_object_mut().expect("a schema object");
    match map.get("type").cloned() {
        Some(Value::String(t)) => {
            map.insert("type".into(), json!([t, "null"]));
            schema
        }
        _ => json!({ "anyOf": [schema, { "type": "null" }] }),
    }
}

fn strings<'a>(values: impl IntoIterator<Item = &'a str>) -> Value {
    Value::Array(values.into_iter().map(|s| json!(s)).collect())
}

/// The topics `POST /rules/test` accepts: a device's concrete topic.
fn topic_pattern() -> String {
    let kinds: Vec<&str> = companion_schema::TopicKind::ALL
        .iter()
        .map(|k| k.suffix())
        .collect();
    format!(
        "^{}/[a-z0-9-]{{1,64}}/({})$",
        companion_schema::topic::DEVICES_ROOT,
        kinds.join("|")
    )
}

fn schemas(persona_ids: &[&str]) -> Value {
    let device_types = strings(DeviceType::ALL.iter().map(|t| t.as_str()));
    let capabilities = strings(Capability::ALL.iter().map(|c| c.as_str()));
    let event_kinds = strings(EventKind::ALL.iter().map(|k| k.as_str()));
    let rgb = json!({ "type": "array", "minItems": 3, "maxItems": 3, "items": { "type": "integer", "minimum": 0, "maximum": 255 } });
    let ms = json!({ "type": "integer" });
    let opt_string = json!({ "type": ["string", "null"] });
    let device_props = json!({
        "device_id": schema_ref("DeviceId"), "name": { "type": "string" },
        "device_type": { "enum": device_types },
        "capabilities": { "type": "array", "items": { "enum": capabilities } },
        "enabled": { "type": "boolean" }, "created_at_ms": ms, "updated_at_ms": ms,
    });
    let device_fields = [
        "device_id",
        "name",
        "device_type",
        "capabilities",
        "enabled",
        "created_at_ms",
        "updated_at_ms",
    ];
    let mut detail_props = device_props.as_object().cloned().unwrap_or_default();
    detail_props.insert("presence".into(), schema_ref("Presence"));
    detail_props.insert(
        "persona".into(),
        json!({ "anyOf": [schema_ref("PersonaRef"), { "type": "null" }] }),
    );
    detail_props.insert(
        "telemetry".into(),
        json!({ "anyOf": [schema_ref("Telemetry"), { "type": "null" }] }),
    );
    let mut detail_fields = device_fields.to_vec();
    detail_fields.extend(["presence", "persona", "telemetry"]);
    // Every event field as a boolean, number or string; others are refused.
    let mut event_props = Map::new();
    event_props.insert("kind".into(), json!({ "enum": event_kinds }));
    event_props.insert(
        "topic".into(),
        nullable(json!({ "type": "string", "pattern": topic_pattern() })),
    );
    for f in super::rules::FIELD_NAMES {
        event_props.insert(f.into(), json!({ "type": ["boolean", "number", "string"] }));
    }
    let mut all = json!({
        "Error": object(&["error"], json!({ "error": object(&["code", "message"], json!({ "code": { "type": "string" }, "message": { "type": "string" } })) })),
        "RulesError": object(&["error"], json!({ "error": object(&["code", "message", "rule", "line"], json!({
            "code": { "const": "invalid_rules" }, "message": { "type": "string" },
            "rule": opt_string, "line": { "type": ["integer", "null"] } })) })),
        "DeviceId": { "type": "string", "pattern": DEVICE_ID_PATTERN },
        "DeviceName": { "type": "string", "minLength": 1, "maxLength": 64, "pattern": NAME_PATTERN },
        "CreateDevice": object(&["name", "device_type"], json!({
            "device_id": nullable(json!({ "type": "string", "pattern": DEVICE_ID_PATTERN, "description": "absent or null: the server picks one" })),
            "name": schema_ref("DeviceName"),
            "device_type": { "enum": device_types },
            "capabilities": { "type": "array", "items": { "enum": capabilities } } })),
        "Registered": object(&["device_id", "auth_token", "mqtt"], json!({
            "device_id": schema_ref("DeviceId"), "auth_token": { "type": "string" },
            "mqtt": object(&["host", "port", "tls"], json!({ "host": { "type": "string" }, "port": { "type": "integer", "minimum": 1, "maximum": 65535 }, "tls": { "type": "boolean" } })) })),
        "Device": object(&device_fields, device_props),
        "DeviceDetail": object(&detail_fields, Value::Object(detail_props)),
        "Presence": object(&["online", "last_seen_ms", "connected_since_ms", "last_disconnect_ms", "last_disconnect_reason", "peer"], json!({
            "online": { "type": "boolean" }, "last_seen_ms": { "type": ["integer", "null"] },
            "connected_since_ms": { "type": ["integer", "null"] }, "last_disconnect_ms": { "type": ["integer", "null"] },
            "last_disconnect_reason": opt_string, "peer": opt_string })),
        "PersonaRef": object(&["persona_id", "switched_at_ms", "trigger"], json!({
            "persona_id": { "type": "string" }, "switched_at_ms": ms, "trigger": { "type": "string" } })),
        "Telemetry": object(&["seq", "ts_ms", "received_at_ms", "uptime_s", "battery_pct", "cpu_temp_c", "rssi_dbm", "free_mem_kb", "extra"], json!({
            "seq": { "type": "integer" }, "ts_ms": ms, "received_at_ms": ms, "uptime_s": { "type": "integer" },
            "battery_pct": { "type": ["number", "null"] }, "cpu_temp_c": { "type": ["number", "null"] },
            "rssi_dbm": { "type": ["integer", "null"] }, "free_mem_kb": { "type": ["integer", "null"] },
            "extra": { "description": "the device's extra fields, any JSON, or null" } })),
        "DeviceList": object(&["devices", "next_cursor"], json!({
            "devices": { "type": "array", "items": schema_ref("Device") },
            "next_cursor": { "anyOf": [schema_ref("DeviceId"), { "type": "null" }] } })),
        "PatchDevice": object(&[], json!({
            "name": nullable(json!({ "type": "string", "minLength": 1, "maxLength": 64, "pattern": NAME_PATTERN })),
            "enabled": nullable(json!({ "type": "boolean" })) })),
        "Rotated": object(&["device_id", "auth_token"], json!({ "device_id": schema_ref("DeviceId"), "auth_token": { "type": "string" } })),
        "SetPersona": object(&["persona_id"], json!({ "persona_id": { "enum": persona_ids, "description": "one of the personas this server loaded (GET /personas)" } })),
        "PersonaState": object(&["device_id", "persona_id", "name", "color", "voice", "switched_at_ms", "trigger"], json!({
            "device_id": schema_ref("DeviceId"), "persona_id": { "type": "string" }, "name": { "type": "string" },
            "color": rgb, "voice": { "type": "string" }, "switched_at_ms": ms, "trigger": { "type": "string" } })),
        "Personas": object(&["personas"], json!({ "personas": { "type": "array", "items": object(&["id", "name", "color", "voice", "greeting", "llm", "default"], json!({
            "id": { "type": "string" }, "name": { "type": "string" }, "color": rgb, "voice": { "type": "string" },
            "greeting": { "type": "string" }, "default": { "type": "boolean" },
            "llm": object(&["provider", "model"], json!({ "provider": { "type": "string" }, "model": { "type": "string" } })) })) } })),
        "Rules": object(&["rules", "toml"], json!({
            "toml": { "type": "string", "description": "the rule file" },
            "rules": { "type": "array", "items": object(&["name", "line", "on", "topic", "if", "do"], json!({
                "name": { "type": "string" }, "line": { "type": "integer", "minimum": 1 }, "on": { "enum": event_kinds },
                "topic": opt_string, "if": opt_string, "do": { "type": "array", "items": { "type": "object" } } })) } })),
        "PutRules": object(&["toml"], json!({ "toml": { "type": "string" } })),
        "TestRules": object(&["event"], json!({
            "event": { "type": "object", "additionalProperties": false, "required": ["kind"], "properties": event_props },
            "device": nullable(object(&[], json!({
                "id": nullable(json!({ "type": "string", "pattern": DEVICE_ID_PATTERN, "description": "the device in the event's topic when it has none; default test-device" })),
                "persona": opt_string, "online": { "type": ["boolean", "null"] }, "battery_pct": { "type": ["number", "null"] } }))),
            "toml": nullable(json!({ "type": "string", "description": "rules to test instead of the active ones" })) })),
        "TestResults": object(&["results"], json!({ "results": { "type": "array", "items": object(&["rule", "line", "matched", "actions"], json!({
            "rule": { "type": "string" }, "line": { "type": "integer", "minimum": 1 }, "matched": { "type": "boolean" },
            "error": { "type": "string" }, "actions": { "type": "array", "items": { "type": "object" } } })) } })),
        "CreateEnrollment": object(&[], json!({
            "expires_in_s": nullable(json!({ "type": "integer", "minimum": 1, "maximum": MAX_EXPIRES_IN_S, "default": 3600 })),
            "uses": nullable(json!({ "type": "integer", "minimum": 1, "maximum": super::enroll::MAX_USES, "default": 1 })),
            "name_prefix": nullable(json!({ "type": "string", "maxLength": 32, "pattern": PRINTABLE_PATTERN })) })),
        "Enrollment": object(&["code", "expires_at", "expires_at_ms", "uses"], json!({
            "code": { "type": "string" }, "expires_at": { "type": "string", "format": "date-time" }, "expires_at_ms": ms,
            "uses": { "type": "integer", "minimum": 1 } })),
        "Enroll": object(&["code", "name", "device_type"], json!({
            "code": { "type": "string" }, "name": schema_ref("DeviceName"), "device_type": { "enum": device_types },
            "capabilities": { "type": "array", "items": { "enum": capabilities } } })),
        "Jwt": object(&["token", "token_type", "expires_at", "expires_at_ms"], json!({
            "token": { "type": "string" }, "token_type": { "const": "Bearer" },
            "expires_at": { "type": "string", "format": "date-time" }, "expires_at_ms": ms })),
        "AuditEntries": object(&["entries"], json!({ "entries": { "type": "array", "items": object(&["id", "ts_ms", "actor", "action", "target", "outcome", "remote_addr", "detail"], json!({
            "id": { "type": "string" }, "ts_ms": ms, "actor": { "type": "string" }, "action": { "type": "string" },
            "target": opt_string, "outcome": { "type": "string" }, "remote_addr": opt_string, "detail": opt_string })) } })),
        "Health": object(&["status", "version"], json!({ "status": { "const": "ok" }, "version": { "type": "string" } })),
        "Ready": object(&["status", "checks"], json!({ "status": { "enum": ["ready", "not_ready"] }, "checks": { "type": "array", "items": object(&["name", "ok"], json!({ "name": { "type": "string" }, "ok": { "type": "boolean" } })) } }))
    });
    for (name, example) in examples(persona_ids) {
        all[name]["examples"] = json!([example]);
    }
    all
}

/// A request body for each operation that takes one (schemathesis' examples phase sends them).
fn examples(persona_ids: &[&str]) -> [(&'static str, Value); 7] {
    [
        (
            "CreateDevice",
            json!({ "name": "Kitchen speaker", "device_type": "raspberry_pi", "capabilities": ["audio_input", "audio_output", "buttons", "leds"] }),
        ),
        ("PatchDevice", json!({ "enabled": false })),
        (
            "SetPersona",
            json!({ "persona_id": persona_ids.first().copied().unwrap_or_default() }),
        ),
        (
            "PutRules",
            json!({ "toml": "[[rule]]\nname = \"persona button cycles persona\"\non = \"button\"\nif = 'event.button == \"persona\" && event.action == \"press\"'\ndo = [{ persona = \"next\" }]\n" }),
        ),
        (
            "TestRules",
            json!({ "event": { "kind": "button", "button": "persona", "action": "press" } }),
        ),
        (
            "CreateEnrollment",
            json!({ "expires_in_s": 86400, "uses": 5, "name_prefix": "class-3-" }),
        ),
        (
            "Enroll",
            json!({ "code": "the code from POST /enrollments", "name": "Desk speaker", "device_type": "raspberry_pi", "capabilities": ["audio_input", "audio_output"] }),
        ),
    ]
}

/// The document for a server that loaded the personas `persona_ids`.
pub fn document(persona_ids: &[&str]) -> Value {
    let mut doc = base_document(persona_ids);
    if let Some(paths) = doc["paths"].as_object_mut() {
        paths.extend(hook_paths());
    }
    doc
}

fn base_document(persona_ids: &[&str]) -> Value {
    let since = json!({ "anyOf": [
        { "type": "string", "pattern": MILLIS_PATTERN },
        { "type": "string", "format": "date-time" } ] });
    let limit = json!({ "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Companion control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Device registry, enrolment and administration. Admin routes take `Authorization: Bearer <admin token or JWT>`. Errors are `{ \"error\": { \"code\", \"message\" } }`; a method a path does not have answers 405 with `Allow`."
        },
        "components": {
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer" },
                "hookSecret": { "type": "http", "scheme": "bearer", "description": "mqtt_hook.secret (or a caller in mqtt_hook.allow_from, without it)" } },
            "schemas": schemas(persona_ids)
        },
        "security": [ { "bearer": [] } ],
        "paths": {
            "/health": { "get": { "summary": "Alive", "security": [], "responses": { "200": ok("the process runs", "Health") } } },
            "/ready": { "get": { "summary": "Database and broker up", "security": [], "responses": { "200": ok("ready", "Ready"), "503": ok("not ready", "Ready") } } },
            "/metrics": { "get": { "summary": "Prometheus metrics (text format 0.0.4)", "security": [], "responses": { "200": { "description": "metrics", "content": { "text/plain": { "schema": { "type": "string" } } } } } } },
            "/api/v1/openapi.json": { "get": { "summary": "This document", "security": [], "responses": { "200": { "description": "OpenAPI 3.1", "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/api/v1/devices": {
                "post": { "summary": "Register a device", "requestBody": body("CreateDevice"),
                    "responses": admin_errors(body_errors(json!({ "201": ok("registered; the token is shown only here", "Registered"), "409": err("device_id exists"), "422": err("invalid field") }))) },
                "get": { "summary": "List devices", "parameters": [
                        { "name": "limit", "in": "query", "schema": limit },
                        { "name": "cursor", "in": "query", "schema": schema_ref("DeviceId"), "description": "next_cursor of the previous page" },
                        { "name": "online", "in": "query", "schema": { "type": "boolean" } } ],
                    "responses": admin_errors(json!({ "200": ok("a page of devices", "DeviceList"), "400": err("bad query") })) }
            },
            "/api/v1/devices/{id}": {
                "get": { "summary": "A device with presence, persona and latest telemetry", "parameters": id_param(),
                    "responses": admin_errors(json!({ "200": ok("the device", "DeviceDetail"), "404": err("no such device") })) },
                "patch": { "summary": "Rename, enable or disable (disabling kicks the live connection)", "parameters": id_param(), "requestBody": body("PatchDevice"),
                    "responses": admin_errors(body_errors(json!({ "200": ok("the device", "Device"), "404": err("no such device"), "422": err("invalid field") }))) },
                "delete": { "summary": "Delete (kicks the live connection)", "parameters": id_param(),
                    "responses": admin_errors(json!({ "204": { "description": "deleted" }, "404": err("no such device") })) }
            },
            "/api/v1/devices/{id}/token": {
                "post": { "summary": "Rotate the device token; the old one stops at once and the live connection is kicked", "parameters": id_param(),
                    "responses": admin_errors(json!({ "200": ok("the new token, shown only here", "Rotated"), "404": err("no such device") })) }
            },
            "/api/v1/devices/{id}/persona": {
                "put": { "summary": "Switch the device's persona (published retained on devices/{id}/persona, LED in its colour)", "parameters": id_param(),
                    "requestBody": body("SetPersona"),
                    "responses": admin_errors(body_errors(json!({ "200": ok("the new persona state", "PersonaState"), "404": err("no such device"), "422": err("no such persona"), "503": err("the database is unavailable or the server is shutting down; see Retry-After") }))) }
            },
            "/api/v1/personas": {
                "get": { "summary": "The loaded personas", "responses": admin_errors(json!({ "200": ok("personas", "Personas") })) }
            },
            "/api/v1/rules": {
                "get": { "summary": "The active rules, parsed and as TOML", "responses": admin_errors(json!({ "200": ok("rules", "Rules") })) },
                "put": { "summary": "Replace the rules (validated, persisted, swapped atomically)",
                    "requestBody": { "required": true, "content": {
                        "application/toml": { "schema": { "type": "string", "minLength": 1 } },
                        "text/plain": { "schema": { "type": "string", "minLength": 1 } },
                        "application/json": { "schema": schema_ref("PutRules") } } },
                    "responses": admin_errors(body_errors(json!({ "200": ok("the new rules", "Rules"),
                        "422": { "description": "rejected, with the rule and line at fault; the previous rules stay active", "content": { "application/json": { "schema": { "anyOf": [schema_ref("RulesError"), schema_ref("Error")] } } } } }))) }
            },
            "/api/v1/rules/test": {
                "post": { "summary": "Evaluate rules against a sample event, without side effects", "requestBody": body("TestRules"),
                    "responses": admin_errors(body_errors(json!({ "200": ok("each candidate rule with matched, error and the actions that would run", "TestResults"), "422": err("invalid event or rules") }))) }
            },
            "/api/v1/enrollments": {
                "post": { "summary": "Create a one-time enrolment code", "requestBody": { "required": false, "content": { "application/json": { "schema": schema_ref("CreateEnrollment") } } },
                    "responses": admin_errors(body_errors(json!({ "201": ok("the code, shown only here", "Enrollment"), "422": err("invalid field") }))) }
            },
            "/api/v1/enroll": {
                "post": { "summary": "Exchange an enrolment code for device credentials", "security": [], "requestBody": body("Enroll"),
                    "responses": body_errors(json!({ "201": ok("registered", "Registered"), "403": err("unknown, expired or used code"), "422": err("invalid field"), "429": err("too many attempts; see Retry-After"), "503": err("the database is unavailable; see Retry-After") })) }
            },
            "/api/v1/audit": {
                "get": { "summary": "Read the audit log, newest first", "parameters": [
                        { "name": "since", "in": "query", "schema": since, "description": "milliseconds since the epoch or RFC 3339" },
                        { "name": "action", "in": "query", "schema": { "type": "string" } },
                        { "name": "limit", "in": "query", "schema": limit } ],
                    "responses": admin_errors(json!({ "200": ok("entries", "AuditEntries"), "400": err("bad query") })) }
            },
            "/api/v1/auth/token": {
                "post": { "summary": "Exchange an admin token for a JWT valid 24 hours",
                    "responses": admin_errors(json!({ "200": ok("the JWT", "Jwt") })) }
            }
        }
    })
}

/// The external-broker hooks (`api::mqtt_hook`): one operation per path, all POST.
fn hook_paths() -> Map<String, Value> {
    let text = |desc: &str| json!({ "description": desc, "content": { "text/plain": { "schema": { "enum": ["allow", "deny"] } } } });
    let strings_object = |fields: &[&str], extra: Option<(&str, Value)>| {
        let mut props = Map::new();
        for f in fields {
            props.insert((*f).into(), json!({ "type": "string" }));
        }
        if let Some((name, schema)) = extra {
            props.insert(name.into(), schema);
        }
        json!({ "type": "object", "required": ["username"], "properties": props })
    };
    let json_body = |schema: Value| json!({ "required": true, "content": { "application/json": { "schema": schema } } });
    let form_body = |schema: Value| json!({ "required": true, "content": { "application/x-www-form-urlencoded": { "schema": schema } } });
    let both_bodies = |json_schema: Value, form_schema: Value| {
        json!({ "required": true, "content": {
        "application/json": { "schema": json_schema },
        "application/x-www-form-urlencoded": { "schema": form_schema } } })
    };
    let errors = |responses: Value| {
        insert(
            body_errors(responses),
            &[
                (
                    "401",
                    err("not from mqtt_hook.allow_from and no or a wrong mqtt_hook.secret"),
                ),
                (
                    "403",
                    err(
                        "the hooks are off (neither mqtt_hook.allow_from nor mqtt_hook.secret set)",
                    ),
                ),
                ("422", err("no username, or a field of the wrong type")),
                (
                    "429",
                    err("rate limited per calling address; see Retry-After"),
                ),
            ],
        )
    };
    let emqx_result = |login: bool| {
        let mut props = json!({ "result": { "enum": ["allow", "deny", "ignore"] } });
        if login {
            props["is_superuser"] = json!({ "const": false });
        }
        json!({ "description": "the decision (ignore: the username cannot be a device's)", "content": { "application/json": { "schema": {
            "type": "object", "required": ["result"], "properties": props, "additionalProperties": false } } } })
    };
    let go_result = json!({ "type": "object", "required": ["ok", "error"], "additionalProperties": false,
        "properties": { "ok": { "type": "boolean" }, "error": { "type": "string" } } });
    let go_responses = || {
        errors(json!({
        "200": { "description": "allowed", "content": { "application/json": { "schema": go_result } } },
        "403": { "description": "denied (or the hooks are off)", "content": { "application/json": { "schema": { "anyOf": [go_result, schema_ref("Error")] } } } } }))
    };
    let op = |summary: &str, request: Value, responses: Value| {
        json!({ "post": {
        "summary": summary, "security": [ { "hookSecret": [] } ], "requestBody": request, "responses": responses } })
    };
    let login = ["clientid", "username", "password", "peerhost"];
    let acl = ["clientid", "username", "topic", "action"];
    let rabbit_user = ["username", "password", "vhost", "client_id"];
    let rabbit_vhost = ["username", "vhost", "ip", "client_id"];
    let rabbit_resource = [
        "username",
        "vhost",
        "resource",
        "name",
        "permission",
        "client_id",
    ];
    let rabbit_topic = [
        "username",
        "vhost",
        "resource",
        "name",
        "permission",
        "routing_key",
        "variable_map.client_id",
        "variable_map.username",
        "variable_map.vhost",
    ];
    let go_user = ["username", "password", "clientid"];
    let go_acl = ["username", "clientid", "topic"];
    let acc = json!({ "type": "integer" });
    let mut paths = Map::new();
    paths.insert(
        "/api/v1/mqtt/emqx/authn".into(),
        op(
            "EMQX 5 HTTP authentication of a device",
            json_body(strings_object(&login, None)),
            errors(json!({ "200": emqx_result(true) })),
        ),
    );
    paths.insert(
        "/api/v1/mqtt/emqx/authz".into(),
        op(
            "EMQX 5 HTTP authorization (action publish or subscribe)",
            json_body(strings_object(&acl, None)),
            errors(json!({ "200": emqx_result(false) })),
        ),
    );
    paths.insert(
        "/api/v1/mqtt/emqx/events".into(),
        op(
            "EMQX 5 client.connected / client.disconnected events (a rule's HTTP action, body ${.}): device presence",
            json_body(json!({ "type": "object", "required": ["event", "username"], "properties": {
                "event": { "type": "string" }, "username": { "type": "string" },
                "clientid": { "type": "string" }, "peername": { "type": "string" },
                "reason": { "type": "string" }, "proto_ver": { "type": "integer" } } })),
            errors(json!({ "200": { "description": "ok: a device's presence changed; ignored: anything else",
                "content": { "application/json": { "schema": { "type": "object", "required": ["result"],
                "additionalProperties": false, "properties": { "result": { "enum": ["ok", "ignored"] } } } } } } })),
        ),
    );
    paths.insert(
        "/api/v1/mqtt/rabbitmq/user".into(),
        op(
            "RabbitMQ auth_backend_http user_path (the login)",
            form_body(strings_object(&rabbit_user, None)),
            errors(json!({ "200": text("allow or deny") })),
        ),
    );
    paths.insert(
        "/api/v1/mqtt/rabbitmq/vhost".into(),
        op(
            "RabbitMQ auth_backend_http vhost_path",
            form_body(strings_object(&rabbit_vhost, None)),
            errors(json!({ "200": text("allow or deny") })),
        ),
    );
    paths.insert("/api/v1/mqtt/rabbitmq/resource".into(), op("RabbitMQ auth_backend_http resource_path (the MQTT exchange and the device's own queues)",
        form_body(strings_object(&rabbit_resource, None)), errors(json!({ "200": text("allow or deny") }))));
    paths.insert(
        "/api/v1/mqtt/rabbitmq/topic".into(),
        op(
            "RabbitMQ auth_backend_http topic_path (the device ACL on the routing key)",
            form_body(strings_object(&rabbit_topic, None)),
            errors(json!({ "200": text("allow or deny") })),
        ),
    );
    paths.insert(
        "/api/v1/mqtt/go-auth/user".into(),
        op(
            "mosquitto-go-auth HTTP backend: the login",
            both_bodies(
                strings_object(&go_user, None),
                strings_object(&go_user, None),
            ),
            go_responses(),
        ),
    );
    paths.insert(
        "/api/v1/mqtt/go-auth/superuser".into(),
        op(
            "mosquitto-go-auth HTTP backend: devices are never superusers (always 403)",
            both_bodies(
                strings_object(&go_user, None),
                strings_object(&go_user, None),
            ),
            go_responses(),
        ),
    );
    paths.insert(
        "/api/v1/mqtt/go-auth/acl".into(),
        op(
            "mosquitto-go-auth HTTP backend: acc 1 read, 2 write, 4 subscribe (3 is never granted)",
            both_bodies(
                strings_object(&go_acl, Some(("acc", acc))),
                strings_object(&go_acl, Some(("acc", json!({ "type": "string" })))),
            ),
            go_responses(),
        ),
    );
    paths
}

pub async fn serve(ctx: Ctx, _req: Req) -> Result<Response, ApiError> {
    let personas: Vec<&str> = ctx.personas.all().iter().map(|p| p.id.as_str()).collect();
    Ok(json_reply(StatusCode::OK, &document(&personas)))
}
