//! A TCP proxy the test controls, to take a dependency away (a database, a device's link)
//! and give it back, in one of two ways:
//!
//! - [`TcpProxy::cut`]: every forwarded connection is closed and new ones are closed at once,
//!   as a stopped server would;
//! - [`TcpProxy::black_hole`]: a link that silently stops carrying packets (a mobile network
//!   dropping out, a NAT forgetting the flow). No socket is closed and nothing is forwarded in
//!   either direction, not even a FIN, so each side can only notice by its own timers; new
//!   connections are accepted and then hear nothing, like a handshake into the void. What
//!   either side sent meanwhile is delivered on [`TcpProxy::restore`], as TCP's
//!   retransmissions would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Bytes read from one side before they are written to the other.
const CHUNK: usize = 16 * 1024;

/// Forwards every connection to `target` until cut or black-holed.
#[derive(Clone)]
pub struct TcpProxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Cancelled on `cut`: ends every forwarded connection of that generation.
    generation: Arc<Mutex<CancellationToken>>,
    /// False during a black hole: nothing is forwarded.
    passing: Arc<watch::Sender<bool>>,
    accepted: Arc<AtomicU64>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            up: Arc::new(AtomicBool::new(true)),
            generation: Arc::new(Mutex::new(CancellationToken::new())),
            passing: Arc::new(watch::channel(true).0),
            accepted: Arc::new(AtomicU64::new(0)),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            loop {
                // Runs until the test's runtime ends.
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if !p.up.load(Ordering::SeqCst) {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                p.accepted.fetch_add(1, Ordering::Relaxed);
                let cut = p.generation.lock().unwrap().clone();
                let passing = p.passing.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    // Cases: cut (both sides closed); both directions ended.
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = async { tokio::join!(pipe(ir, ow, passing.clone()), pipe(or, iw, passing)) } => {}
                    }
                });
            }
        });
        proxy
    }

    /// Closes every forwarded connection and refuses new ones, as a stopped server would.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut g = self.generation.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }

    /// Stops forwarding on every connection, both ways, without closing any.
    pub fn black_hole(&self) {
        self.passing.send_replace(false);
    }

    /// Ends a cut or a black hole.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.passing.send_replace(true);
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Copies `r` to `w` while the link passes. During a black hole nothing is read (the
/// sender's bytes wait in its socket buffers), and bytes read just before it, or an end of
/// stream, are held until it ends.
async fn pipe(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, mut passing: watch::Receiver<bool>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if passing.wait_for(|p| *p).await.is_err() {
            return;
        }
        // Cases: bytes (or the end) from the reading side; a black hole began.
        let n = tokio::select! {
            read = r.read(&mut buf) => read.unwrap_or(0),
            _ = passing.wait_for(|p| !*p) => continue,
        };
        if passing.wait_for(|p| *p).await.is_err() {
            return;
        }
        if n == 0 {
            let _ = w.shutdown().await;
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
