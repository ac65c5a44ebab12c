//! `infill plan`: what a run would do, found without writing anything, and
//! a fingerprint an approval can be bound to. The analysis runs in a
//! read-only transaction (SQLite: `query_only`) and creates no table, so it
//! is safe against production at any time; `run --dry-run` shows the same
//! analysis for one job.
//!
//! The fingerprint is a sha256 over three parts, kept apart so a refused
//! run can say which one moved: the job's definition as written (source,
//! action, checks, categories, priority; not the throttle), its params, and
//! the target as the server identifies itself. `${VAR}` values and
//! passwords are in none of them.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dialect::{ConnectOptions, Db, Exec, Identity};
use crate::error::{Error, Result};
use crate::spec::{Expect, ResolvedJob, Spec};
use crate::sql::Query;
use crate::target::Target;
use crate::value::{Key, Value};

/// The plan file's format version.
pub const PLAN_FORMAT: u32 = 1;

/// Rows shown with their values before and after.
pub const SAMPLE_ROWS: u64 = 10;

/// How the counts were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Counted {
    /// `COUNT(*)` over the candidates.
    Exact,
    /// The query planner's estimate (`--estimate`).
    Estimate,
}

/// What an approval is bound to, part by part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// sha256 over the three below.
    pub sha256: String,
    /// The job as written: source, action, checks, categories, priority.
    pub definition_sha256: String,
    /// The params' values (secrets masked).
    pub params_sha256: String,
    /// The target's identity (server and database).
    pub target_sha256: String,
}

impl Fingerprint {
    /// The fingerprint of a resolved job against an identified target.
    pub fn of(r: &ResolvedJob, target: &Identity) -> Fingerprint {
        let sha = |s: &str| hex::encode(Sha256::digest(s.as_bytes()));
        let definition_sha256 = r.job.approval_sha256.clone();
        let params_sha256 = sha(&r.params_json().to_string());
        let target_sha256 = Fingerprint::target_sha256(target);
        let sha256 = sha(&format!("{definition_sha256}\n{params_sha256}\n{target_sha256}"));
        Fingerprint {
            sha256,
            definition_sha256,
            params_sha256,
            target_sha256,
        }
    }
}

impl Fingerprint {
    /// The target part alone.
    pub fn target_sha256(target: &Identity) -> String {
        hex::encode(Sha256::digest(
            format!("{}\n{}", target.server, target.database).as_bytes(),
        ))
    }
}

/// Rows of one category (`categories.NAME`).
#[derive(Debug, Clone, Serialize)]
pub struct CategoryCount {
    pub name: String,
    pub predicate: String,
    pub rows: u64,
}

/// Rows of one priority segment, not counting earlier segments' rows.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentCount {
    pub predicate: String,
    pub rows: u64,
}

/// Rows a run would write to one table.
#[derive(Debug, Clone, Serialize)]
pub struct TableWrites {
    pub table: String,
    pub rows: u64,
    pub what: String,
}

/// A row of the sample.
#[derive(Debug, Clone, Serialize)]
pub struct SampleRow {
    pub key: Key,
    pub before: Vec<(String, Value)>,
    pub after: Vec<(String, Value)>,
}

/// A check a run would run after the job.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedCheck {
    pub name: String,
    pub sql: String,
    pub expect: Expect,
}

/// The analysis of one job.
#[derive(Debug, Clone, Serialize)]
pub struct JobPlan {
    pub job: String,
    pub description: Option<String>,
    /// The target URL, password masked.
    pub target: String,
    /// The target as the server identifies itself.
    pub target_identity: String,
    pub table: String,
    pub key: Vec<String>,
    /// Params as resolved (secrets masked).
    pub params: serde_json::Value,
    pub depends_on: Vec<String>,
    pub counted: Counted,
    pub candidates: u64,
    /// Keys from the first to the last, candidates or not: what batches walk.
    pub keys_in_range: u64,
    /// Per category; they may overlap.
    pub categories: Vec<CategoryCount>,
    /// Candidates in no category (None without categories or with `--estimate`).
    pub uncategorised: Option<u64>,
    /// Per priority segment, in run order; the rest run last.
    pub priority: Vec<SegmentCount>,
    pub sample: Vec<SampleRow>,
    pub writes: Vec<TableWrites>,
    /// The first batch's size (later ones adapt unless fixed).
    pub batch_size: u64,
    pub batches: u64,
    /// The rate limit, in rows per second.
    pub rate_per_second: Option<f64>,
    /// The least time the throttle allows (rate and pauses); None when
    /// unthrottled: then the server sets the pace.
    pub estimated_seconds: Option<f64>,
    /// The rest after a batch during which the application was at work, in
    /// multiples of the batch's duration (`busy_sleep_coef`); None where it
    /// does not apply (turned off, an engine that cannot see other
    /// sessions, an action per record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy_rest: Option<f64>,
    pub checks: Vec<PlannedCheck>,
    pub fingerprint: Fingerprint,
    /// `action.http`: the first records' requests as they would be sent
    /// (secrets masked).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<crate::http::Rendered>,
}

