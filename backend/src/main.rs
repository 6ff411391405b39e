//! `companion`: the Companion control plane. Parses arguments, loads configuration, starts
//! logging and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use companion_backend::app::{self, Listeners};
use companion_backend::cli;
use companion_backend::db::{Db, DbError};
use companion_backend::logging;
use companion_backend::settings::Settings;
use tokio_util::sync::CancellationToken;

/// Exit status for bad configuration (sysexits `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;
/// Exit status when a required service (the database) is unreachable (`EX_UNAVAILABLE`).
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "companion",
    version,
    about = "Companion control plane: MQTT broker, device registry, voice sessions, rules"
)]
struct Cli {
    /// Configuration file (TOML). Environment variables COMPANION_<SECTION>__<KEY> override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the version.
    Version,
    /// Manage admin credentials.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Manage devices offline.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Check a running server's /health (exit 0 when healthy); for container health checks.
    Health {
        /// Server address, default from http.listen.
        #[arg(long)]
        url: Option<String>,
    },
    /// Write a consistent copy of the SQLite database (PostgreSQL: use pg_dump).
    Backup {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Admin tokens besides the bootstrap one.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a named admin token and print it once.
    Create {
        #[arg(long)]
        name: String,
    },
    /// Revoke a named admin token (and every JWT issued for it).
    Revoke {
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Register N simulated devices; write `device_id,token` lines (mode 0600) for the fleet tool.
    BulkCreate {
        #[arg(long)]
        count: u32,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "fleet")]
        prefix: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Version = command {
        println!("companion {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("companion: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Subcommands other than `serve` and `migrate` print their results; unless RUST_LOG says
    // otherwise their logs are warnings only.
    let quiet = !matches!(command, Command::Serve | Command::Migrate);
    logging::init(settings.log.format, quiet);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("companion: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Serve => serve(settings).await,
            Command::Migrate => migrate(settings).await,
            Command::Version => Ok(()),
            Command::Admin {
                command: AdminCommand::Token { command },
            } => match command {
                TokenCommand::Create { name } => {
                    let token = cli::admin_token_create(&settings, &name).await?;
                    println!("{token}");
                    Ok(())
                }
                TokenCommand::Revoke { name } => {
                    if cli::admin_token_revoke(&settings, &name).await? {
                        println!("revoked {name}");
                        Ok(())
                    } else {
                        anyhow::bail!("no active admin token named {name:?}")
                    }
                }
            },
            Command::Devices {
                command: DevicesCommand::BulkCreate { count, out, prefix },
            } => {
                cli::devices_bulk_create(&settings, count, &prefix, &out).await?;
                println!("wrote {count} credentials to {}", out.display());
                Ok(())
            }
            Command::Health { url } => cli::health(&settings, url.as_deref()).await,
            Command::Backup { out } => {
                cli::backup(&settings, &out).await?;
                println!("backup written to {}", out.display());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("companion: {e:#}");
            if e.downcast_ref::<companion_backend::settings::SettingsError>()
                .is_some()
            {
                ExitCode::from(EXIT_CONFIG)
            } else if matches!(e.downcast_ref::<DbError>(), Some(DbError::Connect { .. })) {
                ExitCode::from(EXIT_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    raise_descriptor_limit(settings.mqtt.max_connections);
    let listeners = Listeners::bind(&settings).await?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    app::run(settings, listeners, shutdown).await
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    let db = Db::connect(&settings).await?;
    db.migrate().await?;
    db.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

/// Every device holds one descriptor: raise the soft limit to the hard one (systemd and most
/// shells start services at 1,024), and say so when even that is short of the configured
/// number of connections.
fn raise_descriptor_limit(max_connections: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if !ok {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    // Devices, plus database connections, HTTP clients and the process's own files.
    let wanted = max_connections as u64 + 256;
    if lim.rlim_cur < wanted {
        tracing::warn!(
            limit = lim.rlim_cur,
            wanted,
            "the open-file limit is below mqtt.max_connections; raise LimitNOFILE / ulimit -n"
        );
    }
}

/// SIGINT and SIGTERM cancel the root token.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        // Cases: SIGTERM, SIGINT.
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        companion_backend::logging::shutting_down();
        shutdown.cancel();
    });
    Ok(())
}
