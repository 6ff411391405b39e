//! The monitoring files in `ops/` against the real server: promtool accepts the Prometheus
//! configuration and alert rules, and every metric the Grafana dashboard and the alerts query is
//! one that `companion serve` exports.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::ops::{
    alert_exprs, dashboard_exprs, exported_sample_names, promql_metric_names, repo_root, LiveServer,
};
use serde_json::Value;

/// Series that come from Prometheus itself or the blackbox exporter, not from the server.
const NOT_FROM_THE_SERVER: &[&str] = &["up", "probe_success"];

fn promtool(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(repo_root().join("ops/prometheus"))
        .output()
        .expect("promtool is installed (package prometheus)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn promtool_accepts_the_prometheus_config_and_the_alert_rules() {
    let (ok, out) = promtool(&["check", "config", "prometheus.yml"]);
    assert!(ok, "promtool check config:\n{out}");
    assert!(
        out.contains("1 rule files found"),
        "the config loads alerts.yml:\n{out}"
    );
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"]);
    assert!(ok, "promtool check rules:\n{out}");
}

#[test]
fn the_metric_name_reader_skips_functions_labels_keywords_and_ranges() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.95, sum by (le, stage) (rate(voice_stage_seconds_bucket{stage!="tts"}[$__rate_interval])))"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["voice_stage_seconds_bucket".to_owned()])
    );
    let names = promql_metric_names(
        r#"active_devices < 0.8 * max_over_time(active_devices[30m] offset 1h) and on (instance) up{job="companion"} == 0"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["active_devices".to_owned(), "up".to_owned()])
    );
    let names = promql_metric_names(
        r#"sum(rate(api_requests_total{status=~"5.."}[5m])) / sum without (status) (rate(api_requests_total[5m])) > 0.05"#,
    );
    assert_eq!(names, BTreeSet::from(["api_requests_total".to_owned()]));

    let exported = exported_sample_names(
        "# TYPE api_requests counter\n# TYPE active_devices gauge\n# TYPE rule_eval_seconds histogram\n",
    );
    for n in [
        "api_requests_total",
        "active_devices",
        "rule_eval_seconds_bucket",
        "rule_eval_seconds_count",
    ] {
        assert!(exported.contains(n), "{n} in {exported:?}");
    }
    assert!(!exported.contains("api_requests"));
}

#[test]
fn grafana_provisioning_points_the_dashboard_at_the_provisioned_datasource() {
    let ops = repo_root().join("ops/grafana");
    let datasource =
        std::fs::read_to_string(ops.join("provisioning/datasources/prometheus.yml")).unwrap();
    assert!(datasource.lines().any(|l| l.trim() == "uid: prometheus"));
    let providers =
        std::fs::read_to_string(ops.join("provisioning/dashboards/companion.yml")).unwrap();
    assert!(providers.contains("path: /etc/grafana/dashboards"));
    let compose = std::fs::read_to_string(repo_root().join("ops/docker-compose.yml")).unwrap();
    assert!(compose.contains("./grafana/companion.json:/etc/grafana/dashboards/companion.json"));

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(ops.join("companion.json")).unwrap())
            .expect("companion.json is JSON");
    let mut uids = BTreeSet::new();
    let mut stack = vec![&dashboard];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(Value::Object(ds)) = m.get("datasource") {
                    uids.insert(
                        ds.get("uid")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    );
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    assert_eq!(uids, BTreeSet::from(["prometheus".to_owned()]));
}