/// A plan of one or more jobs, as `--json` prints it and `--out` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub infill_plan: u32,
    pub created_at: String,
    /// The spec file, as an absolute path.
    pub spec: PathBuf,
    pub spec_sha256: String,
    pub env: Option<String>,
    /// sha256 over the jobs' fingerprints, in order.
    pub fingerprint: String,
    pub jobs: Vec<JobPlan>,
}

/// What `--estimate` asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Use the planner's row estimates instead of counting.
    pub estimate: bool,
}

/// Plans the given jobs (already resolved, in dependency order).
pub async fn plan(spec: &Spec, jobs: &[ResolvedJob], opts: PlanOptions) -> Result<Plan> {
    let mut out = Vec::new();
    for r in jobs {
        let db = Db::connect(&r.target, &ConnectOptions::default()).await?;
        let found = plan_job(&db, r, opts).await;
        db.close().await;
        out.push(found?);
    }
    let all = out
        .iter()
        .map(|j| j.fingerprint.sha256.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Plan {
        infill_plan: PLAN_FORMAT,
        created_at: crate::state::now(),
        spec: std::path::absolute(&spec.path).unwrap_or_else(|_| spec.path.clone()),
        spec_sha256: spec.sha256.clone(),
        env: jobs.first().and_then(|r| r.env.clone()),
        fingerprint: hex::encode(Sha256::digest(all.as_bytes())),
        jobs: out,
    })
}

/// Inspects the target (every fragment prepared) and analyses one job.
pub async fn plan_job(db: &Db, r: &ResolvedJob, opts: PlanOptions) -> Result<JobPlan> {
    let mut conn = db.read_only_conn().await?;
    let identity = db.identity(&mut conn).await;
    let target = Target::inspect(db, &mut conn, r).await?;
    for check in &r.job.checks {
        let q = crate::verify::check_query(db.dialect, check, r)?;
        conn.prepare(&q)
            .await
            .map_err(|e| crate::verify::check_error(db, check, r, e))?;
    }
    if r.job.reads_pages() {
        return analyse_stream(db, &target, r, &identity).await;
    }
    analyse(db, &mut conn, &target, r, &identity, opts).await
}

