//! Checks: queries that return one number and what it must be (seed 002's
//! "every validation query must return 0"). `infill verify` runs them in a
//! read-only transaction and fails loudly (exit 1); `infill run` runs a
//! job's checks after it finishes, and a failed check stops its dependents.

use serde::Serialize;

use crate::dialect::{Db, Dialect, Exec, SqlBuilder};
use crate::error::{Error, Result};
use crate::spec::{Check, Expect, ResolvedJob};
use crate::sql::{Fragment, Query};
use crate::value::Value;

/// The outcome of one check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub job: String,
    pub name: String,
    /// The number the query returned (None when it returned no row or NULL).
    pub value: Option<f64>,
    pub expect: Expect,
    pub passed: bool,
}

/// Runs every check of a job against its target, read-only.
pub async fn run_checks(db: &Db, r: &ResolvedJob) -> Result<Vec<CheckResult>> {
    let d = db.dialect;
    let mut conn = db.read_only_conn().await?;
    let mut tx = conn.begin_read_only(d).await?;
    let mut out = Vec::new();
    for check in &r.job.checks {
        let rows = tx
            .fetch(&check_query(d, check, r)?)
            .await
            .map_err(|e| check_error(db, check, r, e))?;
        let value = rows.first().and_then(|row| row.first()).and_then(number);
        let passed = value.is_some_and(|v| check.expect.accepts(v));
        out.push(CheckResult {
            job: r.job.name.clone(),
            name: check.name.clone(),
            value,
            expect: check.expect.clone(),
            passed,
        });
    }
    tx.rollback()
        .await
        .map_err(Error::db("cannot end the read-only transaction"))?;
    Ok(out)
}

/// The statement a check runs: its query as a scalar subquery.
pub(crate) fn check_query(d: &dyn Dialect, check: &Check, r: &ResolvedJob) -> Result<Query> {
    let frag = Fragment::parse(&check.sql.sql, d.backslash_escapes()).map_err(|m| Error::Spec {
        location: check.sql.location.clone(),
        field: check.sql.field.clone(),
        message: m,
    })?;
    let mut b = SqlBuilder::new(d);
    b.push("SELECT ");
    let mark = b.mark();
    b.push("(").fragment(&frag, &r.params).push(")");
    b.wrap_since(mark, |q| d.value_out(q));
    Ok(b.finish())
}

/// A check's failure, naming its spec field.
pub(crate) fn check_error(db: &Db, check: &Check, r: &ResolvedJob, e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::Database(dbe) => Error::Sql {
            location: check.sql.location.clone(),
            field: check.sql.field.clone(),
            database: db.name.clone(),
            message: r.redactor.mask(dbe.message()),
        },
        other => Error::Database {
            context: format!("check `{}`", check.name),
            source: other,
        },
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Real(f) => Some(*f),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::Text(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// One line of human output for a check.
pub fn describe(c: &CheckResult) -> String {
    let want = match &c.expect {
        Expect::Equal(e) => format!("expected {e}"),
        Expect::Range {
            min: Some(a),
            max: Some(b),
        } => format!("expected {a}..={b}"),
        Expect::Range {
            min: Some(a),
            max: None,
        } => format!("expected >= {a}"),
        Expect::Range {
            min: None,
            max: Some(b),
        } => format!("expected <= {b}"),
        Expect::Range { .. } => "expected anything".into(),
    };
    let got = c.value.map(|v| v.to_string()).unwrap_or_else(|| "no value".into());
    format!(
        "{} {}: {} — got {got}, {want}",
        if c.passed { "PASS" } else { "FAIL" },
        c.job,
        c.name
    )
}
