//! The approval gate. Where `require_approval = true` applies, a run must
//! show an approval (a row of `infill_approvals` in the target, written by
//! `infill approve PLAN.json`) whose fingerprint matches the job, params
//! and target as they are now, that has not expired, that someone else
//! gave when `approver_must_differ` says so, and whose candidate count is
//! within the environment's `drift` of the count now. A refusal says which
//! of these failed and by how much (exit 3).
//!
//! The gate lives in the library, not the CLI: no flag skips it. A
//! [`GatePass`] can only be made here.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dialect::{ConnectOptions, Db, Exec};
use crate::error::{Error, Result};
use crate::plan::{Counted, Fingerprint, params_text};
use crate::spec::{DatabaseUrl, ResolvedJob, Spec};
use crate::state;
use crate::target::Target;
use crate::value::Value;

/// The parts of a plan file that approvals need.
#[derive(Debug, Clone, Deserialize)]
pub struct PlanFile {
    pub infill_plan: u32,
    pub created_at: String,
    pub spec: std::path::PathBuf,
    pub env: Option<String>,
    pub fingerprint: String,
    pub jobs: Vec<ApprovedJob>,
}

/// One job of an approval: its fingerprint and the count the approver saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovedJob {
    pub job: String,
    pub fingerprint: Fingerprint,
    pub candidates: u64,
    pub counted: Counted,
    /// The params as planned (secrets masked), for messages.
    pub params: serde_json::Value,
}

impl PlanFile {
    /// Reads a plan written by `infill plan --out`.
    pub fn read(path: &Path) -> Result<PlanFile> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Usage(format!(
                "cannot read the plan {}: {e} (write one with `infill plan SPEC --out {}`)",
                path.display(),
                path.display()
            ))
        })?;
        let plan: PlanFile = serde_json::from_str(&text).map_err(|e| {
            Error::Usage(format!(
                "{} is not a plan written by `infill plan --out`: {e}",
                path.display()
            ))
        })?;
        if plan.infill_plan != crate::plan::PLAN_FORMAT {
            return Err(Error::Usage(format!(
                "{} has plan format {}; this infill reads format {}: run `infill plan` again",
                path.display(),
                plan.infill_plan,
                crate::plan::PLAN_FORMAT
            )));
        }
        Ok(plan)
    }
}

/// A row of `infill_approvals`.
#[derive(Debug, Clone, Serialize)]
pub struct Approval {
    pub id: String,
    /// The plan's fingerprint (over its jobs').
    pub fingerprint: String,
    pub jobs: Vec<ApprovedJob>,
    pub approved_by: String,
    pub note: Option<String>,
    pub approved_at: String,
    pub os_user: String,
    pub host: String,
    pub plan_created_at: String,
    /// The database the row was written to.
    pub database: String,
}

const APPROVAL_COLUMNS: &str = "id, fingerprint, jobs, approved_by, note, approved_at, os_user, host, plan_created_at";

impl Approval {
    fn from_row(row: &[Value], database: &str) -> Option<Approval> {
        let text = |i: usize| match row.get(i) {
            Some(Value::Null) | None => None,
            Some(v) => Some(v.display()),
        };
        Some(Approval {
            id: text(0)?,
            fingerprint: text(1)?,
            jobs: serde_json::from_str(&text(2)?).ok()?,
            approved_by: text(3)?,
            note: text(4),
            approved_at: text(5)?,
            os_user: text(6)?,
            host: text(7)?,
            plan_created_at: text(8)?,
            database: database.to_string(),
        })
    }
}

