//! Start-up and shutdown of `companion serve`: everything `main` does after parsing
//! arguments, in a form tests call with port-0 listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use companion_broker::{BrokerHandle, EdgeListeners};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::bus::{Bus, BusMetrics};
use crate::context::{ApiContext, MqttInfo};
use crate::db::Db;
use crate::devices::telemetry::{self, Batcher};
use crate::devices::{DeviceMetrics, Dispatcher, Runtime, SessionLimits};
use crate::metrics::HttpMetrics;
use crate::mqtt_auth::{self, ChannelSink, PresenceMetrics, RegistryAuthenticator};
use crate::personas::PersonaSet;
use crate::ratelimit::KeyedLimiter;
use crate::registry::admin::JWT_LIFETIME;
use crate::registry::{AdminAuth, DeviceStore, EnrollmentStore};
use crate::rules::store::{RuleMetrics, RuleStore};
use crate::secrets::{self, TokenSource};
use crate::settings::{Secret, Settings};

/// How long shutdown waits for tasks before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// The sockets the server serves on, bound before [`App::build`] so tests can use port 0.
pub struct Listeners {
    pub http: TcpListener,
    /// Plain MQTT (development); `None` when disabled.
    pub mqtt: Option<TcpListener>,
    /// MQTT over TLS; `None` when disabled.
    pub mqtts: Option<TcpListener>,
    /// MQTT over WebSocket, plain and over TLS; `None` when disabled.
    pub ws: Option<TcpListener>,
    pub wss: Option<TcpListener>,
}

async fn bind_optional(key: &str, addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => Ok(Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {key} {addr}"))?,
        )),
        None => Ok(None),
    }
}

impl Listeners {
    /// Binds the addresses from the settings.
    pub async fn bind(settings: &Settings) -> anyhow::Result<Self> {
        let http_addr = settings.http_addr()?;
        let http = TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("binding http.listen {http_addr}"))?;
        let mqtt = bind_optional("mqtt.listen", settings.mqtt_addr()?).await?;
        let mqtts = bind_optional("mqtt.tls_listen", settings.mqtts_addr()?).await?;
        let ws = bind_optional("mqtt.ws_listen", settings.ws_addr()?).await?;
        let wss = bind_optional("mqtt.wss_listen", settings.wss_addr()?).await?;
        Ok(Self {
            http,
            mqtt,
            mqtts,
            ws,
            wss,
        })
    }

    /// Binds every listener on 127.0.0.1 port 0.
    pub async fn ephemeral() -> std::io::Result<Self> {
        Ok(Self {
            http: TcpListener::bind("127.0.0.1:0").await?,
            mqtt: Some(TcpListener::bind("127.0.0.1:0").await?),
            mqtts: Some(TcpListener::bind("127.0.0.1:0").await?),
            ws: Some(TcpListener::bind("127.0.0.1:0").await?),
            wss: Some(TcpListener::bind("127.0.0.1:0").await?),
        })
    }
}

/// The real addresses the server listens on.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub http: SocketAddr,
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
}

impl std::fmt::Display for BoundAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        write!(
            f,
            "http={} mqtt={} mqtts={} ws={} wss={}",
            self.http,
            show(self.mqtt),
            show(self.mqtts),
            show(self.ws),
            show(self.wss)
        )
    }
}

/// A running server's parts that tests and callers may use.
pub struct App {
    settings: Settings,
    db: Db,
    admin_token: Secret,
    addrs: BoundAddrs,
    ctx: Arc<ApiContext>,
    broker: Option<BrokerHandle>,
    http_listener: TcpListener,
    http_tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    ca_pem: Option<std::path::PathBuf>,
    /// This server's claim on the data directory, released when it stops.
    _lock: crate::datadir::DataDirLock,
}

