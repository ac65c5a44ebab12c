//! Commands that work on recorded runs rather than on a spec's job:
//! `status` and `resume`. They find the state where `run` keeps it: in the
//! databases the spec's jobs write to.

use std::collections::BTreeMap;

use crate::dialect::{ConnectOptions, Db};
use crate::error::{Error, Result};
use crate::spec::{DatabaseUrl, Overrides, Spec};
use crate::state::{self, RunRecord};
use crate::value::{Key, Value};

/// The distinct target databases of a spec's jobs, resolved for an environment.
fn targets(spec: &Spec, env: Option<&str>) -> Result<Vec<DatabaseUrl>> {
    let mut seen: BTreeMap<String, DatabaseUrl> = BTreeMap::new();
    for job in spec.jobs.values() {
        if seen.contains_key(&job.database) {
            continue;
        }
        let url = spec.target_url(&job.name, env)?;
        seen.insert(job.database.clone(), url);
    }
    Ok(seen.into_values().collect())
}

/// Recent runs (newest first), or the one run matching `run`.
pub async fn status(spec: &Spec, env: Option<&str>, run: Option<&str>) -> Result<Vec<RunRecord>> {
    let mut out = Vec::new();
    let mut not_found = None;
    for url in targets(spec, env)? {
        let db = Db::connect(&url, &ConnectOptions::default()).await?;
        let mut c = db.conn().await?;
        let found = match run {
            Some(id) => match state::find_run(&db, &mut c, id).await {
                Ok(r) => vec![r],
                Err(e @ Error::RunNotFound(_)) => {
                    not_found = Some(e);
                    vec![]
                }
                Err(e) => return Err(e),
            },
            None => state::list_runs(&db, &mut c, 20).await?,
        };
        out.extend(found);
        drop(c);
        db.close().await;
    }
    if out.is_empty()
        && let Some(e) = not_found
    {
        return Err(e);
    }
    out.sort_by(|a, b| b.id.cmp(&a.id));
    Ok(out)
}

/// How far an unfinished run has to go: the keys its batches walked so
/// far and the keys left in its range, as the table holds them now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Progress {
    /// Keys up to the checkpoint (candidates or not), over the finished
    /// priority segments too.
    pub keys_done: u64,
    /// Keys left to walk, over the remaining priority segments too.
    pub keys_left: u64,
    /// From the planner's estimate: counting took too long (else counted).
    pub estimated: bool,
    pub keys_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
}

/// The progress of an unfinished run (None for a finished run or an undo).
pub async fn progress(spec: &Spec, env: Option<&str>, run: &RunRecord) -> Result<Option<Progress>> {
    let Some(upper) = run.upper.clone() else {
        return Ok(None);
    };
    if !run.status.is_unfinished() || run.undo_of.is_some() || !spec.jobs.contains_key(&run.job) {
        return Ok(None);
    }
    let overrides = overrides_for(spec, env, &run.job, std::slice::from_ref(run))?;
    let r = spec.resolve(&run.job, &overrides)?;
    let opts = ConnectOptions {
        statement_timeout: std::time::Duration::from_secs(2),
        ..ConnectOptions::default()
    };
    let db = Db::connect(&r.target, &opts).await?;
    let found = async {
        let mut c = db.conn().await?;
        let target = crate::target::Target::inspect(&db, &mut c, &r).await?;
        let name = r.job.table.last().map(String::as_str).unwrap_or_default();
        use crate::dialect::Exec;
        // Keys in (lo, hi]: counted when the count is quick (the session's
        // statement timeout is short), else the planner's estimate.
        let mut estimated = false;
        let mut keys = async |c: &mut crate::dialect::Conn, lo: Option<&Key>, hi: &Key| -> Result<u64> {
            match crate::plan::count(c, &target.count_keys(lo, hi)).await {
                Ok(n) => Ok(n),
                Err(_) => {
                    estimated = true;
                    let q = db
                        .dialect
                        .explain(&target.keys_between(lo, hi))
                        .ok_or_else(|| Error::CannotProceed("no estimate of the keys".into()))?;
                    let rows = c.fetch(&q).await.map_err(Error::db("cannot estimate the keys"))?;
                    Ok(db.dialect.explained_rows(&rows, name).unwrap_or(0))
                }
            }
        };
        // Each segment walks the whole range. Done: the finished segments,
        // and this one up to the cursor; left: the rest of this one, and
        // each later segment.
        let this_done = match &run.cursor {
            Some(cursor) => keys(&mut c, None, cursor).await?,
            None => 0,
        };
        let this_left = keys(&mut c, run.cursor.as_ref(), &upper).await?;
        let whole = this_done + this_left;
        let segments_after = target.segments().saturating_sub(run.segment + 1);
        let done = run.segment * whole + this_done;
        let left = this_left + segments_after * whole;
        let elapsed = chrono::DateTime::parse_from_rfc3339(&run.updated_at)
            .ok()
            .zip(chrono::DateTime::parse_from_rfc3339(&run.started_at).ok())
            .map(|(u, s)| (u - s).num_milliseconds() as f64 / 1000.0)
            .filter(|s| *s > 0.0);
        let per_second = elapsed.map(|s| done as f64 / s).filter(|r| *r > 0.0);
        Ok::<_, Error>(Progress {
            keys_done: done,
            keys_left: left,
            estimated,
            keys_per_second: per_second,
            eta_seconds: per_second.map(|r| left as f64 / r),
        })
    }
    .await;
    db.close().await;
    found.map(Some)
}

