//! The run loop: freeze the key range, then batch by batch (the next N keys
//! after the cursor, candidates or not) lock the candidates, write them with
//! the guard re-checked, store their undo images and the checkpoint, and
//! commit all of it at once. A kill at any moment leaves either the whole
//! batch or none of it; resuming starts after the last committed batch.
//! Signals are cooperative: the first one finishes the batch in flight, the
//! second rolls it back.

mod deliver;
mod stream;

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::approval::{GatePass, PlanFile};
use crate::audit::AuditLog;
use crate::dialect::{ConnectOptions, Db, Exec, Step};
use crate::error::{Error, Result};
use crate::lock::JobLock;
use crate::plan::{PlanOptions, as_count, count, first_key};
use crate::source::{Reader, SourceDbs};
use crate::spec::{MaxFailures, ResolvedJob, Settings};
use crate::state::{self, Checkpoint, RunRecord, RunStatus, UndoImage};
use crate::target::{BatchShape, Target};
use crate::value::{Key, Value, key_display, key_to_json};

/// Cooperative stop requests: the first asks to stop after the batch in
/// flight, the second to abandon it.
#[derive(Default)]
pub struct Stop {
    level: AtomicU8,
    notify: Notify,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }
    /// Registers one more request (SIGINT, SIGTERM, SIGHUP).
    pub fn request(&self) {
        let _ = self
            .level
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| Some(l.saturating_add(1).min(2)));
        self.notify.notify_waiters();
    }
    /// True after the first request.
    pub fn requested(&self) -> bool {
        self.level.load(Ordering::SeqCst) >= 1
    }
    /// True after the second request.
    pub fn aborted(&self) -> bool {
        self.level.load(Ordering::SeqCst) >= 2
    }
    async fn until(&self, level: u8) {
        loop {
            let notified = self.notify.notified();
            if self.level.load(Ordering::SeqCst) >= level {
                return;
            }
            notified.await;
        }
    }
}

