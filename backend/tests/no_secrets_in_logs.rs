//! A full device lifecycle against the real process at debug log level: no token, admin
//! token or JWT ever appears in its logs.

mod common;

use common::app::Client;
use common::{companion_command, ServerProcess};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_lifecycle_never_logs_a_secret() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cmd = companion_command(&data);
    cmd.env("RUST_LOG", "debug");
    let mut server = ServerProcess::start(cmd).await;
    let admin = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    let mut secrets = vec![admin.clone()];

    let created: Value = http
        .post(server.url("/api/v1/devices"))
        .bearer_auth(&admin)
        .json(&json!({ "name": "Log Test", "device_type": "simulated" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["device_id"].as_str().unwrap().to_owned();
    let token = created["auth_token"].as_str().unwrap().to_owned();
    secrets.push(token.clone());
    let mqtts = server.mqtts.unwrap().port();
    let ca = data.join("tls/ca.pem");
    let _live = Client::connect(common::device_tls_options(&ca, mqtts, &id, &token))
        .await
        .expect("connects");
    assert!(Client::connect(common::device_tls_options(
        &ca,
        mqtts,
        &id,
        "wrong-token-value-123"
    ))
    .await
    .is_err());

    let rotated: Value = http
        .post(server.url(&format!("/api/v1/devices/{id}/token")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    secrets.push(rotated["auth_token"].as_str().unwrap().to_owned());
    let jwt: Value = http
        .post(server.url("/api/v1/auth/token"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jwt = jwt["token"].as_str().unwrap().to_owned();
    secrets.push(jwt.clone());
    let code: Value = http
        .post(server.url("/api/v1/enrollments"))
        .bearer_auth(&jwt)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let code = code["code"].as_str().unwrap().to_owned();
    secrets.push(code.clone());
    let enrolled: Value = http
        .post(server.url("/api/v1/enroll"))
        .json(&json!({ "code": code, "name": "Enrolled", "device_type": "other" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    secrets.push(enrolled["auth_token"].as_str().unwrap().to_owned());
    for body in [json!({ "enabled": false }), json!({ "enabled": true })] {
        let r = http
            .patch(server.url(&format!("/api/v1/devices/{id}")))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = http
        .delete(server.url(&format!("/api/v1/devices/{id}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    let (status, _) = server.terminate().await;
    assert!(status.success());
    let log = server.log.join("\n");
    assert!(log.contains(&id), "the log is about this lifecycle");
    assert!(log.lines().count() > 10, "debug logging was on");
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret appears in the log"
        );
    }
}