/// Records an approval of a plan: one row of `infill_approvals` in each
/// target database the plan's jobs write to. Refuses a plan that no longer
/// matches the spec or whose target is not the one planned.
pub async fn approve(
    spec: &Spec,
    plan: &PlanFile,
    env: Option<&str>,
    by: &str,
    note: Option<&str>,
) -> Result<Vec<Approval>> {
    if by.trim().is_empty() {
        return Err(Error::Usage("--by needs a name".into()));
    }
    let env = match (env, plan.env.as_deref()) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::Usage(format!(
                "the plan was made for environment `{b}`, not `{a}`; plan again with --env {a}"
            )));
        }
        (Some(a), _) => Some(a),
        (None, b) => b,
    };
    // Group the jobs by the database they write to.
    let mut targets: BTreeMap<String, (DatabaseUrl, Vec<&ApprovedJob>)> = BTreeMap::new();
    for planned in &plan.jobs {
        let job = spec.jobs.get(&planned.job).ok_or_else(|| {
            Error::Approval(format!(
                "the plan's job `{}` is not in {}; plan again",
                planned.job,
                spec.path.display()
            ))
        })?;
        if job.approval_sha256 != planned.fingerprint.definition_sha256 {
            return Err(Error::Approval(format!(
                "job `{}` changed in {} since the plan was made ({}); run `infill plan` again and approve the new plan",
                planned.job,
                spec.path.display(),
                plan.created_at
            )));
        }
        let url = spec.target_url(&planned.job, env)?;
        targets
            .entry(url.expose().to_string())
            .or_insert_with(|| (url, Vec::new()))
            .1
            .push(planned);
    }
    let mut out = Vec::new();
    for (url, jobs) in targets.values() {
        let db = Db::connect(url, &ConnectOptions::default()).await?;
        let written = record(&db, plan, jobs, by, note).await;
        db.close().await;
        out.push(written?);
    }
    Ok(out)
}

