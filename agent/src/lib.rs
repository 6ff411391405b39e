//! `companion-agent`: the device agent.
//!
//! Tasks (all on one tokio runtime, stopped by one `CancellationToken`, tracked by a
//! `TaskTracker`) and the channels between them:
//!
//! ```text
//!  buttons (GPIO thread | stdin | socket) --ButtonInput--> controller --QoS0 audio, QoS1 session--> Uplink
//!  audio-capture thread --Opus frames--> controller --chunks--> audio-playback thread
//!  link task (owns rumqttc's EventLoop) --Inbound--> controller
//!  link task --PubAck'd outbox ids--> pump
//!  telemetry task, controller --Durable--> pump (owns the on-disk Outbox) --QoS1--> Uplink
//! ```
//!
//! - [`link`]: the one task that owns the MQTT event loop (TLS, Will, backoff with jitter) and
//!   [`link::Uplink`], the handle everyone publishes through.
//! - [`pump`] + [`outbox`]: the offline buffer; every telemetry and button message goes to disk
//!   first and leaves it when acknowledged.
//! - [`controller`]: push-to-talk, reply playback, LEDs, config.
//! - [`telemetry`]: `/proc` and `/sys` readings every `telemetry_interval_s`.
//! - [`hw`] and [`audio`]: hardware traits with Pi (ALSA, rppal) and simulated implementations;
//!   blocking work on named threads.
//! - [`talk`] and [`fleet`]: the tools for people.

pub mod audio;
pub mod backoff;
pub mod config;
pub mod controller;
pub mod fleet;
pub mod hw;
pub mod link;
pub mod outbox;
pub mod pump;
pub mod talk;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use companion_schema::DeviceConfig;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use config::Settings;
use controller::{Controller, Observed};
use hw::{AudioIn, AudioOut, Buttons, Leds, BUTTON_CAPACITY};

/// How long shutdown waits for tasks.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The hardware the agent runs on.
pub struct Hardware {
    pub audio_in: Arc<dyn AudioIn>,
    pub audio_out: Arc<dyn AudioOut>,
    pub buttons: Box<dyn Buttons>,
    pub leds: Box<dyn Leds>,
}

/// Knobs for tests and tools that are not device settings.
#[derive(Default)]
pub struct RunOptions {
    pub telemetry_interval: Option<Duration>,
    pub observer: Option<mpsc::Sender<Observed>>,
    pub telemetry_sources: Option<telemetry::Sources>,
}

/// Runs the agent until `shutdown`; then publishes offline, disconnects and returns.
pub async fn run(
    settings: Settings,
    hardware: Hardware,
    options: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let (uplink, link_task, outputs) = link::build(&settings).context("setting up MQTT")?;
    let outbox = outbox::Outbox::open(
        &settings.cache_dir.join("outbox"),
        settings.offline_buffer_bytes,
    )
    .context("opening the offline buffer")?;
    if !outbox.is_empty() {
        tracing::info!(
            buffered = outbox.len(),
            "offline buffer holds messages from before"
        );
    }
    let telemetry_seq = telemetry::SeqStore::open(settings.cache_dir.join("telemetry.seq"))
        .context("opening the telemetry seq")?;
    let button_seq = telemetry::SeqStore::open(settings.cache_dir.join("button.seq"))
        .context("opening the button seq")?;

    let (durable_tx, durable_rx) = mpsc::channel(pump::DURABLE_CAPACITY);
    let (buttons_tx, buttons_rx) = mpsc::channel(BUTTON_CAPACITY);
    let (config_tx, config_rx) = watch::channel(DeviceConfig::default());
    let pump_stats = Arc::new(pump::PumpStats::default());

    // The link task outlives the others so that the offline status goes out last.
    let link_shutdown = CancellationToken::new();
    let link_handle = tokio::spawn(link_task.run(link_shutdown.clone()));

    let pump = pump::Pump::new(outbox, uplink.clone(), pump_stats.clone());
    tracker.spawn(pump.run(durable_rx, outputs.acks, shutdown.clone()));

    let telemetry = telemetry::TelemetryTask {
        sources: options
            .telemetry_sources
            .unwrap_or_else(|| telemetry::Sources {
                battery: settings.battery_path.clone(),
                ..Default::default()
            }),
        seq: telemetry_seq,
        config: config_rx,
        interval_override: options.telemetry_interval,
        out: durable_tx.clone(),
        link: uplink.stats.clone(),
        pump: pump_stats,
    };
    tracker.spawn(telemetry.run(shutdown.clone()));

    hardware
        .buttons
        .start(buttons_tx, shutdown.clone())
        .context("starting the buttons")?;
    let mut controller = Controller::new(
        uplink.clone(),
        durable_tx,
        button_seq,
        hardware.audio_in,
        hardware.audio_out,
        hardware.leds,
        settings.opus_bitrate,
        config_tx,
    );
    if let Some(o) = options.observer {
        tracker.spawn(forward_connection(
            uplink.connection(),
            o.clone(),
            shutdown.clone(),
        ));
        controller = controller.with_observer(o);
    }
    tracker.spawn(controller.run(buttons_rx, outputs.inbound, shutdown.clone()));
    tracker.close();

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
    link_shutdown.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, link_handle).await;
    Ok(())
}

async fn forward_connection(
    mut conn: watch::Receiver<link::Conn>,
    tx: mpsc::Sender<Observed>,
    shutdown: CancellationToken,
) {
    let mut last = false;
    loop {
        let now = conn.borrow_and_update().connected;
        if now != last {
            last = now;
            if tx.send(Observed::Connected(now)).await.is_err() {
                return;
            }
        }
        // Cases: shutdown; the link changed.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = conn.changed() => if r.is_err() { return },
        }
    }
}
