//! The one set of migrations applies on SQLite and PostgreSQL, and again without change.

mod common;

use companion_backend::db::Db;
use companion_backend::settings::{Secret, Settings};
use sqlx::Row;

const TABLES: [&str; 14] = [
    "devices",
    "device_tokens",
    "admin_tokens",
    "enrollments",
    "device_personas",
    "device_configs",
    "conversation_messages",
    "audit_log",
    "telemetry_latest",
    "presence",
    "replicas",
    "device_owners",
    "cluster_rules",
    "_sqlx_migrations",
];

async fn migrate_twice_and_use(settings: Settings) {
    let db = Db::connect(&settings).await.expect("connect");
    db.migrate().await.expect("first migration");
    db.migrate().await.expect("second migration is a no-op");
    for table in TABLES {
        let n: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) AS n FROM {table}"
        )))
        .fetch_one(db.pool())
        .await
        .unwrap_or_else(|e| panic!("table {table}: {e}"))
        .try_get("n")
        .unwrap();
        if table == "_sqlx_migrations" {
            assert_eq!(n, companion_backend::db::MIGRATOR.iter().count() as i64);
        }
    }
    // Portable SQL round trip: 0/1 flags, BIGINT times, NULLs, cascade deletes.
    sqlx::query(
        "INSERT INTO devices (device_id, name, device_type, capabilities, enabled, created_at_ms, updated_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind("pi-1")
    .bind("Kitchen")
    .bind("raspberry_pi")
    .bind("audio_input,leds")
    .bind(1i64)
    .bind(1_700_000_000_000i64)
    .bind(1_700_000_000_000i64)
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO presence (device_id, online, last_seen_ms, connected_since_ms) VALUES ($1, $2, $3, NULL)",
    )
    .bind("pi-1")
    .bind(0i64)
    .bind(5i64)
    .execute(db.pool())
    .await
    .unwrap();
    let row = sqlx::query("SELECT d.enabled, p.online, p.connected_since_ms FROM devices d JOIN presence p ON p.device_id = d.device_id")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(row.try_get::<i64, _>("enabled").unwrap(), 1);
    assert_eq!(row.try_get::<i64, _>("online").unwrap(), 0);
    assert_eq!(
        row.try_get::<Option<i64>, _>("connected_since_ms").unwrap(),
        None
    );
    sqlx::query("DELETE FROM devices WHERE device_id = $1")
        .bind("pi-1")
        .execute(db.pool())
        .await
        .unwrap();
    let left: i64 = sqlx::query("SELECT COUNT(*) AS n FROM presence")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert_eq!(left, 0, "presence rows go with their device");
    db.close().await;

    // A new connection (a restart) migrates again without error.
    let db = Db::connect(&settings).await.expect("reconnect");
    db.migrate().await.expect("migration after restart");
    db.close().await;
}

#[tokio::test]
async fn migrations_apply_twice_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        data_dir: dir.path().join("data"),
        ..Settings::default()
    };
    migrate_twice_and_use(settings).await;
    assert!(dir.path().join("data/companion.db").exists());
}

#[tokio::test]
async fn migrations_apply_twice_on_postgres() {
    let Some(url) = common::fresh_pg_database().await else {
        return;
    };
    let mut settings = Settings::default();
    settings.database.url = Some(Secret::new(url));
    migrate_twice_and_use(settings).await;
}