/// What the run loop reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// Something the operator should read (continuing a run, limits).
    Notice(&'a str),
    /// The run started or continued.
    Started {
        run_id: &'a str,
        job: &'a str,
        estimated_keys: Option<u64>,
        scanned_keys: u64,
        resumed: bool,
    },
    /// A batch committed.
    Batch(&'a BatchReport),
    /// A row was written (`--verbose`): its key and new values.
    Row {
        key: &'a Key,
        values: &'a [(String, Value)],
    },
    /// The run stopped.
    Finished(&'a RunSummary),
}

/// The run's confirmation question, on a terminal.
#[derive(Debug)]
pub struct Confirmation<'a> {
    pub job: &'a str,
    /// The target URL with its password masked.
    pub target: &'a str,
    pub candidates: u64,
}

/// Receives the run loop's events (the CLI draws progress from them).
pub trait Observer: Send + Sync {
    fn on_event(&self, event: &Event<'_>);
    /// Asked once before the first write when the caller wants a confirmation.
    fn confirm(&self, _c: &Confirmation<'_>) -> bool {
        true
    }
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {
    fn on_event(&self, _: &Event<'_>) {}
}

/// One committed batch: its checkpoint (with the duration up to and
/// including the commit), the retries it took, and the other sessions seen
/// at work while it wrote (the run then rests `busy_sleep_coef` times the
/// batch's duration; left out when none).
#[derive(Debug, Clone, Serialize)]
pub struct BatchReport {
    #[serde(flatten)]
    pub batch: Checkpoint,
    pub retries: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub busy_sessions: u64,
    /// The pause before the next batch (`rate`, `pause_between`,
    /// `sleep_coef`, `busy_sleep_coef`), on the last line of a batch's
    /// write; left out when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub rest_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub job: String,
    pub status: RunStatus,
    pub batches: u64,
    pub rows_read: u64,
    pub rows_changed: u64,
    pub rows_skipped: u64,
    /// Rows that failed and were recorded in `infill_failures` (the run
    /// went on while `max_failures` allowed; it then exits with code 1).
    pub rows_failed: u64,
    pub duration_ms: u64,
    pub audit_log: String,
    pub message: Option<String>,
    /// The job's checks, run after its last batch.
    pub checks: Vec<crate::verify::CheckResult>,
}

/// What `run` did.
#[derive(Debug)]
pub enum Outcome {
    Ran(RunSummary),
    /// `action.export`: the file written.
    Exported(crate::export::Exported),
    DryRun(Box<crate::plan::JobPlan>),
}

/// A request to run (or dry-run) one job.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub job: ResolvedJob,
    /// sha256 of the spec file, for the audit log.
    pub spec_sha256: String,
    pub dry_run: bool,
    /// Process at most this many candidates in this invocation.
    pub limit: Option<u64>,
    /// Process this many candidates, run the checks, and halt with status
    /// `canary_passed` or `canary_failed`; `resume` continues.
    pub canary: Option<u64>,
    /// Report each written row.
    pub verbose: bool,
    /// Ask the observer to confirm before the first write.
    pub confirm: bool,
    /// Continue this run (`infill resume RUN`) instead of finding one.
    pub continue_run: Option<String>,
    /// Where approval is required: the plan named with `--plan`, if any.
    pub plan: Option<PlanFile>,
    /// The gate, passed already (a run group checks all its jobs first).
    pub approved: Option<GatePass>,
    /// The run group a new run joins (`infill run SPEC` over several jobs).
    pub group: Option<String>,
    /// `--retry-failed RUN`: a new run over only the rows that failed in RUN.
    pub retry_failed: Option<String>,
}

impl RunRequest {
    /// A plain run of a job: no limit, no canary, no prompt.
    pub fn new(job: ResolvedJob, spec_sha256: &str) -> RunRequest {
        RunRequest {
            job,
            spec_sha256: spec_sha256.to_string(),
            dry_run: false,
            limit: None,
            canary: None,
            verbose: false,
            confirm: false,
            continue_run: None,
            plan: None,
            approved: None,
            group: None,
            retry_failed: None,
        }
    }
}

/// A new run (or run group) id: a UUIDv7, so ids sort by time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub(crate) const MAX_RETRIES: u32 = 3;
const LOCK_CHECK_EVERY: Duration = Duration::from_secs(5);

fn connect_options(r: &ResolvedJob) -> ConnectOptions {
    ConnectOptions {
        application_name: format!("infill:{}", r.job.name),
        lock_timeout: r.settings.lock_timeout,
        statement_timeout: r.settings.statement_timeout,
        create_sqlite: false,
    }
}

/// Runs (or dry-runs) one job to its end, an interruption, or an error.
pub async fn run(req: RunRequest, obs: &dyn Observer, stop: &Stop) -> Result<Outcome> {
    let r = &req.job;
    if let (Some(x), false) = (&r.job.export, req.dry_run) {
        // A whole file each time, renamed into place: nothing to resume.
        return crate::export::export(r, &x.path, req.limit)
            .await
            .map(Outcome::Exported);
    }
    let db = Db::connect(&r.target, &connect_options(r)).await?;
    let result = run_on(&db, &req, obs, stop).await;
    db.close().await;
    result
}

async fn run_on(db: &Db, req: &RunRequest, obs: &dyn Observer, stop: &Stop) -> Result<Outcome> {
    let r = &req.job;
    let sources = SourceDbs::connect(r, &connect_options(r)).await?;
    let result = run_with(db, &sources, req, obs, stop).await;
    sources.close().await;
    result
}

async fn run_with(db: &Db, sources: &SourceDbs, req: &RunRequest, obs: &dyn Observer, stop: &Stop) -> Result<Outcome> {
    let r = &req.job;
    if req.dry_run {
        return crate::plan::plan_job(db, r, PlanOptions::default())
            .await
            .map(|p| Outcome::DryRun(Box::new(p)));
    }
    let mut conn = db.conn().await?;
    let target = Target::inspect(db, &mut conn, r).await?;
    let mut reader = match r.job.reads_pages() {
        true => {
            let wanted = crate::source::wanted_fields(r, &target)?;
            Some(sources.reader(r, db, wanted.as_deref()).await?)
        }
        false => None,
    };
    // The approval that lets the run through, for the audit log.
    let approval = match (&r.approval, &req.approved) {
        (None, _) => None,
        (Some(_), Some(pass)) if pass.admits(r) => Some(pass.approval_id.clone()),
        (Some(_), _) => {
            let continuing = req.continue_run.is_some() || crate::approval::continuing(db, &mut conn, r).await?;
            let pass = crate::approval::check(db, &mut conn, r, &target, req.plan.as_ref(), continuing).await?;
            Some(pass.approval_id)
        }
    };

    let lock_name = lock_name(db, &mut conn, r).await;

    if req.confirm {
        let candidates = match reader.as_mut() {
            Some(reader) => reader.count_after(None).await?,
            None => match first_key(&mut conn, &target.max_key()).await? {
                Some(u) => count(&mut conn, &target.count_candidates(None, &u)).await?,
                None => 0,
            },
        };
        let c = Confirmation {
            job: &r.job.name,
            target: db.redacted_url(),
            candidates,
        };
        if !obs.confirm(&c) {
            return Err(Error::CannotProceed("not confirmed; nothing was written".into()));
        }
    }

    state::ensure_schema(db, &mut conn).await?;
    let new_id = new_id();
    let mut lock = match JobLock::acquire(db, &lock_name, &r.job.name, &new_id).await {
        Ok(l) => l,
        Err(Error::JobBusy { job, holder }) if holder.is_empty() => {
            let holder = state::list_runs(db, &mut conn, 50)
                .await
                .ok()
                .and_then(|runs| runs.into_iter().find(|x| x.job == job && x.status.is_unfinished()))
                .map(|x| format!(" (run {}, pid {} on {})", short(&x.id), x.pid, x.host))
                .unwrap_or_default();
            return Err(Error::JobBusy { job, holder });
        }
        Err(e) => return Err(e),
    };
    let outcome = with_lock(
        db,
        &mut conn,
        req,
        obs,
        stop,
        &target,
        &mut lock,
        new_id,
        approval,
        reader.as_mut(),
    )
    .await;
    lock.release().await;
    outcome.map(Outcome::Ran)
}

/// The name of a job's lock: the database as the server names it, the
/// table and the job. A run and an undo of the same job share it.
pub(crate) async fn lock_name(db: &Db, conn: &mut impl Exec, r: &ResolvedJob) -> String {
    let database = db.identity(conn).await.database;
    format!("infill:{database}:{}:{}", r.job.table.join("."), r.job.name)
}

pub(crate) fn params_sha256(r: &ResolvedJob) -> String {
    hex::encode(Sha256::digest(r.params_json().to_string().as_bytes()))
}

/// What stands for a retry's params: it names the run whose failed rows
/// it retries, and the params, so an interrupted retry is found again (and
/// only by a retry of the same run with the same params).
fn retry_sha256(of: &str, r: &ResolvedJob) -> String {
    hex::encode(Sha256::digest(
        format!("retry of {of} with {}", r.params_json()).as_bytes(),
    ))
}

/// The run `of` and the keys of its failed rows (an error when none).
async fn retry_of(db: &Db, conn: &mut crate::dialect::Conn, of: String) -> Result<(String, Vec<Key>)> {
    let mut keys: Vec<Key> = state::list_failures(db, conn, &of)
        .await?
        .iter()
        .filter_map(|f| crate::value::key_from_json(&f.key))
        .collect();
    // A key recorded twice (failed again in an earlier retry) is tried once.
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(key_to_json(k).to_string()));
    if keys.is_empty() {
        return Err(Error::CannotProceed(format!(
            "run {} has no failed rows to retry",
            short(&of)
        )));
    }
    Ok((of, keys))
}

/// Short form of a run id for messages: its first 13 characters, the
/// UUIDv7's millisecond timestamp (8 characters only change every ~65 s, so
/// runs started close together would share them).
pub fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

#[allow(clippy::too_many_arguments)]
async fn with_lock(
    db: &Db,
    conn: &mut crate::dialect::Conn,
    req: &RunRequest,
    obs: &dyn Observer,
    stop: &Stop,
    target: &Target,
    lock: &mut JobLock,
    new_id: String,
    approval: Option<String>,
    mut reader: Option<&mut Reader>,
) -> Result<RunSummary> {
    let r = &req.job;
    // A retry is a run of its own: never continued as the job's main run,
    // but continued, like one, when interrupted: by the same command, or by
    // `infill resume` (which finds the run it retries from its hash).
    let mut retry = match &req.retry_failed {
        Some(of) => {
            let failed = state::find_run(db, conn, of).await?;
            Some(retry_of(db, conn, failed.id).await?)
        }
        None => None,
    };
    let mut params_sha = match &retry {
        Some((of, _)) => retry_sha256(of, r),
        None => params_sha256(r),
    };
    let existing = match &req.continue_run {
        Some(id) => {
            let run = state::find_run(db, conn, id).await?;
            if run.job != r.job.name {
                return Err(Error::Usage(format!(
                    "run {} belongs to job `{}`, not `{}`",
                    short(&run.id),
                    run.job,
                    r.job.name
                )));
            }
            if !(run.status.is_unfinished() || run.status == RunStatus::Failed) {
                return Err(Error::CannotProceed(format!(
                    "run {} is {}; only running, paused, interrupted or failed runs can be resumed",
                    short(&run.id),
                    run.status.as_str()
                )));
            }
            if retry.is_none() && run.params_sha256 != params_sha {
                // A retry's hash names the run it retried: resumed as a run
                // of the job it would write far more than the failed rows.
                let mut of = None;
                for id in state::run_ids_of_job(db, conn, &r.job.name).await? {
                    if retry_sha256(&id, r) == run.params_sha256 {
                        of = Some(id);
                        break;
                    }
                }
                let Some(of) = of else {
                    return Err(Error::CannotProceed(format!(
                        "run {} was started with other params; give the same --param values to `infill run`",
                        short(&run.id)
                    )));
                };
                retry = Some(retry_of(db, conn, of).await?);
                params_sha = run.params_sha256.clone();
            }
            Some(run)
        }
        None => state::find_unfinished(db, conn, &r.job.name, &params_sha).await?,
    };
    let (run, resumed) = match existing {
        Some(run) if run.status == RunStatus::CanaryFailed && req.continue_run.is_none() => {
            return Err(Error::CannotProceed(format!(
                "the canary of run {} failed its checks; `infill resume {}` goes on anyway, `infill cancel {}` gives it up",
                short(&run.id),
                short(&run.id),
                short(&run.id)
            )));
        }
        Some(run) => {
            if run.definition_sha256 != r.job.definition_sha256 {
                return Err(Error::DefinitionChanged {
                    run: short(&run.id).to_string(),
                    job: r.job.name.clone(),
                });
            }
            keep_command_line(db, conn, &run.id, req).await?;
            state::claim(db, conn, &run.id, &req.spec_sha256).await?;
            let after = run
                .cursor
                .as_ref()
                .map(|c| format!("after key {}", key_display(c)))
                .unwrap_or_else(|| "before its first batch".into());
            obs.on_event(&Event::Notice(&format!(
                "continuing run {}, interrupted {after}",
                short(&run.id)
            )));
            (run, true)
        }
        None => {
            let upper = match reader.as_mut() {
                Some(reader) => reader.max_key().await?,
                None => first_key(conn, &target.max_key()).await?,
            };
            let run = RunRecord {
                env: r.env.clone(),
                undo_enabled: r.job.undo,
                upper,
                batch_size: r.settings.batch_size,
                group_id: req.group.clone(),
                ..RunRecord::started(
                    new_id,
                    &r.job.name,
                    &r.job.definition_sha256,
                    &req.spec_sha256,
                    r.params_json(),
                    params_sha,
                )
            };
            state::insert_run(db, conn, &run).await?;
            keep_command_line(db, conn, &run.id, req).await?;
            (run, false)
        }
    };
    lock.set_run(&run.id).await?;
    let mut audit = AuditLog::open(&r.log_dir, &run.id, r.redactor.clone())?;
    audit.write(
        "run_start",
        json!({
            "job": r.job.name,
            "env": r.env,
            "target": db.redacted_url(),
            "spec_sha256": req.spec_sha256,
            "definition_sha256": r.job.definition_sha256,
            "params": r.params_json(),
            "user": crate::host::os_user(),
            "host": crate::host::hostname(),
            "pid": std::process::id(),
            "infill_version": env!("CARGO_PKG_VERSION"),
            "resumed": resumed,
            "cursor": run.cursor.as_ref().map(|c| key_to_json(c)),
            "upper": run.upper.as_ref().map(|c| key_to_json(c)),
            "undo": r.job.undo,
            "segment": run.segment,
            "segments": target.segments(),
            "limit": req.limit,
            "canary": req.canary,
            "approval": approval,
            "command_line": r.command_line,
        }),
    )?;
    if resumed {
        // Batches that committed after the last line a killed process wrote.
        let logged = audit.last_batch_no();
        if run.batches > logged {
            for cp in state::batches_after(db, conn, &run.id, logged).await? {
                let mut line = serde_json::to_value(&cp).expect("serialisable");
                line["retries"] = json!(null);
                line["recovered"] = json!(true);
                audit.write("batch", line)?;
            }
        }
    }
    // Each segment walks the whole key range once.
    let estimated = match reader {
        Some(_) => None,
        None => count(conn, &db.dialect.estimate_rows_query(&r.job.table))
            .await
            .ok()
            .map(|n| n * target.segments()),
    };
    let batch_size = if resumed && !r.settings.fixed_batch {
        run.batch_size.max(1)
    } else {
        r.settings.batch_size
    };
    obs.on_event(&Event::Started {
        run_id: &run.id,
        job: &r.job.name,
        estimated_keys: estimated,
        scanned_keys: run.batches.saturating_mul(batch_size),
        resumed,
    });

    let started = Instant::now();
    let mut looped = Looped {
        batches: run.batches,
        rows_read: run.rows_read,
        rows_changed: run.rows_changed,
        rows_skipped: run.rows_skipped,
        rows_failed: run.rows_failed,
        session_read: 0,
        session_changed: 0,
    };
    let result = match reader {
        Some(reader) if r.job.http.is_some() || r.job.exec.is_some() => {
            deliver::deliver(
                db,
                req,
                obs,
                stop,
                lock,
                &run,
                batch_size,
                &mut audit,
                &mut looped,
                reader,
                retry.as_ref().map(|(_, keys)| keys.as_slice()),
            )
            .await
        }
        Some(reader) => {
            stream::batches(
                db,
                req,
                obs,
                stop,
                target,
                lock,
                &run,
                batch_size,
                &mut audit,
                &mut looped,
                reader,
                retry.as_ref().map(|(_, keys)| keys.as_slice()),
            )
            .await
        }
        None => {
            batches(
                db,
                req,
                obs,
                stop,
                target,
                lock,
                &run,
                batch_size,
                &mut audit,
                &mut looped,
                retry.as_ref().map(|(_, keys)| keys.as_slice()),
            )
            .await
        }
    };
    // A finished job runs its checks; a failed check fails the run.
    let mut checks = Vec::new();
    // So does a canary that wrote its rows.
    let canary = req.canary.is_some() && matches!(result, Ok(End::Limit));
    let result = match result {
        Ok(end @ (End::Done | End::Limit)) if (matches!(end, End::Done) || canary) && !r.job.checks.is_empty() => {
            match crate::verify::run_checks(db, r).await {
                Ok(found) => {
                    for c in &found {
                        audit.write("check", serde_json::to_value(c).expect("serialisable"))?;
                    }
                    checks = found;
                    Ok(end)
                }
                Err(e) => Err(e),
            }
        }
        other => other,
    };
    let failed_checks: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(crate::verify::describe)
        .collect();
    let (status, message, err) = match result {
        Ok(End::Limit) if canary && failed_checks.is_empty() => (
            RunStatus::CanaryPassed,
            Some(format!(
                "canary passed: {} rows written and {} check(s) hold; `infill resume {}` continues with the rest",
                looped.session_changed,
                checks.len(),
                short(&run.id)
            )),
            None,
        ),
        Ok(End::Limit) if canary => {
            let msg = format!(
                "canary failed: {} check(s) failed after {} rows: {}. Fix the spec and cancel the run (`infill cancel {}`), or `infill resume {}` to go on anyway",
                failed_checks.len(),
                looped.session_changed,
                failed_checks.join("; "),
                short(&run.id),
                short(&run.id)
            );
            (
                RunStatus::CanaryFailed,
                Some(msg.clone()),
                Some(Error::ChecksFailed(msg)),
            )
        }
        Ok(End::Done) if !failed_checks.is_empty() => {
            let msg = format!(
                "the backfill finished but {} check(s) failed: {}",
                failed_checks.len(),
                failed_checks.join("; ")
            );
            (RunStatus::Failed, Some(msg.clone()), Some(Error::ChecksFailed(msg)))
        }
        Ok(End::Done) if looped.rows_failed > 0 => {
            let msg = format!(
                "{} rows failed (within max_failures); `infill failures {}` lists them",
                looped.rows_failed,
                short(&run.id)
            );
            (RunStatus::Succeeded, Some(msg.clone()), Some(Error::RowsFailed(msg)))
        }
        Ok(End::Done) => (RunStatus::Succeeded, None, None),
        Ok(End::Limit) => (
            RunStatus::Interrupted,
            Some(format!(
                "stopped after --limit {}; run the same command again or `infill resume {}` to continue",
                req.limit.unwrap_or(0),
                short(&run.id)
            )),
            None,
        ),
        Ok(End::Stopped) => (
            RunStatus::Interrupted,
            Some("interrupted by a signal after the batch in flight committed".to_string()),
            None,
        ),
        Ok(End::Aborted) => (
            RunStatus::Interrupted,
            Some("interrupted by a second signal; the batch in flight was rolled back".to_string()),
            None,
        ),
        Ok(End::ProbeAbort(msg)) => (
            RunStatus::Interrupted,
            Some(msg.clone()),
            Some(Error::CannotProceed(msg)),
        ),
        Ok(End::Cancelled) => {
            let msg =
                "cancelled by `infill cancel` after the batch in flight committed; what it wrote stays".to_string();
            (RunStatus::Cancelled, Some(msg.clone()), Some(Error::CannotProceed(msg)))
        }
        Err(e) => {
            let msg = r.redactor.mask(&e.to_string());
            // A run stopped by something outside it (lost connection or
            // lock) stays resumable: `infill run` continues it.
            let status = match e {
                // A bad record in a file: fixed, the same command continues.
                Error::LockLost { .. } | Error::Input { .. } => RunStatus::Interrupted,
                _ if e.is_transient() => RunStatus::Interrupted,
                _ => RunStatus::Failed,
            };
            let _ = audit.write("error", json!({ "message": msg, "transient": e.is_transient() }));
            (status, Some(msg), Some(e))
        }
    };
    // After an abandoned batch the pool may hold the rolled-back connection;
    // a fresh connection records the status.
    let mut c = db.conn().await;
    if let Ok(c) = c.as_mut() {
        let _ = state::set_status(db, c, &run.id, status, message.as_deref()).await;
    }
    let summary = RunSummary {
        run_id: run.id.clone(),
        job: r.job.name.clone(),
        status,
        batches: looped.batches,
        rows_read: looped.rows_read,
        rows_changed: looped.rows_changed,
        rows_skipped: looped.rows_skipped,
        rows_failed: looped.rows_failed,
        duration_ms: started.elapsed().as_millis() as u64,
        audit_log: audit.path().display().to_string(),
        message: message.clone(),
        checks,
    };
    audit.write(
        "run_end",
        json!({
            "status": status.as_str(),
            "batches": summary.batches,
            "rows_read": summary.rows_read,
            "rows_changed": summary.rows_changed,
            "rows_skipped": summary.rows_skipped,
            "rows_failed": summary.rows_failed,
            "duration_ms": summary.duration_ms,
            "message": message,
        }),
    )?;
    obs.on_event(&Event::Finished(&summary));
    if let Some(e) = err {
        return Err(e);
    }
    match status {
        RunStatus::Interrupted if matches!(summary.message.as_deref(), Some(m) if m.starts_with("interrupted")) => {
            Err(Error::Interrupted(format!(
                "run {} stopped; `infill resume {}` continues it",
                short(&run.id),
                short(&run.id)
            )))
        }
        _ => Ok(summary),
    }
}

struct Looped {
    batches: u64,
    rows_read: u64,
    rows_changed: u64,
    rows_skipped: u64,
    rows_failed: u64,
    session_read: u64,
    session_changed: u64,
}

impl Looped {
    /// Counts a committed batch.
    fn add(&mut self, b: &Checkpoint) {
        self.batches = b.batch_no;
        self.rows_read += b.rows_read;
        self.rows_changed += b.rows_changed;
        self.rows_skipped += b.rows_skipped;
        self.rows_failed += b.rows_failed;
        self.session_read += b.rows_read;
        self.session_changed += b.rows_changed;
    }
}

enum End {
    Done,
    Limit,
    Stopped,
    Aborted,
    /// `infill cancel` from another process.
    Cancelled,
    /// A health probe above its abort level (the message says which).
    ProbeAbort(String),
}

#[allow(clippy::too_many_arguments)]
async fn batches(
    db: &Db,
    req: &RunRequest,
    obs: &dyn Observer,
    stop: &Stop,
    target: &Target,
    lock: &mut JobLock,
    run: &RunRecord,
    mut batch_size: u64,
    audit: &mut AuditLog,
    looped: &mut Looped,
    retry: Option<&[Key]>,
) -> Result<End> {
    let r = &req.job;
    if let Some(keys) = retry {
        return retry_rows(db, req, obs, stop, target, run, audit, looped, keys).await;
    }
    let Some(upper) = run.upper.clone() else {
        return Ok(End::Done);
    };
    // Priority segments run one after the other over the whole key range;
    // a cursor at the upper bound means its segment is finished.
    let mut segment = run.segment;
    let mut cursor = run.cursor.clone();
    if cursor.as_ref() == Some(&upper) {
        segment += 1;
        cursor = None;
    }
    if segment >= target.segments() {
        return Ok(End::Done);
    }
    let mut seg_target = target.segment(segment);
    let session_start = Instant::now();
    let mut between = Between::new(db, req, run, obs, stop)?;
    let mut adaptive = crate::pace::Adaptive::default();
    adaptive.engine_max = (!req.verbose && target.engine_batches(r.job.undo)).then_some(crate::spec::ENGINE_MAX_BATCH);
    let mut ahead: Option<LookAhead> = None;
    let mut window = Window::new(db, &run.id, r.job.undo);
    // A rest due after a batch while later batches were in flight: taken
    // once they have committed.
    let mut owed_rest = Duration::ZERO;
    let mut last_busy = 0;
    // Set when a batch written ahead failed on a transient error (a lock
    // wait ending in lock_timeout, say): the batches ahead may have held
    // what it waited for, through a trigger or a unique index, a wait the
    // server cannot see as a deadlock. The rest of the session writes one
    // batch at a time.
    let mut ahead_stalled = false;
    let can_write_ahead = db.dialect.concurrent_batches() && !req.verbose && target.engine_batches(r.job.undo);
    // Whether later batches may write while this one does: several may
    // (`concurrency`), no throttle applies, and the last batch saw no
    // session of the application at work. Each batch ahead keeps the size
    // it started with; the adaptive size applies to the ones started after
    // a batch commits (it learns from each batch's own size and duration).
    let write_ahead = |s: &Settings, busy: u64, owed: Duration| {
        can_write_ahead
            && s.concurrency.min(MAX_IN_FLIGHT) > 1
            && req.limit.is_none()
            && req.canary.is_none()
            && s.rate.is_none()
            && s.pause_between.is_zero()
            && s.sleep_coef <= 0.0
            && busy == 0
            && owed.is_zero()
    };
    loop {
        let end = {
            let check = between.check(lock, audit);
            tokio::pin!(check);
            tokio::select! {
                biased;
                end = &mut check => end?,
                _ = tokio::time::sleep(HOLD_WITH_BATCHES_AHEAD), if !window.is_empty() => {
                    window.cancel().await;
                    check.await?
                }
            }
        };
        if let Some(end) = end {
            // The run is marked as stopped only once their rows are free.
            window.cancel().await;
            return Ok(end);
        }
        let s = &between.settings;
        if s.fixed_batch {
            batch_size = s.batch_size;
        }
        let remaining = between.remaining(looped);
        if remaining == Some(0) {
            return Ok(End::Limit);
        }
        // The batch written ahead that starts here, with its upper key.
        // Any other batch ahead is rolled back: a batch written in turn
        // may be split, and its numbers would collide with theirs.
        let front = window.front(cursor.as_ref(), looped.batches + 1).await;
        // The batch's upper key: found by the batch written ahead, looked
        // up ahead for this start and size, or now; a lost connection or a
        // timeout here is retried like a batch's.
        let looked = match (&front, ahead.take()) {
            (Some((_, hi)), _) => Some(Some(hi.clone())),
            (None, Some(a)) => a.found(cursor.as_ref(), batch_size, s.batch_time).await,
            (None, None) => None,
        };
        let found = match looked {
            Some(found) => found,
            None => {
                let boundary = seg_target.boundary(cursor.as_ref(), &upper, batch_size);
                read_retrying(audit, r, looped.batches + 1, async || {
                    let mut c = db.conn().await?;
                    first_key(&mut c, &boundary).await
                })
                .await?
            }
        };
        let hi = found.unwrap_or_else(|| upper.clone());
        // The next batch starts at `hi` when this one ends there (no row
        // limit, not the segment's end). When its size will not change (at
        // its bound, or fixed) and nothing throttles the run, its boundary
        // is looked up on another connection while this batch writes.
        let steady = s.fixed_batch || batch_size >= adaptive.max(s);
        let unthrottled = s.rate.is_none() && s.pause_between.is_zero() && s.sleep_coef <= 0.0;
        let ahead_ok = write_ahead(s, last_busy, owed_rest) && !ahead_stalled;
        if front.is_some() {
            // `infill set` may have lowered `concurrency` or set a throttle:
            // the batches ahead beyond it roll back. (After a busy batch
            // they commit, then the run rests.)
            let keep = if unthrottled && !ahead_stalled {
                s.concurrency.min(MAX_IN_FLIGHT) - 1
            } else {
                0
            };
            window.keep(keep as usize).await;
        }
        if ahead_ok && front.is_some() {
            // The batches after it start writing now, while it commits.
            let n = s.concurrency.min(MAX_IN_FLIGHT) - 1;
            window
                .fill(&seg_target, &upper, batch_size, n, &hi, looped.batches + 2)
                .await;
        } else if !ahead_ok && remaining.is_none() && hi != upper && steady && unthrottled {
            ahead = Some(LookAhead::start(
                db,
                seg_target.boundary(Some(&hi), &upper, batch_size),
                &hi,
                batch_size,
            ));
        }
        let settle = Settle {
            db,
            target: &seg_target,
            run_id: &run.id,
            undo: r.job.undo,
            batch_size,
            verbose: req.verbose,
            redactor: &r.redactor,
        };
        let busy = BusySample::start(db, s);
        let settled = {
            let batch_no = looped.batches + 1;
            let window = &mut window;
            let stalled = &mut ahead_stalled;
            let fut = async {
                let mut redone = None;
                let mut settle = settle;
                if let Some((f, _)) = front {
                    // Written again in turn, it keeps the size that found its range.
                    settle.batch_size = f.size;
                    match f.finish().await {
                        Ok(o) => return Ok(Settled::from(o)),
                        // Written again in turn, unless it committed; the
                        // batches after it roll back first (they may wait
                        // on its rows through a trigger or a unique index,
                        // and its split would reuse their numbers).
                        Err(e) => {
                            window.cancel().await;
                            if e.is_transient() {
                                tracing::warn!(batch_no, error = %e, "a batch written ahead failed on a transient error; writing one batch at a time from now on");
                                *stalled = true;
                            }
                            if let Some(o) = settle.committed(batch_no, 0).await? {
                                return Ok(Settled::from(o));
                            }
                            redone = Some(
                                json!({ "batch_no": batch_no, "attempt": 1, "error": r.redactor.mask(&e.to_string()), "wait_ms": 0, "ahead": true }),
                            );
                        }
                    }
                }
                let mut settled = settle.range(cursor.as_ref(), &hi, remaining, batch_no).await?;
                if let Some(line) = redone {
                    settled.events.insert(0, ("retry", line));
                }
                Ok(settled)
            };
            tokio::pin!(fut);
            tokio::select! {
                res = &mut fut => Some(res),
                _ = stop.until(2) => None,
            }
        };
        let Some(settled) = settled else {
            return Ok(End::Aborted);
        };
        let settled = settled?;
        let busy = busy.count().await;
        for (kind, detail) in &settled.events {
            audit.write(kind, detail.clone())?;
        }
        let mut outcome = None;
        let (last, mut rest) = (settled.outcomes.len(), Duration::ZERO);
        for (i, o) in settled.outcomes.into_iter().enumerate() {
            let mut report = BatchReport {
                batch: Checkpoint {
                    duration_ms: o.duration.as_millis() as u64,
                    ..o.checkpoint.clone()
                },
                retries: o.retries,
                busy_sessions: busy,
                rest_ms: 0,
            };
            looped.add(&report.batch);
            if i + 1 == last {
                rest = crate::pace::pause_after_batch(
                    s,
                    o.duration,
                    busy,
                    looped.session_changed,
                    session_start.elapsed(),
                )
                .max(owed_rest);
                // Batches in flight hold their rows: rest once they commit.
                owed_rest = if window.is_empty() { Duration::ZERO } else { rest };
                if !owed_rest.is_zero() {
                    rest = Duration::ZERO;
                }
                report.rest_ms = rest.as_millis() as u64;
            }
            audit.write("batch", serde_json::to_value(&report).expect("serialisable"))?;
            if req.verbose {
                for (key, values) in &o.written {
                    obs.on_event(&Event::Row { key, values });
                }
            }
            obs.on_event(&Event::Batch(&report));
            outcome = Some(o);
        }
        let outcome = outcome.expect("a settled range has at least one batch");
        if too_many_failures(s.max_failures, looped.rows_failed, looped.rows_read) {
            return Err(Error::RowsFailed(format!(
                "{} rows failed, more than max_failures allows; the run stopped. `infill failures {}` lists them",
                looped.rows_failed,
                short(&run.id)
            )));
        }
        let done = outcome.checkpoint.upper == upper;
        cursor = Some(outcome.checkpoint.upper);
        if done {
            segment += 1;
            if segment >= target.segments() {
                return Ok(End::Done);
            }
            cursor = None;
            seg_target = target.segment(segment);
        }

        batch_size = adaptive.next(outcome.checkpoint.batch_size, outcome.duration, s);
        last_busy = busy;
        // A batch written in turn: the next ones start now, so that from
        // the next batch on one commits while the others write.
        if window.is_empty() && !done && write_ahead(s, busy, owed_rest.max(rest)) && !ahead_stalled {
            let from = cursor.clone().expect("a batch ended at its upper key");
            let n = s.concurrency.min(MAX_IN_FLIGHT);
            window
                .fill(&seg_target, &upper, batch_size, n, &from, looped.batches + 1)
                .await;
        }

        rest_for(rest, stop).await;
    }
}

/// The next batch's upper key, looked up by a task of its own while a batch
/// writes (the walk reads keys the batch does not lock). Dropped unused,
/// the task is cancelled.
struct LookAhead {
    lo: Key,
    size: u64,
    started: Instant,
    task: tokio::task::JoinHandle<Option<Option<Key>>>,
}

impl LookAhead {
    fn start(db: &Db, boundary: crate::sql::Query, lo: &Key, size: u64) -> LookAhead {
        let db = db.clone();
        LookAhead {
            lo: lo.clone(),
            size,
            started: Instant::now(),
            task: tokio::spawn(async move {
                let mut c = db.conn().await.ok()?;
                first_key(&mut c, &boundary).await.ok()
            }),
        }
    }

    /// The key found (None inside: the range ends before `size` keys), if
    /// it was looked up for a batch starting at `lo` with `size` keys, not
    /// long ago (a held run finds it again), and without an error.
    async fn found(mut self, lo: Option<&Key>, size: u64, batch_time: Duration) -> Option<Option<Key>> {
        if lo != Some(&self.lo) || size != self.size || self.started.elapsed() > 2 * batch_time {
            return None;
        }
        (&mut self.task).await.ok().flatten()
    }
}

impl Drop for LookAhead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Most batches of one run writing at once (`concurrency`).
const MAX_IN_FLIGHT: u64 = 4;

/// How long the check between batches may take before the batches written
/// ahead are rolled back: a run held by a probe, `infill pause` or the
/// pause file must not keep their rows locked.
const HOLD_WITH_BATCHES_AHEAD: Duration = Duration::from_millis(250);

/// A batch written ahead (`concurrency` above 1, where the dialect allows
/// it): a task of its own finds the batch's upper key, writes the range in
/// a transaction of its own while the batches before it still write, and
/// commits only when told to, after the batch before it committed. So the
/// cursor never passes a batch that did not commit, and a kill -9 loses
/// the uncommitted ones whole (the server rolls them back). Dropped, it is
/// cancelled and its transaction rolls back.
struct InFlight {
    lo: Key,
    batch_no: u64,
    /// Keys asked for (its range's size).
    size: u64,
    hi_rx: Option<tokio::sync::oneshot::Receiver<Key>>,
    hi: Option<Key>,
    go: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<BatchOutcome>>,
}

impl InFlight {
    #[allow(clippy::too_many_arguments)]
    fn start(
        db: &Db,
        target: &Target,
        run_id: &str,
        lo: Key,
        upper: Key,
        size: u64,
        batch_no: u64,
        undo: bool,
    ) -> InFlight {
        let (hi_tx, hi_rx) = tokio::sync::oneshot::channel();
        let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (db, target, run_id, from) = (db.clone(), target.clone(), run_id.to_string(), lo.clone());
        let task = tokio::spawn(async move {
            let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
            let mut conn = db.conn().await?;
            let boundary = target.boundary(Some(&from), &upper, size);
            let hi = first_key(&mut conn, &boundary).await?.unwrap_or(upper);
            let _ = hi_tx.send(hi.clone());
            let t0 = Instant::now();
            let shape = BatchShape {
                run_id: &run_id,
                batch_no,
                lo: Some(&from),
                hi: &hi,
                limit: None,
                undo,
                keys: size,
            };
            let fused = target
                .fused_batch(&shape)
                .ok_or_else(|| Error::CannotProceed(format!("batch {batch_no}: no statement writes it ahead")))?;
            let mut tx = conn
                .begin_with(db.dialect.begin_write())
                .await
                .map_err(fail("cannot begin"))?;
            let w = write_fused(&mut tx, &fused, batch_no).await?;
            if !w.exact {
                return Err(Error::CannotProceed(format!(
                    "batch {batch_no}: its images failed their check"
                )));
            }
            let waiting = Instant::now();
            if go_rx.await.is_err() {
                let _ = tx.rollback().await;
                return Err(Error::Interrupted(format!("batch {batch_no}: cancelled")));
            }
            // Its duration leaves out the wait for the batch before it.
            let t0 = t0 + waiting.elapsed();
            let cp = w.checkpoint(&target, batch_no, Some(&from), &hi, None, size);
            checkpoint_and_commit(&db, tx, &run_id, cp, t0, Vec::new()).await
        });
        InFlight {
            lo,
            batch_no,
            size,
            hi_rx: Some(hi_rx),
            hi: None,
            go: Some(go),
            task,
        }
    }

    /// The batch's upper key, once found (None: its lookup failed).
    async fn hi(&mut self) -> Option<Key> {
        if let Some(rx) = self.hi_rx.take() {
            self.hi = rx.await.ok();
        }
        self.hi.clone()
    }

    /// Lets the batch commit (the one before it has) and waits for it. An
    /// error leaves the batch's outcome to be read back: it may have
    /// failed before writing, while writing, or during its COMMIT.
    async fn finish(mut self) -> Result<BatchOutcome> {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
        match (&mut self.task).await {
            Ok(done) => done,
            Err(e) => Err(Error::Interrupted(format!("batch {}: {e}", self.batch_no))),
        }
    }
}

impl InFlight {
    /// Rolls the batch back and waits until its transaction has ended (a
    /// statement still running ends first), so its rows are free again.
    async fn cancel(mut self) {
        self.go.take();
        let _ = (&mut self.task).await;
    }
}

/// The batches written ahead of the one in front, in key order, each
/// starting where the one before it ends.
struct Window<'a> {
    q: std::collections::VecDeque<InFlight>,
    db: &'a Db,
    run_id: &'a str,
    undo: bool,
}

impl<'a> Window<'a> {
    fn new(db: &'a Db, run_id: &'a str, undo: bool) -> Self {
        Window {
            q: std::collections::VecDeque::new(),
            db,
            run_id,
            undo,
        }
    }

    fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Rolls back the batches written ahead beyond the first `n`.
    async fn keep(&mut self, n: usize) {
        while self.q.len() > n {
            if let Some(f) = self.q.pop_back() {
                f.cancel().await;
            }
        }
    }

    /// Rolls back every batch written ahead, and waits for it.
    async fn cancel(&mut self) {
        for f in self.q.drain(..) {
            f.cancel().await;
        }
    }

    /// The batch written ahead that starts at `lo` as batch `no`, with its
    /// upper key. Without one, every batch ahead is rolled back.
    async fn front(&mut self, lo: Option<&Key>, no: u64) -> Option<(InFlight, Key)> {
        let mut f = self.q.pop_front()?;
        if Some(&f.lo) == lo
            && f.batch_no == no
            && let Some(hi) = f.hi().await
        {
            return Some((f, hi));
        }
        f.cancel().await;
        self.cancel().await;
        None
    }

    /// Starts batches until `n` are written ahead, the first after the
    /// last one written ahead, or at `from` as batch `no`.
    /// Each covers up to `size` keys of `target` below `upper`.
    async fn fill(&mut self, target: &Target, upper: &Key, size: u64, n: u64, from: &Key, no: u64) {
        while (self.q.len() as u64) < n {
            let (lo, next) = match self.q.back_mut() {
                Some(b) => match b.hi().await {
                    Some(h) => (h, b.batch_no + 1),
                    None => return,
                },
                None => (from.clone(), no),
            };
            if &lo == upper {
                return;
            }
            self.q.push_back(InFlight::start(
                self.db,
                target,
                self.run_id,
                lo,
                upper.clone(),
                size,
                next,
                self.undo,
            ));
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps the settings given on the command line with the run, so that
/// `infill resume` goes on at the throttle the operator chose. `infill run`
/// (a new run, or one it continues) replaces what the last command line
/// gave, and its values replace what `infill set` sent for the same keys;
/// `infill resume` gives none and keeps them. Written before a continued
/// run is claimed (no `infill set` reaches a run whose process is gone),
/// and just after a new run's row is inserted.
async fn keep_command_line(db: &Db, conn: &mut crate::dialect::Conn, run_id: &str, req: &RunRequest) -> Result<()> {
    if req.continue_run.is_some() {
        return Ok(());
    }
    let given = &req.job.command_line;
    let mut ctl = state::read_control(db, conn, run_id).await?;
    let kept = ctl.clone();
    ctl.set.retain(|k, _| !given.contains_key(k));
    ctl.command_line = given.clone();
    if ctl != kept {
        state::write_control(db, conn, run_id, &ctl).await?;
    }
    Ok(())
}

/// The job's settings with those the run keeps (the command line's and
/// `infill set`'s) applied over them.
async fn kept_settings(db: &Db, run_id: &str, base: &Settings) -> Result<Settings> {
    let mut c = db.conn().await?;
    let pairs = state::read_control(db, &mut c, run_id).await?.settings();
    // Checked when they were given; one that no longer applies is left out.
    Ok(base.with_pairs(&pairs).0)
}

/// `--retry-failed`: each failed row of the earlier run alone, as a batch
/// of one key (the candidate predicate still applies: a row fixed since is
/// skipped). A row that fails again is recorded under this run.
#[allow(clippy::too_many_arguments)]
async fn retry_rows(
    db: &Db,
    req: &RunRequest,
    obs: &dyn Observer,
    stop: &Stop,
    target: &Target,
    run: &RunRecord,
    audit: &mut AuditLog,
    looped: &mut Looped,
    keys: &[Key],
) -> Result<End> {
    let r = &req.job;
    let session_start = Instant::now();
    let settings = kept_settings(db, &run.id, &r.settings).await?;
    // Continued after an interruption, a retry skips the keys it already
    // checkpointed (written, skipped or failed again): each key is a batch
    // whose upper key is that key.
    let done: std::collections::HashSet<String> = {
        let mut c = db.conn().await?;
        state::batches_after(db, &mut c, &run.id, 0)
            .await?
            .iter()
            .map(|cp| key_to_json(&cp.upper).to_string())
            .collect()
    };
    for key in keys {
        if stop.requested() {
            return Ok(End::Stopped);
        }
        if done.contains(&key_to_json(key).to_string()) {
            continue;
        }
        let one = target.only_key(key);
        let settle = Settle {
            db,
            target: &one,
            run_id: &run.id,
            undo: r.job.undo,
            batch_size: 1,
            verbose: req.verbose,
            redactor: &r.redactor,
        };
        let settled = settle.range(None, key, None, looped.batches + 1).await?;
        for (kind, detail) in &settled.events {
            audit.write(kind, detail.clone())?;
        }
        for o in settled.outcomes {
            let report = BatchReport {
                batch: o.checkpoint.clone(),
                retries: o.retries,
                busy_sessions: 0,
                rest_ms: 0,
            };
            audit.write("batch", serde_json::to_value(&report).expect("serialisable"))?;
            looped.add(&report.batch);
            obs.on_event(&Event::Batch(&report));
        }
        throttle(
            &settings,
            Duration::ZERO,
            0,
            looped.session_changed,
            session_start,
            stop,
        )
        .await;
    }
    Ok(End::Done)
}

/// What every run loop does between two batches: stop on a signal, obey
/// `infill pause`/`cancel`/`set`, the pause file and the probes, check the
/// job's lock now and then, and count rows against `--limit`/`--canary`.
struct Between<'a> {
    live: Live<'a>,
    /// The settings as `infill set` has changed them.
    settings: Settings,
    applied: std::collections::BTreeMap<String, String>,
    last_lock_check: Instant,
    stop_after: Option<u64>,
}

impl<'a> Between<'a> {
    fn new(db: &'a Db, req: &'a RunRequest, run: &'a RunRecord, obs: &'a dyn Observer, stop: &'a Stop) -> Result<Self> {
        let r = &req.job;
        Ok(Between {
            live: Live {
                db,
                run_id: &run.id,
                base: &r.settings,
                obs,
                stop,
                probes: prepare_probes(db, r)?,
                probe_dbs: std::collections::HashMap::new(),
                connect: connect_options(r),
                last_control: Instant::now() - CONTROL_EVERY,
                control_read: false,
                last_probe: Instant::now() - PROBE_EVERY,
            },
            // The resolved settings already hold the command line's.
            settings: r.settings.clone(),
            applied: r.command_line.clone(),
            last_lock_check: Instant::now(),
            stop_after: match (req.limit, req.canary) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        })
    }

    /// Before a batch: Some(end) when the run must stop there.
    async fn check(&mut self, lock: &mut JobLock, audit: &mut AuditLog) -> Result<Option<End>> {
        if self.live.stop.requested() {
            return Ok(Some(End::Stopped));
        }
        if let Some(end) = self
            .live
            .checkpoint(&mut self.settings, &mut self.applied, lock, audit)
            .await?
        {
            return Ok(Some(end));
        }
        if self.last_lock_check.elapsed() >= LOCK_CHECK_EVERY {
            lock.check().await?;
            self.last_lock_check = Instant::now();
        }
        Ok(None)
    }

    /// Rows this session may still read (None: no limit).
    fn remaining(&self, looped: &Looped) -> Option<u64> {
        self.stop_after.map(|l| l.saturating_sub(looped.session_read))
    }
}

/// Runs a read, retrying it like a batch on transient errors (each retry
/// an audit line).
async fn read_retrying<T>(
    audit: &mut AuditLog,
    r: &ResolvedJob,
    batch_no: u64,
    mut read: impl AsyncFnMut() -> Result<T>,
) -> Result<T> {
    let mut attempt = 0;
    loop {
        match read().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < MAX_RETRIES => {
                attempt += 1;
                let wait = backoff(attempt);
                audit.write(
                    "retry",
                    json!({ "batch_no": batch_no, "attempt": attempt, "error": r.redactor.mask(&e.to_string()), "wait_ms": wait.as_millis() as u64 }),
                )?;
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Between batches: the requests of `infill pause`, `cancel` and `set`
/// (read from the run's `control` column), and the pause file.
struct Live<'a> {
    db: &'a Db,
    run_id: &'a str,
    /// The settings as resolved from the spec, before any `infill set`.
    base: &'a Settings,
    obs: &'a dyn Observer,
    stop: &'a Stop,
    probes: Vec<ReadyProbe>,
    /// The databases probes run on other than the target (a replica), by
    /// name, connected at their first check.
    probe_dbs: std::collections::HashMap<String, Db>,
    connect: ConnectOptions,
    /// The control column is read at most every CONTROL_EVERY and probes
    /// run at most every PROBE_EVERY (each a small query); the pause file
    /// is looked at every batch.
    last_control: Instant,
    control_read: bool,
    last_probe: Instant,
}

const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A health probe ready to run.
struct ReadyProbe {
    probe: crate::spec::Probe,
    /// Its own `sql`, or the engine's built-in one.
    query: crate::sql::Query,
    /// The database it runs on where not the target (`database = ...`).
    on: Option<crate::spec::DatabaseUrl>,
    /// For a built-in whose statement has many columns: the value's column
    /// (see `Dialect::probe_columns`).
    columns: Option<&'static [&'static str]>,
}

/// Each probe's query and database; a built-in comes from the engine of the
/// database it runs on.
fn prepare_probes(db: &Db, r: &ResolvedJob) -> Result<Vec<ReadyProbe>> {
    r.settings
        .probes
        .iter()
        .map(|p| {
            let on = match &p.database {
                Some(name) => Some(r.probe_dbs.get(name).cloned().ok_or_else(|| {
                    Error::Usage(format!("probes.{}.database: no database `{name}` in [databases]", p.name))
                })?),
                None => None,
            };
            let (dialect, where_) = match &on {
                Some(url) => {
                    let backend = crate::dialect::Backend::of_url(url.expose()).ok_or_else(|| {
                        Error::Usage(format!(
                            "probes.{}.database: `{}` is not a postgres://, mysql:// or sqlite: URL",
                            p.name, url.name
                        ))
                    })?;
                    (backend.dialect(), url.name.clone())
                }
                None => (db.dialect, db.name.clone()),
            };
            let (sql, columns) = match &p.sql {
                Some(sql) => (sql.clone(), None),
                None => {
                    let sql = dialect.builtin_probe(&p.name).ok_or_else(|| {
                        Error::Usage(format!(
                            "the built-in probe `{}` is not available on database `{where_}`; give probes.{}.sql = \"SELECT ...\"",
                            p.name, p.name
                        ))
                    })?;
                    (sql.to_string(), dialect.probe_columns(&p.name))
                }
            };
            Ok(ReadyProbe {
                probe: p.clone(),
                query: crate::sql::Query::new(sql),
                on,
                columns,
            })
        })
        .collect()
}

/// A probe's value. Infinite when a built-in cannot say (replication
/// stopped: MySQL's lag is NULL), which holds or stops the run like any
/// value above its levels.
async fn read_probe(
    target: &Db,
    dbs: &mut std::collections::HashMap<String, Db>,
    connect: &ConnectOptions,
    p: &ReadyProbe,
) -> Result<f64> {
    let name = &p.probe.name;
    let db = match &p.on {
        None => target.clone(),
        Some(url) => match dbs.get(&url.name) {
            Some(db) => db.clone(),
            None => {
                // Unreachable, the run stops as interrupted (a transient
                // error): the same command continues it.
                let db = Db::connect(url, connect).await?;
                dbs.insert(url.name.clone(), db.clone());
                db
            }
        },
    };
    // A lost connection stops the run as interrupted (the same command
    // continues it); a query the database refuses is the spec's to fix.
    let failed = |e: sqlx::Error| {
        if crate::error::is_transient_sqlx(&e) {
            return Error::Database {
                context: format!("health probe `{name}` on database `{}`", db.name),
                source: e,
            };
        }
        let fix = match p.probe.sql {
            Some(_) => format!("fix probes.{name}.sql (it must return one number)"),
            None => format!("check that database `{}` can run it", db.name),
        };
        Error::CannotProceed(format!(
            "health probe `{name}` failed on database `{}`: {e}; {fix}",
            db.name
        ))
    };
    let mut c = db.conn().await?;
    let Some(names) = p.columns else {
        return Ok(probe_value(&c.fetch(&p.query).await.map_err(failed)?));
    };
    let (columns, rows) = c.fetch_named(&p.query).await.map_err(failed)?;
    if rows.is_empty() {
        return Err(Error::CannotProceed(format!(
            "health probe `{name}`: database `{}` is not a replica (`{}` returned no row); name a replica with probes.{name}.database",
            db.name, p.query.sql
        )));
    }
    let i = columns
        .iter()
        .position(|c| names.contains(&c.as_str()))
        .ok_or_else(|| {
            Error::CannotProceed(format!(
                "health probe `{name}`: `{}` on database `{}` has no column {}",
                p.query.sql,
                db.name,
                names.join(" or ")
            ))
        })?;
    // One row per replication channel: the one furthest behind counts.
    let mut worst = 0.0f64;
    for row in &rows {
        match row.get(i) {
            Some(Value::Null) | None => return Ok(f64::INFINITY),
            Some(v) => worst = worst.max(probe_value(std::slice::from_ref(&vec![v.clone()]))),
        }
    }
    Ok(worst)
}

/// The number a probe returned: the last column of its first row.
fn probe_value(rows: &[Vec<Value>]) -> f64 {
    match rows.first().and_then(|r| r.last()) {
        Some(Value::Int(i)) => *i as f64,
        Some(Value::Real(f)) => *f,
        Some(Value::Text(t)) => t.trim().parse().unwrap_or(0.0),
        _ => 0.0,
    }
}

const HOLD_POLL: Duration = Duration::from_millis(250);
const CONTROL_EVERY: Duration = Duration::from_millis(100);

impl Live<'_> {
    /// Applies `set` changes, and holds while paused. Returns how the run
    /// ends when it must (cancelled, or a signal while held).
    async fn checkpoint(
        &mut self,
        s: &mut Settings,
        applied: &mut std::collections::BTreeMap<String, String>,
        lock: &mut JobLock,
        audit: &mut AuditLog,
    ) -> Result<Option<End>> {
        let mut held = false;
        loop {
            // While held, every poll looks at everything.
            let read = held || self.last_control.elapsed() >= CONTROL_EVERY;
            // The session's first read finds what the run kept.
            let first = read && !self.control_read;
            if read {
                self.last_control = Instant::now();
                self.control_read = true;
            }
            let control = if read {
                let mut c = self.db.conn().await?;
                state::read_control(self.db, &mut c, self.run_id).await?
            } else {
                state::Control {
                    set: applied.clone(),
                    ..Default::default()
                }
            };

            if control.cancel {
                return Ok(Some(End::Cancelled));
            }
            let wanted = control.settings();
            if wanted != *applied {
                let (next, rejected) = self.base.with_pairs(&wanted);
                *s = next;
                // The notice names what this session was not given.
                let news: Vec<String> = wanted
                    .iter()
                    .filter(|(k, v)| applied.get(*k) != Some(*v))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                *applied = wanted;
                audit.write("set", json!({ "settings": applied, "rejected": rejected }))?;
                let by = match first {
                    true => "kept from before (`infill set` or the command line)",
                    false => "changed by `infill set`",
                };
                if !news.is_empty() {
                    self.obs
                        .on_event(&Event::Notice(&format!("settings {by}: {}", news.join(" "))));
                }
            }
            let mut reason = if control.pause {
                Some(format!(
                    "held by `infill pause`; `infill resume {}` releases it",
                    short(self.run_id)
                ))
            } else {
                s.pause_file
                    .as_ref()
                    .filter(|f| f.exists())
                    .map(|f| format!("held while the pause file {} exists", f.display()))
            };
            if reason.is_none() && !self.probes.is_empty() && (held || self.last_probe.elapsed() >= PROBE_EVERY) {
                self.last_probe = Instant::now();
                for ready in &self.probes {
                    let p = &ready.probe;
                    let v = read_probe(self.db, &mut self.probe_dbs, &self.connect, ready).await?;
                    let shown = match v.is_finite() {
                        true => v.to_string(),
                        false => "unknown (replication is stopped or broken)".to_string(),
                    };
                    if let Some(level) = p.abort_above.filter(|l| v > *l) {
                        let msg = format!(
                            "aborted by the health probe `{}`: {shown} is above its abort level {level}; the run stays resumable",
                            p.name
                        );
                        audit.write(
                            "probe",
                            json!({ "probe": p.name, "value": v, "unknown": !v.is_finite(), "abort_above": level }),
                        )?;
                        return Ok(Some(End::ProbeAbort(msg)));
                    }
                    if let Some(level) = p.pause_above.filter(|l| v > *l) {
                        reason = Some(format!(
                            "held by the health probe `{}`: {shown} is above its pause level {level}",
                            p.name
                        ));
                        break;
                    }
                }
            }
            let Some(why) = reason else {
                if held {
                    let mut c = self.db.conn().await?;
                    state::set_status(self.db, &mut c, self.run_id, RunStatus::Running, None).await?;
                    audit.write("resumed", json!({}))?;
                    self.obs.on_event(&Event::Notice("released; going on"));
                }
                return Ok(None);
            };
            if !held {
                held = true;
                let mut c = self.db.conn().await?;
                state::set_status(self.db, &mut c, self.run_id, RunStatus::Paused, Some(&why)).await?;
                audit.write("paused", json!({ "reason": why }))?;
                self.obs.on_event(&Event::Notice(&why));
            }
            lock.check().await?;
            tokio::select! {
                _ = tokio::time::sleep(HOLD_POLL) => {}
                _ = self.stop.until(1) => return Ok(Some(End::Stopped)),
            }
        }
    }
}

/// Sleeps between batches: `pause_between`, `sleep_coef` (or, with `busy`
/// other sessions at work, `busy_sleep_coef`) times the batch's duration,
/// and whatever keeps the rows written since `since` under the rate. A stop
/// request cuts the sleep short.
pub(crate) async fn throttle(s: &Settings, batch: Duration, busy: u64, written: u64, since: Instant, stop: &Stop) {
    rest_for(
        crate::pace::pause_after_batch(s, batch, busy, written, since.elapsed()),
        stop,
    )
    .await;
}

/// Sleeps `pause`, cut short by a stop request.
pub(crate) async fn rest_for(pause: Duration, stop: &Stop) {
    if !pause.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.until(1) => {}
        }
    }
}

/// The other sessions at work on the target database, counted by a task of
/// its own while a batch writes: a little after the batch starts (so it
/// sees the application's sessions waiting on the batch's row locks), or
/// when the batch ends, if that comes first. The count costs the batch
/// nothing. Dropped unused, the task is cancelled.
pub(crate) struct BusySample {
    db: Db,
    task: Option<tokio::task::JoinHandle<u64>>,
    /// Dropped when the batch ends: the count is then made at once.
    ended: Option<tokio::sync::oneshot::Sender<()>>,
    opened: usize,
}

impl BusySample {
    /// Starts counting, unless `busy_sleep_coef` would change nothing or
    /// the engine cannot see other sessions.
    pub(crate) fn start(db: &Db, s: &Settings) -> BusySample {
        let on = s.busy_sleep_coef > s.sleep_coef && db.dialect.busy_sessions_query(&[]).is_some();
        // Before the count starts: a connection opened from here on is seen.
        let opened = db.opened();
        let (ended, batch_over) = tokio::sync::oneshot::channel::<()>();
        let delay = (s.batch_time / 4).min(BUSY_COUNT_DELAY);
        let count = {
            let db = db.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = batch_over => {}
                }
                busy_sessions(db).await
            }
        };
        BusySample {
            db: db.clone(),
            task: on.then(|| tokio::spawn(count)),
            ended: Some(ended),
            opened,
        }
    }

    /// The count (0 when none was started or it failed). When infill opened
    /// a connection meanwhile, the count may have taken it for the
    /// application's (MySQL knows a connection's id only once it is open):
    /// it is made again, now that the batch is over.
    pub(crate) async fn count(mut self) -> u64 {
        drop(self.ended.take());
        let Some(mut task) = self.task.take() else {
            return 0;
        };
        // A count still waiting (for a connection, say) once the batch is
        // over must not hold the run up: it is cancelled, and counts 0.
        let n = match tokio::time::timeout(BUSY_COUNT_GRACE, &mut task).await {
            Ok(done) => done.unwrap_or(0),
            Err(_) => {
                task.abort();
                tracing::debug!("busy sessions not counted in time");
                0
            }
        };
        if n > 0 && self.db.opened() != self.opened {
            return tokio::time::timeout(BUSY_COUNT_GRACE, busy_sessions(self.db.clone()))
                .await
                .unwrap_or(0);
        }
        n
    }
}

