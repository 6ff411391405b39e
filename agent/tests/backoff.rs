//! Reconnect backoff on tokio's paused clock: the link task retries forever, waiting a
//! jittered, growing delay capped at a minute; no sleeps, no network.

use std::time::Duration;

use companion_agent::backoff::{Backoff, BACKOFF_CAP};
use companion_agent::link::{with_poller, Poller};
use companion_schema::DeviceId;
use rand::SeedableRng;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A broker that is never there: every poll fails at once, and reports when it was called.
struct Unreachable {
    attempts: mpsc::UnboundedSender<Instant>,
}

impl Poller for Unreachable {
    fn poll(&mut self) -> impl std::future::Future<Output = Result<Event, ConnectionError>> + Send {
        let _ = self.attempts.send(Instant::now());
        std::future::ready(Err(ConnectionError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ))))
    }
    fn discard_queued(&mut self) {}
}

async fn gaps(
    seed: u64,
    attempts: usize,
) -> (
    Vec<Duration>,
    tokio::task::JoinHandle<()>,
    CancellationToken,
) {
    let (client, _el) = AsyncClient::new(MqttOptions::new("pi-x", "127.0.0.1", 1), 8);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (_uplink, task, _outputs) = with_poller(
        client,
        Unreachable { attempts: tx },
        DeviceId::parse("pi-x").unwrap(),
        "boot".into(),
    );
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(
        task.with_rng(rand::rngs::StdRng::seed_from_u64(seed))
            .run(shutdown.clone()),
    );
    let mut times = Vec::new();
    while times.len() < attempts {
        times.push(rx.recv().await.expect("the task keeps polling"));
    }
    let gaps = times.windows(2).map(|w| w[1] - w[0]).collect();
    (gaps, handle, shutdown)
}

#[tokio::test(start_paused = true)]
async fn reconnect_backoff_grows_is_jittered_and_never_gives_up() {
    let (gaps, handle, shutdown) = gaps(42, 40).await;
    let mut ceiling = Backoff::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for (i, g) in gaps.iter().enumerate() {
        assert!(
            *g <= ceiling.ceiling(),
            "attempt {i}: waited {g:?} > {:?}",
            ceiling.ceiling()
        );
        ceiling.next_delay(&mut rng);
    }
    // Grows: the late waits (ceiling 60 s) are far longer than the first ones (1-4 s).
    let early: Duration = gaps[..3].iter().sum();
    let late: Duration = gaps[gaps.len() - 10..].iter().sum();
    assert!(early <= Duration::from_secs(7), "{early:?}");
    assert!(late > Duration::from_secs(120), "{late:?}");
    assert!(gaps.iter().all(|g| *g <= BACKOFF_CAP));
    // Jittered: the capped waits are spread, not all equal to the cap.
    let capped = &gaps[10..];
    let distinct: std::collections::BTreeSet<_> = capped.iter().collect();
    assert!(distinct.len() > capped.len() / 2, "{capped:?}");
    // Never gives up: after 40 failures over many virtual minutes it is still running.
    assert!(!handle.is_finished());
    shutdown.cancel();
    handle.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn two_devices_do_not_retry_in_lockstep() {
    let (a, ha, sa) = gaps(1, 12).await;
    let (b, hb, sb) = gaps(2, 12).await;
    assert_ne!(a, b);
    sa.cancel();
    sb.cancel();
    ha.await.unwrap();
    hb.await.unwrap();
}
