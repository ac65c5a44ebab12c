//! Argument definitions (the `--help` text comes from these doc comments)
//! and the dispatch from a command to the engine. Errors are mapped to exit
//! codes here and nowhere else.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use infill::approval::PlanFile;
use infill::ops::Resumable;
use infill::run::{Outcome, RunRequest, Stop};
use infill::spec::{Overrides, Spec};
use infill::state::RunStatus;
use infill::{Error, ExitCode};

use crate::output;
use crate::progress::Progress;

/// infill runs data backfills safely: guarded, throttled, resumable batches
/// with an audit log, against PostgreSQL, MySQL/MariaDB and SQLite.
///
/// Exit codes: 0 done; 1 rows or a check failed; 2 bad usage, bad spec,
/// unknown table or column; 3 approval missing; 4 cannot proceed (target
/// unreachable, job held by another run, definition changed); 130 interrupted.
#[derive(Debug, Parser)]
#[command(name = "infill", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job's backfill in guarded, checkpointed batches.
    ///
    /// Running the same job again after an interruption continues the
    /// unfinished run. With no --job, every job of the spec runs in
    /// dependency order.
    Run(RunArgs),
    /// Analyse what a run would do, read-only: candidates, categories, a
    /// sample before and after, writes, batches, duration and a fingerprint.
    ///
    /// Every SQL fragment is prepared against the target, so an unknown
    /// table or column is reported here (exit 2). With --out, the plan is
    /// written as JSON for `infill approve`.
    Plan(PlanArgs),
    /// Approve a plan written by `infill plan --out`: records who approved
    /// it in the target's infill_approvals table.
    ///
    /// Where require_approval = true applies, `infill run` needs an approval
    /// whose fingerprint matches the spec, params and target as they are.
    Approve(ApproveArgs),
    /// Put back what a run wrote, from its undo images, as a run of its own.
    ///
    /// A value goes back only where the row still holds exactly what the run
    /// wrote; rows changed since are kept and listed as conflicts (exit 1).
    /// Undoing twice changes nothing the second time. An interrupted undo
    /// continues where it stopped when given again.
    Undo(UndoArgs),
    /// Write a job's source rows (or, for an http job, the bodies it would
    /// send) to a JSON or JSONL file, without running its action.
    ///
    /// The format follows the file name: .jsonl or .ndjson for a JSON object
    /// per line, anything else for one JSON array. The file is written
    /// beside its name and renamed into place.
    Export(ExportArgs),
    /// Run the jobs' checks and print PASS or FAIL for each; exit 1 if any fails.
    ///
    /// Read-only: fit for CI and cron.
    Verify(VerifyArgs),
    /// Release a paused run, or continue an interrupted run (or run group,
    /// or undo) after its last committed batch.
    Resume(ResumeArgs),
    /// Show recent runs, or one run in detail.
    Status(StatusArgs),
    /// List the rows of a run that failed alone (isolated by bisection), with their errors.
    Failures(FailuresArgs),
    /// Give up an unfinished run, so the next `infill run` starts afresh.
    ///
    /// A live run stops after the batch in flight (it ends cancelled, exit
    /// 4); a run whose process is gone is marked cancelled at once. What it
    /// wrote stays written (`infill undo` takes it back).
    Cancel(CancelArgs),
    /// Ask a live run to hold at its next batch boundary (status paused);
    /// `infill resume RUN` releases it.
    Pause(CancelArgs),
    /// Change a live run's settings from its next batch on, e.g.
    /// `infill set RUN rate=200/s batch_time=250ms`.
    ///
    /// Keys: rate (or none), batch_time, batch_size (fixes it), pause_between,
    /// sleep_coef, busy_sleep_coef, max_failures, concurrency.
    Set(SetArgs),
    /// Create a demo SQLite database and spec, and run the backfill (no server needed).
    Quickstart(QuickstartArgs),
}

#[derive(Debug, Args)]
struct SpecArg {
    /// The spec file [default: ./infill.toml].
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// The environment ([env.NAME] in the spec) whose databases and settings apply.
    #[arg(long, value_name = "NAME")]
    env: Option<String>,
}

