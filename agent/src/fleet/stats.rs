//! Counters, latency histograms and the end-of-run table of the fleet tool.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::FleetArgs;

pub(crate) fn histogram() -> Mutex<Histogram<u64>> {
    Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
}

/// Counters and latency histograms (microseconds) of a run.
pub struct FleetStats {
    /// CONNACKs received (every connection, reconnections included).
    pub connected: AtomicU64,
    /// Connections that ended, for any reason.
    pub disconnected: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Clean disconnects the fleet made itself (`--reconnect-every-s`).
    pub churn_disconnects: AtomicU64,
    /// Connection attempts the server refused (CONNACK with a refusal code).
    pub refused: AtomicU64,
    /// Tokens changed in the credentials file and picked up (`--reload-credentials-s`).
    pub tokens_reloaded: AtomicU64,
    pub telemetry_sent: AtomicU64,
    pub telemetry_acked: AtomicU64,
    pub telemetry_observed: AtomicU64,
    pub buttons_sent: AtomicU64,
    pub buttons_acked: AtomicU64,
    pub persona_received: AtomicU64,
    pub sessions_started: AtomicU64,
    pub audio_up_sent: AtomicU64,
    pub audio_up_dropped: AtomicU64,
    pub reply_audio_received: AtomicU64,
    pub replies: AtomicU64,
    pub publish_errors: AtomicU64,
    /// Messages not produced because the device was disconnected at the time (or about to
    /// disconnect on its own, waiting for what it had in flight).
    pub skipped_offline: AtomicU64,
    /// From the start of a connection attempt to its CONNACK.
    pub connect: Mutex<Histogram<u64>>,
    pub telemetry_puback: Mutex<Histogram<u64>>,
    pub telemetry_ingest: Mutex<Histogram<u64>>,
    pub persona_rtt: Mutex<Histogram<u64>>,
    pub first_audio: Mutex<Histogram<u64>>,
}

impl Default for FleetStats {
    fn default() -> Self {
        Self {
            connected: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            churn_disconnects: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            tokens_reloaded: AtomicU64::new(0),
            telemetry_sent: AtomicU64::new(0),
            telemetry_acked: AtomicU64::new(0),
            telemetry_observed: AtomicU64::new(0),
            buttons_sent: AtomicU64::new(0),
            buttons_acked: AtomicU64::new(0),
            persona_received: AtomicU64::new(0),
            sessions_started: AtomicU64::new(0),
            audio_up_sent: AtomicU64::new(0),
            audio_up_dropped: AtomicU64::new(0),
            reply_audio_received: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            skipped_offline: AtomicU64::new(0),
            connect: histogram(),
            telemetry_puback: histogram(),
            telemetry_ingest: histogram(),
            persona_rtt: histogram(),
            first_audio: histogram(),
        }
    }
}

pub(crate) fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
    let us = (d.as_micros() as u64).max(1);
    let _ = h.lock().unwrap_or_else(|p| p.into_inner()).record(us);
}

fn percentiles(h: &Mutex<Histogram<u64>>) -> String {
    let h = h.lock().unwrap_or_else(|p| p.into_inner());
    if h.is_empty() {
        return format!("{:>9} {:>9} {:>9} {:>9} {:>8}", "-", "-", "-", "-", 0);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "{:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8}",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        h.len()
    )
}

/// The end-of-run table.
pub fn report(args: &FleetArgs, s: &FleetStats, elapsed: Duration) -> String {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet: {} devices ({} talkers), {} s after a {} s ramp, telemetry every {} ms",
        args.devices, args.talkers, args.duration, args.ramp_s, args.telemetry_interval_ms
    );
    let _ = writeln!(
        out,
        "connections {:>10}   connection errors {}   publish errors {}   skipped while offline {}",
        g(&s.connected),
        g(&s.connect_errors),
        g(&s.publish_errors),
        g(&s.skipped_offline)
    );
    let _ = writeln!(
        out,
        "churn: own reconnects {}   refused connects {}   tokens reloaded {}   connected at the end {}",
        g(&s.churn_disconnects),
        g(&s.refused),
        g(&s.tokens_reloaded),
        g(&s.connected).saturating_sub(g(&s.disconnected))
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "messages", "sent", "acked/recv"
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "telemetry (puback)",
        g(&s.telemetry_sent),
        g(&s.telemetry_acked)
    );
    if args.observe_addr.is_some() {
        let _ = writeln!(
            out,
            "{:<22} {:>10} {:>12}",
            "telemetry (observed)",
            g(&s.telemetry_sent),
            g(&s.telemetry_observed)
        );
    }
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "persona press/reply",
        g(&s.buttons_sent),
        g(&s.persona_received)
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "button (puback)",
        g(&s.buttons_sent),
        g(&s.buttons_acked)
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "talk sessions/replies",
        g(&s.sessions_started),
        g(&s.replies)
    );
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>12}",
        "audio up/down chunks",
        g(&s.audio_up_sent),
        g(&s.reply_audio_received)
    );
    let _ = writeln!(
        out,
        "telemetry throughput   {:.1} msg/s acked over {:.1} s (ramp included)",
        g(&s.telemetry_acked) as f64 / elapsed.as_secs_f64().max(0.001),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "latency (ms)", "p50", "p95", "p99", "max", "n"
    );
    let _ = writeln!(
        out,
        "{:<28} {}",
        "connect (to CONNACK)",
        percentiles(&s.connect)
    );
    let _ = writeln!(
        out,
        "{:<28} {}",
        "telemetry puback",
        percentiles(&s.telemetry_puback)
    );
    if args.observe_addr.is_some() {
        let _ = writeln!(
            out,
            "{:<28} {}",
            "telemetry ingest (observer)",
            percentiles(&s.telemetry_ingest)
        );
    }
    let _ = writeln!(
        out,
        "{:<28} {}",
        "persona switch round trip",
        percentiles(&s.persona_rtt)
    );
    let _ = write!(
        out,
        "{:<28} {}",
        "first reply audio",
        percentiles(&s.first_audio)
    );
    out
}
