//! Telemetry: readings from `/proc` and `/sys`, a `seq` persisted in `CACHE_DIR`, and the loop
//! that publishes every `telemetry_interval_s` (from the retained `config`, default 30 s).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use companion_schema::{encode, DeviceConfig, Telemetry, TopicKind, SCHEMA_VERSION};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::link::{now_ms, LinkStats};
use crate::pump::{Durable, PumpStats};

#[derive(Debug, thiserror::Error)]
pub enum SeqError {
    #[error("seq file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A counter that keeps increasing across restarts: the next value lives in a file, replaced
/// atomically on each step.
#[derive(Debug)]
pub struct SeqStore {
    path: PathBuf,
    next: u64,
}

impl SeqStore {
    pub fn open(path: PathBuf) -> Result<Self, SeqError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| SeqError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let next = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(SeqError::Io { path, source }),
        };
        Ok(Self { path, next })
    }

    /// Returns the next value and persists the one after it.
    pub fn take(&mut self) -> Result<u64, SeqError> {
        let v = self.next;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, (v + 1).to_string())
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|source| SeqError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.next = v + 1;
        Ok(v)
    }
}

/// Where readings come from; tests point it at a fake `/proc` and `/sys`.
#[derive(Debug, Clone)]
pub struct Sources {
    pub proc_dir: PathBuf,
    pub sys_dir: PathBuf,
    pub battery: Option<PathBuf>,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            proc_dir: "/proc".into(),
            sys_dir: "/sys".into(),
            battery: None,
        }
    }
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

