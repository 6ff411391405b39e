//! A private RabbitMQ node (Debian's `rabbitmq-server`, with `rabbitmq_mqtt` and
//! `rabbitmq_auth_backend_http`) on free loopback ports, its own directories and node name;
//! stopped (its whole process group killed) on drop.
//!
//! Devices authenticate through companion's hooks (`/api/v1/mqtt/rabbitmq/...`); the backend
//! logs in as an internal user with full rights.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Where Debian installs the server scripts.
const SBIN: &str = "/usr/lib/rabbitmq/bin";

/// The internal user the backend connects as.
pub const BACKEND_USER: &str = "companion-backend";
pub const BACKEND_PASS: &str = "backend-pass-for-tests";

/// Whether the package is installed; in CI its absence is a failure, not a skip.
pub fn available() -> bool {
    let installed = Path::new(SBIN).join("rabbitmq-server").is_file();
    if !installed {
        assert!(
            !super::in_ci(),
            "CI=true but rabbitmq-server is not installed (apt-get install rabbitmq-server)"
        );
        eprintln!("skipping: rabbitmq-server is not installed");
    }
    installed
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct RabbitMq {
    pub mqtt_port: u16,
    node: String,
    dir: tempfile::TempDir,
    pgid: i32,
    _child: tokio::process::Child,
}

impl RabbitMq {
    /// A free port for a node's MQTT listener, to configure a client before the node runs.
    pub fn free_port() -> u16 {
        free_port()
    }

    /// Starts a node from the shipped `ops/rabbitmq/rabbitmq.conf`, with its MQTT listener on
    /// `mqtt`, companion at `hook_base` (`http://127.0.0.1:<port>`) as its HTTP auth backend,
    /// and the management API on `management`; waits until the listener accepts connections.
    /// With `tls` (a port and companion's TLS directory: `ca.pem`, `server.pem`,
    /// `server.key`), devices can also connect over TLS there.
    pub async fn start(
        hook_base: &str,
        mqtt: u16,
        management: u16,
        tls: Option<(u16, &Path)>,
    ) -> Self {
        Self::start_node(hook_base, mqtt, Some(management), tls, None).await
    }

    /// Starts a second node that joins `first`'s cluster as it boots (peer discovery from
    /// the classic config: the first node is already up).
    pub async fn join(first: &RabbitMq, hook_base: &str, mqtt: u16) -> Self {
        let management = Some(free_port());
        Self::start_node(hook_base, mqtt, management, None, Some(first.node.clone())).await
    }

    async fn start_node(
        hook_base: &str,
        mqtt: u16,
        management: Option<u16>,
        tls: Option<(u16, &Path)>,
        join: Option<String>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (amqp, dist) = (free_port(), free_port());
        let node = format!("companion-test-{}-{mqtt}@localhost", std::process::id());
        let mut conf = shipped_config(hook_base, mqtt, management, tls);
        conf.push_str(&format!(
            "listeners.tcp.default = 127.0.0.1:{amqp}\n\
             default_user = {BACKEND_USER}\n\
             default_pass = {BACKEND_PASS}\n\
             loopback_users = none\n"
        ));
        if let Some(first) = &join {
            conf.push_str(&format!(
                "cluster_formation.peer_discovery_backend = classic_config\n\
                 cluster_formation.classic_config.nodes.1 = {first}\n"
            ));
        }
        std::fs::write(dir.path().join("rabbitmq.conf"), conf).unwrap();
        std::fs::copy(
            ops_dir().join("enabled_plugins"),
            dir.path().join("enabled_plugins"),
        )
        .unwrap();
        let mut cmd = tokio::process::Command::new(Path::new(SBIN).join("rabbitmq-server"));
        env(&mut cmd, dir.path(), &node, amqp, dist);
        let log = std::fs::File::create(dir.path().join("server.out")).unwrap();
        cmd.stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().expect("start rabbitmq-server");
        let pgid = child.id().expect("a running child") as i32;
        let me = Self {
            mqtt_port: mqtt,
            node,
            dir,
            pgid,
            _child: child,
        };
        // A node takes about 10 s to boot; the MQTT listener comes up last.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while tokio::net::TcpStream::connect(("127.0.0.1", mqtt))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "RabbitMQ did not start:\n{}",
                me.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        me
    }

    /// What the node printed (for failure messages).
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.out")).unwrap_or_default()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

fn env(cmd: &mut tokio::process::Command, dir: &Path, node: &str, amqp: u16, dist: u16) {
    cmd.env("RABBITMQ_NODENAME", node)
        .env("RABBITMQ_NODE_PORT", amqp.to_string())
        .env("RABBITMQ_DIST_PORT", dist.to_string())
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"));
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        // The script runs the Erlang VM as its child: end the whole group.
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
    }
}

fn ops_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/rabbitmq")
}

