//! PostgreSQL: values travel as text (`::text` out, `CAST($n AS <type>)` in),
//! rows are locked `FOR NO KEY UPDATE` (it does not block inserts of rows
//! referencing them), `lock_timeout` and `statement_timeout` make infill the
//! one that waits, and the job lock is a session advisory lock.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Column as _, Executor, PgConnection, Row, SqlSafeStr, TypeInfo, ValueRef};

use super::{Backend, Column, Dialect, Fused, SqlBuilder, Step};
use crate::sql::Query;
use crate::target::{BatchShape, Target};
use crate::value::Value;

/// The PostgreSQL dialect.
pub struct PostgresDialect;

impl Dialect for PostgresDialect {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }
    fn quote_ident(&self, ident: &str) -> String {
        format!("\"{}\"", ident.replace('"', "\"\""))
    }
    fn placeholder(&self, n: usize) -> String {
        format!("${n}")
    }
    fn case_sensitive_columns(&self) -> bool {
        true
    }
    fn value_out(&self, expr: &str) -> String {
        format!("({expr})::text")
    }
    fn value_in(&self, placeholder: &str, column: &Column) -> String {
        if column.sql_type.is_empty() {
            return placeholder.to_string();
        }
        format!("CAST({placeholder} AS {})", column.sql_type)
    }
    fn same_value(&self, col: &str, placeholder: &str) -> String {
        format!("({col})::text IS NOT DISTINCT FROM {placeholder}")
    }
    fn lock_clause(&self) -> &'static str {
        " FOR NO KEY UPDATE"
    }
    fn begin_write(&self) -> &'static str {
        "BEGIN ISOLATION LEVEL READ COMMITTED"
    }
    fn begin_read_only(&self) -> &'static str {
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    }
    /// Row locks only: a batch locks exactly the rows of its range.
    fn concurrent_batches(&self) -> bool {
        true
    }
    fn update_by_key_list(&self) -> bool {
        true
    }
    fn update_returning(&self) -> bool {
        true
    }
    fn state_schema(&self) -> Vec<&'static str> {
        vec![
            "CREATE TABLE IF NOT EXISTS infill_schema (version INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS infill_runs (
                id TEXT PRIMARY KEY, job TEXT NOT NULL, status TEXT NOT NULL,
                definition_sha256 TEXT NOT NULL, spec_sha256 TEXT NOT NULL,
                params TEXT NOT NULL, params_sha256 TEXT NOT NULL, env TEXT,
                undo_enabled INTEGER NOT NULL, cursor_key TEXT, upper_key TEXT,
                batch_size BIGINT NOT NULL, batches BIGINT NOT NULL DEFAULT 0,
                rows_read BIGINT NOT NULL DEFAULT 0, rows_changed BIGINT NOT NULL DEFAULT 0,
                rows_skipped BIGINT NOT NULL DEFAULT 0, rows_failed BIGINT NOT NULL DEFAULT 0,
                host TEXT NOT NULL, pid BIGINT NOT NULL, os_user TEXT NOT NULL,
                started_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT,
                control TEXT, message TEXT, segment BIGINT NOT NULL DEFAULT 0, group_id VARCHAR(36), undo_of VARCHAR(36))",
            "CREATE INDEX IF NOT EXISTS infill_runs_job ON infill_runs (job, status)",
            "CREATE TABLE IF NOT EXISTS infill_batches (
                run_id TEXT NOT NULL, batch_no BIGINT NOT NULL, segment BIGINT NOT NULL DEFAULT 0, lower_key TEXT, upper_key TEXT NOT NULL,
                rows_read BIGINT NOT NULL, rows_changed BIGINT NOT NULL, rows_skipped BIGINT NOT NULL,
                rows_failed BIGINT NOT NULL DEFAULT 0, batch_size BIGINT NOT NULL, duration_ms BIGINT NOT NULL, committed_at TEXT NOT NULL,
                PRIMARY KEY (run_id, batch_no))",
            "CREATE TABLE IF NOT EXISTS infill_failures (
                run_id TEXT NOT NULL, batch_no BIGINT NOT NULL, row_key TEXT NOT NULL, error_code TEXT,
                message TEXT NOT NULL, failed_at TEXT NOT NULL, PRIMARY KEY (run_id, batch_no))",
            "CREATE TABLE IF NOT EXISTS infill_undo (
                run_id TEXT NOT NULL, batch_no BIGINT NOT NULL, seq BIGINT NOT NULL,
                row_key TEXT NOT NULL, before_image TEXT NOT NULL, after_image TEXT NOT NULL,
                PRIMARY KEY (run_id, batch_no, seq))",
            "CREATE TABLE IF NOT EXISTS infill_approvals (
                id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, jobs TEXT NOT NULL,
                approved_by TEXT NOT NULL, note TEXT, approved_at TEXT NOT NULL,
                os_user TEXT NOT NULL, host TEXT NOT NULL, plan_created_at TEXT NOT NULL)",
        ]
    }
    /// Undo images are large JSON texts written once per batch: lz4 (a
    /// server built with it) compresses them several times faster than
    /// the default pglz, which otherwise costs about a tenth of a batch.
    fn state_tuning(&self) -> Vec<&'static str> {
        vec![
            "ALTER TABLE infill_undo ALTER COLUMN row_key SET COMPRESSION lz4, \
             ALTER COLUMN before_image SET COMPRESSION lz4, ALTER COLUMN after_image SET COMPRESSION lz4",
        ]
    }
    fn session_setup(&self, lock_timeout: Duration, statement_timeout: Duration) -> Vec<String> {
        vec![
            format!("SET lock_timeout = {}", lock_timeout.as_millis().max(1)),
            format!("SET statement_timeout = {}", statement_timeout.as_millis().max(1)),
            "SET idle_in_transaction_session_timeout = 600000".into(),
        ]
    }
    fn columns_query(&self, table: &[String]) -> Query {
        Query {
            sql: "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                  WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
                .into(),
            args: vec![Value::Text(self.quote_table(table))],
        }
    }
    fn unique_keys_query(&self, table: &[String]) -> Query {
        Query {
            sql: "SELECT i.indisprimary::int, c.relname::text, a.attname::text FROM pg_index i \
                  JOIN pg_class c ON c.oid = i.indexrelid \
                  JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n) ON true \
                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                  WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
                  ORDER BY i.indisprimary DESC, c.relname, k.n"
                .into(),
            args: vec![Value::Text(self.quote_table(table))],
        }
    }
    fn insert_on_conflict(&self) -> bool {
        true
    }
    fn estimate_rows_query(&self, table: &[String]) -> Query {
        Query {
            sql: "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass($1)".into(),
            args: vec![Value::Text(self.quote_table(table))],
        }
    }
    fn builtin_probe(&self, name: &str) -> Option<&'static str> {
        match name {
            // On the primary: seconds the slowest replica is behind in
            // replaying. On a replica (`database = "..."`): how old the
            // last replayed transaction is, or 0 when it has replayed all
            // it received (else an idle primary would look like lag).
            "replica_lag" => Some(
                "SELECT CASE WHEN NOT pg_is_in_recovery() \
                 THEN (SELECT COALESCE(MAX(EXTRACT(EPOCH FROM replay_lag)), 0) FROM pg_stat_replication) \
                 WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
                 ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END::float8",
            ),
            // Seconds the oldest open transaction (not ours) has run: it holds back vacuum.
            "oldest_transaction" => Some(
                "SELECT COALESCE(EXTRACT(EPOCH FROM now() - MIN(xact_start)), 0)::float8 FROM pg_stat_activity \
                 WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend' \
                 AND application_name NOT LIKE 'infill:%'",
            ),
            _ => None,
        }
    }
    /// Client sessions running a statement in this database, other than
    /// infill's. Other roles' sessions show their state only to superusers
    /// and members of `pg_read_all_stats` (or `pg_monitor`).
    fn busy_sessions_query(&self, _own: &[i64]) -> Option<Query> {
        Some(Query::new(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND backend_type = 'client backend' AND state = 'active' \
             AND pid <> pg_backend_pid() AND application_name <> 'infill' AND application_name NOT LIKE 'infill:%'",
        ))
    }
    fn explain(&self, select: &Query) -> Option<Query> {
        Some(Query {
            sql: format!("EXPLAIN {}", select.sql),
            args: select.args.clone(),
        })
    }
    /// The top plan node's `rows=N` (text format: the JSON format comes back
    /// as `json`, which the row decoder does not read as text).
    fn explained_rows(&self, rows: &[Vec<Value>], _table: &str) -> Option<u64> {
        let Some(Value::Text(line)) = rows.first()?.first() else {
            return None;
        };
        let after = &line[line.find(" rows=")? + 6..];
        after[..after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len())]
            .parse()
            .ok()
    }
    fn identity_query(&self) -> &'static str {
        "SELECT (SELECT system_identifier::text FROM pg_control_system()), current_database()::text"
    }
    /// Lock, write and undo images in one round trip: the candidates are
    /// locked in a CTE, the UPDATE joins them (re-checking the guard) and
    /// returns before and after values, and a data-modifying CTE stores the
    /// images. Column names in the images are bound, never pasted. When the
    /// guard pins every written column to NULL the before values are known,
    /// and the batch is one UPDATE whose RETURNING feeds the images.
    fn fused_batch(&self, t: &Target, s: &BatchShape<'_>) -> Option<Fused> {
        let one = |q: Query| Fused {
            steps: vec![(q, Step::Counts)],
        };
        if s.limit.is_none() && (!s.undo || t.before_null) {
            return Some(one(plain_batch(self, t, s)));
        }
        let mut b = SqlBuilder::new(self);
        let mut cand_cols: Vec<String> = t
            .key_q
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} AS infill_k{i}"))
            .collect();
        cand_cols.extend(
            t.sets
                .iter()
                .enumerate()
                .map(|(i, (c, _))| format!("{} AS infill_b{i}", self.quote_ident(&c.name))),
        );
        b.push("WITH infill_cand AS (SELECT ")
            .push(&cand_cols.join(", "))
            .push(" FROM ")
            .push(&t.table);
        t.push_range(&mut b, s.lo, Some(s.hi), true);
        b.push(&t.order_by(false));
        if let Some(l) = s.limit {
            b.push(&format!(" LIMIT {l}"));
        }
        b.push(" FOR NO KEY UPDATE), infill_upd AS (");
        t.push_set(&mut b);
        b.push(" FROM infill_cand WHERE ");
        let join: Vec<String> = t
            .key_q
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{}.{k} = infill_cand.infill_k{i}", t.table))
            .collect();
        b.push(&join.join(" AND "));
        // The range again, so the planner reaches the table through the key
        // index instead of joining the CTE against a full scan.
        let mark = b.mark();
        t.push_range(&mut b, s.lo, Some(s.hi), true);
        b.wrap_since(mark, |range| range.replacen(" WHERE ", " AND ", 1));
        b.push(" RETURNING ")
            .push(&returning(self, t, true).join(", "))
            .push(")");
        if s.undo {
            push_images(&mut b, t, s, false);
        }
        let last_key: Vec<String> = (0..t.key_q.len()).map(|i| format!("infill_k{i}::text")).collect();
        let desc: Vec<String> = (0..t.key_q.len()).map(|i| format!("infill_k{i} DESC")).collect();
        b.push(&format!(
            " SELECT (SELECT count(*) FROM infill_cand), (SELECT count(*) FROM infill_upd), \
             (SELECT jsonb_build_array({})::text FROM infill_cand ORDER BY {} LIMIT 1)",
            last_key.join(", "),
            desc.join(", ")
        ));
        Some(one(b.finish()))
    }
    fn try_lock_query(&self, name: &str) -> Option<Query> {
        Some(Query {
            sql: "SELECT pg_try_advisory_lock($1)::int".into(),
            args: vec![Value::Int(lock_key(name))],
        })
    }
    fn unlock_query(&self, name: &str) -> Option<Query> {
        Some(Query {
            sql: "SELECT pg_advisory_unlock($1)::int".into(),
            args: vec![Value::Int(lock_key(name))],
        })
    }
}

