//! Everything that differs between PostgreSQL, MySQL/MariaDB and SQLite lives
//! behind [`Dialect`] (SQL text: quoting, placeholders, casts, locks, state
//! DDL) and in the per-database `bind`/`decode` functions of each file. The
//! run loop composes statements from these pieces and never names a database.
//! One dialect file never imports another.

pub mod mysql;
pub mod postgres;
pub mod sqlite;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::{MySql, Postgres, Sqlite};

use crate::error::{Error, Result};
use crate::spec::DatabaseUrl;
use crate::sql::{Fragment, Part, Query};
use crate::value::Value;

/// The three supported engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    MySql,
    Sqlite,
}

impl Backend {
    /// The backend a URL names, from its scheme.
    pub fn of_url(url: &str) -> Option<Backend> {
        let scheme = url.split(':').next()?.to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Some(Backend::Postgres),
            "mysql" | "mariadb" => Some(Backend::MySql),
            "sqlite" => Some(Backend::Sqlite),
            _ => None,
        }
    }

    /// The dialect of this backend.
    pub fn dialect(self) -> &'static dyn Dialect {
        match self {
            Backend::Postgres => &postgres::PostgresDialect,
            Backend::MySql => &mysql::MySqlDialect,
            Backend::Sqlite => &sqlite::SqliteDialect,
        }
    }
}

/// A column of the target table, as the server describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The full type as the server spells it (`numeric(10,2)`, `bigint unsigned`).
    pub sql_type: String,
}

/// A batch as a few statements run in order in its transaction.
pub struct Fused {
    pub steps: Vec<(Query, Step)>,
}

/// What a statement of a [`Fused`] batch tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing: run it.
    Run,
    /// Its affected rows are rows written (summed over the batch's
    /// `Written` statements; also the rows read, unless a `Check` says).
    Written,
    /// One row: rows read, rows written, the last key read as a JSON array
    /// (or NULL).
    Counts,
    /// One row: the rows locked and imaged (the rows read), and whether
    /// the images are whole and hold every written row (1). When they do
    /// not, or more rows were written than were locked, the batch is
    /// rolled back and written again the slow, exact way.
    Check,
}

