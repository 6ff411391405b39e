//! Telemetry storage: the multi-row upsert into `telemetry_latest` a flush is written with,
//! and the last stored sequence number of a device.

use std::sync::Arc;

use companion_schema::DeviceId;
use sqlx::pool::PoolConnection;
use sqlx::{Any, Connection};

use super::{Row, Slot};
use crate::db::Db;
use crate::settings::DatabaseKind;

/// Rows per upsert statement, at most. A batch is one statement of a few fixed sizes (see
/// [`size_class`]), padded with empty rows that the statement skips, or for more than this
/// many rows several in a transaction: few distinct statements exist and each stays prepared,
/// and a flush is one round trip to SQLite's worker thread. One statement per device was a
/// quarter of the server's CPU at 10,000 msg/s; chunks in binary (256, 128, .., 1 rows) took
/// five round trips for a flush of 200 devices (BEGIN, three chunks, COMMIT), each a wake-up
/// of that thread and of the writer.
pub(super) const MAX_ROWS: usize = 256;
/// Size classes grow by this many rows past it; below it they are powers of two.
const STEP: usize = 32;
/// Parameters bound per row.
pub(super) const COLUMNS: usize = 10;

/// The upsert of `rows` rows. Columns of a `VALUES` list are `column1`, `column2`, .. in both
/// SQLite and PostgreSQL. A `WHERE` clause keeps SQLite's parser from reading `ON CONFLICT` as
/// a join, and skips padding rows (a NULL device id). `checked`: rows of devices that are gone (deleted since they connected) are
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
        "v.column1 IS NOT NULL AND EXISTS (SELECT 1 FROM devices d WHERE d.device_id = v.column1)"
    } else {
        "v.column1 IS NOT NULL"
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

/// The statement sizes: 1, 2, 4, .. up to [`STEP`], then multiples of it up to [`MAX_ROWS`].
fn sizes() -> impl Iterator<Item = usize> {
    (0..STEP.trailing_zeros())
        .map(|k| 1 << k)
        .chain((STEP..=MAX_ROWS).step_by(STEP))
}

/// The smallest statement size that holds `rows` rows (1..=[`MAX_ROWS`]): at most
/// `rows - 1` padding rows below [`STEP`], fewer than [`STEP`] above.
fn size_class(rows: usize) -> usize {
    if rows <= STEP {
        rows.next_power_of_two()
    } else {
        rows.div_ceil(STEP) * STEP
    }
}

/// The statement for `size` rows (one of [`sizes`]), built once.
fn upsert_statement(size: usize, kind: DatabaseKind, checked: bool) -> &'static str {
    type Built = std::sync::OnceLock<Vec<(usize, String)>>;
    static BUILT: [Built; 4] = [const { Built::new() }; 4];
    let at = match kind {
        DatabaseKind::Sqlite => 0,
        DatabaseKind::Postgres => 2,
    } + usize::from(checked);
    let all = BUILT[at].get_or_init(|| {
        sizes()
            .map(|size| (size, upsert_sql(size, kind, checked)))
            .collect()
    });
    let at = all.partition_point(|(s, _)| *s < size);
    &all[at.min(all.len() - 1)].1
}

/// The statements a batch of `n` rows is written in: (rows, statement size), full ones first.
fn chunks(mut n: usize) -> impl Iterator<Item = (usize, usize)> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let rows = n.min(MAX_ROWS);
        n -= rows;
        Some((rows, size_class(rows)))
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
    let mut rows = batch.iter();
    if batch.len() <= MAX_ROWS {
        // One statement: atomic by itself.
        return upsert(db, &mut rows, batch.len(), checked)
            .execute(&mut **conn)
            .await
            .map(drop);
    }
    let mut tx = conn.begin().await?;
    for (n, _) in chunks(batch.len()) {
        upsert(db, &mut rows, n, checked).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// The upsert of the next `n` rows of `rows`, padded to its statement's size.
fn upsert<'q>(
    db: &Db,
    rows: &mut std::slice::Iter<'q, (Arc<Slot>, Row)>,
    n: usize,
    checked: bool,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let size = size_class(n);
    let mut q = sqlx::query(upsert_statement(size, db.kind(), checked));
    for (slot, (t, received)) in rows.by_ref().take(n) {
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
    for _ in n..size {
        // Padding, skipped by the statement: NULLs of the columns' types (PostgreSQL keeps a
        // prepared statement's parameter types from its first execution).
        q = q
            .bind(None::<&str>)
            .bind(None::<i64>)
            .bind(None::<i64>)
            .bind(None::<i64>)
            .bind(None::<i64>);
        q = bind_float(q, None);
        q = bind_float(q, None);
        q = q.bind(None::<i64>).bind(None::<i64>).bind(None::<String>);
    }
    q
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
    fn a_batch_is_one_padded_statement_up_to_the_largest_size() {
        let all: Vec<usize> = sizes().collect();
        assert_eq!(
            all,
            vec![1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256]
        );
        for n in 0..=1100 {
            let chunks: Vec<(usize, usize)> = chunks(n).collect();
            assert_eq!(chunks.iter().map(|c| c.0).sum::<usize>(), n, "{n}");
            assert_eq!(chunks.len(), n.div_ceil(MAX_ROWS), "{n}: {chunks:?}");
            for &(rows, size) in &chunks {
                assert!(all.contains(&size), "{n}: {chunks:?}");
                assert!(rows <= size, "{n}: {chunks:?}");
                assert!(
                    size < 2 * rows || size - rows < STEP,
                    "little padding: {chunks:?}"
                );
                let statement = upsert_statement(size, DatabaseKind::Sqlite, false);
                assert_eq!(statement.matches('?').count(), size * COLUMNS);
            }
        }
        for checked in [false, true] {
            let pg = DatabaseKind::Postgres;
            let statement = |rows| upsert_statement(rows, pg, checked);
            assert_eq!(statement(1).matches('$').count(), COLUMNS);
            assert!(statement(256).contains(&format!("${}", 256 * COLUMNS)));
            assert!(!statement(256).contains(&format!("${}", 256 * COLUMNS + 1)));
            assert_eq!(statement(4).contains("EXISTS"), checked);
            assert!(statement(4).contains("IS NOT NULL"), "padding is skipped");
            let sqlite = DatabaseKind::Sqlite;
            let statement = |rows| upsert_statement(rows, sqlite, checked);
            assert!(!statement(256).contains('$'), "named to SQLite");
            assert_eq!(statement(256).matches('?').count(), 256 * COLUMNS);
            assert_eq!(statement(1).matches('?').count(), COLUMNS);
            assert_eq!(statement(4).contains("EXISTS"), checked);
        }
    }
}