async fn record(db: &Db, plan: &PlanFile, jobs: &[&ApprovedJob], by: &str, note: Option<&str>) -> Result<Approval> {
    let mut c = db.conn().await?;
    let identity = db.identity(&mut c).await;
    let here = Fingerprint::target_sha256(&identity);
    if let Some(j) = jobs.iter().find(|j| j.fingerprint.target_sha256 != here) {
        return Err(Error::Approval(format!(
            "the plan of job `{}` was made against another database than {} ({identity}); plan against this one",
            j.job,
            db.redacted_url()
        )));
    }
    state::ensure_schema(db, &mut c).await?;
    let a = Approval {
        id: uuid::Uuid::now_v7().to_string(),
        fingerprint: plan.fingerprint.clone(),
        jobs: jobs.iter().map(|j| (*j).clone()).collect(),
        approved_by: by.trim().to_string(),
        note: note.map(str::to_string),
        approved_at: state::now(),
        os_user: crate::host::os_user(),
        host: crate::host::hostname(),
        plan_created_at: plan.created_at.clone(),
        database: db.name.clone(),
    };
    c.execute(&db.q(
        &format!("INSERT INTO infill_approvals ({APPROVAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
        vec![
            Value::Text(a.id.clone()),
            Value::Text(a.fingerprint.clone()),
            Value::Text(serde_json::to_string(&a.jobs).expect("serialisable")),
            Value::Text(a.approved_by.clone()),
            a.note.clone().map(Value::Text).unwrap_or(Value::Null),
            Value::Text(a.approved_at.clone()),
            Value::Text(a.os_user.clone()),
            Value::Text(a.host.clone()),
            Value::Text(a.plan_created_at.clone()),
        ],
    ))
    .await
    .map_err(Error::db("cannot write infill_approvals"))?;
    Ok(a)
}

/// Proof that a job passed the gate; only [`check`] makes one.
#[derive(Debug, Clone)]
pub struct GatePass {
    job: String,
    definition_sha256: String,
    /// The approval that let it through.
    pub approval_id: String,
}

impl GatePass {
    /// True when this pass was given to this job as it is now.
    pub fn admits(&self, r: &ResolvedJob) -> bool {
        self.job == r.job.name && self.definition_sha256 == r.job.approval_sha256
    }
}

/// Checks the gate for a job whose environment requires approval, on an
/// open connection to its target. `continuing` skips the drift check: a
/// run that has written part of its rows has moved the count itself.
pub async fn check(
    db: &Db,
    conn: &mut impl Exec,
    r: &ResolvedJob,
    target: &Target,
    plan: Option<&PlanFile>,
    continuing: bool,
) -> Result<GatePass> {
    let policy = r.approval.as_ref().expect("check is called where approval is required");
    let job = &r.job.name;
    let identity = db.identity(conn).await;
    let now = Fingerprint::of(r, &identity);
    let params: String = params_text(&r.params_json())
        .split(' ')
        .filter(|p| !p.is_empty() && !p.ends_with("=***"))
        .map(|p| format!(" --param {p}"))
        .collect();
    let how_to = |what: &str| {
        format!(
            "{what}; run `infill plan {} --job {job}{}{params} --out PLAN.json`, have someone run `infill approve PLAN.json --by NAME`, then run again",
            r.job.location.file.display(),
            r.env.as_ref().map(|e| format!(" --env {e}")).unwrap_or_default()
        )
    };
    let mut approvals = list(db, conn, Some(job)).await?;
    approvals.retain(|a| a.jobs.iter().any(|j| &j.job == job));
    if let Some(p) = plan {
        if !p.jobs.iter().any(|j| &j.job == job) {
            return Err(Error::Approval(format!(
                "the plan given with --plan does not cover job `{job}`"
            )));
        }
        approvals.retain(|a| a.fingerprint == p.fingerprint);
        if approvals.is_empty() {
            return Err(Error::Approval(format!(
                "the plan given with --plan (fingerprint {}) has not been approved on {}: run `infill approve PLAN.json --by NAME`",
                p.fingerprint.get(..12).unwrap_or(&p.fingerprint),
                db.redacted_url()
            )));
        }
    }
    let Some(latest) = approvals.first() else {
        return Err(Error::Approval(how_to(&format!(
            "job `{job}` needs an approved plan (require_approval = true), and {} holds no approval for it",
            db.redacted_url()
        ))));
    };
    let Some((a, approved)) = approvals.iter().find_map(|a| {
        a.jobs
            .iter()
            .find(|j| &j.job == job && j.fingerprint.sha256 == now.sha256)
            .map(|j| (a, j))
    }) else {
        let was = latest.jobs.iter().find(|j| &j.job == job).expect("retained");
        let mut why = Vec::new();
        if was.fingerprint.definition_sha256 != now.definition_sha256 {
            why.push("the job's definition changed since".to_string());
        }
        if was.fingerprint.params_sha256 != now.params_sha256 {
            why.push(format!(
                "the params differ (approved {}, now {})",
                params_text(&was.params),
                params_text(&r.params_json())
            ));
        }
        if was.fingerprint.target_sha256 != now.target_sha256 {
            why.push(format!("it was approved for another target than this one ({identity})"));
        }
        return Err(Error::Approval(how_to(&format!(
            "the latest approval of job `{job}` (by {} at {}) does not match: {}",
            latest.approved_by,
            latest.approved_at,
            why.join("; ")
        ))));
    };
    if let Some(ttl) = policy.ttl {
        let at = chrono::DateTime::parse_from_rfc3339(&a.approved_at)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|_| Error::Approval(format!("approval {} has an unreadable time `{}`", a.id, a.approved_at)))?;
        let age = chrono::Utc::now() - at;
        if age.to_std().unwrap_or_default() > ttl {
            return Err(Error::Approval(how_to(&format!(
                "the approval of job `{job}` by {} at {} has expired: it is {} old, approval_ttl is {}",
                a.approved_by,
                a.approved_at,
                human_age(age.num_seconds()),
                humantime(ttl)
            ))));
        }
    }
    if policy.approver_must_differ {
        let me = crate::host::os_user();
        if a.approved_by == me || a.os_user == me {
            return Err(Error::Approval(format!(
                "job `{job}` was approved by {} (as OS user {}), and {me} is running it; approver_must_differ = true asks someone else to approve",
                a.approved_by, a.os_user
            )));
        }
    }
    if !continuing {
        let now_count = if r.job.reads_pages() {
            crate::plan::stream_count(db, target, r).await?
        } else {
            candidates(db, conn, target, &r.job.table, approved.counted).await?
        };
        let allowed = policy.drift.allowance(approved.candidates);
        let moved = now_count.abs_diff(approved.candidates);
        if moved > allowed {
            let pct = if approved.candidates == 0 {
                String::new()
            } else {
                format!(
                    " ({:+.1}%)",
                    (now_count as f64 - approved.candidates as f64) * 100.0 / approved.candidates as f64
                )
            };
            let tolerance = match policy.drift {
                crate::spec::Drift::Rows(n) => format!("{n} rows"),
                d => format!("{d}, {allowed} rows"),
            };
            return Err(Error::Approval(how_to(&format!(
                "the candidates of job `{job}` drifted: {} approved, {} now{pct}, beyond the drift tolerance ({tolerance})",
                approved.candidates, now_count
            ))));
        }
    }
    Ok(GatePass {
        job: job.clone(),
        definition_sha256: r.job.approval_sha256.clone(),
        approval_id: a.id.clone(),
    })
}

