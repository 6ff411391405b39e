//! Rebalancing: a replica hands devices to the replica they hash to (rendezvous hashing over
//! the live replicas), so one that joins, or comes back after a restart, gets its share.
//!
//! The giver stops handling the device at its heartbeat (its events are kept as a shadow
//! from then on, for a takeover should the receiver die) and writes the new owner with a
//! cutoff a moment later (`device_owners.handoff_cutoff_ms`). The receiver finds it at its
//! next heartbeat (or on the device's next event) and replays its own shadow as after a
//! takeover: telemetry and status in full, presses, audio and session control only when they
//! reached it after the cutoff. Nothing is done twice; a press within [`MARGIN_MS`] of the
//! handoff is lost (the user presses again), as in the last lease of a dying replica.
//!
//! Only devices quiet for [`QUIET`] move (a conversation is not cut in two), only to replicas
//! up for two leases (a replica that crash-loops attracts nothing) that are receiving
//! messages (`replicas.receiving_until_ms`: a replica cut off from the broker would hold its
//! devices without seeing them), and at most [`PER_HEARTBEAT`] per heartbeat.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_schema::DeviceId;

use super::ownership::{preferred, Claim, Entry, Ownership, State};
use crate::db::now_ms;

/// A device that sent a press, audio or session control this recently stays where it is.
pub(super) const QUIET: Duration = Duration::from_secs(30);
/// Devices handed off per heartbeat: a replica that joins takes its share over a while.
pub(super) const PER_HEARTBEAT: usize = 64;
/// Side-effecting events that reach the receiver up to this long after the giver stopped are
/// taken as the giver's (they may have reached it first).
pub(super) const MARGIN_MS: i64 = 250;

impl Ownership {
    /// Under the state lock, at a heartbeat that holds: our quiet devices that hash to
    /// another (settled, receiving) replica stop being handled here. Returns them with the
    /// replica each goes to.
    pub(super) fn pick_handoffs(&self, st: &mut State) -> Vec<(DeviceId, String)> {
        let State {
            devices, targets, ..
        } = st;
        if targets.is_empty() {
            return Vec::new();
        }
        let me = &self.config.replica;
        let mut picked = Vec::new();
        for (device, entry) in devices.iter_mut() {
            if picked.len() >= PER_HEARTBEAT {
                break;
            }
            let Entry::Mine { busy } = entry else {
                continue;
            };
            if busy.is_some_and(|b| b.elapsed() < QUIET) || preferred(me, targets.iter(), device) {
                continue;
            }
            let best = targets.iter().find(|t| {
                let others = targets.iter().filter(|o| o != t).chain(std::iter::once(me));
                preferred(t, others, device)
            });
            let Some(to) = best else {
                continue;
            };
            *entry = Entry::Theirs {
                owner: to.clone(),
                shadow: VecDeque::new(),
                last: Instant::now(),
            };
            self.metrics.owned.dec();
            picked.push((device.clone(), to.clone()));
        }
        picked
    }

    /// Writes the new owners of the devices [`Self::pick_handoffs`] stopped handling; a device
    /// whose write did not take is claimed anew (still ours: handled again, with what came
    /// meanwhile).
    pub(super) async fn hand_off(self: &Arc<Self>, picked: Vec<(DeviceId, String)>) {
        if picked.is_empty() {
            return;
        }
        let now = now_ms();
        let cutoff = now + MARGIN_MS;
        for (device, to) in picked {
            let written = sqlx::query(
                "UPDATE device_owners SET owner = $1, since_ms = $2, handoff_cutoff_ms = $3 \
                 WHERE device_id = $4 AND owner = $5",
            )
            .bind(&to)
            .bind(now)
            .bind(cutoff)
            .bind(device.as_str())
            .bind(&self.config.replica)
            .execute(self.db.pool())
            .await;
            match written {
                Ok(r) if r.rows_affected() == 1 => {
                    self.metrics.handoffs.inc();
                    tracing::info!(device_id = %device, to = %to, "handed the device to the replica it hashes to");
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(device_id = %device, error = %e, "handing the device off failed; claiming it again")
                }
            }
            if let Ok(mut st) = self.state.lock() {
                if let Some(entry) = st.devices.get_mut(&device) {
                    if let Entry::Theirs { shadow, .. } = entry {
                        let queue = std::mem::take(shadow);
                        *entry = Entry::Claiming { queue };
                    }
                }
            }
            self.spawn_claim(device);
        }
    }