impl Drop for BusySample {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// How long into a batch its busy count is made (at most a quarter of
/// `batch_time`).
const BUSY_COUNT_DELAY: Duration = Duration::from_millis(100);

/// How long a batch's end waits for its busy count to come in.
const BUSY_COUNT_GRACE: Duration = Duration::from_secs(1);

/// Counts the other sessions at work (see
/// [`crate::dialect::Dialect::busy_sessions_query`]);
/// 0 when it cannot: not a reason to stop a run, which then goes on
/// without resting for the application.
async fn busy_sessions(db: Db) -> u64 {
    let Some(q) = db.busy_sessions_query() else {
        return 0;
    };
    let counted = async {
        let mut c = db.conn().await?;
        c.fetch(&q).await.map_err(Error::db("cannot count the busy sessions"))
    };
    match counted.await {
        Ok(rows) => probe_value(&rows).max(0.0) as u64,
        Err(e) => {
            // Said once per process: a run goes on without resting.
            static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "the application's busy sessions cannot be counted, so the run does not rest for them (busy_sleep_coef): {e}"
                );
            }
            0
        }
    }
}

pub(crate) fn backoff(attempt: u32) -> Duration {
    crate::pace::backoff(attempt, crate::pace::jitter())
}

fn too_many_failures(max: MaxFailures, failed: u64, read: u64) -> bool {
    match max {
        MaxFailures::Count(n) => failed > n,
        MaxFailures::Ratio(r) => failed > 0 && failed as f64 > r * read.max(1) as f64,
    }
}

