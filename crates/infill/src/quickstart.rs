//! The quickstart: a demo SQLite database with rows missing a value (seed
//! 001's answers without a syllabus) and a spec that fills them, written to
//! a folder of their own so the demo needs no server and touches nothing
//! else.

use std::path::{Path, PathBuf};

use crate::dialect::{ConnectOptions, Db, Exec};
use crate::error::{Error, Result};
use crate::spec::DatabaseUrl;
use crate::sql::Query;
use crate::value::Value;

/// Rows in the demo table.
pub const DEMO_ROWS: i64 = 50_000;

/// The spec the quickstart writes.
pub const DEMO_SPEC: &str = r#"# The quickstart's spec: fill answers.syllabus from each answer's cohort.
# Try: infill run infill.toml --dry-run      (read-only: counts, batches, a sample)
#      infill status --spec infill.toml       (what ran, with its counters)

[databases]
target = "sqlite:demo.db"            # paths are relative to this file

[defaults]
batch_size = 1000                    # the first batch; later ones aim at batch_time
batch_time = "200ms"

[jobs.fill_syllabus]
description = "Copy each answer's syllabus from its cohort"
source.table = "answers"
source.key = ["id"]
source.where = "syllabus IS NULL AND created_at >= :since AND cohort_id IN (SELECT id FROM cohorts WHERE syllabus IS NOT NULL)"
action.update.syllabus = "(SELECT c.syllabus FROM cohorts c WHERE c.id = answers.cohort_id)"
params.since = { type = "date", default = "2020-01-01" }
"#;

/// What the quickstart created.
#[derive(Debug, Clone)]
pub struct Demo {
    pub dir: PathBuf,
    pub spec: PathBuf,
    pub database: PathBuf,
}

/// Counts that show the demo's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoCounts {
    pub rows: u64,
    /// Rows whose syllabus is still NULL though their cohort has one.
    pub missing: u64,
    /// Rows that cannot be filled (their cohort has no syllabus).
    pub unfillable: u64,
}

/// Creates (or re-creates) the demo database and spec in `dir`.
pub async fn create(dir: &Path) -> Result<Demo> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let database = dir.join("demo.db");
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", database.display()));
        if p.exists() {
            std::fs::remove_file(&p).map_err(Error::io(&p))?;
        }
    }
    let logs = dir.join("infill_logs");
    if logs.exists() {
        std::fs::remove_dir_all(&logs).map_err(Error::io(&logs))?;
    }
    let db = open(&database, true).await?;
    let mut c = db.conn().await?;
    let statements = [
        "CREATE TABLE cohorts (id INTEGER PRIMARY KEY, slug TEXT NOT NULL, syllabus TEXT)",
        "CREATE TABLE answers (id INTEGER PRIMARY KEY, cohort_id INTEGER REFERENCES cohorts(id), \
         score INTEGER NOT NULL, created_at TEXT NOT NULL, syllabus TEXT)",
        "INSERT INTO cohorts (id, slug, syllabus) VALUES \
         (1, 'miami-web-dev-pt-1', 'full-stack'), (2, 'madrid-data-ft-3', 'data-science'), \
         (3, 'online-ml-pt-2', 'machine-learning'), (4, 'lisbon-web-ft-7', 'full-stack'), \
         (5, 'caracas-cyber-pt-1', 'cybersecurity'), (6, 'santiago-web-pt-9', NULL)",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
         INSERT INTO answers (id, cohort_id, score, created_at, syllabus) \
         SELECT i, 1 + (i * 7) % 6, (i * 13) % 11, \
                date('2021-01-01', '+' || (i % 1200) || ' days'), \
                CASE WHEN i % 5 = 0 THEN NULL \
                     ELSE (SELECT syllabus FROM cohorts WHERE id = 1 + (i * 7) % 6) END \
         FROM n",
    ];
    for s in statements {
        let args = if s.contains("?1") {
            vec![Value::Int(DEMO_ROWS)]
        } else {
            vec![]
        };
        c.execute(&Query { sql: s.into(), args })
            .await
            .map_err(Error::db("cannot create the demo database"))?;
    }
    drop(c);
    db.close().await;
    let spec = dir.join("infill.toml");
    std::fs::write(&spec, DEMO_SPEC).map_err(Error::io(&spec))?;
    Ok(Demo {
        dir: dir.to_path_buf(),
        spec,
        database,
    })
}

async fn open(database: &Path, create: bool) -> Result<Db> {
    let url = DatabaseUrl::new("target", format!("sqlite://{}", database.display()));
    Db::connect(
        &url,
        &ConnectOptions {
            create_sqlite: create,
            ..Default::default()
        },
    )
    .await
}

/// Counts rows, rows still missing a value, and rows that cannot be filled.
pub async fn counts(database: &Path) -> Result<DemoCounts> {
    let db = open(database, false).await?;
    let mut c = db.conn().await?;
    let rows = c
        .fetch(&Query::new(
            "SELECT COUNT(*), \
             SUM(CASE WHEN a.syllabus IS NULL AND c.syllabus IS NOT NULL THEN 1 ELSE 0 END), \
             SUM(CASE WHEN a.syllabus IS NULL AND c.syllabus IS NULL THEN 1 ELSE 0 END) \
             FROM answers a LEFT JOIN cohorts c ON c.id = a.cohort_id",
        ))
        .await
        .map_err(Error::db("cannot count the demo rows"))?;
    drop(c);
    db.close().await;
    let n = |v: &Value| match v {
        Value::Int(i) => *i as u64,
        _ => 0,
    };
    let r = &rows[0];
    Ok(DemoCounts {
        rows: n(&r[0]),
        missing: n(&r[1]),
        unfillable: n(&r[2]),
    })
}
