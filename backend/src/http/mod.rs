//! The HTTP server: a table of routes (method, path template, handler) turned into one warp
//! filter.
//!
//! Every route is built from its template, so the table is the truth for routing, for the
//! `endpoint` label of `api_requests_total`/`api_request_latency_seconds`, and for the
//! OpenAPI completeness test. Handlers receive a uniform [`Req`] and return
//! `Result<Response, ApiError>`; errors are mapped to JSON in one place
//! ([`crate::api_error`]). The transport knows no routes: the API builds its table
//! (`crate::api::route_table`) and hands the filter to [`server::serve`].

pub mod body;
mod rejection;
pub mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use warp::filters::BoxedFilter;
use warp::http::{header, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::api_error::ApiError;
use crate::metrics::HttpMetrics;

/// Largest accepted request body, in bytes.
pub const MAX_BODY: u64 = 64 * 1024;

/// What every handler gets.
pub struct Req {
    /// Path parameters, in template order.
    pub params: Vec<String>,
    /// The `Authorization` header.
    pub auth: Option<String>,
    /// The client: the connection's peer, or behind a trusted proxy the address it forwarded
    /// (port 0 then). See [`client_addr`]; resolved per request in [`server`].
    pub remote: Option<SocketAddr>,
    /// The raw query string (empty when absent).
    pub query: String,
    /// The body (at most [`MAX_BODY`] bytes), or why it could not be read.
    pub body: Result<Bytes, ApiError>,
}

impl Req {
    /// The `i`th path parameter.
    pub fn param(&self, i: usize) -> &str {
        self.params.get(i).map(String::as_str).unwrap_or("")
    }

    /// Parses the body as a JSON object into `T` (unknown fields are rejected by `T`); see
    /// [`body`].
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        match &self.body {
            Ok(b) => body::parse_object(b),
            Err(e) => Err(e.clone_for_wire()),
        }
    }

    /// Parses the query string into `T`.
    pub fn query<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_urlencoded::from_str(&self.query)
            .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))
    }
}

/// A JSON response with a status.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// A JSON response that carries a secret: never cached.
pub fn json_no_store<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let mut resp = json(status, body);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The routes, as declared.
pub struct RouteTable {
    routes: Vec<(Method, &'static str)>,
    filter: Option<BoxedFilter<(Response,)>>,
    metrics: Arc<HttpMetrics>,
}

impl RouteTable {
    /// An empty table whose routes are measured into `metrics`.
    pub fn new(metrics: Arc<HttpMetrics>) -> Self {
        Self {
            routes: Vec::new(),
            filter: None,
            metrics,
        }
    }

