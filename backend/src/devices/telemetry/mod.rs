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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use companion_broker::{Ledger, Receipt, Receipts};
use companion_schema::{DeviceId, Telemetry, TopicKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::pool::PoolConnection;
use sqlx::Any;
use tokio::sync::Notify;
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

/// A row waiting for the writer: the latest telemetry of a device and when it arrived.
type Row = (Telemetry, i64);

/// Latest telemetry per device, waiting to be written, and the acknowledgements that wait
/// for it.
#[derive(Default)]
pub struct Batcher {
    /// Every device seen, with its slot (kept: the next message finds it again).
    slots: Mutex<HashMap<DeviceId, Arc<Slot>>>,
    /// Slots with a row waiting for the writer, each once.
    pending: Mutex<Vec<Arc<Slot>>>,
    /// Rung by [`Batcher::put`]: the writer has work.
    work: Notify,
    metrics: StoreMetrics,
}

/// One device's place in the batcher, held by its worker and (through its ledger) by its
/// connection, so that a message needs no lookup by device id: the row waiting for the writer
/// and the ledger the held acknowledgements settle through.
pub struct Slot {
    device: DeviceId,
    /// `Some` while the slot is in `Batcher::pending` (or in the batch being taken from it).
    row: Mutex<Option<Row>>,
    ledger: Arc<Ledger>,
    /// Sequence tracking, shared by the device's worker and the dispatcher's inline path.
    seq: Mutex<SeqState>,
}

/// A device's telemetry sequence, as far as accepted.
#[derive(Debug, Default)]
pub struct SeqState {
    /// Telemetry may be handled without the device's worker: it read the stored sequence
    /// number and has no telemetry waiting in its queue. Cleared (under this lock) whenever
    /// telemetry is queued for the worker, set again by the worker once its queue is empty,
    /// so telemetry is always accepted in the order it arrived.
    pub inline: bool,
    /// The last accepted sequence number.
    pub last: Option<u64>,
    /// The battery reading of the last accepted message (rules read it as `device.battery_pct`).
    pub battery: Option<f64>,
}

impl Slot {
    fn row(&self) -> std::sync::MutexGuard<'_, Option<Row>> {
        // One plain value, replaced whole: a panic elsewhere cannot leave it half-written.
        self.row.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's sequence state, locked.
    pub fn seq(&self) -> std::sync::MutexGuard<'_, SeqState> {
        // Plain fields, each written whole: a panic elsewhere cannot leave them inconsistent.
        self.seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn device(&self) -> &DeviceId {
        &self.device
    }
}

/// What the telemetry store shows on `/metrics`.
#[derive(Clone, Default)]
struct StoreMetrics {
    /// Received, acknowledgement waiting for the write (grows while the database is away).
    unstored: Gauge,
    write_failures: Counter,
}

impl Receipts for Batcher {
    fn ledger(&self, device: &DeviceId) -> Arc<Ledger> {
        self.slot(device).ledger.clone()
    }

    fn hold(&self, ledger: &Arc<Ledger>, kind: TopicKind, payload: &Bytes) -> Option<Receipt> {
        if kind != TopicKind::Telemetry {
            return None;
        }
        // Undecodable: the backend counts it invalid and stores nothing; nothing to wait for.
        let seq = companion_schema::decode::<Telemetry>(payload).ok()?.seq;
        receipt(ledger, seq)
    }
}

/// The receipt of the telemetry message numbered `seq` on `ledger`, unless a copy of it is
/// stored already (a resend after a lost PUBACK: acknowledged now).
pub fn receipt(ledger: &Arc<Ledger>, seq: u64) -> Option<Receipt> {
    ledger.hold(seq, |stored| {
        stored.is_some_and(|stored| seq <= stored && stored - seq < RESET_DISTANCE)
    })
}

impl Drop for Batcher {
    /// Nothing will be stored any more: held acknowledgements are lost (the connections end
    /// unacknowledged and the devices send again).
    fn drop(&mut self) {
        if let Ok(slots) = self.slots.get_mut() {
            for slot in slots.values() {
                slot.ledger.close();
            }
        }
    }
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

    /// `device`'s slot, created on first use.
    pub fn slot(&self, device: &DeviceId) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(device) {
            return slot.clone();
        }
        let slot = Arc::new_cyclic(|me: &std::sync::Weak<Slot>| Slot {
            device: device.clone(),
            row: Mutex::new(None),
            // The connection hands the ledger back with each message: the slot comes with it.
            ledger: Arc::new(Ledger::new(self.metrics.unstored.clone()).owned_by(me.clone())),
            seq: Mutex::new(SeqState::default()),
        });
        slots.insert(device.clone(), slot.clone());
        slot
    }

    /// `t` is the device's latest telemetry: written by the next flush (replacing a row still
    /// waiting).
    pub fn put(&self, slot: &Arc<Slot>, t: Telemetry) {
        let queued = slot.row().replace((t, now_ms())).is_some();
        if !queued {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(slot.clone());
        }
        self.work.notify_one();
    }

    /// The device's last stored sequence number, read from the database when its worker
    /// starts: accepted already, and copies of it need no write.
    pub fn known(&self, slot: &Slot, seq: u64) {
        {
            let mut state = slot.seq();
            state.last = Some(state.last.map_or(seq, |s| s.max(seq)));
        }
        slot.ledger.raise(seq);
    }

    /// A message with this sequence number was not handled (the device's queue was full): it
    /// is acknowledged as dropped and counted by the edge.
    pub fn refused(&self, device: &DeviceId, seq: u64) {
        self.slot(device).ledger.refuse(seq);
    }

    /// Acknowledgements waiting for a write, over all devices.
    #[cfg(test)]
    fn held(&self) -> i64 {
        self.metrics.unstored.get()
    }

    /// After a commit: everything up to each stored sequence number is acknowledged.
    fn stored(batch: &[(Arc<Slot>, Row)]) {
        for (slot, (t, _)) in batch {
            slot.ledger.store(t.seq);
        }
    }

    /// The rows waiting, each device once, taken from their slots.
    fn take(&self) -> Vec<(Arc<Slot>, Row)> {
        // The next batch starts with room for as many devices as this one had.
        let slots = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let room = p.len();
            std::mem::replace(&mut *p, Vec::with_capacity(room))
        };
        slots
            .into_iter()
            .filter_map(|slot| {
                let row = slot.row().take()?;
                Some((slot, row))
            })
            .collect()
    }

    /// Puts rows a failed write took back, unless newer values arrived meanwhile.
    fn put_back(&self, batch: Vec<(Arc<Slot>, Row)>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (slot, row) in batch {
            let mut current = slot.row();
            if current.is_none() {
                *current = Some(row);
                drop(current);
                pending.push(slot);
            }
        }
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
                Self::stored(&batch);
                Ok(n)
            }
            Err(e) => {
                self.metrics.write_failures.inc();
                self.put_back(batch);
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
        b.hold(&b.ledger(device), TopicKind::Telemetry, &payload)
    }

    use companion_broker::Settled;

    #[test]
    fn receipts_settle_on_the_commit_that_stores_their_sequence_number() {
        let b = Batcher::default();
        let d = DeviceId::parse("dev-1").unwrap();
        let ledger = b.ledger(&d);
        assert!(b
            .hold(&ledger, TopicKind::Button, &Bytes::from_static(b"x"))
            .is_none());
        assert!(
            b.hold(
                &ledger,
                TopicKind::Telemetry,
                &Bytes::from_static(b"not msgpack")
            )
            .is_none(),
            "undecodable: nothing will be stored, nothing to wait for"
        );
        let r1 = hold(&b, &d, 1).unwrap();
        let r2 = hold(&b, &d, 2).unwrap();
        let r3 = hold(&b, &d, 3).unwrap();
        assert_eq!(b.held(), 3);
        let slot = b.slot(&d);
        b.put(&slot, telemetry(2));
        let batch = b.take();
        assert_eq!(batch.len(), 1);
        Batcher::stored(&batch);
        assert_eq!(r1.try_settled(), Some(Settled::Stored));
        assert_eq!(r2.try_settled(), Some(Settled::Stored));
        assert_eq!(r3.try_settled(), None, "3 is not stored yet");
        // Copies of stored messages are acknowledged at once.
        assert!(hold(&b, &d, 2).is_none());
        // A message the device's queue could not take is refused.
        b.refused(&d, 3);
        assert_eq!(r3.try_settled(), Some(Settled::Refused));
        drop((r1, r2, r3));
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_duplicate_waits_for_its_original_while_that_is_pending() {
        let b = Batcher::default();
        let d = DeviceId::parse("dev-2").unwrap();
        let slot = b.slot(&d);
        b.known(&slot, 10); // from the database
        assert!(hold(&b, &d, 9).is_none(), "stored before the restart");
        b.put(&slot, telemetry(11));
        let copy = hold(&b, &d, 11).unwrap();
        assert_eq!(copy.try_settled(), None, "11 is still pending");
        let batch = b.take();
        Batcher::stored(&batch);
        assert_eq!(copy.try_settled(), Some(Settled::Stored));
        let far = 11 + RESET_DISTANCE + 5;
        let later = hold(&b, &d, far).unwrap();
        b.put(&slot, telemetry(far));
        Batcher::stored(&b.take());
        assert_eq!(later.try_settled(), Some(Settled::Stored));
        let later = hold(&b, &d, far + 1).unwrap();
        let restart = hold(&b, &d, 1).unwrap();
        b.put(&slot, telemetry(1));
        Batcher::stored(&b.take());
        assert_eq!(restart.try_settled(), Some(Settled::Stored));
        assert_eq!(
            later.try_settled(),
            Some(Settled::Stored),
            "a restarted counter settles what waited"
        );
    }

    #[test]
    fn a_device_is_in_a_batch_once_with_its_latest_row() {
        let b = Batcher::default();
        let (d1, d2) = (
            DeviceId::parse("dev-a").unwrap(),
            DeviceId::parse("dev-b").unwrap(),
        );
        let (s1, s2) = (b.slot(&d1), b.slot(&d2));
        assert!(Arc::ptr_eq(&s1, &b.slot(&d1)), "one slot per device");
        b.put(&s1, telemetry(1));
        b.put(&s2, telemetry(5));
        b.put(&s1, telemetry(2));
        let batch = b.take();
        let seqs: Vec<(&str, u64)> = batch
            .iter()
            .map(|(s, (t, _))| (s.device.as_str(), t.seq))
            .collect();
        assert_eq!(seqs, vec![("dev-a", 2), ("dev-b", 5)]);
        assert!(b.take().is_empty());
        // A failed write puts its rows back, except where a newer row arrived meanwhile.
        b.put(&s2, telemetry(6));
        b.put_back(batch);
        let mut seqs: Vec<(String, u64)> = b
            .take()
            .iter()
            .map(|(s, (t, _))| (s.device.to_string(), t.seq))
            .collect();
        seqs.sort();
        assert_eq!(seqs, vec![("dev-a".to_owned(), 2), ("dev-b".to_owned(), 6)]);
    }

    /// 300 devices in one flush (a statement of 256 rows and one of 44 padded to 64, in a
    /// transaction), one of them unknown, then again
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
                b.put(&b.slot(d), t);
            }
            b.put(&b.slot(&unknown), telemetry(round));
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
