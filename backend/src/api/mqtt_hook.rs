//! `/api/v1/mqtt/...`: authentication and authorization hooks for devices on an external MQTT
//! broker, in the request/response shapes of the brokers' own HTTP auth plugins. The
//! decisions are [`crate::mqtt_hook::Hook`]'s: the embedded edge's identity rules, token check,
//! ACL and audit.
//!
//! - EMQX 5 HTTP authentication and authorization: JSON body (`clientid`, `username`,
//!   `password`, `peerhost`; `topic`, `action`), answered `{"result": "allow"|"deny"|"ignore"}`.
//!   `ignore` only for a username that cannot be a device (another authenticator's user).
//! - RabbitMQ `rabbitmq_auth_backend_http` with `auth_http.http_method = post` (a GET would put
//!   the token in the URL): form bodies, answered `allow` or `deny` as plain text.
//! - mosquitto-go-auth's HTTP backend (`auth_opt_http_params_mode` json or form,
//!   `auth_opt_http_response_mode` status or json): 200 `{"ok": true}` or 403.
//!
//! Who may ask: a caller from `mqtt_hook.allow_from`, or one with `Authorization: Bearer
//! <mqtt_hook.secret>`; anyone else gets 401 (and counts against the REST limit per address).
//! With neither set the hooks are off (403).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply;

use crate::api_error::ApiError;
use crate::audit::{AuditEntry, Outcome};
use crate::context::Ctx;
use crate::http::{json as json_reply, Req};
use crate::mqtt_hook::{topic_from_routing_key, Access, Authz, Login};

/// The fields of a hook request, whichever encoding it came in.
struct Fields(HashMap<String, String>);

impl Fields {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn str(&self, name: &str) -> &str {
        self.get(name).unwrap_or("")
    }

    /// A JSON object whose members are strings (or, where `numbers` names them, integers).
    fn from_json(body: &[u8], numbers: &[&str]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(ApiError::Unprocessable(
                "the body must be a JSON object".into(),
            ));
        };
        let mut fields = HashMap::with_capacity(map.len());
        for (k, v) in map {
            let v = match v {
                Value::String(s) => s,
                Value::Number(n) if numbers.contains(&k.as_str()) && n.is_i64() => n.to_string(),
                _ if KNOWN.contains(&k.as_str()) => {
                    let kind = if numbers.contains(&k.as_str()) {
                        "an integer"
                    } else {
                        "a string"
                    };
                    return Err(ApiError::Unprocessable(format!("{k} must be {kind}")));
                }
                // Operators may template extra fields into the body; they are not read.
                _ => continue,
            };
            fields.insert(k, v);
        }
        Self(fields).with_username()
    }

    /// Every broker sends the username; a request without one is malformed.
    fn with_username(self) -> Result<Self, ApiError> {
        if self.0.contains_key("username") {
            Ok(self)
        } else {
            Err(ApiError::Unprocessable("username is required".into()))
        }
    }

    /// An `application/x-www-form-urlencoded` body.
    fn from_form(body: &[u8]) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid form body: {e}")))?;
        Self(pairs.into_iter().collect()).with_username()
    }
}

/// The fields the hooks read; any other type in one of these is refused.
const KNOWN: &[&str] = &[
    "clientid", "username", "password", "peerhost", "topic", "action", "acc",
];

/// The request body; every hook request has one.
fn body(req: &Req) -> Result<&[u8], ApiError> {
    match &req.body {
        Ok(b) if b.is_empty() => Err(ApiError::BadRequest("a request body is required".into())),
        Ok(b) => Ok(b),
        Err(e) => Err(e.clone_for_wire()),
    }
}

/// Admits the caller (allowed address or shared secret) and applies the per-address limit.
async fn admit(ctx: &Ctx, req: &Req) -> Result<(), ApiError> {
    let settings = &ctx.hook_settings;
    if !settings.enabled() {
        return Err(ApiError::Forbidden(
            "the MQTT hooks are off: set mqtt_hook.allow_from or mqtt_hook.secret".into(),
        ));
    }
    let by_address = req
        .remote
        .is_some_and(|r| settings.allow_from.contains(r.ip()));
    let by_secret = settings.secret.as_ref().is_some_and(|secret| {
        req.auth
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|presented| {
                // Digests first: equal lengths, so the compare leaks nothing about the length.
                let a = Sha256::digest(presented.trim().as_bytes());
                let b = Sha256::digest(secret.expose().as_bytes());
                bool::from(a.ct_eq(&b))
            })
    });
    if !(by_address || by_secret) {
        ctx.public_limit(req.remote)?;
        ctx.audit
            .record(
                AuditEntry::new("anonymous", "mqtt_hook.call", Outcome::Denied)
                    .remote(req.remote)
                    .detail(if req.auth.is_some() {
                        "wrong secret"
                    } else {
                        "address not allowed and no secret"
                    }),
            )
            .await;
        return Err(ApiError::Unauthorized);
    }
    let key = req
        .remote
        .map_or_else(|| "hook:unknown".into(), |r| format!("hook:{}", r.ip()));
    ctx.hook_limiter
        .check(&key)
        .map_err(|retry_after_s| ApiError::TooManyRequests { retry_after_s })
}

