//! Start-up and shutdown of `companion serve`: everything `main` does after parsing
//! arguments, in a form tests call with port-0 listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::Db;
use crate::http::{self, HttpState};
use crate::metrics::HttpMetrics;
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
}

impl Listeners {
    /// Binds the addresses from the settings.
    pub async fn bind(settings: &Settings) -> anyhow::Result<Self> {
        let http_addr = settings.http_addr()?;
        let http = TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("binding http.listen {http_addr}"))?;
        let mqtt = match settings.mqtt_addr()? {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding mqtt.listen {addr}"))?,
            ),
            None => None,
        };
        let mqtts = match settings.mqtts_addr()? {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding mqtt.tls_listen {addr}"))?,
            ),
            None => None,
        };
        Ok(Self { http, mqtt, mqtts })
    }

    /// Binds every listener on 127.0.0.1 port 0.
    pub async fn ephemeral() -> std::io::Result<Self> {
        Ok(Self {
            http: TcpListener::bind("127.0.0.1:0").await?,
            mqtt: Some(TcpListener::bind("127.0.0.1:0").await?),
            mqtts: Some(TcpListener::bind("127.0.0.1:0").await?),
        })
    }
}

/// The real addresses the server listens on.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub http: SocketAddr,
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
}

impl std::fmt::Display for BoundAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        write!(
            f,
            "http={} mqtt={} mqtts={}",
            self.http,
            show(self.mqtt),
            show(self.mqtts)
        )
    }
}

/// A built, not yet running, server.
pub struct App {
    settings: Settings,
    db: Db,
    admin_token: Secret,
    addrs: BoundAddrs,
    listeners: Listeners,
    registry: Registry,
    http_metrics: Arc<HttpMetrics>,
}

impl App {
    /// Connects and migrates the database, prepares secrets and metrics. Binds nothing new.
    pub async fn build(settings: Settings, listeners: Listeners) -> anyhow::Result<Self> {
        let addrs = BoundAddrs {
            http: listeners.http.local_addr()?,
            mqtt: listeners
                .mqtt
                .as_ref()
                .map(|l| l.local_addr())
                .transpose()?,
            mqtts: listeners
                .mqtts
                .as_ref()
                .map(|l| l.local_addr())
                .transpose()?,
        };
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
        let mut registry = Registry::default();
        let http_metrics = HttpMetrics::register(&mut registry);
        Ok(Self {
            settings,
            db,
            admin_token,
            addrs,
            listeners,
            registry,
            http_metrics,
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

    /// Serves until `shutdown` is cancelled, then stops every task within the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let registry = Arc::new(self.registry);
        let state = HttpState {
            db: self.db.clone(),
            registry,
            metrics: self.http_metrics,
            ready_checks: Vec::new(),
        };
        let routes = http::routes(state);
        let http_shutdown = shutdown.clone();
        tracker.spawn(
            warp::serve(routes)
                .incoming(self.listeners.http)
                .graceful(async move { http_shutdown.cancelled().await })
                .run(),
        );
        tracing::info!("listening {}", self.addrs);

        shutdown.cancelled().await;
        tracing::info!("shutting down");
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "some tasks did not stop in time"
            );
        }
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
    App::build(settings, listeners).await?.run(shutdown).await
}
