//! MySQL and MariaDB: values travel as text (`CAST(.. AS CHAR)` out, a cast
//! to the column's type in), batches run at READ COMMITTED so locks stay on
//! the rows written, composite keysets use the expanded `a > ? OR (a = ? AND
//! b > ?)` form its optimizer can range-scan, `innodb_lock_wait_timeout`
//! makes infill the one that waits, and the job lock is `GET_LOCK`.

use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow};
use sqlx::{AssertSqlSafe, Column as _, Executor, MySqlConnection, Row, SqlSafeStr, TypeInfo, ValueRef};

use super::{Backend, Column, Dialect, Fused, SqlBuilder, Step, expanded_compare};
use crate::sql::Query;
use crate::target::{BatchShape, Target};
use crate::value::Value;

/// The MySQL/MariaDB dialect.
pub struct MySqlDialect;

/// True for `SELECT VERSION()` of MariaDB `major.minor` or later.
fn mariadb_at_least(version: &str, major: u32, minor: u32) -> bool {
    if !version.contains("MariaDB") {
        return false;
    }
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

fn base_type(sql_type: &str) -> String {
    sql_type
        .to_ascii_lowercase()
        .split(['(', ' '])
        .next()
        .unwrap_or("")
        .to_string()
}

fn integer_type(sql_type: &str) -> bool {
    matches!(
        base_type(sql_type).as_str(),
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint"
    )
}

/// A date or time column (MySQL's `IS NULL` matches a NOT NULL one's zero
/// date).
fn temporal(sql_type: &str) -> bool {
    matches!(base_type(sql_type).as_str(), "date" | "datetime" | "timestamp")
}

/// A column whose value survives `CAST(.. AS CHAR)` into a JSON string
/// and back (not binary data or bits).
fn text_safe(sql_type: &str) -> bool {
    !matches!(
        base_type(sql_type).as_str(),
        "binary"
            | "varbinary"
            | "tinyblob"
            | "blob"
            | "mediumblob"
            | "longblob"
            | "bit"
            | "geometry"
            | "point"
            | "linestring"
            | "polygon"
    )
}

impl Dialect for MySqlDialect {
    fn backend(&self) -> Backend {
        Backend::MySql
    }
    fn quote_ident(&self, ident: &str) -> String {
        format!("`{}`", ident.replace('`', "``"))
    }
    fn placeholder(&self, _n: usize) -> String {
        "?".into()
    }
    fn backslash_escapes(&self) -> bool {
        true
    }
    fn value_out(&self, expr: &str) -> String {
        format!("CAST({expr} AS CHAR)")
    }
    fn value_in(&self, placeholder: &str, column: &Column) -> String {
        let t = column.sql_type.to_ascii_lowercase();
        let base = t.split(['(', ' ']).next().unwrap_or("");
        let unsigned = t.contains("unsigned");
        match base {
            "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year" | "bit" => {
                format!(
                    "CAST({placeholder} AS {})",
                    if unsigned { "UNSIGNED" } else { "SIGNED" }
                )
            }
            "decimal" | "numeric" => format!(
                "CAST({placeholder} AS {})",
                t.replace("unsigned", "").replace("numeric", "decimal").trim()
            ),
            "float" | "double" | "real" => format!("CAST({placeholder} AS DOUBLE)"),
            "date" => format!("CAST({placeholder} AS DATE)"),
            "datetime" | "timestamp" => format!("CAST({placeholder} AS DATETIME(6))"),
            "time" => format!("CAST({placeholder} AS TIME(6))"),
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
                format!("CAST({placeholder} AS BINARY)")
            }
            _ => placeholder.to_string(),
        }
    }
    fn key_after(&self, keys: &[String], value: &mut dyn FnMut(usize) -> String) -> String {
        expanded_compare(keys, value, ">", ">")
    }
    fn key_at_most(&self, keys: &[String], value: &mut dyn FnMut(usize) -> String) -> String {
        expanded_compare(keys, value, "<", "<=")
    }
    fn same_value(&self, col: &str, placeholder: &str) -> String {
        format!("CAST(CAST({col} AS CHAR) AS BINARY) <=> CAST({placeholder} AS BINARY)")
    }
    fn lock_clause(&self) -> &'static str {
        " FOR UPDATE"
    }
    fn begin_write(&self) -> &'static str {
        "START TRANSACTION"
    }
    fn begin_read_only(&self) -> &'static str {
        "START TRANSACTION READ ONLY"
    }
    fn update_by_key_list(&self) -> bool {
        true
    }
    /// Without images, one UPDATE over the range (the guard re-checked).
    /// With images, on MariaDB 10.6 or later and integer keys, the engine
    /// takes them itself, so no row comes back to infill:
    ///
    /// 1. a locking read stores the candidates' count, keys and values in
    ///    session variables (in the order it reads them);
    /// 2. the UPDATE: when every key of the range is a candidate (as many
    ///    as the boundary put in it), over the range; otherwise restricted
    ///    to the locked keys, through JSON_TABLE. The other statement of
    ///    the pair has a WHERE that MariaDB sees is false before it reads;
    /// 3. an INSERT stores the images: the keys and written values as the
    ///    same pair reads them (the whole range, or the locked keys);
    /// 4. a check: the images are whole JSON, and hold the locked keys, in
    ///    the order of the before values. Over the whole range, that also
    ///    proves the range held no row but the locked ones, so no row was
    ///    written without an image. When the check fails, the batch is
    ///    rolled back and written by key list.
    fn fused_batch(&self, t: &Target, s: &BatchShape<'_>) -> Option<Fused> {
        if s.limit.is_some() {
            return None;
        }
        // `join`: a table the UPDATE joins; `and`: a condition after the
        // range and the guard.
        let update = |join: &str, and: Option<(&str, u64)>| {
            let mut b = SqlBuilder::new(self);
            b.push("UPDATE ").push(&t.table).push(join).push(" SET ");
            for (i, (col, f)) in t.sets.iter().enumerate() {
                if i > 0 {
                    b.push(", ");
                }
                b.push(&format!("{}.{}", t.table, self.quote_ident(&col.name)))
                    .push(" = (")
                    .fragment(f, &t.params)
                    .push(")");
            }
            t.push_range(&mut b, s.lo, Some(s.hi), true);
            if let Some((cond, n)) = and {
                b.push(cond).bind(Value::Int(n as i64));
            }
            (b.finish(), Step::Written)
        };
        if !s.undo {
            return Some(Fused {
                steps: vec![update("", None)],
            });
        }
        // A multi-table UPDATE (the locked keys' path) computes every SET
        // against the old row, where a single-table UPDATE assigns left to
        // right: an expression that reads another written column would
        // get different values by path, so such a job goes by key list.
        let cross = t.sets.iter().any(|(col, f)| {
            let others: Vec<&str> = t
                .sets
                .iter()
                .map(|(c, _)| c.name.as_str())
                .filter(|n| *n != col.name)
                .collect();
            f.may_mention(&others)
        });
        if cross
            || !mariadb_at_least(&t.server_version, 10, 6)
            || !t.keys.iter().all(|k| integer_type(&k.sql_type))
            || t.sets.iter().any(|(c, _)| !text_safe(&c.sql_type))
        {
            return None;
        }
        // `IS NULL` also admits a NOT NULL date column's zero date.
        let before_null = t.before_null && !t.sets.iter().any(|(c, _)| temporal(&c.sql_type));
        let qualified: Vec<String> = t.key_q.iter().map(|k| format!("{}.{k}", t.table)).collect();
        let key = match qualified.as_slice() {
            [one] => one.clone(),
            many => format!("JSON_ARRAY({})", many.join(", ")),
        };
        // The locked keys as a table: JSON_TABLE over @infill_keys.
        let paths: Vec<String> = t
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let ty = if k.sql_type.to_ascii_lowercase().contains("unsigned") {
                    "BIGINT UNSIGNED"
                } else {
                    "BIGINT"
                };
                let path = if qualified.len() == 1 {
                    "$".to_string()
                } else {
                    format!("$[{i}]")
                };
                format!("infill_k{i} {ty} PATH '{path}'")
            })
            .collect();
        let locked = |alias: &str| {
            let on: Vec<String> = qualified
                .iter()
                .enumerate()
                .map(|(i, q)| format!("{q} = {alias}.infill_k{i}"))
                .collect();
            format!(
                " JOIN JSON_TABLE(@infill_keys, '$[*]' COLUMNS ({})) {alias} ON {}",
                paths.join(", "),
                on.join(" AND ")
            )
        };
        // No ORDER BY in the aggregates: within one statement they see the
        // rows in the same order, and the check compares the two orders.
        let columns = |b: &mut SqlBuilder<'_>| {
            b.push("JSON_OBJECT(");
            for (i, (c, _)) in t.sets.iter().enumerate() {
                if i > 0 {
                    b.push(", ");
                }
                let col = format!("{}.{}", t.table, self.quote_ident(&c.name));
                b.bind(Value::Text(c.name.clone()))
                    .push(&format!(", JSON_ARRAYAGG(CAST({col} AS CHAR))"));
            }
            b.push(")");
        };
        let mut before = SqlBuilder::new(self);
        before.push(&format!("SELECT COUNT(*), JSON_ARRAYAGG({key}), "));
        if before_null {
            // The guard pins every written column to NULL.
            before.push("NULL");
        } else {
            columns(&mut before);
        }
        before
            .push(" INTO @infill_n, @infill_keys, @infill_before FROM ")
            .push(&t.table);
        t.push_range(&mut before, s.lo, Some(s.hi), true);
        before.push(" FOR UPDATE");
        let whole = (" AND @infill_n = ", s.keys);
        let part = (" AND @infill_n <> ", s.keys);
        let images = |from: &dyn Fn(&mut SqlBuilder<'_>), and: (&str, u64)| {
            let mut b = SqlBuilder::new(self);
            b.push("INSERT INTO infill_undo (run_id, batch_no, seq, row_key, before_image, after_image) SELECT ");
            b.bind(Value::Text(s.run_id.into()))
                .push(", ")
                .bind(Value::Int(s.batch_no as i64))
                .push(&format!(", 0, JSON_ARRAYAGG({key}), "));
            if before_null {
                b.bind(Value::Text(t.known_null_image()));
            } else {
                b.push("@infill_before");
            }
            b.push(", ");
            columns(&mut b);
            b.push(" FROM ").push(&t.table);
            from(&mut b);
            b.push(and.0).bind(Value::Int(and.1 as i64));
            b.push(" HAVING COUNT(*) > 0");
            (b.finish(), Step::Run)
        };
        let over_range = |b: &mut SqlBuilder<'_>| t.push_range(b, s.lo, Some(s.hi), false);
        let over_locked = |b: &mut SqlBuilder<'_>| {
            b.push(&locked("infill_locked")).push(" WHERE TRUE");
        };
        let mut check = SqlBuilder::new(self);
        check
            .push(
                "SELECT @infill_n, COALESCE(JSON_VALID(@infill_keys) AND (@infill_before IS NULL OR JSON_VALID(@infill_before)) AND \
                 (SELECT JSON_VALID(after_image) AND CAST(row_key AS BINARY) = CAST(@infill_keys AS BINARY) \
                 FROM infill_undo WHERE run_id = ",
            )
            .bind(Value::Text(s.run_id.into()))
            .push(" AND batch_no = ")
            .bind(Value::Int(s.batch_no as i64))
            .push(" AND seq = 0), @infill_n = 0)");
        Some(Fused {
            steps: vec![
                (before.finish(), Step::Run),
                update("", Some(whole)),
                update(&locked("infill_locked"), Some(part)),
                images(&over_range, whole),
                images(&over_locked, part),
                (check.finish(), Step::Check),
            ],
        })
    }
    fn update_returning(&self) -> bool {
        false
    }
    /// Rows as a UNION ALL of SELECTs: MariaDB's VALUES cannot name its
    /// columns.
    fn rows_table(&self, rows: &[Vec<String>], names: &[String], alias: &str) -> String {
        let mut parts = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let cols = match i {
                0 => r
                    .iter()
                    .zip(names)
                    .map(|(e, n)| format!("{e} AS {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => r.join(", "),
            };
            parts.push(format!("SELECT {cols}"));
        }
        format!("({}) AS {alias}", parts.join(" UNION ALL "))
    }
    /// The multi-table form.
    fn delete_join(&self, table: &str, _keys: &[String], from: &str, on: &str, filter: &str) -> String {
        format!("DELETE {table} FROM {table} JOIN {from} ON {on} WHERE {filter}")
    }
    /// The multi-table form: the join before SET.
    fn update_join(&self, table: &str, set: &str, from: &str, on: &str, filter: &str) -> String {
        format!("UPDATE {table} JOIN {from} ON {on} SET {set} WHERE {filter}")
    }
    fn state_schema(&self) -> Vec<&'static str> {
        vec![
            "CREATE TABLE IF NOT EXISTS infill_schema (version INTEGER NOT NULL) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS infill_runs (
                id VARCHAR(36) NOT NULL PRIMARY KEY, job VARCHAR(255) NOT NULL, status VARCHAR(32) NOT NULL,
                definition_sha256 VARCHAR(64) NOT NULL, spec_sha256 VARCHAR(64) NOT NULL,
                params TEXT NOT NULL, params_sha256 VARCHAR(64) NOT NULL, env VARCHAR(255),
                undo_enabled INTEGER NOT NULL, cursor_key TEXT, upper_key TEXT,
                batch_size BIGINT NOT NULL, batches BIGINT NOT NULL DEFAULT 0,
                rows_read BIGINT NOT NULL DEFAULT 0, rows_changed BIGINT NOT NULL DEFAULT 0,
                rows_skipped BIGINT NOT NULL DEFAULT 0, rows_failed BIGINT NOT NULL DEFAULT 0,
                host VARCHAR(255) NOT NULL, pid BIGINT NOT NULL, os_user VARCHAR(255) NOT NULL,
                started_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL, finished_at VARCHAR(40),
                control TEXT, message TEXT, segment BIGINT NOT NULL DEFAULT 0, group_id VARCHAR(36), undo_of VARCHAR(36), KEY infill_runs_job (job, status)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            "CREATE TABLE IF NOT EXISTS infill_batches (
                run_id VARCHAR(36) NOT NULL, batch_no BIGINT NOT NULL, segment BIGINT NOT NULL DEFAULT 0, lower_key TEXT, upper_key TEXT NOT NULL,
                rows_read BIGINT NOT NULL, rows_changed BIGINT NOT NULL, rows_skipped BIGINT NOT NULL,
                rows_failed BIGINT NOT NULL DEFAULT 0, batch_size BIGINT NOT NULL, duration_ms BIGINT NOT NULL, committed_at VARCHAR(40) NOT NULL,
                PRIMARY KEY (run_id, batch_no)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            "CREATE TABLE IF NOT EXISTS infill_failures (
                run_id VARCHAR(36) NOT NULL, batch_no BIGINT NOT NULL, row_key TEXT NOT NULL, error_code VARCHAR(16),
                message TEXT NOT NULL, failed_at VARCHAR(40) NOT NULL, PRIMARY KEY (run_id, batch_no)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            "CREATE TABLE IF NOT EXISTS infill_undo (
                run_id VARCHAR(36) NOT NULL, batch_no BIGINT NOT NULL, seq BIGINT NOT NULL,
                row_key LONGTEXT NOT NULL, before_image LONGTEXT NOT NULL, after_image LONGTEXT NOT NULL,
                PRIMARY KEY (run_id, batch_no, seq)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            "CREATE TABLE IF NOT EXISTS infill_approvals (
                id VARCHAR(36) NOT NULL PRIMARY KEY, fingerprint VARCHAR(64) NOT NULL, jobs LONGTEXT NOT NULL,
                approved_by VARCHAR(200) NOT NULL, note TEXT, approved_at VARCHAR(40) NOT NULL,
                os_user VARCHAR(200) NOT NULL, host VARCHAR(255) NOT NULL, plan_created_at VARCHAR(40) NOT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        ]
    }
    fn schema_v3(&self) -> Vec<&'static str> {
        // A batch's keys in one image row outgrow TEXT's 64 kB.
        vec!["ALTER TABLE infill_undo MODIFY row_key LONGTEXT NOT NULL"]
    }
    fn session_setup(&self, lock_timeout: Duration, statement_timeout: Duration) -> Vec<String> {
        vec![
            format!(
                "SET SESSION innodb_lock_wait_timeout = {}",
                lock_timeout.as_secs().max(1)
            ),
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".into(),
            // MariaDB builds JSON_ARRAYAGG on GROUP_CONCAT: no truncated images.
            "SET SESSION group_concat_max_len = 4294967295".into(),
            // MariaDB's statement limit, in seconds; MySQL spells it max_execution_time.
            format!("SET SESSION max_statement_time = {}", statement_timeout.as_secs_f64()),
        ]
    }
    fn columns_query(&self, table: &[String]) -> Query {
        let (schema, name) = match table {
            [s, t] => (Value::Text(s.clone()), Value::Text(t.clone())),
            [t] => (Value::Null, Value::Text(t.clone())),
            _ => (Value::Null, Value::Text(table.join("."))),
        };
        Query {
            sql: "SELECT CAST(COLUMN_NAME AS CHAR), CAST(COLUMN_TYPE AS CHAR) FROM information_schema.COLUMNS \
                  WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION"
                .into(),
            args: vec![schema, name],
        }
    }
    fn unique_keys_query(&self, table: &[String]) -> Query {
        let (schema, name) = match table {
            [s, t] => (Value::Text(s.clone()), Value::Text(t.clone())),
            _ => (Value::Null, Value::Text(table.join("."))),
        };
        Query {
            sql: "SELECT CAST(INDEX_NAME = 'PRIMARY' AS SIGNED), CAST(INDEX_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR) \
                  FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? \
                  AND NON_UNIQUE = 0 ORDER BY INDEX_NAME = 'PRIMARY' DESC, INDEX_NAME, SEQ_IN_INDEX"
                .into(),
            args: vec![schema, name],
        }
    }
    fn insert_on_conflict(&self) -> bool {
        false
    }
    fn estimate_rows_query(&self, table: &[String]) -> Query {
        let (schema, name) = match table {
            [s, t] => (Value::Text(s.clone()), Value::Text(t.clone())),
            _ => (Value::Null, Value::Text(table.join("."))),
        };
        Query {
            sql: "SELECT CAST(COALESCE(TABLE_ROWS, 0) AS SIGNED) FROM information_schema.TABLES \
                  WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?"
                .into(),
            args: vec![schema, name],
        }
    }
    fn builtin_probe(&self, name: &str) -> Option<&'static str> {
        match name {
            // Threads executing right now; the value is the last column.
            "threads_running" => Some("SHOW GLOBAL STATUS LIKE 'Threads_running'"),
            // Run on a replica (`database = "..."`): the primary cannot see
            // how far behind its replicas are. MariaDB 10.5.1 and MySQL
            // 8.0.22 on.
            "replica_lag" => Some("SHOW REPLICA STATUS"),
            _ => None,
        }
    }
    fn probe_columns(&self, name: &str) -> Option<&'static [&'static str]> {
        match name {
            // MariaDB's name, then MySQL's.
            "replica_lag" => Some(&["Seconds_Behind_Master", "Seconds_Behind_Source"]),
            _ => None,
        }
    }
    /// Threads running a statement in this database, other than infill's
    /// connections (and the ones still connecting, or asking their id).
    /// Without the PROCESS privilege the server lists only the threads of
    /// infill's own user.
    fn busy_sessions_query(&self, own: &[i64]) -> Option<Query> {
        let mut sql = String::from(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE() AND COMMAND NOT IN ('Sleep', 'Daemon', 'Killed', 'Connect') \
             AND ID <> CONNECTION_ID() AND COALESCE(INFO, '') <> ?",
        );
        if !own.is_empty() {
            sql.push_str(" AND ID NOT IN (");
            sql.push_str(&vec!["?"; own.len()].join(", "));
            sql.push(')');
        }
        let mut args = vec![Value::Text(WHO_AM_I.into())];
        args.extend(own.iter().map(|id| Value::Int(*id)));
        Some(Query { sql, args })
    }
    fn explain(&self, select: &Query) -> Option<Query> {
        Some(Query {
            sql: format!("EXPLAIN FORMAT=JSON {}", select.sql),
            args: select.args.clone(),
        })
    }
    /// The job table's rows examined times its `filtered` share (MySQL
    /// says `rows_examined_per_scan`, MariaDB `rows`). A subquery's table
    /// may come first in the plan: the entry is found by name.
    fn explained_rows(&self, rows: &[Vec<Value>], table: &str) -> Option<u64> {
        let Some(Value::Text(text)) = rows.first()?.first() else {
            return None;
        };
        let plan: serde_json::Value = serde_json::from_str(text).ok()?;
        fn tables<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(t) = m.get("table").filter(|t| t.is_object()) {
                        out.push(t);
                    }
                    m.values().for_each(|x| tables(x, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| tables(x, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        tables(&plan, &mut all);
        let t = all
            .iter()
            .find(|t| t.get("table_name").and_then(|n| n.as_str()) == Some(table))
            .or(all.first())?;
        let num = |k: &str| t.get(k).and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok()));
        let rows = num("rows_examined_per_scan").or_else(|| num("rows"))?;
        Some((rows * num("filtered").unwrap_or(100.0) / 100.0).round() as u64)
    }
    fn identity_query(&self) -> &'static str {
        "SELECT CAST(CONCAT(@@hostname, ':', @@port, '#', @@server_id) AS CHAR), CAST(DATABASE() AS CHAR)"
    }
    fn try_lock_query(&self, name: &str) -> Option<Query> {
        Some(Query {
            sql: "SELECT GET_LOCK(?, 0)".into(),
            args: vec![Value::Text(lock_name(name))],
        })
    }
    fn unlock_query(&self, name: &str) -> Option<Query> {
        Some(Query {
            sql: "SELECT RELEASE_LOCK(?)".into(),
            args: vec![Value::Text(lock_name(name))],
        })
    }
}