/// Which spec, environment, jobs and params a command works on.
#[derive(Debug, Args)]
struct JobsArg {
    /// The spec file [default: ./infill.toml].
    #[arg(value_name = "SPEC")]
    spec_file: Option<PathBuf>,
    #[command(flatten)]
    spec: SpecArg,
    /// Only this job (default: every job of the spec, in dependency order).
    #[arg(long, value_name = "JOB")]
    job: Option<String>,
    /// A value for one of the job's params, e.g. --param block=7 (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    params: Vec<(String, String)>,
}

impl JobsArg {
    /// Loads the spec and lists the jobs to work on, dependencies first.
    fn load(&self) -> Result<(Spec, Vec<String>), Error> {
        let spec = Spec::load(spec_path(self.spec_file.as_deref(), self.spec.spec.as_deref())?)?;
        let jobs = match &self.job {
            Some(j) => vec![spec.pick_job(Some(j))?.name.clone()],
            None => spec.job_order(spec.jobs.keys().cloned().collect())?,
        };
        Ok((spec, jobs))
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    target: JobsArg,
    /// Write nothing: count the candidates and batches, and show a sample of
    /// rows with their values before and after, in a read-only transaction.
    #[arg(long)]
    dry_run: bool,
    /// Process at most N candidate rows now; the run stays resumable.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Write the first N candidates, run the job's checks, and halt with
    /// status canary_passed or canary_failed; `infill resume RUN` continues.
    #[arg(long, value_name = "N")]
    canary: Option<u64>,
    /// Fix the batch size (keys per batch) instead of adapting it.
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,
    /// Limit rows written per second or minute, e.g. 500/s or 20/min
    /// (`none`: no rate, over the spec's and what the run kept).
    #[arg(long, value_name = "RATE")]
    rate: Option<String>,
    /// Batches writing at once (a table source's batches on PostgreSQL,
    /// at most 4), or requests and programs in flight (http, exec);
    /// overrides the job's `concurrency`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: Option<u64>,
    /// Run again only the rows that failed in this run (`infill failures
    /// RUN` lists them), as a new run of the same job and params.
    #[arg(long, value_name = "RUN")]
    retry_failed: Option<String>,
    /// The approved plan to run under (where approval is required); without
    /// it, the latest matching approval counts.
    #[arg(long, value_name = "PLAN.json")]
    plan: Option<PathBuf>,
    /// Print each written row's key and new values.
    #[arg(long, short)]
    verbose: bool,
    /// Do not ask for confirmation on a terminal.
    #[arg(long, short)]
    yes: bool,
    /// Print the outcome as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PlanArgs {
    #[command(flatten)]
    target: JobsArg,
    /// Use the query planner's row estimates instead of counting (for
    /// tables too big to count; SQLite has none and counts).
    #[arg(long)]
    estimate: bool,
    /// Write the plan as JSON to this file (for `infill approve`).
    #[arg(long, value_name = "PLAN.json")]
    out: Option<PathBuf>,
    /// Print the plan as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ApproveArgs {
    /// The plan file written by `infill plan --out`.
    #[arg(value_name = "PLAN.json")]
    plan: PathBuf,
    /// Who approves (recorded with the approval).
    #[arg(long, value_name = "NAME")]
    by: String,
    /// Why, or what was checked (recorded with the approval).
    #[arg(long, value_name = "TEXT")]
    note: Option<String>,
    /// The spec file [default: the one the plan was made from].
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// The environment [default: the plan's].
    #[arg(long, value_name = "NAME")]
    env: Option<String>,
    /// Print the approval as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct UndoArgs {
    /// The run to undo: its id, or a prefix of 8 or more characters.
    run: String,
    #[command(flatten)]
    spec: SpecArg,
    /// Only batches committed at or after this time (UTC unless it has an
    /// offset), e.g. "2026-11-24 18:00".
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Only batches committed at or before this time.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Count what would be restored and the conflicts; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation on a terminal.
    #[arg(long, short)]
    yes: bool,
    /// Print the outcome as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    target: JobsArg,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ExportArgs {
    #[command(flatten)]
    target: JobsArg,
    /// The file to write (relative to the current folder).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Write at most N rows.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Print what was written as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ResumeArgs {
    /// The run id, or a prefix of 8 or more characters.
    run: String,
    #[command(flatten)]
    spec: SpecArg,
    /// Print each written row's key and new values.
    #[arg(long, short)]
    verbose: bool,
    /// Do not ask for confirmation on a terminal.
    #[arg(long, short)]
    yes: bool,
    /// Print the outcome as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// A run id or prefix (8+ characters); without it, the 20 most recent runs.
    run: Option<String>,
    #[command(flatten)]
    spec: SpecArg,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct FailuresArgs {
    /// The run id, or a prefix of 8 or more characters.
    run: String,
    #[command(flatten)]
    spec: SpecArg,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CancelArgs {
    /// The run id, or a prefix of 8 or more characters.
    run: String,
    #[command(flatten)]
    spec: SpecArg,
}

#[derive(Debug, Args)]
struct SetArgs {
    /// The run id, or a prefix of 8 or more characters.
    run: String,
    /// Settings to change, as KEY=VALUE.
    #[arg(value_name = "KEY=VALUE", value_parser = parse_param, required = true)]
    settings: Vec<(String, String)>,
    #[command(flatten)]
    spec: SpecArg,
}

#[derive(Debug, Args)]
struct QuickstartArgs {
    /// Where to create the demo (re-created if it exists).
    #[arg(long, value_name = "DIR", default_value = "infill-quickstart")]
    dir: PathBuf,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: write it as NAME=VALUE"))?;
    if k.trim().is_empty() {
        return Err(format!("`{s}`: the name is empty"));
    }
    Ok((k.trim().to_string(), v.to_string()))
}

/// Runs a command and returns the process exit code.
pub fn main(cli: Cli) -> u8 {
    let level = std::env::var("INFILL_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::CannotProceed as u8;
        }
    };
    let stop = Arc::new(Stop::new());
    let result = runtime.block_on(async {
        watch_signals(stop.clone());
        dispatch(cli.command, &stop).await
    });
    match result {
        Ok(code) => code as u8,
        Err(e) => {
            eprintln!("error: {}", output::error_chain(&e));
            e.exit_code() as u8
        }
    }
}

fn watch_signals(stop: Arc<Stop>) {
    use tokio::signal::unix::{SignalKind, signal};
    for kind in [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()] {
        let stop = stop.clone();
        if let Ok(mut s) = signal(kind) {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if stop.aborted() {
                        eprintln!("\nthird signal: exiting now; the run stays resumable");
                        std::process::exit(ExitCode::Interrupted as i32);
                    }
                    if stop.requested() {
                        eprintln!("\nsecond signal: rolling back the batch in flight");
                    } else {
                        eprintln!("\nstopping after the batch in flight (signal again to roll it back)");
                    }
                    stop.request();
                }
            });
        }
    }
}

