//! An in-process server on port 0 (the same `App::build`/`run` as `main`), with real HTTP and
//! real MQTT clients for tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use companion_backend::app::{App, Listeners};
use companion_backend::settings::{Secret, Settings};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub mqtts: SocketAddr,
    /// MQTT over WebSocket, plain and over TLS (path `/mqtt`).
    pub ws: SocketAddr,
    pub wss: SocketAddr,
    pub admin_token: String,
    pub ca_pem: std::path::PathBuf,
    pub app_ctx: Arc<companion_backend::context::ApiContext>,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub done: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub settings: Settings,
    pub dir: Arc<tempfile::TempDir>,
}

impl TestApp {
    /// Starts a server on `kind`, or `None` when PostgreSQL is not available outside CI.
    pub async fn start(kind: DbKind) -> Option<Self> {
        Self::start_with(kind, |_| {}).await
    }

    pub async fn start_with(kind: DbKind, tweak: impl FnOnce(&mut Settings)) -> Option<Self> {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let mut settings = Settings {
            data_dir: dir.path().join("data"),
            ..Settings::default()
        };
        settings.http.listen = "127.0.0.1:0".into();
        settings.mqtt.listen = "127.0.0.1:0".into();
        settings.mqtt.tls_listen = "127.0.0.1:0".into();
        // Hermetic voice: offline engines unless a test points a provider at a fake server
        // (never a real cloud provider, whatever keys the environment holds).
        {
            use companion_backend::voice::settings::{LlmChoice, SttChoice, TtsChoice};
            settings.voice.llm_provider = LlmChoice::Offline;
            settings.voice.stt_provider = SttChoice::Offline;
            settings.voice.tts_provider = TtsChoice::Offline;
        }
        if kind == DbKind::Postgres {
            settings.database.url = Some(Secret::new(super::fresh_pg_database().await?));
        }
        tweak(&mut settings);
        Some(Self::start_settings(settings, dir).await)
    }

    /// Starts (or restarts) a server with exactly these settings.
    pub async fn start_settings(settings: Settings, dir: Arc<tempfile::TempDir>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let listeners = Listeners::ephemeral().await.unwrap();
        let shutdown = CancellationToken::new();
        let app = App::build(settings.clone(), listeners, shutdown.clone())
            .await
            .expect("server builds");
        let addrs = app.addrs();
        let admin_token = app.admin_token().expose().to_owned();
        let ca_pem = app.ca_pem_path().expect("TLS material").to_owned();
        let app_ctx = app.context().clone();
        let done = tokio::spawn(app.run());
        Self {
            http: addrs.http,
            mqtt: addrs.mqtt.expect("plain mqtt"),
            mqtts: addrs.mqtts.expect("mqtts"),
            ws: addrs.ws.expect("ws"),
            wss: addrs.wss.expect("wss"),
            admin_token,
            ca_pem,
            app_ctx,
            client: reqwest::Client::new(),
            shutdown,
            done,
            settings,
            dir,
        }
    }