/// Asked by each new connection, to leave its id in `Db`'s list of
/// connections not to count as busy (which it is not in yet while asking).
const WHO_AM_I: &str = "SELECT CAST(CONNECTION_ID() AS SIGNED)";

/// GET_LOCK names are limited to 64 characters.
fn lock_name(name: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("infill:{}", &hex::encode(Sha256::digest(name.as_bytes()))[..40])
}

pub(super) async fn pool(
    o: MySqlConnectOptions,
    setup: Vec<String>,
    acquire: Duration,
    own: super::OwnIds,
) -> Result<sqlx::MySqlPool, sqlx::Error> {
    MySqlPoolOptions::new()
        .max_connections(4)
        .min_connections(0)
        .acquire_timeout(acquire)
        .after_connect(move |conn, _| {
            let setup = setup.clone();
            let own = own.clone();
            Box::pin(async move {
                // Without its id (a proxy that refuses the query) the
                // connection still works; only the busy count may see it.
                let id: Result<i64, _> = sqlx::query_scalar(WHO_AM_I).fetch_one(&mut *conn).await;
                if let (Ok(id), Ok(mut ids)) = (id, own.lock()) {
                    ids.push(id);
                }
                for s in setup {
                    // max_statement_time is MariaDB's; MySQL has no such variable. Ignore its absence.
                    if let Err(e) = conn.execute(AssertSqlSafe(s.clone())).await
                        && !s.contains("max_statement_time")
                    {
                        return Err(e);
                    }
                }
                Ok(())
            })
        })
        .connect_with(o)
        .await
}

