//! The provisioning and ops scripts against a real `companion serve`: `setup_device.sh` (enrol,
//! install under `--root`, unit accepted by `systemd-analyze verify`, the installed agent
//! connects, a re-run changes nothing), `register_device.sh`, `ops/smoke.sh`, and shellcheck.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::ops::{
    agent_binary, parse_env_file, repo_root, run_script, running_as_root, wait_for, LiveServer,
};
use reqwest::Method;

fn setup_script() -> PathBuf {
    repo_root().join("provisioning/setup_device.sh")
}

fn register_script() -> PathBuf {
    repo_root().join("provisioning/register_device.sh")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn owner(path: &Path) -> (u32, u32) {
    let m = std::fs::metadata(path).unwrap();
    (m.uid(), m.gid())
}

/// uid and gid of `user` in a passwd file.
fn passwd_ids(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user) && f.len() >= 4)
            .then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

fn group_members(group_file: &str, group: &str) -> Vec<String> {
    group_file
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&group) && f.len() >= 4).then(|| {
                f[3].split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Path -> (mode, uid, gid, length, mtime in ns) for everything under `root`.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u32, u64, i128)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
            out.insert(
                path.strip_prefix(root).unwrap().to_path_buf(),
                (m.mode(), m.uid(), m.gid(), m.len(), mtime),
            );
            if m.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

/// Runs `systemd-analyze verify` on the installed unit in a scratch root holding the unit, the
/// agent binary it starts and the host's system units (for the targets it orders against).
/// Returns its combined output; a clean unit gives none.
fn systemd_verify(install_root: &Path) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let r = scratch.path();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(r.join("opt/companion/bin")).unwrap();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    std::fs::copy(
        install_root.join("etc/systemd/system/companion-agent.service"),
        r.join("etc/systemd/system/companion-agent.service"),
    )
    .unwrap();
    let agent = install_root.join("opt/companion/bin/companion-agent");
    if std::fs::hard_link(&agent, r.join("opt/companion/bin/companion-agent")).is_err() {
        std::fs::copy(&agent, r.join("opt/companion/bin/companion-agent")).unwrap();
    }
    let status = std::process::Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .expect("cp");
    assert!(status.success(), "copy the host's system units");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("companion-agent.service")
        .output()
        .expect("systemd-analyze is installed (package systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    text
}

#[tokio::test]
async fn setup_device_enrols_installs_a_connecting_agent_and_a_rerun_changes_nothing() {
    if !running_as_root() {
        return;
    }
    let live = LiveServer::start().await;
    let agent = agent_binary().await;
    let code = live.enrollment_code().await;
    let root = tempfile::tempdir().unwrap();
    let root_s = root.path().to_str().unwrap().to_owned();
    let api = live.api_base();
    let ca = live.ca_pem.to_str().unwrap().to_owned();
    let env = [
        ("CONTROL_PLANE_URL", api.as_str()),
        ("ENROLL_CODE", code.as_str()),
        ("AGENT_BINARY", agent.to_str().unwrap()),
        ("CA_CERT", ca.as_str()),
        ("DEVICE_NAME", "field unit 7"),
        ("DEVICE_TYPE", "simulated"),
    ];

    // --dry-run changes nothing and does not use the code up.
    let dry = run_script(&setup_script(), &["--root", &root_s, "--dry-run"], &env).await;
    assert!(dry.success, "dry run failed:\n{}", dry.output());
    assert!(dry.stdout.contains("would enrol"), "{}", dry.output());
    assert!(
        std::fs::read_dir(root.path()).unwrap().next().is_none(),
        "--dry-run wrote into the root"
    );

    let first = run_script(&setup_script(), &["--root", &root_s, "--no-start"], &env).await;
    assert!(first.success, "setup_device.sh failed:\n{}", first.output());

    // The user database inside the root: a system user with the audio and gpio groups.
    let etc = root.path().join("etc");
    let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
    let (uid, gid) = passwd_ids(&passwd, "companion").expect("companion in the root's passwd");
    assert!(uid < 1000, "a system user (uid {uid})");
    let groups = std::fs::read_to_string(etc.join("group")).unwrap();
    for g in ["audio", "gpio"] {
        assert!(
            group_members(&groups, g).contains(&"companion".to_owned()),
            "companion is in group {g}:\n{groups}"
        );
    }

    // The environment file: 0600, owned by companion, the variables the agent reads.
    let env_path = root.path().join("opt/companion/.env");
    assert_eq!(mode(&env_path), 0o600);
    assert_eq!(owner(&env_path), (uid, gid));
    let vars = parse_env_file(&std::fs::read_to_string(&env_path).unwrap());
    let device_id = vars["DEVICE_ID"].clone();
    assert!(
        !device_id.is_empty()
            && device_id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
        "DEVICE_ID {device_id:?}"
    );
    assert_eq!(
        vars["CONTROL_PLANE_URL"],
        format!("mqtts://localhost:{}", live.mqtts_port()),
        "the agent's CONTROL_PLANE_URL is the MQTT URL from the enrolment answer"
    );
    let token = vars["DEVICE_AUTH_TOKEN"].clone();
    assert!(token.len() >= 32, "a real token");
    assert_eq!(vars["CA_CERT"], "/opt/companion/ca.pem");
    assert_eq!(vars["CACHE_DIR"], "/var/cache/companion");
    assert_eq!(vars["AUDIO_SAMPLE_RATE"], "16000");
    assert_eq!(vars["AUDIO_CHANNELS"], "1");
    for (what, secret) in [("token", &token), ("enrolment code", &code)] {
        assert!(
            !dry.output().contains(secret.as_str()) && !first.output().contains(secret.as_str()),
            "the {what} was printed:\n{}",
            first.output()
        );
    }

    // Agent, CA and cache directory.
    let bin = root.path().join("opt/companion/bin/companion-agent");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(owner(&bin), (0, 0), "root owns the binary the service runs");
    let same = std::process::Command::new("cmp")
        .arg("-s")
        .arg(&agent)
        .arg(&bin)
        .status()
        .unwrap();
    assert!(same.success(), "the installed agent is AGENT_BINARY");
    let ca_installed = root.path().join("opt/companion/ca.pem");
    assert_eq!(
        std::fs::read(&ca_installed).unwrap(),
        std::fs::read(&live.ca_pem).unwrap()
    );
    assert_eq!(mode(&ca_installed), 0o644);
    let cache = root.path().join("var/cache/companion");
    assert!(cache.is_dir());
    assert_eq!(mode(&cache), 0o750);
    assert_eq!(owner(&cache), (uid, gid));

    // The unit.
    let unit_path = root
        .path()
        .join("etc/systemd/system/companion-agent.service");
    assert_eq!(mode(&unit_path), 0o644);
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for want in [
        "User=companion",
        "SupplementaryGroups=audio gpio",
        "ExecStart=/opt/companion/bin/companion-agent --env-file /opt/companion/.env",
        "Restart=always",
        "RestartSec=10",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/cache/companion",
        "WantedBy=multi-user.target",
    ] {
        assert!(lines.contains(&want), "unit lacks {want:?}:\n{unit}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("After=") && l.contains("network-online.target")),
        "unit starts after network-online.target:\n{unit}"
    );
    assert!(!unit.contains('@'), "a placeholder was left:\n{unit}");
    // Enabled inside the root? --no-start leaves it alone.
    assert!(!root
        .path()
        .join("etc/systemd/system/multi-user.target.wants/companion-agent.service")
        .exists());
    let verify = systemd_verify(root.path());
    assert!(
        verify.trim().is_empty(),
        "systemd-analyze verify complained:\n{verify}"
    );

    // The installed agent, with the written env file, connects. Paths in the file are the
    // device's (/opt/..., /var/...); the two that point into the root are overridden by the
    // environment, which the agent lets win over the file.
    let mut agent_proc = tokio::process::Command::new(&bin)
        .arg("--env-file")
        .arg(&env_path)
        .args(["--hardware", "sim"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("CA_CERT", &ca_installed)
        .env("CACHE_DIR", &cache)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the installed agent");
    wait_for(
        "the device to be online",
        Duration::from_secs(60),
        || async {
            let (status, body) = live
                .admin(Method::GET, &format!("/api/v1/devices/{device_id}"), None)
                .await;
            if status == 429 {
                return None; // polled faster than the admin rate limit; try again
            }
            assert_eq!(status, 200, "{body}");
            (body["presence"]["online"] == true).then_some(())
        },
    )
    .await;
    let pid = agent_proc.id().expect("agent running").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let exited = tokio::time::timeout(Duration::from_secs(15), agent_proc.wait()).await;
    assert!(exited.is_ok(), "the agent stops on SIGTERM");

    // A second run with the same (now used) code: nothing changes, nothing is enrolled.
    let before = snapshot(root.path());
    let second = run_script(&setup_script(), &["--root", &root_s, "--no-start"], &env).await;
    assert!(second.success, "re-run failed:\n{}", second.output());
    assert!(
        second.stdout.contains("nothing to change"),
        "{}",
        second.output()
    );
    assert!(!second.output().contains(token.as_str()));
    let after = snapshot(root.path());
    assert_eq!(
        before,
        after,
        "the re-run changed files:\n{}",
        second.output()
    );
    let enrolments = live.audit("enrollment.redeem").await;
    assert_eq!(
        enrolments.len(),
        1,
        "exactly one enrolment: {enrolments:#?}"
    );
    assert_eq!(enrolments[0]["outcome"], "success");
    assert_eq!(enrolments[0]["target"], device_id.as_str());
}

#[tokio::test]
async fn setup_device_installs_an_agent_that_connects_over_wss() {
    if !running_as_root() {
        return;
    }
    let live = LiveServer::start().await;
    let agent = agent_binary().await;
    let code = live.enrollment_code().await;
    let root = tempfile::tempdir().unwrap();
    let root_s = root.path().to_str().unwrap().to_owned();
    let api = live.api_base();
    let ca = live.ca_pem.to_str().unwrap().to_owned();
    let wss = format!("wss://localhost:{}/mqtt", live.wss_port());
    let env = [
        ("CONTROL_PLANE_URL", api.as_str()),
        ("ENROLL_CODE", code.as_str()),
        ("AGENT_BINARY", agent.to_str().unwrap()),
        ("CA_CERT", ca.as_str()),
        ("DEVICE_TYPE", "simulated"),
    ];
    let bad = run_script(
        &setup_script(),
        &[
            "--root",
            &root_s,
            "--no-start",
            "--mqtt-url",
            "https://x/mqtt",
        ],
        &env,
    )
    .await;
    assert!(
        !bad.success && bad.stderr.contains("MQTT_URL must be"),
        "{}",
        bad.output()
    );

    let run = run_script(
        &setup_script(),
        &["--root", &root_s, "--no-start", "--mqtt-url", &wss],
        &env,
    )
    .await;
    assert!(run.success, "setup_device.sh failed:\n{}", run.output());
    let env_path = root.path().join("opt/companion/.env");
    let vars = parse_env_file(&std::fs::read_to_string(&env_path).unwrap());
    assert_eq!(vars["CONTROL_PLANE_URL"], wss);
    let device_id = vars["DEVICE_ID"].clone();

    let bin = root.path().join("opt/companion/bin/companion-agent");
    let _agent_proc = tokio::process::Command::new(&bin)
        .arg("--env-file")
        .arg(&env_path)
        .args(["--hardware", "sim"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("CA_CERT", root.path().join("opt/companion/ca.pem"))
        .env("CACHE_DIR", root.path().join("var/cache/companion"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the installed agent");
    wait_for(
        "the device to be online over wss",
        Duration::from_secs(60),
        || async {
            let (status, body) = live
                .admin(Method::GET, &format!("/api/v1/devices/{device_id}"), None)
                .await;
            if status == 429 {
                return None;
            }
            assert_eq!(status, 200, "{body}");
            (body["presence"]["online"] == true).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn setup_device_refuses_a_used_enrolment_code_and_installs_no_identity() {
    if !running_as_root() {
        return;
    }
    let live = LiveServer::start().await;
    let root = tempfile::tempdir().unwrap();
    let root_s = root.path().to_str().unwrap().to_owned();
    let api = live.api_base();
    let ca = live.ca_pem.to_str().unwrap().to_owned();
    // Any executable stands in for the agent: the script fails before it matters.
    let run = run_script(
        &setup_script(),
        &["--root", &root_s, "--no-start"],
        &[
            ("CONTROL_PLANE_URL", api.as_str()),
            ("ENROLL_CODE", "not-a-real-code"),
            ("AGENT_BINARY", "/bin/true"),
            ("CA_CERT", ca.as_str()),
        ],
    )
    .await;
    assert!(!run.success, "{}", run.output());
    assert!(
        run.stderr.contains("enrolment refused (403)"),
        "a clear message:\n{}",
        run.output()
    );
    assert!(!root.path().join("opt/companion/.env").exists());

    // Without any identity it says what to set.
    let none = run_script(
        &setup_script(),
        &["--root", &root_s, "--no-start"],
        &[("CONTROL_PLANE_URL", api.as_str())],
    )
    .await;
    assert!(!none.success);
    assert!(none.stderr.contains("ENROLL_CODE"), "{}", none.output());
}

#[tokio::test]
async fn register_device_prints_the_id_and_stores_the_token_0600_without_printing_it() {
    let live = LiveServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("agent.env");
    std::fs::write(&env_file, "AUDIO_CAPTURE_DEVICE=plughw:1,0\n").unwrap();
    let api = live.api_base();
    let run = run_script(
        &register_script(),
        &["kitchen unit", "simulated"],
        &[
            ("CONTROL_PLANE_URL", api.as_str()),
            ("ADMIN_API_TOKEN", live.admin_token.as_str()),
            ("ENV_FILE", env_file.to_str().unwrap()),
            ("NO_RESTART", "1"),
        ],
    )
    .await;
    assert!(run.success, "register_device.sh failed:\n{}", run.output());
    let device_id = run.stdout.trim().to_owned();
    assert!(
        !device_id.is_empty() && !device_id.contains(char::is_whitespace),
        "stdout is the id alone: {:?}",
        run.stdout
    );

    let (status, body) = live
        .admin(Method::GET, &format!("/api/v1/devices/{device_id}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "kitchen unit");
    assert_eq!(body["device_type"], "simulated");
    let mut caps: Vec<String> = body["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    caps.sort();
    assert_eq!(caps, ["audio_input", "audio_output", "buttons", "leds"]);

    assert_eq!(mode(&env_file), 0o600);
    let vars = parse_env_file(&std::fs::read_to_string(&env_file).unwrap());
    assert_eq!(vars["DEVICE_ID"], device_id);
    assert_eq!(
        vars["CONTROL_PLANE_URL"],
        format!("mqtts://localhost:{}", live.mqtts_port())
    );
    assert_eq!(
        vars["AUDIO_CAPTURE_DEVICE"], "plughw:1,0",
        "other lines are kept"
    );
    let token = &vars["DEVICE_AUTH_TOKEN"];
    assert!(token.len() >= 32);
    assert!(
        !run.output().contains(token.as_str()),
        "the token was printed"
    );
    assert!(!run.output().contains(live.admin_token.as_str()));
}

#[tokio::test]
async fn register_device_fails_clearly_on_a_bad_admin_token_and_an_unreachable_server() {
    let live = LiveServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("agent.env");
    let api = live.api_base();
    let bad = run_script(
        &register_script(),
        &["kitchen unit"],
        &[
            ("CONTROL_PLANE_URL", api.as_str()),
            ("ADMIN_API_TOKEN", "definitely-not-the-admin-token"),
            ("ENV_FILE", env_file.to_str().unwrap()),
            ("NO_RESTART", "1"),
        ],
    )
    .await;
    assert!(!bad.success);
    assert!(bad.stdout.is_empty(), "no id printed: {}", bad.output());
    assert!(
        bad.stderr.contains("401") && bad.stderr.contains("ADMIN_API_TOKEN"),
        "names the status and what to check:\n{}",
        bad.output()
    );
    assert!(!bad.output().contains("definitely-not-the-admin-token"));
    assert!(!env_file.exists(), "nothing written on failure");

    // A port nobody listens on: bind, learn it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable_url = format!("http://127.0.0.1:{port}");
    let gone = run_script(
        &register_script(),
        &["kitchen unit"],
        &[
            ("CONTROL_PLANE_URL", unreachable_url.as_str()),
            ("ADMIN_API_TOKEN", live.admin_token.as_str()),
            ("ENV_FILE", env_file.to_str().unwrap()),
            ("NO_RESTART", "1"),
        ],
    )
    .await;
    assert!(!gone.success);
    assert!(
        gone.stderr.contains("cannot reach the control plane")
            && gone.stderr.contains("CONTROL_PLANE_URL"),
        "{}",
        gone.output()
    );
    assert!(!env_file.exists());
}

#[tokio::test]
async fn smoke_script_passes_against_a_running_server_and_cleans_up() {
    let live = LiveServer::start().await;
    let api = live.api_base();
    let ca = live.ca_pem.to_str().unwrap().to_owned();
    let run = run_script(
        &repo_root().join("ops/smoke.sh"),
        &[],
        &[
            ("CONTROL_PLANE_URL", api.as_str()),
            ("ADMIN_API_TOKEN", live.admin_token.as_str()),
            ("CA_CERT", ca.as_str()),
        ],
    )
    .await;
    assert!(run.success, "smoke.sh failed:\n{}", run.output());
    assert!(run.stdout.contains("smoke test passed"), "{}", run.output());
    assert!(!run.output().contains(live.admin_token.as_str()));

    // It registered one device, published as it over TLS, and deleted it.
    let created = live.audit("device.create").await;
    assert_eq!(created.len(), 1, "{created:#?}");
    let device_id = created[0]["target"].as_str().unwrap().to_owned();
    let deleted = live.audit("device.delete").await;
    assert_eq!(deleted.len(), 1, "{deleted:#?}");
    assert_eq!(deleted[0]["target"], device_id.as_str());
    let (status, _) = live
        .admin(Method::GET, &format!("/api/v1/devices/{device_id}"), None)
        .await;
    assert_eq!(status, 404);
    let metrics = live.metrics().await;
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("broker_messages_in_total{") && l.contains("class=\"telemetry\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(counted >= 1.0, "the telemetry message was counted");

    // Against a server that is not there it fails at the first step, clearly.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable_url = format!("http://127.0.0.1:{port}");
    let gone = run_script(
        &repo_root().join("ops/smoke.sh"),
        &[],
        &[
            ("CONTROL_PLANE_URL", unreachable_url.as_str()),
            ("ADMIN_API_TOKEN", live.admin_token.as_str()),
            ("CA_CERT", ca.as_str()),
        ],
    )
    .await;
    assert!(!gone.success);
    assert!(gone.stderr.contains("/ready"), "{}", gone.output());
}

/// Every `*.sh` in the repository passes shellcheck.
#[test]
fn every_shell_script_is_shellcheck_clean() {
    let root = repo_root();
    let mut scripts = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if !matches!(name.as_ref(), "target" | ".git" | "node_modules") {
                    stack.push(path);
                }
            } else if name.ends_with(".sh") {
                scripts.push(path);
            }
        }
    }
    scripts.sort();
    for want in [
        "provisioning/setup_device.sh",
        "provisioning/register_device.sh",
        "ops/smoke.sh",
    ] {
        assert!(scripts.contains(&root.join(want)), "{want} was found");
    }
    let out = std::process::Command::new("shellcheck")
        .arg("--shell=bash")
        .args(&scripts)
        .output()
        .expect("shellcheck is installed (package shellcheck)");
    assert!(
        out.status.success(),
        "shellcheck found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
