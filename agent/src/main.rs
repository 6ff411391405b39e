//! `companion-agent`: parses arguments, loads settings, starts logging and hands over to the
//! library. Exit status 64 for bad configuration, 69 for missing hardware.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use companion_agent::audio::alsa::{AlsaIn, AlsaOut};
use companion_agent::config::{Settings, DEFAULT_ENV_FILE};
use companion_agent::hw::gpio::{GpioButtons, GpioLeds};
use companion_agent::hw::sim::{self, LogLeds, SocketButtons, WavIn, WavOut};
use companion_agent::hw::{Buttons, HwError};
use companion_agent::{fleet, talk, Hardware, RunOptions};
use tokio_util::sync::CancellationToken;

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "companion-agent",
    version,
    about = "The Companion device agent"
)]
struct Cli {
    /// The environment file written by provisioning/setup_device.sh.
    #[arg(long, global = true, default_value = DEFAULT_ENV_FILE)]
    env_file: PathBuf,
    /// Pi (ALSA + GPIO) or simulated hardware; default: pi on a Raspberry Pi, else sim.
    #[arg(long, value_enum)]
    hardware: Option<HardwareKind>,
    /// Simulated microphone: a 16 kHz mono WAV file (default: a quiet tone).
    #[arg(long)]
    mic_wav: Option<PathBuf>,
    /// Simulated speaker: write each reply to reply-N.wav in this directory.
    #[arg(long)]
    speaker_dir: Option<PathBuf>,
    /// Simulated buttons from a Unix socket (lines like `talk press`) instead of stdin.
    #[arg(long)]
    button_socket: Option<PathBuf>,
    /// Publish telemetry at this interval instead of the configured one (testing).
    #[arg(long, hide = true)]
    telemetry_interval_ms: Option<u64>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum HardwareKind {
    Pi,
    Sim,
}

#[derive(Subcommand)]
enum Command {
    /// One push-to-talk utterance from a WAV file; prints the session and writes the reply.
    Talk {
        #[arg(long)]
        wav: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        /// Send the file as fast as possible instead of at speaking pace.
        #[arg(long)]
        fast: bool,
    },
    /// Simulate a fleet of devices against a server (the load tool).
    Fleet(fleet::FleetArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("companion-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Fleet(args)) = cli.command {
        return runtime.block_on(async {
            match fleet::run(args).await {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("companion-agent fleet: {e:#}");
                    ExitCode::from(EX_USAGE)
                }
            }
        });
    }
    let settings = match Settings::load(
        &cli.env_file,
        cli.env_file.as_path() != std::path::Path::new(DEFAULT_ENV_FILE),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("companion-agent: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match cli.command {
        Some(Command::Talk {
            wav,
            out,
            timeout_s,
            fast,
        }) => runtime.block_on(async {
            let opts = talk::TalkOptions {
                wav,
                out,
                timeout: Duration::from_secs(timeout_s),
                realtime: !fast,
            };
            match talk::talk(settings, opts, |line| println!("{line}")).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("companion-agent talk: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Some(Command::Fleet(_)) => ExitCode::FAILURE,
        None => runtime.block_on(agent(
            cli.hardware,
            cli.mic_wav,
            cli.speaker_dir,
            cli.button_socket,
            cli.telemetry_interval_ms,
            settings,
        )),
    }
}

async fn agent(
    kind: Option<HardwareKind>,
    mic_wav: Option<PathBuf>,
    speaker_dir: Option<PathBuf>,
    button_socket: Option<PathBuf>,
    telemetry_interval_ms: Option<u64>,
    settings: Settings,
) -> ExitCode {
    let kind = kind.unwrap_or(if companion_agent::hw::is_raspberry_pi() {
        HardwareKind::Pi
    } else {
        HardwareKind::Sim
    });
    let hardware = match kind {
        HardwareKind::Pi => pi_hardware(&settings),
        HardwareKind::Sim => Ok(sim_hardware(mic_wav, speaker_dir, button_socket)),
    };
    let hardware = match hardware {
        Ok(h) => h,
        Err(e) => {
            eprintln!("companion-agent: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    tracing::info!(device_id = %settings.device_id, host = %settings.url.host, port = settings.url.port, tls = settings.url.tls, websocket = settings.url.websocket, "starting");
    let options = RunOptions {
        telemetry_interval: telemetry_interval_ms.map(Duration::from_millis),
        ..Default::default()
    };
    match companion_agent::run(settings, hardware, options, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent failed");
            eprintln!("companion-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pi_hardware(s: &Settings) -> Result<Hardware, HwError> {
    let buttons = GpioButtons::open(&s.button_pins)?;
    let leds = GpioLeds::open(s.led_pins)?;
    Ok(Hardware {
        audio_in: Arc::new(AlsaIn {
            device: s.capture_device.clone(),
        }),
        audio_out: Arc::new(AlsaOut {
            device: s.playback_device.clone(),
        }),
        buttons: Box::new(buttons),
        leds: Box::new(leds),
    })
}

fn sim_hardware(
    mic_wav: Option<PathBuf>,
    speaker_dir: Option<PathBuf>,
    button_socket: Option<PathBuf>,
) -> Hardware {
    let buttons: Box<dyn Buttons> = match button_socket {
        Some(path) => Box::new(SocketButtons { path }),
        None => Box::new(sim::stdin_buttons()),
    };
    let (leds, _) = LogLeds::new();
    Hardware {
        audio_in: Arc::new(WavIn {
            path: mic_wav,
            realtime: true,
        }),
        audio_out: Arc::new(WavOut::new(speaker_dir, None, true)),
        buttons,
        leds: Box::new(leds),
    }
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    // Cases: SIGTERM; SIGINT.
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    shutdown.cancel();
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: under systemd the journal gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
