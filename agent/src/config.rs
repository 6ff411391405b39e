//! Agent settings from the environment and the `.env` file that `provisioning/setup_device.sh`
//! writes. Every invalid or missing value is reported with the variable's name; the token is a
//! [`Secret`] and never printed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use companion_schema::DeviceId;

/// Where `setup_device.sh` writes the agent's environment.
pub const DEFAULT_ENV_FILE: &str = "/opt/companion/.env";
/// Default offline buffer size.
pub const DEFAULT_OFFLINE_BUFFER_BYTES: u64 = 10 * 1024 * 1024;
/// Default Opus bitrate.
pub const DEFAULT_OPUS_BITRATE: i32 = 24_000;

/// A value that must never appear in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A bad setting, named by its variable. Exit status 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is not set")]
    Missing { var: &'static str },
    #[error("{var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
    #[error("reading the env file {path}: {source}")]
    EnvFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a KEY=VALUE line")]
    EnvLine { path: PathBuf, line: usize },
}

impl ConfigError {
    /// The variable this error names, if any.
    pub fn var(&self) -> Option<&'static str> {
        match self {
            ConfigError::Missing { var } | ConfigError::Invalid { var, .. } => Some(var),
            _ => None,
        }
    }
}

/// Where the control plane is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    /// MQTT over WebSocket (`wss://`, `ws://`) on [`BrokerUrl::path`].
    pub websocket: bool,
    pub host: String,
    pub port: u16,
    /// The HTTP path of a WebSocket URL (`/mqtt` when none is given); `/` otherwise.
    pub path: String,
}

