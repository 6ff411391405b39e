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
            std::env::var("CI").map_or(true, |v| v != "true"),
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

    /// Starts a node with its MQTT listener on `mqtt` and companion at `hook_base`
    /// (`http://127.0.0.1:<port>`) as its HTTP auth backend, and waits until the listener
    /// accepts connections.
    /// With `management`, the management plugin listens there (kicks go through it).
    pub async fn start(hook_base: &str, mqtt: u16, management: Option<u16>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (amqp, dist) = (free_port(), free_port());
        let management_conf = management.map_or_else(String::new, |port| {
            format!("management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {port}\n")
        });
        let node = format!("companion-test-{}-{mqtt}@localhost", std::process::id());
        let hook = format!("{hook_base}/api/v1/mqtt/rabbitmq");
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp}\n\
                 mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\n\
                 mqtt.allow_anonymous = false\n\
                 auth_backends.1 = internal\n\
                 auth_backends.2 = http\n\
                 auth_http.http_method = post\n\
                 auth_http.user_path = {hook}/user\n\
                 auth_http.vhost_path = {hook}/vhost\n\
                 auth_http.resource_path = {hook}/resource\n\
                 auth_http.topic_path = {hook}/topic\n\
                 default_user = {BACKEND_USER}\n\
                 default_pass = {BACKEND_PASS}\n\
                 loopback_users = none\n\
                 {management_conf}"
            ),
        )
        .unwrap();
        let plugins = if management.is_some() {
            "[rabbitmq_mqtt,rabbitmq_auth_backend_http,rabbitmq_management].\n"
        } else {
            "[rabbitmq_mqtt,rabbitmq_auth_backend_http].\n"
        };
        std::fs::write(dir.path().join("enabled_plugins"), plugins).unwrap();
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
