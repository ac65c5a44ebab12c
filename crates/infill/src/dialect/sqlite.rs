//! SQLite: values keep their storage class, writes take the database's write
//! lock up front (`BEGIN IMMEDIATE`), so the range itself is exact and no row
//! lock clause exists; plan and dry run use `PRAGMA query_only`. The job lock
//! is a row of `infill_locks` with host, pid and a heartbeat.

use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{AssertSqlSafe, Executor, Row, SqlSafeStr, SqliteConnection, TypeInfo, ValueRef};

use super::{Backend, Column, Dialect, Fused, SqlBuilder, Step};
use crate::sql::Query;
use crate::target::{BatchShape, Target};
use crate::value::Value;

/// The SQLite dialect.
pub struct SqliteDialect;

/// True for a declared type with INTEGER or TEXT affinity (SQLite's rules),
/// whose values a JSON image holds exactly (see `json_value`).
fn json_exact(declared: &str) -> bool {
    let t = declared.to_ascii_uppercase();
    t.contains("INT") || t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT")
}

/// A column's value for a JSON image: integers and text as they are, a
/// REAL (which an INTEGER column may hold) as text with every digit it
/// needs to read back exactly. A BLOB fails the statement ("JSON cannot
/// hold BLOB values"), so the row is isolated and reported, never imaged
/// wrong.
fn json_value(col: &str) -> String {
    format!("CASE typeof({col}) WHEN 'real' THEN printf('%.17g', {col}) ELSE {col} END")
}