/// The SQL text of one database.
pub trait Dialect: Send + Sync {
    fn backend(&self) -> Backend;
    /// Quotes an identifier, doubling embedded quote characters.
    fn quote_ident(&self, ident: &str) -> String;
    /// The placeholder for the `n`th bound value (1-based).
    fn placeholder(&self, n: usize) -> String;
    /// True when string literals treat backslash as an escape (MySQL).
    fn backslash_escapes(&self) -> bool {
        false
    }
    /// True when column names compare case-sensitively.
    fn case_sensitive_columns(&self) -> bool {
        false
    }
    /// An expression carrying a column's value to infill losslessly.
    fn value_out(&self, expr: &str) -> String;
    /// A placeholder wrapped so a value read through `value_out` binds back
    /// as the column's own type.
    fn value_in(&self, placeholder: &str, column: &Column) -> String;
    /// `keys > values` in key order. Row comparison unless the engine's
    /// optimizer needs the expanded form. `value(i)` binds the i-th key
    /// value and returns its placeholder; it is called once per use.
    fn key_after(&self, keys: &[String], value: &mut dyn FnMut(usize) -> String) -> String {
        row_compare(keys, value, ">")
    }
    /// `keys <= values` in key order.
    fn key_at_most(&self, keys: &[String], value: &mut dyn FnMut(usize) -> String) -> String {
        row_compare(keys, value, "<=")
    }
    /// The weakest row lock that keeps a concurrent writer out until commit.
    /// True when column `col` holds exactly the value bound at `placeholder`
    /// (as `value_out` rendered it): null-safe, byte for byte, whatever the
    /// column's collation. Undo's guard.
    fn same_value(&self, col: &str, placeholder: &str) -> String;
    fn lock_clause(&self) -> &'static str;
    /// Statement opening a writing transaction.
    fn begin_write(&self) -> &'static str;
    /// Statement opening a read-only transaction (plan, dry run).
    fn begin_read_only(&self) -> &'static str;
    /// A statement making a connection refuse writes (SQLite's
    /// `PRAGMA query_only`), where a read-only transaction is not enough.
    fn read_only_session(&self) -> Option<&'static str> {
        None
    }
    /// True when batches over neighbouring key ranges can write at the same
    /// time without waiting on each other's locks (`concurrency` above 1
    /// for a table source's batches). False on SQLite (one writer at a
    /// time) and on MySQL/MariaDB, where a range write also locks the
    /// first key past its range: the next batch, started first, would hold
    /// that row until the earlier batch commits, which waits for it.
    fn concurrent_batches(&self) -> bool {
        false
    }
    /// True when the write can be restricted to the locked keys with
    /// `(k) IN (...)`; false where the write lock is already exclusive.
    fn update_by_key_list(&self) -> bool;
    /// True when UPDATE supports RETURNING.
    fn update_returning(&self) -> bool;
    /// Statements creating the state tables, idempotent.
    fn state_schema(&self) -> Vec<&'static str>;
    /// Schema version 3: what this engine's state tables of version 2 need.
    fn schema_v3(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Settings for new state tables that help where the server supports
    /// them and change nothing else; a statement that fails is skipped.
    fn state_tuning(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Statements run on each new connection (timeouts, isolation).
    fn session_setup(&self, lock_timeout: Duration, statement_timeout: Duration) -> Vec<String>;
    /// A query listing the columns of a table: (name, type) rows.
    fn columns_query(&self, table: &[String]) -> Query;
    /// A query listing a table's unique keys as (is primary 1/0, index
    /// name, column) rows: the primary key first, columns in index order.
    fn unique_keys_query(&self, table: &[String]) -> Query;
    /// True when `INSERT ... ON CONFLICT DO NOTHING RETURNING` exists; else
    /// inserts are guarded by `NOT EXISTS` on the unique keys (MySQL has no
    /// conflict-skipping insert but INSERT IGNORE, which hides other errors).
    fn insert_on_conflict(&self) -> bool;
    /// A query returning the server's estimate of a table's row count.
    fn estimate_rows_query(&self, table: &[String]) -> Query;
    /// A query returning (identity, database name) of the server.
    fn identity_query(&self) -> &'static str;
    /// The planner's view of a SELECT, from which `explained_rows` reads its
    /// row estimate; None where the engine gives no estimate.
    fn explain(&self, _select: &Query) -> Option<Query> {
        None
    }
    /// The query of a built-in health probe (see `spec::BUILTIN_PROBES`),
    /// where this engine has it.
    fn builtin_probe(&self, _name: &str) -> Option<&'static str> {
        None
    }
    /// For a built-in probe whose statement returns many columns (MySQL's
    /// `SHOW REPLICA STATUS`): the names of the column holding the value,
    /// one per server flavour. Its rows are then one per replication
    /// channel; the probe's value is the largest.
    fn probe_columns(&self, _name: &str) -> Option<&'static [&'static str]> {
        None
    }
    /// A query counting the sessions at work on this database right now,
    /// other than infill's (`busy_sleep_coef`): on PostgreSQL by their
    /// `application_name`, on MySQL by the connection ids in `own`. None
    /// where other sessions cannot be seen (SQLite).
    fn busy_sessions_query(&self, _own: &[i64]) -> Option<Query> {
        None
    }
    /// The row estimate in the output of `explain`, for `table` (the last
    /// part of its name) where the plan names tables.
    fn explained_rows(&self, _rows: &[Vec<Value>], _table: &str) -> Option<u64> {
        None
    }
    /// A query taking the job lock without waiting; returns 1 when taken.
    /// None where the lock is a row of `infill_locks`.
    fn try_lock_query(&self, name: &str) -> Option<Query>;
    /// A query releasing the job lock.
    fn unlock_query(&self, name: &str) -> Option<Query>;
    /// The whole batch as statements the engine runs on its own, no row
    /// coming back to infill (see `Target::fused_batch`), where it can chain
    /// the lock, the write and the undo images.
    fn fused_batch(&self, _target: &crate::target::Target, _shape: &crate::target::BatchShape<'_>) -> Option<Fused> {
        None
    }
    /// A derived table of literal rows named `alias`, its columns `names`:
    /// each row a list of SQL expressions (placeholders, usually).
    fn rows_table(&self, rows: &[Vec<String>], names: &[String], alias: &str) -> String {
        let rows: Vec<String> = rows.iter().map(|r| format!("({})", r.join(", "))).collect();
        format!("(VALUES {}) AS {alias}({})", rows.join(", "), names.join(", "))
    }
    /// An UPDATE of `table` joined to the derived table `from` on `on`:
    /// `set` is the SET list (target columns unqualified), `filter` further
    /// conditions on the joined rows.
    fn update_join(&self, table: &str, set: &str, from: &str, on: &str, filter: &str) -> String {
        format!("UPDATE {table} SET {set} FROM {from} WHERE {on} AND {filter}")
    }
    /// A DELETE from `table` of the rows joined to the derived table `from`
    /// on `on` and passing `filter`; `keys` are the table's key columns,
    /// qualified.
    fn delete_join(&self, table: &str, _keys: &[String], from: &str, on: &str, filter: &str) -> String {
        format!("DELETE FROM {table} USING {from} WHERE {on} AND {filter}")
    }
    /// Quotes a dotted table name.
    fn quote_table(&self, parts: &[String]) -> String {
        parts.iter().map(|p| self.quote_ident(p)).collect::<Vec<_>>().join(".")
    }
}

