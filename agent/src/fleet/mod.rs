//! `companion-agent fleet`: N simulated devices in one process, the project's load tool.
//!
//! Each device has two tasks: one owns its rumqttc event loop (acks, incoming messages), one
//! drives it (telemetry every T, a persona button press now and then, and for the first K
//! devices push-to-talk sessions streaming Opus). Counting is honest: "acked" means the broker
//! returned a PUBACK, "received" means the message came back over MQTT; latencies are measured
//! on this host's clock. With `--observe-*` (a client allowed on `devices/+/telemetry`, e.g.
//! the broker's internal endpoint in a local run) telemetry arrivals and ingest latency are
//! counted on the receiving side as well.
//!
//! Churn, for soak runs: with `--reconnect-every-s` each device disconnects cleanly about that
//! often and reconnects at once; with `--reload-credentials-s` the credentials file is read
//! again that often, and a device whose token changed there (rotated or re-registered by
//! whoever drives the run) uses the new one from its next connection attempt. A device whose
//! token is refused keeps retrying with backoff until the file gives it a working one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use companion_schema::DeviceId;
use rumqttc::{AsyncClient, MqttOptions};
use tokio_util::sync::CancellationToken;

use crate::config::BrokerUrl;
use crate::link::tls_config;
use device::{drive, event_loop, observe, DevState, Device};

mod device;
mod stats;

pub use stats::{report, FleetStats};

/// Requests buffered per simulated device.
pub const DEVICE_REQUEST_CAPACITY: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Number of simulated devices (at most the lines in the credentials file).
    #[arg(long)]
    pub devices: usize,
    #[arg(long, default_value_t = 1000)]
    pub telemetry_interval_ms: u64,
    /// Devices that also run push-to-talk sessions.
    #[arg(long, default_value_t = 0)]
    pub talkers: usize,
    /// Seconds to run after the ramp.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// `device_id,token` per line.
    #[arg(long)]
    pub credentials: PathBuf,
    #[arg(long, env = "CONTROL_PLANE_URL")]
    pub url: String,
    #[arg(long, env = "CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Seconds between persona button presses per device (0: never).
    #[arg(long, default_value_t = 10)]
    pub persona_every_s: u64,
    /// Seconds over which devices connect.
    #[arg(long, default_value_t = 2)]
    pub ramp_s: u64,
    /// Seconds of speech per talk session.
    #[arg(long, default_value_t = 2)]
    pub talk_s: u64,
    /// An observer allowed to subscribe to `devices/+/telemetry` (plain MQTT, loopback).
    #[arg(long)]
    pub observe_addr: Option<String>,
    #[arg(long)]
    pub observe_user: Option<String>,
    #[arg(long)]
    pub observe_pass: Option<String>,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Seconds between a device's own clean disconnect-and-reconnect, on average (0: never).
    /// The device first waits for the acknowledgements of what it has in flight.
    #[arg(long, default_value_t = 0)]
    pub reconnect_every_s: u64,
    /// Seconds between readings of the credentials file for changed tokens (0: read once).
    #[arg(long, default_value_t = 0)]
    pub reload_credentials_s: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `device_id,token`")]
    Line { path: PathBuf, line: usize },
    #[error("--devices {want} but the credentials file has {have}")]
    TooFew { want: usize, have: usize },
    #[error("--url: {0}")]
    Url(String),
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
}

/// Reads `device_id,token` lines (blank lines and `#` comments skipped).
pub fn read_credentials(path: &PathBuf) -> Result<Vec<(DeviceId, String)>, FleetError> {
    let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || FleetError::Line {
            path: path.clone(),
            line: i + 1,
        };
        let (id, token) = line.split_once(',').ok_or_else(bad)?;
        let id = DeviceId::parse(id.trim()).map_err(|_| bad())?;
        out.push((id, token.trim().to_owned()));
    }
    Ok(out)
}

/// Runs the fleet and returns the printed report.
pub async fn run(args: FleetArgs) -> anyhow::Result<String> {
    let stats = Arc::new(FleetStats::default());
    let report = run_with(args, stats.clone()).await?;
    Ok(report)
}

