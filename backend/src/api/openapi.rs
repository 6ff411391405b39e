//! The OpenAPI 3.1 document, served at `/api/v1/openapi.json`. A test compares its paths and
//! methods with the route table, so the two cannot drift apart.

use serde_json::{json, Value};
use warp::http::StatusCode;
use warp::reply::Response;

use crate::api_error::ApiError;
use crate::context::Ctx;
use crate::http::{json as json_reply, Req};

fn err(desc: &str) -> Value {
    json!({ "description": desc, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn body(schema: &str) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn ok(desc: &str, schema: &str) -> Value {
    json!({ "description": desc, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn admin_errors(mut responses: Value) -> Value {
    let map = responses.as_object_mut().expect("object");
    map.insert(
        "401".into(),
        err("missing, invalid, expired or revoked admin credentials"),
    );
    map.insert("429".into(), err("rate limited; see Retry-After"));
    responses
}

fn id_param() -> Value {
    json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "pattern": "^[a-z0-9-]{1,64}$" } }])
}

/// The document.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Companion control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Device registry, enrolment and administration. Admin routes take `Authorization: Bearer <admin token or JWT>`."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": { "code": { "type": "string" }, "message": { "type": "string" } } } } },
                "CreateDevice": { "type": "object", "additionalProperties": false, "required": ["name", "device_type"], "properties": {
                    "device_id": { "type": "string", "pattern": "^[a-z0-9-]{1,64}$" },
                    "name": { "type": "string", "minLength": 1, "maxLength": 64 },
                    "device_type": { "enum": ["raspberry_pi", "esp32", "simulated", "other"] },
                    "capabilities": { "type": "array", "items": { "enum": ["audio_input", "audio_output", "buttons", "leds", "display"] } } } },
                "Registered": { "type": "object", "required": ["device_id", "auth_token", "mqtt"], "properties": {
                    "device_id": { "type": "string" }, "auth_token": { "type": "string" },
                    "mqtt": { "type": "object", "properties": { "host": { "type": "string" }, "port": { "type": "integer" }, "tls": { "type": "boolean" } } } } },
                "Device": { "type": "object", "properties": {
                    "device_id": { "type": "string" }, "name": { "type": "string" }, "device_type": { "type": "string" },
                    "capabilities": { "type": "array", "items": { "type": "string" } }, "enabled": { "type": "boolean" },
                    "created_at_ms": { "type": "integer" }, "updated_at_ms": { "type": "integer" } } },
                "DeviceDetail": { "allOf": [ { "$ref": "#/components/schemas/Device" }, { "type": "object", "properties": {
                    "presence": { "type": "object" }, "persona": { "type": ["object", "null"] }, "telemetry": { "type": ["object", "null"] } } } ] },
                "DeviceList": { "type": "object", "properties": { "devices": { "type": "array", "items": { "$ref": "#/components/schemas/Device" } }, "next_cursor": { "type": ["string", "null"] } } },
                "PatchDevice": { "type": "object", "additionalProperties": false, "properties": { "name": { "type": "string" }, "enabled": { "type": "boolean" } } },
                "Rotated": { "type": "object", "properties": { "device_id": { "type": "string" }, "auth_token": { "type": "string" } } },
                "CreateEnrollment": { "type": "object", "additionalProperties": false, "properties": {
                    "expires_in_s": { "type": "integer", "minimum": 1, "maximum": 604800, "default": 3600 },
                    "uses": { "type": "integer", "minimum": 1, "default": 1 }, "name_prefix": { "type": "string" } } },
                "Enrollment": { "type": "object", "properties": { "code": { "type": "string" }, "expires_at": { "type": "string", "format": "date-time" }, "expires_at_ms": { "type": "integer" }, "uses": { "type": "integer" } } },
                "Enroll": { "type": "object", "additionalProperties": false, "required": ["code", "name", "device_type"], "properties": {
                    "code": { "type": "string" }, "name": { "type": "string" }, "device_type": { "type": "string" },
                    "capabilities": { "type": "array", "items": { "type": "string" } } } },
                "Jwt": { "type": "object", "properties": { "token": { "type": "string" }, "token_type": { "const": "Bearer" }, "expires_at": { "type": "string" }, "expires_at_ms": { "type": "integer" } } },
                "AuditEntries": { "type": "object", "properties": { "entries": { "type": "array", "items": { "type": "object", "properties": {
                    "id": { "type": "string" }, "ts_ms": { "type": "integer" }, "actor": { "type": "string" }, "action": { "type": "string" },
                    "target": { "type": ["string", "null"] }, "outcome": { "type": "string" }, "remote_addr": { "type": ["string", "null"] }, "detail": { "type": ["string", "null"] } } } } } },
                "Health": { "type": "object", "properties": { "status": { "type": "string" }, "version": { "type": "string" } } },
                "Ready": { "type": "object", "properties": { "status": { "type": "string" }, "checks": { "type": "array", "items": { "type": "object" } } } }
            }
        },
        "security": [ { "bearer": [] } ],
        "paths": {
            "/health": { "get": { "summary": "Alive", "security": [], "responses": { "200": ok("the process runs", "Health") } } },
            "/ready": { "get": { "summary": "Database and broker up", "security": [], "responses": { "200": ok("ready", "Ready"), "503": ok("not ready", "Ready") } } },
            "/metrics": { "get": { "summary": "Prometheus metrics (text format 0.0.4)", "security": [], "responses": { "200": { "description": "metrics", "content": { "text/plain": {} } } } } },
            "/api/v1/openapi.json": { "get": { "summary": "This document", "security": [], "responses": { "200": { "description": "OpenAPI 3.1" } } } },
            "/api/v1/devices": {
                "post": { "summary": "Register a device", "requestBody": body("CreateDevice"),
                    "responses": admin_errors(json!({ "201": ok("registered; the token is shown only here", "Registered"), "400": err("malformed JSON"), "409": err("device_id exists"), "413": err("body over 64 KiB"), "422": err("invalid field") })) },
                "get": { "summary": "List devices", "parameters": [
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } },
                        { "name": "cursor", "in": "query", "schema": { "type": "string" } },
                        { "name": "online", "in": "query", "schema": { "type": "boolean" } } ],
                    "responses": admin_errors(json!({ "200": ok("a page of devices", "DeviceList"), "400": err("bad query") })) }
            },
            "/api/v1/devices/{id}": {
                "get": { "summary": "A device with presence, persona and latest telemetry", "parameters": id_param(),
                    "responses": admin_errors(json!({ "200": ok("the device", "DeviceDetail"), "404": err("no such device") })) },
                "patch": { "summary": "Rename, enable or disable (disabling kicks the live connection)", "parameters": id_param(), "requestBody": body("PatchDevice"),
                    "responses": admin_errors(json!({ "200": ok("the device", "Device"), "400": err("malformed JSON"), "404": err("no such device"), "422": err("invalid field") })) },
                "delete": { "summary": "Delete (kicks the live connection)", "parameters": id_param(),
                    "responses": admin_errors(json!({ "204": { "description": "deleted" }, "404": err("no such device") })) }
            },
            "/api/v1/devices/{id}/token": {
                "post": { "summary": "Rotate the device token; the old one stops at once and the live connection is kicked", "parameters": id_param(),
                    "responses": admin_errors(json!({ "200": ok("the new token, shown only here", "Rotated"), "404": err("no such device") })) }
            },
            "/api/v1/devices/{id}/persona": {
                "put": { "summary": "Switch the device's persona (published retained on devices/{id}/persona, LED in its colour)", "parameters": id_param(),
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false, "required": ["persona_id"], "properties": { "persona_id": { "type": "string" } } } } } },
                    "responses": admin_errors(json!({ "200": { "description": "the new persona state" }, "404": err("no such device"), "422": err("no such persona") })) }
            },
            "/api/v1/personas": {
                "get": { "summary": "The loaded personas", "responses": admin_errors(json!({ "200": { "description": "personas" } })) }
            },
            "/api/v1/rules": {
                "get": { "summary": "The active rules, parsed and as TOML", "responses": admin_errors(json!({ "200": { "description": "rules" } })) },
                "put": { "summary": "Replace the rules (validated, persisted, swapped atomically)",
                    "requestBody": { "required": true, "content": { "application/toml": { "schema": { "type": "string" } }, "application/json": { "schema": { "type": "object", "properties": { "toml": { "type": "string" } } } } } },
                    "responses": admin_errors(json!({ "200": { "description": "the new rules" }, "422": { "description": "rejected: { error: { code, message, rule, line } }; the previous rules stay active" } })) }
            },
            "/api/v1/rules/test": {
                "post": { "summary": "Evaluate rules against a sample event, without side effects",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "required": ["event"], "properties": {
                        "event": { "type": "object", "required": ["kind"], "properties": { "kind": { "enum": ["telemetry", "button", "status", "session", "transcript"] }, "topic": { "type": "string" } }, "additionalProperties": true },
                        "device": { "type": "object" }, "toml": { "type": "string", "description": "rules to test instead of the active ones" } } } } } },
                    "responses": admin_errors(json!({ "200": { "description": "each candidate rule with matched, error and the actions that would run" }, "422": err("invalid event or rules") })) }
            },
            "/api/v1/enrollments": {
                "post": { "summary": "Create a one-time enrolment code", "requestBody": { "required": false, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CreateEnrollment" } } } },
                    "responses": admin_errors(json!({ "201": ok("the code, shown only here", "Enrollment"), "422": err("invalid field") })) }
            },
            "/api/v1/enroll": {
                "post": { "summary": "Exchange an enrolment code for device credentials", "security": [], "requestBody": body("Enroll"),
                    "responses": { "201": ok("registered", "Registered"), "400": err("malformed JSON"), "403": err("unknown, expired or used code"), "422": err("invalid field"), "429": err("too many attempts") } }
            },
            "/api/v1/audit": {
                "get": { "summary": "Read the audit log, newest first", "parameters": [
                        { "name": "since", "in": "query", "schema": { "type": "string" }, "description": "milliseconds since the epoch or RFC 3339" },
                        { "name": "action", "in": "query", "schema": { "type": "string" } },
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } } ],
                    "responses": admin_errors(json!({ "200": ok("entries", "AuditEntries"), "400": err("bad query") })) }
            },
            "/api/v1/auth/token": {
                "post": { "summary": "Exchange an admin token for a JWT valid 24 hours",
                    "responses": admin_errors(json!({ "200": ok("the JWT", "Jwt") })) }
            }
        }
    })
}

pub async fn serve(_ctx: Ctx, _req: Req) -> Result<Response, ApiError> {
    Ok(json_reply(StatusCode::OK, &document()))
}