/// True for an error that one row's data can cause (a constraint, a cast):
/// worth isolating by bisection. Lost connections and timeouts are not.
fn is_row_error(e: &Error) -> bool {
    matches!(
        e,
        Error::Database {
            source: sqlx::Error::Database(_),
            ..
        }
    ) && !e.is_transient()
}

/// Settles one key range: applies it as a batch with retries on transient
/// errors; when it fails for good on a row's data, splits it in halves by
/// its candidates, recursively, until each failing row stands alone, and
/// records that row in `infill_failures` with a checkpoint past it. The
/// good rows commit in their own sub-batches.
struct Settle<'a> {
    db: &'a Db,
    target: &'a Target,
    run_id: &'a str,
    undo: bool,
    batch_size: u64,
    verbose: bool,
    redactor: &'a crate::secret::Redactor,
}

#[derive(Default)]
struct Settled {
    outcomes: Vec<BatchOutcome>,
    /// Audit lines (`retry`, `row_failed`) to write.
    events: Vec<(&'static str, serde_json::Value)>,
}

impl From<BatchOutcome> for Settled {
    fn from(o: BatchOutcome) -> Settled {
        Settled {
            outcomes: vec![o],
            events: Vec::new(),
        }
    }
}

impl Settle<'_> {
    async fn range(&self, lo: Option<&Key>, hi: &Key, limit: Option<u64>, batch_no: u64) -> Result<Settled> {
        let mut out = Settled::default();
        self.settle(lo, hi, limit, batch_no, &mut out).await?;
        Ok(out)
    }