/// Runs the fleet, filling `stats`; returns the report.
pub async fn run_with(args: FleetArgs, stats: Arc<FleetStats>) -> Result<String, FleetError> {
    let creds = read_credentials(&args.credentials)?;
    if creds.len() < args.devices {
        return Err(FleetError::TooFew {
            want: args.devices,
            have: creds.len(),
        });
    }
    let url = BrokerUrl::parse(&args.url).map_err(FleetError::Url)?;
    let tls = match (&url.tls, &args.ca_cert) {
        (true, Some(ca)) => Some(tls_config(ca)?),
        (true, None) => return Err(FleetError::Url("mqtts:// and wss:// need --ca-cert".into())),
        _ => None,
    };
    let shutdown = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    // The observer stops after the devices, so it sees their last messages.
    let observer_stop = CancellationToken::new();
    let observer = match (&args.observe_addr, &args.observe_user, &args.observe_pass) {
        (Some(addr), Some(user), Some(pass)) => Some(tokio::spawn(observe(
            addr.clone(),
            user.clone(),
            pass.clone(),
            stats.clone(),
            observer_stop.clone(),
        ))),
        _ => None,
    };
    let ramp = Duration::from_secs(args.ramp_s);
    let start = tokio::time::Instant::now();
    let mut devices = HashMap::new();
    for (i, (id, token)) in creds.into_iter().take(args.devices).enumerate() {
        let mut o = MqttOptions::new(id.as_str(), url.broker_addr(), url.port);
        o.set_credentials(id.as_str(), token.clone());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o.set_transport(crate::link::transport(&url, tls.clone()));
        let (client, mut el) = AsyncClient::new(o, DEVICE_REQUEST_CAPACITY);
        el.set_network_options(crate::link::network_options());
        let dev = Arc::new(Device {
            id,
            client,
            state: Arc::new(Mutex::new(DevState::default())),
            stats: stats.clone(),
            ready: tokio::sync::Notify::new(),
            token: Mutex::new(token),
            token_changed: tokio::sync::Notify::new(),
        });
        devices.insert(dev.id.clone(), dev.clone());
        let at = start + ramp.mul_f64(i as f64 / args.devices.max(1) as f64);
        let talker = i < args.talkers;
        tracker.spawn(event_loop(dev.clone(), el, shutdown.clone(), at));
        tracker.spawn(drive(dev, args.clone(), talker, shutdown.clone(), at));
    }
    if args.reload_credentials_s > 0 {
        tracker.spawn(reload_credentials(
            args.credentials.clone(),
            Duration::from_secs(args.reload_credentials_s),
            devices,
            stats.clone(),
            shutdown.clone(),
        ));
    }
    tracker.close();
    let total = ramp + Duration::from_secs(args.duration);
    let bar = (!args.quiet).then(|| {
        let b = indicatif::ProgressBar::new(total.as_secs());
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len}s {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let end = start + total;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500).min(end - tokio::time::Instant::now())).await;
        if let Some(b) = &bar {
            b.set_position(start.elapsed().as_secs());
            b.set_message(format!(
                "connected {} telemetry {}/{} persona {} errors {}",
                stats.connected.load(Ordering::Relaxed)
                    - stats.disconnected.load(Ordering::Relaxed),
                stats.telemetry_acked.load(Ordering::Relaxed),
                stats.telemetry_sent.load(Ordering::Relaxed),
                stats.persona_received.load(Ordering::Relaxed),
                stats.connect_errors.load(Ordering::Relaxed)
                    + stats.publish_errors.load(Ordering::Relaxed),
            ));
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // Let the acknowledgements of the last messages come in before counting.
    let elapsed = start.elapsed();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    if let Some(o) = observer {
        let expected = stats.telemetry_acked.load(Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while stats.telemetry_observed.load(Ordering::Relaxed) < expected {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        observer_stop.cancel();
        let _ = o.await;
    }
    Ok(report(&args, &stats, elapsed))
}

/// Reads the credentials file every `period` and hands each device whose token changed the
/// new one (used from its next connection attempt).
async fn reload_credentials(
    path: PathBuf,
    period: Duration,
    devices: HashMap<DeviceId, Arc<Device>>,
    stats: Arc<FleetStats>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        // Cases: shutdown; time to read the file again.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let creds = match read_credentials(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading the credentials again failed; keeping the tokens");
                continue;
            }
        };
        for (id, token) in creds {
            if let Some(dev) = devices.get(&id) {
                if dev.set_token(token) {
                    stats.tokens_reloaded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