impl Dialect for SqliteDialect {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }
    fn quote_ident(&self, ident: &str) -> String {
        format!("\"{}\"", ident.replace('"', "\"\""))
    }
    /// Anonymous `?`, bound in order: the driver asks SQLite for the name
    /// of every numbered parameter (`?NNN`), a walk of the statement's list
    /// of names each time, so binding n of them cost n² steps (74 % of an
    /// undo with 3,000 values a statement).
    fn placeholder(&self, _n: usize) -> String {
        "?".into()
    }
    fn value_out(&self, expr: &str) -> String {
        expr.to_string()
    }
    fn value_in(&self, placeholder: &str, _column: &Column) -> String {
        placeholder.to_string()
    }
    fn same_value(&self, col: &str, placeholder: &str) -> String {
        format!("{col} IS ({placeholder} COLLATE BINARY)")
    }
    fn lock_clause(&self) -> &'static str {
        ""
    }
    fn begin_write(&self) -> &'static str {
        "BEGIN IMMEDIATE"
    }
    fn begin_read_only(&self) -> &'static str {
        "BEGIN DEFERRED"
    }
    fn read_only_session(&self) -> Option<&'static str> {
        Some("PRAGMA query_only = ON")
    }
    fn update_by_key_list(&self) -> bool {
        false
    }
    /// SQLite holds the write lock for the whole transaction, so the rows
    /// of the range that pass the guard are exactly the rows the UPDATE
    /// writes. The images are taken by the engine around the UPDATE (the
    /// candidates' values into a row of `infill_undo`, then the written
    /// values of those keys), so no row comes back to infill: through the
    /// driver, each row returned costs more than SQLite's work on it.
    fn fused_batch(&self, t: &Target, s: &BatchShape<'_>) -> Option<Fused> {
        if s.limit.is_some() {
            return None;
        }
        let mut update = SqlBuilder::new(self);
        t.push_set(&mut update);
        t.push_range(&mut update, s.lo, Some(s.hi), true);
        let update = (update.finish(), Step::Written);
        if !s.undo {
            return Some(Fused { steps: vec![update] });
        }
        // Values JSON holds exactly: images only for INTEGER and TEXT columns.
        if !t
            .keys
            .iter()
            .chain(t.sets.iter().map(|(c, _)| c))
            .all(|c| json_exact(&c.sql_type))
        {
            return None;
        }
        let order = t.key_q.join(", ");
        let key = match t.key_q.as_slice() {
            [one] => json_value(one),
            many => format!(
                "json_array({})",
                many.iter().map(|k| json_value(k)).collect::<Vec<_>>().join(", ")
            ),
        };
        let written: Vec<String> = t.sets.iter().map(|(c, _)| self.quote_ident(&c.name)).collect();
        // The aggregates read a subquery ordered by the key. SQLite keeps a
        // subquery's ORDER BY under an aggregate other than count, min and
        // max, and feeds the aggregate in that order; over the key's range
        // the order costs no sort. `ORDER BY` inside the aggregate sorts
        // every batch: the sorts took about half of a 50,000-key batch.
        let ordered = |b: &mut SqlBuilder<'_>, cols: &[String], filter: bool, extra: &str| {
            let mut list: Vec<String> = t.key_q.clone();
            list.extend(cols.iter().filter(|c| !t.key_q.contains(c)).cloned());
            b.push("(SELECT ").push(&list.join(", ")).push(" FROM ").push(&t.table);
            t.push_range(b, s.lo, Some(s.hi), filter);
            b.push(extra).push(" ORDER BY ").push(&order).push(")");
        };
        let columns = |b: &mut SqlBuilder<'_>| {
            b.push("json_object(");
            for (i, c) in written.iter().enumerate() {
                if i > 0 {
                    b.push(", ");
                }
                b.bind(Value::Text(t.sets[i].0.name.clone()))
                    .push(&format!(", json_group_array({})", json_value(c)));
            }
            b.push(")");
        };
        let mut before = SqlBuilder::new(self);
        before.push("INSERT INTO infill_undo (run_id, batch_no, seq, row_key, before_image, after_image) SELECT ");
        before
            .bind(Value::Text(s.run_id.into()))
            .push(", ")
            .bind(Value::Int(s.batch_no as i64))
            .push(&format!(", 0, json_group_array({key}), "));
        // A guard pinning every written column to NULL says what they held.
        if t.before_null {
            before.bind(Value::Text(t.known_null_image()));
            before.push(", '{}' FROM ");
            ordered(&mut before, &[], true, "");
        } else {
            columns(&mut before);
            before.push(", '{}' FROM ");
            ordered(&mut before, &written, true, "");
        }
        before.push(" HAVING count(*) > 0");
        // The written values of the same keys, in the same order. When the
        // range holds no row but the written ones (the write lock is held
        // since the candidates were read), the range is the written rows;
        // otherwise the keys are looked up in the image.
        let in_image = match t.key_q.as_slice() {
            [one] => format!(" AND {one} IN (SELECT value FROM json_each(infill_undo.row_key))"),
            many => {
                let parts: Vec<String> = (0..many.len()).map(|i| format!("value ->> {i}")).collect();
                format!(
                    " AND ({}) IN (SELECT {} FROM json_each(infill_undo.row_key))",
                    many.join(", "),
                    parts.join(", ")
                )
            }
        };
        let mut after = SqlBuilder::new(self);
        after
            .push("UPDATE infill_undo SET after_image = CASE WHEN (SELECT count(*) FROM ")
            .push(&t.table);
        t.push_range(&mut after, s.lo, Some(s.hi), false);
        after.push(") = json_array_length(infill_undo.row_key) THEN (SELECT ");
        columns(&mut after);
        after.push(" FROM ");
        ordered(&mut after, &written, false, "");
        after.push(") ELSE (SELECT ");
        columns(&mut after);
        after.push(" FROM ");
        ordered(&mut after, &written, false, &in_image);
        after
            .push(") END WHERE run_id = ")
            .bind(Value::Text(s.run_id.into()))
            .push(" AND batch_no = ")
            .bind(Value::Int(s.batch_no as i64))
            .push(" AND seq = 0");
        Some(Fused {
            steps: vec![(before.finish(), Step::Run), update, (after.finish(), Step::Run)],
        })
    }
    fn update_returning(&self) -> bool {
        true
    }
    /// No DELETE ... USING: the keys of the joined rows, selected.
    fn delete_join(&self, table: &str, keys: &[String], from: &str, on: &str, filter: &str) -> String {
        let keys = keys.join(", ");
        format!("DELETE FROM {table} WHERE ({keys}) IN (SELECT {keys} FROM {table} JOIN {from} ON {on} WHERE {filter})")
    }
    /// VALUES names its columns column1, column2, ...: renamed in a SELECT.
    fn rows_table(&self, rows: &[Vec<String>], names: &[String], alias: &str) -> String {
        let rows: Vec<String> = rows.iter().map(|r| format!("({})", r.join(", "))).collect();
        let cols: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("column{} AS {n}", i + 1))
            .collect();
        format!(
            "(SELECT {} FROM (VALUES {})) AS {alias}",
            cols.join(", "),
            rows.join(", ")
        )
    }
    fn state_schema(&self) -> Vec<&'static str> {
        vec![
            "CREATE TABLE IF NOT EXISTS infill_schema (version INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS infill_runs (
                id TEXT PRIMARY KEY, job TEXT NOT NULL, status TEXT NOT NULL,
                definition_sha256 TEXT NOT NULL, spec_sha256 TEXT NOT NULL,
                params TEXT NOT NULL, params_sha256 TEXT NOT NULL, env TEXT,
                undo_enabled INTEGER NOT NULL, cursor_key TEXT, upper_key TEXT,
                batch_size INTEGER NOT NULL, batches INTEGER NOT NULL DEFAULT 0,
                rows_read INTEGER NOT NULL DEFAULT 0, rows_changed INTEGER NOT NULL DEFAULT 0,
                rows_skipped INTEGER NOT NULL DEFAULT 0, rows_failed INTEGER NOT NULL DEFAULT 0,
                host TEXT NOT NULL, pid INTEGER NOT NULL, os_user TEXT NOT NULL,
                started_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT,
                control TEXT, message TEXT, segment INTEGER NOT NULL DEFAULT 0, group_id VARCHAR(36), undo_of VARCHAR(36))",
            "CREATE INDEX IF NOT EXISTS infill_runs_job ON infill_runs (job, status)",
            "CREATE TABLE IF NOT EXISTS infill_batches (
                run_id TEXT NOT NULL, batch_no INTEGER NOT NULL, segment INTEGER NOT NULL DEFAULT 0, lower_key TEXT, upper_key TEXT NOT NULL,
                rows_read INTEGER NOT NULL, rows_changed INTEGER NOT NULL, rows_skipped INTEGER NOT NULL,
                rows_failed INTEGER NOT NULL DEFAULT 0, batch_size INTEGER NOT NULL, duration_ms INTEGER NOT NULL, committed_at TEXT NOT NULL,
                PRIMARY KEY (run_id, batch_no))",
            "CREATE TABLE IF NOT EXISTS infill_failures (
                run_id TEXT NOT NULL, batch_no INTEGER NOT NULL, row_key TEXT NOT NULL, error_code TEXT,
                message TEXT NOT NULL, failed_at TEXT NOT NULL, PRIMARY KEY (run_id, batch_no))",
            "CREATE TABLE IF NOT EXISTS infill_undo (
                run_id TEXT NOT NULL, batch_no INTEGER NOT NULL, seq INTEGER NOT NULL,
                row_key TEXT NOT NULL, before_image TEXT NOT NULL, after_image TEXT NOT NULL,
                PRIMARY KEY (run_id, batch_no, seq))",
            "CREATE TABLE IF NOT EXISTS infill_approvals (
                id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, jobs TEXT NOT NULL,
                approved_by TEXT NOT NULL, note TEXT, approved_at TEXT NOT NULL,
                os_user TEXT NOT NULL, host TEXT NOT NULL, plan_created_at TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS infill_locks (
                name TEXT PRIMARY KEY, run_id TEXT, host TEXT NOT NULL, pid INTEGER NOT NULL,
                heartbeat TEXT NOT NULL)",
        ]
    }
    fn session_setup(&self, _lock_timeout: Duration, _statement_timeout: Duration) -> Vec<String> {
        Vec::new()
    }
    fn columns_query(&self, table: &[String]) -> Query {
        match table {
            [schema, t] => Query {
                sql: "SELECT name, type FROM pragma_table_info(?1, ?2) ORDER BY cid".into(),
                args: vec![Value::Text(t.clone()), Value::Text(schema.clone())],
            },
            _ => Query {
                sql: "SELECT name, type FROM pragma_table_info(?1) ORDER BY cid".into(),
                args: vec![Value::Text(table.join("."))],
            },
        }
    }
    fn unique_keys_query(&self, table: &[String]) -> Query {
        // An INTEGER PRIMARY KEY is the rowid and has no index: the primary
        // key comes from table_info, the other unique keys from index_list.
        Query {
            sql: "SELECT p, n, c FROM (\
                  SELECT 1 AS p, '' AS n, name AS c, pk AS s FROM pragma_table_info(?1) WHERE pk > 0 \
                  UNION ALL SELECT 0, il.name, ii.name, ii.seqno FROM pragma_index_list(?1) il, pragma_index_info(il.name) ii \
                  WHERE il.\"unique\" = 1 AND il.origin <> 'pk') ORDER BY p DESC, n, s"
                .into(),
            args: vec![Value::Text(table.join("."))],
        }
    }
    fn insert_on_conflict(&self) -> bool {
        true
    }
    fn estimate_rows_query(&self, table: &[String]) -> Query {
        Query {
            sql: format!("SELECT COUNT(*) FROM {}", self.quote_table(table)),
            args: vec![],
        }
    }
    fn identity_query(&self) -> &'static str {
        "SELECT file, name FROM pragma_database_list WHERE name = 'main'"
    }
    fn try_lock_query(&self, _name: &str) -> Option<Query> {
        None
    }
    fn unlock_query(&self, _name: &str) -> Option<Query> {
        None
    }
}

