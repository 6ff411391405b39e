//! Logging with `tracing`: plain or JSON by configuration, filtered by `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

const DEFAULT_FILTER: &str = "info,sqlx=warn,rumqttd=warn,hyper=warn,warp=warn";

/// Installs the global subscriber. Call once, from `main`. `quiet` lowers the default level
/// to warnings (for one-shot commands); `RUST_LOG` always wins.
pub fn init(format: LogFormat, quiet: bool) {
    let default = if quiet { "warn" } else { DEFAULT_FILTER };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging was already initialised: {e}");
    }
}