#[tokio::test]
async fn every_metric_in_the_dashboard_and_the_alerts_is_exported_by_the_server() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("ops/grafana/companion.json")).unwrap(),
    )
    .unwrap();
    let panel_exprs = dashboard_exprs(&dashboard);
    assert!(panel_exprs.len() >= 20, "the dashboard has its panels");
    let (rule_exprs, alerts) = alert_exprs(
        &std::fs::read_to_string(repo_root().join("ops/prometheus/alerts.yml")).unwrap(),
    );
    assert_eq!(rule_exprs.len(), alerts, "one expr read per alert");

    let mut used = BTreeSet::new();
    for e in panel_exprs.iter().chain(&rule_exprs) {
        let names = promql_metric_names(e);
        assert!(!names.is_empty(), "no metric found in {e:?}");
        used.extend(names);
    }

    // prometheus-client leaves a labelled family out of /metrics until it has a sample, so
    // first drive the server the way a deployment does (ops/smoke.sh: REST calls, a device
    // connecting and publishing over TLS). A family that still has no series here must be
    // initialised by the server with its known label values at zero (which also keeps
    // `rate()` and absent-series alerts right).
    let live = LiveServer::start().await;
    let api = live.api_base();
    let ca = live.ca_pem.to_str().unwrap().to_owned();
    let smoke = common::ops::run_script(
        &repo_root().join("ops/smoke.sh"),
        &[],
        &[
            ("CONTROL_PLANE_URL", api.as_str()),
            ("ADMIN_API_TOKEN", live.admin_token.as_str()),
            ("CA_CERT", ca.as_str()),
        ],
    )
    .await;
    assert!(smoke.success, "ops/smoke.sh:\n{}", smoke.output());
    let exported = exported_sample_names(&live.metrics().await);
    assert!(
        exported.contains("api_requests_total"),
        "the exposition was read"
    );
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !exported.contains(*n) && !NOT_FROM_THE_SERVER.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried by ops/grafana/companion.json or ops/prometheus/alerts.yml but not in the \
         server's /metrics (not registered, or a labelled family without any series yet): \
         {missing:?}"
    );
}