fn spec_path(positional: Option<&Path>, flag: Option<&Path>) -> Result<PathBuf, Error> {
    match (positional, flag) {
        (Some(a), Some(b)) if a != b => Err(Error::Usage(format!(
            "two specs given ({} and --spec {}); give one",
            a.display(),
            b.display()
        ))),
        (Some(p), _) | (None, Some(p)) => Ok(p.to_path_buf()),
        (None, None) => Ok(PathBuf::from("infill.toml")),
    }
}

async fn dispatch(command: Command, stop: &Stop) -> Result<ExitCode, Error> {
    match command {
        Command::Run(a) => run(a, stop).await,
        Command::Plan(a) => plan(a).await,
        Command::Approve(a) => approve(a).await,
        Command::Undo(a) => {
            let spec = Spec::load(spec_path(None, a.spec.spec.as_deref())?)?;
            let opts = infill::undo::UndoOptions {
                since: a.since.clone(),
                until: a.until.clone(),
                dry_run: a.dry_run,
                confirm: !a.yes && !a.dry_run && std::io::stdin().is_terminal() && std::io::stderr().is_terminal(),
            };
            undo(&spec, a.spec.env.as_deref(), &a.run, &opts, a.json, stop).await
        }
        Command::Resume(a) => resume(a, stop).await,
        Command::Verify(a) => verify(a).await,
        Command::Export(a) => export(a).await,
        Command::Status(a) => status(a).await,
        Command::Failures(a) => {
            let spec = Spec::load(spec_path(None, a.spec.spec.as_deref())?)?;
            let (run, list) = infill::ops::failures(&spec, a.spec.env.as_deref(), &a.run).await?;
            output::failures(&run, &list, a.json);
            Ok(ExitCode::Success)
        }
        Command::Cancel(a) => {
            let spec = Spec::load(spec_path(None, a.spec.spec.as_deref())?)?;
            let (run, live) = infill::ops::cancel(&spec, a.spec.env.as_deref(), &a.run).await?;
            if live {
                println!(
                    "asked run {} of job {} to stop after the batch in flight; it ends cancelled",
                    infill::run::short(&run.id),
                    run.job
                );
            } else {
                println!(
                    "run {} of job {} is cancelled; the next `infill run` starts a new run",
                    infill::run::short(&run.id),
                    run.job
                );
            }
            Ok(ExitCode::Success)
        }
        Command::Pause(a) => {
            let spec = Spec::load(spec_path(None, a.spec.spec.as_deref())?)?;
            let run = infill::ops::pause(&spec, a.spec.env.as_deref(), &a.run).await?;
            println!(
                "asked run {} of job {} to hold at its next batch boundary; `infill resume {}` releases it",
                infill::run::short(&run.id),
                run.job,
                infill::run::short(&run.id)
            );
            Ok(ExitCode::Success)
        }
        Command::Set(a) => {
            let spec = Spec::load(spec_path(None, a.spec.spec.as_deref())?)?;
            let run = infill::ops::set(&spec, a.spec.env.as_deref(), &a.run, &a.settings).await?;
            let list: Vec<String> = a.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "run {} of job {} takes {} from its next batch on",
                infill::run::short(&run.id),
                run.job,
                list.join(" ")
            );
            Ok(ExitCode::Success)
        }
        Command::Quickstart(a) => quickstart(a, stop).await,
    }
}

