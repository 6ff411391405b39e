//! Serving the router over plain TCP or TLS (rustls), with one task per connection, a TLS
//! handshake timeout, graceful shutdown, and the peer address attached to every request
//! (warp 0.4 has no TLS of its own and no public way to pass the address of a custom
//! listener's connections).

use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use companion_broker::proxy::Networks;

/// The request's client, attached to each request as an extension: the connection's peer, or
/// behind a trusted proxy the address it forwarded (see [`super::client_addr`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// How long a client has to finish the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long open connections get to finish after shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Accepts connections until `shutdown`, then lets open ones finish (bounded by
/// [`DRAIN_TIMEOUT`]).
pub async fn serve(
    filter: BoxedFilter<(Response,)>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    trusted_proxies: Networks,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let trusted_proxies = std::sync::Arc::new(trusted_proxies);
    let graceful = GracefulShutdown::new();
    loop {
        // Cases: a new connection; shutdown.
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let filter = filter.clone();
        let tls = tls.clone();
        let trusted_proxies = trusted_proxies.clone();
        let watcher = graceful.watcher();
        tracker.spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let forwarded = req.headers().get_all("x-forwarded-for");
                    let client = super::client_addr(peer, forwarded, &trusted_proxies);
                    req.extensions_mut().insert(ClientAddr(client));
                    let mut svc = warp::service(filter.clone());
                    svc.call(req)
                },
            );
            let builder = Builder::new(TokioExecutor::new());
            let result = match tls {
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let tls_stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, %peer, "https handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "https handshake timed out");
                                return;
                            }
                        };
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(tls_stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("open http connections did not finish in time");
    }
}