/// The RETURNING list of a batch's UPDATE: keys, before values (from
/// `infill_cand`, when read) and after values, integers as they are and
/// anything else as text (exact in JSON either way).
fn returning(d: &PostgresDialect, t: &Target, before: bool) -> Vec<String> {
    let mut ret: Vec<String> = t
        .key_q
        .iter()
        .zip(&t.keys)
        .enumerate()
        .map(|(i, (k, c))| format!("{} AS infill_k{i}", exact(&format!("{}.{k}", t.table), c)))
        .collect();
    for (i, (c, _)) in t.sets.iter().enumerate() {
        if before {
            ret.push(format!(
                "{} AS infill_b{i}",
                exact(&format!("infill_cand.infill_b{i}"), c)
            ));
        }
        let col = format!("{}.{}", t.table, d.quote_ident(&c.name));
        ret.push(format!("{} AS infill_a{i}", exact(&col, c)));
    }
    ret
}

/// A value for a JSON image: an integer column as a JSON number (its digits
/// exactly), anything else as its text, which the column reads back.
fn exact(expr: &str, c: &Column) -> String {
    match c.sql_type.to_ascii_lowercase().as_str() {
        "smallint" | "integer" | "bigint" | "int2" | "int4" | "int8" => expr.to_string(),
        _ => format!("{expr}::text"),
    }
}