/// `nginx -t` accepts ops/nginx/nginx.conf, with its certificate paths pointed at a throw-away
/// self-signed pair (the real ones live on the proxy host).
#[test]
fn nginx_accepts_the_reverse_proxy_config() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=companion.example.com", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed (package openssl)");
    assert!(status.success());
    let conf = std::fs::read_to_string(repo_root().join("ops/nginx/nginx.conf")).unwrap();
    let live = "/etc/letsencrypt/live/companion.example.com";
    assert!(conf.contains(&format!("ssl_certificate {live}/fullchain.pem;")));
    let conf = conf
        .replace(&format!("{live}/fullchain.pem"), cert.to_str().unwrap())
        .replace(&format!("{live}/privkey.pem"), key.to_str().unwrap());
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let out = nginx(dir.path(), &path, &["-t"]);
    assert!(
        out.status.success(),
        "nginx -t:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster deployment's load balancer passes `nginx -t` (Debian's nginx loads the stream
/// module dynamically; the image has it built in), and the cluster compose file mounts the
/// RabbitMQ configuration the RabbitMQ tests boot, with the hooks it names enabled.
#[test]
fn the_cluster_deployment_files_hold_together() {
    let dir = tempfile::tempdir().unwrap();
    let conf = std::fs::read_to_string(repo_root().join("ops/nginx/mqtt-cluster.conf")).unwrap();
    let conf = format!(
        "include /etc/nginx/modules-enabled/*.conf;\n{}",
        conf.replace("rabbitmq-1:", "127.0.0.1:")
            .replace("rabbitmq-2:", "127.0.0.2:")
            .replace(
                "pid /run/nginx.pid;",
                &format!("pid {};", dir.path().join("pid").display())
            )
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let out = nginx(dir.path(), &path, &["-t"]);
    assert!(
        out.status.success(),
        "nginx -t (mqtt-cluster.conf):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let compose =
        std::fs::read_to_string(repo_root().join("ops/docker-compose.cluster.yml")).unwrap();
    for needed in [
        "./rabbitmq/rabbitmq.conf:/etc/rabbitmq/rabbitmq.conf:ro",
        "./rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro",
        "./nginx/mqtt-cluster.conf:/etc/nginx/nginx.conf:ro",
        "COMPANION_MQTT__UPSTREAM_SHARED: \"false\"",
        "COMPANION_MQTT_HOOK__BROKER_API: rabbitmq",
        "COMPANION_CLUSTER__ENABLED: \"true\"",
        "replicas: 2",
    ] {
        assert!(
            compose.contains(needed),
            "docker-compose.cluster.yml: {needed}"
        );
    }
    let rabbit = std::fs::read_to_string(repo_root().join("ops/rabbitmq/rabbitmq.conf")).unwrap();
    for path in ["user", "vhost", "resource", "topic"] {
        assert!(
            rabbit.contains(&format!(
                "auth_http.{path}_path = http://companion:8000/api/v1/mqtt/rabbitmq/{path}"
            )),
            "rabbitmq.conf asks companion's {path} hook"
        );
    }
    // The hook network in the compose file is the compose network's subnet.
    assert!(compose.contains("COMPANION_MQTT_HOOK__ALLOW_FROM: \"172.30.0.0/24\""));
    assert!(compose.contains("- subnet: 172.30.0.0/24"));
}

/// The shipped nginx.conf, run for real in front of a server started with
/// `http.trusted_proxies` and `mqtt.proxy_protocol_from` set to the proxy's address.
struct Nginx {
    conf: std::path::PathBuf,
    dir: std::path::PathBuf,
    https: u16,
    mqtts: u16,
}

/// The addresses of the server behind nginx.
struct Upstreams {
    http: SocketAddr,
    mqtts: SocketAddr,
    ws: SocketAddr,
}

/// A port the kernel just handed out and that is free again (nginx takes no port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn replace_once(conf: &str, from: &str, to: &str) -> String {
    assert_eq!(conf.matches(from).count(), 1, "nginx.conf has one `{from}`");
    conf.replace(from, to)
}

impl Nginx {
    /// Starts nginx (daemonised: when the command returns, its ports are bound).
    fn start(dir: &std::path::Path, up: Upstreams, tls_dir: &std::path::Path) -> Self {
        let Upstreams { http, mqtts, ws } = up;
        let (https, plain, mq) = (free_port(), free_port(), free_port());
        let d = dir.display();
        let mut conf = std::fs::read_to_string(repo_root().join("ops/nginx/nginx.conf")).unwrap();
        for (from, to) in [
            ("user www-data;\n", String::new()),
            ("pid /run/nginx.pid;", format!("pid {d}/nginx.pid;")),
            ("listen 8883;", format!("listen 127.0.0.1:{mq};")),
            ("listen [::]:8883;\n", String::new()),
            ("server 127.0.0.1:18883;", format!("server {mqtts};")),
            ("server 127.0.0.1:8000;", format!("server {http};")),
            ("server 127.0.0.1:8083;", format!("server {ws};")),
            ("listen 80;", format!("listen 127.0.0.1:{plain};")),
            ("listen [::]:80;\n", String::new()),
            (
                "listen 443 ssl http2;",
                format!("listen 127.0.0.1:{https} ssl http2;"),
            ),
            ("listen [::]:443 ssl http2;\n", String::new()),
            (
                "/var/log/nginx/companion.access.log",
                format!("{d}/access.log"),
            ),
            (
                "/var/log/nginx/companion.error.log",
                format!("{d}/error.log"),
            ),
            (
                "/etc/letsencrypt/live/companion.example.com/fullchain.pem",
                tls_dir.join("server.pem").display().to_string(),
            ),
            (
                "/etc/letsencrypt/live/companion.example.com/privkey.pem",
                tls_dir.join("server.key").display().to_string(),
            ),
        ] {
            conf = replace_once(&conf, from, &to);
        }
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let out = nginx(dir, &path, &[]);
        assert!(
            out.status.success(),
            "nginx: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Nginx {
            conf: path,
            dir: dir.to_owned(),
            https,
            mqtts: mq,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = nginx(&self.dir, &self.conf, &["-s", "stop"]);
    }
}

/// Runs `nginx -e {dir}/startup.log -c conf extra...` (its start-up log kept out of
/// /var/log).
fn nginx(dir: &std::path::Path, conf: &std::path::Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new("nginx")
        .arg("-e")
        .arg(dir.join("startup.log"))
        .arg("-c")
        .arg(conf)
        .args(extra)
        .output()
        .expect("nginx is installed (packages nginx, libnginx-mod-stream)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_shipped_nginx_the_server_sees_each_client_at_its_own_address() {
    use common::app::{DbKind, TestApp};
    use companion_broker::proxy::Networks;

    let app = TestApp::start_with(DbKind::Sqlite, |s| {
        s.http.trusted_proxies = Networks::parse(&["127.0.0.1"]).unwrap();
        s.mqtt.proxy_protocol_from = Networks::parse(&["127.0.0.1"]).unwrap();
        s.mqtt.ws_trusted_proxies = Networks::parse(&["127.0.0.1"]).unwrap();
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = app.ca_pem.parent().unwrap().to_owned();
    let nginx = Nginx::start(
        dir.path(),
        Upstreams {
            http: app.http,
            mqtts: app.mqtts,
            ws: app.ws,
        },
        &tls_dir,
    );
    // Clients come from 127.0.0.2, which only the proxy knows.
    let client_ip = "127.0.0.2";

    // REST through nginx's HTTPS: a wrong enrolment code, audited at the client's address.
    let https = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&app.ca_pem).unwrap()).unwrap(),
        )
        .local_address(client_ip.parse::<std::net::IpAddr>().unwrap())
        .resolve("localhost", "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    let resp = https
        .post(format!("https://localhost:{}/api/v1/enroll", nginx.https))
        .json(&serde_json::json!({ "code": "WRONG", "name": "x", "device_type": "other" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(
        resp.headers().contains_key("strict-transport-security"),
        "answered by nginx"
    );
    let row = app.wait_audit("enrollment.redeem", |_| true).await;
    assert_eq!(row["remote_addr"], client_ip, "{row}");

    // MQTT over TLS through nginx's stream proxy (PROXY protocol): a wrong token is audited at
    // the device's address, and a good one connects and shows it in presence.
    let (id, token) = app.register("porch").await;
    let ca = app.ca_pem.display().to_string();
    let port = nginx.mqtts.to_string();
    let publish = |password: &str| {
        let mut cmd = tokio::process::Command::new("mosquitto_pub");
        cmd.args([
            "-A",
            client_ip,
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
        ])
        .args(["-i", &id, "-u", &id, "-P", password, "-q", "1"])
        .args(["-t", &format!("devices/{id}/telemetry"), "-m", "{}"])
        .kill_on_drop(true);
        cmd
    };
    let refused = publish("wrong-token")
        .output()
        .await
        .expect("mosquitto_pub is installed");
    assert!(!refused.status.success());
    let row = app
        .wait_audit("mqtt.connect", |r| r["target"] == id.as_str())
        .await;
    assert_eq!(row["remote_addr"], client_ip, "{row}");

    let ok = publish(&token).output().await.unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let got = app
        .wait_device(&id, |d| !d["presence"]["peer"].is_null())
        .await;
    assert_eq!(got["presence"]["peer"], client_ip, "{got}");

    // MQTT over WebSocket through nginx's HTTPS at /mqtt (X-Forwarded-For): the same device
    // connects from another address, which presence shows.
    let ws_client_ip = "127.0.0.3";
    let script = r#"
import sys, time
import paho.mqtt.client as mqtt
port, ca, dev, token, bind = sys.argv[1:6]
c = mqtt.Client(client_id=dev, transport="websockets", protocol=mqtt.MQTTv311)
c.ws_set_options(path="/mqtt")
c.tls_set(ca_certs=ca)
c.username_pw_set(dev, token)
connected = []
c.on_connect = lambda c, u, f, rc: connected.append(rc)
c.connect("localhost", int(port), keepalive=30, bind_address=bind)
c.loop_start()
for _ in range(150):
    if connected:
        break
    time.sleep(0.1)
c.loop_stop()
sys.exit(0 if connected == [0] else 3)
"#;
    let out = tokio::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(nginx.https.to_string())
        .arg(&ca)
        .arg(&id)
        .arg(&token)
        .arg(ws_client_ip)
        .kill_on_drop(true)
        .output()
        .await
        .expect("python3 (with python3-paho-mqtt) is installed");
    assert!(
        out.status.success(),
        "paho over wss through nginx: {}\nnginx access log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.path().join("access.log")).unwrap_or_default()
    );
    let got = app
        .wait_device(&id, |d| d["presence"]["peer"] == ws_client_ip)
        .await;
    assert_eq!(got["presence"]["peer"], ws_client_ip, "{got}");
    drop(nginx);
    app.stop().await;
}
