//! The one place REST errors meet the wire: `{ "error": { "code", "message" } }`.
//! 5xx bodies say nothing internal; the cause goes to the log.

use serde::Serialize;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply;

/// Every error a REST handler can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("{0}")]
    Unprocessable(String),
    #[error("too many requests")]
    TooManyRequests { retry_after_s: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::TooManyRequests { .. } => "rate_limited",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            // A database outage reached here wrapped in another error: still a 503.
            let db_down = e.chain().any(|c| {
                c.downcast_ref::<sqlx::Error>()
                    .is_some_and(crate::db::unavailable)
            });
            if db_down {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "request refused: the database is unavailable"
                );
                return ApiError::Unavailable(DB_UNAVAILABLE.into()).into_response();
            }
            tracing::error!(error = format!("{e:#}"), "request failed");
        }
        let status = self.status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        };
        let mut resp = warp::reply::with_status(warp::reply::json(&body), status).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"companion\""),
                );
            }
            ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(UNAVAILABLE_RETRY_S));
            }
            ApiError::TooManyRequests { retry_after_s } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after_s.max(&1).to_string()) {
                    headers.insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        resp
    }
}

/// What a request gets while the database cannot be reached.
const DB_UNAVAILABLE: &str = "the database is unavailable; try again shortly";
/// Retry-After on 503 answers.
const UNAVAILABLE_RETRY_S: u64 = 5;

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::unavailable(&e) {
            tracing::warn!(error = %e, "request refused: the database is unavailable");
            return ApiError::Unavailable(DB_UNAVAILABLE.into());
        }
        ApiError::Internal(e.into())
    }
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    /// A copy carrying the same status and message (internal causes are flattened to text).
    pub fn clone_for_wire(&self) -> ApiError {
        match self {
            ApiError::BadRequest(m) => ApiError::BadRequest(m.clone()),
            ApiError::Unauthorized => ApiError::Unauthorized,
            ApiError::Forbidden(m) => ApiError::Forbidden(m.clone()),
            ApiError::NotFound(m) => ApiError::NotFound(m.clone()),
            ApiError::Conflict(m) => ApiError::Conflict(m.clone()),
            ApiError::PayloadTooLarge { limit } => ApiError::PayloadTooLarge { limit: *limit },
            ApiError::Unprocessable(m) => ApiError::Unprocessable(m.clone()),
            ApiError::TooManyRequests { retry_after_s } => ApiError::TooManyRequests {
                retry_after_s: *retry_after_s,
            },
            ApiError::Unavailable(m) => ApiError::Unavailable(m.clone()),
            ApiError::Internal(e) => ApiError::Internal(anyhow::anyhow!("{e:#}")),
            ApiError::MethodNotAllowed => ApiError::MethodNotAllowed,
        }
    }
}
