//! Shared test harness: a fresh database per test on each backend (a temp
//! file for SQLite, `CREATE DATABASE` on PostgreSQL and MariaDB), a spec
//! writer, and a runner for the built `infill` binary.
//!
//! Servers come from `INFILL_TEST_PG` (default postgres://postgres@127.0.0.1:5432)
//! and `INFILL_TEST_MYSQL` (default mysql://root@127.0.0.1:3306). When one is
//! unreachable its tests are skipped with a message, unless
//! `INFILL_TEST_REQUIRE_SERVERS=1` (CI sets it), which makes them fail.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::str::FromStr;

use sqlx::{AssertSqlSafe, Connection, Executor, Row};

/// Which engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

enum Pool {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
    Lite(sqlx::SqlitePool),
}

/// A database of its own for one test, dropped afterwards.
pub struct TestDb {
    pub backend: Backend,
    /// The URL infill connects with.
    pub url: String,
    pub name: String,
    pub dir: tempfile::TempDir,
    pool: Pool,
    admin_url: Option<String>,
}

fn server_url(backend: Backend) -> String {
    match backend {
        Backend::Postgres => {
            std::env::var("INFILL_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
        }
        Backend::MySql => std::env::var("INFILL_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into()),
        Backend::Sqlite => String::new(),
    }
}

fn required() -> bool {
    std::env::var("INFILL_TEST_REQUIRE_SERVERS").is_ok_and(|v| v == "1" || v == "true")
}

fn unique_name() -> String {
    format!("infill_t_{}", &uuid::Uuid::now_v7().simple().to_string()[20..])
}

impl TestDb {
    /// A fresh database, or None (skip) when the server is unreachable and not required.
    pub async fn new(backend: Backend) -> Option<TestDb> {
        let dir = tempfile::tempdir().expect("temp dir");
        let name = unique_name();
        let result = match backend {
            Backend::Sqlite => {
                let path = dir.path().join("target.db");
                let url = format!("sqlite://{}", path.display());
                let o = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
                    .unwrap()
                    .create_if_missing(true);
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(o)
                    .await
                    .expect("sqlite");
                return Some(TestDb {
                    backend,
                    url,
                    name,
                    dir,
                    pool: Pool::Lite(pool),
                    admin_url: None,
                });
            }
            Backend::Postgres => {
                let server = server_url(backend);
                async {
                    let admin = sqlx::PgPool::connect(&format!("{server}/postgres")).await?;
                    admin.execute(AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
                    admin.close().await;
                    let url = format!("{server}/{name}");
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(3)
                        .connect(&url)
                        .await?;
                    Ok::<_, sqlx::Error>((url, Pool::Pg(pool), format!("{server}/postgres")))
                }
                .await
            }
            Backend::MySql => {
                let server = server_url(backend);
                async {
                    let admin = sqlx::MySqlPool::connect(&server).await?;
                    admin.execute(AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
                    admin.close().await;
                    let url = format!("{server}/{name}");
                    let pool = sqlx::mysql::MySqlPoolOptions::new()
                        .max_connections(3)
                        .connect(&url)
                        .await?;
                    Ok::<_, sqlx::Error>((url, Pool::My(pool), server.clone()))
                }
                .await
            }
        };
        match result {
            Ok((url, pool, admin)) => Some(TestDb {
                backend,
                url,
                name,
                dir,
                pool,
                admin_url: Some(admin),
            }),
            Err(e) if !required() => {
                eprintln!(
                    "SKIPPED: {backend:?} server unreachable ({e}); set INFILL_TEST_REQUIRE_SERVERS=1 to fail instead"
                );
                None
            }
            Err(e) => panic!("{backend:?} server unreachable and INFILL_TEST_REQUIRE_SERVERS=1: {e}"),
        }
    }

    /// Runs one or more statements.
    pub async fn exec(&self, sql: &str) {
        let r = match &self.pool {
            Pool::Pg(p) => sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
                .execute(p)
                .await
                .map(|_| ()),
            Pool::My(p) => sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
                .execute(p)
                .await
                .map(|_| ()),
            Pool::Lite(p) => sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
                .execute(p)
                .await
                .map(|_| ()),
        };
        r.unwrap_or_else(|e| panic!("{e}\n in: {sql}"));
    }

    /// A query returning one integer.
    pub async fn int(&self, sql: &str) -> i64 {
        let q = AssertSqlSafe(sql.to_string());
        let r: Result<Option<i64>, sqlx::Error> = match &self.pool {
            Pool::Pg(p) => sqlx::query(q).fetch_one(p).await.and_then(|r| r.try_get(0)),
            Pool::My(p) => sqlx::query(q).fetch_one(p).await.and_then(|r| r.try_get(0)),
            Pool::Lite(p) => sqlx::query(q).fetch_one(p).await.and_then(|r| r.try_get(0)),
        };
        r.unwrap_or_else(|e| panic!("{e}\n in: {sql}")).unwrap_or(0)
    }

    /// Like [`TestDb::int`], but None when the query fails (a table not created yet).
    pub async fn try_int(&self, sql: &str) -> Option<i64> {
        let q = AssertSqlSafe(sql.to_string());
        let r: Result<Option<i64>, sqlx::Error> = match &self.pool {
            Pool::Pg(p) => sqlx::query(q).fetch_one(p).await.and_then(|r| r.try_get(0)),
            Pool::My(p) => sqlx::query(q).fetch_one(p).await.and_then(|r| r.try_get(0)),
            Pool::Lite(p) => sqlx::query(q).fetch_one(p).await.and_then(|r| r.try_get(0)),
        };
        r.ok().map(|v| v.unwrap_or(0))
    }

    /// Rows of a query whose columns are all text (or NULL), as strings.
    pub async fn texts(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let q = AssertSqlSafe(sql.to_string());
        fn take<R: Row>(rows: Vec<R>) -> Vec<Vec<Option<String>>>
        where
            for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.try_get_unchecked::<Option<String>, _>(i).unwrap())
                        .collect()
                })
                .collect()
        }
        match &self.pool {
            Pool::Pg(p) => take(
                sqlx::query(q)
                    .fetch_all(p)
                    .await
                    .unwrap_or_else(|e| panic!("{e}\n in: {sql}")),
            ),
            Pool::My(p) => take(
                sqlx::query(q)
                    .fetch_all(p)
                    .await
                    .unwrap_or_else(|e| panic!("{e}\n in: {sql}")),
            ),
            Pool::Lite(p) => take(
                sqlx::query(q)
                    .fetch_all(p)
                    .await
                    .unwrap_or_else(|e| panic!("{e}\n in: {sql}")),
            ),
        }
    }

    /// A digest of every row of `table` (columns `cols`, ordered by `order`),
    /// computed from the server's text of each value.
    pub async fn checksum(&self, table: &str, cols: &[&str], order: &str) -> String {
        let expr = match self.backend {
            Backend::Postgres => cols
                .iter()
                .map(|c| format!("COALESCE({c}::text, '<null>')"))
                .collect::<Vec<_>>()
                .join(" || '|' || "),
            Backend::MySql => format!(
                "CONCAT_WS('|', {})",
                cols.iter()
                    .map(|c| format!("COALESCE(CAST({c} AS CHAR), '<null>')"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Backend::Sqlite => cols
                .iter()
                .map(|c| format!("quote({c})"))
                .collect::<Vec<_>>()
                .join(" || '|' || "),
        };
        let rows = self
            .texts(&format!("SELECT {expr} FROM {table} ORDER BY {order}"))
            .await;
        use std::hash::{DefaultHasher, Hasher};
        let mut h = DefaultHasher::new();
        for r in &rows {
            h.write(r[0].as_deref().unwrap_or("").as_bytes());
            h.write_u8(b'\n');
        }
        format!("{}:{:016x}", rows.len(), h.finish())
    }

    /// True when the table exists.
    pub async fn table_exists(&self, table: &str) -> bool {
        let sql = match self.backend {
            Backend::Postgres => format!(
                "SELECT COUNT(*)::bigint FROM information_schema.tables WHERE table_catalog = current_database() AND table_name = '{table}'"
            ),
            Backend::MySql => format!(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = '{table}'"
            ),
            Backend::Sqlite => format!("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'"),
        };
        self.int(&sql).await > 0
    }

    /// Writes `infill.toml` in the test's folder: `[databases]` pointing at
    /// this database, then `body`.
    pub fn spec(&self, body: &str) -> PathBuf {
        self.spec_with_url(&self.url, body)
    }

    /// Like [`TestDb::spec`] with another target URL.
    pub fn spec_with_url(&self, url: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join("infill.toml");
        std::fs::write(&path, format!("[databases]\ntarget = \"{url}\"\n\n{body}")).unwrap();
        path
    }

    /// The `infill` command, run in the test's folder.
    pub fn infill(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_infill"));
        c.current_dir(self.dir.path()).stdin(Stdio::null());
        c
    }

    /// Starts `infill ARGS` in the background, output captured.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.infill()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn infill")
    }

    /// Waits until runs in this database have committed at least `n` batches.
    pub async fn wait_for_batches(&self, child: &mut std::process::Child, n: i64) {
        let start = std::time::Instant::now();
        loop {
            let done = self.try_int("SELECT COUNT(*) FROM infill_batches").await.unwrap_or(0);
            if done >= n {
                return;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("infill ended ({status:?}) before {n} batches committed; the fixture is too small");
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(120),
                "no progress in 120 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Runs `infill ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.infill().args(args).output().expect("infill runs")
    }

    /// The audit log lines of a run (the only log file when `run` is None).
    pub fn audit(&self, run: Option<&str>) -> Vec<serde_json::Value> {
        let dir = self.dir.path().join("infill_logs");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        files.sort();
        let file = match run {
            Some(id) => files
                .into_iter()
                .find(|f| f.file_name().unwrap().to_string_lossy().starts_with(id))
                .expect("log of run"),
            None => {
                assert_eq!(files.len(), 1, "expected one audit log, found {files:?}");
                files.remove(0)
            }
        };
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// How many undo images are stored (a row of `infill_undo` holds a
    /// batch's images as JSON arrays), for one run or all.
    pub async fn undo_images(&self, run: Option<&str>) -> i64 {
        let filter = run.map(|r| format!(" WHERE run_id = '{r}'")).unwrap_or_default();
        self.texts(&format!("SELECT row_key FROM infill_undo{filter}"))
            .await
            .iter()
            .map(|r| {
                let keys: serde_json::Value = serde_json::from_str(r[0].as_deref().unwrap()).unwrap();
                keys.as_array().map_or(1, |k| k.len()) as i64
            })
            .sum()
    }

    /// The before and after images of the first row the run wrote, as
    /// objects (column to value), whichever way the engine stored them: a
    /// row of arrays of objects, or a row of columns (PostgreSQL).
    pub async fn first_image(&self, run: &str) -> (serde_json::Value, serde_json::Value) {
        let row = self
            .texts(&format!(
                "SELECT before_image, after_image FROM infill_undo WHERE run_id = '{run}' ORDER BY batch_no, seq LIMIT 1"
            ))
            .await;
        let json = |i: usize| -> serde_json::Value { serde_json::from_str(row[0][i].as_deref().unwrap()).unwrap() };
        let (before, after) = (json(0), json(1));
        if after.is_array() {
            return (before[0].clone(), after[0].clone());
        }
        let mut b = serde_json::Map::new();
        let mut a = serde_json::Map::new();
        for (name, values) in after.as_object().unwrap() {
            a.insert(name.clone(), values[0].clone());
            b.insert(name.clone(), before[name.as_str()].get(0).cloned().unwrap_or_default());
        }
        (b.into(), a.into())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// SQL text that differs per engine: picks one of three.
    pub fn pick<'a>(&self, sqlite: &'a str, pg: &'a str, mysql: &'a str) -> &'a str {
        match self.backend {
            Backend::Sqlite => sqlite,
            Backend::Postgres => pg,
            Backend::MySql => mysql,
        }
    }

    /// A `SELECT` producing integers 1..=n as column `i`, for bulk inserts.
    pub fn series(&self, n: u64) -> String {
        match self.backend {
            Backend::Postgres => format!("SELECT g AS i FROM generate_series(1, {n}) g"),
            Backend::MySql => format!("SELECT seq AS i FROM seq_1_to_{n}"),
            Backend::Sqlite => {
                format!("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) SELECT i FROM s")
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin) = self.admin_url.clone() else { return };
        let (backend, name) = (self.backend, self.name.clone());
        let pool = std::mem::replace(
            &mut self.pool,
            Pool::Lite(sqlx::SqlitePool::connect_lazy("sqlite::memory:").unwrap()),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                match pool {
                    Pool::Pg(p) => p.close().await,
                    Pool::My(p) => p.close().await,
                    Pool::Lite(p) => p.close().await,
                }
                let sql = match backend {
                    Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                    _ => format!("DROP DATABASE IF EXISTS {name}"),
                };
                let _ = match backend {
                    Backend::Postgres => match sqlx::PgPool::connect(&admin).await {
                        Ok(p) => p.execute(AssertSqlSafe(sql)).await.map(|_| ()),
                        Err(e) => Err(e),
                    },
                    _ => match sqlx::MySqlPool::connect(&admin).await {
                        Ok(p) => p.execute(AssertSqlSafe(sql)).await.map(|_| ()),
                        Err(e) => Err(e),
                    },
                };
            });
        })
        .join()
        .ok();
    }
}

/// Declares one async test per backend: `name::sqlite`, `name::postgres`, `name::mysql`.
#[macro_export]
macro_rules! on_all_backends {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(db) = $crate::common::TestDb::new($crate::common::Backend::Sqlite).await {
                    $body(db).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(db) = $crate::common::TestDb::new($crate::common::Backend::Postgres).await {
                    $body(db).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                if let Some(db) = $crate::common::TestDb::new($crate::common::Backend::MySql).await {
                    $body(db).await;
                }
            }
        }
    };
}

/// Declares one async test per server: `name::postgres`, `name::mysql`
/// (for what SQLite does not have: row locks, other sessions, a network).
#[macro_export]
macro_rules! on_servers {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(db) = $crate::common::TestDb::new($crate::common::Backend::Postgres).await {
                    super::$name(db).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                if let Some(db) = $crate::common::TestDb::new($crate::common::Backend::MySql).await {
                    super::$name(db).await;
                }
            }
        }
    };
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status: {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A connection of the test's own (PostgreSQL or MariaDB): to hold locks in
/// an open transaction, or to keep a session busy.
pub enum Holder {
    Pg(sqlx::PgConnection),
    My(sqlx::MySqlConnection),
}

impl Holder {
    pub async fn open(db: &TestDb) -> Holder {
        match db.backend {
            Backend::Postgres => Holder::Pg(sqlx::PgConnection::connect(&db.url).await.unwrap()),
            _ => Holder::My(sqlx::MySqlConnection::connect(&db.url).await.unwrap()),
        }
    }
    pub async fn exec(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            Holder::Pg(c) => c.execute(sql).await.map(|_| ()),
            Holder::My(c) => c.execute(sql).await.map(|_| ()),
        }
    }
}
