//! Operational endpoints: `/health`, `/ready`, `/metrics`.

use std::time::Duration;

use serde::Serialize;
use warp::http::{header, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Reply;

use crate::api_error::ApiError;
use crate::context::Ctx;
use crate::http::{json, Req, RouteTable};

pub fn add_routes(t: &mut RouteTable, ctx: &Ctx) {
    t.add(ctx, Method::GET, "/health", health);
    t.add(ctx, Method::GET, "/ready", ready);
    t.add(ctx, Method::GET, "/metrics", metrics);
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

async fn health(_ctx: Ctx, _req: Req) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::OK,
        &Health {
            status: "ok",
            version: env!("CARGO_PKG_VERSION"),
        },
    ))
}

#[derive(Serialize)]
struct Ready {
    status: &'static str,
    checks: Vec<Check>,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
}

async fn ready(ctx: Ctx, _req: Req) -> Result<Response, ApiError> {
    let mut checks = vec![Check {
        name: "database",
        ok: ctx.db.ping(Duration::from_secs(2)).await,
    }];
    if let Some(broker) = &ctx.broker {
        checks.push(Check {
            name: "broker",
            ok: broker.is_up(),
        });
    }
    let all_ok = checks.iter().all(|c| c.ok);
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json(
        status,
        &Ready {
            status: if all_ok { "ready" } else { "not_ready" },
            checks,
        },
    ))
}

async fn metrics(ctx: Ctx, _req: Req) -> Result<Response, ApiError> {
    let text = crate::metrics::render(&ctx.registry)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("encoding metrics: {e}")))?;
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    Ok(resp)
}
