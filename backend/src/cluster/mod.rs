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
//! - **Rebalancing.** A replica that joins gets the devices that hash to it, handed over by
//!   their owners with a cutoff ([`handoff`]).
//! - **Changes.** A persona or config change made on one replica is announced with
//!   `pg_notify('companion_devices', …)`; the others reload that device's worker. The rule set
//!   is shared through the database (`rules::store`).
//!
//! Replicas' clocks must agree to well under a lease (NTP); the lease is 3 s by default.

use std::sync::Arc;
use std::time::Duration;

use companion_schema::DeviceId;
use tokio_util::sync::CancellationToken;

use crate::db::Db;

mod handoff;
mod ownership;

pub use ownership::{Claim, Ownership};

/// The replica among `replicas` that `device` hashes to: where rebalancing moves it once
/// every one of them is settled and receiving (operators and tests can predict placement).
pub fn preferred_replica<'a>(replicas: &'a [String], device: &DeviceId) -> Option<&'a String> {
    replicas.iter().find(|r| {
        let others = replicas.iter().filter(|o| o != r);
        ownership::preferred(r, others, device)
    })
}

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
pub(crate) mod testkit {
    use super::*;
    use crate::bus::Inbox;
    use companion_schema::Payload;
    use companion_schema::{ButtonAction, ButtonEvent, Telemetry};
    use prometheus_client::registry::Registry;
    use std::time::Instant;
    use tokio::sync::mpsc;

    pub struct Recorder(pub mpsc::UnboundedSender<String>);

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

    /// Telemetry carrying only its sequence number.
    pub fn telemetry_sample(seq: u64) -> Telemetry {
        Telemetry {
            v: 1,
            seq,
            ts_ms: 0,
            uptime_s: 0,
            battery_pct: None,
            cpu_temp_c: None,
            rssi_dbm: None,
            free_mem_kb: None,
            extra: Default::default(),
        }
    }

    pub fn telemetry(seq: u64) -> Payload {
        Payload::Telemetry(telemetry_sample(seq))
    }

    pub fn button(seq: u64) -> Payload {
        Payload::Button(ButtonEvent {
            v: 1,
            seq,
            ts_ms: 0,
            button: "persona".into(),
            action: ButtonAction::Press,
        })
    }

    /// The database the cluster tests share: a fresh PostgreSQL one where a server is
    /// configured (`DATABASE_URL`; always in CI: cluster mode runs on PostgreSQL only, and
    /// its claims and takeovers are compare-and-sets in its SQL), else a SQLite file in `dir`.
    pub async fn db(dir: &tempfile::TempDir) -> Db {
        let mut settings = crate::settings::Settings {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        };
        if let Some(url) = crate::db::test_pg::fresh_database().await {
            settings.database.url = Some(crate::settings::Secret::new(url));
        }
        let db = Db::connect(&settings).await.unwrap();
        db.migrate().await.unwrap();
        db
    }

    pub fn replica(db: &Db, name: &str) -> (Arc<Ownership>, mpsc::UnboundedReceiver<String>) {
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

    pub async fn next(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .expect("recorder open")
    }

    pub async fn owner(db: &Db, device: &DeviceId) -> String {
        sqlx::query_scalar("SELECT owner FROM device_owners WHERE device_id = $1")
            .bind(device.as_str())
            .fetch_one(db.pool())
            .await
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;
    use tokio::sync::mpsc;

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
}