/// The settings a run keeps over its spec's (`infill set`, and `--rate`,
/// `--batch-size`, `--concurrency` given to `infill run`): a continued run
/// goes on with them.
pub async fn kept_settings(spec: &Spec, env: Option<&str>, run: &str) -> Result<BTreeMap<String, String>> {
    let (db, found) = locate(spec, env, run).await?;
    let kept = async {
        let mut c = db.conn().await?;
        Ok::<_, Error>(state::read_control(&db, &mut c, &found.id).await?.settings())
    }
    .await;
    db.close().await;
    kept
}

/// What `infill resume ID` continues.
#[derive(Debug)]
pub enum Resumable {
    /// One run, and the overrides that continue it (its params and env).
    Run(Box<RunRecord>, Overrides),
    /// A run group: its runs so far, oldest first, and the settings its
    /// command line gave (they apply to the jobs it has not started yet).
    Group {
        id: String,
        runs: Vec<RunRecord>,
        command_line: BTreeMap<String, String>,
    },
}

/// Finds the run, or else the run group, that `id` names.
pub async fn find_for_resume(spec: &Spec, env: Option<&str>, id: &str) -> Result<Resumable> {
    let record = match status(spec, env, Some(id)).await {
        Ok(found) => found.into_iter().next(),
        Err(Error::RunNotFound(_)) => None,
        Err(e) => return Err(e),
    };
    let Some(record) = record else {
        for url in targets(spec, env)? {
            let db = Db::connect(&url, &ConnectOptions::default()).await?;
            let mut c = db.conn().await?;
            let found = async {
                let runs = state::find_group(&db, &mut c, id).await?;
                let command_line = match runs.last() {
                    Some(last) => state::read_control(&db, &mut c, &last.id).await?.command_line,
                    None => BTreeMap::new(),
                };
                Ok::<_, Error>((runs, command_line))
            }
            .await;
            drop(c);
            db.close().await;
            let (runs, command_line) = found?;
            if let Some(first) = runs.first() {
                let id = first.group_id.clone().unwrap_or_default();
                return Ok(Resumable::Group { id, runs, command_line });
            }
        }
        return Err(Error::RunNotFound(format!(
            "no run or run group {id} in the databases of {}",
            spec.path.display()
        )));
    };
    let overrides = overrides_for(spec, env, &record.job, std::slice::from_ref(&record))?;
    Ok(Resumable::Run(Box::new(record), overrides))
}

/// The overrides that run `job` as the given runs did: their environment,
/// and the params the job declares (secrets must come from the spec's
/// defaults: they are never stored).
pub fn overrides_for(spec: &Spec, env: Option<&str>, job: &str, runs: &[RunRecord]) -> Result<Overrides> {
    let decl = spec.jobs.get(job).ok_or_else(|| {
        Error::Usage(format!(
            "job `{job}` of run {} is not in {}",
            runs.first().map(|r| crate::run::short(&r.id)).unwrap_or_default(),
            spec.path.display()
        ))
    })?;
    let mut params = BTreeMap::new();
    for record in runs {
        let serde_json::Value::Object(m) = &record.params else {
            continue;
        };
        for (k, v) in m {
            let declared = decl
                .params
                .iter()
                .any(|p| &p.name == k && p.kind != crate::spec::ParamKind::Secret);
            if let (true, Some(val)) = (declared, Value::from_json(v)) {
                params.insert(k.clone(), val.display());
            }
        }
    }
    Ok(Overrides {
        env: env
            .map(String::from)
            .or_else(|| runs.iter().find_map(|r| r.env.clone())),
        params: params.into_iter().collect(),
        ..Default::default()
    })
}

/// The database holding a run, and the run.
pub(crate) async fn locate(spec: &Spec, env: Option<&str>, run: &str) -> Result<(Db, RunRecord)> {
    for url in targets(spec, env)? {
        let db = Db::connect(&url, &ConnectOptions::default()).await?;
        let mut c = db.conn().await?;
        match state::find_run(&db, &mut c, run).await {
            Ok(r) => return Ok((db, r)),
            Err(Error::RunNotFound(_)) => db.close().await,
            Err(e) => return Err(e),
        }
    }
    Err(Error::RunNotFound(format!(
        "no run {run} in the databases of {}",
        spec.path.display()
    )))
}

/// True when the run's process is (as far as this machine can tell) alive
/// and between or in batches: control requests reach it.
fn is_live(r: &RunRecord) -> bool {
    matches!(r.status, state::RunStatus::Running | state::RunStatus::Paused) && !r.process_gone()
}