/// The plan of a job whose rows come from a query, diff or file: the
/// source is read through once, read-only, to count its rows (a diff's:
/// the missing ones), and its first rows are the sample, with the fields
/// the action binds.
async fn analyse_stream(db: &Db, target: &Target, r: &ResolvedJob, identity: &Identity) -> Result<JobPlan> {
    let job = &r.job;
    let (first, candidates, fields) = read_stream(db, target, r).await?;
    let nk = job.key.len();
    let sample = first
        .rows
        .iter()
        .map(|row| SampleRow {
            key: row[..nk].to_vec(),
            before: Vec::new(),
            after: fields[nk..]
                .iter()
                .map(|c| c.name.clone())
                .zip(row[nk..].iter().cloned())
                .collect(),
        })
        .collect();
    // Requests are rendered, never sent: a template error shows here.
    let requests = match (&job.http, &r.http, &job.exec, &job.export) {
        (Some(spec), Some(target), _, _) => {
            let renderer = crate::http::Renderer::new(
                spec.body.as_ref(),
                &spec.location,
                format!("jobs.{}.action.http.body", job.name),
            )?;
            first
                .rows
                .iter()
                .map(|row| crate::http::render_request(&renderer, r, spec, target, &fields, row, true))
                .collect::<Result<Vec<_>>>()?
        }
        // A command's stdin, or an exported item: shown like a request.
        (_, _, Some(spec), _) => {
            let renderer = crate::http::Renderer::of_job(job)?.expect("an exec job has a template");
            let line = std::iter::once(spec.program.display().to_string())
                .chain(spec.args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ");
            first
                .rows
                .iter()
                .map(|row| {
                    let cmd = crate::exec::prepare(spec, &renderer, r, "(plan)", &fields, row, true)?;
                    Ok(crate::http::Rendered {
                        method: "EXEC".into(),
                        url: line.clone(),
                        headers: cmd
                            .env
                            .into_iter()
                            .filter(|(k, _)| k.starts_with("ROW_") || k == "INFILL_IDEMPOTENCY_KEY")
                            .collect(),
                        body: cmd.stdin,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        }
        (_, _, _, Some(spec)) => {
            let renderer = crate::http::Renderer::of_job(job)?.expect("an export job has a template");
            first
                .rows
                .iter()
                .map(|row| {
                    Ok(crate::http::Rendered {
                        method: "EXPORT".into(),
                        url: spec.path.display().to_string(),
                        headers: Vec::new(),
                        body: crate::http::render_row(&renderer, r, &fields, row, true)?.body,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        }
        _ => Vec::new(),
    };
    let batch_size = r.settings.batch_size;
    let batches = candidates.div_ceil(batch_size.max(1));
    let writes = planned_writes(r, candidates, batches);
    Ok(JobPlan {
        job: job.name.clone(),
        description: job.description.clone(),
        target: db.redacted_url().to_string(),
        target_identity: identity.to_string(),
        table: job.table.join("."),
        key: job.key.clone(),
        params: r.params_json(),
        depends_on: job.depends_on.clone(),
        counted: Counted::Exact,
        candidates,
        keys_in_range: candidates,
        categories: Vec::new(),
        uncategorised: None,
        priority: Vec::new(),
        sample,
        writes,
        batch_size,
        batches,
        rate_per_second: r.settings.rate.map(|rate| rate.per_second),
        estimated_seconds: least_duration(candidates, batches, r),
        busy_rest: busy_rest(db, r),
        checks: planned_checks(r),
        fingerprint: Fingerprint::of(r, identity),
        requests,
    })
}

/// What a run of the job would write, table by table.
fn planned_writes(r: &ResolvedJob, candidates: u64, batches: u64) -> Vec<TableWrites> {
    let job = &r.job;
    let mut writes = vec![match (&job.call, &job.insert, &r.http) {
        (Some(c), _, _) => TableWrites {
            table: "(action.call)".into(),
            rows: candidates,
            what: format!("calls of: {}", c.sql),
        },
        (_, Some(i), _) => TableWrites {
            table: i.table.join("."),
            rows: candidates,
            what: "rows inserted (at most: a row whose unique key is taken is skipped)".into(),
        },
        (_, _, Some(h)) => TableWrites {
            table: "(action.http)".into(),
            rows: candidates,
            what: format!("requests to {}", r.redactor.mask(&h.url)),
        },
        _ if job.exec.is_some() => TableWrites {
            table: "(action.exec)".into(),
            rows: candidates,
            what: format!(
                "runs of {}",
                job.exec
                    .as_ref()
                    .map(|e| e.program.display().to_string())
                    .unwrap_or_default()
            ),
        },
        _ if job.export.is_some() => TableWrites {
            table: "(action.export)".into(),
            rows: candidates,
            what: format!(
                "rows written to {}",
                job.export
                    .as_ref()
                    .map(|e| e.path.display().to_string())
                    .unwrap_or_default()
            ),
        },
        _ if job.reads_pages() => TableWrites {
            table: job.table.join("."),
            rows: candidates,
            what: "rows updated, one statement per row by its key".into(),
        },
        _ => TableWrites {
            table: job.table.join("."),
            rows: candidates,
            what: "rows updated (at most: a row changed since is skipped)".into(),
        },
    }];
    if job.undo {
        writes.push(TableWrites {
            table: "infill_undo".into(),
            rows: candidates,
            what: "undo images (before and after values)".into(),
        });
    }
    writes.push(TableWrites {
        table: "infill_batches".into(),
        rows: batches,
        what: "checkpoints, one per batch".into(),
    });
    writes
}

/// How many rows a query, diff or file source holds now.
pub(crate) async fn stream_count(db: &Db, target: &Target, r: &ResolvedJob) -> Result<u64> {
    let (_, n, _) = read_stream(db, target, r).await?;
    Ok(n)
}

/// The first page of a stream source and its row count.
async fn read_stream(
    db: &Db,
    target: &Target,
    r: &ResolvedJob,
) -> Result<(crate::source::Page, u64, Vec<crate::dialect::Column>)> {
    let sources = crate::source::SourceDbs::connect(r, &ConnectOptions::default()).await?;
    let wanted = crate::source::wanted_fields(r, target)?;
    let found = async {
        let mut reader = sources.reader(r, db, wanted.as_deref()).await?;
        let first = reader.page(None, SAMPLE_ROWS).await?;
        let candidates = reader.count_after(None).await?;
        Ok::<_, Error>((first, candidates, reader.fields.clone()))
    }
    .await;
    sources.close().await;
    found
}

fn planned_checks(r: &ResolvedJob) -> Vec<PlannedCheck> {
    r.job
        .checks
        .iter()
        .map(|c| PlannedCheck {
            name: c.name.clone(),
            sql: c.sql.sql.clone(),
            expect: c.expect.clone(),
        })
        .collect()
}

/// The counts, sample, writes and fingerprint of a job whose target is
/// inspected, in a read-only transaction.
pub(crate) async fn analyse(
    db: &Db,
    conn: &mut crate::dialect::DetachedConn,
    target: &Target,
    r: &ResolvedJob,
    identity: &Identity,
    opts: PlanOptions,
) -> Result<JobPlan> {
    let d = db.dialect;
    let mut tx = conn.begin_read_only(d).await?;
    let job = &r.job;
    let mut plan = JobPlan {
        job: job.name.clone(),
        description: job.description.clone(),
        target: db.redacted_url().to_string(),
        target_identity: identity.to_string(),
        table: job.table.join("."),
        key: job.key.clone(),
        params: r.params_json(),
        depends_on: job.depends_on.clone(),
        counted: Counted::Exact,
        candidates: 0,
        keys_in_range: 0,
        categories: Vec::new(),
        uncategorised: None,
        priority: Vec::new(),
        sample: Vec::new(),
        writes: Vec::new(),
        batch_size: r.settings.batch_size,
        batches: 0,
        rate_per_second: r.settings.rate.map(|rate| rate.per_second),
        estimated_seconds: None,
        busy_rest: busy_rest(db, r),
        checks: planned_checks(r),
        fingerprint: Fingerprint::of(r, identity),
        requests: Vec::new(),
    };
    let estimated = if opts.estimate {
        estimate(&mut tx, db, target, r, &mut plan).await?
    } else {
        false
    };
    if let Some(upper) = first_key(&mut tx, &target.max_key()).await? {
        if !estimated {
            plan.keys_in_range = count(&mut tx, &target.count_keys(None, &upper)).await?;
            let counts = tx
                .fetch(&target.breakdown(&upper))
                .await
                .map_err(|e| fragment_error(db, r, e, "cannot count the candidates"))?;
            let counts: Vec<u64> = counts
                .first()
                .map(|row| row.iter().map(|v| as_count(Some(v))).collect())
                .unwrap_or_default();
            let mut it = counts.into_iter();
            plan.candidates = it.next().unwrap_or(0);
            for ((name, text), n) in job.categories.iter().zip(it.by_ref()) {
                plan.categories.push(CategoryCount {
                    name: name.clone(),
                    predicate: text.sql.clone(),
                    rows: n,
                });
            }
            if !job.categories.is_empty() {
                plan.uncategorised = it.next();
            }
            for (text, n) in job.priority.iter().zip(it) {
                plan.priority.push(SegmentCount {
                    predicate: text.sql.clone(),
                    rows: n,
                });
            }
        }
        plan.sample = sample(&mut tx, db, target, r, &upper).await?;
    }
    plan.batches = plan.keys_in_range.div_ceil(plan.batch_size.max(1)) * target.segments();
    plan.writes = planned_writes(r, plan.candidates, plan.batches);
    plan.estimated_seconds = least_duration(plan.candidates, plan.batches, r);
    tx.rollback()
        .await
        .map_err(Error::db("cannot end the read-only transaction"))?;
    Ok(plan)
}

/// Fills the counts from the planner's estimates. Returns false where the
/// engine gives none (SQLite): then the caller counts exactly.
async fn estimate(tx: &mut impl Exec, db: &Db, target: &Target, r: &ResolvedJob, plan: &mut JobPlan) -> Result<bool> {
    let d = db.dialect;
    let Some(q) = d.explain(&target.estimate_of(None)) else {
        return Ok(false);
    };
    let rows = tx
        .fetch(&q)
        .await
        .map_err(Error::db("cannot read the planner's estimate"))?;
    let name = r.job.table.last().map(String::as_str).unwrap_or_default();
    let Some(candidates) = d.explained_rows(&rows, name) else {
        return Ok(false);
    };
    plan.counted = Counted::Estimate;
    plan.candidates = candidates;
    plan.keys_in_range = count(tx, &d.estimate_rows_query(&r.job.table)).await?;
    for ((name, f), (_, text)) in target.categories.iter().zip(&r.job.categories) {
        let q = d.explain(&target.estimate_of(Some(f))).expect("the engine explains");
        let rows = tx
            .fetch(&q)
            .await
            .map_err(Error::db("cannot read the planner's estimate"))?;
        plan.categories.push(CategoryCount {
            name: name.clone(),
            predicate: text.sql.clone(),
            rows: d.explained_rows(&rows, name).unwrap_or(0),
        });
    }
    Ok(true)
}

/// The least time a run takes under its throttle: the rate, and pauses
/// between batches. None when neither applies.
fn least_duration(candidates: u64, batches: u64, r: &ResolvedJob) -> Option<f64> {
    let s = &r.settings;
    let by_rate = s.rate.map(|rate| candidates as f64 / rate.per_second);
    let pauses = (s.pause_between > Duration::ZERO).then_some(batches as f64 * s.pause_between.as_secs_f64());
    match (by_rate, pauses) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    }
}

/// See [`JobPlan::busy_rest`].
fn busy_rest(db: &Db, r: &ResolvedJob) -> Option<f64> {
    let s = &r.settings;
    let per_record = r.job.http.is_some() || r.job.exec.is_some() || r.job.export.is_some();
    (s.busy_sleep_coef > s.sleep_coef && !per_record && db.dialect.busy_sessions_query(&[]).is_some())
        .then_some(s.busy_sleep_coef)
}

async fn sample(tx: &mut impl Exec, db: &Db, target: &Target, r: &ResolvedJob, upper: &Key) -> Result<Vec<SampleRow>> {
    let nk = target.keys.len();
    let ns = target.sets.len();
    let names: Vec<String> = target.sets.iter().map(|(c, _)| c.name.clone()).collect();
    let rows = tx
        .fetch(&target.sample(upper, SAMPLE_ROWS))
        .await
        .map_err(|e| fragment_error(db, r, e, "cannot read the sample"))?;
    Ok(rows
        .into_iter()
        .map(|row| SampleRow {
            key: row[..nk].to_vec(),
            before: names.iter().cloned().zip(row[nk..nk + ns].iter().cloned()).collect(),
            after: names.iter().cloned().zip(row[nk + ns..].iter().cloned()).collect(),
        })
        .collect())
}

/// An error from a statement built of the job's fragments: a database
/// error names the job (the fragments each prepared, so it is a runtime
/// error such as a bad cast).
fn fragment_error(db: &Db, r: &ResolvedJob, e: sqlx::Error, context: &str) -> Error {
    match e {
        sqlx::Error::Database(dbe) => Error::Sql {
            location: r.job.location.clone(),
            field: format!("jobs.{}", r.job.name),
            database: db.name.clone(),
            message: r.redactor.mask(dbe.message()),
        },
        other => Error::Database {
            context: context.into(),
            source: other,
        },
    }
}

/// Params as `name=value` pairs, for people (they travel as tagged JSON).
pub fn params_text(params: &serde_json::Value) -> String {
    let Some(m) = params.as_object() else {
        return params.to_string();
    };
    m.iter()
        .map(|(k, v)| {
            let shown = Value::from_json(v)
                .map(|v| v.display())
                .unwrap_or_else(|| v.to_string());
            format!("{k}={shown}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) async fn first_key(c: &mut impl Exec, q: &Query) -> Result<Option<Key>> {
    let rows = c.fetch(q).await.map_err(Error::db("cannot read the key range"))?;
    Ok(rows.into_iter().next())
}

pub(crate) async fn count(c: &mut impl Exec, q: &Query) -> Result<u64> {
    let rows = c.fetch(q).await.map_err(Error::db("cannot count"))?;
    Ok(as_count(rows.first().and_then(|r| r.first())))
}

pub(crate) fn as_count(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Int(n)) => (*n).max(0) as u64,
        Some(Value::Text(s)) => s.trim().parse().unwrap_or(0),
        Some(Value::Real(f)) => f.max(0.0) as u64,
        _ => 0,
    }
}