impl BrokerUrl {
    /// `mqtts://host[:8883]` or `wss://host[:443][/path]` (MQTT over WebSocket, for networks
    /// that allow only 443; the path defaults to `/mqtt`); `mqtt://host[:1883]` and
    /// `ws://host[:80][/path]` without TLS for a loopback host only.
    pub fn parse(s: &str) -> Result<Self, String> {
        let schemes = [
            ("mqtts://", true, false, 8883),
            ("mqtt://", false, false, 1883),
            ("wss://", true, true, 443),
            ("ws://", false, true, 80),
        ];
        let Some((tls, websocket, default_port, rest)) = schemes
            .iter()
            .find_map(|(p, tls, ws, port)| s.strip_prefix(p).map(|r| (*tls, *ws, *port, r)))
        else {
            return Err(
                "must start with mqtts:// or wss:// (or mqtt://, ws:// for loopback development)"
                    .into(),
            );
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = match (websocket, path) {
            (true, "" | "/") => "/mqtt".to_owned(),
            (true, p) => p.to_owned(),
            (false, "" | "/") => "/".to_owned(),
            (false, p) => return Err(format!("an MQTT URL has no path ({p:?})")),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (authority, default_port),
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("bad host {host:?}"));
        }
        if !tls && !is_loopback(host) {
            return Err(
                "mqtt:// and ws:// (without TLS) are allowed only for a loopback host".into(),
            );
        }
        Ok(Self {
            tls,
            websocket,
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The broker address rumqttc wants: the host, or for WebSocket the whole URL.
    pub fn broker_addr(&self) -> String {
        if !self.websocket {
            return self.host.clone();
        }
        let scheme = if self.tls { "wss" } else { "ws" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}{}", self.port, self.path)
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// The GPIO pins of the RGB LED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedPins {
    pub r: u8,
    pub g: u8,
    pub b: u8,
}

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device_id: DeviceId,
    pub url: BrokerUrl,
    pub token: Secret,
    /// CA that signed the server certificate; required for `mqtts://`.
    pub ca_cert: Option<PathBuf>,
    pub sample_rate: u32,
    pub channels: u16,
    pub cache_dir: PathBuf,
    pub capture_device: String,
    pub playback_device: String,
    /// Button name to BCM pin.
    pub button_pins: BTreeMap<String, u8>,
    pub led_pins: LedPins,
    /// A sysfs file holding the battery percentage (`/sys/class/power_supply/*/capacity`).
    pub battery_path: Option<PathBuf>,
    pub opus_bitrate: i32,
    pub offline_buffer_bytes: u64,
    /// MQTT keepalive, seconds.
    pub keepalive_s: u64,
}

impl Settings {
    /// Settings for tests and tools, with defaults for everything but the identity.
    pub fn new(device_id: DeviceId, url: BrokerUrl, token: Secret, cache_dir: PathBuf) -> Self {
        Self {
            device_id,
            url,
            token,
            ca_cert: None,
            sample_rate: 16_000,
            channels: 1,
            cache_dir,
            capture_device: "default".into(),
            playback_device: "default".into(),
            button_pins: parse_pin_map("BUTTON_PINS", "talk=17,persona=27").unwrap_or_default(),
            led_pins: LedPins { r: 5, g: 6, b: 13 },
            battery_path: None,
            opus_bitrate: DEFAULT_OPUS_BITRATE,
            offline_buffer_bytes: DEFAULT_OFFLINE_BUFFER_BYTES,
            keepalive_s: 30,
        }
    }

    /// Reads the env file (if it exists, or must exist when `required`) and overlays the
    /// process environment.
    pub fn load(env_file: &Path, required: bool) -> Result<Self, ConfigError> {
        let mut vars = match std::fs::read_to_string(env_file) {
            Ok(text) => parse_env_file(env_file, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => HashMap::new(),
            Err(source) => {
                return Err(ConfigError::EnvFile {
                    path: env_file.to_owned(),
                    source,
                })
            }
        };
        vars.extend(std::env::vars());
        Self::from_vars(&vars)
    }

    /// Builds settings from a map of variables.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |var: &'static str| vars.get(var).map(|s| s.trim()).filter(|s| !s.is_empty());
        let req = |var: &'static str| get(var).ok_or(ConfigError::Missing { var });
        let invalid = |var: &'static str, reason: String| ConfigError::Invalid { var, reason };

        let device_id =
            DeviceId::parse(req("DEVICE_ID")?).map_err(|e| invalid("DEVICE_ID", e.to_string()))?;
        let url = BrokerUrl::parse(req("CONTROL_PLANE_URL")?)
            .map_err(|r| invalid("CONTROL_PLANE_URL", r))?;
        let token = Secret::new(req("DEVICE_AUTH_TOKEN")?);
        let ca_cert = get("CA_CERT").map(PathBuf::from);
        if url.tls {
            match &ca_cert {
                None => return Err(ConfigError::Missing { var: "CA_CERT" }),
                Some(p) if !p.is_file() => {
                    return Err(invalid("CA_CERT", format!("{} is not a file", p.display())))
                }
                Some(_) => {}
            }
        }
        let num = |var: &'static str, default: u64| -> Result<u64, ConfigError> {
            get(var).map_or(Ok(default), |s| {
                s.parse::<u64>()
                    .map_err(|_| invalid(var, format!("{s:?} is not a number")))
            })
        };
        let sample_rate = num("AUDIO_SAMPLE_RATE", 16_000)?;
        if sample_rate != 16_000 {
            return Err(invalid(
                "AUDIO_SAMPLE_RATE",
                format!("{sample_rate} is not supported; use 16000"),
            ));
        }
        let channels = num("AUDIO_CHANNELS", 1)?;
        if channels != 1 {
            return Err(invalid(
                "AUDIO_CHANNELS",
                format!("{channels} is not supported; use 1"),
            ));
        }
        let cache_dir = PathBuf::from(req("CACHE_DIR")?);
        let button_pins = parse_pin_map(
            "BUTTON_PINS",
            get("BUTTON_PINS").unwrap_or("talk=17,persona=27"),
        )?;
        let leds = parse_pin_map("LED_PINS", get("LED_PINS").unwrap_or("r=5,g=6,b=13"))?;
        let pin = |c: &str| {
            leds.get(c).copied().ok_or_else(|| {
                invalid(
                    "LED_PINS",
                    format!("needs r=, g= and b= pins; {c} is missing"),
                )
            })
        };
        let led_pins = LedPins {
            r: pin("r")?,
            g: pin("g")?,
            b: pin("b")?,
        };
        let opus_bitrate = num("OPUS_BITRATE", DEFAULT_OPUS_BITRATE as u64)?;
        if !(6_000..=64_000).contains(&opus_bitrate) {
            return Err(invalid("OPUS_BITRATE", "must be 6000..=64000".into()));
        }
        let offline_buffer_bytes = num("OFFLINE_BUFFER_BYTES", DEFAULT_OFFLINE_BUFFER_BYTES)?;
        if offline_buffer_bytes < 64 * 1024 {
            return Err(invalid(
                "OFFLINE_BUFFER_BYTES",
                "must be at least 65536".into(),
            ));
        }
        let keepalive_s = num("MQTT_KEEPALIVE_S", 30)?;
        if !(5..=600).contains(&keepalive_s) {
            return Err(invalid("MQTT_KEEPALIVE_S", "must be 5..=600".into()));
        }
        Ok(Self {
            device_id,
            url,
            token,
            ca_cert,
            sample_rate: sample_rate as u32,
            channels: channels as u16,
            cache_dir,
            capture_device: get("AUDIO_CAPTURE_DEVICE").unwrap_or("default").to_owned(),
            playback_device: get("AUDIO_PLAYBACK_DEVICE").unwrap_or("default").to_owned(),
            button_pins,
            led_pins,
            battery_path: get("BATTERY_PATH").map(PathBuf::from),
            opus_bitrate: opus_bitrate as i32,
            offline_buffer_bytes,
            keepalive_s,
        })
    }
}

/// Parses `name=pin,name=pin`.
pub fn parse_pin_map(var: &'static str, s: &str) -> Result<BTreeMap<String, u8>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, pin) = part.split_once('=').ok_or_else(|| ConfigError::Invalid {
            var,
            reason: format!("{part:?} is not name=pin"),
        })?;
        let pin = pin
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 27)
            .ok_or_else(|| ConfigError::Invalid {
                var,
                reason: format!("{pin:?} is not a BCM pin (0-27)"),
            })?;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ConfigError::Invalid {
                var,
                reason: format!("{name:?} is not a name"),
            });
        }
        if out.insert(name.to_owned(), pin).is_some() {
            return Err(ConfigError::Invalid {
                var,
                reason: format!("{name} appears twice"),
            });
        }
    }
    Ok(out)
}