/// The device's own address, where the broker passes it (EMQX `peerhost`, RabbitMQ `ip`).
fn device_addr(fields: &Fields, name: &str) -> Option<SocketAddr> {
    fields
        .get(name)
        .and_then(|s| s.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 0))
}

fn client_id<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields.get(name).filter(|c| !c.is_empty())
}

async fn login(ctx: &Ctx, fields: &Fields, client_id_field: &str, addr_field: &str) -> Login {
    ctx.hook
        .login(
            client_id(fields, client_id_field),
            fields.str("username"),
            fields.str("password").as_bytes(),
            device_addr(fields, addr_field),
        )
        .await
}

// ---- EMQX 5 ----

/// An EMQX answer; a login's also says `is_superuser: false`.
fn emqx(result: &str, is_login: bool) -> Response {
    let mut body = json!({ "result": result });
    if is_login {
        body["is_superuser"] = json!(false);
    }
    json_reply(StatusCode::OK, &body)
}

/// `POST /api/v1/mqtt/emqx/authn`.
pub async fn emqx_authn(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    let fields = Fields::from_json(body(&req)?, &[])?;
    let result = match login(&ctx, &fields, "clientid", "peerhost").await {
        Login::Allow(_) => "allow",
        Login::Deny(_) => "deny",
        Login::NotADevice => "ignore",
    };
    Ok(emqx(result, true))
}

/// `POST /api/v1/mqtt/emqx/authz`.
pub async fn emqx_authz(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    let fields = Fields::from_json(body(&req)?, &[])?;
    let access = match fields.str("action") {
        "publish" => Access::Publish,
        "subscribe" => Access::Subscribe,
        // "all" or anything else: a device never has every right on one topic.
        _ => return Ok(emqx("deny", false)),
    };
    let result = match ctx
        .hook
        .authorize(
            client_id(&fields, "clientid"),
            fields.str("username"),
            fields.str("topic"),
            access,
        )
        .await
    {
        Authz::Allow => "allow",
        Authz::Deny => "deny",
        Authz::NotADevice => "ignore",
    };
    Ok(emqx(result, false))
}

/// `POST /api/v1/mqtt/emqx/events`: EMQX's `client.connected` and `client.disconnected`
/// events (a rule `SELECT * FROM "$events/client_connected", "$events/client_disconnected"`
/// with an HTTP action whose body is the event, `${.}`), for presence. Answered `{"result":
/// "ok"}` when the event changed a device's presence, `"ignored"` otherwise (another event,
/// a client that is not a device, a session taken over, or no external broker here).
pub async fn emqx_events(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    let value: Value = serde_json::from_slice(body(&req)?)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    let Value::Object(ev) = value else {
        return Err(ApiError::Unprocessable(
            "the body must be a JSON object".into(),
        ));
    };
    // Other members (EMQX sends many) are not read.
    let text = |name: &str, required: bool| match ev.get(name) {
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        None if !required => Ok(None),
        None => Err(ApiError::Unprocessable(format!("{name} is required"))),
        Some(_) => Err(ApiError::Unprocessable(format!("{name} must be a string"))),
    };
    let proto_ver = match ev.get("proto_ver") {
        None => None,
        Some(Value::Number(n)) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => n.as_i64(),
        Some(_) => {
            return Err(ApiError::Unprocessable(
                "proto_ver must be an integer".into(),
            ))
        }
    };
    let (event, username) = (text("event", true)?, text("username", true)?);
    let (clientid, peername, reason) = (
        text("clientid", false)?,
        text("peername", false)?,
        text("reason", false)?,
    );
    let change = crate::mqtt_hook::emqx_presence(
        event.unwrap_or_default(),
        clientid,
        username.unwrap_or_default(),
        peername,
        reason,
        proto_ver,
    );
    // The broker's own time of the event: its events may arrive out of order.
    let at_ms = ["connected_at", "disconnected_at", "timestamp"]
        .iter()
        .find_map(|k| ev.get(*k).and_then(Value::as_i64))
        .filter(|t| *t > 0)
        .unwrap_or_else(crate::db::now_ms);
    let result = match change {
        Some(change) if ctx.external_broker => {
            crate::mqtt_auth::write_broker_reported(&ctx.db, &change, at_ms)
                .await
                .map_err(ApiError::from)?;
            "ok"
        }
        Some(_) => {
            tracing::warn!("an EMQX presence event, but this server runs its own broker (mqtt.upstream is empty); ignored");
            "ignored"
        }
        None => "ignored",
    };
    Ok(json_reply(StatusCode::OK, &json!({ "result": result })))
}

// ---- RabbitMQ rabbitmq_auth_backend_http ----

