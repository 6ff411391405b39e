//! Device runtime: every device's events are handled in order by its own worker task, so one
//! slow device cannot stall the others.
//!
//! ```text
//! bus::run ──dispatch──▶ Dispatcher ──bounded queue──▶ worker (one per active device)
//! edge events ─────────▶     │ (telemetry: inline)      ├─ telemetry it could not take
//! REST commands ───────▶     │                          ├─ rules engine + actions
//!                                                       ├─ persona switching
//!                                                       └─ session state machine ──▶ turn task (voice)
//! ```
//!
//! Telemetry usually skips the worker: the dispatcher checks its sequence, hands it to the
//! batch writer and evaluates its rules inline (`intake`); only matched rules' actions go to
//! the worker.
//!
//! A worker exits after [`IDLE_EXIT`] without events or a session, and is recreated on the
//! next event (its state reloads from the database).

mod intake;
pub mod metrics;
pub mod persona;
pub mod session;
mod signal;
pub mod telemetry;
mod turn;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use companion_schema::{
    AudioChunk, ButtonEvent, DeviceId, Payload, SessionControl, Status, Telemetry,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::bus::Bus;
use crate::db::Db;
use crate::personas::PersonaSet;
use crate::rules::store::{RuleMetrics, RuleStore};
use crate::voice::VoicePipeline;

pub use metrics::DeviceMetrics;
pub use persona::SwitchError;

/// Events queued per device before new ones are dropped (and counted).
pub const DEVICE_QUEUE: usize = 256;
/// A worker with nothing to do for this long exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(300);

/// Something that happened to or for one device.
#[derive(Debug)]
pub enum DeviceEvent {
    Telemetry(Telemetry),
    /// With the instant it arrived (persona switch latency starts there).
    Button(ButtonEvent, Instant),
    Status(Status),
    Audio(AudioChunk),
    SessionControl(SessionControl, Instant),
    /// From the broker edge.
    Presence {
        online: bool,
    },
    /// From the REST API.
    Command(Command),
    /// Another replica changed the device's persona or config, or this replica took the
    /// device over: read them again.
    Reload,
    /// Events another replica's death left unhandled (a takeover's shadow), in order, in one
    /// queue slot: the backlog can be longer than the queue.
    Replay(Vec<DeviceEvent>),
    /// Telemetry handled outside the worker whose rules matched: their actions.
    Matched(Box<intake::Matched>),
}

impl DeviceEvent {
    fn label(&self) -> &'static str {
        match self {
            DeviceEvent::Telemetry(_) => "telemetry",
            DeviceEvent::Button(..) => "button",
            DeviceEvent::Status(_) => "status",
            DeviceEvent::Audio(_) => "audio_up",
            DeviceEvent::SessionControl(..) => "session_up",
            DeviceEvent::Presence { .. } => "presence",
            DeviceEvent::Command(_) => "command",
            DeviceEvent::Reload => "reload",
            DeviceEvent::Replay(_) => "replay",
            DeviceEvent::Matched(_) => "telemetry",
        }
    }

    /// The event for an up-topic payload; `None` for a down-topic one (the bus delivers up
    /// topics only).
    fn from_payload(payload: Payload, arrived: Instant) -> Option<Self> {
        Some(match payload {
            Payload::Telemetry(t) => DeviceEvent::Telemetry(t),
            Payload::Button(b) => DeviceEvent::Button(b, arrived),
            Payload::Status(s) => DeviceEvent::Status(s),
            Payload::Audio(a) => DeviceEvent::Audio(a),
            Payload::SessionControl(c) => DeviceEvent::SessionControl(c, arrived),
            _ => return None,
        })
    }
}

impl crate::cluster::Reload for Arc<Dispatcher> {
    fn reload(&self, device: &DeviceId) {
        Dispatcher::reload(self, device);
    }

    fn reload_all(&self) {
        let devices: Vec<DeviceId> = match self.workers.lock() {
            Ok(workers) => workers.keys().cloned().collect(),
            Err(_) => return,
        };
        for device in devices {
            Dispatcher::reload(self, &device);
        }
    }
}