fn row_compare(keys: &[String], value: &mut dyn FnMut(usize) -> String, op: &str) -> String {
    let values: Vec<String> = (0..keys.len()).map(value).collect();
    if keys.len() == 1 {
        format!("{} {op} {}", keys[0], values[0])
    } else {
        format!("({}) {op} ({})", keys.join(", "), values.join(", "))
    }
}

/// Expanded keyset comparison, `a > ? OR (a = ? AND b > ?)`, for optimizers
/// that do not use an index for row comparisons.
pub(crate) fn expanded_compare(
    keys: &[String],
    value: &mut dyn FnMut(usize) -> String,
    strict: &str,
    last: &str,
) -> String {
    let mut ors = Vec::new();
    for i in 0..keys.len() {
        let op = if i + 1 == keys.len() { last } else { strict };
        let mut ands: Vec<String> = (0..i).map(|j| format!("{} = {}", keys[j], value(j))).collect();
        ands.push(format!("{} {op} {}", keys[i], value(i)));
        ors.push(if ands.len() == 1 {
            ands.remove(0)
        } else {
            format!("({})", ands.join(" AND "))
        });
    }
    if ors.len() == 1 {
        ors.remove(0)
    } else {
        format!("({})", ors.join(" OR "))
    }
}

/// Builds one statement: text plus bound values, placeholders numbered for
/// the dialect.
pub struct SqlBuilder<'d> {
    dialect: &'d dyn Dialect,
    query: Query,
}

