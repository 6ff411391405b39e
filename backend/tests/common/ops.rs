//! Helpers for the ops tests (`tests/ops_*.rs`): the repository's files, a live `companion`
//! process with its admin token and CA, running the shell scripts, the agent binary, and reading
//! metric names out of Prometheus exposition text and PromQL.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;

use super::{companion_command, ServerProcess};

/// How long a script may run.
pub const SCRIPT_DEADLINE: Duration = Duration::from_secs(120);

/// The repository root (the workspace above `backend/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("backend/ has a parent")
        .to_path_buf()
}

/// A `companion serve` process on port 0 with its data directory, admin token and CA file.
pub struct LiveServer {
    pub server: ServerProcess,
    pub dir: tempfile::TempDir,
    pub admin_token: String,
    pub ca_pem: PathBuf,
    pub client: reqwest::Client,
}

impl LiveServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Like [`LiveServer::start`], with `configure` adding to the command (environment
    /// variables such as `DATABASE_URL` or `COMPANION_HTTP__RATE_LIMIT_PER_MINUTE`).
    pub async fn start_with(configure: impl FnOnce(&mut Command)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut cmd = companion_command(&data);
        configure(&mut cmd);
        let server = ServerProcess::start(cmd).await;
        let admin_token = std::fs::read_to_string(data.join("admin-token"))
            .expect("the bootstrap admin token is written")
            .trim()
            .to_owned();
        let ca_pem = data.join("tls").join("ca.pem");
        assert!(ca_pem.is_file(), "the development CA is written");
        Self {
            server,
            dir,
            admin_token,
            ca_pem,
            client: reqwest::Client::new(),
        }
    }

    /// The API base URL the scripts take as `CONTROL_PLANE_URL`.
    pub fn api_base(&self) -> String {
        format!("http://{}", self.server.http)
    }

    pub fn mqtts_port(&self) -> u16 {
        self.server.mqtts.expect("the TLS listener is on").port()
    }

    pub fn wss_port(&self) -> u16 {
        self.server
            .wss
            .expect("the WebSocket TLS listener is on")
            .port()
    }

    /// An admin request; returns the status and the JSON body (`Null` when there is none).
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, self.server.url(path))
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("the server answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A fresh single-use enrolment code.
    pub async fn enrollment_code(&self) -> String {
        let (status, body) = self
            .admin(
                reqwest::Method::POST,
                "/api/v1/enrollments",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 201, "POST /enrollments: {body}");
        body["code"].as_str().expect("a code").to_owned()
    }

    /// Audit entries with this action.
    pub async fn audit(&self, action: &str) -> Vec<Value> {
        let (status, body) = self
            .admin(
                reqwest::Method::GET,
                &format!("/api/v1/audit?action={action}&limit=1000"),
                None,
            )
            .await;
        assert_eq!(status, 200, "GET /audit: {body}");
        body["entries"].as_array().cloned().unwrap_or_default()
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        let resp = self
            .client
            .get(self.server.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert!(
            resp.status().is_success(),
            "GET /metrics: {}",
            resp.status()
        );
        resp.text().await.unwrap()
    }
}

/// What a script printed and how it ended.
#[derive(Debug)]
pub struct ScriptRun {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl ScriptRun {
    /// Both streams, for assertion messages and secret checks.
    pub fn output(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Runs `bash script args..` with a clean environment (PATH plus `env`), up to the deadline.
pub async fn run_script(script: &Path, args: &[&str], env: &[(&str, &str)]) -> ScriptRun {
    let path = format!(
        "{}:/usr/local/sbin:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        )
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(SCRIPT_DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{} finishes within {SCRIPT_DEADLINE:?}", script.display()))
        .expect("run bash");
    ScriptRun {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Polls `check` until it returns `Some`, failing after `deadline` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// True when the test may create users and chown files. CI runs as root; elsewhere the
/// root-only tests are skipped with a printed reason, and under `CI=true` they fail instead.
pub fn running_as_root() -> bool {
    // Through `id -u`: the backend has no libc dependency.
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if uid == "0" {
        return true;
    }
    if super::in_ci() {
        panic!("CI=true but the tests do not run as root: setup_device.sh needs root");
    }
    eprintln!("skipping: setup_device.sh creates a user and chowns files, which needs root");
    false
}

/// The `companion-agent` binary next to this test's `companion` binary. `cargo test
/// --workspace` (CI) builds it before any test runs, because the agent has integration tests;
/// when it is missing or older than the agent's sources (`cargo test -p companion-backend`
/// alone), this runs `cargo build -p companion-agent` into the same target directory.
pub async fn agent_binary() -> PathBuf {
    let companion = PathBuf::from(env!("CARGO_BIN_EXE_companion"));
    let bin_dir = companion.parent().expect("target/<profile>").to_path_buf();
    let agent = bin_dir.join("companion-agent");
    let root = repo_root();
    let stale = match std::fs::metadata(&agent).and_then(|m| m.modified()) {
        Err(_) => true,
        Ok(built) => [root.join("agent"), root.join("schema")]
            .iter()
            .any(|dir| newest_mtime(dir).is_some_and(|src| src > built)),
    };
    if stale {
        let target_dir = bin_dir.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "companion-agent", "--bin", "companion-agent"])
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target_dir)
            .stdin(Stdio::null());
        if bin_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = tokio::time::timeout(Duration::from_secs(1800), cmd.status())
            .await
            .expect("cargo build -p companion-agent finishes")
            .expect("run cargo");
        assert!(status.success(), "cargo build -p companion-agent failed");
    }
    assert!(agent.is_file(), "{} exists", agent.display());
    agent
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs" || e == "toml") {
                let m = meta.modified().ok();
                if m > newest {
                    newest = m;
                }
            }
        }
    }
    newest
}

/// Reads `KEY=VALUE` lines (comments and blank lines skipped).
pub fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The sample names a Prometheus/OpenMetrics exposition can carry, from its `# TYPE` lines
/// (prometheus-client prints them even for a labelled family with no samples yet): a counter
/// `x` is sampled as `x_total`, a histogram as `x_bucket`, `x_sum` and `x_count`, and so on.
pub fn exported_sample_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["", "_sum", "_count", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            // Older exposition formats name the counter family with its `_total` already.
            let base = if kind == "counter" {
                name.strip_suffix("_total").unwrap_or(name)
            } else {
                name
            };
            names.insert(format!("{base}{s}"));
        }
    }
    names
}

