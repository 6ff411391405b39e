//! The registry and admin REST API through real HTTP and real MQTT clients, on SQLite and
//! PostgreSQL.

mod common;

use std::time::Duration;

use common::app::{Client, DbKind, TestApp, DEADLINE};
use reqwest::Method;
use serde_json::{json, Value};

async fn device_lifecycle_works_end_to_end(kind: DbKind) {
    let Some(app) = TestApp::start(kind).await else {
        return;
    };

    // Create.
    let resp = app
        .admin(Method::POST, "/api/v1/devices")
        .json(&json!({ "name": "Kitchen Pi", "device_type": "raspberry_pi", "capabilities": ["audio_input", "audio_output", "buttons", "leds"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let created: Value = resp.json().await.unwrap();
    let id = created["device_id"].as_str().unwrap().to_owned();
    let token = created["auth_token"].as_str().unwrap().to_owned();
    assert!(id.starts_with("kitchen-pi-"), "{id}");
    assert_eq!(token.len(), 43);
    assert_eq!(created["mqtt"]["port"], app.mqtts.port());
    assert_eq!(created["mqtt"]["tls"], true);

    // List and get.
    let list: Value = app
        .admin(Method::GET, "/api/v1/devices")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["devices"][0]["device_id"], id.as_str());
    assert!(list["devices"][0].get("auth_token").is_none());
    let got: Value = app
        .admin(Method::GET, &format!("/api/v1/devices/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["name"], "Kitchen Pi");
    assert_eq!(got["enabled"], true);
    assert_eq!(got["presence"]["online"], false);

    // Connect over TLS with the token; presence shows it.
    let mut live = Client::connect(app.device_tls(&id, &token))
        .await
        .expect("the registered device connects");
    let got = app
        .wait_device(&id, |d| d["presence"]["online"] == true)
        .await;
    assert_eq!(got["presence"]["peer"], "127.0.0.1", "{got}");
    let online: Value = app
        .admin(Method::GET, "/api/v1/devices?online=true")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(online["devices"].as_array().unwrap().len(), 1);

    // Rotate: the live connection is kicked, the old token refused, the new one accepted.
    let resp = app
        .admin(Method::POST, &format!("/api/v1/devices/{id}/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rotated: Value = resp.json().await.unwrap();
    let new_token = rotated["auth_token"].as_str().unwrap().to_owned();
    assert_ne!(new_token, token);
    live.wait_closed_within(Duration::from_secs(1)).await;
    assert!(
        Client::connect(app.device_tls(&id, &token)).await.is_err(),
        "old token refused"
    );
    let mut live = Client::connect(app.device_tls(&id, &new_token))
        .await
        .expect("new token accepted");

    // Disable: kicked within a second and refused.
    let resp = app
        .admin(Method::PATCH, &format!("/api/v1/devices/{id}"))
        .json(&json!({ "enabled": false }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    live.wait_closed_within(Duration::from_secs(1)).await;
    assert!(
        Client::connect(app.device_tls(&id, &new_token))
            .await
            .is_err(),
        "disabled device refused"
    );

    // Enable: accepted again.
    let resp = app
        .admin(Method::PATCH, &format!("/api/v1/devices/{id}"))
        .json(&json!({ "enabled": true, "name": "Kitchen" }))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["enabled"], true);
    assert_eq!(body["name"], "Kitchen");
    let mut live = Client::connect(app.device_tls(&id, &new_token))
        .await
        .expect("re-enabled device connects");

    // Delete: kicked, 404, refused.
    let resp = app
        .admin(Method::DELETE, &format!("/api/v1/devices/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    live.wait_closed_within(Duration::from_secs(1)).await;
    let resp = app
        .admin(Method::GET, &format!("/api/v1/devices/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(
        Client::connect(app.device_tls(&id, &new_token))
            .await
            .is_err(),
        "deleted device refused"
    );

    // Every step is audited.
    for action in [
        "device.create",
        "device.token.rotate",
        "device.update",
        "device.delete",
    ] {
        let rows = app.audit(action).await;
        assert!(
            rows.iter()
                .any(|r| r["target"] == id.as_str() && r["actor"] == "bootstrap"),
            "{action}: {rows:?}"
        );
    }
    app.wait_audit("mqtt.connect", |r| {
        r["target"] == id.as_str() && r["detail"] == "bad_token"
    })
    .await;
    app.wait_audit("mqtt.connect", |r| {
        r["target"] == id.as_str() && r["detail"] == "disabled"
    })
    .await;
    app.wait_audit("mqtt.connect", |r| {
        r["target"] == id.as_str() && r["detail"] == "unknown_device"
    })
    .await;
    app.stop().await;
}
on_both_databases!(device_lifecycle_works_end_to_end);

async fn validation_errors_have_the_right_status_and_shape(kind: DbKind) {
    let Some(app) = TestApp::start(kind).await else {
        return;
    };
    let post = |body: String| {
        app.admin(Method::POST, "/api/v1/devices")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "bad_request"),
        ("".into(), 400, "bad_request"),
        (
            json!({ "name": "x", "device_type": "simulated", "extra": 1 }).to_string(),
            422,
            "unprocessable",
        ),
        (
            json!({ "name": "", "device_type": "simulated" }).to_string(),
            422,
            "unprocessable",
        ),
        (
            json!({ "name": "x".repeat(65), "device_type": "simulated" }).to_string(),
            422,
            "unprocessable",
        ),
        (
            json!({ "name": "a\u{7}b", "device_type": "simulated" }).to_string(),
            422,
            "unprocessable",
        ),
        (
            json!({ "name": "x", "device_type": "toaster" }).to_string(),
            422,
            "unprocessable",
        ),
        (
            json!({ "name": "x", "device_type": "simulated", "capabilities": ["telepathy"] })
                .to_string(),
            422,
            "unprocessable",
        ),
        (
            json!({ "name": "x", "device_type": "simulated", "device_id": "Bad_Id" }).to_string(),
            422,
            "unprocessable",
        ),
        (
            json!({ "name": "x", "device_type": "simulated", "device_id": "companion-internal-1" })
                .to_string(),
            422,
            "unprocessable",
        ),
        (
            json!({ "name": 5, "device_type": "simulated" }).to_string(),
            422,
            "unprocessable",
        ),
        // A body is an object, not the struct's fields in an array.
        (json!(["x", "simulated"]).to_string(), 422, "unprocessable"),
    ];
    for (body, status, code) in cases {
        let shown: String = body.chars().take(60).collect();
        let resp = post(body).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{shown}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], code, "{shown}: {err}");
        assert!(err["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }

    // An oversized body is refused from its Content-Length, before it is read. (A raw socket:
    // an HTTP client still sending the body may see the early answer as a broken pipe.)
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(app.http).await.unwrap();
        let head = format!(
            "POST /api/v1/devices HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            app.admin_token,
            70 * 1024
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains("payload_too_large"), "{text}");
    }

    // A chosen id must be unique.
    let body = json!({ "name": "x", "device_type": "simulated", "device_id": "pi-7" });
    assert_eq!(
        app.admin(Method::POST, "/api/v1/devices")
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let resp = app
        .admin(Method::POST, "/api/v1/devices")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);

    // Paths, methods, queries.
    assert_eq!(
        app.admin(Method::GET, "/api/v1/devices/nope")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        app.admin(Method::GET, "/api/v1/devices/NOT_AN_ID")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let resp = app
        .admin(Method::PUT, "/api/v1/devices")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(
        resp.headers()["allow"],
        "POST, GET",
        "RFC 9110: a 405 lists the methods"
    );
    let resp = app
        .admin(Method::POST, "/api/v1/devices/pi-7")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, PATCH, DELETE");
    // PUT /rules with no body is a mistake, not an empty rule file that drops every rule.
    let resp = app
        .admin(Method::PUT, "/api/v1/rules")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let rules: Value = app
        .admin(Method::GET, "/api/v1/rules")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!rules["rules"].as_array().unwrap().is_empty(), "{rules}");
    // An integer may be written with a zero fraction (JSON Schema's `integer`), not more.
    for (body, status) in [
        (json!({ "expires_in_s": 600.0 }), 201),
        (json!({ "expires_in_s": 600.5 }), 422),
        (json!([600]), 422),
    ] {
        let resp = app
            .admin(Method::POST, "/api/v1/enrollments")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{body}");
    }
    assert_eq!(
        app.admin(Method::GET, "/api/v1/devices?limit=0")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        app.admin(Method::GET, "/api/v1/devices?limit=abc")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        app.admin(Method::GET, "/api/v1/devices?bogus=1")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    let resp = app
        .admin(Method::PATCH, "/api/v1/devices/pi-7")
        .json(&json!({ "name": "" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let resp = app
        .admin(Method::GET, "/api/v1/devices")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    app.stop().await;
}
on_both_databases!(validation_errors_have_the_right_status_and_shape);

async fn admin_authentication_refuses_what_it_should(kind: DbKind) {
    let Some(app) = TestApp::start(kind).await else {
        return;
    };
    let url = app.url("/api/v1/devices");
    let resp = app.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    for bad in ["Bearer nope", "Basic abc", "Bearer ", "Bearer a.b.c"] {
        let resp = app
            .client
            .get(&url)
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{bad}");
    }
    app.wait_audit("admin.auth", |r| r["outcome"] == "denied")
        .await;

    // Exchange the admin token for a JWT; the JWT works.
    let resp = app
        .admin(Method::POST, "/api/v1/auth/token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let jwt = body["token"].as_str().unwrap().to_owned();
    let lifetime = body["expires_at_ms"].as_i64().unwrap() - companion_backend::db::now_ms();
    assert!(
        (23 * 3600 * 1000..=24 * 3600 * 1000 + 1000).contains(&lifetime),
        "{lifetime}"
    );
    let resp = app.client.get(&url).bearer_auth(&jwt).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // An expired JWT, issued through the same code path, is refused.
    let principal = companion_backend::registry::Principal {
        name: "bootstrap".into(),
        token_id: "bootstrap".into(),
    };
    let (expired, _) = app
        .app_ctx
        .admin
        .issue_jwt_until(&principal, companion_backend::db::now_ms() - 5_000)
        .unwrap();
    let resp = app
        .client
        .get(&url)
        .bearer_auth(expired.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // A JWT signed with another key is refused.
    let mut tampered = jwt.clone();
    tampered.pop();
    tampered.push(if jwt.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        app.client
            .get(&url)
            .bearer_auth(&tampered)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // A named admin token works until revoked; so do JWTs issued for it.
    let named = app.app_ctx.admin.create_token("ops").await.unwrap();
    let resp = app
        .client
        .get(&url)
        .bearer_auth(named.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app
        .client
        .post(app.url("/api/v1/auth/token"))
        .bearer_auth(named.expose())
        .send()
        .await
        .unwrap();
    let named_jwt = resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(app.app_ctx.admin.revoke_token("ops").await.unwrap());
    assert_eq!(
        app.client
            .get(&url)
            .bearer_auth(named.expose())
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        app.client
            .get(&url)
            .bearer_auth(&named_jwt)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    app.stop().await;
}
on_both_databases!(admin_authentication_refuses_what_it_should);

async fn enrolment_exchanges_a_code_once(kind: DbKind) {
    let Some(app) = TestApp::start(kind).await else {
        return;
    };
    let resp = app
        .admin(Method::POST, "/api/v1/enrollments")
        .json(&json!({ "expires_in_s": 600, "name_prefix": "store-" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let code = resp.json::<Value>().await.unwrap()["code"]
        .as_str()
        .unwrap()
        .to_owned();

    let enroll = |code: String| {
        app.client
            .post(app.url("/api/v1/enroll"))
            .json(&json!({ "code": code, "name": "Till 3", "device_type": "raspberry_pi", "capabilities": ["leds"] }))
            .send()
    };
    let resp = enroll(code.to_lowercase()).await.unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    let id = body["device_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("store-till-3-"), "{id}");
    let token = body["auth_token"].as_str().unwrap();
    Client::connect(app.device_tls(&id, token))
        .await
        .expect("an enrolled device connects");

    // Reused.
    assert_eq!(enroll(code.clone()).await.unwrap().status(), 403);
    // Expired: create one, then move its expiry into the past.
    let resp = app
        .admin(Method::POST, "/api/v1/enrollments")
        .send()
        .await
        .unwrap();
    let old = resp.json::<Value>().await.unwrap()["code"]
        .as_str()
        .unwrap()
        .to_owned();
    sqlx::query("UPDATE enrollments SET expires_at_ms = 1")
        .execute(app.app_ctx.db.pool())
        .await
        .unwrap();
    assert_eq!(enroll(old).await.unwrap().status(), 403);
    // Bad settings.
    for bad in [
        json!({ "expires_in_s": 0 }),
        json!({ "expires_in_s": 8 * 24 * 3600 }),
        json!({ "uses": 0 }),
    ] {
        let resp = app
            .admin(Method::POST, "/api/v1/enrollments")
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 422, "{bad}");
    }
    let rows = app.audit("enrollment.redeem").await;
    assert!(rows.iter().any(|r| r["detail"] == "used_code"), "{rows:?}");
    assert!(
        rows.iter().any(|r| r["detail"] == "expired_code"),
        "{rows:?}"
    );
    assert!(rows
        .iter()
        .any(|r| r["outcome"] == "success" && r["target"] == id.as_str()));
    assert!(!app.audit("enrollment.create").await.is_empty());
    app.stop().await;
}
on_both_databases!(enrolment_exchanges_a_code_once);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_enrolment_codes_is_rate_limited_and_audited() {
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let mut statuses = Vec::new();
    for i in 0..15 {
        let resp = app
            .client
            .post(app.url("/api/v1/enroll"))
            .json(&json!({ "code": format!("WRONG-{i}"), "name": "x", "device_type": "other" }))
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            assert!(resp.headers().contains_key("retry-after"));
        }
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 403).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(*statuses.last().unwrap(), 429, "{statuses:?}");
    let rows = app.audit("enrollment.redeem").await;
    assert_eq!(
        rows.iter()
            .filter(|r| r["detail"] == "unknown_code")
            .count(),
        15
    );
    app.stop().await;
}

/// A wrong enrolment code sent with `X-Forwarded-For: xff`; the status.
async fn wrong_code_from(app: &TestApp, xff: &str) -> u16 {
    app.client
        .post(app.url("/api/v1/enroll"))
        .header("x-forwarded-for", xff)
        .json(&json!({ "code": "WRONG", "name": "x", "device_type": "other" }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn redeem_remotes(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["remote_addr"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_limits_and_audit_follow_the_forwarded_client() {
    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        s.http.trusted_proxies = companion_broker::proxy::Networks::parse(&["127.0.0.1"]).unwrap();
        s.http.enroll_failures_per_minute = 3;
    })
    .await
    .unwrap();
    // Client A (a forged entry on its left, as a client may send) exhausts its own limit...
    let a = "6.6.6.6, 203.0.113.5";
    let statuses: Vec<u16> =
        futures::future::join_all((0..3).map(|_| wrong_code_from(&app, a))).await;
    assert_eq!(statuses, [403, 403, 403]);
    assert_eq!(wrong_code_from(&app, a).await, 429);
    // ...and client B, behind the same proxy, is not locked out with it.
    assert_eq!(wrong_code_from(&app, "203.0.113.6").await, 403);

    let mut remotes = redeem_remotes(&app.audit("enrollment.redeem").await);
    remotes.sort();
    assert_eq!(
        remotes,
        [
            "203.0.113.5",
            "203.0.113.5",
            "203.0.113.5",
            "203.0.113.5",
            "203.0.113.6"
        ]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_forwarded_for_from_an_untrusted_client_changes_nothing() {
    let app = TestApp::start_with(DbKind::Sqlite, |s| s.http.enroll_failures_per_minute = 3)
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(wrong_code_from(&app, &format!("203.0.113.{i}")).await);
    }
    assert_eq!(statuses, [403, 403, 403, 429]);
    assert_eq!(
        redeem_remotes(&app.audit("enrollment.redeem").await),
        ["127.0.0.1"; 4]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_requests_over_the_limit_get_429_with_retry_after() {
    let app = TestApp::start_with(DbKind::Sqlite, |s| s.http.rate_limit_per_minute = 5)
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            app.admin(Method::GET, "/api/v1/devices")
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let resp = app
        .admin(Method::GET, "/api/v1/devices")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    // Operational endpoints are exempt.
    for _ in 0..10 {
        assert_eq!(
            app.client
                .get(app.url("/health"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    app.stop().await;
}

async fn fifty_concurrent_registrations_get_distinct_working_credentials(kind: DbKind) {
    let Some(app) = TestApp::start(kind).await else {
        return;
    };
    let regs = futures::future::join_all((0..50).map(|i| {
        let req = app
            .admin(Method::POST, "/api/v1/devices")
            .json(&json!({ "name": format!("Fleet {i}"), "device_type": "simulated" }));
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 201);
            let b: Value = resp.json().await.unwrap();
            (
                b["device_id"].as_str().unwrap().to_owned(),
                b["auth_token"].as_str().unwrap().to_owned(),
            )
        }
    }))
    .await;
    let ids: std::collections::HashSet<_> = regs.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 50);
    let clients = futures::future::join_all(
        regs.iter()
            .map(|(id, token)| Client::connect(app.device_tls(id, token))),
    )
    .await;
    assert!(clients.iter().all(Result::is_ok), "every token works");
    app.stop().await;
}
on_both_databases!(fifty_concurrent_registrations_get_distinct_working_credentials);

async fn the_audit_log_filters_by_action_time_and_limit(kind: DbKind) {
    let Some(app) = TestApp::start(kind).await else {
        return;
    };
    let before = companion_backend::db::now_ms();
    for i in 0..3 {
        app.register(&format!("audit {i}")).await;
    }
    let (id, _) = app.register("audit x").await;
    app.admin(Method::DELETE, &format!("/api/v1/devices/{id}"))
        .send()
        .await
        .unwrap();
    let all: Value = app
        .admin(Method::GET, &format!("/api/v1/audit?since={before}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = all["entries"].as_array().unwrap();
    assert!(entries.len() >= 5);
    let ts: Vec<i64> = entries
        .iter()
        .map(|e| e["ts_ms"].as_i64().unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] >= w[1]), "newest first");
    assert_eq!(app.audit("device.create").await.len(), 4);
    assert_eq!(app.audit("device.delete").await.len(), 1);
    let limited: Value = app
        .admin(Method::GET, "/api/v1/audit?limit=2")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(limited["entries"].as_array().unwrap().len(), 2);
    let future: Value = app
        .admin(Method::GET, "/api/v1/audit?since=2999-01-01T00:00:00Z")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(future["entries"].as_array().unwrap().is_empty());
    assert_eq!(
        app.admin(Method::GET, "/api/v1/audit?since=yesterday")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    app.stop().await;
}
on_both_databases!(the_audit_log_filters_by_action_time_and_limit);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_exactly_the_routes_the_server_has() {
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let doc: Value = app
        .client
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = std::collections::BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let table = companion_backend::api::route_table(&app.app_ctx);
    let served: std::collections::BTreeSet<_> = table
        .routes()
        .iter()
        .map(|(m, p)| (m.as_str().to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, served, "OpenAPI paths and routes differ");
    // And every documented route answers something other than "no such route".
    for (method, path) in &documented {
        let path = path.replace("{id}", "some-device");
        let resp = app
            .admin(Method::from_bytes(method.as_bytes()).unwrap(), &path)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        if status == 404 || status == 405 {
            let body: Value = resp.json().await.unwrap_or_default();
            assert_ne!(body["error"]["message"], "no such route", "{method} {path}");
            assert_ne!(status, 405, "{method} {path}");
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_use_route_templates_not_raw_paths() {
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let (id, _) = app.register("metrics").await;
    app.admin(Method::GET, &format!("/api/v1/devices/{id}"))
        .send()
        .await
        .unwrap();
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("endpoint=\"/api/v1/devices/{id}\""), "{text}");
    assert!(!text.contains(&id), "no raw path or device id in metrics");
    assert!(text.contains("active_devices"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_http_tls_the_api_is_served_over_https_with_the_broker_certificate() {
    let app = TestApp::start_with(DbKind::Sqlite, |s| s.http.tls = true)
        .await
        .unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&app.ca_pem).unwrap()).unwrap();
    let https = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/api/v1/devices", app.http.port());
    let resp = https
        .get(&url)
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    // Plain HTTP on the same port does not get an answer.
    assert!(app.client.get(app.url("/health")).send().await.is_err());
    app.stop().await;
}