async fn run(a: RunArgs, stop: &Stop) -> Result<ExitCode, Error> {
    let (spec, mut jobs) = a.target.load()?;
    let mut overrides = Overrides {
        env: a.target.spec.env.clone(),
        params: a.target.params.clone(),
        batch_size: a.batch_size,
        rate: a.rate.clone(),
        concurrency: a.concurrency,
    };
    if let Some(id) = &a.retry_failed {
        // The failed run's job, with its params (the command line's win).
        let Resumable::Run(record, from_run) =
            infill::ops::find_for_resume(&spec, overrides.env.as_deref(), id).await?
        else {
            return Err(Error::Usage(format!(
                "{id} is a run group; give the run whose rows failed"
            )));
        };
        jobs = vec![record.job.clone()];
        let given: Vec<String> = overrides.params.iter().map(|(k, _)| k.clone()).collect();
        overrides
            .params
            .extend(from_run.params.into_iter().filter(|(k, _)| !given.contains(k)));
        overrides.env = overrides.env.or(from_run.env);
    }
    // Resolve every job before touching any database: a bad param fails first.
    let resolved = jobs
        .iter()
        .map(|j| spec.resolve(j, &overrides))
        .collect::<Result<Vec<_>, _>>()?;
    let plan = a.plan.as_deref().map(PlanFile::read).transpose()?;
    // A group's gate is checked for every job before the first one runs.
    let passes = if a.dry_run {
        vec![None; resolved.len()]
    } else {
        infill::approval::check_jobs(&resolved, plan.as_ref(), false).await?
    };
    let group = (a.target.job.is_none() && resolved.len() > 1 && !a.dry_run && a.retry_failed.is_none())
        .then(infill::run::new_id);
    if let Some(g) = &group {
        let names: Vec<&str> = resolved.iter().map(|r| r.job.name.as_str()).collect();
        eprintln!("run group {g}: {}", names.join(" -> "));
    }
    let reqs = resolved
        .into_iter()
        .zip(passes)
        .map(|(r, approved)| RunRequest {
            dry_run: a.dry_run,
            limit: a.limit,
            canary: a.canary,
            verbose: a.verbose,
            confirm: !a.yes && !a.dry_run && std::io::stdin().is_terminal() && std::io::stderr().is_terminal(),
            plan: plan.clone(),
            approved,
            group: group.clone(),
            retry_failed: a.retry_failed.clone(),
            ..RunRequest::new(r, &spec.sha256)
        })
        .collect();
    run_in_order(reqs, group.as_deref(), a.json, stop).await
}

