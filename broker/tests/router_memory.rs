//! The router's memory for a fleet-wide control filter stops growing once its commit log is
//! full: rumqttd counts only topic and payload bytes against a segment while a stored message
//! costs several hundred bytes, so a 4 x 1 MiB log for button presses kept growing for hours
//! of a soak at a few hundred presses a minute. Its own test binary: the allocator counts every
//! live byte of the process.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use common::*;
use companion_broker::LocalEvent;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DEVICES: usize = 1000;

/// Publishes `n` presses over the fleet's button topics and reads them all back.
async fn presses(
    publisher: &mut companion_broker::LocalClient,
    reader: &mut companion_broker::LocalClient,
    n: usize,
) {
    for batch in 0..n / 100 {
        let publishes = (0..100).map(|i| {
            let k = batch * 100 + i;
            (
                bytes::Bytes::from(format!("devices/dev-{:04}/button", k % DEVICES)),
                bytes::Bytes::from(vec![b'p'; 40]),
                false,
            )
        });
        publisher.publish_batch(publishes).await.unwrap();
        let mut got = 0;
        while got < 100 {
            match tokio::time::timeout(Duration::from_secs(10), reader.next())
                .await
                .expect("the reader keeps up")
                .unwrap()
            {
                LocalEvent::Publish { .. } => got += 1,
                LocalEvent::SubAck => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_filters_log_stops_growing_at_its_bound() {
    let app = TestApp::start().await;
    let mut reader = app.handle.local_client("reader").await.unwrap();
    reader.subscribe(&["devices/+/button"]).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .unwrap()
            .unwrap(),
        LocalEvent::SubAck
    );
    let mut publisher = app.handle.local_client("publisher").await.unwrap();

    // Enough to fill the default control log (4 x 32 KiB counted, ~60 bytes a press).
    presses(&mut publisher, &mut reader, 20_000).await;
    let full = LIVE.load(Ordering::Relaxed);
    presses(&mut publisher, &mut reader, 20_000).await;
    let after = LIVE.load(Ordering::Relaxed);
    let growth = after - full;
    eprintln!(
        "live bytes after 20,000 presses {:.1} MiB, after 40,000 {:.1} MiB",
        full as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    // With 4 x 1 MiB segments this grew by ~20,000 x ~400 bytes (about 8 MiB).
    assert!(
        growth < 2 << 20,
        "the button log grew by {growth} bytes over 20,000 more presses"
    );
    assert_eq!(app.metric("broker_messages_lost_total"), 0.0);
}