impl<'d> SqlBuilder<'d> {
    pub fn new(dialect: &'d dyn Dialect) -> Self {
        SqlBuilder {
            dialect,
            query: Query::default(),
        }
    }
    /// Appends SQL text.
    pub fn push(&mut self, sql: &str) -> &mut Self {
        self.query.sql.push_str(sql);
        self
    }
    /// Binds a value and returns its placeholder (not yet appended).
    pub fn arg(&mut self, v: Value) -> String {
        self.query.args.push(v);
        self.dialect.placeholder(self.query.args.len())
    }
    /// Binds a value and appends its placeholder.
    pub fn bind(&mut self, v: Value) -> &mut Self {
        let ph = self.arg(v);
        self.push(&ph)
    }
    /// Appends a spec fragment, binding its `:name` params from `params`.
    pub fn fragment(&mut self, f: &Fragment, params: &std::collections::BTreeMap<String, Value>) -> &mut Self {
        for part in &f.parts {
            match part {
                Part::Sql(s) => {
                    self.push(s);
                }
                Part::Param(name) => {
                    let v = params.get(name).cloned().unwrap_or(Value::Null);
                    self.bind(v);
                }
            }
        }
        self
    }
    /// The current end of the text, for [`SqlBuilder::wrap_since`].
    pub fn mark(&self) -> usize {
        self.query.sql.len()
    }
    /// Replaces the text pushed since `mark` with `f(text)`; bound values
    /// keep their placeholders.
    pub fn wrap_since(&mut self, mark: usize, f: impl FnOnce(&str) -> String) -> &mut Self {
        let tail = self.query.sql.split_off(mark);
        self.query.sql.push_str(&f(&tail));
        self
    }
    pub fn finish(self) -> Query {
        self.query
    }
}

/// A state-table statement written once for every engine: each `?` becomes
/// the dialect's placeholder. (State SQL holds no string literals.)
pub fn portable(dialect: &dyn Dialect, sql: &str, args: Vec<Value>) -> Query {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&dialect.placeholder(n));
        } else {
            out.push(c);
        }
    }
    debug_assert_eq!(n, args.len(), "placeholders and args differ in {sql}");
    Query { sql: out, args }
}

/// A connection of one of the three pools.
pub enum Conn {
    Pg(PoolConnection<Postgres>),
    My(PoolConnection<MySql>),
    Lite(PoolConnection<Sqlite>),
}

/// A transaction on a [`Conn`]; rolled back when dropped uncommitted.
pub enum Tx<'c> {
    Pg(sqlx::Transaction<'c, Postgres>),
    My(sqlx::Transaction<'c, MySql>),
    Lite(sqlx::Transaction<'c, Sqlite>),
}

/// Runs statements on a connection or inside a transaction alike.
#[async_trait]
pub trait Exec: Send {
    /// Executes a statement; returns the rows it affected.
    async fn execute(&mut self, q: &Query) -> Result<u64, sqlx::Error>;
    /// Runs a query; returns its rows as values.
    async fn fetch(&mut self, q: &Query) -> Result<Vec<Vec<Value>>, sqlx::Error>;
    /// Runs a query; returns its column names (empty without rows) and its
    /// rows, for statements whose columns are known by name only (`SHOW`).
    async fn fetch_named(&mut self, q: &Query) -> Result<(Vec<String>, Vec<Vec<Value>>), sqlx::Error>;
    /// Prepares a statement without running it: unknown tables, columns
    /// and type errors surface here, and nothing is executed.
    async fn prepare(&mut self, q: &Query) -> Result<(), sqlx::Error>;
    /// Prepares a statement and reports its result columns and, where the
    /// server infers them (PostgreSQL), its parameters' types.
    async fn describe(&mut self, q: &Query) -> Result<Described, sqlx::Error>;
}

/// What the server says of a prepared statement.
#[derive(Debug, Clone, Default)]
pub struct Described {
    /// Result columns: name and the server's type name ("" when unknown).
    pub columns: Vec<Column>,
    /// Parameter types in placeholder order, where the server infers them.
    pub params: Vec<String>,
}

/// Builds a [`Described`] from any backend's prepared statement.
fn described<S: sqlx::Statement>(st: &S, with_params: bool) -> Described
where
    <S::Database as sqlx::Database>::TypeInfo: sqlx::TypeInfo,
{
    use sqlx::{Column as _, TypeInfo as _};
    Described {
        columns: st
            .columns()
            .iter()
            .map(|c| Column {
                name: c.name().to_string(),
                sql_type: if c.type_info().is_null() {
                    String::new()
                } else {
                    c.type_info().name().to_string()
                },
            })
            .collect(),
        params: match st.parameters() {
            Some(sqlx::Either::Left(types)) if with_params => types.iter().map(|t| t.name().to_string()).collect(),
            _ => Vec::new(),
        },
    }
}

macro_rules! dispatch {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            Self::Pg($c) => {
                use postgres as backend;
                $body
            }
            Self::My($c) => {
                use mysql as backend;
                $body
            }
            Self::Lite($c) => {
                use sqlite as backend;
                $body
            }
        }
    };
}

