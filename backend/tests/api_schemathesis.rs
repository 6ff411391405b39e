//! The REST API driven by its own OpenAPI document: schemathesis (pinned in
//! `tests/schemathesis/requirements.txt`, installed by `tests/schemathesis/install.sh`, which
//! `.ci/run` calls) reads `GET /api/v1/openapi.json` from a real `companion serve`, generates
//! valid and invalid requests for every operation, and checks each answer: no 5xx, a status
//! code, content type, headers and body the document declares, invalid input rejected, valid
//! input accepted, admin routes refusing requests without credentials.
//!
//! Where the binary is: `$SCHEMATHESIS`, else `target/schemathesis/bin/schemathesis` (where
//! `install.sh` puts it), else `schemathesis` on `PATH`. Without it the test is skipped with a
//! printed reason, except under `CI=true`, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::ops::{repo_root, LiveServer};
use reqwest::Method;
use serde_json::json;
use tokio::process::Command;

/// Test cases per operation and phase: each run (SQLite, PostgreSQL) takes about 30 s in a debug
/// build. `COMPANION_SCHEMATHESIS_EXAMPLES` asks for more (README, "Tests").
const MAX_EXAMPLES: u32 = 100;
/// Fixed, so that a failure here fails the same way on the next run;
/// `COMPANION_SCHEMATHESIS_SEED` picks another.
const SEED: u64 = 20_240_614;
/// `mqtt_hook.secret` of the server under test.
const HOOK_SECRET: &str = "schemathesis-hook-secret-0123456789";

/// The devices registered before the run; `schemathesis.toml` puts their ids into `{id}`.
const SEEDED_DEVICES: [&str; 3] = ["seed-speaker", "seed-panel", "seed-sensor"];
/// Longest a run may take before the test gives up on it.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

fn config_dir() -> PathBuf {
    repo_root().join("backend/tests/schemathesis")
}

/// The schemathesis binary, or `None` (skip) outside CI when there is none.
fn schemathesis_binary() -> Option<PathBuf> {
    let ci = common::in_ci();
    if let Some(path) = std::env::var_os("SCHEMATHESIS") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "SCHEMATHESIS={} does not exist; run backend/tests/schemathesis/install.sh",
            path.display()
        );
        return Some(path);
    }
    let installed = repo_root().join("target/schemathesis/bin/schemathesis");
    if installed.is_file() {
        return Some(installed);
    }
    let on_path = std::process::Command::new("schemathesis")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return Some(PathBuf::from("schemathesis"));
    }
    let why = "schemathesis is not installed: run `bash backend/tests/schemathesis/install.sh` \
               (or set SCHEMATHESIS to its binary)";
    if ci {
        panic!("CI=true but {why}");
    }
    eprintln!("skipping: {why}");
    None
}

/// Registers the devices `schemathesis.toml` names, gives one a persona, and makes an
/// enrolment code, so lists, details and the audit log have something in them.
async fn seed(live: &LiveServer) {
    let config = std::fs::read_to_string(config_dir().join("schemathesis.toml")).unwrap();
    for id in SEEDED_DEVICES {
        assert!(
            config.contains(&format!("\"{id}\"")),
            "schemathesis.toml names {id}"
        );
        let (status, body) = live
            .admin(
                Method::POST,
                "/api/v1/devices",
                Some(json!({
                    "device_id": id,
                    "name": format!("seeded {id}"),
                    "device_type": "simulated",
                    "capabilities": ["audio_input", "audio_output", "leds"],
                })),
            )
            .await;
        assert_eq!(status, 201, "POST /devices {id}: {body}");
    }
    let (status, body) = live.admin(Method::GET, "/api/v1/personas", None).await;
    assert_eq!(status, 200, "GET /personas: {body}");
    let persona = body["personas"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["default"] != true).or(all.first()))
        .and_then(|p| p["id"].as_str())
        .expect("at least one persona")
        .to_owned();
    let (status, body) = live
        .admin(
            Method::PUT,
            &format!("/api/v1/devices/{}/persona", SEEDED_DEVICES[0]),
            Some(json!({ "persona_id": persona })),
        )
        .await;
    assert_eq!(status, 200, "PUT /persona: {body}");
    live.enrollment_code().await;
}