/// Runs jobs one after the other. A job that stops before its end (a
/// canary, `--limit`, a signal) or fails stops the group there: the jobs
/// after it depend on its whole result.
async fn run_in_order(reqs: Vec<RunRequest>, group: Option<&str>, json: bool, stop: &Stop) -> Result<ExitCode, Error> {
    let stopped_here = || {
        if let Some(g) = group {
            eprintln!("the run group stopped here; finish it with: infill resume {g}");
        }
    };
    let n = reqs.len();
    for (i, req) in reqs.into_iter().enumerate() {
        let (code, status) = execute(req, json, stop).await.inspect_err(|_| stopped_here())?;
        if code != ExitCode::Success {
            return Ok(code);
        }
        if i + 1 < n && status.is_some_and(|s| s != RunStatus::Succeeded) {
            stopped_here();
            return Ok(ExitCode::Success);
        }
    }
    Ok(ExitCode::Success)
}

/// Runs one job and prints its outcome: the exit code, and the run's
/// status when it ran.
async fn execute(req: RunRequest, json: bool, stop: &Stop) -> Result<(ExitCode, Option<RunStatus>), Error> {
    let progress = Progress::new(req.verbose);
    let outcome = infill::run::run(req, &progress, stop).await;
    progress.finish();
    let status = match outcome {
        Ok(Outcome::DryRun(report)) => {
            output::dry_run(&report, json);
            None
        }
        Ok(Outcome::Ran(summary)) => {
            output::summary(&summary, json);
            Some(summary.status)
        }
        Ok(Outcome::Exported(done)) => {
            exported(&done, json);
            None
        }
        Err(e) => {
            // A run that ended in an error (rows failed, a check failed,
            // cancelled) still has its summary: JSON readers get it.
            if json && let Some(summary) = progress.summary() {
                output::summary(&summary, true);
            }
            return Err(e);
        }
    };
    Ok((ExitCode::Success, status))
}

async fn plan(a: PlanArgs) -> Result<ExitCode, Error> {
    let (spec, jobs) = a.target.load()?;
    let overrides = Overrides {
        env: a.target.spec.env.clone(),
        params: a.target.params.clone(),
        ..Default::default()
    };
    let resolved = jobs
        .iter()
        .map(|j| spec.resolve(j, &overrides))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = infill::plan::PlanOptions { estimate: a.estimate };
    let plan = infill::plan::plan(&spec, &resolved, opts).await?;
    if let Some(out) = &a.out {
        let text = serde_json::to_string_pretty(&plan).expect("serialisable") + "\n";
        std::fs::write(out, text).map_err(|e| Error::Io {
            path: out.clone(),
            source: e,
        })?;
    }
    output::plan(&plan, a.json);
    if let Some(out) = &a.out
        && !a.json
    {
        println!(
            "\nWrote {}. To approve it: infill approve {} --by NAME",
            out.display(),
            out.display()
        );
    }
    Ok(ExitCode::Success)
}

async fn approve(a: ApproveArgs) -> Result<ExitCode, Error> {
    let plan = PlanFile::read(&a.plan)?;
    let spec = Spec::load(a.spec.clone().unwrap_or_else(|| plan.spec.clone()))?;
    let list = infill::approval::approve(&spec, &plan, a.env.as_deref(), &a.by, a.note.as_deref()).await?;
    output::approved(&list, a.json);
    Ok(ExitCode::Success)
}