/// Checks the gate for several jobs up front (a run group is approved as a
/// whole: a later job's count may change when an earlier one runs).
///
/// `group_started`: the jobs belong to a run group that passed the gate
/// when it started (`infill resume GROUP`); drift is not checked again.
pub async fn check_jobs(
    jobs: &[ResolvedJob],
    plan: Option<&PlanFile>,
    group_started: bool,
) -> Result<Vec<Option<GatePass>>> {
    let mut out = Vec::new();
    for r in jobs {
        if r.approval.is_none() {
            out.push(None);
            continue;
        }
        let db = Db::connect(&r.target, &ConnectOptions::default()).await?;
        let result = async {
            let mut conn = db.conn().await?;
            let target = Target::inspect(&db, &mut conn, r).await?;
            let continuing = group_started || continuing(&db, &mut conn, r).await?;
            check(&db, &mut conn, r, &target, plan, continuing).await
        }
        .await;
        db.close().await;
        out.push(Some(result?));
    }
    Ok(out)
}

/// True when an unfinished run of the job with these params exists: the
/// next run continues it.
pub(crate) async fn continuing(db: &Db, conn: &mut impl Exec, r: &ResolvedJob) -> Result<bool> {
    if !state::exists(db, conn).await {
        return Ok(false);
    }
    let params_sha = crate::run::params_sha256(r);
    Ok(state::find_unfinished(db, conn, &r.job.name, &params_sha)
        .await?
        .is_some())
}

/// Approvals on this database (of one job, if given), newest first; none
/// when the table is absent.
pub async fn list(db: &Db, conn: &mut impl Exec, job: Option<&str>) -> Result<Vec<Approval>> {
    let probe = db.q("SELECT COUNT(*) FROM infill_approvals WHERE 1 = 0", vec![]);
    if conn.fetch(&probe).await.is_err() {
        return Ok(Vec::new());
    }
    // The jobs column is JSON written by `record`: `"job":"NAME"` is exact.
    let (filter, args) = match job {
        Some(j) => (
            " WHERE jobs LIKE ?",
            vec![Value::Text(format!(
                "%{}%",
                serde_json::json!({ "job": j }).to_string().trim_matches(['{', '}'])
            ))],
        ),
        None => ("", vec![]),
    };
    let rows = conn
        .fetch(&db.q(
            &format!(
                "SELECT {APPROVAL_COLUMNS} FROM infill_approvals{filter} ORDER BY approved_at DESC, id DESC LIMIT 200"
            ),
            args,
        ))
        .await
        .map_err(Error::db("cannot read infill_approvals"))?;
    Ok(rows.iter().filter_map(|r| Approval::from_row(r, &db.name)).collect())
}

async fn candidates(
    db: &Db,
    conn: &mut impl Exec,
    target: &Target,
    target_table: &[String],
    counted: Counted,
) -> Result<u64> {
    use crate::plan::{count, first_key};
    if counted == Counted::Estimate
        && let Some(q) = db.dialect.explain(&target.estimate_of(None))
    {
        let rows = conn
            .fetch(&q)
            .await
            .map_err(Error::db("cannot read the planner's estimate"))?;
        let name = target_table.last().map(String::as_str).unwrap_or_default();
        if let Some(n) = db.dialect.explained_rows(&rows, name) {
            return Ok(n);
        }
    }
    match first_key(conn, &target.max_key()).await? {
        Some(upper) => count(conn, &target.count_candidates(None, &upper)).await,
        None => Ok(0),
    }
}

fn human_age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

fn humantime(d: std::time::Duration) -> String {
    human_age(d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_well() {
        assert_eq!(human_age(5), "5 s");
        assert_eq!(human_age(600), "10 min");
        assert_eq!(human_age(86_400), "24 h");
        assert_eq!(human_age(3 * 86_400), "3 days");
    }
}
