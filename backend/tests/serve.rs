//! `companion serve` as a process: health, readiness, metrics, shutdown, restart, bad config.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use common::{companion_command, fresh_pg_database, run_to_exit, ServerProcess};
use tokio::io::AsyncWriteExt;

/// Runs `promtool check metrics` on `text` and returns its verdict and output.
async fn promtool_check(text: &str) -> (bool, String) {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool runs");
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), msg)
}

async fn serve_and_check(data_dir: &std::path::Path, database_url: Option<&str>) {
    let client = reqwest::Client::new();
    let mut cmd = companion_command(data_dir);
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    let mut server = ServerProcess::start(cmd).await;
    assert!(
        server.mqtt.is_some() && server.mqtts.is_some(),
        "{:?}",
        server.log
    );

    let health = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.headers()["x-content-type-options"],
        "nosniff",
        "security headers on every response"
    );

    let ready = client.get(server.url("/ready")).send().await.unwrap();
    let status = ready.status();
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");

    // A device connects over TLS and leaves cleanly (mosquitto_pub sends DISCONNECT).
    let admin = std::fs::read_to_string(data_dir.join("admin-token")).unwrap();
    let created: serde_json::Value = client
        .post(server.url("/api/v1/devices"))
        .bearer_auth(admin.trim())
        .json(&serde_json::json!({ "name": "visitor", "device_type": "other" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (id, token) = (
        created["device_id"].as_str().unwrap(),
        created["auth_token"].as_str().unwrap(),
    );
    let ca = data_dir.join("tls/ca.pem");
    let port = server.mqtts.unwrap().port().to_string();
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port, "--cafile"])
        .arg(&ca)
        .args(["-i", id, "-u", id, "-P", token, "-q", "1", "-n"])
        .args(["-t", &format!("devices/{id}/telemetry")])
        .output()
        .await
        .expect("mosquitto_pub is installed (package mosquitto-clients)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let metrics = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("api_requests_total"), "{text}");
    assert!(text.contains("endpoint=\"/ready\""), "{text}");
    // SQLite's own memory (page caches, statements), read at scrape time; only on SQLite.
    let sqlite: Option<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("backend_sqlite_memory_bytes "))
        .and_then(|v| v.parse().ok());
    match database_url {
        None => assert!(sqlite.is_some_and(|b| b > 0.0), "{sqlite:?} in {text}"),
        Some(_) => assert_eq!(sqlite, None, "no SQLite gauge on PostgreSQL"),
    }
    let (ok, msg) = promtool_check(&text).await;
    assert!(ok, "promtool check metrics failed: {msg}\n{text}");

    let missing = client.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    let (status, took) = server.terminate().await;
    assert!(
        status.success(),
        "exit status {status:?}; log: {:?}",
        server.log
    );
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    // A normal start, a device's visit and a shutdown are not errors (rumqttd logs every
    // clean disconnect as `ERROR router-drop`; see logging.rs).
    assert!(
        server
            .log
            .iter()
            .any(|l| l.contains("device disconnected") && l.contains(id)),
        "{:#?}",
        server.log
    );
    let errors: Vec<&String> = server.log.iter().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[tokio::test]
async fn serve_on_sqlite_is_healthy_ready_measured_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    serve_and_check(&data, None).await;

    let token_path = data.join("admin-token");
    let token = std::fs::read_to_string(&token_path).unwrap();
    assert_eq!(token.trim().len(), 43, "256-bit URL-safe token");
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(data.join("companion.db").exists());

    // A second start reuses the database and the admin token.
    serve_and_check(&data, None).await;
    assert_eq!(std::fs::read_to_string(&token_path).unwrap(), token);
}

#[tokio::test]
async fn serve_on_postgres_is_healthy_ready_and_restarts_cleanly() {
    let Some(url) = fresh_pg_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    serve_and_check(&data, Some(&url)).await;
    serve_and_check(&data, Some(&url)).await;
    assert!(
        !data.join("companion.db").exists(),
        "PostgreSQL was used, not SQLite"
    );
}

#[tokio::test]
async fn bad_configuration_exits_64_naming_the_key_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("COMPANION_LOG__FORMAT", "xml", "log.format"),
        ("COMPANION_HTTP__LISTEN", "localhost-ish", "http.listen"),
        ("COMPANION_MQTT__LISTEN", "127.0.0.1", "mqtt.listen"),
        ("DATABASE_URL", "mysql://nope", "database.url"),
        ("COMPANION_HTTP__NO_SUCH_KEY", "1", "no_such_key"),
    ];
    for (var, value, key) in cases {
        let mut cmd = companion_command(&dir.path().join("data"));
        cmd.env(var, value);
        let (status, stderr) = run_to_exit(cmd).await;
        assert_eq!(status.code(), Some(64), "{var}={value}: {stderr}");
        assert!(stderr.contains(key), "{var}={value}: {stderr}");
    }
    assert!(
        !dir.path().join("data").exists(),
        "nothing is created before configuration is valid"
    );
}