/// Requests from the REST API, answered through a oneshot.
#[derive(Debug)]
pub enum Command {
    SwitchPersona {
        persona: companion_schema::PersonaId,
        actor: String,
        remote: Option<std::net::SocketAddr>,
        started: Instant,
        reply: oneshot::Sender<Result<companion_schema::PersonaState, SwitchError>>,
    },
}

/// Session timing limits.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Longest a device may stay in `listening`.
    pub max_listen: Duration,
    /// A session stuck in `thinking`/`speaking` this long is returned to idle.
    pub watchdog: Duration,
    /// Conversation lines kept per device.
    pub history: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_listen: Duration::from_secs(30),
            watchdog: Duration::from_secs(120),
            history: 20,
        }
    }
}

/// What every worker shares.
pub struct Runtime {
    pub db: Db,
    pub bus: Arc<Bus>,
    pub personas: Arc<PersonaSet>,
    pub rules: Arc<RuleStore>,
    pub rule_metrics: RuleMetrics,
    pub metrics: DeviceMetrics,
    pub voice: Arc<dyn VoicePipeline>,
    pub audit: AuditLog,
    pub telemetry: Arc<telemetry::Batcher>,
    pub limits: SessionLimits,
    /// Several replicas: persona and config changes are announced to the others.
    pub changes: Option<crate::cluster::Changes>,
}

/// A worker's queue. Events are boxed: tokio allocates a channel's slots 32 at a time when it
/// is created, and one worker per connected device made that 32 x 104 bytes each.
type EventTx = mpsc::Sender<Box<DeviceEvent>>;
type EventRx = mpsc::Receiver<Box<DeviceEvent>>;

/// Routes events to per-device workers, creating them on demand.
pub struct Dispatcher {
    workers: Mutex<HashMap<DeviceId, EventTx>>,
    runtime: Arc<Runtime>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Dispatcher {
    pub fn new(
        runtime: Arc<Runtime>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            workers: Mutex::new(HashMap::new()),
            runtime,
            tracker,
            shutdown,
        })
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Hands `event` for `device` on without waiting: telemetry is handled inline where it
    /// can be (`intake`), everything else is queued for the device's worker; a full queue
    /// drops it (counted).
    pub fn dispatch(self: &Arc<Self>, device: &DeviceId, event: DeviceEvent) -> bool {
        match event {
            DeviceEvent::Telemetry(t) => self.telemetry(device, t),
            DeviceEvent::Replay(events) => {
                // It may hold telemetry: queued under the sequence lock with the inline path
                // closed, like a single message.
                let slot = self.runtime.telemetry.slot(device);
                let mut state = slot.seq();
                state.inline = false;
                self.enqueue(device, DeviceEvent::Replay(events))
            }
            event => self.enqueue(device, event),
        }
    }

