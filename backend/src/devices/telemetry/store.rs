//! Telemetry storage: the multi-row upsert into `telemetry_latest` a flush is written with,
//! and the last stored sequence number of a device.

use std::sync::Arc;

use companion_schema::DeviceId;
use sqlx::pool::PoolConnection;
use sqlx::{Any, Connection};

use super::{Row, Slot};
use crate::db::Db;
use crate::settings::DatabaseKind;

/// Rows per upsert statement, at most: a batch is written as statements of 256, 128, .., 1
/// rows (its size in binary), so that few distinct statements exist and each stays prepared,
/// and a flush of a few hundred devices is a handful of round trips to SQLite's worker thread
/// instead of one per device (that was a quarter of the server's CPU at 10,000 msg/s).
pub(super) const MAX_ROWS: usize = 256;
/// Parameters bound per row.
pub(super) const COLUMNS: usize = 10;

/// The upsert of `rows` rows. Columns of a `VALUES` list are `column1`, `column2`, .. in both
/// SQLite and PostgreSQL. A `WHERE` clause keeps SQLite's parser from reading `ON CONFLICT` as
/// a join. `checked`: rows of devices that are gone (deleted since they connected) are
/// skipped; unchecked, such a row fails the statement on its foreign key. The unchecked
/// statement is the one used: the check was a search of the `devices` index per row, a
/// quarter of the statement's work, for a case that hardly happens (see [`write`]).
///
/// Parameters are `$1`, `$2`, .. for PostgreSQL and anonymous `?` for SQLite. To SQLite `$1`
/// is a *named* parameter, and sqlx looks up every parameter's name before binding it
/// (`sqlite3_bind_parameter_name`, a linear scan of the statement's names): 2,560 lookups
/// over 2,560 names for a 256-row chunk, which was a tenth of the whole server's CPU at
/// 10,000 telemetry messages/s. Anonymous parameters have no name, so each lookup is O(1).
fn upsert_sql(rows: usize, kind: DatabaseKind, checked: bool) -> String {
    let mut values = String::with_capacity(rows * 48);
    for r in 0..rows {
        if r > 0 {
            values.push(',');
        }
        values.push('(');
        for c in 0..COLUMNS {
            if c > 0 {
                values.push(',');
            }
            match kind {
                DatabaseKind::Sqlite => values.push('?'),
                DatabaseKind::Postgres => values.push_str(&format!("${}", r * COLUMNS + c + 1)),
            }
        }
        values.push(')');
    }
    let filter = if checked {
        "EXISTS (SELECT 1 FROM devices d WHERE d.device_id = v.column1)"
    } else {
        "true"
    };
    format!(
        "INSERT INTO telemetry_latest
            (device_id, seq, ts_ms, received_at_ms, uptime_s, battery_pct, cpu_temp_c, rssi_dbm, free_mem_kb, extra_json)
         SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, v.column8, v.column9, v.column10
         FROM (VALUES {values}) AS v
         WHERE {filter}
         ON CONFLICT (device_id) DO UPDATE SET
            seq = excluded.seq, ts_ms = excluded.ts_ms, received_at_ms = excluded.received_at_ms,
            uptime_s = excluded.uptime_s, battery_pct = excluded.battery_pct,
            cpu_temp_c = excluded.cpu_temp_c, rssi_dbm = excluded.rssi_dbm,
            free_mem_kb = excluded.free_mem_kb, extra_json = excluded.extra_json"
    )
}

/// The statement for a chunk of `rows` rows (a power of two up to [`MAX_ROWS`]), built once.
fn upsert_statement(rows: usize, kind: DatabaseKind, checked: bool) -> &'static str {
    type Built = std::sync::OnceLock<Vec<String>>;
    static BUILT: [Built; 4] = [const { Built::new() }; 4];
    let at = match kind {
        DatabaseKind::Sqlite => 0,
        DatabaseKind::Postgres => 2,
    } + usize::from(checked);
    let all = BUILT[at].get_or_init(|| {
        (0..=MAX_ROWS.trailing_zeros())
            .map(|k| upsert_sql(1 << k, kind, checked))
            .collect()
    });
    &all[rows.trailing_zeros() as usize]
}

/// The chunk sizes a batch of `n` rows is written in: powers of two, largest first.
fn chunks(mut n: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = if n >= MAX_ROWS {
            MAX_ROWS
        } else {
            1 << n.ilog2()
        };
        n -= size;
        Some(size)
    })
}