    fn settle<'s>(
        &'s self,
        lo: Option<&'s Key>,
        hi: &'s Key,
        limit: Option<u64>,
        batch_no: u64,
        out: &'s mut Settled,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 's>> {
        Box::pin(async move {
            let mut retries = 0;
            let err = loop {
                let attempt = apply_batch(
                    self.db,
                    self.target,
                    self.run_id,
                    batch_no,
                    lo,
                    hi,
                    limit,
                    self.undo,
                    self.batch_size,
                    self.verbose,
                )
                .await;
                match attempt {
                    Ok(mut o) => {
                        o.retries = retries;
                        out.outcomes.push(o);
                        return Ok(());
                    }
                    Err(e) if e.is_transient() && retries < MAX_RETRIES => {
                        retries += 1;
                        let wait = backoff(retries);
                        out.events.push((
                            "retry",
                            json!({ "batch_no": batch_no, "attempt": retries, "error": self.redactor.mask(&e.to_string()), "wait_ms": wait.as_millis() as u64 }),
                        ));
                        tokio::time::sleep(wait).await;
                        // A connection lost during COMMIT leaves the outcome
                        // unknown: if the checkpoint is there, the batch
                        // committed, and is not run again.
                        if let Some(o) = self.committed(batch_no, retries).await? {
                            out.outcomes.push(o);
                            return Ok(());
                        }
                    }
                    Err(e) => break e,
                }
            };
            if !is_row_error(&err) {
                return Err(err);
            }
            // Which candidates does the range hold (read without writing)?
            let rows = {
                let mut c = self.db.conn().await?;
                c.fetch(&self.target.candidates(lo, hi, limit))
                    .await
                    .map_err(Error::db("cannot read the candidates"))?
            };
            let nk = self.target.keys.len();
            let keys: Vec<Key> = rows.iter().map(|r| r[..nk].to_vec()).collect();
            match keys.len() {
                0 => Err(err),
                1 => {
                    let upper = if limit.is_some() { keys[0].clone() } else { hi.clone() };
                    let o = self.record_failure(batch_no, lo, upper, &keys[0], &err).await?;
                    out.events.push((
                        "row_failed",
                        json!({ "batch_no": batch_no, "key": key_to_json(&keys[0]), "error": self.redactor.mask(&error_text(&err)), "code": error_code(&err) }),
                    ));
                    out.outcomes.push(o);
                    Ok(())
                }
                n => {
                    let mid = keys[n / 2 - 1].clone();
                    let last = keys[n - 1].clone();
                    let right_hi = if limit.is_some() { last } else { hi.clone() };
                    self.settle(lo, &mid, None, batch_no, out).await?;
                    let next_no = out.outcomes.last().map_or(batch_no, |o| o.checkpoint.batch_no + 1);
                    self.settle(Some(&mid), &right_hi, None, next_no, out).await
                }
            }
        })
    }
    /// Records a row that fails alone, with a checkpoint past it, in one transaction.
    /// The batch's outcome if its checkpoint committed (read back after an
    /// error whose outcome is unknown).
    async fn committed(&self, batch_no: u64, retries: u32) -> Result<Option<BatchOutcome>> {
        Ok(committed_since(self.db, self.run_id, batch_no, retries)
            .await
            .and_then(|found| found.into_iter().find(|o| o.checkpoint.batch_no == batch_no)))
    }