pub(super) async fn pool(o: SqliteConnectOptions, acquire: Duration) -> Result<sqlx::SqlitePool, sqlx::Error> {
    SqlitePoolOptions::new()
        .max_connections(4)
        .min_connections(0)
        .acquire_timeout(acquire)
        .connect_with(o)
        .await
}

fn query<'q>(q: &'q Query) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let mut query = sqlx::query(AssertSqlSafe(q.sql.as_str()));
    for v in &q.args {
        query = match v {
            Value::Null => query.bind(None::<String>),
            Value::Int(i) => query.bind(*i),
            Value::Real(f) => query.bind(*f),
            Value::Bool(b) => query.bind(i64::from(*b)),
            Value::Text(s) => query.bind(s.clone()),
            Value::Blob(b) => query.bind(b.clone()),
            // SQLite has no time types: dates compare as the text SQLite's own functions write.
            Value::Timestamp(t) => query.bind(t.format("%Y-%m-%d %H:%M:%S%.f").to_string()),
            Value::TimestampTz(t) => query.bind(t.format("%Y-%m-%d %H:%M:%S%.f").to_string()),
            Value::Date(d) => query.bind(d.to_string()),
        };
    }
    query
}

pub(super) async fn execute(conn: &mut SqliteConnection, q: &Query) -> Result<u64, sqlx::Error> {
    Ok(query(q).execute(conn).await?.rows_affected())
}