/// Binds an optional float as a `DOUBLE PRECISION` parameter.
///
/// sqlx 0.9.0's `Any` driver swaps the types of float NULLs (`AnyArguments::convert_into`
/// sends a NULL `f64` as `float4` and a NULL `f32` as `float8`; launchbadge/sqlx#4284). A
/// PostgreSQL prepared statement keeps the parameter types of its first execution, so once
/// a chunk had a device without a battery reading in some row, every later flush that put a
/// reading in that row failed with "incorrect binary data format in bind parameter N" and
/// telemetry stopped being stored. A NULL is therefore bound as `Option<f32>`, which the
/// swap turns into the `float8` NULL it should be. The PostgreSQL flush test fails if a
/// fixed sqlx makes this wrong.
fn bind_float<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    value: Option<f32>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    match value {
        Some(v) => q.bind(f64::from(v)),
        None => q.bind(None::<f32>),
    }
}

/// Writes `batch` in one transaction. A row of a device that is gone fails the unchecked
/// statements (foreign key); the batch is then written again with the checked ones, which
/// skip it.
pub(super) async fn write(
    db: &Db,
    conn: &mut Option<PoolConnection<Any>>,
    batch: &[(Arc<Slot>, Row)],
) -> Result<(), sqlx::Error> {
    let _gate = db.write_gate().await;
    let conn = match conn {
        Some(c) => c,
        None => conn.insert(db.pool().acquire().await?),
    };
    match write_on(db, conn, batch, false).await {
        Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => {
            tracing::debug!("telemetry of a device that is gone; written again without it");
            write_on(db, conn, batch, true).await
        }
        written => written,
    }
}

async fn write_on(
    db: &Db,
    conn: &mut PoolConnection<Any>,
    batch: &[(Arc<Slot>, Row)],
    checked: bool,
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    let mut rows = batch.iter();
    for size in chunks(batch.len()) {
        let mut q = sqlx::query(upsert_statement(size, db.kind(), checked));
        for (slot, (t, received)) in rows.by_ref().take(size) {
            let extra = if t.extra.is_empty() {
                None
            } else {
                serde_json::to_string(&t.extra).ok()
            };
            q = q
                .bind(slot.device.as_str())
                .bind(i64::try_from(t.seq).unwrap_or(i64::MAX))
                .bind(i64::try_from(t.ts_ms).unwrap_or(i64::MAX))
                .bind(*received)
                .bind(i64::try_from(t.uptime_s).unwrap_or(i64::MAX));
            q = bind_float(q, t.battery_pct);
            q = bind_float(q, t.cpu_temp_c);
            q = q
                .bind(t.rssi_dbm.map(i64::from))
                .bind(t.free_mem_kb.map(|k| i64::try_from(k).unwrap_or(i64::MAX)))
                .bind(extra);
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// The last stored sequence number of a device.
pub async fn last_seq(db: &Db, device: &DeviceId) -> Option<u64> {
    let row: Option<i64> =
        sqlx::query_scalar("SELECT seq FROM telemetry_latest WHERE device_id = $1")
            .bind(device.as_str())
            .fetch_optional(db.pool())
            .await
            .ok()
            .flatten();
    row.and_then(|s| u64::try_from(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_written_in_power_of_two_chunks() {
        for n in 0..=1100 {
            let sizes: Vec<usize> = chunks(n).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n, "{n}: {sizes:?}");
            assert!(sizes.iter().all(|s| s.is_power_of_two() && *s <= MAX_ROWS));
            assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{n}: {sizes:?}");
            assert!(sizes.len() <= n / MAX_ROWS + MAX_ROWS.trailing_zeros() as usize);
        }
        for checked in [false, true] {
            let pg = DatabaseKind::Postgres;
            let statement = |rows| upsert_statement(rows, pg, checked);
            assert_eq!(statement(1).matches('$').count(), COLUMNS);
            assert!(statement(256).contains(&format!("${}", 256 * COLUMNS)));
            assert!(!statement(256).contains(&format!("${}", 256 * COLUMNS + 1)));
            assert_eq!(statement(4).contains("EXISTS"), checked);
            let sqlite = DatabaseKind::Sqlite;
            let statement = |rows| upsert_statement(rows, sqlite, checked);
            assert!(!statement(256).contains('$'), "named to SQLite");
            assert_eq!(statement(256).matches('?').count(), 256 * COLUMNS);
            assert_eq!(statement(1).matches('?').count(), COLUMNS);
            assert_eq!(statement(4).contains("EXISTS"), checked);
        }
    }
}