/// Changes a live run's control requests; refuses a run that is not live.
async fn control(
    spec: &Spec,
    env: Option<&str>,
    run: &str,
    what: &str,
    change: impl FnOnce(&mut state::Control) -> Result<()>,
) -> Result<RunRecord> {
    let (db, found) = locate(spec, env, run).await?;
    let result = async {
        if !is_live(&found) {
            return Err(Error::CannotProceed(format!(
                "run {} is not running (status {}); there is nothing to {what}",
                crate::run::short(&found.id),
                found.status.as_str()
            )));
        }
        let mut c = db.conn().await?;
        let mut ctl = state::read_control(&db, &mut c, &found.id).await?;
        change(&mut ctl)?;
        state::write_control(&db, &mut c, &found.id, &ctl).await?;
        Ok(found)
    }
    .await;
    db.close().await;
    result
}

/// `infill pause RUN`: the live run holds at its next batch boundary.
pub async fn pause(spec: &Spec, env: Option<&str>, run: &str) -> Result<RunRecord> {
    control(spec, env, run, "pause", |c| {
        c.pause = true;
        Ok(())
    })
    .await
}

/// `infill resume RUN` of a live, paused run: releases it. None when the
/// run is not live (its process is gone): then resume continues it.
pub async fn release(spec: &Spec, env: Option<&str>, run: &str) -> Result<Option<RunRecord>> {
    let (db, found) = locate(spec, env, run).await?;
    db.close().await;
    if !is_live(&found) {
        return Ok(None);
    }
    control(spec, env, run, "resume", |c| {
        if !c.pause {
            return Err(Error::JobBusy {
                job: found.job.clone(),
                holder: format!(" (run {} is running, not paused)", crate::run::short(&found.id)),
            });
        }
        c.pause = false;
        Ok(())
    })
    .await
    .map(Some)
}

/// `infill set RUN key=value...`: changes a live run's settings from its
/// next batch on. Values are checked here, before they reach the run.
pub async fn set(spec: &Spec, env: Option<&str>, run: &str, pairs: &[(String, String)]) -> Result<RunRecord> {
    if pairs.is_empty() {
        return Err(Error::Usage(format!(
            "give at least one KEY=VALUE ({})",
            crate::spec::Settings::LIVE_KEYS.join(", ")
        )));
    }
    let mut probe = crate::spec::Settings::default_for_checks();
    for (k, v) in pairs {
        probe.apply(k, v).map_err(|m| Error::Usage(format!("{k}={v}: {m}")))?;
    }
    control(spec, env, run, "set", |c| {
        for (k, v) in pairs {
            c.set.insert(k.clone(), v.clone());
        }
        Ok(())
    })
    .await
}

/// `infill cancel RUN`. A live run is asked to stop after the batch in
/// flight (it ends `cancelled`, exit 4); a run whose process is gone is
/// marked cancelled here, so the next `infill run` starts a new one. What a
/// run wrote stays written (`infill undo` takes it back). Returns the run
/// and whether it was live.
pub async fn cancel(spec: &Spec, env: Option<&str>, run: &str) -> Result<(RunRecord, bool)> {
    let (db, found) = locate(spec, env, run).await?;
    let short = crate::run::short(&found.id);
    if !found.status.is_unfinished() {
        db.close().await;
        return Err(Error::CannotProceed(format!(
            "run {short} is already {}",
            found.status.as_str()
        )));
    }
    if is_live(&found) {
        db.close().await;
        let r = control(spec, env, run, "cancel", |c| {
            c.cancel = true;
            Ok(())
        })
        .await?;
        return Ok((r, true));
    }
    let mut c = db.conn().await?;
    state::set_status(
        &db,
        &mut c,
        &found.id,
        state::RunStatus::Cancelled,
        Some("cancelled by infill cancel"),
    )
    .await?;
    let record = state::find_run(&db, &mut c, &found.id).await?;
    drop(c);
    db.close().await;
    Ok((record, false))
}

/// Runs the checks of the given jobs (dependencies first), read-only.
pub async fn verify(spec: &Spec, jobs: &[String], overrides: &Overrides) -> Result<Vec<crate::verify::CheckResult>> {
    let resolved = jobs
        .iter()
        .map(|j| spec.resolve(j, overrides))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for r in resolved.iter().filter(|r| !r.job.checks.is_empty()) {
        let db = Db::connect(&r.target, &ConnectOptions::default()).await?;
        let found = crate::verify::run_checks(&db, r).await;
        db.close().await;
        out.extend(found?);
    }
    Ok(out)
}

/// A run and the rows that failed in it.
pub async fn failures(spec: &Spec, env: Option<&str>, run: &str) -> Result<(RunRecord, Vec<state::Failure>)> {
    let (db, found) = locate(spec, env, run).await?;
    let mut c = db.conn().await?;
    let list = state::list_failures(&db, &mut c, &found.id).await?;
    drop(c);
    db.close().await;
    Ok((found, list))
}
