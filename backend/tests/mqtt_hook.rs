//! The external-broker hooks under `/api/v1/mqtt/`, driven with the request bodies the brokers'
//! documentation gives (EMQX 5 HTTP authn/authz, RabbitMQ `rabbitmq_auth_backend_http` with
//! POST, mosquitto-go-auth's HTTP backend in JSON and form mode), on SQLite and PostgreSQL.
//! `rabbitmq.rs` and `cluster.rs` drive the same hooks from a real RabbitMQ (one node, two nodes).

mod common;
mod voice_fake;

use common::app::{DbKind, TestApp};
use companion_backend::settings::Secret;
use reqwest::Method;
use serde_json::{json, Value};

const SECRET: &str = "hook-secret-for-tests-0123456789";

async fn start(kind: DbKind) -> Option<TestApp> {
    TestApp::start_with(kind, |s| {
        s.mqtt_hook.secret = Some(Secret::new(SECRET));
    })
    .await
}

async fn post_json(app: &TestApp, path: &str, body: Value) -> (u16, String) {
    let resp = app
        .client
        .post(app.url(path))
        .bearer_auth(SECRET)
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn post_form(app: &TestApp, path: &str, form: &[(&str, &str)]) -> (u16, String) {
    let resp = app
        .client
        .post(app.url(path))
        .bearer_auth(SECRET)
        .form(form)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn emqx(app: &TestApp, path: &str, body: Value) -> String {
    let (status, text) = post_json(app, path, body).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["result"].as_str().unwrap().to_owned()
}

async fn rabbit(app: &TestApp, path: &str, form: &[(&str, &str)]) -> String {
    let (status, text) = post_form(app, path, form).await;
    assert_eq!(status, 200, "{text}");
    text
}

async fn emqx_shapes(kind: DbKind) {
    let Some(app) = start(kind).await else {
        return;
    };
    let (id, token) = app.register("Hook EMQX").await;
    let (other, _) = app.register("Hook Other").await;
    let authn = "/api/v1/mqtt/emqx/authn";
    let authz = "/api/v1/mqtt/emqx/authz";

    // The body EMQX's documentation templates: clientid, username, password, peerhost.
    let login = |password: &str, clientid: &str| json!({ "clientid": clientid, "username": id, "password": password, "peerhost": "198.51.100.7" });
    let (status, text) = post_json(&app, authn, login(&token, &id)).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v, json!({ "result": "allow", "is_superuser": false }));
    assert_eq!(emqx(&app, authn, login("wrong-token", &id)).await, "deny");
    assert_eq!(emqx(&app, authn, login(&token, &other)).await, "deny");
    assert_eq!(
        emqx(&app, authn, json!({ "clientid": "companion-internal-x", "username": "companion-internal-x", "password": "p" })).await,
        "deny"
    );
    // A username that cannot be a device's is another authenticator's to decide.
    assert_eq!(
        emqx(
            &app,
            authn,
            json!({ "clientid": "Ops_User", "username": "Ops_User", "password": "p" })
        )
        .await,
        "ignore"
    );
    // Extra template fields are tolerated; a declared field of the wrong type is not.
    assert_eq!(
        emqx(
            &app,
            authn,
            json!({ "clientid": id, "username": id, "password": token, "proto_ver": 5 })
        )
        .await,
        "allow"
    );
    let (status, _) = post_json(&app, authn, json!({ "username": 5 })).await;
    assert_eq!(status, 422);
    let (status, _) = post_json(&app, authn, json!({ "username": null })).await;
    assert_eq!(status, 422);

    // The failures are in the audit log as the edge's are, with the device's address.
    let denied = app
        .wait_audit("mqtt.connect", |r| {
            r["detail"] == "bad_token (external broker)" && r["target"] == id.as_str()
        })
        .await;
    assert_eq!(denied["remote_addr"], "198.51.100.7");

    // Authorization: the device ACL.
    let acl = |topic: &str, action: &str| json!({ "clientid": id, "username": id, "topic": topic, "action": action });
    for (topic, action, want) in [
        (format!("devices/{id}/telemetry"), "publish", "allow"),
        (format!("devices/{id}/audio/up"), "publish", "allow"),
        (format!("devices/{id}/led"), "subscribe", "allow"),
        (format!("devices/{id}/led"), "publish", "deny"),
        (format!("devices/{other}/telemetry"), "publish", "deny"),
        (format!("devices/{other}/led"), "subscribe", "deny"),
        ("devices/#".to_owned(), "subscribe", "deny"),
        (format!("devices/{id}/+"), "subscribe", "deny"),
        (format!("$share/g/devices/{id}/led"), "subscribe", "deny"),
        (format!("devices/{id}/telemetry"), "all", "deny"),
    ] {
        assert_eq!(
            emqx(&app, authz, acl(&topic, action)).await,
            want,
            "{action} {topic}"
        );
    }
    let spoof = json!({ "clientid": other, "username": id, "topic": format!("devices/{id}/telemetry"), "action": "publish" });
    assert_eq!(emqx(&app, authz, spoof).await, "deny");
    app.wait_audit("mqtt.acl", |r| {
        r["detail"] == format!("publish devices/{other}/telemetry (external broker)").as_str()
    })
    .await;

    // Revocation is honoured at once on this replica: disable, rotate.
    let resp = app
        .admin(Method::PATCH, &format!("/api/v1/devices/{id}"))
        .json(&json!({ "enabled": false }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(emqx(&app, authn, login(&token, &id)).await, "deny");
    assert_eq!(
        emqx(
            &app,
            authz,
            acl(&format!("devices/{id}/telemetry"), "publish")
        )
        .await,
        "deny"
    );
    let resp = app
        .admin(Method::PATCH, &format!("/api/v1/devices/{id}"))
        .json(&json!({ "enabled": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(emqx(&app, authn, login(&token, &id)).await, "allow");
    let resp = app
        .admin(Method::POST, &format!("/api/v1/devices/{id}/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rotated: Value = resp.json().await.unwrap();
    let new_token = rotated["auth_token"].as_str().unwrap();
    assert_eq!(emqx(&app, authn, login(&token, &id)).await, "deny");
    assert_eq!(emqx(&app, authn, login(new_token, &id)).await, "allow");
    app.stop().await;
}
on_both_databases!(emqx_shapes);

async fn rabbitmq_shapes(kind: DbKind) {
    let Some(app) = start(kind).await else {
        return;
    };
    let (id, token) = app.register("Hook Rabbit").await;
    let (other, _) = app.register("Hook Rabbit Other").await;
    let q0 = format!("mqtt-subscription-{id}qos0");
    let q1 = format!("mqtt-subscription-{id}qos1");
    let other_q = format!("mqtt-subscription-{other}qos1");
    let user = "/api/v1/mqtt/rabbitmq/user";

    // What RabbitMQ 3.10 sends for `mosquitto_sub -i <id> -u <id> -P <token>` (observed).
    let login = [
        ("username", id.as_str()),
        ("password", token.as_str()),
        ("vhost", "/"),
        ("client_id", id.as_str()),
    ];
    assert_eq!(rabbit(&app, user, &login).await, "allow");
    let wrong = [
        ("username", id.as_str()),
        ("password", "nope"),
        ("vhost", "/"),
        ("client_id", id.as_str()),
    ];
    assert_eq!(rabbit(&app, user, &wrong).await, "deny");
    let mismatch = [
        ("username", id.as_str()),
        ("password", token.as_str()),
        ("client_id", other.as_str()),
    ];
    assert_eq!(rabbit(&app, user, &mismatch).await, "deny");

    let vhost = "/api/v1/mqtt/rabbitmq/vhost";
    assert_eq!(
        rabbit(
            &app,
            vhost,
            &[("username", &id), ("vhost", "/"), ("ip", "127.0.0.1")]
        )
        .await,
        "allow"
    );
    assert_eq!(
        rabbit(
            &app,
            vhost,
            &[("username", &id), ("vhost", "other"), ("ip", "127.0.0.1")]
        )
        .await,
        "deny"
    );

    let resource = "/api/v1/mqtt/rabbitmq/resource";
    for (kind_, name, permission, want) in [
        ("exchange", "amq.topic", "write", "allow"),
        ("exchange", "amq.topic", "read", "allow"),
        ("exchange", "amq.topic", "configure", "deny"),
        ("exchange", "amq.direct", "write", "deny"),
        ("queue", q0.as_str(), "configure", "allow"),
        ("queue", q1.as_str(), "read", "allow"),
        ("queue", other_q.as_str(), "read", "deny"),
        ("queue", "some-queue", "write", "deny"),
    ] {
        let form = [
            ("username", id.as_str()),
            ("vhost", "/"),
            ("resource", kind_),
            ("name", name),
            ("permission", permission),
        ];
        assert_eq!(
            rabbit(&app, resource, &form).await,
            want,
            "{kind_} {name} {permission}"
        );
    }

    let topic = "/api/v1/mqtt/rabbitmq/topic";
    for (routing_key, permission, want) in [
        (format!("devices.{id}.telemetry"), "write", "allow"),
        (format!("devices.{id}.led"), "read", "allow"),
        (format!("devices.{id}.led"), "write", "deny"),
        (format!("devices.{other}.telemetry"), "write", "deny"),
        ("devices.*.led".to_owned(), "read", "deny"),
        ("devices.#".to_owned(), "read", "deny"),
    ] {
        let form = [
            ("username", id.as_str()),
            ("vhost", "/"),
            ("resource", "topic"),
            ("name", "amq.topic"),
            ("permission", permission),
            ("routing_key", routing_key.as_str()),
            ("variable_map.client_id", id.as_str()),
            ("variable_map.username", id.as_str()),
            ("variable_map.vhost", "/"),
        ];
        assert_eq!(
            rabbit(&app, topic, &form).await,
            want,
            "{permission} {routing_key}"
        );
    }
    // The client id in the variable map must be the device's.
    let spoof = [
        ("username", id.as_str()),
        ("vhost", "/"),
        ("resource", "topic"),
        ("name", "amq.topic"),
        ("permission", "write"),
        ("routing_key", &format!("devices.{id}.telemetry")),
        ("variable_map.client_id", other.as_str()),
    ];
    assert_eq!(rabbit(&app, topic, &spoof).await, "deny");

    // A deleted device loses everything at once.
    let resp = app
        .admin(Method::DELETE, &format!("/api/v1/devices/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(rabbit(&app, user, &login).await, "deny");
    assert_eq!(
        rabbit(&app, vhost, &[("username", &id), ("vhost", "/")]).await,
        "deny"
    );
    app.stop().await;
}
on_both_databases!(rabbitmq_shapes);

async fn go_auth_shapes(kind: DbKind) {
    let Some(app) = start(kind).await else {
        return;
    };
    let (id, token) = app.register("Hook Go").await;
    // JSON mode (`auth_opt_http_params_mode json`).
    let (status, body) = post_json(
        &app,
        "/api/v1/mqtt/go-auth/user",
        json!({ "username": id, "password": token, "clientid": id }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({ "ok": true, "error": "" })
    );
    let (status, _) = post_json(
        &app,
        "/api/v1/mqtt/go-auth/user",
        json!({ "username": id, "password": "x", "clientid": id }),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = post_json(
        &app,
        "/api/v1/mqtt/go-auth/superuser",
        json!({ "username": id }),
    )
    .await;
    assert_eq!(status, 403);
    for (topic, acc, want) in [
        (format!("devices/{id}/telemetry"), 2, 200),
        (format!("devices/{id}/led"), 4, 200),
        (format!("devices/{id}/led"), 1, 200),
        (format!("devices/{id}/telemetry"), 1, 403),
        (format!("devices/{id}/led"), 3, 403),
        ("devices/other/telemetry".to_owned(), 2, 403),
    ] {
        let (status, body) = post_json(
            &app,
            "/api/v1/mqtt/go-auth/acl",
            json!({ "username": id, "clientid": id, "topic": topic, "acc": acc }),
        )
        .await;
        assert_eq!(status, want, "acc {acc} {topic}: {body}");
    }
    // Form mode (`auth_opt_http_params_mode form`).
    let (status, _) = post_form(
        &app,
        "/api/v1/mqtt/go-auth/user",
        &[("username", &id), ("password", &token), ("clientid", &id)],
    )
    .await;
    assert_eq!(status, 200);
    let telemetry = format!("devices/{id}/telemetry");
    let (status, _) = post_form(
        &app,
        "/api/v1/mqtt/go-auth/acl",
        &[
            ("username", &id),
            ("clientid", &id),
            ("topic", &telemetry),
            ("acc", "2"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    app.stop().await;
}
on_both_databases!(go_auth_shapes);

/// Off unless configured; with a secret, nobody else gets an answer, and a wrong secret is
/// audited; with `allow_from`, the broker nodes need no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_broker_may_ask() {
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let resp = app
        .client
        .post(app.url("/api/v1/mqtt/emqx/authn"))
        .json(&json!({ "username": "a", "password": "b" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "off by default");
    app.stop().await;

    let app = start(DbKind::Sqlite).await.unwrap();
    let (id, token) = app.register("Hook Guarded").await;
    let body = json!({ "clientid": id, "username": id, "password": token });
    let resp = app
        .client
        .post(app.url("/api/v1/mqtt/emqx/authn"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = app
        .client
        .post(app.url("/api/v1/mqtt/emqx/authn"))
        .bearer_auth("not-the-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // The admin token is not the hook secret either.
    let resp = app
        .client
        .post(app.url("/api/v1/mqtt/emqx/authn"))
        .bearer_auth(&app.admin_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    app.wait_audit("mqtt_hook.call", |r| r["detail"] == "wrong secret")
        .await;
    app.stop().await;

    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        s.mqtt_hook.allow_from =
            companion_broker::proxy::Networks::parse(&["127.0.0.1/32"]).unwrap();
    })
    .await
    .unwrap();
    let (id, token) = app.register("Hook Allowed").await;
    let resp = app
        .client
        .post(app.url("/api/v1/mqtt/emqx/authn"))
        .json(&json!({ "clientid": id, "username": id, "password": token }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["result"], "allow");
    app.stop().await;
}

/// With an external broker, a kick (rotation, disabling, deletion) goes to the broker's
/// management API; here EMQX 5's `DELETE /api/v5/clients/{clientid}` on a local fake
/// speaking its documented answers (204 closed, 404 not connected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicks_go_to_the_emqx_management_api() {
    use base64::Engine as _;
    use companion_backend::settings::BrokerApiKind;
    use voice_fake::{Canned, FakeServer};

    let emqx = FakeServer::start(|r| {
        if r.method != "DELETE" {
            Canned::json(405, "{}")
        } else if r.uri.ends_with("-gone") {
            Canned::json(
                404,
                r#"{"code":"CLIENTID_NOT_FOUND","message":"Client ID not found"}"#,
            )
        } else if r.uri.contains("broken") {
            Canned::json(500, r#"{"code":"INTERNAL_ERROR","message":"boom"}"#)
        } else {
            Canned::new(204, "application/json", vec![])
        }
    })
    .await;
    // An upstream nobody listens on: the backend keeps retrying, the API works meanwhile.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = emqx.url();
    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        s.mqtt.upstream = format!("mqtt://{nowhere}");
        s.mqtt_hook.broker_api = BrokerApiKind::Emqx;
        s.mqtt_hook.broker_api_url = url;
        s.mqtt_hook.broker_api_username = "api-key".into();
        s.mqtt_hook.broker_api_password = Some(Secret::new("api-secret"));
    })
    .await
    .unwrap();
    assert!(app.app_ctx.broker.is_none());

    let (id, _) = app.register("Kicked").await;
    let resp = app
        .admin(Method::POST, &format!("/api/v1/devices/{id}/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let calls = emqx.requests();
    assert_eq!(calls.len(), 1, "one management call");
    assert_eq!(calls[0].uri, format!("/api/v5/clients/{id}"));
    let basic = base64::engine::general_purpose::STANDARD.encode("api-key:api-secret");
    assert_eq!(
        calls[0].headers["authorization"],
        format!("Basic {basic}").as_str()
    );
    let row = app
        .wait_audit("device.token.rotate", |r| r["target"] == id.as_str())
        .await;
    assert_eq!(row["detail"], "kicked");
    // Once the other replicas' cached answers have expired, it is kicked again: a device back
    // in on the old token meanwhile does not stay.
    let rotated = std::time::Instant::now();
    let uri = format!("/api/v5/clients/{id}");
    while emqx.requests().iter().filter(|c| c.uri == uri).count() < 2 {
        assert!(
            rotated.elapsed() < std::time::Duration::from_secs(5),
            "no second kick"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        // The hooks keep an answer for 1 s.
        rotated.elapsed() >= std::time::Duration::from_millis(900),
        "the second kick came before the cached answers expired: {:?}",
        rotated.elapsed()
    );

    // Not connected (404): said so; the management API failing: said so, and the device is
    // refused by the hooks all the same.
    for device_id in ["kick-gone", "kick-broken"] {
        let resp = app
            .admin(Method::POST, "/api/v1/devices")
            .json(&json!({ "device_id": device_id, "name": device_id, "device_type": "simulated", "capabilities": [] }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    let gone = "kick-gone";
    let resp = app
        .admin(Method::DELETE, &format!("/api/v1/devices/{gone}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let row = app
        .wait_audit("device.delete", |r| r["target"] == gone)
        .await;
    assert_eq!(row["detail"], "not connected");
    let broken = "kick-broken";
    let resp = app
        .admin(Method::PATCH, &format!("/api/v1/devices/{broken}"))
        .json(&json!({ "enabled": false }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let row = app
        .wait_audit("device.update", |r| r["target"] == broken)
        .await;
    assert_eq!(row["detail"], "disabled, kick failed");
    app.stop().await;
}

/// A password-guessing flood through the broker's hook writes a few audit rows, not one per
/// attempt: the first refusal per source address and reason, then one summary per window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_through_the_hook_are_summed_up_in_the_audit_log() {
    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        s.mqtt_hook.secret = Some(Secret::new(SECRET));
        s.mqtt.auth_failure_window_s = 1;
        s.http.rate_limit_per_minute = 100_000;
    })
    .await
    .unwrap();
    let (id, _) = app.register("Hook Flood").await;
    const ATTEMPTS: usize = 300;
    for i in 0..ATTEMPTS {
        let body = json!({ "clientid": id, "username": id, "password": format!("guess-{i}"), "peerhost": "203.0.113.9" });
        assert_eq!(emqx(&app, "/api/v1/mqtt/emqx/authn", body).await, "deny");
    }
    let summary = app
        .wait_audit("mqtt.connect", |r| {
            r["remote_addr"] == "203.0.113.9"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("more attempts"))
        })
        .await;
    let rows: Vec<Value> = app
        .audit("mqtt.connect")
        .await
        .into_iter()
        .filter(|r| r["remote_addr"] == "203.0.113.9")
        .collect();
    // One first row and the summaries of the windows the attempts spanned (at 1 s each).
    let summed: usize = rows
        .iter()
        .filter_map(|r| {
            let d = r["detail"].as_str()?;
            let n = d
                .split(" (")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()?;
            Some(n)
        })
        .sum();
    let firsts = rows
        .iter()
        .filter(|r| r["detail"] == "bad_token (external broker)")
        .count();
    assert!(
        rows.len() < 20,
        "{} rows for {ATTEMPTS} attempts",
        rows.len()
    );
    assert_eq!(
        firsts + summed,
        ATTEMPTS,
        "every attempt counted: {rows:#?}\n{summary}"
    );
}

/// The hooks answer each broker address at most `mqtt_hook.requests_per_minute` times a
/// minute (429 with Retry-After after that, other addresses unaffected), and keep a device's
/// credentials for 1 s: a change that bypasses this replica (another replica's, made straight
/// in the database) is honoured within that second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hooks_are_rate_limited_and_their_answers_live_one_second() {
    const LIMIT: u32 = 30;
    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        s.mqtt_hook.secret = Some(Secret::new(SECRET));
        s.mqtt_hook.requests_per_minute = LIMIT;
    })
    .await
    .unwrap();
    let (id, token) = app.register("Limited").await;
    let body = json!({ "clientid": id, "username": id, "password": token });
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let ask = |client: reqwest::Client| {
        let req = client
            .post(app.url("/api/v1/mqtt/emqx/authn"))
            .bearer_auth(SECRET)
            .json(&body);
        async move { req.send().await.unwrap() }
    };

    // Credentials changed behind this replica's back: the cached answer holds for at most 1 s.
    let broker = from("127.0.0.1");
    let resp = ask(broker.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["result"], "allow");
    sqlx::query("UPDATE device_tokens SET token_hash = 'changed-elsewhere' WHERE device_id = $1")
        .bind(&id)
        .execute(app.app_ctx.db.pool())
        .await
        .unwrap();
    let changed = std::time::Instant::now();
    let resp = ask(broker.clone()).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap()["result"],
        "allow",
        "answered from the cache"
    );
    let mut asked = 2;
    loop {
        let resp = ask(broker.clone()).await;
        asked += 1;
        assert_eq!(resp.status(), 200, "request {asked}");
        if resp.json::<Value>().await.unwrap()["result"] == "deny" {
            break;
        }
        assert!(asked < LIMIT, "still allowed after {:?}", changed.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let took = changed.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(500)
            && took < std::time::Duration::from_millis(1_500),
        "the cached answer changed after {took:?}"
    );

    // Over the limit: 429 with Retry-After; another broker address is not limited.
    for _ in asked..LIMIT {
        assert_eq!(ask(broker.clone()).await.status(), 200);
    }
    let resp = ask(broker.clone()).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"), "{resp:?}");
    assert_eq!(ask(from("127.0.0.2")).await.status(), 200);
    app.stop().await;
}

/// Presence from EMQX's events (a rule's HTTP action posting `client.connected` and
/// `client.disconnected`, bodies as in EMQX 5's rule-engine documentation): the device shows
/// online with its address, then offline with the reason; a session taken over (the device
/// already on a newer connection) does not take it offline; other clients and events are
/// ignored. Without an external broker the events change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emqx_events_feed_presence() {
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        s.mqtt_hook.secret = Some(Secret::new(SECRET));
        s.mqtt.upstream = format!("mqtt://{nowhere}");
    })
    .await
    .unwrap();
    let (id, _) = app.register("Evented").await;
    let connected = json!({
        "event": "client.connected", "clientid": id, "username": id,
        "peername": "198.51.100.7:52918", "sockname": "0.0.0.0:1883", "proto_name": "MQTT",
        "proto_ver": 4, "keepalive": 60, "clean_start": true, "expiry_interval": 0,
        "is_bridge": false, "connected_at": 1_700_000_000_000_i64, "conn_props": {},
        "timestamp": 1_700_000_000_001_i64, "node": "emqx@127.0.0.1", "metadata": { "rule_id": "presence" }
    });
    let disconnected = |reason: &str| {
        json!({
            "event": "client.disconnected", "clientid": id, "username": id, "reason": reason,
            "peername": "198.51.100.7:52918", "sockname": "0.0.0.0:1883", "proto_name": "MQTT",
            "proto_ver": 4, "disconnected_at": 1_700_000_060_000_i64, "disconn_props": {},
            "timestamp": 1_700_000_060_001_i64, "node": "emqx@127.0.0.1"
        })
    };
    let (status, body) = post_json(&app, "/api/v1/mqtt/emqx/events", connected.clone()).await;
    assert_eq!((status, body.as_str()), (200, r#"{"result":"ok"}"#));
    let online = app
        .wait_device(&id, |d| d["presence"]["online"] == true)
        .await;
    assert_eq!(online["presence"]["peer"], "198.51.100.7", "{online}");
    // Taken over: the device is on its new connection.
    let (_, body) = post_json(&app, "/api/v1/mqtt/emqx/events", disconnected("takenover")).await;
    assert_eq!(body, r#"{"result":"ignored"}"#);
    let (_, body) = post_json(
        &app,
        "/api/v1/mqtt/emqx/events",
        disconnected("keepalive_timeout"),
    )
    .await;
    assert_eq!(body, r#"{"result":"ok"}"#);
    let offline = app
        .wait_device(&id, |d| d["presence"]["online"] == false)
        .await;
    assert_eq!(
        offline["presence"]["last_disconnect_reason"], "keepalive_timeout",
        "{offline}"
    );
    // Not a device, not a presence event, a malformed one.
    for ignored in [
        json!({ "event": "client.connected", "clientid": "dashboard", "username": "admin" }),
        json!({ "event": "session.subscribed", "clientid": id, "username": id, "topic": "t" }),
    ] {
        let (status, body) = post_json(&app, "/api/v1/mqtt/emqx/events", ignored).await;
        assert_eq!((status, body.as_str()), (200, r#"{"result":"ignored"}"#));
    }
    let (status, _) = post_json(
        &app,
        "/api/v1/mqtt/emqx/events",
        json!({ "event": "client.connected", "username": 7 }),
    )
    .await;
    assert_eq!(status, 422);
    // Only the broker may say so.
    let resp = app
        .client
        .post(app.url("/api/v1/mqtt/emqx/events"))
        .json(&connected)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    app.stop().await;

    // The embedded broker reports presence itself.
    let app = start(DbKind::Sqlite).await.unwrap();
    let (id, _) = app.register("Embedded").await;
    let mut event = connected;
    event["clientid"] = json!(id);
    event["username"] = json!(id);
    let (_, body) = post_json(&app, "/api/v1/mqtt/emqx/events", event).await;
    assert_eq!(body, r#"{"result":"ignored"}"#);
    app.stop().await;
}