/// The column names of the first row (none without rows) and every row
/// decoded: `Exec::fetch_named` on any backend.
fn named_rows<R: sqlx::Row>(
    rows: &[R],
    decode: impl Fn(&R) -> Result<Vec<Value>, sqlx::Error>,
) -> Result<(Vec<String>, Vec<Vec<Value>>), sqlx::Error> {
    use sqlx::Column as _;
    let names = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
        .unwrap_or_default();
    Ok((names, rows.iter().map(decode).collect::<Result<_, _>>()?))
}

/// `Exec` for a type whose variants each hold something that derefs to
/// the backend's connection.
macro_rules! impl_exec {
    ($ty:ty) => {
        #[async_trait]
        impl Exec for $ty {
            async fn execute(&mut self, q: &Query) -> Result<u64, sqlx::Error> {
                dispatch!(self, c => backend::execute(c, q).await)
            }
            async fn fetch(&mut self, q: &Query) -> Result<Vec<Vec<Value>>, sqlx::Error> {
                dispatch!(self, c => backend::fetch(c, q).await)
            }
            async fn fetch_named(&mut self, q: &Query) -> Result<(Vec<String>, Vec<Vec<Value>>), sqlx::Error> {
                dispatch!(self, c => backend::fetch_named(c, q).await)
            }
            async fn prepare(&mut self, q: &Query) -> Result<(), sqlx::Error> {
                dispatch!(self, c => backend::prepare(c, q).await)
            }
            async fn describe(&mut self, q: &Query) -> Result<Described, sqlx::Error> {
                dispatch!(self, c => backend::describe(c, q).await)
            }
        }
    };
}

impl_exec!(Conn);
impl_exec!(Tx<'_>);
impl_exec!(DetachedConn);

impl Conn {
    /// Opens a transaction with the given statement (`BEGIN IMMEDIATE`,
    /// `START TRANSACTION READ ONLY`, ...).
    pub async fn begin_with(&mut self, statement: &'static str) -> Result<Tx<'_>, sqlx::Error> {
        use sqlx::Connection;
        Ok(match self {
            Conn::Pg(c) => Tx::Pg(c.begin_with(statement).await?),
            Conn::My(c) => Tx::My(c.begin_with(statement).await?),
            Conn::Lite(c) => Tx::Lite(c.begin_with(statement).await?),
        })
    }

    /// Takes the connection out of its pool: it closes when dropped instead
    /// of going back (used for the lock connection, whose session state
    /// must not be reused).
    pub fn detach(self) -> DetachedConn {
        match self {
            Conn::Pg(c) => DetachedConn::Pg(c.detach()),
            Conn::My(c) => DetachedConn::My(c.detach()),
            Conn::Lite(c) => DetachedConn::Lite(c.detach()),
        }
    }
}

impl DetachedConn {
    /// Opens the dialect's read-only transaction (plan, dry run, checks).
    pub async fn begin_read_only(&mut self, dialect: &dyn Dialect) -> Result<Tx<'_>> {
        self.begin_with(dialect.begin_read_only())
            .await
            .map_err(Error::db("cannot begin a read-only transaction"))
    }

    /// Opens a transaction with the given statement.
    pub async fn begin_with(&mut self, statement: &'static str) -> Result<Tx<'_>, sqlx::Error> {
        use sqlx::Connection;
        Ok(match self {
            DetachedConn::Pg(c) => Tx::Pg(c.begin_with(statement).await?),
            DetachedConn::My(c) => Tx::My(c.begin_with(statement).await?),
            DetachedConn::Lite(c) => Tx::Lite(c.begin_with(statement).await?),
        })
    }
}

/// A connection owned outright, outside any pool.
pub enum DetachedConn {
    Pg(sqlx::PgConnection),
    My(sqlx::MySqlConnection),
    Lite(sqlx::SqliteConnection),
}

impl Tx<'_> {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Pg(t) => t.commit().await,
            Tx::My(t) => t.commit().await,
            Tx::Lite(t) => t.commit().await,
        }
    }
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Pg(t) => t.rollback().await,
            Tx::My(t) => t.rollback().await,
            Tx::Lite(t) => t.rollback().await,
        }
    }
}

