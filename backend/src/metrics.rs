//! Metrics: one `prometheus_client::Registry` built at start-up, passed down, encoded by
//! `GET /metrics`. Components register their own metrics; labels never carry a device id.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label naming a topic kind (`telemetry`, `audio_up`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Content type of the Prometheus text format (0.0.4) that [`render`] produces.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Encodes every registered metric in the Prometheus text format, which `promtool check
/// metrics` accepts (the OpenMetrics encoder's `# HELP foo` for a `foo_total` sample does not).
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The route template (`/api/v1/devices/{id}`), never a raw path.
    pub endpoint: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub method: String,
    pub endpoint: &'static str,
}

/// REST API metrics.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "api_requests",
            "REST requests by method, route template and status",
            requests.clone(),
        );
        registry.register(
            "api_request_latency_seconds",
            "REST request latency by method and route template",
            latency.clone(),
        );
        Arc::new(Self { requests, latency })
    }

    pub fn observe(&self, method: &str, endpoint: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                endpoint,
                status,
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                method: method.to_owned(),
                endpoint,
            })
            .observe(took.as_secs_f64());
    }
}