/// Parses a `.env` file: `KEY=VALUE` lines, `#` comments, optional `export ` and quotes.
pub fn parse_env_file(path: &Path, text: &str) -> Result<HashMap<String, String>, ConfigError> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line.split_once('=').ok_or_else(|| ConfigError::EnvLine {
            path: path.to_owned(),
            line: i + 1,
        })?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        out.insert(k.trim().to_owned(), v.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, String> {
        [
            ("DEVICE_ID", "pi-1"),
            ("CONTROL_PLANE_URL", "mqtt://127.0.0.1:1883"),
            ("DEVICE_AUTH_TOKEN", "s3cret-token"),
            ("CACHE_DIR", "/tmp/cache"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn a_minimal_environment_gives_the_documented_defaults() {
        let s = Settings::from_vars(&base()).unwrap();
        assert_eq!(s.device_id.as_str(), "pi-1");
        assert_eq!(s.url.port, 1883);
        assert_eq!(s.sample_rate, 16_000);
        assert_eq!(s.capture_device, "default");
        assert_eq!(s.button_pins["talk"], 17);
        assert_eq!(s.led_pins, LedPins { r: 5, g: 6, b: 13 });
        assert_eq!(s.offline_buffer_bytes, 10 * 1024 * 1024);
    }

    #[test]
    fn the_token_never_appears_in_debug_output() {
        let s = Settings::from_vars(&base()).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("[redacted]"));
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases: &[(&str, Option<&str>)] = &[
            ("DEVICE_ID", None),
            ("DEVICE_ID", Some("Bad_Id")),
            ("CONTROL_PLANE_URL", Some("http://x")),
            ("CONTROL_PLANE_URL", Some("mqtt://example.com")),
            ("DEVICE_AUTH_TOKEN", None),
            ("AUDIO_SAMPLE_RATE", Some("44100")),
            ("AUDIO_CHANNELS", Some("two")),
            ("CACHE_DIR", None),
            ("BUTTON_PINS", Some("talk=99")),
            ("LED_PINS", Some("r=5,g=6")),
        ];
        for (var, value) in cases {
            let mut vars = base();
            match value {
                Some(v) => vars.insert(var.to_string(), v.to_string()),
                None => vars.remove(*var),
            };
            let err = Settings::from_vars(&vars).unwrap_err();
            assert_eq!(err.var(), Some(*var), "{var}={value:?}: {err}");
            assert!(err.to_string().contains(var));
        }
    }

    #[test]
    fn mqtts_requires_an_existing_ca_cert() {
        let mut vars = base();
        vars.insert(
            "CONTROL_PLANE_URL".into(),
            "mqtts://companion.example:8883".into(),
        );
        assert_eq!(
            Settings::from_vars(&vars).unwrap_err().var(),
            Some("CA_CERT")
        );
        vars.insert("CA_CERT".into(), "/nonexistent/ca.pem".into());
        assert_eq!(
            Settings::from_vars(&vars).unwrap_err().var(),
            Some("CA_CERT")
        );
    }

    #[test]
    fn env_files_allow_comments_exports_and_quotes() {
        let text = "# written by setup_device.sh\nexport DEVICE_ID=pi-2\nCACHE_DIR=\"/var/cache/companion\"\n\nDEVICE_AUTH_TOKEN='a=b'\n";
        let vars = parse_env_file(Path::new("x"), text).unwrap();
        assert_eq!(vars["DEVICE_ID"], "pi-2");
        assert_eq!(vars["CACHE_DIR"], "/var/cache/companion");
        assert_eq!(vars["DEVICE_AUTH_TOKEN"], "a=b");
        assert!(parse_env_file(Path::new("x"), "NOEQUALS\n").is_err());
    }

    #[test]
    fn broker_urls_default_their_ports() {
        assert_eq!(BrokerUrl::parse("mqtts://h").unwrap().port, 8883);
        assert_eq!(BrokerUrl::parse("mqtt://localhost").unwrap().port, 1883);
        assert_eq!(BrokerUrl::parse("mqtts://h:9000/").unwrap().port, 9000);
        assert!(BrokerUrl::parse("mqtts://h:x").is_err());
        assert!(BrokerUrl::parse("mqtts://h/path").is_err());
    }

    #[test]
    fn websocket_urls_carry_their_path() {
        let u = BrokerUrl::parse("wss://api.example.com").unwrap();
        assert!(u.tls && u.websocket);
        assert_eq!((u.port, u.path.as_str()), (443, "/mqtt"));
        assert_eq!(u.broker_addr(), "wss://api.example.com:443/mqtt");
        let u = BrokerUrl::parse("wss://api.example.com:8443/ws/mqtt").unwrap();
        assert_eq!(u.broker_addr(), "wss://api.example.com:8443/ws/mqtt");
        let u = BrokerUrl::parse("ws://[::1]:8083/").unwrap();
        assert!(!u.tls && u.websocket);
        assert_eq!(u.broker_addr(), "ws://[::1]:8083/mqtt");
        assert!(
            BrokerUrl::parse("ws://example.com/mqtt").is_err(),
            "plain only on loopback"
        );
        assert_eq!(BrokerUrl::parse("mqtts://h").unwrap().broker_addr(), "h");
    }
}
