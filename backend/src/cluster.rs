//! Several `companion` replicas behind one external MQTT broker (`mqtt.upstream`), on one
//! PostgreSQL: each device's events are handled by exactly one replica at a time.
//!
//! Every replica subscribes to every device's up topics without a share group, so each one
//! sees every message; [`Ownership`] sits in front of the device runtime and lets through
//! only the events of devices this replica owns.
//!
//! - **Liveness.** Each replica writes `replicas.alive_until_ms = now + lease` every
//!   heartbeat. It handles its devices only while its own last successful heartbeat is
//!   younger than the lease (measured on its own monotonic clock from the moment the write
//!   was sent), so a replica cut off from the database stops before anyone may take over.
//! - **Ownership.** `device_owners(device_id, owner)`, claimed on a device's first event
//!   (`INSERT … ON CONFLICT DO NOTHING`) and taken over only from a replica whose
//!   `alive_until_ms` has passed (a compare-and-set on the old owner).
//! - **Nothing lost on takeover.** A replica keeps the recent events of devices it does not
//!   own (the *shadow*, a few leases long). When the owner dies the others notice on their
//!   next heartbeat, one takes each device over and replays its shadow: telemetry and status
//!   in full (the worker drops sequence numbers already stored), side-effecting events
//!   (buttons, audio, session control) only when they arrived after the dead owner's
//!   `alive_until_ms`, i.e. when it can no longer have handled them. So no telemetry is lost,
//!   and no persona switch, reply or audit row is done twice; a press in the last lease of a
//!   dying replica is lost (the device shows no persona change and the user presses again).
//! - **Changes.** A persona or config change made on one replica is announced with
//!   `pg_notify('companion_devices', …)`; the others reload that device's worker.
//!
//! Replicas' clocks must agree to well under a lease (NTP); the lease is 3 s by default.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use companion_schema::{DeviceId, Payload};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::bus::Inbox;
use crate::db::{now_ms, Db};

/// The PostgreSQL channel announcing device changes: payload `<replica id> <device id>`.
pub const CHANNEL: &str = "companion_devices";

/// How the cluster behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// This replica's name, unique among the live replicas.
    pub replica: String,
    /// A replica that has not written its heartbeat for this long is dead.
    pub lease: Duration,
    /// How often each replica writes its heartbeat and looks at the others'.
    pub heartbeat: Duration,
    /// Events kept per device that another replica owns (and per device being claimed).
    pub shadow_per_device: usize,
}

/// What reloads a device's worker (the device runtime), so the rest knows nothing of it.
pub trait Reload: Send + Sync {
    /// The device's persona, config or owner changed elsewhere: reread them before the next
    /// event. Does nothing when the device has no worker here.
    fn reload(&self, device: &DeviceId);
    /// Every device with a worker here (changes may have been missed).
    fn reload_all(&self);
}

#[derive(Clone, Default)]
struct ClusterMetrics {
    owned: Gauge,
    takeovers: Counter,
    replayed: Counter,
    shadow_dropped: Counter,
    replicas_live: Gauge,
    heartbeat_failures: Counter,
}

/// One event waiting in a shadow: what, when it arrived (monotonic and wall clock).
struct Held {
    payload: Payload,
    arrived: Instant,
    wall_ms: i64,
}

enum Entry {
    /// Ours: events go straight to the runtime.
    Mine,
    /// Another replica's (or ours, unconfirmed after our heartbeat lapsed): events are kept.
    Theirs {
        owner: String,
        shadow: VecDeque<Held>,
        last: Instant,
    },
    /// A claim is on its way to the database: events wait for its answer.
    Claiming { queue: VecDeque<Held> },
}

struct State {
    /// Our heartbeat holds until then; `None` before the first one and after shutdown.
    valid_until: Option<Instant>,
    /// Other replicas alive at the last heartbeat, with their `alive_until_ms`.
    live: HashMap<String, i64>,
    devices: HashMap<DeviceId, Entry>,
}

/// The ownership gate in front of the device runtime.
pub struct Ownership {
    config: Config,
    db: Db,
    inner: Box<dyn Inbox>,
    reload: Arc<dyn Reload>,
    state: Mutex<State>,
    metrics: ClusterMetrics,
}