    pub async fn stop(self) -> (Settings, Arc<tempfile::TempDir>) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.done).await;
        (self.settings, self.dir)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// An admin request.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&self.admin_token)
    }

    /// Registers a device; returns (device_id, token).
    pub async fn register(&self, name: &str) -> (String, String) {
        let resp = self
            .admin(reqwest::Method::POST, "/api/v1/devices")
            .json(&json!({ "name": name, "device_type": "simulated", "capabilities": ["leds", "buttons"] }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let body: Value = resp.json().await.unwrap();
        (
            body["device_id"].as_str().unwrap().to_owned(),
            body["auth_token"].as_str().unwrap().to_owned(),
        )
    }

    /// Polls `GET /api/v1/devices/{id}` until `pred` holds (presence is written by a
    /// background task) and returns that answer.
    pub async fn wait_device(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let got: Value = self
                .admin(reqwest::Method::GET, &format!("/api/v1/devices/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if pred(&got) {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the device never got there: {got}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Audit rows for `action` (newest first).
    pub async fn audit(&self, action: &str) -> Vec<Value> {
        let resp = self
            .admin(
                reqwest::Method::GET,
                &format!("/api/v1/audit?action={action}&limit=1000"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        body["entries"].as_array().unwrap().clone()
    }

    /// Waits until an audit row for `action` matches `pred`.
    pub async fn wait_audit(&self, action: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(row) = self.audit(action).await.into_iter().find(|r| pred(r)) {
                return row;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no audit row for {action}: {:?}",
                self.audit(action).await
            );
            // Audit rows are written by a background task; poll the API until the deadline.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        super::client_tls_config(&self.ca_pem)
    }

    /// rumqttc 3.1.1 options for a device over TLS, verifying the generated CA.
    pub fn device_tls(&self, id: &str, token: &str) -> MqttOptions {
        super::device_tls_options(&self.ca_pem, self.mqtts.port(), id, token)
    }
}

/// What a client's event loop saw.
#[derive(Debug)]
pub enum Seen {
    Publish {
        topic: String,
        payload: Vec<u8>,
    },
    SubAck,
    /// A QoS 1 publish of ours was acknowledged (its packet id).
    PubAck(u16),
    Closed(String),
}

/// A rumqttc 3.1.1 client whose event loop runs in a task.
pub struct Client {
    pub client: AsyncClient,
    pub rx: mpsc::Receiver<Seen>,
}

impl Client {
    /// Connects and waits for the CONNACK; the refusal error otherwise.
    pub async fn connect(opts: MqttOptions) -> Result<Client, rumqttc::ConnectionError> {
        let (client, mut el) = AsyncClient::new(opts, 64);
        tokio::time::timeout(DEADLINE, wait_connack(&mut el))
            .await
            .expect("CONNACK in time")?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(drive(el, tx));
        Ok(Client { client, rx })
    }

    /// Presses the persona button until the backend answers on the persona topic (its
    /// subscriptions on an external broker may still be on their way).
    pub async fn press_until_persona(
        &mut self,
        device: &companion_schema::DeviceId,
        limit: Duration,
    ) -> companion_schema::PersonaState {
        use companion_schema::*;
        let persona_topic = Topic::new(device.clone(), TopicKind::Persona).to_string();
        let mut seq = 0;
        tokio::time::timeout(limit, async {
            loop {
                seq += 1;
                let press = ButtonEvent {
                    v: 1,
                    seq,
                    ts_ms: 0,
                    button: "persona".into(),
                    action: ButtonAction::Press,
                };
                self.client
                    .publish(
                        Topic::new(device.clone(), TopicKind::Button).to_string(),
                        QoS::AtLeastOnce,
                        false,
                        encode(&press).unwrap(),
                    )
                    .await
                    .unwrap();
                let answer = tokio::time::timeout(Duration::from_millis(500), async {
                    loop {
                        match self.rx.recv().await {
                            Some(Seen::Publish { topic, payload }) if topic == persona_topic => {
                                return decode::<PersonaState>(&payload).unwrap()
                            }
                            Some(Seen::Closed(e)) => panic!("closed: {e}"),
                            None => panic!("ended"),
                            _ => {}
                        }
                    }
                })
                .await;
                if let Ok(state) = answer {
                    return state;
                }
            }
        })
        .await
        .expect("the backend answers the persona button")
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

    /// Waits until the connection is closed by the server; returns how long it took.
    pub async fn wait_closed_within(&mut self, limit: Duration) -> String {
        tokio::time::timeout(limit, async {
            loop {
                match self.rx.recv().await {
                    Some(Seen::Closed(e)) => return e,
                    None => return "ended".into(),
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("connection not closed within {limit:?}"))
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
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                // Never stalls the event loop of a test that does not read them.
                let _ = tx.try_send(Seen::PubAck(ack.pkid));
                continue;
            }
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

/// Runs `$body` (an async fn taking a `DbKind`) as two tests, on SQLite and PostgreSQL.
#[macro_export]
macro_rules! on_both_databases {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                super::$name($crate::common::app::DbKind::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_postgres() {
                super::$name($crate::common::app::DbKind::Postgres).await;
            }
        }
    };
}
