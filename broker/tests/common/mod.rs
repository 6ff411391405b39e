//! Test harness: a real broker on port 0 (plain + TLS with a generated CA), a static
//! authenticator, a recording event sink, real rumqttc clients and raw-socket helpers.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use companion_broker::{
    AuthDecision, AuthRequest, Authenticator, BrokerEvent, BrokerHandle, DenyReason, EdgeListeners,
    EventSink, Hooks, MqttSettings,
};
use companion_schema::DeviceId;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// Devices and tokens known to the test authenticator; `disabled` ones are refused.
pub struct StaticAuth {
    pub tokens: HashMap<String, String>,
    pub disabled: HashSet<String>,
}

/// The device whose credentials cannot be checked: the authenticator answers "unavailable".
pub const UNREACHABLE: &str = "unreachable";

#[async_trait::async_trait]
impl Authenticator for StaticAuth {
    async fn authenticate(&self, req: &AuthRequest<'_>) -> AuthDecision {
        if req.username == UNREACHABLE {
            // A registry that did not answer.
            return AuthDecision::Deny(DenyReason::Unavailable);
        }
        let Some(token) = self.tokens.get(req.username) else {
            return AuthDecision::Deny(DenyReason::UnknownDevice);
        };
        if token.as_bytes() != req.password {
            return AuthDecision::Deny(DenyReason::BadToken);
        }
        if self.disabled.contains(req.username) {
            return AuthDecision::Deny(DenyReason::Disabled);
        }
        match DeviceId::parse(req.username) {
            Ok(device) => AuthDecision::Allow { device },
            Err(_) => AuthDecision::Deny(DenyReason::IdentityMismatch),
        }
    }
}

/// Records every event and wakes waiters.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<BrokerEvent>>,
    notify: Notify,
}

impl EventSink for Recorder {
    fn send(&self, event: BrokerEvent) {
        self.events.lock().unwrap().push(event);
        self.notify.notify_waiters();
    }
}

impl Recorder {
    /// Waits (with a deadline) for an event matching `pred` and returns it.
    pub async fn wait_for(&self, pred: impl Fn(&BrokerEvent) -> bool) -> BrokerEvent {
        self.wait_for_within(DEADLINE, pred).await
    }

    pub async fn wait_for_within(
        &self,
        deadline: Duration,
        pred: impl Fn(&BrokerEvent) -> bool,
    ) -> BrokerEvent {
        tokio::time::timeout(deadline, async {
            loop {
                let notified = self.notify.notified();
                if let Some(e) = self.events.lock().unwrap().iter().find(|e| pred(e)) {
                    return e.clone();
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no matching event within {deadline:?}; got {:?}",
                self.events.lock().unwrap()
            )
        })
    }

    /// Waits (with a deadline) until `n` events match `pred`.
    pub async fn wait_count(&self, n: usize, pred: impl Fn(&BrokerEvent) -> bool) {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let notified = self.notify.notified();
                if self
                    .events
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|e| pred(e))
                    .count()
                    >= n
                {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("not {n} matching events; got {:?}", self.all()))
    }

    pub fn all(&self) -> Vec<BrokerEvent> {
        self.events.lock().unwrap().clone()
    }
}

pub struct TestApp {
    pub handle: BrokerHandle,
    pub events: Arc<Recorder>,
    pub plain: SocketAddr,
    pub tls: SocketAddr,
    /// MQTT over WebSocket, plain and over TLS.
    pub ws: SocketAddr,
    pub wss: SocketAddr,
    pub ca_pem: std::path::PathBuf,
    pub registry: prometheus_client::registry::Registry,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    _dir: tempfile::TempDir,
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn test_settings() -> MqttSettings {
    MqttSettings {
        listen: "127.0.0.1:0".into(),
        tls_listen: "127.0.0.1:0".into(),
        ..MqttSettings::default()
    }
}

impl TestApp {
    pub async fn start() -> Self {
        Self::start_with(test_settings()).await
    }

    pub async fn start_with(settings: MqttSettings) -> Self {
        Self::start_with_receipts(settings, None).await
    }