/// See [`Db::identity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub server: String,
    pub database: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {}", self.server, self.database)
    }
}

/// A database handle: a small pool of connections and the dialect.
#[derive(Clone)]
pub struct Db {
    pub name: String,
    pub dialect: &'static dyn Dialect,
    redacted_url: String,
    pool: Pool,
    /// The server's ids of the connections this pool opened (MySQL, where
    /// no session shows an application name): not counted as busy.
    own: OwnIds,
}

/// Connection ids, shared with the pool's connect hook.
pub(crate) type OwnIds = std::sync::Arc<std::sync::Mutex<Vec<i64>>>;

#[derive(Clone)]
enum Pool {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
    Lite(sqlx::SqlitePool),
}

/// How a connection is set up.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `application_name` (PostgreSQL) shown to DBAs: `infill:<job>`.
    pub application_name: String,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    /// Whether a missing SQLite file may be created (the quickstart only).
    pub create_sqlite: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            application_name: "infill".into(),
            lock_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(30),
            create_sqlite: false,
        }
    }
}

impl Db {
    /// Connects to a database and checks it answers. A failure names the
    /// database with its password masked.
    pub async fn connect(url: &DatabaseUrl, opts: &ConnectOptions) -> Result<Db> {
        let backend = Backend::of_url(url.expose()).ok_or_else(|| Error::Connect {
            name: url.name.clone(),
            url: url.redacted(),
            message: "unknown URL scheme (use postgres://, mysql:// or sqlite:)".into(),
        })?;
        let dialect = backend.dialect();
        let setup = dialect.session_setup(opts.lock_timeout, opts.statement_timeout);
        let fail = |e: sqlx::Error| Error::Connect {
            name: url.name.clone(),
            url: url.redacted(),
            message: connect_message(&e, url),
        };
        let acquire_timeout = Duration::from_secs(10);
        let own = OwnIds::default();
        // One direct connection first: a pool retries until its timeout and
        // then loses the cause ("connection refused", "access denied").
        async fn probe<O: sqlx::ConnectOptions>(o: &O) -> Result<(), sqlx::Error>
        where
            O::Connection: Sized,
        {
            use sqlx::Connection;
            let c = tokio::time::timeout(Duration::from_secs(10), o.connect())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??;
            c.close().await
        }
        let pool = match backend {
            Backend::Postgres => {
                let o = sqlx::postgres::PgConnectOptions::from_str(url.expose())
                    .map_err(fail)?
                    .application_name(&opts.application_name);
                probe(&o).await.map_err(fail)?;
                Pool::Pg(postgres::pool(o, setup, acquire_timeout).await.map_err(fail)?)
            }
            Backend::MySql => {
                let o = sqlx::mysql::MySqlConnectOptions::from_str(url.expose()).map_err(fail)?;
                probe(&o).await.map_err(fail)?;
                Pool::My(
                    mysql::pool(o, setup, acquire_timeout, own.clone())
                        .await
                        .map_err(fail)?,
                )
            }
            Backend::Sqlite => {
                let o = sqlx::sqlite::SqliteConnectOptions::from_str(url.expose())
                    .map_err(fail)?
                    .create_if_missing(opts.create_sqlite || url.expose().contains("mode=rwc"))
                    .busy_timeout(opts.lock_timeout.max(Duration::from_secs(5)));
                probe(&o).await.map_err(fail)?;
                Pool::Lite(sqlite::pool(o, acquire_timeout).await.map_err(fail)?)
            }
        };
        let db = Db {
            name: url.name.clone(),
            dialect,
            redacted_url: url.redacted(),
            pool,
            own,
        };
        // Check it answers now, so an unreachable server fails before anything else.
        db.conn().await.map_err(|e| match e {
            Error::Database { source, .. } => fail(source),
            other => other,
        })?;
        Ok(db)
    }