    /// Queues `event` for `device`'s worker without waiting; a full queue drops it (counted).
    fn enqueue(self: &Arc<Self>, device: &DeviceId, event: DeviceEvent) -> bool {
        let label = event.label();
        let Ok(mut workers) = self.workers.lock() else {
            return false;
        };
        let Some(tx) = self.sender(&mut workers, device) else {
            return false;
        };
        match tx.try_send(Box::new(event)) {
            Ok(()) => true,
            Err(e) => {
                self.runtime.metrics.dropped(label);
                let refused = match *e.into_inner() {
                    DeviceEvent::Telemetry(t) => vec![t.seq],
                    DeviceEvent::Replay(events) => events
                        .iter()
                        .filter_map(|ev| match ev {
                            DeviceEvent::Telemetry(t) => Some(t.seq),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                for seq in refused {
                    // Its acknowledgement, if held, goes out as "dropped".
                    self.runtime.telemetry.refused(device, seq);
                }
                false
            }
        }
    }

    /// Queues a REST command, waiting for room (commands are rare and must not be lost).
    pub async fn command(self: &Arc<Self>, device: &DeviceId, command: Command) -> bool {
        let tx = {
            let Ok(mut workers) = self.workers.lock() else {
                return false;
            };
            match self.sender(&mut workers, device) {
                Some(tx) => tx.clone(),
                None => return false,
            }
        };
        tx.send(Box::new(DeviceEvent::Command(command)))
            .await
            .is_ok()
    }

    /// The device's worker queue, starting a worker if it has none. Borrowed, not cloned:
    /// a clone and its drop are two atomic read-modify-writes on the channel per message.
    fn sender<'w>(
        self: &Arc<Self>,
        workers: &'w mut HashMap<DeviceId, EventTx>,
        device: &DeviceId,
    ) -> Option<&'w EventTx> {
        let live = workers.get(device).is_some_and(|tx| !tx.is_closed());
        if !live {
            let (tx, rx) = mpsc::channel(DEVICE_QUEUE);
            workers.insert(device.clone(), tx);
            self.runtime.metrics.workers.inc();
            let worker = worker::Worker::new(device.clone(), self.runtime.clone(), self.clone());
            self.tracker.spawn(worker.run(rx, self.shutdown.clone()));
        }
        // Present: found live above or just inserted.
        workers.get(device)
    }

    /// Queues a reload for `device`'s worker, if it has one here (a new one loads anyway).
    pub fn reload(&self, device: &DeviceId) {
        let Ok(workers) = self.workers.lock() else {
            return;
        };
        if let Some(tx) = workers.get(device) {
            if tx.try_send(Box::new(DeviceEvent::Reload)).is_err() {
                self.runtime.metrics.dropped("reload");
            }
        }
    }

    /// Called by a worker that wants to exit: succeeds (and unregisters it) only if no event
    /// is waiting, so nothing is lost.
    fn retire(&self, device: &DeviceId, rx: &EventRx) -> bool {
        let Ok(mut workers) = self.workers.lock() else {
            return false;
        };
        if !rx.is_empty() {
            return false;
        }
        workers.remove(device);
        self.runtime.metrics.workers.dec();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{BusError, BusMetrics, Inbox, Publisher};
    use crate::registry::model::{DeviceName, DeviceType};
    use crate::registry::{DeviceStore, NewDevice};
    use companion_schema::Qos;
    use prometheus_client::registry::Registry;

    /// A broker that takes every publish and forwards none.
    struct Nowhere;

    #[async_trait::async_trait]
    impl Publisher for Nowhere {
        async fn publish(&self, _: String, _: Qos, _: bool, _: Vec<u8>) -> Result<(), BusError> {
            Ok(())
        }
    }

    async fn dispatcher(dir: &tempfile::TempDir) -> (Arc<Dispatcher>, CancellationToken) {
        let settings = crate::settings::Settings {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        };
        let db = Db::connect(&settings).await.unwrap();
        db.migrate().await.unwrap();
        let mut registry = Registry::default();
        let personas = Arc::new(PersonaSet::load(None, "aria").unwrap());
        let runtime = Arc::new(Runtime {
            db: db.clone(),
            bus: Bus::new(Box::new(Nowhere), BusMetrics::register(&mut registry)),
            rules: RuleStore::open(&dir.path().join("rules.toml"), personas.clone()).unwrap(),
            personas,
            rule_metrics: RuleMetrics::register(&mut registry),
            metrics: DeviceMetrics::register(&mut registry),
            voice: crate::voice::Pipeline::new(&Default::default(), &mut registry).unwrap(),
            audit: AuditLog::new(db.clone()),
            telemetry: Arc::new(telemetry::Batcher::default()),
            limits: SessionLimits {
                max_listen: Duration::from_secs(30),
                watchdog: Duration::from_secs(60),
                history: 8,
            },
            changes: None,
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(telemetry::run_writer(
            runtime.telemetry.clone(),
            db,
            shutdown.clone(),
        ));
        let tracker = TaskTracker::new();
        (
            Dispatcher::new(runtime, tracker, shutdown.clone()),
            shutdown,
        )
    }

    use crate::cluster::testkit::telemetry;

    async fn new_device(dispatcher: &Dispatcher) -> DeviceId {
        let (device, _) = DeviceStore::new(dispatcher.runtime.db.clone())
            .create(&NewDevice {
                device_id: None,
                name: DeviceName::parse("Idle").unwrap(),
                device_type: DeviceType::Simulated,
                capabilities: Default::default(),
            })
            .await
            .unwrap();
        device.device_id
    }

    /// Times the rule named `rule` matched (its actions ran).
    fn matches(rt: &Runtime, rule: &str) -> u64 {
        rt.rule_metrics
            .matches
            .get_or_create(&crate::rules::store::RuleLabel { rule: rule.into() })
            .get()
    }

    /// Lets the workers run until `done`, without moving the (paused) clock: yielding keeps
    /// the runtime busy, so it never parks and auto-advances. Gives up after 20 s of real time.
    async fn settle(done: impl Fn() -> bool) {
        let give_up = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < give_up, "never settled");
            tokio::task::yield_now().await;
        }
    }

    /// A worker leaves after IDLE_EXIT without events, counted from its last event: one
    /// shortly before the exit keeps it another IDLE_EXIT.
    #[tokio::test]
    async fn a_worker_retires_idle_exit_after_its_last_event() {
        let dir = tempfile::tempdir().unwrap();
        let (dispatcher, shutdown) = dispatcher(&dir).await;
        let id = new_device(&dispatcher).await;
        let rt = dispatcher.runtime.clone();
        // Paused only now: while the runtime waits for SQLite it would jump the clock
        // (the pool's acquire timeout fired during setup).
        tokio::time::pause();
        // A message and a copy of it: the worker counts the duplicate as it handles it, so
        // once counted the worker has started (its idle timer is set).
        dispatcher.deliver(&id, telemetry(1), Instant::now());
        dispatcher.deliver(&id, telemetry(1), Instant::now());
        settle(|| rt.metrics.telemetry_duplicates.get() == 1).await;
        assert_eq!(rt.metrics.workers.get(), 1);
        tokio::time::advance(IDLE_EXIT - Duration::from_secs(10)).await;
        // Telemetry skips an idle worker now (it is handled inline: no event for the worker);
        // a status event reaches it, and the shipped rules log an offline device.
        dispatcher.deliver(&id, telemetry(1), Instant::now());
        settle(|| rt.metrics.telemetry_duplicates.get() == 2).await;
        let offline = Payload::Status(Status {
            v: 1,
            online: false,
            agent_version: "test".into(),
            boot_id: "b".into(),
            ts_ms: 0,
        });
        dispatcher.deliver(&id, offline, Instant::now());
        settle(|| matches(&rt, "offline device is logged") == 1).await;
        // Past the first event's exit time; 20 s after the last event.
        tokio::time::advance(Duration::from_secs(20)).await;
        for _ in 0..1_000 {
            tokio::task::yield_now().await;
        }
        assert_eq!(rt.metrics.workers.get(), 1, "an event 20 s ago keeps it");
        tokio::time::advance(IDLE_EXIT).await;
        settle(|| rt.metrics.workers.get() == 0).await;
        shutdown.cancel();
    }

    /// Telemetry goes through the worker until the worker has read the stored sequence and
    /// emptied its queue, then is handled inline (accepted before `deliver` returns); only a
    /// message whose rules match sends the worker their actions. A replay closes the inline
    /// path until the worker has handled it, so nothing overtakes it.
    #[tokio::test]
    async fn telemetry_skips_the_worker_once_it_has_caught_up() {
        let dir = tempfile::tempdir().unwrap();
        let (dispatcher, shutdown) = dispatcher(&dir).await;
        let id = new_device(&dispatcher).await;
        let rt = dispatcher.runtime.clone();
        let slot = rt.telemetry.slot(&id);
        let now = Instant::now();
        dispatcher.deliver(&id, telemetry(1), now);
        assert_eq!(slot.seq().last, None, "queued for the new worker");
        let give_up = std::time::Instant::now() + Duration::from_secs(20);
        while !slot.seq().inline {
            assert!(std::time::Instant::now() < give_up, "the worker caught up");
            tokio::task::yield_now().await;
        }
        assert_eq!(slot.seq().last, Some(1));

        dispatcher.deliver(&id, telemetry(3), now);
        assert_eq!(slot.seq().last, Some(3), "accepted inline");
        assert_eq!(rt.metrics.telemetry_gaps.get(), 1);
        dispatcher.deliver(&id, telemetry(3), now);
        assert_eq!(rt.metrics.telemetry_duplicates.get(), 1);

        // Low battery, held as a QoS 1 publish on the embedded broker is: the device's ledger
        // brings its slot along. The shipped rule matches, and the worker runs its action.
        let ledger = companion_broker::Receipts::ledger(&*rt.telemetry, &id);
        let owner = ledger
            .owner::<telemetry::Slot>()
            .expect("the slot owns the ledger");
        assert!(Arc::ptr_eq(&owner, &slot));
        let mut low = crate::cluster::testkit::telemetry_sample(4);
        low.battery_pct = Some(5.0);
        let receipt = dispatcher
            .deliver_held(&id, Payload::Telemetry(low), now, &ledger)
            .expect("held until stored");
        assert_eq!(slot.seq().battery, Some(5.0));
        settle(|| matches(&rt, "low battery pulses amber") == 1).await;

        // A replay queues; telemetry after it waits behind it, in order.
        dispatcher.replay(&id, vec![(telemetry(5), now)]);
        assert!(!slot.seq().inline);
        dispatcher.deliver(&id, telemetry(6), now);
        assert_eq!(slot.seq().last, Some(4), "both wait for the worker");
        settle(|| slot.seq().last == Some(6)).await;
        assert_eq!(rt.metrics.telemetry_gaps.get(), 1, "5 then 6, no gap");
        assert_eq!(rt.metrics.telemetry_duplicates.get(), 1);
        tokio::time::timeout(Duration::from_secs(20), async {
            while telemetry::last_seq(&rt.db, &id).await != Some(6) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("stored");
        assert_eq!(
            receipt.try_settled(),
            Some(companion_broker::Settled::Stored)
        );
        shutdown.cancel();
    }

    /// A cluster takeover replays a dead replica's unhandled events at once. One by one,
    /// a backlog longer than the worker's queue overflowed it and the survivor counted gaps
    /// (CI, `tests/cluster.rs`); whole, every event is handled in order.
    #[tokio::test]
    async fn a_replay_longer_than_the_queue_is_handled_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (dispatcher, shutdown) = dispatcher(&dir).await;
        let (device, _) = DeviceStore::new(dispatcher.runtime.db.clone())
            .create(&NewDevice {
                device_id: None,
                name: DeviceName::parse("Replayed").unwrap(),
                device_type: DeviceType::Simulated,
                capabilities: Default::default(),
            })
            .await
            .unwrap();
        let id = device.device_id;
        let backlog = (DEVICE_QUEUE as u64) * 2 + 7;
        let now = Instant::now();
        dispatcher.replay(&id, (1..=backlog).map(|s| (telemetry(s), now)).collect());
        // And the live event after it, queued behind the whole backlog.
        dispatcher.deliver(&id, telemetry(backlog + 1), now);
        let rt = dispatcher.runtime.clone();
        tokio::time::timeout(Duration::from_secs(20), async {
            while telemetry::last_seq(&rt.db, &id).await != Some(backlog + 1) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every replayed event stored");
        assert_eq!(rt.metrics.telemetry_gaps.get(), 0, "no event skipped");
        assert_eq!(rt.metrics.telemetry_duplicates.get(), 0, "none twice");
        let dropped: u64 = ["telemetry", "replay"]
            .into_iter()
            .map(|kind| {
                rt.metrics
                    .events_dropped
                    .get_or_create(&crate::metrics::KindLabel { kind })
                    .get()
            })
            .sum();
        assert_eq!(dropped, 0, "nothing dropped");
        shutdown.cancel();
    }
}