    /// With a hook that holds QoS 1 acknowledgements (see `companion_broker::Receipts`).
    pub async fn start_with_receipts(
        settings: MqttSettings,
        receipts: Option<Arc<dyn companion_broker::Receipts>>,
    ) -> Self {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let material =
            companion_broker::tls::load_or_generate(&settings.tls, dir.path(), &[]).unwrap();
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let wss = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (plain_addr, tls_addr) = (plain.local_addr().unwrap(), tls.local_addr().unwrap());
        let (ws_addr, wss_addr) = (ws.local_addr().unwrap(), wss.local_addr().unwrap());
        let auth = StaticAuth {
            tokens: [("a", "token-a"), ("b", "token-b"), ("off", "token-off")]
                .into_iter()
                .map(|(d, t)| (d.to_owned(), t.to_owned()))
                .collect(),
            disabled: ["off".to_owned()].into_iter().collect(),
        };
        let events = Arc::new(Recorder::default());
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
            Hooks {
                receipts,
                ..Hooks::new(Arc::new(auth), events.clone())
            },
            &mut registry,
            shutdown.clone(),
            &tracker,
        )
        .await
        .unwrap();
        TestApp {
            handle,
            events,
            plain: plain_addr,
            tls: tls_addr,
            ws: ws_addr,
            wss: wss_addr,
            ca_pem: material.ca_pem_path,
            registry,
            shutdown,
            tracker,
            _dir: dir,
        }
    }

    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        let pem = std::fs::read(&self.ca_pem).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// rumqttc 3.1.1 options for a device over TLS (verifying the generated CA).
    pub fn device_tls(&self, id: &str, token: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, "localhost", self.tls.port());
        o.set_credentials(id, token);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(self.client_tls()),
        ));
        o
    }

    /// rumqttc 3.1.1 options for a device over MQTT over WebSocket (`wss` with TLS verifying
    /// the generated CA, else plain `ws`), on the default path `/mqtt`.
    pub fn device_ws(&self, id: &str, token: &str, tls: bool) -> MqttOptions {
        let url = if tls {
            format!("wss://localhost:{}/mqtt", self.wss.port())
        } else {
            format!("ws://127.0.0.1:{}/mqtt", self.ws.port())
        };
        let port = if tls { self.wss.port() } else { self.ws.port() };
        let mut o = MqttOptions::new(id, url, port);
        o.set_credentials(id, token);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_transport(if tls {
            Transport::wss_with_config(rumqttc::TlsConfiguration::Rustls(self.client_tls()))
        } else {
            Transport::Ws
        });
        o
    }

    /// rumqttc 3.1.1 options for a device over plain MQTT.
    pub fn device_plain(&self, id: &str, token: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", self.plain.port());
        o.set_credentials(id, token);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// The backend's view: an in-process client of the router (a local link), subscribed.
    pub async fn backend(&self, name: &str, filters: &[&str]) -> Client {
        let local = self
            .handle
            .local_client(name)
            .await
            .expect("the router takes a local client");
        let client = Client::local(local);
        for f in filters {
            client.subscribe(f).await;
        }
        client
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    /// The value of one sample line (`name{labels}`), or 0.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

/// What a client's event loop saw.
#[derive(Debug)]
pub enum Seen {
    Publish { topic: String, payload: Vec<u8> },
    SubAck,
    Closed(String),
}

/// The sending half of a test client: a rumqttc client (devices) or a local link (backend).
pub enum Conn {
    Mqtt(AsyncClient),
    Local(mpsc::Sender<LocalCmd>),
}

pub enum LocalCmd {
    Publish(String, Vec<u8>, bool),
    Subscribe(String),
}

impl Conn {
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), String> {
        match self {
            Conn::Mqtt(c) => c
                .publish(topic, qos, retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Conn::Local(tx) => tx
                .send(LocalCmd::Publish(topic.into(), payload.into(), retain))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<(), String> {
        match self {
            Conn::Mqtt(c) => c.subscribe(filter, qos).await.map_err(|e| e.to_string()),
            Conn::Local(tx) => tx
                .send(LocalCmd::Subscribe(filter.to_owned()))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    pub async fn disconnect(&self) -> Result<(), String> {
        match self {
            Conn::Mqtt(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Conn::Local(_) => Ok(()),
        }
    }
}

/// A client whose connection is driven by a task; what it receives arrives on `rx`.
pub struct Client {
    pub client: Conn,
    pub rx: mpsc::Receiver<Seen>,
}

impl Client {
    /// A local router client driven by a task.
    pub fn local(mut local: companion_broker::LocalClient) -> Client {
        let (tx, rx) = mpsc::channel(1024);
        let (cmd_tx, mut cmd_rx) = mpsc::channel::<LocalCmd>(64);
        tokio::spawn(async move {
            loop {
                // Cases: a command from the test; something from the router.
                tokio::select! {
                    cmd = cmd_rx.recv() => match cmd {
                        Some(LocalCmd::Publish(t, p, retain)) => local.publish(t, p, retain).await.unwrap(),
                        Some(LocalCmd::Subscribe(f)) => local.subscribe(&[f.as_str()]).await.unwrap(),
                        None => return,
                    },
                    ev = local.next() => {
                        let seen = match ev {
                            Ok(companion_broker::LocalEvent::Publish { topic, payload, .. }) => Seen::Publish {
                                topic: String::from_utf8(topic.to_vec()).unwrap(),
                                payload: payload.to_vec(),
                            },
                            Ok(companion_broker::LocalEvent::SubAck) => Seen::SubAck,
                            Err(e) => Seen::Closed(e.to_string()),
                        };
                        if tx.send(seen).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Client {
            client: Conn::Local(cmd_tx),
            rx,
        }
    }

    /// Connects and waits for the CONNACK; the refusal error otherwise.
    pub async fn connect(opts: MqttOptions) -> Result<Client, rumqttc::ConnectionError> {
        let (client, mut el) = AsyncClient::new(opts, 64);
        tokio::time::timeout(DEADLINE, wait_connack(&mut el))
            .await
            .expect("CONNACK in time")?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(drive(el, tx));
        Ok(Client {
            client: Conn::Mqtt(client),
            rx,
        })
    }

    pub async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
    }

    pub async fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
    }

    /// The next publish (skipping acks), with a deadline.
    pub async fn next_publish(&mut self) -> (String, Vec<u8>) {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.rx.recv().await {
                    Some(Seen::Publish { topic, payload }) => return (topic, payload),
                    Some(Seen::SubAck) => {}
                    Some(Seen::Closed(e)) => panic!("connection closed: {e}"),
                    None => panic!("event loop ended"),
                }
            }
        })
        .await
        .expect("a publish in time")
    }

    pub async fn wait_suback(&mut self) {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.rx.recv().await {
                    Some(Seen::SubAck) => return,
                    Some(Seen::Publish { .. }) => {}
                    other => panic!("no SUBACK: {other:?}"),
                }
            }
        })
        .await
        .expect("SUBACK in time")
    }

    /// Waits until the connection is closed by the server.
    pub async fn wait_closed(&mut self) -> String {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match self.rx.recv().await {
                    Some(Seen::Closed(e)) => return e,
                    None => return "ended".into(),
                    _ => {}
                }
            }
        })
        .await
        .expect("closed in time")
    }
}

async fn wait_connack(el: &mut EventLoop) -> Result<(), rumqttc::ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await? {
            return Ok(());
        }
    }
}