    /// Takes the devices handed to us lately whose events we hold (those we have not seen are
    /// claimed on their next event, with the same cutoff).
    pub(super) async fn take_handed(self: &Arc<Self>, now: i64) {
        let window = i64::try_from((self.config.lease * 3).as_millis()).unwrap_or(i64::MAX);
        let rows: Result<Vec<(String, i64)>, sqlx::Error> = sqlx::query_as(
            "SELECT device_id, handoff_cutoff_ms FROM device_owners \
             WHERE owner = $1 AND handoff_cutoff_ms > $2",
        )
        .bind(&self.config.replica)
        .bind(now.saturating_sub(window))
        .fetch_all(self.db.pool())
        .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "reading the devices handed to this replica failed; retried next heartbeat");
                return;
            }
        };
        for (device, cutoff_ms) in rows {
            let Ok(device) = DeviceId::parse(&device) else {
                continue;
            };
            let held = self.state.lock().is_ok_and(|mut st| {
                let Some(entry) = st.devices.get_mut(&device) else {
                    return false;
                };
                let Entry::Theirs { shadow, .. } = entry else {
                    return false;
                };
                let queue = std::mem::take(shadow);
                *entry = Entry::Claiming { queue };
                true
            });
            if held {
                self.settle(&device, Ok(Claim::HandedOver { cutoff_ms }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Inbox;
    use crate::cluster::testkit::*;

    fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test]
    async fn a_replica_that_joins_gets_the_quiet_devices_that_hash_to_it_and_nothing_runs_twice() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(&dir).await;
        let (a, mut a_rx) = replica(&db, "a");
        a.heartbeat().await;
        let devices: Vec<DeviceId> = (0..40)
            .map(|i| DeviceId::parse(&format!("dev-{i}")).unwrap())
            .collect();
        for d in &devices {
            a.deliver(d, telemetry(1), Instant::now());
        }
        while a.owned().len() < devices.len() {
            tokio::task::yield_now().await;
        }
        // b joins and sees every message too; a owns them all.
        let (b, mut b_rx) = replica(&db, "b");
        b.heartbeat().await;
        for d in &devices {
            b.deliver(d, telemetry(1), Instant::now());
        }
        let theirs = |d: &DeviceId| {
            matches!(
                b.state.lock().unwrap().devices.get(d),
                Some(Entry::Theirs { .. })
            )
        };
        while !devices.iter().all(theirs) {
            tokio::task::yield_now().await;
        }
        let a_name = ["a".to_owned()];
        let to_b: Vec<&DeviceId> = devices
            .iter()
            .filter(|d| preferred("b", a_name.iter(), d))
            .collect();
        assert!(to_b.len() > 2 && to_b.len() < devices.len(), "{to_b:?}");
        // One of them is mid-conversation on a: it stays there.
        let busy = to_b[0];
        a.deliver(busy, button(1), Instant::now());
        b.deliver(busy, button(1), Instant::now());

        // b receives messages but is not up for two leases yet: nothing moves.
        b.heartbeat().await;
        a.heartbeat().await;
        assert_eq!(a.metrics.handoffs.get(), 0, "b is too new");
        // Up long enough but receiving nothing (cut off from the broker): nothing moves.
        let up_since = |receiving: bool| {
            sqlx::query(if receiving {
                "UPDATE replicas SET started_at_ms = 0 WHERE id = 'b'"
            } else {
                "UPDATE replicas SET started_at_ms = 0, receiving_until_ms = 0 WHERE id = 'b'"
            })
            .execute(db.pool())
        };
        up_since(false).await.unwrap();
        a.heartbeat().await;
        assert_eq!(a.metrics.handoffs.get(), 0, "b receives nothing");
        b.heartbeat().await;
        up_since(true).await.unwrap();
        a.heartbeat().await;
        assert_eq!(a.metrics.handoffs.get() as usize, to_b.len() - 1);
        for d in &to_b[1..] {
            assert_eq!(owner(&db, d).await, "b", "{d}");
        }
        assert_eq!(owner(&db, busy).await, "a");

        // After the cutoff a press and telemetry reach both: a holds them, b handles them
        // once it takes the device, after what it held from before.
        let moved = to_b[1];
        let cutoff: i64 =
            sqlx::query_scalar("SELECT handoff_cutoff_ms FROM device_owners WHERE device_id = $1")
                .bind(moved.as_str())
                .fetch_one(db.pool())
                .await
                .unwrap();
        while now_ms() <= cutoff {
            tokio::task::yield_now().await;
        }
        for o in [&a, &b] {
            o.deliver(moved, telemetry(2), Instant::now());
            o.deliver(moved, button(7), Instant::now());
        }
        b.heartbeat().await;
        let on_b = drain(&mut b_rx);
        let of_moved: Vec<&String> = on_b
            .iter()
            .filter(|m| m.starts_with(&format!("{moved} ")))
            .collect();
        assert_eq!(
            of_moved,
            [
                &format!("{moved} reload"),
                &format!("{moved} telemetry 1"),
                &format!("{moved} telemetry 2"),
                &format!("{moved} button 7"),
            ]
        );
        assert!(
            !on_b.iter().any(|m| m.starts_with(&format!("{busy} "))),
            "the busy device stays with a: {on_b:?}"
        );
        let on_a = drain(&mut a_rx);
        assert!(on_a.contains(&format!("{busy} button 1")));
        assert!(
            !on_a
                .iter()
                .any(|m| m == &format!("{moved} telemetry 2") || m == &format!("{moved} button 7")),
            "a handles nothing of a device it handed off: {on_a:?}"
        );
        assert_eq!(b.metrics.handed_in.get() as usize, to_b.len() - 1);
        let expect_b: std::collections::HashSet<DeviceId> =
            to_b[1..].iter().map(|d| (*d).clone()).collect();
        assert_eq!(b.owned(), expect_b);
        assert_eq!(a.owned().len(), devices.len() - expect_b.len());

        // Settled: nothing moves back or on.
        a.heartbeat().await;
        b.heartbeat().await;
        assert_eq!(a.metrics.handoffs.get() as usize, to_b.len() - 1);
        assert_eq!(b.metrics.handoffs.get(), 0);
    }
}
