//! A `companion-agent` daemon for tests: simulated hardware, buttons on a Unix socket, log
//! lines forwarded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use super::ServerProcess;

const DEADLINE: Duration = Duration::from_secs(60);

/// A `companion-agent` daemon on simulated hardware, its buttons on a Unix socket and its
/// log lines forwarded.
pub struct Agent {
    pub child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    socket: PathBuf,
}

impl Agent {
    /// Starts the daemon; its microphone plays `wav` on every talk press.
    pub async fn start(
        dir: &Path,
        id: &str,
        token: &str,
        url: &str,
        ca: &Path,
        wav: &Path,
    ) -> Agent {
        let env = dir.join("agent.env");
        std::fs::write(
            &env,
            format!(
                "DEVICE_ID={id}\nDEVICE_AUTH_TOKEN={token}\nCONTROL_PLANE_URL={url}\nCA_CERT={}\nCACHE_DIR={}\n",
                ca.display(),
                dir.join("cache").display()
            ),
        )
        .unwrap();
        let socket = dir.join("buttons.sock");
        let speaker = dir.join("speaker");
        std::fs::create_dir_all(&speaker).unwrap();
        let mut child = tokio::process::Command::new(super::ops::agent_binary().await)
            .env_clear()
            .env("RUST_LOG", "info")
            .arg("--env-file")
            .arg(&env)
            .arg("--hardware")
            .arg("sim")
            .arg("--mic-wav")
            .arg(wav)
            .arg("--speaker-dir")
            .arg(&speaker)
            .arg("--button-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent {
            child,
            lines,
            socket,
        }
    }

    /// Like [`Agent::wait_line`], showing the server's log when it fails.
    pub async fn wait_line_with(&mut self, what: &[&str], server: &mut ServerProcess) -> String {
        let mut seen = Vec::new();
        let got = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = self.lines.recv().await {
                if what.iter().any(|w| line.contains(w)) {
                    return Some(line);
                }
                seen.push(line);
            }
            None
        })
        .await;
        match got {
            Ok(Some(line)) => line,
            _ => panic!(
                "no agent line with {what:?}; agent log:\n{}\nserver log:\n{}",
                seen.join("\n"),
                server.drain().join("\n")
            ),
        }
    }

    /// Waits for a log line containing `what`; returns it.
    pub async fn wait_line(&mut self, what: &str) -> String {
        let mut seen = Vec::new();
        tokio::time::timeout(DEADLINE, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(what) {
                    return line;
                }
                seen.push(line);
            }
            panic!("the agent exited; log:\n{}", seen.join("\n"));
        })
        .await
        .unwrap_or_else(|_| panic!("no agent line with {what:?}; log:\n{}", seen.join("\n")))
    }

    pub async fn button(&self, line: &str) {
        let mut s = tokio::net::UnixStream::connect(&self.socket)
            .await
            .expect("the agent's button socket");
        s.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    }
}
