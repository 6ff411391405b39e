//! Test harness: the real broker crate on port-0 listeners (plain + TLS with a generated CA),
//! a static authenticator, a backend double on an in-process router link, a
//! cuttable TCP proxy, and helpers to run the agent in-process or as a real process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use companion_agent::config::{BrokerUrl, Secret, Settings};
use companion_broker::{
    AuthDecision, AuthRequest, Authenticator, BrokerHandle, DenyReason, EdgeListeners, Hooks,
    LocalEvent, MqttSettings, NullSink,
};
use companion_schema::{DeviceId, Payload, Topic, TopicKind};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const DEADLINE: Duration = Duration::from_secs(15);

pub struct StaticAuth {
    pub tokens: HashMap<String, String>,
}

#[async_trait::async_trait]
impl Authenticator for StaticAuth {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> AuthDecision {
        match self.tokens.get(req.username) {
            Some(t) if t.as_bytes() == req.password => match DeviceId::parse(req.username) {
                Ok(device) => AuthDecision::Allow { device },
                Err(_) => AuthDecision::Deny(DenyReason::IdentityMismatch),
            },
            Some(_) => AuthDecision::Deny(DenyReason::BadToken),
            None => AuthDecision::Deny(DenyReason::UnknownDevice),
        }
    }
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A running broker.
pub struct TestBroker {
    pub handle: BrokerHandle,
    pub plain: SocketAddr,
    pub tls: SocketAddr,
    /// MQTT over WebSocket, plain and over TLS (path `/mqtt`).
    pub ws: SocketAddr,
    pub wss: SocketAddr,
    pub ca_pem: PathBuf,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start(devices: &[(&str, &str)]) -> Self {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let settings = MqttSettings {
            listen: "127.0.0.1:0".into(),
            tls_listen: "127.0.0.1:0".into(),
            ..MqttSettings::default()
        };
        let material =
            companion_broker::tls::load_or_generate(&settings.tls, dir.path(), &[]).unwrap();
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let wss = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (plain_addr, tls_addr) = (plain.local_addr().unwrap(), tls.local_addr().unwrap());
        let (ws_addr, wss_addr) = (ws.local_addr().unwrap(), wss.local_addr().unwrap());
        let auth = StaticAuth {
            tokens: devices
                .iter()
                .map(|(d, t)| (d.to_string(), t.to_string()))
                .collect(),
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let handle = companion_broker::start(
            &settings,
            Some(material.server_config.clone()),
            EdgeListeners {
                plain: Some(plain),
                tls: Some(tls),
                ws: Some(ws),
                wss: Some(wss),
            },
            Hooks::new(Arc::new(auth), Arc::new(NullSink)),
            &mut registry,
            shutdown.clone(),
            &tracker,
        )
        .await
        .unwrap();
        Self {
            handle,
            plain: plain_addr,
            tls: tls_addr,
            ws: ws_addr,
            wss: wss_addr,
            ca_pem: material.ca_pem_path,
            shutdown,
            tracker,
            _dir: dir,
        }
    }

    /// The backend's view: an in-process client of the router (a local link) subscribed to
    /// the device's up topics.
    pub async fn backend(&self, device: &str) -> Backend {
        let mut local = self
            .handle
            .local_client(&format!("test-{}", rand::random::<u32>()))
            .await
            .expect("the router takes a local client");
        let device = DeviceId::parse(device).unwrap();
        let filters: Vec<String> = [
            TopicKind::Status,
            TopicKind::Telemetry,
            TopicKind::Button,
            TopicKind::SessionUp,
            TopicKind::AudioUp,
        ]
        .into_iter()
        .map(|kind| Topic::new(device.clone(), kind).to_string())
        .collect();
        let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
        local.subscribe(&filters).await.unwrap();
        loop {
            match tokio::time::timeout(DEADLINE, local.next()).await {
                Ok(Ok(LocalEvent::SubAck)) => break,
                Ok(Ok(_)) => {}
                other => panic!("no SUBACK: {other:?}"),
            }
        }
        let (tx, rx) = mpsc::channel(4096);
        let (out_tx, mut out_rx) = mpsc::channel::<(String, Vec<u8>, bool)>(256);
        tokio::spawn(async move {
            loop {
                // Cases: a publish from the test; a delivery from the router.
                tokio::select! {
                    out = out_rx.recv() => match out {
                        Some((topic, payload, retain)) => {
                            if local.publish(topic, payload, retain).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    ev = local.next() => match ev {
                        Ok(LocalEvent::Publish { topic, payload, .. }) => {
                            let Ok(t) = Topic::parse(&String::from_utf8_lossy(&topic)) else {
                                continue;
                            };
                            if let Ok(payload) = Payload::decode(t.kind, &payload) {
                                if tx.send((t.kind, payload)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(LocalEvent::SubAck) => {}
                        Err(_) => return,
                    },
                }
            }
        });
        Backend {
            out: out_tx,
            rx,
            device,
        }
    }
}

/// The backend double: sees what the device publishes, publishes to its down topics.
pub struct Backend {
    out: mpsc::Sender<(String, Vec<u8>, bool)>,
    pub rx: mpsc::Receiver<(TopicKind, Payload)>,
    pub device: DeviceId,
}

impl Backend {
    /// The next message matching `pred`, skipping others, with a deadline.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&Payload) -> bool) -> Payload {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let (_, p) = self.rx.recv().await.expect("backend client running");
                if pred(&p) {
                    return p;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}"))
    }

    pub async fn send(&self, kind: TopicKind, payload: &Payload) {
        let topic = Topic::new(self.device.clone(), kind).to_string();
        self.out
            .send((topic, payload.encode().unwrap(), kind.retained()))
            .await
            .unwrap();
    }
}

/// A TCP proxy in front of the broker that the test can cut (closing live connections and
/// refusing new ones) and restore.
#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Self {
            addr,
            up: Arc::new(AtomicBool::new(true)),
            generation: Arc::new(std::sync::Mutex::new(CancellationToken::new())),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !p.up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = p.generation.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut g = self.generation.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Agent settings pointing at `addr` (plain MQTT on loopback, or TLS with the CA).
pub fn settings(
    device: &str,
    token: &str,
    addr: SocketAddr,
    ca: Option<&Path>,
    cache: &Path,
) -> Settings {
    let url = BrokerUrl {
        tls: ca.is_some(),
        host: if ca.is_some() {
            "localhost".into()
        } else {
            addr.ip().to_string()
        },
        port: addr.port(),
        websocket: false,
        path: "/".into(),
    };
    let mut s = Settings::new(
        DeviceId::parse(device).unwrap(),
        url,
        Secret::new(token),
        cache.to_owned(),
    );
    s.ca_cert = ca.map(Path::to_owned);
    s.keepalive_s = 5;
    s
}

/// The `.env` file content for a process test.
pub fn env_file(dir: &Path, lines: &[(&str, String)]) -> PathBuf {
    let p = dir.join("agent.env");
    let text: String = lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(&p, text).unwrap();
    p
}

pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_companion-agent")
}

/// A command for the agent binary with a clean environment.
pub fn agent_command(env_file: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(agent_bin());
    c.env_clear()
        .env("RUST_LOG", "info")
        .arg("--env-file")
        .arg(env_file)
        .kill_on_drop(true);
    c
}

/// Waits (polling every 10 ms, with a deadline) until `cond` holds.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within {DEADLINE:?}"));
}

/// The next value a persisted seq file will hand out.
pub fn seq_file(cache: &Path, name: &str) -> u64 {
    std::fs::read_to_string(cache.join(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// An in-process agent with simulated hardware.
pub struct InProcessAgent {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub buttons: mpsc::Sender<companion_agent::hw::ButtonInput>,
    pub observed: mpsc::Receiver<companion_agent::controller::Observed>,
    pub led: tokio::sync::watch::Receiver<companion_agent::hw::LedState>,
}

pub struct AgentHw {
    pub audio_in: companion_agent::hw::sim::WavIn,
    pub audio_out: companion_agent::hw::sim::WavOut,
}

impl Default for AgentHw {
    fn default() -> Self {
        Self {
            audio_in: companion_agent::hw::sim::WavIn {
                path: None,
                realtime: true,
            },
            audio_out: companion_agent::hw::sim::WavOut::new(None, None, true),
        }
    }
}

impl InProcessAgent {
    pub fn start(settings: Settings, telemetry_ms: u64, hw: AgentHw) -> Self {
        Self::start_with(settings, Some(Duration::from_millis(telemetry_ms)), hw)
    }

    /// `telemetry: None` follows the retained config (default 30 s).
    pub fn start_with(settings: Settings, telemetry: Option<Duration>, hw: AgentHw) -> Self {
        let (btx, brx) = mpsc::channel(16);
        let (otx, orx) = mpsc::channel(1024);
        let (leds, led) = companion_agent::hw::sim::LogLeds::new();
        let hardware = companion_agent::Hardware {
            audio_in: Arc::new(hw.audio_in),
            audio_out: Arc::new(hw.audio_out),
            buttons: Box::new(companion_agent::hw::sim::ChannelButtons { rx: brx }),
            leds: Box::new(leds),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(companion_agent::run(
            settings,
            hardware,
            companion_agent::RunOptions {
                telemetry_interval: telemetry,
                observer: Some(otx),
                telemetry_sources: None,
            },
            shutdown.clone(),
        ));
        Self {
            shutdown,
            task,
            buttons: btx,
            observed: orx,
            led,
        }
    }

    pub async fn press(&self, button: &str, action: companion_schema::ButtonAction) {
        self.buttons
            .send(companion_agent::hw::ButtonInput {
                button: button.into(),
                action,
            })
            .await
            .unwrap();
    }

    /// The next observation matching `pred`, with a deadline.
    pub async fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&companion_agent::controller::Observed) -> bool,
    ) -> companion_agent::controller::Observed {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let o = self.observed.recv().await.expect("agent running");
                if pred(&o) {
                    return o;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}"))
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("agent stops in time")
            .unwrap()
            .unwrap();
    }
}
