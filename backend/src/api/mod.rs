//! The REST API under `/api/v1`: devices, enrolment, admin tokens, audit, OpenAPI.

pub mod audit;
pub mod auth;
pub mod devices;
pub mod enroll;
pub mod mqtt_hook;
pub mod openapi;
pub mod ops;
pub mod personas;
pub mod rules;

use std::collections::BTreeSet;

use companion_schema::DeviceId;
use warp::filters::BoxedFilter;
use warp::http::Method;
use warp::reply::Response;

use crate::api_error::ApiError;
use crate::context::Ctx;
use crate::http::RouteTable;
use crate::registry::model::{Capability, DeviceName, DeviceType};
use crate::registry::NewDevice;

/// Every route of the server: the operational ones and the API.
pub fn route_table(ctx: &Ctx) -> RouteTable {
    let mut t = RouteTable::new(ctx.http_metrics.clone());
    ops::add_routes(&mut t, ctx);
    add_routes(&mut t, ctx);
    t
}

/// The whole router for `ctx`.
pub fn routes(ctx: &Ctx) -> BoxedFilter<(Response,)> {
    route_table(ctx).into_filter()
}

fn add_routes(t: &mut RouteTable, ctx: &Ctx) {
    t.add(ctx, Method::POST, "/api/v1/devices", devices::create);
    t.add(ctx, Method::GET, "/api/v1/devices", devices::list);
    t.add(ctx, Method::GET, "/api/v1/devices/{id}", devices::get);
    t.add(ctx, Method::PATCH, "/api/v1/devices/{id}", devices::patch);
    t.add(ctx, Method::DELETE, "/api/v1/devices/{id}", devices::delete);
    t.add(
        ctx,
        Method::POST,
        "/api/v1/devices/{id}/token",
        devices::rotate,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/enrollments",
        enroll::create_code,
    );
    t.add(
        ctx,
        Method::PUT,
        "/api/v1/devices/{id}/persona",
        personas::set,
    );
    t.add(ctx, Method::GET, "/api/v1/personas", personas::list);
    t.add(ctx, Method::GET, "/api/v1/rules", rules::get);
    t.add(ctx, Method::PUT, "/api/v1/rules", rules::put);
    t.add(ctx, Method::POST, "/api/v1/rules/test", rules::test);
    t.add(ctx, Method::POST, "/api/v1/enroll", enroll::enroll);
    t.add(ctx, Method::GET, "/api/v1/audit", audit::list);
    t.add(ctx, Method::POST, "/api/v1/auth/token", auth::exchange);
    t.add(ctx, Method::GET, "/api/v1/openapi.json", openapi::serve);
    use mqtt_hook as hook;
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/emqx/authn",
        hook::emqx_authn,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/emqx/authz",
        hook::emqx_authz,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/emqx/events",
        hook::emqx_events,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/rabbitmq/user",
        hook::rabbitmq_user,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/rabbitmq/vhost",
        hook::rabbitmq_vhost,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/rabbitmq/resource",
        hook::rabbitmq_resource,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/rabbitmq/topic",
        hook::rabbitmq_topic,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/go-auth/user",
        hook::go_auth_user,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/go-auth/superuser",
        hook::go_auth_superuser,
    );
    t.add(
        ctx,
        Method::POST,
        "/api/v1/mqtt/go-auth/acl",
        hook::go_auth_acl,
    );
}

/// Parses a path's device id (an invalid one cannot exist: 404).
pub fn device_id_param(s: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(s).map_err(|_| ApiError::NotFound(format!("no device {s:?}")))
}

/// Validates the registration fields shared by `POST /devices` and `POST /enroll`.
pub fn validate_new_device(
    device_id: Option<&str>,
    name: &str,
    device_type: &str,
    capabilities: &[String],
) -> Result<NewDevice, ApiError> {
    let device_id = device_id
        .map(|id| {
            let id = DeviceId::parse(id)
                .map_err(|e| ApiError::Unprocessable(format!("device_id: {e}")))?;
            if id
                .as_str()
                .starts_with(companion_broker::RESERVED_CLIENT_ID_PREFIX)
            {
                return Err(ApiError::Unprocessable(format!(
                    "device_id: ids starting with {:?} are reserved",
                    companion_broker::RESERVED_CLIENT_ID_PREFIX
                )));
            }
            Ok(id)
        })
        .transpose()?;
    let name =
        DeviceName::parse(name).map_err(|e| ApiError::Unprocessable(format!("name: {e}")))?;
    let device_type = DeviceType::parse(device_type).ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "device_type: {device_type:?} is not one of raspberry_pi, esp32, simulated, other"
        ))
    })?;
    let mut caps = BTreeSet::new();
    for c in capabilities {
        let cap = Capability::parse(c).ok_or_else(|| {
            ApiError::Unprocessable(format!(
                "capabilities: {c:?} is not one of audio_input, audio_output, buttons, leds, display"
            ))
        })?;
        caps.insert(cap);
    }
    Ok(NewDevice {
        device_id,
        name,
        device_type,
        capabilities: caps,
    })
}