/// `, infill_und AS (INSERT INTO infill_undo ...)`: one row of images per
/// batch, in columns (keys, then each written column's values before and
/// after; a known-NULL before is one `null` per column). Plain `json`
/// aggregates with no ORDER BY: one aggregation pass feeds all three in
/// the same row order, and they cost a fraction of `jsonb` objects per row.
fn push_images(b: &mut SqlBuilder<'_>, t: &Target, s: &BatchShape<'_>, before_null: bool) {
    b.push(
        ", infill_und AS (INSERT INTO infill_undo (run_id, batch_no, seq, row_key, before_image, after_image) SELECT ",
    );
    b.bind(Value::Text(s.run_id.into()))
        .push(", ")
        .bind(Value::Int(s.batch_no as i64));
    // One key column: a flat array of keys; several: an array per key.
    let keys: Vec<String> = (0..t.key_q.len()).map(|i| format!("infill_k{i}")).collect();
    match keys.as_slice() {
        [one] => b.push(&format!(", 0, json_agg({one})::text, ")),
        _ => b
            .push(", 0, json_agg(json_build_array(")
            .push(&keys.join(", "))
            .push("))::text, "),
    };
    if before_null {
        b.bind(Value::Text(t.known_null_image()));
    } else {
        push_columns(b, t, "b");
    }
    b.push(", ");
    push_columns(b, t, "a");
    b.push(" FROM infill_upd HAVING count(*) > 0)");
}

