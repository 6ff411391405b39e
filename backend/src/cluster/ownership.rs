//! The ownership gate in front of the device runtime: heartbeats, claims, takeovers and the
//! shadows they replay (the module documentation of [`crate::cluster`] says how).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use companion_schema::{DeviceId, Payload};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{Config, Reload};
use crate::bus::Inbox;
use crate::db::{now_ms, Db};

#[derive(Clone, Default)]
pub(super) struct ClusterMetrics {
    pub(super) owned: Gauge,
    takeovers: Counter,
    replayed: Counter,
    shadow_dropped: Counter,
    replicas_live: Gauge,
    heartbeat_failures: Counter,
    pub(super) handoffs: Counter,
    pub(super) handed_in: Counter,
}

/// One event waiting in a shadow: what, when it arrived (monotonic and wall clock).
pub(super) struct Held {
    payload: Payload,
    arrived: Instant,
    wall_ms: i64,
}

pub(super) enum Entry {
    /// Ours: events go straight to the runtime. `busy`: when the last side-effecting event
    /// (press, audio, session control) was handled; a device busy lately is not handed off.
    Mine { busy: Option<Instant> },
    /// Another replica's (or ours, unconfirmed after our heartbeat lapsed): events are kept.
    Theirs {
        owner: String,
        shadow: VecDeque<Held>,
        last: Instant,
    },
    /// A claim is on its way to the database: events wait for its answer.
    Claiming { queue: VecDeque<Held> },
}

pub(super) struct State {
    /// Our heartbeat holds until then; `None` before the first one and after shutdown.
    pub(super) valid_until: Option<Instant>,
    /// Other replicas alive at the last heartbeat, with their `alive_until_ms`.
    pub(super) live: HashMap<String, i64>,
    /// Those of them that may be handed devices: up for a while and receiving messages.
    pub(super) targets: Vec<String>,
    pub(super) devices: HashMap<DeviceId, Entry>,
    /// When the last event arrived here (any device): this replica receives messages.
    last_event: Option<Instant>,
}