#[tokio::test]
async fn a_missing_config_file_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = companion_command(&dir.path().join("data"));
    cmd.arg("--config").arg(dir.path().join("absent.toml"));
    let (status, stderr) = run_to_exit(cmd).await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("absent.toml"), "{stderr}");
}

#[tokio::test]
async fn a_config_file_is_read_and_the_environment_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("companion.toml");
    std::fs::write(
        &file,
        "[log]\nformat = \"json\"\n[http]\nlisten = \"bogus\"\n",
    )
    .unwrap();
    // The file's bad http.listen is overridden by the environment; json logging stays.
    let mut cmd = companion_command(&dir.path().join("data"));
    cmd.arg("--config").arg(&file);
    let mut server = ServerProcess::start(cmd).await;
    assert!(
        server.log.iter().any(|l| l.starts_with('{')),
        "json log lines: {:?}",
        server.log
    );
    let (status, _) = server.terminate().await;
    assert!(status.success());
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there.
    let mut cmd = companion_command(&dir.path().join("data"));
    cmd.env(
        "DATABASE_URL",
        "postgres://companion:hunter2@127.0.0.1:1/companion?connect_timeout=2",
    );
    let (status, stderr) = run_to_exit(cmd).await;
    assert_eq!(status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn migrate_subcommand_applies_migrations_and_version_prints() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = companion_command(&dir.path().join("data"));
    cmd.arg("migrate");
    let (status, stderr) = run_to_exit(cmd).await;
    assert!(status.success(), "{stderr}");
    assert!(dir.path().join("data/companion.db").exists());

    let mut cmd = companion_command(&dir.path().join("data"));
    cmd.arg("version").stdout(Stdio::piped());
    let out = cmd.output().await.unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("companion "));
}

#[tokio::test]
async fn cli_admin_tokens_bulk_devices_backup_and_health_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        let mut cmd = companion_command(&data);
        cmd.args(args).stdout(Stdio::piped());
        cmd
    };
    // Admin tokens: create prints the token once; revoke works once.
    let out = run(&["admin", "token", "create", "--name", "ops"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.len(), 43);
    let dup = run(&["admin", "token", "create", "--name", "ops"])
        .output()
        .await
        .unwrap();
    assert!(
        !dup.status.success(),
        "a second token with the same name is refused"
    );

    // Bulk-created devices: distinct ids, 0600 file.
    let creds = dir.path().join("fleet.csv");
    let out = run(&[
        "devices",
        "bulk-create",
        "--count",
        "5",
        "--out",
        creds.to_str().unwrap(),
    ])
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&creds).unwrap();
    let ids: std::collections::HashSet<_> = text
        .lines()
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 5);
    assert!(text
        .lines()
        .all(|l| l.split(',').nth(1).is_some_and(|t| t.len() == 43)));
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The named token and the devices are visible to a running server; health passes.
    let mut server = ServerProcess::start(companion_command(&data)).await;
    let client = reqwest::Client::new();
    let list: serde_json::Value = client
        .get(server.url("/api/v1/devices"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["devices"].as_array().unwrap().len(), 5);
    let url = format!("http://{}", server.http);
    assert!(run(&["health", "--url", &url])
        .status()
        .await
        .unwrap()
        .success());
    let (status, _) = server.terminate().await;
    assert!(status.success());
    assert!(
        !run(&["health", "--url", &url])
            .status()
            .await
            .unwrap()
            .success(),
        "health fails when the server is down"
    );

    let out = run(&["admin", "token", "revoke", "--name", "ops"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let again = run(&["admin", "token", "revoke", "--name", "ops"])
        .output()
        .await
        .unwrap();
    assert!(!again.status.success());

    // Backup: a consistent SQLite copy with the devices in it.
    let backup = dir.path().join("backup.db");
    let out = run(&["backup", "--out", backup.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut settings = companion_backend::settings::Settings::default();
    settings.database.url = Some(companion_backend::settings::Secret::new(format!(
        "sqlite://{}",
        backup.display()
    )));
    let db = companion_backend::db::Db::connect(&settings).await.unwrap();
    let n: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT COUNT(*) AS n FROM devices")
            .fetch_one(db.pool())
            .await
            .unwrap(),
        "n",
    )
    .unwrap();
    assert_eq!(n, 5);
}