impl App {
    /// Connects and migrates the database, prepares secrets and metrics, starts the broker
    /// and the background tasks (they stop when `shutdown` is cancelled). HTTP is served by
    /// [`App::run`].
    pub async fn build(
        settings: Settings,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let addr = |l: &Option<TcpListener>| l.as_ref().map(|l| l.local_addr()).transpose();
        let addrs = BoundAddrs {
            http: listeners.http.local_addr()?,
            mqtt: addr(&listeners.mqtt)?,
            mqtts: addr(&listeners.mqtts)?,
            ws: addr(&listeners.ws)?,
            wss: addr(&listeners.wss)?,
        };
        let lock = crate::datadir::lock(&settings.data_dir)?;
        let db = Db::connect(&settings).await?;
        db.migrate().await?;
        let (admin_token, source) = secrets::bootstrap_admin_token(&settings)?;
        match &source {
            TokenSource::Configured => tracing::info!("bootstrap admin token from admin.token"),
            TokenSource::Generated(path) => tracing::info!(
                path = %path.display(),
                "generated the bootstrap admin token; read it from this file"
            ),
            TokenSource::Existing(path) => {
                tracing::info!(path = %path.display(), "bootstrap admin token")
            }
        }
        let jwt_secret = secrets::jwt_secret(&settings)?;

        let mut registry = Registry::default();
        db.register_metrics(&mut registry);
        let http_metrics = HttpMetrics::register(&mut registry);
        let presence_metrics = PresenceMetrics::register(&mut registry);

        let tls = if listeners.mqtts.is_some() || listeners.wss.is_some() || settings.http.tls {
            Some(
                companion_broker::tls::load_or_generate(
                    &settings.mqtt.tls,
                    &settings.data_dir,
                    &settings.mqtt.hosts,
                )
                .context("preparing TLS material")?,
            )
        } else {
            None
        };
        let personas = Arc::new(
            PersonaSet::load(settings.personas.dir.as_deref(), &settings.personas.default)
                .context("loading personas")?,
        );
        let rules =
            RuleStore::open(&settings.rules_path(), personas.clone()).context("loading rules")?;
        let rule_metrics = RuleMetrics::register(&mut registry);
        rules.attach_metrics(rule_metrics.clone());
        let device_metrics = DeviceMetrics::register(&mut registry);
        device_metrics.prime(&personas);
        let bus_metrics = BusMetrics::register(&mut registry);
        let voice: Arc<dyn crate::voice::VoicePipeline> =
            crate::voice::Pipeline::new(&settings.voice, &mut registry)
                .context("starting the voice pipeline")?;

        let tracker = TaskTracker::new();
        let devices = DeviceStore::new(db.clone());
        let audit = AuditLog::new(db.clone());
        audit.register(&mut registry);
        let authenticator = RegistryAuthenticator::new(devices.clone());
        let (sink, events) = ChannelSink::new(presence_metrics.clone());
        // Telemetry is acknowledged to a device once stored (the batcher holds the PUBACK).
        let telemetry = Arc::new(Batcher::default());
        telemetry.register(&mut registry);
        let hook = Arc::new(crate::mqtt_hook::Hook::new(
            devices.clone(),
            audit.clone(),
            crate::login_digest::LoginDigest::new(
                Duration::from_secs(settings.mqtt.auth_failure_window_s),
                settings.mqtt.max_tracked_addresses,
            ),
        ));
        tracker.spawn(hook.clone().run_digest(shutdown.clone()));
        hook.register(&mut registry);
        let upstream = crate::bus::Target::upstream(&settings.mqtt).map_err(|e| {
            crate::settings::SettingsError::Invalid {
                key: "mqtt.upstream",
                message: e.to_string(),
            }
        })?;
        // With an external broker the embedded one does not run; its listeners are closed, and
        // presence follows the devices' status messages instead of the edge's events.
        let status_sink = upstream.is_some().then(|| sink.clone());
        let (broker, publisher, connection): (
            Option<BrokerHandle>,
            Box<dyn crate::bus::Publisher>,
            Box<dyn crate::bus::Connection>,
        ) = match upstream {
            Some(target) => {
                tracing::info!(upstream = %settings.mqtt.upstream, "using an external MQTT broker; the embedded broker is off");
                drop(listeners.mqtt);
                drop(listeners.mqtts);
                let (publisher, connection) = crate::bus::upstream::connect(&target);
                (None, Box::new(publisher), Box::new(connection))
            }
            None => {
                let broker = companion_broker::start(
                    &settings.mqtt,
                    tls.as_ref().map(|t| t.server_config.clone()),
                    EdgeListeners {
                        plain: listeners.mqtt,
                        tls: listeners.mqtts,
                        ws: listeners.ws,
                        wss: listeners.wss,
                    },
                    companion_broker::Hooks::new(authenticator.clone(), sink)
                        .with_receipts(telemetry.clone()),
                    &mut registry,
                    shutdown.clone(),
                    &tracker,
                )
                .await
                .context("starting the broker")?;
                let (publisher, connection) = crate::bus::local::connect(broker.clone());
                (Some(broker), Box::new(publisher), Box::new(connection))
            }
        };

        let cluster = settings.cluster.enabled.then(|| crate::cluster::Config {
            replica: settings.cluster.replica(),
            lease: Duration::from_millis(settings.cluster.lease_ms),
            heartbeat: Duration::from_millis(settings.cluster.heartbeat_ms),
            shadow_per_device: settings.cluster.shadow_per_device,
        });
        // The backend's own connection to the broker, and the device runtime behind it.
        let bus = Bus::new(publisher, bus_metrics);
        let runtime = Arc::new(Runtime {
            db: db.clone(),
            bus: bus.clone(),
            personas: personas.clone(),
            rules: rules.clone(),
            rule_metrics,
            metrics: device_metrics,
            voice,
            audit: audit.clone(),
            telemetry: telemetry.clone(),
            limits: SessionLimits {
                max_listen: Duration::from_millis(settings.sessions.max_listen_ms),
                watchdog: Duration::from_millis(settings.sessions.watchdog_ms),
                history: settings.sessions.history,
            },
            changes: cluster
                .as_ref()
                .map(|c| crate::cluster::Changes::new(db.clone(), c.replica.clone())),
        });
        let dispatcher = Dispatcher::new(runtime, tracker.clone(), shutdown.clone());
        let mut inbox: Box<dyn crate::bus::Inbox> = match &status_sink {
            Some(sink) => Box::new(mqtt_auth::StatusPresence::new(
                dispatcher.clone(),
                sink.clone(),
                db.clone(),
            )),
            None => Box::new(dispatcher.clone()),
        };
        if let Some(config) = cluster {
            rules.share(db.clone()).await;
            tracing::info!(replica = %config.replica, "cluster mode: handling the events of the devices this replica owns");
            let reload: Arc<dyn crate::cluster::Reload> = Arc::new(dispatcher.clone());
            tracker.spawn(crate::cluster::listen(
                settings.database_url().expose().to_owned(),
                config.replica.clone(),
                reload.clone(),
                shutdown.clone(),
            ));
            let ownership =
                crate::cluster::Ownership::new(config, db.clone(), inbox, reload, &mut registry);
            tracker.spawn(ownership.clone().run(shutdown.clone()));
            inbox = Box::new(ownership);
        }
        tracker.spawn(crate::bus::run(bus, connection, inbox, shutdown.clone()));
        tracker.spawn(telemetry::run_writer(
            telemetry,
            db.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(crate::rules::store::watch(rules.clone(), shutdown.clone()));
        tracker.spawn(audit.clone().run_retries(shutdown.clone()));
        tracker.spawn(mqtt_auth::write_events(
            events,
            db.clone(),
            audit.clone(),
            Some(dispatcher.clone()),
            presence_metrics,
            crate::login_digest::LoginDigest::new(
                Duration::from_secs(settings.mqtt.auth_failure_window_s),
                settings.mqtt.max_tracked_addresses,
            ),
            shutdown.clone(),
        ));

        let mqtt = MqttInfo {
            host: settings
                .mqtt
                .hosts
                .first()
                .cloned()
                .unwrap_or_else(|| "localhost".into()),
            port: addrs.mqtts.or(addrs.mqtt).map_or(8883, |a| a.port()),
            tls: addrs.mqtts.is_some(),
        };
        let http_tls = if settings.http.tls {
            tls.as_ref()
                .map(|t| tokio_rustls::TlsAcceptor::from(t.server_config.clone()))
        } else {
            None
        };
        let broker_api = crate::broker_api::BrokerApi::new(&settings.mqtt_hook)
            .map_err(|e| crate::settings::SettingsError::Invalid {
                key: "mqtt_hook.broker_api",
                message: e.to_string(),
            })?
            .map(Arc::new);
        let ctx = Arc::new(ApiContext {
            db: db.clone(),
            devices,
            enrollments: EnrollmentStore::new(db.clone()),
            admin: AdminAuth::new(db.clone(), &admin_token, &jwt_secret),
            audit,
            authenticator,
            broker: broker.clone(),
            mqtt,
            registry: Arc::new(registry),
            http_metrics,
            limiter: KeyedLimiter::per_minute(settings.http.rate_limit_per_minute),
            enroll_failures: KeyedLimiter::per_minute(settings.http.enroll_failures_per_minute),
            trusted_proxies: settings.http.trusted_proxies.clone(),
            jwt_lifetime: JWT_LIFETIME,
            personas,
            rules,
            dispatcher,
            hook,
            hook_settings: settings.mqtt_hook.clone(),
            hook_limiter: KeyedLimiter::per_minute(settings.mqtt_hook.requests_per_minute),
            broker_api,
            external_broker: status_sink.is_some(),
        });
        Ok(Self {
            ca_pem: tls.map(|t| t.ca_pem_path),
            _lock: lock,
            settings,
            db,
            admin_token,
            addrs,
            ctx,
            broker,
            http_listener: listeners.http,
            http_tls,
            shutdown,
            tracker,
        })
    }

    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn admin_token(&self) -> &Secret {
        &self.admin_token
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The embedded broker (`None` with an external `mqtt.upstream`).
    pub fn broker(&self) -> Option<&BrokerHandle> {
        self.broker.as_ref()
    }

    pub fn context(&self) -> &Arc<ApiContext> {
        &self.ctx
    }

    /// The CA devices must trust (the generated development CA, or the configured cert).
    pub fn ca_pem_path(&self) -> Option<&std::path::Path> {
        self.ca_pem.as_deref()
    }

    /// Serves HTTP until the shutdown token is cancelled, then stops every task within the
    /// grace period.
    pub async fn run(self) -> anyhow::Result<()> {
        let routes = crate::api::routes(&self.ctx);
        self.tracker.spawn(crate::http::server::serve(
            routes,
            self.http_listener,
            self.http_tls,
            self.ctx.trusted_proxies.clone(),
            self.shutdown.clone(),
            self.tracker.clone(),
        ));
        tracing::info!("listening {}", self.addrs);

        self.shutdown.cancelled().await;
        tracing::info!("shutting down");
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "some tasks did not stop in time"
            );
        }
        drop(self.ctx);
        self.db.close().await;
        Ok(())
    }
}

/// Builds and runs the server: what `companion serve` does.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    App::build(settings, listeners, shutdown).await?.run().await
}