async fn undo(
    spec: &Spec,
    env: Option<&str>,
    run: &str,
    opts: &infill::undo::UndoOptions,
    json: bool,
    stop: &Stop,
) -> Result<ExitCode, Error> {
    let progress = Progress::new(false);
    let outcome = infill::undo::undo(spec, env, run, opts, &progress, stop).await;
    progress.finish();
    let summary = outcome?;
    output::undone(&summary, json);
    Ok(if summary.conflicts > 0 {
        ExitCode::Failed
    } else {
        ExitCode::Success
    })
}

fn exported(done: &infill::export::Exported, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(done).expect("serialisable"));
    } else {
        println!(
            "exported {} rows of job {} to {} ({})",
            done.rows,
            done.job,
            done.path.display(),
            done.format
        );
    }
}

async fn export(a: ExportArgs) -> Result<ExitCode, Error> {
    let spec = Spec::load(spec_path(a.target.spec_file.as_deref(), a.target.spec.spec.as_deref())?)?;
    let job = spec.pick_job(a.target.job.as_deref())?.name.clone();
    let overrides = Overrides {
        env: a.target.spec.env.clone(),
        params: a.target.params.clone(),
        ..Default::default()
    };
    let r = spec.resolve(&job, &overrides)?;
    let done = infill::export::export(&r, &a.out, a.limit).await?;
    exported(&done, a.json);
    Ok(ExitCode::Success)
}

async fn verify(a: VerifyArgs) -> Result<ExitCode, Error> {
    let (spec, jobs) = a.target.load()?;
    let overrides = Overrides {
        env: a.target.spec.env.clone(),
        params: a.target.params.clone(),
        ..Default::default()
    };
    let results = infill::ops::verify(&spec, &jobs, &overrides).await?;
    output::checks(&results, a.json);
    Ok(if results.iter().all(|c| c.passed) {
        ExitCode::Success
    } else {
        ExitCode::Failed
    })
}

async fn resume(a: ResumeArgs, stop: &Stop) -> Result<ExitCode, Error> {
    let spec = Spec::load(spec_path(None, a.spec.spec.as_deref())?)?;
    let env = a.spec.env.as_deref();
    let confirm = !a.yes && std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    // A live, paused run is released; it goes on in its own process.
    if let Some(run) = infill::ops::release(&spec, env, &a.run).await.or_else(|e| match e {
        Error::RunNotFound(_) => Ok(None),
        e => Err(e),
    })? {
        println!("released run {} of job {}", infill::run::short(&run.id), run.job);
        return Ok(ExitCode::Success);
    }
    let (group, runs, command_line) = match infill::ops::find_for_resume(&spec, env, &a.run).await? {
        Resumable::Run(record, _) if record.undo_of.is_some() => {
            let opts = infill::undo::UndoOptions {
                confirm,
                ..Default::default()
            };
            return undo(&spec, env, &record.id, &opts, a.json, stop).await;
        }
        Resumable::Run(record, overrides) => {
            let req = RunRequest {
                verbose: a.verbose,
                confirm,
                continue_run: Some(record.id.clone()),
                ..RunRequest::new(spec.resolve(&record.job, &overrides)?, &spec.sha256)
            };
            return Ok(execute(req, a.json, stop).await?.0);
        }
        Resumable::Group { id, runs, command_line } => (id, runs, command_line),
    };
    // A group: every job of the spec in dependency order, skipping those
    // that succeeded in it and continuing those left unfinished.
    eprintln!("continuing run group {group}");
    let mut left = Vec::new();
    for job in spec.job_order(spec.jobs.keys().cloned().collect())? {
        let latest = runs.iter().rev().find(|r| r.job == job);
        let continue_run = match latest {
            Some(r) if r.status == RunStatus::Succeeded => {
                eprintln!("job {job}: done in run {}", infill::run::short(&r.id));
                continue;
            }
            Some(r) if r.status.is_unfinished() || r.status == RunStatus::Failed => Some(r.id.clone()),
            _ => None,
        };
        // The jobs it has not started yet get the group's command line.
        let overrides = infill::ops::overrides_for(&spec, env, &job, &runs)?.with_live_settings(&command_line);
        left.push((spec.resolve(&job, &overrides)?, continue_run));
    }
    // The group passed the gate when it started: drift is not checked again.
    let resolved: Vec<_> = left.iter().map(|(r, _)| r.clone()).collect();
    let passes = infill::approval::check_jobs(&resolved, None, true).await?;
    let reqs = left
        .into_iter()
        .zip(passes)
        .map(|((r, continue_run), approved)| RunRequest {
            verbose: a.verbose,
            confirm,
            continue_run,
            approved,
            group: Some(group.clone()),
            ..RunRequest::new(r, &spec.sha256)
        })
        .collect();
    run_in_order(reqs, Some(&group), a.json, stop).await
}

