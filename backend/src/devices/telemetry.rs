//! Telemetry: sequence tracking (gaps counted, duplicates dropped) and the batch writer that
//! upserts the latest values per device into `telemetry_latest`, many devices per
//! transaction.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use companion_schema::{DeviceId, Telemetry};
use tokio_util::sync::CancellationToken;

use crate::db::{now_ms, Db};

/// How often pending telemetry is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// A sequence number this far below the last one means the device started over.
pub const RESET_DISTANCE: u64 = 10_000;

/// What a new sequence number means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// In order; `gap` messages were missed before it.
    Accept {
        gap: u64,
    },
    Duplicate,
    /// Far below the last: the device's counter was reset.
    Reset,
}

/// Classifies `seq` given the last accepted one.
pub fn classify(last: Option<u64>, seq: u64) -> SeqVerdict {
    match last {
        None => SeqVerdict::Accept { gap: 0 },
        Some(last) if seq > last => SeqVerdict::Accept {
            gap: seq - last - 1,
        },
        Some(last) if last - seq >= RESET_DISTANCE => SeqVerdict::Reset,
        Some(_) => SeqVerdict::Duplicate,
    }
}

/// Latest telemetry per device, waiting to be written.
#[derive(Default)]
pub struct Batcher {
    pending: Mutex<HashMap<DeviceId, (Telemetry, i64)>>,
}

impl Batcher {
    pub fn put(&self, device: &DeviceId, t: Telemetry) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(device.clone(), (t, now_ms()));
        }
    }

    fn take(&self) -> HashMap<DeviceId, (Telemetry, i64)> {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Writes everything pending in one transaction. On failure the rows are put back
    /// (unless newer values arrived meanwhile) for the next flush.
    pub async fn flush(&self, db: &Db) -> Result<usize, sqlx::Error> {
        let batch = self.take();
        if batch.is_empty() {
            return Ok(0);
        }
        let n = batch.len();
        match write(db, &batch).await {
            Ok(()) => Ok(n),
            Err(e) => {
                if let Ok(mut p) = self.pending.lock() {
                    for (k, v) in batch {
                        p.entry(k).or_insert(v);
                    }
                }
                Err(e)
            }
        }
    }
}

async fn write(db: &Db, batch: &HashMap<DeviceId, (Telemetry, i64)>) -> Result<(), sqlx::Error> {
    let mut tx = db.pool().begin().await?;
    for (device, (t, received)) in batch {
        let extra = if t.extra.is_empty() {
            None
        } else {
            serde_json::to_string(&t.extra).ok()
        };
        // WHERE EXISTS: a device deleted meanwhile is skipped instead of failing the batch.
        sqlx::query(
            "INSERT INTO telemetry_latest
                (device_id, seq, ts_ms, received_at_ms, uptime_s, battery_pct, cpu_temp_c, rssi_dbm, free_mem_kb, extra_json)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
             WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = $1)
             ON CONFLICT (device_id) DO UPDATE SET
                seq = excluded.seq, ts_ms = excluded.ts_ms, received_at_ms = excluded.received_at_ms,
                uptime_s = excluded.uptime_s, battery_pct = excluded.battery_pct,
                cpu_temp_c = excluded.cpu_temp_c, rssi_dbm = excluded.rssi_dbm,
                free_mem_kb = excluded.free_mem_kb, extra_json = excluded.extra_json",
        )
        .bind(device.as_str())
        .bind(i64::try_from(t.seq).unwrap_or(i64::MAX))
        .bind(i64::try_from(t.ts_ms).unwrap_or(i64::MAX))
        .bind(*received)
        .bind(i64::try_from(t.uptime_s).unwrap_or(i64::MAX))
        .bind(t.battery_pct.map(f64::from))
        .bind(t.cpu_temp_c.map(f64::from))
        .bind(t.rssi_dbm.map(i64::from))
        .bind(t.free_mem_kb.map(|k| i64::try_from(k).unwrap_or(i64::MAX)))
        .bind(extra)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// The last stored sequence number of a device.
pub async fn last_seq(db: &Db, device: &DeviceId) -> Option<u64> {
    let row: Option<i64> =
        sqlx::query_scalar("SELECT seq FROM telemetry_latest WHERE device_id = $1")
            .bind(device.as_str())
            .fetch_optional(db.pool())
            .await
            .ok()
            .flatten();
    row.and_then(|s| u64::try_from(s).ok())
}

/// Flushes every [`FLUSH_INTERVAL`] until `shutdown`, then once more.
pub async fn run_writer(batcher: std::sync::Arc<Batcher>, db: Db, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Cases: time to flush; shutdown (flush what is left, then stop).
        let stop = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        if let Err(e) = batcher.flush(&db).await {
            tracing::error!(error = %e, "writing telemetry failed; will retry");
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_are_classified() {
        assert_eq!(classify(None, 7), SeqVerdict::Accept { gap: 0 });
        assert_eq!(classify(Some(7), 8), SeqVerdict::Accept { gap: 0 });
        assert_eq!(classify(Some(7), 10), SeqVerdict::Accept { gap: 2 });
        assert_eq!(classify(Some(7), 7), SeqVerdict::Duplicate);
        assert_eq!(classify(Some(7), 3), SeqVerdict::Duplicate);
        assert_eq!(classify(Some(20_000), 1), SeqVerdict::Reset);
    }
}