/// `ops/rabbitmq/rabbitmq.conf` with this machine's ports, paths and hook address: every
/// other setting is used as shipped.
fn shipped_config(
    hook_base: &str,
    mqtt: u16,
    management: Option<u16>,
    tls: Option<(u16, &Path)>,
) -> String {
    let shipped = std::fs::read_to_string(ops_dir().join("rabbitmq.conf")).unwrap();
    for required in [
        "mqtt.allow_anonymous = false",
        "auth_backends.2 = http",
        "auth_http.http_method = post",
    ] {
        assert!(
            shipped.lines().any(|l| l.trim() == required),
            "ops/rabbitmq/rabbitmq.conf keeps {required:?}"
        );
    }
    let mut out = String::new();
    for line in shipped.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(" = ").expect("key = value");
        let value = match key {
            "mqtt.listeners.tcp.default" => format!("127.0.0.1:{mqtt}"),
            "mqtt.listeners.ssl.default" => match tls {
                Some((port, _)) => format!("127.0.0.1:{port}"),
                None => continue,
            },
            "ssl_options.cacertfile" | "ssl_options.certfile" | "ssl_options.keyfile" => {
                let Some((_, tls_dir)) = tls else { continue };
                let file = Path::new(value).file_name().unwrap();
                tls_dir.join(file).display().to_string()
            }
            k if k.starts_with("ssl_options.") && tls.is_none() => continue,
            "management.tcp.port" => match management {
                Some(port) => {
                    out.push_str("management.tcp.ip = 127.0.0.1\n");
                    port.to_string()
                }
                None => continue,
            },
            // This machine's nodes are named by the test; a second one joins the first.
            k if k.starts_with("cluster_formation.") => continue,
            k if k.starts_with("auth_http.") && k.ends_with("_path") => {
                value.replace("http://companion:8000", hook_base)
            }
            _ => value.to_owned(),
        };
        out.push_str(&format!("{key} = {value}\n"));
    }
    out
}

/// `mosquitto_pub` once (MQTT 3.1.1, QoS 1); its exit status and what it printed.
pub async fn mosquitto_pub(port: u16, id: &str, token: &str, topic: &str) -> (i32, String) {
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args(["-i", id, "-u", id, "-P", token, "-t", topic, "-q", "1"])
        .args(["-m", "x"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("mosquitto_pub ends")
        .expect("mosquitto_pub is installed (Debian package mosquitto-clients)");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Sends each line `from` prints (invalid UTF-8 replaced) until it ends.
async fn forward_lines(
    from: impl tokio::io::AsyncRead + Unpin,
    to: tokio::sync::mpsc::UnboundedSender<String>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut r = tokio::io::BufReader::new(from);
    let mut line = Vec::new();
    while r.read_until(b'\n', &mut line).await.is_ok_and(|n| n > 0) {
        let _ = to.send(String::from_utf8_lossy(&line).trim_end().to_owned());
        line.clear();
    }
}

/// A `mosquitto_sub` (MQTT 3.1.1, QoS 1, `-d`: it prints its packets) subscribed to `topic`
/// as device `id`; killed on drop.
pub struct MosquittoSub {
    pub child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub seen: Vec<String>,
}

impl MosquittoSub {
    pub fn start(port: u16, id: &str, token: &str, topic: &str) -> Self {
        Self::start_with(port, id, token, topic, &[])
    }

    /// [`MosquittoSub::start`] with more arguments (`-W 5`: exit after 5 s).
    pub fn start_with(port: u16, id: &str, token: &str, topic: &str, extra: &[&str]) -> Self {
        // Through stdbuf: mosquitto_sub's stdout is block-buffered into a pipe.
        let mut child = tokio::process::Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
            .args([
                "-i", id, "-u", id, "-P", token, "-t", topic, "-q", "1", "-d",
            ])
            // Each message as its topic and length (payloads are MessagePack).
            .args(["-F", "message %t %l"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub is installed (Debian package mosquitto-clients)");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        tokio::spawn(forward_lines(out, tx));
        tokio::spawn(forward_lines(err, tx2));
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 20 s) for a line containing `what`; returns it.
    pub async fn wait_line(&mut self, what: &str) -> String {
        let got = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(l) = self.lines.recv().await {
                self.seen.push(l.clone());
                if l.contains(what) {
                    return Some(l);
                }
            }
            None
        })
        .await;
        match got {
            Ok(Some(l)) => l,
            _ => panic!(
                "mosquitto_sub printed no {what:?}:\n{}",
                self.seen.join("\n")
            ),
        }
    }

    /// What it printed until it exited (at most `within`), and its exit status.
    pub async fn exit(&mut self, within: Duration) -> (i32, String) {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("mosquitto_sub still running:\n{}", self.seen.join("\n")))
            .unwrap();
        while let Some(l) = self.lines.recv().await {
            self.seen.push(l);
        }
        (status.code().unwrap_or(-1), self.seen.join("\n"))
    }
}