fn rabbit(allow: bool) -> Response {
    let mut resp = if allow { "allow" } else { "deny" }.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `POST /api/v1/mqtt/rabbitmq/user`: the login. No tags, so no management access.
pub async fn rabbitmq_user(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    let fields = Fields::from_form(body(&req)?)?;
    let allow = matches!(
        login(&ctx, &fields, "client_id", "ip").await,
        Login::Allow(_)
    );
    Ok(rabbit(allow))
}

/// `POST /api/v1/mqtt/rabbitmq/vhost`: only the configured virtual host, only for an
/// enabled device.
pub async fn rabbitmq_vhost(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    let fields = Fields::from_form(body(&req)?)?;
    let allow = fields.str("vhost") == ctx.hook_settings.rabbitmq_vhost
        && ctx.hook.active(fields.str("username")).await;
    Ok(rabbit(allow))
}

/// `POST /api/v1/mqtt/rabbitmq/resource`: the MQTT plugin's exchange (read, write) and the
/// device's own subscription queues (`mqtt-subscription-<client id>qos0|1`); nothing else.
pub async fn rabbitmq_resource(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    let fields = Fields::from_form(body(&req)?)?;
    let username = fields.str("username");
    let name = fields.str("name");
    let permitted = match fields.str("resource") {
        "exchange" => {
            name == ctx.hook_settings.rabbitmq_exchange
                && matches!(fields.str("permission"), "read" | "write")
        }
        "queue" => {
            name == format!("mqtt-subscription-{username}qos0")
                || name == format!("mqtt-subscription-{username}qos1")
        }
        _ => false,
    };
    let allow = permitted
        && fields.str("vhost") == ctx.hook_settings.rabbitmq_vhost
        && ctx.hook.active(username).await;
    Ok(rabbit(allow))
}

/// `POST /api/v1/mqtt/rabbitmq/topic`: the device ACL on the routing key (`write` publishes,
/// `read` subscribes).
pub async fn rabbitmq_topic(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    let fields = Fields::from_form(body(&req)?)?;
    let access = match fields.str("permission") {
        "write" => Access::Publish,
        "read" => Access::Subscribe,
        _ => return Ok(rabbit(false)),
    };
    if fields.str("vhost") != ctx.hook_settings.rabbitmq_vhost
        || fields.str("resource") != "topic"
        || fields.str("name") != ctx.hook_settings.rabbitmq_exchange
    {
        return Ok(rabbit(false));
    }
    let topic = topic_from_routing_key(fields.str("routing_key"));
    let authz = ctx
        .hook
        .authorize(
            client_id(&fields, "variable_map.client_id"),
            fields.str("username"),
            &topic,
            access,
        )
        .await;
    Ok(rabbit(authz == Authz::Allow))
}

// ---- mosquitto-go-auth HTTP backend ----

fn go_auth(allow: bool, why: &str) -> Response {
    if allow {
        json_reply(StatusCode::OK, &json!({ "ok": true, "error": "" }))
    } else {
        json_reply(StatusCode::FORBIDDEN, &json!({ "ok": false, "error": why }))
    }
}

/// go-auth sends JSON (`params_mode json`) or a form (`params_mode form`).
fn go_auth_fields(req: &Req) -> Result<Fields, ApiError> {
    let b = body(req)?;
    if b.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'{') {
        Fields::from_json(b, &["acc"])
    } else {
        Fields::from_form(b)
    }
}

/// `POST /api/v1/mqtt/go-auth/user`.
pub async fn go_auth_user(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    let fields = go_auth_fields(&req)?;
    Ok(match login(&ctx, &fields, "clientid", "").await {
        Login::Allow(_) => go_auth(true, ""),
        Login::Deny(reason) => go_auth(false, reason.as_str()),
        Login::NotADevice => go_auth(false, "not a device"),
    })
}

/// `POST /api/v1/mqtt/go-auth/superuser`: devices are never superusers.
pub async fn go_auth_superuser(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    go_auth_fields(&req)?;
    Ok(go_auth(false, "devices are not superusers"))
}

/// `POST /api/v1/mqtt/go-auth/acl`: `acc` 1 read (receive), 2 write (publish), 4 subscribe;
/// 3 (read and write) is never granted: a device's up and down topics are disjoint.
pub async fn go_auth_acl(ctx: Ctx, req: Req) -> Result<Response, ApiError> {
    admit(&ctx, &req).await?;
    let fields = go_auth_fields(&req)?;
    let access = match fields.str("acc") {
        "1" => Access::Receive,
        "2" => Access::Publish,
        "4" => Access::Subscribe,
        _ => return Ok(go_auth(false, "access not granted to devices")),
    };
    let authz = ctx
        .hook
        .authorize(
            client_id(&fields, "clientid"),
            fields.str("username"),
            fields.str("topic"),
            access,
        )
        .await;
    Ok(go_auth(authz == Authz::Allow, "denied"))
}