    /// The URL, password masked.
    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    /// A connection from the pool.
    pub async fn conn(&self) -> Result<Conn> {
        let ctx = || {
            format!(
                "cannot get a connection to database `{}` ({})",
                self.name, self.redacted_url
            )
        };
        Ok(match &self.pool {
            Pool::Pg(p) => Conn::Pg(p.acquire().await.map_err(Error::db(ctx()))?),
            Pool::My(p) => Conn::My(p.acquire().await.map_err(Error::db(ctx()))?),
            Pool::Lite(p) => Conn::Lite(p.acquire().await.map_err(Error::db(ctx()))?),
        })
    }

    /// A connection of its own that refuses writes where the engine can
    /// (SQLite's `query_only`); open a `begin_read_only` transaction on it.
    /// It closes when dropped, so the setting never reaches the pool.
    pub async fn read_only_conn(&self) -> Result<DetachedConn> {
        let mut conn = self.conn().await?.detach();
        if let Some(stmt) = self.dialect.read_only_session() {
            conn.execute(&Query::new(stmt))
                .await
                .map_err(Error::db("cannot make the session read-only"))?;
        }
        Ok(conn)
    }

    /// The server as it identifies itself (PostgreSQL's system identifier,
    /// MySQL's host, port and server id, the SQLite file) and the database
    /// name: what an approval is bound to. Where the server will not say
    /// (a role without access to `pg_control_system()`), the URL without
    /// its password stands in.
    pub async fn identity(&self, c: &mut impl Exec) -> Identity {
        let found = c.fetch(&Query::new(self.dialect.identity_query())).await.ok();
        let row = found.as_ref().and_then(|rows| rows.first());
        let text = |i: usize| {
            row.and_then(|r| r.get(i))
                .filter(|v| !matches!(v, Value::Null))
                .map(Value::display)
        };
        Identity {
            server: text(0).unwrap_or_else(|| self.redacted_url.clone()),
            database: text(1).unwrap_or_else(|| self.name.clone()),
        }
    }

    /// The query counting other sessions at work on this database (see
    /// [`Dialect::busy_sessions_query`]).
    pub fn busy_sessions_query(&self) -> Option<Query> {
        let own = self.own.lock().map(|ids| ids.clone()).unwrap_or_default();
        self.dialect.busy_sessions_query(&own)
    }

    /// How many connections this pool has opened where it keeps their ids
    /// (MySQL): a count made while one was opening may have seen it at work
    /// before its id was known.
    pub fn opened(&self) -> usize {
        self.own.lock().map(|ids| ids.len()).unwrap_or(0)
    }

    /// Builds a state statement (see [`portable`]).
    pub fn q(&self, sql: &str, args: Vec<Value>) -> Query {
        portable(self.dialect, sql, args)
    }

    /// Closes the pool, waiting a few seconds at most for connections in
    /// use (a connection left broken by an error must not hang the exit).
    pub async fn close(&self) {
        let close = async {
            match &self.pool {
                Pool::Pg(p) => p.close().await,
                Pool::My(p) => p.close().await,
                Pool::Lite(p) => p.close().await,
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
    }
}

fn connect_message(e: &sqlx::Error, url: &DatabaseUrl) -> String {
    let mut r = crate::secret::Redactor::default();
    r.add_url(url.expose());
    r.mask(&e.to_string())
}