async fn drive(mut el: EventLoop, tx: mpsc::Sender<Seen>) {
    loop {
        let seen = match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish {
                topic: p.topic.clone(),
                payload: p.payload.to_vec(),
            },
            Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Seen::Closed(e.to_string())).await;
                return;
            }
        };
        if tx.send(seen).await.is_err() {
            return;
        }
    }
}

/// A hand-built MQTT 3.1.1 CONNECT (what rumqttc cannot be made to send).
pub fn raw_connect(client_id: &str, user: &str, pass: &str, will_topic: Option<&str>) -> Vec<u8> {
    fn put(b: &mut Vec<u8>, s: &[u8]) {
        b.extend_from_slice(&(s.len() as u16).to_be_bytes());
        b.extend_from_slice(s);
    }
    let mut body = Vec::new();
    put(&mut body, b"MQTT");
    let mut flags = 0b1100_0010u8;
    if will_topic.is_some() {
        flags |= 0b0000_0100;
    }
    body.extend_from_slice(&[4, flags, 0, 30]);
    put(&mut body, client_id.as_bytes());
    if let Some(t) = will_topic {
        put(&mut body, t.as_bytes());
        put(&mut body, b"{\"online\":false}");
    }
    put(&mut body, user.as_bytes());
    put(&mut body, pass.as_bytes());
    let mut out = vec![0x10];
    encode_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

pub fn encode_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Connects a raw socket, sends `connect`, returns the socket and the 4-byte CONNACK.
pub async fn raw_session(addr: SocketAddr, connect: &[u8]) -> (TcpStream, [u8; 4]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(connect).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .unwrap();
    (s, connack)
}

/// Reads until the server closes the socket (with a deadline).
pub async fn wait_eof(s: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("server closes the socket");
}