/// How a claim on a device ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody owned it (or we already did): every held event is ours to handle.
    Fresh,
    /// Taken over from a dead replica whose lease ended at `cutoff_ms`: side-effecting events
    /// that arrived before then may have been handled by it.
    TakenOver { cutoff_ms: i64 },
    /// Another (live) replica owns it.
    Theirs(String),
}

impl Ownership {
    pub fn new(
        config: Config,
        db: Db,
        inner: Box<dyn Inbox>,
        reload: Arc<dyn Reload>,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let metrics = ClusterMetrics::default();
        let r = registry.sub_registry_with_prefix("backend_cluster");
        r.register(
            "devices_owned",
            "Devices whose events this replica handles",
            metrics.owned.clone(),
        );
        r.register(
            "takeovers",
            "Devices taken over from a replica whose lease ended",
            metrics.takeovers.clone(),
        );
        r.register(
            "replayed",
            "Events handled from a shadow after a claim or takeover",
            metrics.replayed.clone(),
        );
        r.register(
            "shadow_dropped",
            "Events dropped from a full shadow (the oldest go first)",
            metrics.shadow_dropped.clone(),
        );
        r.register(
            "replicas_live",
            "Replicas alive at the last heartbeat, this one included",
            metrics.replicas_live.clone(),
        );
        r.register(
            "heartbeat_failures",
            "Heartbeats the database did not take",
            metrics.heartbeat_failures.clone(),
        );
        Arc::new(Self {
            config,
            db,
            inner,
            reload,
            state: Mutex::new(State {
                valid_until: None,
                live: HashMap::new(),
                devices: HashMap::new(),
            }),
            metrics,
        })
    }

    pub fn replica(&self) -> &str {
        &self.config.replica
    }