async fn status(a: StatusArgs) -> Result<ExitCode, Error> {
    let spec = Spec::load(spec_path(None, a.spec.spec.as_deref())?)?;
    let runs = infill::ops::status(&spec, a.spec.env.as_deref(), a.run.as_deref()).await?;
    // One unfinished run: how far it has to go (an estimate; status does
    // not fail when it cannot be made).
    let progress = match (&a.run, runs.as_slice()) {
        (Some(_), [one]) => infill::ops::progress(&spec, a.spec.env.as_deref(), one)
            .await
            .ok()
            .flatten(),
        _ => None,
    };
    // What a run that can go on would go on with, over the spec.
    let kept = match (&a.run, runs.as_slice()) {
        (Some(_), [one]) if one.status.is_unfinished() || one.status == RunStatus::Failed => {
            infill::ops::kept_settings(&spec, a.spec.env.as_deref(), &one.id)
                .await
                .unwrap_or_default()
        }
        _ => Default::default(),
    };
    output::status(&runs, a.run.is_some(), a.json, progress.as_ref(), &kept);
    Ok(ExitCode::Success)
}

async fn quickstart(a: QuickstartArgs, stop: &Stop) -> Result<ExitCode, Error> {
    let demo = infill::quickstart::create(&a.dir).await?;
    let before = infill::quickstart::counts(&demo.database).await?;
    println!(
        "Created a demo database {} with {} answers;",
        demo.database.display(),
        before.rows
    );
    println!(
        "{} of them have no syllabus though their cohort has one, and {} belong to a cohort without one.",
        before.missing, before.unfillable
    );
    println!("The spec {} fills them:\n", demo.spec.display());
    for line in infill::quickstart::DEMO_SPEC
        .lines()
        .filter(|l| l.starts_with("source") || l.starts_with("action"))
    {
        println!("    {line}");
    }
    println!();
    let spec = Spec::load(&demo.spec)?;
    let r = spec.resolve("fill_syllabus", &Overrides::default())?;
    let req = RunRequest::new(r, &spec.sha256);
    let progress = Progress::new(false);
    let outcome = infill::run::run(req, &progress, stop).await;
    progress.finish();
    let Outcome::Ran(summary) = outcome? else {
        unreachable!("the quickstart does not dry-run")
    };
    output::summary(&summary, false);
    let after = infill::quickstart::counts(&demo.database).await?;
    println!(
        "\nNow {} answers lack a syllabus their cohort has (was {}). The {} whose cohort has none were not candidates and stay as they were.",
        after.missing, before.missing, after.unfillable
    );
    // Name the binary as it was invoked, so the commands work as printed.
    let infill = std::env::args()
        .next()
        .filter(|a| a.contains('/'))
        .unwrap_or_else(|| "infill".into());
    let spec_arg = demo.spec.display().to_string();
    let tries = [
        (
            format!("{infill} run {spec_arg} --dry-run"),
            "read-only: counts, batches and a sample (nothing left to do now)",
        ),
        (
            format!("{infill} status --spec {spec_arg}"),
            "the run, its batches and counters",
        ),
        (
            format!("less {}", summary.audit_log),
            "the audit log, one JSON line per batch",
        ),
        (format!("{infill} run --help"), "every option, and the exit codes"),
    ];
    let width = tries.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    println!("\nTry next:");
    for (command, what) in tries {
        println!("  {command:<width$}  # {what}");
    }
    Ok(ExitCode::Success)
}
