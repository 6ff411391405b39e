//! The REST API and operational endpoints, served by warp.
//!
//! Every route is wrapped by [`metered`], which records `api_requests_total` and
//! `api_request_latency_seconds` under the route template, maps errors to the JSON shape
//! in one place ([`error`]) and adds the security headers.

pub mod error;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use serde::Serialize;
use warp::filters::BoxedFilter;
use warp::http::{header, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::db::Db;
use crate::metrics::HttpMetrics;

pub use error::ApiError;

/// Largest accepted request body, in bytes.
pub const MAX_BODY: u64 = 64 * 1024;

/// A named check that `/ready` runs besides the database ping.
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the HTTP layer needs from the rest of the application.
#[derive(Clone)]
pub struct HttpState {
    pub db: Db,
    pub registry: Arc<Registry>,
    pub metrics: Arc<HttpMetrics>,
    pub ready_checks: Vec<(&'static str, ReadyCheck)>,
}

/// All routes, with errors recovered into JSON.
pub fn routes(state: HttpState) -> BoxedFilter<(Response,)> {
    let state = Arc::new(state);
    let health = warp::path("health").and(warp::path::end()).and(warp::get());
    let health = metered("/health", &state, health.map(|| Ok(health_reply())));

    let ready = warp::path("ready")
        .and(warp::path::end())
        .and(warp::get())
        .and(with(&state))
        .then(|s: Arc<HttpState>| async move { ready(&s).await });
    let ready = metered("/ready", &state, ready);

    let metrics = warp::path("metrics")
        .and(warp::path::end())
        .and(warp::get())
        .and(with(&state))
        .map(|s: Arc<HttpState>| metrics(&s));
    let metrics = metered("/metrics", &state, metrics);

    health
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
        .recover(error::recover)
        .unify()
        .map(security_headers)
        .boxed()
}

fn with<T: Clone + Send + Sync>(
    v: &T,
) -> impl Filter<Extract = (T,), Error = std::convert::Infallible> + Clone {
    let v = v.clone();
    warp::any().map(move || v.clone())
}

/// Times a route, maps its `ApiError` to JSON, and counts it under `endpoint`.
pub fn metered<F>(
    endpoint: &'static str,
    state: &Arc<HttpState>,
    route: F,
) -> BoxedFilter<(Response,)>
where
    F: Filter<Extract = (Result<Response, ApiError>,), Error = Rejection>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let metrics = state.metrics.clone();
    warp::any()
        .map(Instant::now)
        .and(warp::method())
        .and(route)
        .map(
            move |start: Instant, method: Method, result: Result<Response, ApiError>| {
                let resp = result.unwrap_or_else(ApiError::into_response);
                metrics.observe(
                    method.as_str(),
                    endpoint,
                    resp.status().as_u16(),
                    start.elapsed(),
                );
                resp
            },
        )
        .boxed()
}

/// Runs an async handler and keeps its result for [`metered`].
pub fn handle<Fut>(fut: Fut) -> impl Future<Output = Result<Response, ApiError>>
where
    Fut: Future<Output = Result<Response, ApiError>>,
{
    fut
}

fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    resp
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

fn health_reply() -> Response {
    warp::reply::json(&Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
    .into_response()
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

async fn ready(state: &HttpState) -> Result<Response, ApiError> {
    let mut checks = vec![Check {
        name: "database",
        ok: state.db.ping(Duration::from_secs(2)).await,
    }];
    for (name, check) in &state.ready_checks {
        checks.push(Check { name, ok: check() });
    }
    let all_ok = checks.iter().all(|c| c.ok);
    let body = Ready {
        status: if all_ok { "ready" } else { "not_ready" },
        checks,
    };
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(warp::reply::with_status(warp::reply::json(&body), status).into_response())
}

fn metrics(state: &HttpState) -> Result<Response, ApiError> {
    let text = crate::metrics::render(&state.registry)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("encoding metrics: {e}")))?;
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    Ok(resp)
}