    /// Adds a route. `template` is a path like `/api/v1/devices/{id}`; every request gets its
    /// own clone of `ctx`.
    pub fn add<C, H, Fut>(&mut self, ctx: &C, method: Method, template: &'static str, handler: H)
    where
        C: Clone + Send + Sync + 'static,
        H: Fn(C, Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Response, ApiError>> + Send + 'static,
    {
        self.routes.push((method.clone(), template));
        let ctx = ctx.clone();
        let metrics = self.metrics.clone();
        let route = path_filter(template)
            .and(method_filter(method))
            .and(warp::any().map(Instant::now))
            .and(request_parts())
            .then(move |params: Vec<String>, start: Instant, parts: Parts| {
                let ctx = ctx.clone();
                let handler = handler.clone();
                let metrics = metrics.clone();
                async move {
                    let method = parts.method.clone();
                    let req = Req {
                        params,
                        auth: parts.auth,
                        remote: parts.remote,
                        query: parts.query,
                        body: parts.body,
                    };
                    let resp = handler(ctx, req)
                        .await
                        .unwrap_or_else(ApiError::into_response);
                    metrics.observe(
                        method.as_str(),
                        template,
                        resp.status().as_u16(),
                        start.elapsed(),
                    );
                    resp
                }
            })
            .boxed();
        self.filter = Some(match self.filter.take() {
            None => route,
            Some(prev) => prev.or(route).unify().boxed(),
        });
    }

    /// Every (method, template) pair, in declaration order.
    pub fn routes(&self) -> &[(Method, &'static str)] {
        &self.routes
    }

    /// The whole router: unmatched requests and leftover rejections become JSON errors (a
    /// 405 with the `Allow` header RFC 9110 asks for), and every response gets the security
    /// headers.
    pub fn into_filter(self) -> BoxedFilter<(Response,)> {
        let base = self.filter.unwrap_or_else(|| {
            warp::any()
                .and_then(|| async { Err::<Response, Rejection>(warp::reject::not_found()) })
                .boxed()
        });
        let routes: Arc<[(Method, &'static str)]> = self.routes.into();
        warp::path::full()
            .and(base.recover(rejection::recover).unify())
            .map(move |path: warp::path::FullPath, mut resp: Response| {
                if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
                    if let Some(allow) = allowed_methods(&routes, path.as_str()) {
                        resp.headers_mut().insert(header::ALLOW, allow);
                    }
                }
                resp
            })
            .map(security_headers)
            .boxed()
    }
}

/// The `Allow` value for `path`: the methods of the routes whose template it matches.
fn allowed_methods(routes: &[(Method, &'static str)], path: &str) -> Option<HeaderValue> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let matches = |template: &str| {
        let parts: Vec<&str> = template.split('/').filter(|s| !s.is_empty()).collect();
        parts.len() == segments.len()
            && parts
                .iter()
                .zip(&segments)
                .all(|(t, s)| (t.starts_with('{') && t.ends_with('}')) || t == s)
    };
    let methods: Vec<&str> = routes
        .iter()
        .filter(|(_, template)| matches(template))
        .map(|(m, _)| m.as_str())
        .collect();
    if methods.is_empty() {
        return None;
    }
    HeaderValue::from_str(&methods.join(", ")).ok()
}

/// The path filter for a template: literal segments must match, `{name}` segments are
/// collected in order.
fn path_filter(template: &'static str) -> BoxedFilter<(Vec<String>,)> {
    let mut filter: BoxedFilter<(Vec<String>,)> = warp::any().map(Vec::new).boxed();
    for segment in template.split('/').filter(|s| !s.is_empty()) {
        if segment.starts_with('{') && segment.ends_with('}') {
            filter = filter
                .and(warp::path::param::<String>())
                .map(|mut v: Vec<String>, p: String| {
                    v.push(p);
                    v
                })
                .boxed();
        } else {
            filter = filter.and(warp::path(segment)).boxed();
        }
    }
    filter.and(warp::path::end()).boxed()
}

fn method_filter(method: Method) -> BoxedFilter<()> {
    warp::method()
        .and_then(move |m: Method| {
            let ok = m == method;
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::custom(MethodMismatch))
                }
            }
        })
        .untuple_one()
        .boxed()
}

/// A route's path matched but its method did not.
#[derive(Debug)]
pub struct MethodMismatch;
impl warp::reject::Reject for MethodMismatch {}

struct Parts {
    method: Method,
    auth: Option<String>,
    remote: Option<SocketAddr>,
    query: String,
    body: Result<Bytes, ApiError>,
}

fn request_parts() -> BoxedFilter<(Parts,)> {
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    let auth = warp::header::optional::<String>("authorization")
        .or(warp::any().map(|| None))
        .unify();
    let body = warp::body::content_length_limit(MAX_BODY)
        .and(warp::body::bytes())
        .map(Ok)
        .or_else(|r: Rejection| async move {
            // No Content-Length: no body (GET, DELETE, or a bodiless POST).
            if r.find::<warp::reject::LengthRequired>().is_some() {
                return Ok::<_, Rejection>((Ok(Bytes::new()),));
            }
            Ok((Err(rejection::rejection_to_error(&r)),))
        });
    let remote = warp::ext::optional::<server::ClientAddr>()
        .map(|c: Option<server::ClientAddr>| c.map(|c| c.0));
    warp::method()
        .and(auth)
        .and(remote)
        .and(query)
        .and(body)
        .map(|method, auth, remote, query, body| Parts {
            method,
            auth,
            remote,
            query,
            body,
        })
        .boxed()
}

/// The client's address: the peer, or behind a trusted proxy the address it forwarded in
/// `X-Forwarded-For` (see [`companion_broker::proxy::forwarded_client`]; a header value that
/// is not text counts as empty).
pub fn client_addr<'h>(
    peer: SocketAddr,
    forwarded_for: impl IntoIterator<Item = &'h HeaderValue, IntoIter: DoubleEndedIterator>,
    trusted: &companion_broker::proxy::Networks,
) -> SocketAddr {
    companion_broker::proxy::forwarded_client(
        peer,
        forwarded_for.into_iter().map(|v| v.to_str().unwrap_or("")),
        trusted,
    )
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

/// Shorthand used by handlers.
pub type HandlerResult = Result<Response, ApiError>;

/// Shared pointer alias used by route builders.
pub type Shared<T> = Arc<T>;

#[cfg(test)]
mod tests {
    use super::*;
    use companion_broker::proxy::Networks;

    fn client(peer: &str, xff: &[&str], trusted: &[&str]) -> String {
        let trusted = Networks::parse(trusted).unwrap();
        let xff: Vec<HeaderValue> = xff
            .iter()
            .map(|s| HeaderValue::from_str(s).unwrap())
            .collect();
        client_addr(peer.parse().unwrap(), &xff, &trusted)
            .ip()
            .to_string()
    }

    #[test]
    fn forwarded_for_is_only_believed_from_a_trusted_proxy() {
        // No trusted proxies, or a peer outside them: the header is ignored.
        assert_eq!(
            client("198.51.100.1:5000", &["203.0.113.5"], &[]),
            "198.51.100.1"
        );
        assert_eq!(
            client("198.51.100.1:5000", &["203.0.113.5"], &["127.0.0.1"]),
            "198.51.100.1"
        );
        // nginx on loopback appending the client's address.
        assert_eq!(
            client("127.0.0.1:5000", &["203.0.113.5"], &["127.0.0.1"]),
            "203.0.113.5"
        );
        // A client that forged an entry: nginx appends the real one, which is what counts.
        assert_eq!(
            client("127.0.0.1:5000", &["6.6.6.6, 203.0.113.5"], &["127.0.0.1"]),
            "203.0.113.5"
        );
        // Two proxies (a load balancer in 10/8, then nginx), two header lines.
        assert_eq!(
            client(
                "127.0.0.1:5000",
                &["6.6.6.6, 203.0.113.5", "10.1.2.3"],
                &["127.0.0.1", "10.0.0.0/8"]
            ),
            "203.0.113.5"
        );
        // Ports and brackets.
        assert_eq!(
            client("127.0.0.1:1", &["[2001:db8::7]:443"], &["127.0.0.1"]),
            "2001:db8::7"
        );
        assert_eq!(
            client("127.0.0.1:1", &["203.0.113.5:99"], &["127.0.0.1"]),
            "203.0.113.5"
        );
        // No header, or garbage right after a trusted hop: the last trusted address stands.
        assert_eq!(client("127.0.0.1:1", &[], &["127.0.0.1"]), "127.0.0.1");
        assert_eq!(
            client(
                "127.0.0.1:1",
                &["203.0.113.5, unknown, 10.0.0.9"],
                &["127.0.0.1", "10.0.0.0/8"]
            ),
            "10.0.0.9"
        );
        // Every hop trusted: the leftmost one.
        assert_eq!(
            client(
                "127.0.0.1:1",
                &["10.0.0.2, 10.0.0.1"],
                &["127.0.0.1", "10.0.0.0/8"]
            ),
            "10.0.0.2"
        );
    }
}