    async fn record_failure(
        &self,
        batch_no: u64,
        lo: Option<&Key>,
        upper: Key,
        key: &Key,
        err: &Error,
    ) -> Result<BatchOutcome> {
        let t0 = Instant::now();
        let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
        let mut conn = self.db.conn().await?;
        let mut tx = conn
            .begin_with(self.db.dialect.begin_write())
            .await
            .map_err(fail("cannot begin"))?;
        let failure = row_failure(self.run_id, batch_no, key, err, self.redactor);
        state::insert_failure(self.db, &mut tx, &failure)
            .await
            .map_err(fail("cannot record the failed row"))?;
        let cp = Checkpoint::new(self.target.segment_no, batch_no, lo, upper, 1, 0, 1, self.batch_size);
        checkpoint_and_commit(self.db, tx, self.run_id, cp, t0, Vec::new()).await
    }
}

/// The batches from `batch_no` on, read back after an error whose outcome
/// is unknown (a connection lost during COMMIT): Some when their
/// checkpoints committed, None when not (or when they cannot be read).
async fn committed_since(db: &Db, run_id: &str, batch_no: u64, retries: u32) -> Option<Vec<BatchOutcome>> {
    let mut c = db.conn().await.ok()?;
    let found = state::batches_after(db, &mut c, run_id, batch_no - 1).await.ok()?;
    let outcomes: Vec<BatchOutcome> = found
        .into_iter()
        .map(|cp| BatchOutcome {
            duration: Duration::from_millis(cp.duration_ms),
            checkpoint: cp,
            retries,
            written: Vec::new(),
        })
        .collect();
    (!outcomes.is_empty()).then_some(outcomes)
}

