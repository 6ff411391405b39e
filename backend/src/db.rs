//! Storage: one sqlx `AnyPool` over SQLite (default, WAL) or PostgreSQL, and the migrations
//! that serve both.
//!
//! Queries are written once in portable SQL with `$1`-style parameters (both drivers accept
//! them); times are `BIGINT` milliseconds since the Unix epoch; hashes are hex `TEXT`.

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::AnyPool;

use crate::settings::{redact_url, DatabaseKind, Settings};

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("database {url} is unreachable: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

/// A handle to the database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    kind: DatabaseKind,
    /// SQLite's single writer, taken in process by the frequent writers (telemetry batches,
    /// persona switches, presence) so they queue here instead of sleeping in SQLite's busy
    /// handler.
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Db {
    /// Connects (creating the SQLite file and data dir when needed). Does not migrate.
    pub async fn connect(settings: &Settings) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let kind = settings.database_kind().map_err(|e| DbError::Connect {
            url: String::new(),
            source: sqlx::Error::Configuration(e.to_string().into()),
        })?;
        let url = settings.database_url();
        if kind == DatabaseKind::Sqlite {
            std::fs::create_dir_all(&settings.data_dir).map_err(|source| DbError::DataDir {
                path: settings.data_dir.display().to_string(),
                source,
            })?;
        }
        let connect_err = |source| DbError::Connect {
            url: redact_url(url.expose()),
            source,
        };
        let options: AnyConnectOptions = url.expose().parse().map_err(connect_err)?;
        if kind == DatabaseKind::Sqlite {
            use_wal(&options).await.map_err(connect_err)?;
        }
        let max = match kind {
            // One writer at a time anyway; a few readers beside it.
            DatabaseKind::Sqlite => settings.database.max_connections.min(8),
            DatabaseKind::Postgres => settings.database.max_connections,
        };
        let sqlite = kind == DatabaseKind::Sqlite;
        let pool = AnyPoolOptions::new()
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if sqlite {
                        // WAL (set by `use_wal`) stays consistent with NORMAL; only the last
                        // commits before a power loss can be rolled back, and each commit no
                        // longer waits for an fsync.
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .max_connections(max)
            // A liveness round trip per acquire guards against servers that went away; an
            // SQLite connection is a file and a thread in this process.
            .test_before_acquire(!sqlite)
            .acquire_timeout(Duration::from_millis(settings.database.acquire_timeout_ms))
            .connect_with(options)
            .await
            .map_err(connect_err)?;
        Ok(Self {
            pool,
            kind,
            writer: Default::default(),
        })
    }

    /// On SQLite, `backend_sqlite_memory_bytes`: what the library holds (the pooled
    /// connections' page caches, up to 2 MiB each by default, and prepared statements), so
    /// a growing RSS can be told apart from it.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        if self.kind == DatabaseKind::Sqlite {
            registry.register(
                "backend_sqlite_memory_bytes",
                "Memory held by SQLite (page caches, prepared statements)",
                SqliteMemory,
            );
        }
    }

    /// Applies pending migrations. Idempotent.
    pub async fn migrate(&self) -> Result<(), DbError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Answers whether the database responds, within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let q = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool);
        matches!(tokio::time::timeout(timeout, q).await, Ok(Ok(1)))
    }

    /// Held around a write transaction on SQLite (see `writer`); nothing on PostgreSQL.
    pub async fn write_gate(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.kind {
            DatabaseKind::Sqlite => Some(self.writer.lock().await),
            DatabaseKind::Postgres => None,
        }
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn kind(&self) -> DatabaseKind {
        self.kind
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Puts an SQLite database in WAL mode (a no-op if it is; in-memory databases stay in
/// memory mode). sqlx 0.9 no longer sets a journal mode, so a new file would stay in rollback
/// mode: every commit writes a journal and fsyncs twice, about 260 fsyncs and 6,000 page
/// writes a second at 10,000 telemetry messages a second. The mode is a property of the file
/// and changing it takes an exclusive lock that SQLite's busy handler does not wait for, so
/// it is set once, on a connection of its own, before the pool opens any.
async fn use_wal(options: &AnyConnectOptions) -> Result<(), sqlx::Error> {
    use sqlx::{ConnectOptions, Connection};
    let mut conn = options.connect().await?;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    match mode.to_ascii_lowercase().as_str() {
        "wal" | "memory" => Ok(()),
        other => Err(sqlx::Error::Configuration(
            format!("SQLite refused WAL mode (journal mode is {other})").into(),
        )),
    }
}

/// Whether `e` means the database cannot be reached right now (stopped, restarting, network
/// gone, every pooled connection busy) rather than a bad query or a broken constraint: the
/// caller may answer "try again" instead of "internal error".
pub fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // A connection closed during the startup exchange (a proxy or load balancer in front
        // of a stopped server accepts, then hangs up) surfaces as a protocol error.
        sqlx::Error::Protocol(_) => true,
        // PostgreSQL: connection exceptions (08…), operator intervention (57P…: shutting
        // down, cannot connect now), too many connections (53300).
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
        _ => false,
    }
}

/// Milliseconds since the Unix epoch, as stored in the database.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// PostgreSQL for the crate's unit tests, by the same rule as the integration tests'
/// `tests/common`: `DATABASE_URL` names a server whose role may create databases; without it a
/// test is skipped, except in CI (`CI=true`), where PostgreSQL tests are required.
/// Read when `/metrics` is rendered.
#[derive(Debug)]
struct SqliteMemory;

impl prometheus_client::encoding::EncodeMetric for SqliteMemory {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        // SAFETY: sqlite3_memory_used takes no arguments and only reads SQLite's own
        // (mutex-protected) allocation counter.
        let used = unsafe { libsqlite3_sys::sqlite3_memory_used() };
        encoder.encode_gauge(&used)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Gauge
    }
}

#[cfg(test)]
pub(crate) mod test_pg {
    /// The server's admin URL, or `None` (skip) outside CI.
    pub fn admin_url() -> Option<String> {
        match std::env::var("DATABASE_URL") {
            Ok(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => Some(u),
            _ => {
                assert!(
                    !std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false")),
                    "CI is set but DATABASE_URL is not a postgres:// URL"
                );
                None
            }
        }
    }

    /// A database of its own on that server; its URL.
    pub async fn fresh_database() -> Option<String> {
        use sqlx::Connection;
        let admin = admin_url()?;
        let name = format!("companion_unit_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let (base, _) = admin.rsplit_once('/').unwrap();
        Some(format!("{base}/{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::{unavailable, Db};
    use crate::settings::Settings;

    /// A new SQLite file is put in WAL mode (sqlx 0.9 leaves rollback mode), and stays in it
    /// when opened again.
    #[tokio::test]
    async fn a_new_sqlite_database_is_in_wal_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = Settings {
            data_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        for _ in 0..2 {
            let db = Db::connect(&settings).await.expect("connect");
            db.migrate().await.expect("migrate");
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(db.pool())
                .await
                .expect("journal_mode");
            assert_eq!(mode.to_ascii_lowercase(), "wal");
            db.close().await;
        }
        assert!(dir.path().join("companion.db").exists());
    }

    #[test]
    fn connection_failures_are_unavailable_query_errors_are_not() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(unavailable(&sqlx::Error::Io(io)));
        assert!(unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!unavailable(&sqlx::Error::RowNotFound));
        assert!(!unavailable(&sqlx::Error::ColumnNotFound("x".into())));
    }
}