/// `json_build_object('col', json_agg(infill_<prefix>N), ...)::text`.
fn push_columns(b: &mut SqlBuilder<'_>, t: &Target, prefix: &str) {
    b.push("json_build_object(");
    for (i, (c, _)) in t.sets.iter().enumerate() {
        if i > 0 {
            b.push(", ");
        }
        b.bind(Value::Text(c.name.clone()))
            .push(&format!("::text, json_agg(infill_{prefix}{i})"));
    }
    b.push(")::text");
}

/// A batch without a row limit whose before values need no read: no undo
/// images, or a guard pinning every written column to NULL. One UPDATE over
/// the key range, its `where` the guard, returning what the images hold.
/// The result has the shape of `fused_batch`'s: rows read (here: written),
/// rows written, no last key.
fn plain_batch(d: &PostgresDialect, t: &Target, s: &BatchShape<'_>) -> Query {
    let mut b = SqlBuilder::new(d);
    b.push("WITH infill_upd AS (");
    t.push_set(&mut b);
    t.push_range(&mut b, s.lo, Some(s.hi), true);
    if s.undo {
        b.push(" RETURNING ").push(&returning(d, t, false).join(", ")).push(")");
        push_images(&mut b, t, s, true);
    } else {
        b.push(" RETURNING 1)");
    }
    b.push(" SELECT count(*), count(*), NULL::text FROM infill_upd");
    b.finish()
}

