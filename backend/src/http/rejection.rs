//! Warp's rejections (no route, wrong method, bad body) in the REST error shape.

use std::convert::Infallible;

use warp::reply::Response;
use warp::Rejection;

use super::{MethodMismatch, MAX_BODY};
use crate::api_error::ApiError;

/// Maps any rejection left over after routing to the JSON error shape.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    Ok(rejection_to_error(&rejection).into_response())
}

/// Translates warp's built-in rejections.
pub fn rejection_to_error(r: &Rejection) -> ApiError {
    if r.is_not_found() {
        return ApiError::NotFound("no such route".into());
    }
    if let Some(e) = r.find::<ApiError>() {
        return e.clone_for_wire();
    }
    if let Some(e) = r.find::<warp::filters::body::BodyDeserializeError>() {
        return ApiError::BadRequest(format!("invalid JSON body: {e}"));
    }
    if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        return ApiError::PayloadTooLarge { limit: MAX_BODY };
    }
    if r.find::<warp::reject::UnsupportedMediaType>().is_some() {
        return ApiError::BadRequest("expected Content-Type: application/json".into());
    }
    if r.find::<warp::reject::LengthRequired>().is_some() {
        return ApiError::BadRequest("Content-Length is required".into());
    }
    if r.find::<warp::reject::InvalidQuery>().is_some() {
        return ApiError::BadRequest("invalid query string".into());
    }
    if r.find::<warp::reject::MethodNotAllowed>().is_some() || r.find::<MethodMismatch>().is_some()
    {
        return ApiError::MethodNotAllowed;
    }
    if r.find::<warp::reject::MissingHeader>().is_some()
        || r.find::<warp::reject::InvalidHeader>().is_some()
    {
        return ApiError::BadRequest("missing or invalid header".into());
    }
    ApiError::Internal(anyhow::anyhow!("unhandled rejection: {r:?}"))
}