impl Sources {
    pub fn uptime_s(&self) -> u64 {
        read(&self.proc_dir.join("uptime"))
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0, |f| f as u64)
    }

    /// The first thermal zone, in °C.
    pub fn cpu_temp_c(&self) -> Option<f32> {
        let milli: f32 = read(&self.sys_dir.join("class/thermal/thermal_zone0/temp"))?
            .trim()
            .parse()
            .ok()?;
        Some(milli / 1000.0)
    }

    /// `MemAvailable` from `/proc/meminfo`, in kB.
    pub fn free_mem_kb(&self) -> Option<u64> {
        read(&self.proc_dir.join("meminfo"))?.lines().find_map(|l| {
            l.strip_prefix("MemAvailable:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
    }

    /// The signal level of the first interface in `/proc/net/wireless`, in dBm.
    pub fn rssi_dbm(&self) -> Option<i16> {
        let text = read(&self.proc_dir.join("net/wireless"))?;
        let line = text.lines().nth(2)?;
        let level = line.split_whitespace().nth(3)?.trim_end_matches('.');
        let v: f32 = level.parse().ok()?;
        Some(v as i16)
    }

    pub fn battery_pct(&self) -> Option<f32> {
        read(self.battery.as_deref()?)?.trim().parse().ok()
    }

    /// One reading, with the agent's own counters in `extra`.
    pub fn sample(&self, seq: u64, extra: BTreeMap<String, f64>) -> Telemetry {
        Telemetry {
            v: SCHEMA_VERSION,
            seq,
            ts_ms: now_ms(),
            uptime_s: self.uptime_s(),
            battery_pct: self.battery_pct(),
            cpu_temp_c: self.cpu_temp_c(),
            rssi_dbm: self.rssi_dbm(),
            free_mem_kb: self.free_mem_kb(),
            extra,
        }
    }
}

/// The telemetry loop.
pub struct TelemetryTask {
    pub sources: Sources,
    pub seq: SeqStore,
    pub config: watch::Receiver<DeviceConfig>,
    /// Overrides the configured interval (tests, the fleet tool).
    pub interval_override: Option<Duration>,
    pub out: mpsc::Sender<Durable>,
    pub link: Arc<LinkStats>,
    pub pump: Arc<PumpStats>,
}

/// The interval in force: the override, else the config's (at least 1 s).
pub fn interval(config: &DeviceConfig, over: Option<Duration>) -> Duration {
    over.unwrap_or_else(|| Duration::from_secs(config.telemetry_interval_s.max(1) as u64))
}

impl TelemetryTask {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut period = interval(&self.config.borrow(), self.interval_override);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Cases: shutdown; a tick; a new config (maybe a new interval).
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    if !self.publish_one().await {
                        return;
                    }
                }
                Ok(()) = self.config.changed() => {
                    let p = interval(&self.config.borrow_and_update(), self.interval_override);
                    if p != period {
                        tracing::info!(?p, "telemetry interval changed");
                        period = p;
                        ticker = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
                        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
            }
        }
    }

    /// Returns false when the pump is gone.
    async fn publish_one(&mut self) -> bool {
        let seq = match self.seq.take() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "persisting the telemetry seq failed");
                return true;
            }
        };
        let mut extra = BTreeMap::new();
        let l = &self.link;
        extra.insert(
            "link_errors".into(),
            l.errors.load(Ordering::Relaxed) as f64,
        );
        extra.insert(
            "audio_dropped".into(),
            l.audio_dropped.load(Ordering::Relaxed) as f64,
        );
        extra.insert(
            "outbox_queued".into(),
            self.pump.queued.load(Ordering::Relaxed) as f64,
        );
        extra.insert(
            "outbox_dropped".into(),
            self.pump.dropped.load(Ordering::Relaxed) as f64,
        );
        let t = self.sources.sample(seq, extra);
        match encode(&t) {
            Ok(payload) => self
                .out
                .send(Durable {
                    kind: TopicKind::Telemetry,
                    payload,
                })
                .await
                .is_ok(),
            Err(e) => {
                tracing::error!(error = %e, "encoding telemetry failed");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_keeps_increasing_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("telemetry.seq");
        let mut s = SeqStore::open(p.clone()).unwrap();
        assert_eq!((s.take().unwrap(), s.take().unwrap()), (0, 1));
        let mut s = SeqStore::open(p).unwrap();
        assert_eq!(s.take().unwrap(), 2);
    }

    #[test]
    fn readings_come_from_proc_and_sys() {
        let dir = tempfile::tempdir().unwrap();
        let proc_dir = dir.path().join("proc");
        let sys_dir = dir.path().join("sys");
        std::fs::create_dir_all(proc_dir.join("net")).unwrap();
        std::fs::create_dir_all(sys_dir.join("class/thermal/thermal_zone0")).unwrap();
        std::fs::write(proc_dir.join("uptime"), "1234.56 99.0\n").unwrap();
        std::fs::write(
            proc_dir.join("meminfo"),
            "MemTotal: 100 kB\nMemAvailable:    4242 kB\n",
        )
        .unwrap();
        std::fs::write(
            proc_dir.join("net/wireless"),
            "Inter-| sta-|   Quality        |   Discarded packets\n face | tus | link level noise |  nwid  crypt\n wlan0: 0000   54.  -56.  -256        0      0\n",
        )
        .unwrap();
        std::fs::write(sys_dir.join("class/thermal/thermal_zone0/temp"), "48312\n").unwrap();
        std::fs::write(dir.path().join("capacity"), "87\n").unwrap();
        let s = Sources {
            proc_dir,
            sys_dir,
            battery: Some(dir.path().join("capacity")),
        };
        let t = s.sample(7, BTreeMap::new());
        assert_eq!(t.seq, 7);
        assert_eq!(t.uptime_s, 1234);
        assert_eq!(t.free_mem_kb, Some(4242));
        assert_eq!(t.rssi_dbm, Some(-56));
        assert_eq!(t.battery_pct, Some(87.0));
        assert!((t.cpu_temp_c.unwrap() - 48.312).abs() < 1e-3);
    }

    #[test]
    fn missing_sources_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sources {
            proc_dir: dir.path().into(),
            sys_dir: dir.path().into(),
            battery: None,
        };
        let t = s.sample(0, BTreeMap::new());
        assert_eq!(
            (t.cpu_temp_c, t.rssi_dbm, t.free_mem_kb, t.battery_pct),
            (None, None, None, None)
        );
    }

    #[test]
    fn the_interval_follows_the_config_unless_overridden() {
        let mut c = DeviceConfig::default();
        assert_eq!(interval(&c, None), Duration::from_secs(30));
        c.telemetry_interval_s = 0;
        assert_eq!(interval(&c, None), Duration::from_secs(1));
        assert_eq!(
            interval(&c, Some(Duration::from_millis(50))),
            Duration::from_millis(50)
        );
    }
}