/// What one schemathesis run printed and how it ended.
struct Run {
    success: bool,
    output: String,
    took: Duration,
}

/// `name` from the environment as a number, else `default`.
fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

async fn run_schemathesis(bin: &Path, live: &LiveServer) -> Run {
    let base = live.api_base();
    let examples: u32 = knob("COMPANION_SCHEMATHESIS_EXAMPLES", MAX_EXAMPLES);
    let seed: u64 = knob("COMPANION_SCHEMATHESIS_SEED", SEED);
    let mut cmd = Command::new(bin);
    cmd.arg("--config-file")
        .arg(config_dir().join("schemathesis.toml"))
        .arg("run")
        .arg(format!("{base}/api/v1/openapi.json"))
        .args(["--url", &base])
        .args(["--checks", "all"])
        .args(["--max-examples", &examples.to_string()])
        // The same cases every run (no example database either); the stateful phase still
        // follows what the server answers (ids, tokens), so counts vary by a few percent.
        .args(["--seed", &seed.to_string()])
        .arg("--generation-deterministic")
        // One at a time: the server under test shares the machine's two cores.
        .args(["--workers", "1"])
        .arg("--no-color")
        // Nothing (reports, caches) lands in the repository.
        .current_dir(live.dir.path())
        .env("COMPANION_ADMIN_TOKEN", &live.admin_token)
        .env("COMPANION_HOOK_SECRET", HOOK_SECRET)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let start = Instant::now();
    let out = tokio::time::timeout(RUN_DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis finishes within {RUN_DEADLINE:?}"))
        .expect("run schemathesis");
    Run {
        success: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        took: start.elapsed(),
    }
}

/// Starts a server (with `configure` adding to its command), seeds it, runs schemathesis
/// against it and asserts a clean report.
async fn fuzz(bin: &Path, what: &str, configure: impl FnOnce(&mut Command)) {
    let mut live = LiveServer::start_with(|cmd| {
        // schemathesis sends thousands of requests with one admin token: the REST limit
        // (100 a minute per principal, tested in api.rs) would turn nearly all of them into
        // 429. The limit on failed enrolments stays as it is.
        cmd.env("COMPANION_HTTP__RATE_LIMIT_PER_MINUTE", "1000000");
        // The external-broker hooks answer callers with this secret (schemathesis sends it as
        // the document's `hookSecret` scheme; `ignored_auth` checks the 401 without it).
        cmd.env("COMPANION_MQTT_HOOK__SECRET", HOOK_SECRET);
        configure(cmd);
    })
    .await;
    seed(&live).await;
    let run = run_schemathesis(bin, &live).await;
    let log = live.server.drain().join("\n");
    assert!(
        run.success,
        "schemathesis found problems ({what}, {:.0?}):\n{}\n--- the server's last log lines\n{}",
        run.took,
        run.output,
        tail(&log, 200)
    );
    // 5xx bodies say nothing, so the log is where a cause would be.
    assert!(
        !log.contains("request failed"),
        "a request failed inside the server ({what}):\n{log}"
    );
    eprintln!(
        "schemathesis ({what}, {:.0?}):\n{}",
        run.took,
        tail(&run.output, 12)
    );
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generated_request_is_answered_as_the_openapi_document_says() {
    let Some(bin) = schemathesis_binary() else {
        return;
    };
    fuzz(&bin, "SQLite", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generated_request_is_answered_as_the_openapi_document_says_on_postgresql() {
    let Some(bin) = schemathesis_binary() else {
        return;
    };
    let Some(url) = common::fresh_pg_database().await else {
        return;
    };
    fuzz(&bin, "PostgreSQL", |cmd| {
        cmd.env("DATABASE_URL", url);
    })
    .await;
}
