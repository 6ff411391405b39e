//! Device runtime: every device's events are handled in order by its own worker task, so one
//! slow device cannot stall the others.
//!
//! ```text
//! bus::run ──dispatch──▶ Dispatcher ──bounded queue──▶ worker (one per active device)
//! edge events ─────────▶     │                          ├─ telemetry seq / batch writer
//! REST commands ───────▶     │                          ├─ rules engine + actions
//!                                                       ├─ persona switching
//!                                                       └─ session state machine ──▶ turn task (voice)
//! ```
//!
//! A worker exits after [`IDLE_EXIT`] without events or a session, and is recreated on the
//! next event (its state reloads from the database).

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
use crate::bus::{Bus, Inbox};
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
        }
    }
}

/// The device runtime is where the bus delivers.
impl Inbox for Arc<Dispatcher> {
    fn deliver(&self, device: &DeviceId, payload: Payload, arrived: Instant) {
        let event = match payload {
            Payload::Telemetry(t) => DeviceEvent::Telemetry(t),
            Payload::Button(b) => DeviceEvent::Button(b, arrived),
            Payload::Status(s) => DeviceEvent::Status(s),
            Payload::Audio(a) => DeviceEvent::Audio(a),
            Payload::SessionControl(c) => DeviceEvent::SessionControl(c, arrived),
            // Down-topic payloads: the bus delivers up topics only.
            _ => {
                tracing::debug!(device_id = %device, "a down-topic payload from the bus; ignored");
                return;
            }
        };
        self.dispatch(device, event);
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

    /// Queues `event` for `device` without waiting; a full queue drops it (counted).
    pub fn dispatch(self: &Arc<Self>, device: &DeviceId, event: DeviceEvent) -> bool {
        let label = event.label();
        let Ok(mut workers) = self.workers.lock() else {
            return false;
        };
        let tx = self.sender(&mut workers, device);
        match tx.try_send(Box::new(event)) {
            Ok(()) => true,
            Err(e) => {
                self.runtime.metrics.dropped(label);
                if let DeviceEvent::Telemetry(t) = *e.into_inner() {
                    // Its acknowledgement, if held, goes out as "dropped".
                    self.runtime.telemetry.refused(device, t.seq);
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
            self.sender(&mut workers, device)
        };
        tx.send(Box::new(DeviceEvent::Command(command)))
            .await
            .is_ok()
    }

    fn sender(
        self: &Arc<Self>,
        workers: &mut HashMap<DeviceId, EventTx>,
        device: &DeviceId,
    ) -> EventTx {
        if let Some(tx) = workers.get(device).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(DEVICE_QUEUE);
        workers.insert(device.clone(), tx.clone());
        self.runtime.metrics.workers.inc();
        let worker = worker::Worker::new(device.clone(), self.runtime.clone(), self.clone());
        self.tracker.spawn(worker.run(rx, self.shutdown.clone()));
        tx
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