/// The ownership gate in front of the device runtime.
pub struct Ownership {
    pub(super) config: Config,
    pub(super) db: Db,
    inner: Box<dyn Inbox>,
    reload: Arc<dyn Reload>,
    pub(super) state: Mutex<State>,
    pub(super) metrics: ClusterMetrics,
    /// When this process started (wall clock): a replica just up is not handed devices yet.
    started_ms: i64,
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
    /// Handed to us by a live replica that stopped handling it at `cutoff_ms` (see
    /// [`super::handoff`]): side-effecting events that arrived before then were its own.
    HandedOver { cutoff_ms: i64 },
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
        r.register(
            "handoffs",
            "Devices handed to the replica they hash to (rebalancing after a replica joined)",
            metrics.handoffs.clone(),
        );
        r.register(
            "handed_in",
            "Devices another replica handed to this one",
            metrics.handed_in.clone(),
        );
        Arc::new(Self {
            config,
            db,
            inner,
            reload,
            state: Mutex::new(State {
                valid_until: None,
                live: HashMap::new(),
                targets: Vec::new(),
                devices: HashMap::new(),
                last_event: None,
            }),
            metrics,
            started_ms: now_ms(),
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
    /// replicas that are not, hand devices to replicas that joined and take those handed to
    /// us.
    pub(super) async fn heartbeat(self: &Arc<Self>) {
        let sent = Instant::now();
        let now = now_ms();
        let lease_ms = i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let receiving = self
            .state
            .lock()
            .ok()
            .and_then(|st| st.last_event)
            .is_some_and(|t| t.elapsed() < self.config.lease);
        let beat = sqlx::query(
            "INSERT INTO replicas (id, alive_until_ms, started_at_ms, receiving_until_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET \
             alive_until_ms = excluded.alive_until_ms, started_at_ms = excluded.started_at_ms, \
             receiving_until_ms = excluded.receiving_until_ms",
        )
        .bind(&self.config.replica)
        .bind(now + lease_ms)
        .bind(self.started_ms)
        .bind(if receiving { now + lease_ms } else { 0 })
        .execute(self.db.pool())
        .await;
        if let Err(e) = beat {
            self.metrics.heartbeat_failures.inc();
            tracing::warn!(error = %e, "cluster heartbeat failed");
            self.check_lapse();
            return;
        }
        let live: Result<Vec<(String, i64, i64, i64)>, sqlx::Error> = sqlx::query_as(
            "SELECT id, alive_until_ms, started_at_ms, receiving_until_ms FROM replicas \
             WHERE alive_until_ms > $1",
        )
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
        let mut handoffs = Vec::new();
        if let Ok(mut st) = self.state.lock() {
            let was_valid = st.valid_until.is_some_and(|v| v > sent);
            st.valid_until = Some(sent + self.config.lease);
            let others = || live.iter().filter(|r| r.0 != self.config.replica);
            st.live = others().map(|r| (r.0.clone(), r.1)).collect();
            let settled = now - 2 * lease_ms;
            st.targets = others()
                .filter(|(_, _, started, receiving)| *started <= settled && *receiving > now)
                .map(|r| r.0.clone())
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
                Entry::Mine { .. } | Entry::Claiming { .. } => true,
            });
            st.live = live;
            if was_valid {
                handoffs = self.pick_handoffs(&mut st);
            }
        }
        for device in claims {
            self.spawn_claim(device);
        }
        self.hand_off(handoffs).await;
        self.take_handed(now).await;
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
            if matches!(entry, Entry::Mine { .. }) {
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

    pub(super) fn spawn_claim(self: &Arc<Self>, device: DeviceId) {
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
        let read = || {
            sqlx::query_as::<_, (String, Option<i64>)>(
                "SELECT owner, handoff_cutoff_ms FROM device_owners WHERE device_id = $1",
            )
            .bind(device.as_str())
        };
        // Ours: handed to us (events before the cutoff were handled by the giver) or not.
        let mine = |handoff: Option<i64>| match handoff {
            Some(cutoff_ms) => Claim::HandedOver { cutoff_ms },
            None => Claim::Fresh,
        };
        let Some((owner, handoff)) = read().fetch_optional(pool).await? else {
            sqlx::query(
                "INSERT INTO device_owners (device_id, owner, since_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (device_id) DO NOTHING",
            )
            .bind(device.as_str())
            .bind(me)
            .bind(now)
            .execute(pool)
            .await?;
            let (owner, handoff) = read().fetch_one(pool).await?;
            return Ok(if owner == me {
                mine(handoff)
            } else {
                Claim::Theirs(owner)
            });
        };
        if owner == me {
            return Ok(mine(handoff));
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
            "UPDATE device_owners SET owner = $1, since_ms = $2, handoff_cutoff_ms = NULL \
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
        let (owner, handoff) = read().fetch_one(pool).await?;
        Ok(if owner == me {
            mine(handoff)
        } else {
            Claim::Theirs(owner)
        })
    }

    /// Applies a claim's answer: hands the held events over (or keeps them as a shadow).
    pub(super) fn settle(&self, device: &DeviceId, claim: Result<Claim, sqlx::Error>) {
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
                    Claim::HandedOver { cutoff_ms } => {
                        self.metrics.handed_in.inc();
                        tracing::info!(device_id = %device, "took the device over from a replica that handed it here");
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
                let busy = replay
                    .iter()
                    .any(|(p, _)| side_effects(p))
                    .then(Instant::now);
                // Whole: a shadow may be longer than the worker's queue.
                self.inner.replay(device, replay);
                st.devices.insert(device.clone(), Entry::Mine { busy });
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
                    .filter(|(_, e)| matches!(e, Entry::Mine { .. }))
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
pub(super) fn preferred<'a>(
    me: &str,
    others: impl Iterator<Item = &'a String>,
    device: &DeviceId,
) -> bool {
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
        st.last_event = Some(held.arrived);
        if !valid && matches!(st.devices.get(device), Some(Entry::Mine { .. })) {
            // Every device of ours stops at once, not only this one.
            self.lapse(&mut st);
        }
        match st.devices.get_mut(device) {
            Some(Entry::Mine { busy }) => {
                if side_effects(&held.payload) {
                    *busy = Some(Instant::now());
                }
                self.inner.deliver(device, held.payload, held.arrived)
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testkit::*;

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