fn query<'q>(q: &'q Query) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
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

pub(super) async fn execute(conn: &mut MySqlConnection, q: &Query) -> Result<u64, sqlx::Error> {
    Ok(query(q).execute(conn).await?.rows_affected())
}

pub(super) async fn fetch(conn: &mut MySqlConnection, q: &Query) -> Result<Vec<Vec<Value>>, sqlx::Error> {
    query(q).fetch_all(conn).await?.iter().map(decode).collect()
}

pub(super) async fn fetch_named(
    conn: &mut MySqlConnection,
    q: &Query,
) -> Result<(Vec<String>, Vec<Vec<Value>>), sqlx::Error> {
    super::named_rows(&query(q).fetch_all(conn).await?, decode)
}

fn decode(row: &MySqlRow) -> Result<Vec<Value>, sqlx::Error> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        if row.try_get_raw(i)?.is_null() {
            out.push(Value::Null);
            continue;
        }
        let name = col.type_info().name();
        out.push(match name {
            "BOOLEAN" => Value::Bool(row.try_get(i)?),
            "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" => Value::Int(row.try_get(i)?),
            "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "MEDIUMINT UNSIGNED" | "INT UNSIGNED" | "BIGINT UNSIGNED" => {
                let u: u64 = row.try_get(i)?;
                i64::try_from(u)
                    .map(Value::Int)
                    .unwrap_or_else(|_| Value::Text(u.to_string()))
            }
            "FLOAT" => Value::Real(row.try_get::<f32, _>(i)?.into()),
            "DOUBLE" => Value::Real(row.try_get(i)?),
            "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" => {
                let b: Vec<u8> = row.try_get_unchecked(i)?;
                match String::from_utf8(b) {
                    Ok(s) => Value::Text(s),
                    Err(e) => Value::Blob(e.into_bytes()),
                }
            }
            _ => Value::Text(row.try_get_unchecked(i)?),
        });
    }
    Ok(out)
}

pub(super) async fn prepare(conn: &mut MySqlConnection, q: &Query) -> Result<(), sqlx::Error> {
    conn.prepare(AssertSqlSafe(q.sql.as_str()).into_sql_str())
        .await
        .map(|_| ())
}

pub(super) async fn describe(conn: &mut MySqlConnection, q: &Query) -> Result<super::Described, sqlx::Error> {
    let st = conn.prepare(AssertSqlSafe(q.sql.as_str()).into_sql_str()).await?;
    Ok(super::described(&st, false))
}