const PROMQL_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
];

const PROMQL_AGGREGATIONS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
];

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// aggregations, keywords, label names (inside `{}` or after `by`/`without`/`on`/`ignoring`/
/// `group_left`/`group_right`), strings, numbers or durations.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == c {
                        depth += 1;
                    } else if chars[i] == close {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    } else if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            if chars[i] == '\\' {
                                i += 1;
                            }
                            i += 1;
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if skip_label_list => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                skip_label_list = false;
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            '$' => {
                // A Grafana variable outside a range: not a metric.
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let ident: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let next = chars.get(j).copied();
                let lower = ident.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    skip_label_list = true;
                } else if lower == "offset" {
                    // Skip the duration that follows.
                    while j < chars.len() && !chars[j].is_whitespace() && chars[j] != ')' {
                        j += 1;
                    }
                    i = j;
                } else if PROMQL_KEYWORDS.contains(&lower.as_str())
                    || PROMQL_AGGREGATIONS.contains(&lower.as_str())
                    || next == Some('(')
                {
                    // A keyword, an aggregation or a function call.
                } else {
                    names.insert(ident);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Every `"expr"` string in a Grafana dashboard (panels, rows' nested panels, templating).
pub fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    match (k.as_str(), child) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        _ => stack.push(child),
                    }
                }
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    out
}

/// The `expr:` values of a Prometheus rules file whose expressions are each on one line
/// (ops/prometheus/alerts.yml keeps them so), with the number of `- alert:` entries.
pub fn alert_exprs(rules_yaml: &str) -> (Vec<String>, usize) {
    let mut exprs = Vec::new();
    let mut alerts = 0;
    for line in rules_yaml.lines() {
        let t = line.trim_start();
        if t.starts_with("- alert:") {
            alerts += 1;
        }
        if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            assert!(
                !e.is_empty() && !e.starts_with('|') && !e.starts_with('>'),
                "alerts.yml: keep each expr on one line: {line}"
            );
            exprs.push(e.trim_matches(|c| c == '\'' || c == '"').to_owned());
        }
    }
    (exprs, alerts)
}