    /// Heartbeats until `shutdown`, then hands the devices over at once (the lease ends now).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cleaned = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            self.heartbeat().await;
            if cleaned.elapsed() > Duration::from_secs(600) {
                cleaned = Instant::now();
                // Replicas dead for an hour: nobody needs their cutoff any more.
                let _ = sqlx::query("DELETE FROM replicas WHERE alive_until_ms < $1")
                    .bind(now_ms() - 3_600_000)
                    .execute(self.db.pool())
                    .await;
            }
        }
        if let Ok(mut st) = self.state.lock() {
            st.valid_until = None;
        }
        // Events are no longer handled here: the others may take over right away.
        let gone = sqlx::query("UPDATE replicas SET alive_until_ms = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(&self.config.replica)
            .execute(self.db.pool())
            .await;
        match gone {
            Ok(_) => tracing::info!(replica = %self.config.replica, "left the cluster"),
            Err(e) => {
                tracing::warn!(error = %e, "could not end this replica's lease; the others take over when it runs out")
            }
        }
    }

    /// One heartbeat: extend our lease, learn who else is alive, take over the devices of
    /// replicas that are not.
    async fn heartbeat(self: &Arc<Self>) {
        let sent = Instant::now();
        let now = now_ms();
        let lease_ms = i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let beat = sqlx::query(
            "INSERT INTO replicas (id, alive_until_ms, started_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET alive_until_ms = excluded.alive_until_ms",
        )
        .bind(&self.config.replica)
        .bind(now + lease_ms)
        .bind(now)
        .execute(self.db.pool())
        .await;
        if let Err(e) = beat {
            self.metrics.heartbeat_failures.inc();
            tracing::warn!(error = %e, "cluster heartbeat failed");
            self.check_lapse();
            return;
        }
        let live: Result<Vec<(String, i64)>, sqlx::Error> =
            sqlx::query_as("SELECT id, alive_until_ms FROM replicas WHERE alive_until_ms > $1")
                .bind(now)
                .fetch_all(self.db.pool())
                .await;
        let live = match live {
            Ok(rows) => rows,
            Err(e) => {
                self.metrics.heartbeat_failures.inc();
                tracing::warn!(error = %e, "reading the cluster's replicas failed");
                self.check_lapse();
                return;
            }
        };
        self.metrics.replicas_live.set(live.len() as i64);
        let mut claims = Vec::new();
        if let Ok(mut st) = self.state.lock() {
            let was_valid = st.valid_until.is_some_and(|v| v > sent);
            st.valid_until = Some(sent + self.config.lease);
            st.live = live
                .into_iter()
                .filter(|(id, _)| *id != self.config.replica)
                .collect();
            if !was_valid {
                tracing::info!(replica = %self.config.replica, others = st.live.len(), "cluster heartbeat holds");
            }
            let keep = self.config.lease * 3 + self.config.heartbeat;
            let me = &self.config.replica;
            let live = std::mem::take(&mut st.live);
            st.devices.retain(|device, entry| match entry {
                Entry::Theirs {
                    owner,
                    shadow,
                    last,
                } => {
                    let owner_alive = live.contains_key(owner.as_str()) && owner != me;
                    if owner_alive {
                        // Kept long enough to cover a takeover after the owner's death.
                        while shadow.front().is_some_and(|h| h.arrived.elapsed() > keep) {
                            shadow.pop_front();
                        }
                        // A device silent for long (gone, deleted) is forgotten.
                        last.elapsed() < Duration::from_secs(600)
                    } else if shadow.is_empty() {
                        // Claimed again on its next event.
                        false
                    } else {
                        let queue = std::mem::take(shadow);
                        claims.push(device.clone());
                        *entry = Entry::Claiming { queue };
                        true
                    }
                }
                Entry::Mine | Entry::Claiming { .. } => true,
            });
            st.live = live;
        }
        for device in claims {
            self.spawn_claim(device);
        }
    }

    /// After a failed heartbeat: once our lease has run out, our devices are no longer ours
    /// until a heartbeat holds again and each is claimed anew.
    fn check_lapse(&self) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if st.valid_until.is_some_and(|v| v > Instant::now()) {
            return;
        }
        self.lapse(&mut st);
    }

    fn lapse(&self, st: &mut State) {
        let mut lost = 0;
        for entry in st.devices.values_mut() {
            if matches!(entry, Entry::Mine) {
                lost += 1;
                *entry = Entry::Theirs {
                    owner: self.config.replica.clone(),
                    shadow: VecDeque::new(),
                    last: Instant::now(),
                };
            }
        }
        if lost > 0 {
            self.metrics.owned.set(0);
            tracing::warn!(
                devices = lost,
                "this replica's cluster lease ran out; its devices' events are held until the database answers again"
            );
        }
    }

    fn spawn_claim(self: &Arc<Self>, device: DeviceId) {
        self.spawn_claim_after(device, Duration::ZERO);
    }

    /// Claims after `wait`: a device nobody owns goes to the replica it hashes to (rendezvous
    /// hashing over the live replicas), the others claim it only if that one does not.
    fn spawn_claim_after(self: &Arc<Self>, device: DeviceId, wait: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let claim = this.claim(&device).await;
            this.settle(&device, claim);
        });
    }

    /// Asks the database who owns `device`, claiming it when nobody (alive) does.
    pub async fn claim(&self, device: &DeviceId) -> Result<Claim, sqlx::Error> {
        let me = self.config.replica.as_str();
        let pool = self.db.pool();
        let now = now_ms();
        let owner: Option<String> =
            sqlx::query_scalar("SELECT owner FROM device_owners WHERE device_id = $1")
                .bind(device.as_str())
                .fetch_optional(pool)
                .await?;
        let Some(owner) = owner else {
            sqlx::query(
                "INSERT INTO device_owners (device_id, owner, since_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (device_id) DO NOTHING",
            )
            .bind(device.as_str())
            .bind(me)
            .bind(now)
            .execute(pool)
            .await?;
            let owner: String =
                sqlx::query_scalar("SELECT owner FROM device_owners WHERE device_id = $1")
                    .bind(device.as_str())
                    .fetch_one(pool)
                    .await?;
            return Ok(if owner == me {
                Claim::Fresh
            } else {
                Claim::Theirs(owner)
            });
        };
        if owner == me {
            return Ok(Claim::Fresh);
        }
        let cutoff: Option<i64> =
            sqlx::query_scalar("SELECT alive_until_ms FROM replicas WHERE id = $1")
                .bind(&owner)
                .fetch_optional(pool)
                .await?;
        if cutoff.is_some_and(|until| until > now) {
            return Ok(Claim::Theirs(owner));
        }
        let taken = sqlx::query(
            "UPDATE device_owners SET owner = $1, since_ms = $2 \
             WHERE device_id = $3 AND owner = $4 AND NOT EXISTS \
             (SELECT 1 FROM replicas WHERE id = $4 AND alive_until_ms > $2)",
        )
        .bind(me)
        .bind(now)
        .bind(device.as_str())
        .bind(&owner)
        .execute(pool)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(Claim::TakenOver {
                cutoff_ms: cutoff.unwrap_or(0),
            });
        }
        let owner: String =
            sqlx::query_scalar("SELECT owner FROM device_owners WHERE device_id = $1")
                .bind(device.as_str())
                .fetch_one(pool)
                .await?;
        Ok(if owner == me {
            Claim::Fresh
        } else {
            Claim::Theirs(owner)
        })
    }

    /// Applies a claim's answer: hands the held events over (or keeps them as a shadow).
    fn settle(&self, device: &DeviceId, claim: Result<Claim, sqlx::Error>) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let queue = match st.devices.remove(device) {
            Some(Entry::Claiming { queue }) => queue,
            Some(other) => {
                st.devices.insert(device.clone(), other);
                return;
            }
            None => VecDeque::new(),
        };
        let valid = st.valid_until.is_some_and(|v| v > Instant::now());
        match claim {
            Ok(Claim::Theirs(owner)) => {
                st.devices.insert(
                    device.clone(),
                    Entry::Theirs {
                        owner,
                        shadow: queue,
                        last: Instant::now(),
                    },
                );
            }
            Ok(_) if !valid => {
                // Our lease ran out while asking: claimed again after the next heartbeat.
                st.devices.insert(
                    device.clone(),
                    Entry::Theirs {
                        owner: self.config.replica.clone(),
                        shadow: queue,
                        last: Instant::now(),
                    },
                );
            }
            Ok(claim) => {
                let cutoff = match claim {
                    Claim::TakenOver { cutoff_ms } => {
                        self.metrics.takeovers.inc();
                        tracing::info!(device_id = %device, "took the device over from a replica whose lease ended");
                        Some(cutoff_ms)
                    }
                    _ => None,
                };
                // Its worker here (if any) may hold state from before another replica's
                // changes.
                self.reload.reload(device);
                let replay: Vec<(Payload, Instant)> = queue
                    .into_iter()
                    .filter(|held| {
                        !cutoff.is_some_and(|c| side_effects(&held.payload) && held.wall_ms <= c)
                    })
                    .map(|held| (held.payload, held.arrived))
                    .collect();
                self.metrics.replayed.inc_by(replay.len() as u64);
                // Whole: a shadow may be longer than the worker's queue.
                self.inner.replay(device, replay);
                st.devices.insert(device.clone(), Entry::Mine);
                self.metrics.owned.inc();
            }
            Err(e) => {
                tracing::warn!(device_id = %device, error = %e, "claiming the device failed; its events are held and the claim retried");
                // Retried by the next heartbeat (an owner nobody knows counts as dead).
                st.devices.insert(
                    device.clone(),
                    Entry::Theirs {
                        owner: String::new(),
                        shadow: queue,
                        last: Instant::now(),
                    },
                );
            }
        }
    }

    /// Devices this replica owns now.
    pub fn owned(&self) -> HashSet<DeviceId> {
        self.state
            .lock()
            .map(|st| {
                st.devices
                    .iter()
                    .filter(|(_, e)| matches!(e, Entry::Mine))
                    .map(|(d, _)| d.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn push(&self, q: &mut VecDeque<Held>, held: Held) {
        if q.len() >= self.config.shadow_per_device.max(1) {
            q.pop_front();
            self.metrics.shadow_dropped.inc();
        }
        q.push_back(held);
    }
}

/// Whether `me` comes first for `device` among itself and `others` (highest random weight).
fn preferred<'a>(me: &str, others: impl Iterator<Item = &'a String>, device: &DeviceId) -> bool {
    let mine = weight(me, device);
    others.into_iter().all(|o| {
        let theirs = weight(o, device);
        (theirs, o.as_str()) < (mine, me)
    })
}

/// FNV-1a over replica and device, mixed: the same on every replica and build.
fn weight(replica: &str, device: &DeviceId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in replica.bytes().chain([0u8]).chain(device.as_str().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV alone orders similar keys alike: finish with splitmix64's mixer.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Whether handling `payload` twice would show (a persona switch, a reply, an audit row).
fn side_effects(payload: &Payload) -> bool {
    !matches!(payload, Payload::Telemetry(_) | Payload::Status(_))
}

impl Inbox for Arc<Ownership> {
    fn deliver(&self, device: &DeviceId, payload: Payload, arrived: Instant) {
        let held = Held {
            payload,
            arrived,
            wall_ms: now_ms(),
        };
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let valid = st.valid_until.is_some_and(|v| v > Instant::now());
        if !valid && matches!(st.devices.get(device), Some(Entry::Mine)) {
            // Every device of ours stops at once, not only this one.
            self.lapse(&mut st);
        }
        match st.devices.get_mut(device) {
            Some(Entry::Mine) => self.inner.deliver(device, held.payload, held.arrived),
            Some(Entry::Theirs { shadow, last, .. }) => {
                *last = Instant::now();
                self.push(shadow, held);
            }
            Some(Entry::Claiming { queue }) => self.push(queue, held),
            None => {
                let mut queue = VecDeque::new();
                queue.push_back(held);
                if valid {
                    let wait = if preferred(&self.config.replica, st.live.keys(), device) {
                        Duration::ZERO
                    } else {
                        (self.config.heartbeat / 4).min(Duration::from_millis(250))
                    };
                    st.devices.insert(device.clone(), Entry::Claiming { queue });
                    drop(st);
                    self.spawn_claim_after(device.clone(), wait);
                } else {
                    st.devices.insert(
                        device.clone(),
                        Entry::Theirs {
                            owner: String::new(),
                            shadow: queue,
                            last: Instant::now(),
                        },
                    );
                }
            }
        }
    }
}

/// Announces that `device`'s persona or config changed, so the other replicas reload it.
#[derive(Clone)]
pub struct Changes {
    db: Db,
    replica: String,
}

impl Changes {
    pub fn new(db: Db, replica: String) -> Self {
        Self { db, replica }
    }

    pub async fn device_changed(&self, device: &DeviceId) {
        let payload = format!("{} {}", self.replica, device.as_str());
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(self.db.pool())
            .await;
        if let Err(e) = sent {
            tracing::warn!(device_id = %device, error = %e, "announcing a device change to the other replicas failed");
        }
    }
}

/// Listens for the other replicas' device changes until `shutdown`, reconnecting as needed.
pub async fn listen(
    url: String,
    replica: String,
    reload: Arc<dyn Reload>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    let mut connected_before = false;
    loop {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            l = listener => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "listening for other replicas' changes failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        backoff = Duration::from_millis(200);
        if connected_before {
            // Notifications sent while the listener was away are lost: reread everything.
            reload.reload_all();
        }
        connected_before = true;
        loop {
            // try_recv, not recv: recv reconnects silently, and the notifications sent while
            // the connection was away would be lost without anyone rereading.
            let n = tokio::select! {
                n = listener.try_recv() => n,
                _ = shutdown.cancelled() => return,
            };
            match n {
                Ok(None) => {
                    // Lost and listening again (eager reconnect): reread what may have changed.
                    tracing::warn!(
                        "the change listener's connection was lost; rereading every local device"
                    );
                    reload.reload_all();
                }
                Ok(Some(n)) => {
                    let Some((from, device)) = n.payload().split_once(' ') else {
                        continue;
                    };
                    if from == replica {
                        continue;
                    }
                    if let Ok(device) = DeviceId::parse(device) {
                        reload.reload(&device);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the change listener's connection failed; reconnecting");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use companion_schema::{ButtonAction, ButtonEvent, Telemetry};
    use tokio::sync::mpsc;

    struct Recorder(mpsc::UnboundedSender<String>);

    impl Inbox for Recorder {
        fn deliver(&self, device: &DeviceId, payload: Payload, _: Instant) {
            let what = match payload {
                Payload::Telemetry(t) => format!("{device} telemetry {}", t.seq),
                Payload::Button(b) => format!("{device} button {}", b.seq),
                other => format!("{device} {other:?}"),
            };
            let _ = self.0.send(what);
        }
    }

    impl Reload for Recorder {
        fn reload(&self, device: &DeviceId) {
            let _ = self.0.send(format!("{device} reload"));
        }

        fn reload_all(&self) {
            let _ = self.0.send("reload all".into());
        }
    }

    fn telemetry(seq: u64) -> Payload {
        Payload::Telemetry(Telemetry {
            v: 1,
            seq,
            ts_ms: 0,
            uptime_s: 0,
            battery_pct: None,
            cpu_temp_c: None,
            rssi_dbm: None,
            free_mem_kb: None,
            extra: Default::default(),
        })
    }

    fn button(seq: u64) -> Payload {
        Payload::Button(ButtonEvent {
            v: 1,
            seq,
            ts_ms: 0,
            button: "persona".into(),
            action: ButtonAction::Press,
        })
    }

    async fn db(dir: &tempfile::TempDir) -> Db {
        let settings = crate::settings::Settings {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        };
        let db = Db::connect(&settings).await.unwrap();
        db.migrate().await.unwrap();
        db
    }

    fn replica(db: &Db, name: &str) -> (Arc<Ownership>, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let o = Ownership::new(
            Config {
                replica: name.into(),
                lease: Duration::from_secs(60),
                heartbeat: Duration::from_secs(20),
                shadow_per_device: 8,
            },
            db.clone(),
            Box::new(Recorder(tx.clone())),
            Arc::new(Recorder(tx)),
            &mut Registry::default(),
        );
        (o, rx)
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .expect("recorder open")
    }

    async fn owner(db: &Db, device: &DeviceId) -> String {
        sqlx::query_scalar("SELECT owner FROM device_owners WHERE device_id = $1")
            .bind(device.as_str())
            .fetch_one(db.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn one_replica_handles_a_device_and_the_other_takes_it_over_without_repeating_side_effects(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = db(&dir).await;
        let (a, mut a_rx) = replica(&db, "a");
        let (b, mut b_rx) = replica(&db, "b");
        a.heartbeat().await;
        b.heartbeat().await;
        let d = DeviceId::parse("dev-1").unwrap();

        // Both see every message; the first to claim the device handles it.
        a.deliver(&d, telemetry(1), Instant::now());
        assert_eq!(next(&mut a_rx).await, "dev-1 reload");
        assert_eq!(next(&mut a_rx).await, "dev-1 telemetry 1");
        b.deliver(&d, telemetry(1), Instant::now());
        // b asks, learns a owns it, and keeps what it saw.
        let claim = b.claim(&d).await.unwrap();
        assert_eq!(claim, Claim::Theirs("a".into()));
        for seq in 2..=3 {
            a.deliver(&d, telemetry(seq), Instant::now());
            b.deliver(&d, telemetry(seq), Instant::now());
        }
        a.deliver(&d, button(1), Instant::now());
        b.deliver(&d, button(1), Instant::now());
        assert_eq!(next(&mut a_rx).await, "dev-1 telemetry 2");
        assert_eq!(next(&mut a_rx).await, "dev-1 telemetry 3");
        assert_eq!(next(&mut a_rx).await, "dev-1 button 1");
        assert!(b_rx.try_recv().is_err(), "b handles nothing of a's device");
        assert_eq!(a.owned().len(), 1);
        assert!(b.owned().is_empty());

        // a dies: its lease ends now. Telemetry that reached only b meanwhile is kept.
        let dead_at = now_ms();
        sqlx::query("UPDATE replicas SET alive_until_ms = $1 WHERE id = 'a'")
            .bind(dead_at)
            .execute(db.pool())
            .await
            .unwrap();
        while now_ms() <= dead_at {
            tokio::task::yield_now().await;
        }
        b.deliver(&d, telemetry(4), Instant::now());
        b.deliver(&d, button(2), Instant::now());
        b.heartbeat().await;
        // Reload first, then the shadow: every telemetry (the worker drops what is stored)
        // and only the press that came after a's lease ended.
        assert_eq!(next(&mut b_rx).await, "dev-1 reload");
        let mut replayed = Vec::new();
        for _ in 0..5 {
            replayed.push(next(&mut b_rx).await);
        }
        assert_eq!(
            replayed,
            [
                "dev-1 telemetry 1",
                "dev-1 telemetry 2",
                "dev-1 telemetry 3",
                "dev-1 telemetry 4",
                "dev-1 button 2"
            ]
        );
        assert_eq!(owner(&db, &d).await, "b");
        b.deliver(&d, telemetry(5), Instant::now());
        assert_eq!(next(&mut b_rx).await, "dev-1 telemetry 5");
        assert_eq!(b.metrics.takeovers.get(), 1);
    }

    #[tokio::test]
    async fn a_replica_whose_lease_ran_out_holds_events_and_claims_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(&dir).await;
        let (a, mut a_rx) = replica(&db, "a");
        a.heartbeat().await;
        let d = DeviceId::parse("dev-2").unwrap();
        a.deliver(&d, telemetry(1), Instant::now());
        assert_eq!(next(&mut a_rx).await, "dev-2 reload");
        assert_eq!(next(&mut a_rx).await, "dev-2 telemetry 1");

        // The lease ran out (the database did not take the heartbeats).
        a.state.lock().unwrap().valid_until = Some(Instant::now());
        a.deliver(&d, telemetry(2), Instant::now());
        a.deliver(&d, button(1), Instant::now());
        assert!(a_rx.try_recv().is_err(), "nothing handled without a lease");
        assert!(a.owned().is_empty());

        // Back: nobody took the device, so a claims it again and handles what it held.
        a.heartbeat().await;
        assert_eq!(next(&mut a_rx).await, "dev-2 reload");
        assert_eq!(next(&mut a_rx).await, "dev-2 telemetry 2");
        assert_eq!(next(&mut a_rx).await, "dev-2 button 1");
        assert_eq!(a.owned().len(), 1);
    }

    #[test]
    fn devices_nobody_owns_spread_over_the_replicas() {
        let replicas: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut count = HashMap::new();
        for i in 0..3000 {
            let d = DeviceId::parse(&format!("dev-{i}")).unwrap();
            let winners: Vec<&String> = replicas
                .iter()
                .filter(|me| preferred(me, replicas.iter().filter(|o| o != me), &d))
                .collect();
            assert_eq!(winners.len(), 1, "exactly one preferred replica");
            *count.entry(winners[0].clone()).or_insert(0) += 1;
        }
        for r in &replicas {
            let n = count[r];
            assert!((800..1200).contains(&n), "{r} preferred for {n} of 3000");
        }
    }

    /// The listener's connection is cut (its backend terminated): once it listens again,
    /// every local worker rereads (the notifications sent meanwhile are lost), and later
    /// notifications arrive. With `recv()` the reconnect was silent and nothing reread.
    #[tokio::test]
    async fn a_lost_change_listener_rereads_every_device_once_back() {
        let Some(admin) = crate::db::test_pg::admin_url() else {
            return;
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let app = format!("companion_listen_{:016x}", rand::random::<u64>());
        let url = format!(
            "{admin}{}application_name={app}",
            if admin.contains('?') { '&' } else { '?' }
        );
        let task = tokio::spawn(listen(
            url,
            "me".into(),
            Arc::new(Recorder(tx)),
            shutdown.clone(),
        ));
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        let notify = |from: &str, device: &str| {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(format!("{from} {device}"))
                .execute(&pool)
        };
        // Listening: a change from another replica arrives (retried until the LISTEN is in).
        loop {
            notify("other", "dev-1").await.unwrap();
            match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                Ok(Some(m)) => {
                    assert_eq!(m, "dev-1 reload");
                    break;
                }
                Ok(None) => panic!("the listener stopped"),
                Err(_) => continue,
            }
        }
        while rx.try_recv().is_ok() {}
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&app)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(killed, vec![true], "one listener connection, terminated");
        assert_eq!(next(&mut rx).await, "reload all");
        // Own changes are skipped; the others' still arrive on the new connection.
        notify("me", "dev-2").await.unwrap();
        notify("other", "dev-3").await.unwrap();
        assert_eq!(next(&mut rx).await, "dev-3 reload");
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_shadow_drops_its_oldest_events() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(&dir).await;
        let (a, mut a_rx) = replica(&db, "a");
        let (b, _b_rx) = replica(&db, "b");
        a.heartbeat().await;
        b.heartbeat().await;
        let d = DeviceId::parse("dev-3").unwrap();
        a.deliver(&d, telemetry(1), Instant::now());
        assert_eq!(next(&mut a_rx).await, "dev-3 reload");
        b.deliver(&d, telemetry(1), Instant::now());
        while !matches!(
            b.state.lock().unwrap().devices.get(&d),
            Some(Entry::Theirs { .. })
        ) {
            tokio::task::yield_now().await;
        }
        for seq in 2..=20 {
            b.deliver(&d, telemetry(seq), Instant::now());
        }
        let st = b.state.lock().unwrap();
        let Some(Entry::Theirs { shadow, .. }) = st.devices.get(&d) else {
            panic!("b keeps a shadow");
        };
        let seqs: Vec<u64> = shadow
            .iter()
            .map(|h| match &h.payload {
                Payload::Telemetry(t) => t.seq,
                _ => 0,
            })
            .collect();
        assert_eq!(seqs, (13..=20).collect::<Vec<_>>());
        assert_eq!(b.metrics.shadow_dropped.get(), 12);
    }
}