/// Splits rows settled one by one (a page applied row by row, or records
/// delivered) into batches: each run of rows that went through is one, and
/// each failed row is one of its own (`infill_failures` is keyed by batch).
/// `rows` holds each row's cursor and what it changed (None: it failed);
/// the last batch reaches `upper`. Returns the checkpoints, numbered from
/// `first`, and each row's batch number.
fn split_batches(
    first: u64,
    lower: Option<&Key>,
    rows: &[(Key, Option<u64>)],
    upper: &Key,
    batch_size: u64,
) -> (Vec<Checkpoint>, Vec<u64>) {
    let mut checkpoints = Vec::new();
    let mut batch_of = Vec::with_capacity(rows.len());
    let mut no = first;
    let mut lower = lower.cloned();
    let (mut read, mut changed) = (0u64, 0u64);
    for (i, (cursor, outcome)) in rows.iter().enumerate() {
        match outcome {
            Some(c) => {
                read += 1;
                changed += c;
            }
            None => {
                if read > 0 {
                    let upto = rows[i - 1].0.clone();
                    checkpoints.push(Checkpoint::new(
                        0,
                        no,
                        lower.as_ref(),
                        upto.clone(),
                        read,
                        changed,
                        0,
                        batch_size,
                    ));
                    (read, changed) = (0, 0);
                    no += 1;
                    lower = Some(upto);
                }
                checkpoints.push(Checkpoint::new(
                    0,
                    no,
                    lower.as_ref(),
                    cursor.clone(),
                    1,
                    0,
                    1,
                    batch_size,
                ));
                batch_of.push(no);
                no += 1;
                lower = Some(cursor.clone());
                continue;
            }
        }
        batch_of.push(no);
    }
    if read > 0 || lower.as_ref() != Some(upper) {
        checkpoints.push(Checkpoint::new(
            0,
            no,
            lower.as_ref(),
            upper.clone(),
            read,
            changed,
            0,
            batch_size,
        ));
    }
    (checkpoints, batch_of)
}

/// A row that failed alone, as `infill_failures` keeps it.
fn row_failure(
    run_id: &str,
    batch_no: u64,
    key: &[Value],
    err: &Error,
    redactor: &crate::secret::Redactor,
) -> state::Failure {
    state::Failure {
        run_id: run_id.to_string(),
        batch_no,
        key: key_to_json(key),
        error_code: error_code(err),
        message: redactor.mask(&error_text(err)),
        failed_at: state::now(),
    }
}

