//! Telemetry: sequence tracking (gaps counted, duplicates dropped) and the batch writer that
//! upserts the latest values per device into `telemetry_latest`, many devices per
//! transaction.
//!
//! On the embedded broker a device's telemetry is acknowledged only once it is stored: the
//! batcher is the edge's [`Receipts`] hook. Each held PUBACK waits for the commit that stores
//! its sequence number (or a later one), so a crash before the commit loses nothing the device
//! was told was received: it sends the message again when it reconnects. While the database is
//! away the acknowledgements wait (the device keeps its messages) instead of being dropped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use companion_broker::{Receipt, Receipts};
use companion_schema::{DeviceId, Telemetry, TopicKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::pool::PoolConnection;
use sqlx::Any;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::db::{now_ms, Db};

mod store;
pub use store::last_seq;
use store::write;

/// Pending telemetry is written as soon as it arrives, but no more often than this: what
/// arrives meanwhile goes into the same transaction. A commit's cost is mostly fixed (thread
/// hand-offs, a WAL frame per touched page, the statements' setup), so the gap trades CPU for
/// acknowledgement latency: at 10,000 msg/s, 20 ms rather than 10 ms cut the whole server's
/// CPU per message by ~8 % (paired `bench/compare.sh` rounds) and moved the PUBACK p50 from
/// ~8 to ~15 ms.
pub const FLUSH_GAP: Duration = Duration::from_millis(20);
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

/// Latest telemetry per device, waiting to be written, and the acknowledgements that wait
/// for it.
#[derive(Default)]
pub struct Batcher {
    pending: Mutex<HashMap<DeviceId, (Telemetry, i64)>>,
    receipts: Mutex<ReceiptBook>,
    /// Rung by [`Batcher::put`]: the writer has work.
    work: Notify,
    metrics: StoreMetrics,
}

/// What the telemetry store shows on `/metrics`.
#[derive(Clone, Default)]
struct StoreMetrics {
    /// Received, acknowledgement waiting for the write (grows while the database is away).
    unstored: Gauge,
    write_failures: Counter,
}

/// Per device: the last stored sequence number, and the held acknowledgements by sequence.
#[derive(Default)]
struct ReceiptBook {
    stored: HashMap<DeviceId, u64>,
    waiting: HashMap<DeviceId, Vec<(u64, oneshot::Sender<bool>)>>,
    /// Entries in `waiting`.
    held: usize,
}

impl ReceiptBook {
    /// Settles `device`'s waiters that `pick` selects with `stored`.
    fn settle(&mut self, device: &DeviceId, stored: bool, pick: impl Fn(u64) -> bool) {
        let Some(list) = self.waiting.get_mut(device) else {
            return;
        };
        let mut i = 0;
        while i < list.len() {
            if pick(list[i].0) {
                let (_, tx) = list.swap_remove(i);
                self.held -= 1;
                let _ = tx.send(stored);
            } else {
                i += 1;
            }
        }
        // An emptied list stays (as `stored` does per device): the device's next message
        // would otherwise allocate its key and list again.
        if list.is_empty() && list.capacity() > 4 {
            list.shrink_to(4);
        }
    }
}

impl Receipts for Batcher {
    fn hold(&self, device: &DeviceId, kind: TopicKind, payload: &Bytes) -> Option<Receipt> {
        if kind != TopicKind::Telemetry {
            return None;
        }
        // Undecodable: the backend counts it invalid and stores nothing; nothing to wait for.
        let seq = companion_schema::decode::<Telemetry>(payload).ok()?.seq;
        let mut book = self.receipts.lock().ok()?;
        if let Some(&stored) = book.stored.get(device) {
            // A copy of what is stored already (a resend after a lost PUBACK).
            if seq <= stored && stored - seq < RESET_DISTANCE {
                return None;
            }
        }
        let (tx, rx) = oneshot::channel();
        // Looked up before inserting: `entry` would clone the id (an allocation) every time.
        if !book.waiting.contains_key(device) {
            book.waiting.insert(device.clone(), Vec::new());
        }
        let list = book.waiting.get_mut(device)?;
        // Acknowledgements of connections that ended are no longer awaited.
        let before = list.len();
        list.retain(|(_, tx)| !tx.is_closed());
        list.push((seq, tx));
        let after = list.len();
        book.held = book.held + after - before;
        self.metrics.unstored.set(gauge_value(book.held));
        Some(rx)
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Batcher {
    /// Registers the store's metrics.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "backend_telemetry_unstored",
            "Telemetry messages received but not yet stored; their QoS 1 acknowledgements wait (grows while the database is unreachable)",
            self.metrics.unstored.clone(),
        );
        registry.register(
            "backend_telemetry_write_failures",
            "Failed telemetry writes (each is retried; nothing is dropped)",
            self.metrics.write_failures.clone(),
        );
    }

    pub fn put(&self, device: &DeviceId, t: Telemetry) {
        if let Ok(mut p) = self.pending.lock() {
            // Replaced in place when the device has a row pending: `insert` would clone the
            // id (an allocation) every time.
            match p.get_mut(device) {
                Some(row) => *row = (t, now_ms()),
                None => {
                    p.insert(device.clone(), (t, now_ms()));
                }
            }
        }
        self.work.notify_one();
    }

    /// The device's last stored sequence number, read from the database when its worker
    /// starts: copies of it need no write.
    pub fn known(&self, device: &DeviceId, seq: u64) {
        if let Ok(mut book) = self.receipts.lock() {
            let stored = book.stored.entry(device.clone()).or_insert(seq);
            *stored = (*stored).max(seq);
        }
    }

    /// A message with this sequence number was a duplicate of one already accepted: its
    /// acknowledgement goes out once that one is stored (now, unless it is still pending).
    pub fn duplicate(&self, device: &DeviceId, seq: u64) {
        let pending = self
            .pending
            .lock()
            .map(|p| p.contains_key(device))
            .unwrap_or(false);
        if pending {
            return; // the flush that stores the newer one settles it
        }
        if let Ok(mut book) = self.receipts.lock() {
            book.settle(device, true, |s| s <= seq);
            self.metrics.unstored.set(gauge_value(book.held));
        }
    }

    /// A message with this sequence number was not handled (the device's queue was full): it
    /// is acknowledged as dropped and counted by the edge.
    pub fn refused(&self, device: &DeviceId, seq: u64) {
        if let Ok(mut book) = self.receipts.lock() {
            book.settle(device, false, |s| s == seq);
            self.metrics.unstored.set(gauge_value(book.held));
        }
    }

    /// Acknowledgements waiting for a write, over all devices.
    #[cfg(test)]
    fn held(&self) -> usize {
        let held = self
            .receipts
            .lock()
            .map(|b| b.waiting.values().map(Vec::len).sum())
            .unwrap_or(0);
        assert_eq!(self.metrics.unstored.get(), gauge_value(held));
        held
    }

    /// After a commit: everything up to each stored sequence number is acknowledged.
    fn stored(&self, batch: &HashMap<DeviceId, (Telemetry, i64)>) {
        let Ok(mut book) = self.receipts.lock() else {
            return;
        };
        for (device, (t, _)) in batch {
            let seq = t.seq;
            let before = match book.stored.get_mut(device) {
                Some(stored) => Some(std::mem::replace(stored, seq)),
                None => book.stored.insert(device.clone(), seq),
            };
            // A restarted counter: what waited belonged to the old count.
            let restarted = before.is_some_and(|b| b > seq);
            book.settle(device, true, |s| restarted || s <= seq);
        }
        self.metrics.unstored.set(gauge_value(book.held));
    }

    fn take(&self) -> HashMap<DeviceId, (Telemetry, i64)> {
        // The next batch starts with room for as many devices as this one had (an empty map
        // would grow, rehashing, from 4 to that size on every flush).
        self.pending
            .lock()
            .map(|mut p| {
                let room = p.len();
                std::mem::replace(&mut *p, HashMap::with_capacity(room))
            })
            .unwrap_or_default()
    }

    /// Writes everything pending in one transaction. On failure the rows are put back
    /// (unless newer values arrived meanwhile) for the next flush.
    pub async fn flush(&self, db: &Db) -> Result<usize, sqlx::Error> {
        self.flush_on(db, &mut None).await
    }

    /// [`Batcher::flush`] on `conn`, the writer's own connection (taken from the pool when
    /// `None`; given back after a failure, so a broken one is not used again).
    async fn flush_on(
        &self,
        db: &Db,
        conn: &mut Option<PoolConnection<Any>>,
    ) -> Result<usize, sqlx::Error> {
        let batch = self.take();
        if batch.is_empty() {
            return Ok(0);
        }
        let n = batch.len();
        let written = write(db, conn, &batch).await;
        if written.is_err() {
            *conn = None;
        }
        match written {
            Ok(()) => {
                self.stored(&batch);
                Ok(n)
            }
            Err(e) => {
                self.metrics.write_failures.inc();
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

/// Writes pending telemetry as it arrives (at most every [`FLUSH_GAP`]; after a failure,
/// retries with a growing pause up to [`RETRY_MAX`]) until `shutdown`, then once more.
///
/// The writer keeps one pooled connection for itself: on SQLite its page cache stays valid
/// from one commit to the next (another connection's commit would invalidate it: every flush
/// re-read the pages it updates), and no acquire (with its liveness round trip) per flush.
/// It is given back when the writer stops, so the pool can close.
pub async fn run_writer(batcher: std::sync::Arc<Batcher>, db: Db, shutdown: CancellationToken) {
    let mut conn: Option<PoolConnection<Any>> = None;
    let mut retry: Option<Duration> = None;
    let mut last = tokio::time::Instant::now();
    loop {
        // Cases: telemetry arrived (or a failed write is due again); shutdown (write what is
        // left, then stop).
        let stop = tokio::select! {
            _ = batcher.work.notified(), if retry.is_none() => false,
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => false,
            _ = shutdown.cancelled() => true,
        };
        if !stop {
            tokio::time::sleep_until(last + FLUSH_GAP).await;
        }
        last = tokio::time::Instant::now();
        match batcher.flush_on(&db, &mut conn).await {
            Ok(_) => retry = None,
            Err(e) => {
                let next = retry.map_or(RETRY_MIN, |r| (r * 2).min(RETRY_MAX));
                tracing::error!(error = %e, retry_ms = next.as_millis() as u64, "writing telemetry failed; will retry");
                retry = Some(next);
            }
        }
        if stop {
            return;
        }
    }
}

/// The first pause after a failed write, doubling up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cluster::testkit::telemetry_sample as telemetry;

    fn hold(b: &Batcher, device: &DeviceId, seq: u64) -> Option<Receipt> {
        let payload = Bytes::from(companion_schema::encode(&telemetry(seq)).unwrap());
        b.hold(device, TopicKind::Telemetry, &payload)
    }

    #[test]
    fn receipts_settle_on_the_commit_that_stores_their_sequence_number() {
        let b = Batcher::default();
        let d = DeviceId::parse("dev-1").unwrap();
        assert!(b
            .hold(&d, TopicKind::Button, &Bytes::from_static(b"x"))
            .is_none());
        assert!(
            b.hold(
                &d,
                TopicKind::Telemetry,
                &Bytes::from_static(b"not msgpack")
            )
            .is_none(),
            "undecodable: nothing will be stored, nothing to wait for"
        );
        let mut r1 = hold(&b, &d, 1).unwrap();
        let mut r2 = hold(&b, &d, 2).unwrap();
        let mut r3 = hold(&b, &d, 3).unwrap();
        assert_eq!(b.held(), 3);
        let batch: HashMap<_, _> = [(d.clone(), (telemetry(2), 0))].into();
        b.stored(&batch);
        assert_eq!(r1.try_recv(), Ok(true));
        assert_eq!(r2.try_recv(), Ok(true));
        assert!(r3.try_recv().is_err(), "3 is not stored yet");
        // Copies of stored messages are acknowledged at once.
        assert!(hold(&b, &d, 2).is_none());
        // A message the device's queue could not take is refused.
        b.refused(&d, 3);
        assert_eq!(r3.try_recv(), Ok(false));
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_duplicate_waits_for_its_original_only_while_that_is_pending() {
        let b = Batcher::default();
        let d = DeviceId::parse("dev-2").unwrap();
        b.known(&d, 10); // from the database
        assert!(hold(&b, &d, 9).is_none(), "stored before the restart");
        b.put(&d, telemetry(11));
        let mut copy = hold(&b, &d, 11).unwrap();
        b.duplicate(&d, 11);
        assert!(copy.try_recv().is_err(), "11 is still pending");
        let batch = b.take();
        b.stored(&batch);
        assert_eq!(copy.try_recv(), Ok(true));
        let far = 11 + RESET_DISTANCE + 5;
        let mut later = hold(&b, &d, far).unwrap();
        b.stored(&[(d.clone(), (telemetry(far), 0))].into());
        assert_eq!(later.try_recv(), Ok(true));
        let mut later = hold(&b, &d, far + 1).unwrap();
        let mut restart = hold(&b, &d, 1).unwrap();
        let batch: HashMap<_, _> = [(d.clone(), (telemetry(1), 0))].into();
        b.stored(&batch);
        assert_eq!(restart.try_recv(), Ok(true));
        assert_eq!(
            later.try_recv(),
            Ok(true),
            "a restarted counter settles what waited"
        );
    }

    /// 300 devices in one flush (chunks of 256, 32, 8 and 4), one of them unknown, then again
    /// with newer values: every known device holds its latest row, the unknown one none.
    async fn a_flush_upserts_every_device_in_few_statements(settings: crate::settings::Settings) {
        use crate::registry::model::{DeviceName, DeviceType};
        use crate::registry::{DeviceStore, NewDevice};
        let db = Db::connect(&settings).await.unwrap();
        db.migrate().await.unwrap();
        let store = DeviceStore::new(db.clone());
        let mut devices = Vec::new();
        for i in 0..299 {
            let (d, _) = store
                .create(&NewDevice {
                    device_id: None,
                    name: DeviceName::parse(&format!("t{i}")).unwrap(),
                    device_type: DeviceType::Simulated,
                    capabilities: Default::default(),
                })
                .await
                .unwrap();
            devices.push(d.device_id);
        }
        let unknown = DeviceId::parse("deleted-meanwhile").unwrap();
        let b = Batcher::default();
        for round in 1..=2u64 {
            for (i, d) in devices.iter().enumerate() {
                let mut t = telemetry(round * 1000 + i as u64);
                t.battery_pct = Some(50.0);
                // NULL in every row first, then values: the prepared statement's parameter
                // types must be the column's, not whatever the first NULLs claimed.
                t.cpu_temp_c = (round == 2).then_some(41.5);
                t.rssi_dbm = (i % 2 == 0).then_some(-60);
                t.extra.insert("round".into(), round as f64);
                b.put(d, t);
            }
            b.put(&unknown, telemetry(round));
            assert_eq!(b.flush(&db).await.unwrap(), 300);
            type Row = (
                String,
                i64,
                Option<i64>,
                Option<String>,
                Option<f64>,
                Option<f64>,
            );
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT device_id, seq, rssi_dbm, extra_json, battery_pct, cpu_temp_c
                 FROM telemetry_latest ORDER BY device_id",
            )
            .fetch_all(db.pool())
            .await
            .unwrap();
            assert_eq!(rows.len(), 299, "the unknown device got no row");
            for (i, d) in devices.iter().enumerate() {
                let row = rows.iter().find(|r| r.0 == d.as_str()).expect("stored");
                assert_eq!(row.1, (round * 1000 + i as u64) as i64);
                assert_eq!(row.2, (i % 2 == 0).then_some(-60));
                assert_eq!(
                    row.3.as_deref(),
                    Some(format!("{{\"round\":{round}.0}}").as_str())
                );
                assert_eq!(row.4, Some(50.0));
                assert_eq!(row.5, (round == 2).then_some(41.5));
            }
        }
        assert_eq!(b.flush(&db).await.unwrap(), 0, "nothing left pending");
    }

    #[tokio::test]
    async fn a_flush_upserts_every_device_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        a_flush_upserts_every_device_in_few_statements(crate::settings::Settings {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        })
        .await;
    }

    #[tokio::test]
    async fn a_flush_upserts_every_device_on_postgres() {
        let Some(url) = crate::db::test_pg::fresh_database().await else {
            return;
        };
        let mut settings = crate::settings::Settings::default();
        settings.database.url = Some(crate::settings::Secret::new(url));
        // One connection: each round reuses the statements the first round prepared.
        settings.database.max_connections = 1;
        a_flush_upserts_every_device_in_few_statements(settings).await;
    }

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
