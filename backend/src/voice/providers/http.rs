//! The shared HTTP client: timeouts, bounded retries of requests that are safe to retry, and
//! response bodies as streams with an idle timeout.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use rand::Rng;
use tracing::{debug, warn};

use super::ProviderError;
use crate::voice::settings::VoiceSettings;

/// Most bytes of an error response kept for the message.
const ERROR_BODY_LIMIT: usize = 2_048;
/// First retry delay; doubled each attempt.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// A `Retry-After` longer than this is not waited for (the device is listening).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(2);

/// reqwest plus the voice timeouts and retry policy.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    max_retries: u32,
}

impl Http {
    pub fn new(settings: &VoiceSettings) -> Result<Self, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout())
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("companion/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Transport(e.to_string()))?;
        Ok(Self {
            client,
            request_timeout: settings.request_timeout(),
            idle_timeout: settings.stream_idle_timeout(),
            max_retries: settings.max_retries,
        })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends the request that `build` makes until it gets a success status, retrying (with
    /// backoff) only what is safe: connect failures and 429/502/503/504/529, where the
    /// provider did no work. Timeouts are not retried: the provider may be generating.
    pub async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        let mut attempt = 0;
        loop {
            let result = tokio::time::timeout(self.request_timeout, build().send()).await;
            let (error, retry_after) = match result {
                Err(_) => return Err(ProviderError::Timeout(self.request_timeout)),
                Ok(Ok(resp)) if resp.status().is_success() => return Ok(resp),
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let body = self.error_body(resp).await;
                    let err = ProviderError::Status { status, body };
                    if matches!(status, 429 | 502 | 503 | 504 | 529) {
                        (err, retry_after)
                    } else {
                        return Err(err);
                    }
                }
                Ok(Err(e)) if e.is_connect() => (ProviderError::Connect(source_chain(&e)), None),
                Ok(Err(e)) if e.is_timeout() => {
                    return Err(ProviderError::Timeout(self.request_timeout))
                }
                Ok(Err(e)) => return Err(ProviderError::Transport(source_chain(&e))),
            };
            if attempt >= self.max_retries || retry_after.is_some_and(|d| d > RETRY_AFTER_MAX) {
                return Err(error);
            }
            let backoff = RETRY_BASE * 2u32.pow(attempt)
                + Duration::from_millis(rand::rng().random_range(0..50));
            let delay = retry_after.map_or(backoff, |d| d.max(backoff));
            warn!(error = %error, attempt, delay_ms = delay.as_millis() as u64, "provider request failed, retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// The whole body, within the request timeout.
    pub async fn body(&self, resp: reqwest::Response) -> Result<Bytes, ProviderError> {
        match tokio::time::timeout(self.request_timeout, resp.bytes()).await {
            Err(_) => Err(ProviderError::Timeout(self.request_timeout)),
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => Err(ProviderError::Transport(source_chain(&e))),
        }
    }

    /// The body as a stream of chunks; a gap longer than the idle timeout is an error.
    pub fn chunks(
        &self,
        resp: reqwest::Response,
    ) -> impl Stream<Item = Result<Bytes, ProviderError>> + Send + 'static {
        let idle = self.idle_timeout;
        let inner = resp.bytes_stream();
        futures::stream::unfold(Some(Box::pin(inner)), move |state| async move {
            let mut inner = state?;
            match tokio::time::timeout(idle, inner.next()).await {
                Err(_) => Some((Err(ProviderError::Timeout(idle)), None)),
                Ok(None) => None,
                Ok(Some(Ok(b))) => Some((Ok(b), Some(inner))),
                Ok(Some(Err(e))) => Some((Err(ProviderError::Transport(source_chain(&e))), None)),
            }
        })
    }

    async fn error_body(&self, resp: reqwest::Response) -> String {
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        let read = async {
            while let Some(Ok(chunk)) = stream.next().await {
                body.extend_from_slice(&chunk);
                if body.len() >= ERROR_BODY_LIMIT {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_millis(500), read)
            .await
            .is_err()
        {
            debug!("error body not read in time");
        }
        body.truncate(ERROR_BODY_LIMIT);
        String::from_utf8_lossy(&body).trim().to_owned()
    }
}

/// An error and its causes on one line (reqwest's Display stops at the outer error).
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Joins a base URL and a path without doubling or losing the slash.
pub fn join(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}