fn lock_key(name: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(name.as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

pub(super) async fn pool(
    o: PgConnectOptions,
    setup: Vec<String>,
    acquire: Duration,
) -> Result<sqlx::PgPool, sqlx::Error> {
    // A run's batches in flight (`concurrency`, at most 4), the busy count
    // and a read beside them.
    PgPoolOptions::new()
        .max_connections(8)
        .min_connections(0)
        .acquire_timeout(acquire)
        .after_connect(move |conn, _| {
            let setup = setup.clone();
            Box::pin(async move {
                for s in setup {
                    conn.execute(AssertSqlSafe(s)).await?;
                }
                Ok(())
            })
        })
        .connect_with(o)
        .await
}

fn query<'q>(q: &'q Query) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let mut query = sqlx::query(AssertSqlSafe(q.sql.as_str()));
    for v in &q.args {
        query = match v {
            Value::Null => query.bind(None::<String>),
            Value::Int(i) => query.bind(*i),
            Value::Real(f) => query.bind(*f),
            Value::Bool(b) => query.bind(*b),
            Value::Text(s) => query.bind(s.as_str()),
            Value::Blob(b) => query.bind(b.as_slice()),
            Value::Timestamp(t) => query.bind(*t),
            Value::TimestampTz(t) => query.bind(*t),
            Value::Date(d) => query.bind(*d),
        };
    }
    query
}

pub(super) async fn execute(conn: &mut PgConnection, q: &Query) -> Result<u64, sqlx::Error> {
    Ok(query(q).execute(conn).await?.rows_affected())
}

pub(super) async fn fetch(conn: &mut PgConnection, q: &Query) -> Result<Vec<Vec<Value>>, sqlx::Error> {
    query(q).fetch_all(conn).await?.iter().map(decode).collect()
}

pub(super) async fn fetch_named(
    conn: &mut PgConnection,
    q: &Query,
) -> Result<(Vec<String>, Vec<Vec<Value>>), sqlx::Error> {
    super::named_rows(&query(q).fetch_all(conn).await?, decode)
}

fn decode(row: &PgRow) -> Result<Vec<Value>, sqlx::Error> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        if row.try_get_raw(i)?.is_null() {
            out.push(Value::Null);
            continue;
        }
        out.push(match col.type_info().name() {
            "INT2" => Value::Int(row.try_get::<i16, _>(i)?.into()),
            "INT4" => Value::Int(row.try_get::<i32, _>(i)?.into()),
            "INT8" => Value::Int(row.try_get::<i64, _>(i)?),
            "FLOAT4" => Value::Real(row.try_get::<f32, _>(i)?.into()),
            "FLOAT8" => Value::Real(row.try_get::<f64, _>(i)?),
            "BOOL" => Value::Bool(row.try_get(i)?),
            "BYTEA" => Value::Blob(row.try_get(i)?),
            _ => Value::Text(row.try_get(i)?),
        });
    }
    Ok(out)
}

pub(super) async fn prepare(conn: &mut PgConnection, q: &Query) -> Result<(), sqlx::Error> {
    use sqlx::Type;
    use sqlx::postgres::PgTypeInfo;
    let types: Vec<PgTypeInfo> = q
        .args
        .iter()
        .map(|v| match v {
            Value::Null | Value::Text(_) => <String as Type<sqlx::Postgres>>::type_info(),
            Value::Int(_) => <i64 as Type<sqlx::Postgres>>::type_info(),
            Value::Real(_) => <f64 as Type<sqlx::Postgres>>::type_info(),
            Value::Bool(_) => <bool as Type<sqlx::Postgres>>::type_info(),
            Value::Blob(_) => <Vec<u8> as Type<sqlx::Postgres>>::type_info(),
            Value::Timestamp(_) => <chrono::NaiveDateTime as Type<sqlx::Postgres>>::type_info(),
            Value::TimestampTz(_) => <chrono::DateTime<chrono::Utc> as Type<sqlx::Postgres>>::type_info(),
            Value::Date(_) => <chrono::NaiveDate as Type<sqlx::Postgres>>::type_info(),
        })
        .collect();
    conn.prepare_with(AssertSqlSafe(q.sql.as_str()).into_sql_str(), &types)
        .await
        .map(|_| ())
}

/// Prepared with no parameter types given: the server infers them.
pub(super) async fn describe(conn: &mut PgConnection, q: &Query) -> Result<super::Described, sqlx::Error> {
    let st = conn
        .prepare_with(AssertSqlSafe(q.sql.as_str()).into_sql_str(), &[])
        .await?;
    Ok(super::described(&st, true))
}