fn error_code(e: &Error) -> Option<String> {
    match e {
        Error::Database {
            source: sqlx::Error::Database(d),
            ..
        } => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

fn error_text(e: &Error) -> String {
    match e {
        Error::Database {
            source: sqlx::Error::Database(d),
            ..
        } => d.message().to_string(),
        other => other.to_string(),
    }
}

struct BatchOutcome {
    checkpoint: Checkpoint,
    /// Transient failures retried before it committed.
    retries: u32,
    /// Up to and including the commit.
    duration: Duration,
    written: Vec<(Key, Vec<(String, Value)>)>,
}

/// Keys per statement when a key list is bound (engines cap bound values).
const KEYS_PER_STATEMENT: usize = 10_000;

#[allow(clippy::too_many_arguments)]
async fn apply_batch(
    db: &Db,
    target: &Target,
    run_id: &str,
    batch_no: u64,
    lo: Option<&Key>,
    hi: &Key,
    limit: Option<u64>,
    undo: bool,
    batch_size: u64,
    verbose: bool,
) -> Result<BatchOutcome> {
    let t0 = Instant::now();
    let d = db.dialect;
    let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
    let shape = BatchShape {
        run_id,
        batch_no,
        lo,
        hi,
        limit,
        undo,
        keys: batch_size,
    };
    if let Some(fused) = target
        .fused_batch(&shape)
        .filter(|_| !verbose && target.call.is_none() && target.insert.is_none())
    {
        let mut conn = db.conn().await?;
        let mut tx = conn.begin_with(d.begin_write()).await.map_err(fail("cannot begin"))?;
        let w = write_fused(&mut tx, &fused, batch_no).await?;
        if !w.exact {
            // The images are not whole, or do not hold every written row:
            // write the batch again by key list.
            tracing::info!(
                batch_no,
                "the batch's images failed their check; writing it again by key list"
            );
            tx.rollback().await.map_err(fail("cannot roll back"))?;
            return apply_listed(db, target, run_id, batch_no, lo, hi, limit, undo, batch_size, t0).await;
        }
        let cp = w.checkpoint(target, batch_no, lo, hi, limit, batch_size);
        return checkpoint_and_commit(db, tx, run_id, cp, t0, Vec::new()).await;
    }
    apply_listed(db, target, run_id, batch_no, lo, hi, limit, undo, batch_size, t0).await
}

/// What a fused batch's statements found, before its checkpoint.
struct Wrote {
    read: u64,
    changed: u64,
    /// The counts row (its third value: the last key read, under a limit).
    row: Vec<Value>,
    /// False when the images failed their check: write by key list instead.
    exact: bool,
}

/// Runs a fused batch's statements in `tx` (the engine writes and images
/// the rows; nothing comes back but counts).
async fn write_fused(tx: &mut crate::dialect::Tx<'_>, fused: &crate::dialect::Fused, batch_no: u64) -> Result<Wrote> {
    let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
    let mut w = Wrote {
        read: 0,
        changed: 0,
        row: Vec::new(),
        exact: true,
    };
    for (q, step) in &fused.steps {
        match step {
            Step::Run => {
                tx.execute(q).await.map_err(fail("cannot write"))?;
            }
            Step::Written => {
                w.changed += tx.execute(q).await.map_err(fail("cannot write"))?;
                w.read = w.changed;
            }
            Step::Counts => {
                w.row = tx
                    .fetch(q)
                    .await
                    .map_err(fail("cannot write"))?
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                (w.read, w.changed) = (as_count(w.row.first()), as_count(w.row.get(1)));
            }
            Step::Check => {
                let c = tx
                    .fetch(q)
                    .await
                    .map_err(fail("cannot check the undo images"))?
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                w.read = as_count(c.first());
                w.exact = w.changed <= w.read && as_count(c.get(1)) == 1;
            }
        }
    }
    Ok(w)
}

impl Wrote {
    /// The batch's checkpoint: up to `hi`, or to the last key read when a
    /// row limit cut the range short.
    fn checkpoint(
        &self,
        target: &Target,
        batch_no: u64,
        lo: Option<&Key>,
        hi: &Key,
        limit: Option<u64>,
        size: u64,
    ) -> Checkpoint {
        let mut upper = hi.clone();
        if limit.is_some_and(|l| self.read >= l)
            && let Some(Value::Text(last)) = self.row.get(2)
        {
            upper = serde_json::from_str(last)
                .ok()
                .and_then(|j| crate::value::key_from_json(&j))
                .unwrap_or(upper);
        }
        Checkpoint::new(target.segment_no, batch_no, lo, upper, self.read, self.changed, 0, size)
    }
}

/// A batch whose candidates come back to infill: read and locked, then
/// written (by key list or over the range), their images built here.
#[allow(clippy::too_many_arguments)]
async fn apply_listed(
    db: &Db,
    target: &Target,
    run_id: &str,
    batch_no: u64,
    lo: Option<&Key>,
    hi: &Key,
    limit: Option<u64>,
    undo: bool,
    batch_size: u64,
    t0: Instant,
) -> Result<BatchOutcome> {
    let d = db.dialect;
    let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
    let mut conn = db.conn().await?;
    let mut tx = conn.begin_with(d.begin_write()).await.map_err(fail("cannot begin"))?;
    let rows = tx
        .fetch(&target.candidates(lo, hi, limit))
        .await
        .map_err(fail("cannot read the candidates"))?;
    let nk = target.keys.len();
    let mut upper = hi.clone();
    if let Some(l) = limit
        && rows.len() as u64 >= l
        && let Some(last) = rows.last()
    {
        upper = last[..nk].to_vec();
    }
    let keys: Vec<Key> = rows.iter().map(|r| r[..nk].to_vec()).collect();
    let mut changed = 0u64;
    let mut after: Vec<Vec<Value>> = Vec::new();
    if target.call.is_some() {
        // One statement per row, in the batch's transaction.
        for row in &rows {
            tx.execute(&target.call_statement(&row[nk..]))
                .await
                .map_err(fail("cannot call"))?;
            changed += 1;
        }
    } else if target.insert.is_some() {
        let images = insert_rows(db, &mut tx, target, &rows[..], nk, batch_no).await?;
        changed = images.len() as u64;
        if undo && !images.is_empty() {
            state::insert_undo(db, &mut tx, run_id, batch_no, &images)
                .await
                .map_err(fail("cannot store the undo images"))?;
        }
    } else if !keys.is_empty() {
        if d.update_by_key_list() {
            for chunk in keys.chunks((KEYS_PER_STATEMENT / nk).max(1)) {
                let q = target.update_keys(chunk);
                if d.update_returning() {
                    let r = tx.fetch(&q).await.map_err(fail("cannot write"))?;
                    changed += r.len() as u64;
                    after.extend(r);
                } else {
                    changed += tx.execute(&q).await.map_err(fail("cannot write"))?;
                }
            }
            if !d.update_returning() {
                for chunk in keys.chunks((KEYS_PER_STATEMENT / nk).max(1)) {
                    after.extend(
                        tx.fetch(&target.after_values(chunk))
                            .await
                            .map_err(fail("cannot read the written values"))?,
                    );
                }
            }
        } else {
            after = tx
                .fetch(&target.update_range(lo, &upper))
                .await
                .map_err(fail("cannot write"))?;
            changed = after.len() as u64;
        }
    }
    let names: Vec<String> = target.sets.iter().map(|(c, _)| c.name.clone()).collect();
    let mut written = Vec::with_capacity(after.len());
    if undo && !after.is_empty() {
        let images = stream::images(target, &rows, &after, nk);
        state::insert_undo(db, &mut tx, run_id, batch_no, &images)
            .await
            .map_err(fail("cannot store the undo images"))?;
    }
    for a in after {
        let key = a[..nk].to_vec();
        written.push((key, names.iter().cloned().zip(a.into_iter().skip(nk)).collect()));
    }
    let cp = Checkpoint::new(
        target.segment_no,
        batch_no,
        lo,
        upper,
        rows.len() as u64,
        changed,
        0,
        batch_size,
    );
    checkpoint_and_commit(db, tx, run_id, cp, t0, written).await
}

/// `action.insert` for each candidate: the rows inserted, as undo images
/// (key, no before, the stored values after). A row whose unique key is
/// taken already is skipped.
async fn insert_rows(
    db: &Db,
    tx: &mut crate::dialect::Tx<'_>,
    target: &Target,
    rows: &[Vec<Value>],
    nk: usize,
    batch_no: u64,
) -> Result<Vec<UndoImage>> {
    let d = db.dialect;
    let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
    let ins = target.insert.as_ref().expect("an insert job");
    let names: Vec<String> = ins.columns.iter().map(|(c, _)| c.name.clone()).collect();
    let inserted: Vec<crate::dialect::Column> = ins.columns.iter().map(|(c, _)| c.clone()).collect();
    let view = target.insert_view().expect("an insert job");
    let npk = ins.key.len();
    let mut images = Vec::new();
    for row in rows {
        let binds = &row[nk..];
        let stored: Option<Vec<Value>> = if d.insert_on_conflict() {
            tx.fetch(&target.insert_row(binds))
                .await
                .map_err(fail("cannot insert"))?
                .into_iter()
                .next()
        } else {
            let computed = tx
                .fetch(&target.insert_values(binds))
                .await
                .map_err(fail("cannot compute the inserted values"))?
                .into_iter()
                .next()
                .unwrap_or_default();
            if tx
                .execute(&target.insert_guarded(&computed))
                .await
                .map_err(fail("cannot insert"))?
                == 0
            {
                None
            } else {
                let from_values: Option<Key> = ins
                    .key
                    .iter()
                    .map(|k| names.iter().position(|n| *n == k.name).map(|i| computed[i].clone()))
                    .collect();
                let key = match from_values {
                    Some(k) => k,
                    None => {
                        let id = tx
                            .fetch(&crate::sql::Query::new("SELECT CAST(LAST_INSERT_ID() AS CHAR)"))
                            .await
                            .map_err(fail("cannot read the generated key"))?;
                        id.into_iter().next().unwrap_or_default()
                    }
                };
                let back = tx
                    .fetch(&view.current(&key, &inserted))
                    .await
                    .map_err(fail("cannot read the inserted row"))?;
                back.into_iter()
                    .next()
                    .map(|vals| key.into_iter().chain(vals).collect())
            }
        };
        if let Some(s) = stored {
            images.push(UndoImage {
                key: key_to_json(&s[..npk]),
                before: serde_json::Value::Null,
                after: serde_json::Value::Object(
                    names.iter().cloned().zip(s[npk..].iter().map(Value::to_json)).collect(),
                ),
            });
        }
    }
    Ok(images)
}

/// Writes the batch's checkpoint (its duration measured now) and commits.
async fn checkpoint_and_commit(
    db: &Db,
    mut tx: crate::dialect::Tx<'_>,
    run_id: &str,
    mut cp: Checkpoint,
    t0: Instant,
    written: Vec<(Key, Vec<(String, Value)>)>,
) -> Result<BatchOutcome> {
    let fail = |what: &str| Error::db(format!("batch {}: {what}", cp.batch_no));
    cp.duration_ms = t0.elapsed().as_millis() as u64;
    state::checkpoint(db, &mut tx, run_id, &cp)
        .await
        .map_err(fail("cannot write the checkpoint"))?;
    tx.commit().await.map_err(fail("cannot commit"))?;
    Ok(BatchOutcome {
        checkpoint: cp,
        retries: 0,
        duration: t0.elapsed(),
        written,
    })
}
