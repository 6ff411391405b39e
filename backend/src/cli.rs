//! Offline administration used by the `companion` binary's subcommands: admin tokens, bulk
//! device creation, backups and the container health check.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::audit::{AuditEntry, AuditLog, Outcome};
use crate::db::Db;
use crate::registry::model::{Capability, DeviceName, DeviceType};
use crate::registry::{AdminAuth, DeviceStore, NewDevice};
use crate::secrets;
use crate::settings::{DatabaseKind, Settings};

async fn open(settings: &Settings) -> anyhow::Result<Db> {
    let db = Db::connect(settings).await?;
    db.migrate().await?;
    Ok(db)
}

fn admin_auth(settings: &Settings, db: &Db) -> anyhow::Result<AdminAuth> {
    let (bootstrap, _) = secrets::bootstrap_admin_token(settings)?;
    let jwt = secrets::jwt_secret(settings)?;
    Ok(AdminAuth::new(db.clone(), &bootstrap, &jwt))
}

/// Creates a named admin token and returns it (the caller prints it once).
pub async fn admin_token_create(settings: &Settings, name: &str) -> anyhow::Result<String> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        bail!("--name must be 1-64 printable characters");
    }
    let db = open(settings).await?;
    let token = admin_auth(settings, &db)?.create_token(name).await?;
    AuditLog::new(db.clone())
        .record(AuditEntry::new("cli", "admin_token.create", Outcome::Success).target(name))
        .await;
    db.close().await;
    Ok(token.expose().to_owned())
}

/// Revokes a named admin token; false when no active token has that name.
pub async fn admin_token_revoke(settings: &Settings, name: &str) -> anyhow::Result<bool> {
    let db = open(settings).await?;
    let revoked = admin_auth(settings, &db)?.revoke_token(name).await?;
    AuditLog::new(db.clone())
        .record(
            AuditEntry::new(
                "cli",
                "admin_token.revoke",
                if revoked {
                    Outcome::Success
                } else {
                    Outcome::Failure
                },
            )
            .target(name),
        )
        .await;
    db.close().await;
    Ok(revoked)
}

/// Registers `count` simulated devices and writes `device_id,token` lines to `out` (0600).
pub async fn devices_bulk_create(
    settings: &Settings,
    count: u32,
    prefix: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let db = open(settings).await?;
    let store = DeviceStore::new(db.clone());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    for i in 0..count {
        let name = DeviceName::parse(&format!("{prefix} {i}"))
            .map_err(|e| anyhow::anyhow!("--prefix: {e}"))?;
        let (device, token) = store
            .create(&NewDevice {
                device_id: None,
                name,
                device_type: DeviceType::Simulated,
                capabilities: Capability::ALL
                    .into_iter()
                    .collect::<std::collections::BTreeSet<_>>(),
            })
            .await?;
        writeln!(file, "{},{}", device.device_id, token.expose())?;
    }
    file.sync_all()?;
    AuditLog::new(db.clone())
        .record(
            AuditEntry::new("cli", "device.bulk_create", Outcome::Success)
                .detail(format!("count={count}")),
        )
        .await;
    db.close().await;
    Ok(())
}

/// Writes a consistent copy of the SQLite database to `out`.
pub async fn backup(settings: &Settings, out: &Path) -> anyhow::Result<()> {
    if settings.database_kind()? == DatabaseKind::Postgres {
        bail!("database.url is PostgreSQL: back it up with pg_dump (see ops/RUNBOOK.md)");
    }
    if out.exists() {
        bail!("{} exists; choose a new file", out.display());
    }
    let target = out
        .to_str()
        .context("the backup path must be valid UTF-8")?
        .replace('\'', "''");
    let db = open(settings).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM INTO '{target}'")))
        .execute(db.pool())
        .await
        .context("VACUUM INTO")?;
    db.close().await;
    Ok(())
}

/// `GET /health` on the local server (for container health checks; no curl needed).
pub async fn health(settings: &Settings, url: Option<&str>) -> anyhow::Result<()> {
    let addr = match url {
        Some(u) => u
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned(),
        None => {
            let mut a = settings.http_addr()?;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a.to_string()
        }
    };
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(
            format!("GET /health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .context("timed out")?
        .with_context(|| format!("connecting to {addr}"))?;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(32)]).into_owned();
    if head.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        bail!("unhealthy: {}", head.lines().next().unwrap_or(""))
    }
}