pub(super) async fn fetch(conn: &mut SqliteConnection, q: &Query) -> Result<Vec<Vec<Value>>, sqlx::Error> {
    query(q).fetch_all(conn).await?.iter().map(decode).collect()
}

pub(super) async fn fetch_named(
    conn: &mut SqliteConnection,
    q: &Query,
) -> Result<(Vec<String>, Vec<Vec<Value>>), sqlx::Error> {
    super::named_rows(&query(q).fetch_all(conn).await?, decode)
}

fn decode(row: &SqliteRow) -> Result<Vec<Value>, sqlx::Error> {
    let mut out = Vec::with_capacity(row.len());
    for i in 0..row.len() {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            out.push(Value::Null);
            continue;
        }
        let storage = raw.type_info().name().to_string();
        out.push(match storage.as_str() {
            "INTEGER" => Value::Int(row.try_get_unchecked(i)?),
            "REAL" => Value::Real(row.try_get_unchecked(i)?),
            "BLOB" => Value::Blob(row.try_get_unchecked(i)?),
            _ => Value::Text(row.try_get_unchecked(i)?),
        });
    }
    Ok(out)
}

pub(super) async fn prepare(conn: &mut SqliteConnection, q: &Query) -> Result<(), sqlx::Error> {
    conn.prepare(AssertSqlSafe(q.sql.as_str()).into_sql_str())
        .await
        .map(|_| ())
}

pub(super) async fn describe(conn: &mut SqliteConnection, q: &Query) -> Result<super::Described, sqlx::Error> {
    let st = conn.prepare(AssertSqlSafe(q.sql.as_str()).into_sql_str()).await?;
    Ok(super::described(&st, false))
}
