//! A TCP proxy the test controls, to take a dependency away (a database, a device's link)
//! and give it back.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards every connection to `target` until cut.
#[derive(Clone)]
pub struct TcpProxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Cancelled on `cut`: ends every forwarded connection of that generation.
    generation: Arc<Mutex<CancellationToken>>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            up: Arc::new(AtomicBool::new(true)),
            generation: Arc::new(Mutex::new(CancellationToken::new())),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            loop {
                // Runs until the test's runtime ends.
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !p.up.load(Ordering::SeqCst) {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                let cut = p.generation.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    // Cases: cut (both sides closed); either side ends.
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
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

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
