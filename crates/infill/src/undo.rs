//! `infill undo RUN`: puts back the values a run wrote, from its undo
//! images, as a run of its own (audited, checkpointed, resumable, shown by
//! `status`). A value goes back only where the row still holds exactly what
//! infill wrote, compared on the server (`Dialect::same_value`: null-safe,
//! byte for byte); a row someone changed since is left as it is and
//! reported as a conflict. A row that already holds its before value is
//! counted as such, so undoing twice changes nothing the second time.
//!
//! Images are read in (batch, seq) order, a page per transaction; the
//! undo run's cursor is the last image restored, committed with the page.

use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::audit::AuditLog;
use crate::dialect::{Column, Db, Exec};
use crate::error::{Error, Result};
use crate::lock::JobLock;
use crate::run::{BatchReport, Event, Observer, Stop, short};
use crate::spec::{ParamKind, ResolvedJob, Spec};
use crate::sql::Query;
use crate::state::{self, Checkpoint, RunRecord, RunStatus};
use crate::target::{RowImage, Target};
use crate::value::{Key, Value, key_from_json};

/// Which images to restore, and whether to write.
#[derive(Debug, Clone, Default)]
pub struct UndoOptions {
    /// Only batches committed at or after this time (see `ParamKind::Timestamp`).
    pub since: Option<String>,
    /// Only batches committed at or before this time.
    pub until: Option<String>,
    /// Count what would be restored, write nothing.
    pub dry_run: bool,
    /// Ask the observer to confirm before writing.
    pub confirm: bool,
}

/// A row left as it is: changed since infill wrote it.
#[derive(Debug, Clone, Serialize)]
pub struct Conflict {
    pub key: serde_json::Value,
    /// The first column that no longer holds infill's value (None: the row is gone).
    pub column: Option<String>,
    /// Why an inserted row could not be deleted (e.g. another row refers to it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How an undo ended.
#[derive(Debug, Clone, Serialize)]
pub struct UndoSummary {
    /// The undo run (None for a dry run).
    pub run_id: Option<String>,
    pub undo_of: String,
    pub job: String,
    pub status: Option<RunStatus>,
    pub dry_run: bool,
    pub images: u64,
    pub restored: u64,
    /// Rows that already hold their before values.
    pub already: u64,
    pub conflicts: u64,
    /// The conflicting rows (the first 1,000; `infill failures UNDO_RUN` has all).
    pub conflict_rows: Vec<Conflict>,
    pub duration_ms: u64,
    pub audit_log: Option<String>,
}

const CONFLICTS_SHOWN: usize = 1000;

/// The time window, as `committed_at` text (UTC, microseconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
struct Window {
    since: Option<String>,
    until: Option<String>,
}

fn window_time(flag: &str, text: &str) -> Result<String> {
    let v = ParamKind::Timestamp
        .value(text)
        .map_err(|m| Error::Usage(format!("{flag}: {m}")))?;
    let utc = match v {
        Value::TimestampTz(t) => t,
        Value::Timestamp(t) => t.and_utc(),
        _ => unreachable!("a timestamp param"),
    };
    Ok(utc.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
}

/// One image as stored.
struct Image {
    batch_no: i64,
    seq: i64,
    key_json: serde_json::Value,
    key: Key,
    cols: Vec<(Column, Value, Value)>,
    /// The run inserted this row (no before image): undo deletes it.
    inserted: bool,
}

/// Undoes a run (or continues an interrupted undo of it).
pub async fn undo(
    spec: &Spec,
    env: Option<&str>,
    run: &str,
    opts: &UndoOptions,
    obs: &dyn Observer,
    stop: &Stop,
) -> Result<UndoSummary> {
    let (db, original) = crate::ops::locate(spec, env, run).await?;
    let result = undo_on(&db, spec, env, original, opts, obs, stop).await;
    db.close().await;
    result
}

async fn undo_on(
    db: &Db,
    spec: &Spec,
    env: Option<&str>,
    mut original: RunRecord,
    opts: &UndoOptions,
    obs: &dyn Observer,
    stop: &Stop,
) -> Result<UndoSummary> {
    let mut conn = db.conn().await?;
    if let Some(of) = &original.undo_of {
        // `infill undo UNDO_RUN` or `resume UNDO_RUN`: continue that undo.
        original = state::find_run(db, &mut conn, of).await?;
    }
    let sid = short(&original.id).to_string();
    if !original.undo_enabled {
        return Err(Error::CannotProceed(format!(
            "run {sid} kept no undo images (its job sets undo = false, or its action is a call): it cannot be undone"
        )));
    }
    if original.status == RunStatus::Running && !original.process_gone() {
        return Err(Error::CannotProceed(format!(
            "run {sid} is still running (pid {} on {}); stop it (Ctrl-C) before undoing it",
            original.pid, original.host
        )));
    }
    let overrides = crate::ops::overrides_for(spec, env, &original.job, std::slice::from_ref(&original))?;
    let r = spec.resolve(&original.job, &overrides)?;
    if r.job.definition_sha256 != original.definition_sha256 {
        obs.on_event(&Event::Notice(&format!(
            "job {} changed since run {sid}; the undo uses table {} and key {} from the spec, and the columns named in the images",
            r.job.name,
            r.job.table.join("."),
            r.job.key.join(", ")
        )));
    }
    let target = Target::inspect(db, &mut conn, &r).await?;
    // An insert's images are rows of the table it inserted into.
    let target = target.insert_view().unwrap_or(target);
    let asked = Window {
        since: opts.since.as_deref().map(|t| window_time("--since", t)).transpose()?,
        until: opts.until.as_deref().map(|t| window_time("--until", t)).transpose()?,
    };
    if opts.dry_run {
        drop(conn);
        return dry_run(db, &r, &target, &original, &asked).await;
    }

    if opts.confirm {
        let images = count_images(db, &mut conn, &original.id, &asked).await?;
        let c = crate::run::Confirmation {
            job: &r.job.name,
            target: db.redacted_url(),
            candidates: images,
        };
        if !obs.confirm(&c) {
            return Err(Error::CannotProceed("not confirmed; nothing was written".into()));
        }
    }
    state::ensure_schema(db, &mut conn).await?;
    let new_id = crate::run::new_id();
    let lock_name = crate::run::lock_name(db, &mut conn, &r).await;
    let mut lock = JobLock::acquire(db, &lock_name, &r.job.name, &new_id).await?;
    let outcome = with_lock(
        db, &mut conn, &r, &target, &original, asked, new_id, &mut lock, obs, stop,
    )
    .await;
    lock.release().await;
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn with_lock(
    db: &Db,
    conn: &mut crate::dialect::Conn,
    r: &ResolvedJob,
    target: &Target,
    original: &RunRecord,
    asked: Window,
    new_id: String,
    lock: &mut JobLock,
    obs: &dyn Observer,
    stop: &Stop,
) -> Result<UndoSummary> {
    let started = Instant::now();
    let sid = short(&original.id).to_string();
    // An unfinished undo of this run is continued, with its own window.
    let existing = state::list_undo_runs(db, conn, &original.id)
        .await?
        .into_iter()
        .find(|u| u.status.is_unfinished());
    let (run, window, resumed) = match existing {
        Some(u) => {
            let window: Window = Window {
                since: u.params["since"].as_str().map(String::from),
                until: u.params["until"].as_str().map(String::from),
            };
            let given = asked.since.is_some() || asked.until.is_some();
            if given && window != asked {
                return Err(Error::CannotProceed(format!(
                    "undo run {} of run {sid} is unfinished with another window (since {:?}, until {:?}); run `infill undo {sid}` without --since/--until to finish it, or `infill cancel {}`",
                    short(&u.id),
                    window.since,
                    window.until,
                    short(&u.id)
                )));
            }
            if u.status == RunStatus::Running && !u.process_gone() {
                return Err(Error::JobBusy {
                    job: r.job.name.clone(),
                    holder: format!(" (undo run {}, pid {} on {})", short(&u.id), u.pid, u.host),
                });
            }
            state::claim(db, conn, &u.id, &u.spec_sha256).await?;
            obs.on_event(&Event::Notice(&format!(
                "continuing undo run {} of run {sid}",
                short(&u.id)
            )));
            (u, window, true)
        }
        None => {
            let last = fetch_images(db, conn, target, &original.id, None, &asked, 1, true).await?;
            let params = json!({ "undo_of": original.id, "since": asked.since, "until": asked.until });
            let params_sha256 = {
                use sha2::{Digest, Sha256};
                hex::encode(Sha256::digest(format!("undo of {}", original.id).as_bytes()))
            };
            let run = RunRecord {
                env: original.env.clone(),
                upper: last.first().map(|i| vec![Value::Int(i.batch_no), Value::Int(i.seq)]),
                batch_size: r.settings.batch_size,
                undo_of: Some(original.id.clone()),
                ..RunRecord::started(
                    new_id,
                    &original.job,
                    &original.definition_sha256,
                    &original.spec_sha256,
                    params,
                    params_sha256,
                )
            };
            state::insert_run(db, conn, &run).await?;
            (run, asked, false)
        }
    };
    lock.set_run(&run.id).await?;
    let mut audit = AuditLog::open(&r.log_dir, &run.id, r.redactor.clone())?;
    audit.write(
        "undo_start",
        json!({
            "undo_of": original.id,
            "job": r.job.name,
            "target": db.redacted_url(),
            "since": window.since,
            "until": window.until,
            "user": crate::host::os_user(),
            "host": crate::host::hostname(),
            "pid": std::process::id(),
            "infill_version": env!("CARGO_PKG_VERSION"),
            "resumed": resumed,
        }),
    )?;
    let total = count_images(db, conn, &original.id, &window).await?;
    obs.on_event(&Event::Started {
        run_id: &run.id,
        job: &r.job.name,
        estimated_keys: Some(total),
        scanned_keys: run.rows_read,
        resumed,
    });

    let mut summary = UndoSummary {
        run_id: Some(run.id.clone()),
        undo_of: original.id.clone(),
        job: r.job.name.clone(),
        status: None,
        dry_run: false,
        images: run.rows_read,
        restored: run.rows_changed,
        already: run.rows_skipped,
        conflicts: run.rows_failed,
        conflict_rows: Vec::new(),
        duration_ms: 0,
        audit_log: Some(audit.path().display().to_string()),
    };
    let mut cursor = run.cursor.as_ref().and_then(|k| match k.as_slice() {
        [Value::Int(b), Value::Int(s)] => Some((*b, *s)),
        _ => None,
    });
    let mut batch_no = run.batches;
    let session_start = Instant::now();
    let mut session_changed = 0u64;
    let result: Result<()> = async {
        loop {
            if stop.requested() {
                return Err(Error::Interrupted(format!(
                    "undo run {} stopped after the batch in flight; `infill undo {sid}` continues it",
                    short(&run.id)
                )));
            }
            lock.check().await?;
            let batch_start = Instant::now();
            // A connection of the pool per page: one broken by an error is
            // replaced, so a retry starts clean.
            let page = {
                let mut c = db.conn().await?;
                fetch_images(
                    db,
                    &mut c,
                    target,
                    &original.id,
                    cursor,
                    &window,
                    r.settings.batch_size,
                    false,
                )
                .await?
            };
            let Some(last) = page.last() else { break };
            let (lo, hi) = (cursor, (last.batch_no, last.seq));
            batch_no += 1;
            let write = PageWrite {
                db,
                target,
                run_id: &run.id,
                sid: &sid,
                page: &page,
                lo,
                hi,
                batch_no,
                conflicts_before: summary.conflicts,
                batch_size: r.settings.batch_size,
            };
            let busy = crate::run::BusySample::start(db, &r.settings);
            let mut retries = 0;
            let (outcome, cp) = loop {
                match write.apply(batch_start).await {
                    Ok(done) => break done,
                    Err(e) if e.is_transient() && retries < crate::run::MAX_RETRIES => {
                        retries += 1;
                        let wait = crate::run::backoff(retries);
                        audit.write(
                            "retry",
                            json!({ "batch_no": batch_no, "attempt": retries, "error": r.redactor.mask(&e.to_string()), "wait_ms": wait.as_millis() as u64 }),
                        )?;
                        tokio::time::sleep(wait).await;
                        // A COMMIT whose connection was lost may have gone through.
                        if let Some(done) = write.committed().await {
                            break done;
                        }
                    }
                    Err(e) => return Err(e),
                }
            };
            cursor = Some(hi);
            summary.images += page.len() as u64;
            summary.restored += outcome.restored;
            summary.already += outcome.already;
            summary.conflicts += outcome.conflicts.len() as u64;
            session_changed += outcome.restored;
            for c in &outcome.conflicts {
                audit.write("conflict", serde_json::to_value(c).expect("serialisable"))?;
            }
            let room = CONFLICTS_SHOWN.saturating_sub(summary.conflict_rows.len());
            summary.conflict_rows.extend(outcome.conflicts.into_iter().take(room));
            let took = batch_start.elapsed();
            let busy = busy.count().await;
            let rest = crate::pace::pause_after_batch(&r.settings, took, busy, session_changed, session_start.elapsed());
            let report = BatchReport {
                batch: cp,
                retries,
                busy_sessions: busy,
                rest_ms: rest.as_millis() as u64,
            };
            audit.write("batch", serde_json::to_value(&report).expect("serialisable"))?;
            obs.on_event(&Event::Batch(&report));
            crate::run::rest_for(rest, stop).await;
        }
        Ok(())
    }
    .await;
    if resumed && summary.conflict_rows.len() < summary.conflicts as usize {
        // Conflicts of an earlier process: from the state tables.
        let all = state::list_failures(db, conn, &run.id).await.unwrap_or_default();
        summary.conflict_rows = all
            .into_iter()
            .take(CONFLICTS_SHOWN)
            .map(|f| Conflict {
                key: f.key,
                column: f
                    .message
                    .strip_prefix("column ")
                    .and_then(|m| m.split(' ').next())
                    .map(String::from),
                reason: f.message.strip_prefix("the inserted row was kept: ").map(String::from),
            })
            .collect();
    }
    let (status, message, err) = match result {
        Ok(()) => (RunStatus::Succeeded, None, None),
        Err(e) => {
            let status = match &e {
                Error::Interrupted(_) => RunStatus::Interrupted,
                e if e.is_transient() => RunStatus::Interrupted,
                _ => RunStatus::Failed,
            };
            let msg = e.to_string();
            let _ = audit.write("error", json!({ "message": msg }));
            (status, Some(msg), Some(e))
        }
    };
    let mut c = db.conn().await;
    if let Ok(c) = c.as_mut() {
        let _ = state::set_status(db, c, &run.id, status, message.as_deref()).await;
        // The original run is undone when all of it was, with nothing kept.
        if status == RunStatus::Succeeded && window == Window::default() && summary.conflicts == 0 {
            let note = format!("undone by run {}", short(&run.id));
            let _ = state::set_status(db, c, &original.id, RunStatus::Undone, Some(&note)).await;
        }
    }
    summary.status = Some(status);
    summary.duration_ms = started.elapsed().as_millis() as u64;
    audit.write(
        "undo_end",
        json!({
            "status": status.as_str(),
            "images": summary.images,
            "restored": summary.restored,
            "already": summary.already,
            "conflicts": summary.conflicts,
            "duration_ms": summary.duration_ms,
            "message": message,
        }),
    )?;
    match err {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// One page of images, written in one transaction with its checkpoint and
/// its conflicts.
struct PageWrite<'a> {
    db: &'a Db,
    target: &'a Target,
    run_id: &'a str,
    sid: &'a str,
    page: &'a [Image],
    lo: Option<(i64, i64)>,
    hi: (i64, i64),
    batch_no: u64,
    /// Conflicts recorded before this page (they are numbered on).
    conflicts_before: u64,
    batch_size: u64,
}

fn image_key(p: (i64, i64)) -> Key {
    vec![Value::Int(p.0), Value::Int(p.1)]
}

impl PageWrite<'_> {
    async fn apply(&self, started: Instant) -> Result<(PageOutcome, Checkpoint)> {
        let db = self.db;
        let mut conn = db.conn().await?;
        let mut tx = conn
            .begin_with(db.dialect.begin_write())
            .await
            .map_err(Error::db("cannot begin the undo batch"))?;
        let mut outcome = PageOutcome::default();
        for chunk in chunks(self.page) {
            if chunk.len() > 1 && write_all(&mut tx, self.target, chunk).await? {
                outcome.restored += chunk.len() as u64;
                continue;
            }
            for img in chunk {
                restore_one(&mut tx, self.target, img, &mut outcome, true).await?;
            }
        }
        for (i, c) in outcome.conflicts.iter().enumerate() {
            let f = state::Failure {
                run_id: self.run_id.to_string(),
                batch_no: self.conflicts_before + i as u64 + 1,
                key: c.key.clone(),
                error_code: Some("conflict".into()),
                message: match (&c.column, &c.reason) {
                    (_, Some(why)) => format!("the inserted row was kept: {why}"),
                    (Some(col), None) => format!("column {col} changed since run {} wrote it: kept", self.sid),
                    (None, None) => "the row is gone".into(),
                },
                failed_at: state::now(),
            };
            state::insert_failure(db, &mut tx, &f)
                .await
                .map_err(Error::db("cannot record a conflict"))?;
        }
        let mut cp = Checkpoint::new(
            0,
            self.batch_no,
            self.lo.map(image_key).as_ref(),
            image_key(self.hi),
            self.page.len() as u64,
            outcome.restored,
            outcome.conflicts.len() as u64,
            self.batch_size,
        );
        cp.duration_ms = started.elapsed().as_millis() as u64;
        state::checkpoint(db, &mut tx, self.run_id, &cp)
            .await
            .map_err(Error::db("cannot write the checkpoint"))?;
        tx.commit().await.map_err(Error::db("cannot commit the undo batch"))?;
        Ok((outcome, cp))
    }

    /// The page's outcome if its checkpoint committed, read back.
    async fn committed(&self) -> Option<(PageOutcome, Checkpoint)> {
        let mut c = self.db.conn().await.ok()?;
        let cp = state::batches_after(self.db, &mut c, self.run_id, self.batch_no - 1)
            .await
            .ok()?
            .into_iter()
            .find(|cp| cp.batch_no == self.batch_no)?;
        let first = self.conflicts_before + 1;
        let conflicts = state::list_failures(self.db, &mut c, self.run_id)
            .await
            .ok()?
            .into_iter()
            .filter(|f| (first..first + cp.rows_failed).contains(&f.batch_no))
            .map(|f| Conflict {
                key: f.key,
                column: None,
                reason: None,
            })
            .collect();
        let outcome = PageOutcome {
            restored: cp.rows_changed,
            already: cp.rows_skipped,
            conflicts,
        };
        Some((outcome, cp))
    }
}

#[derive(Default)]
struct PageOutcome {
    restored: u64,
    already: u64,
    conflicts: Vec<Conflict>,
}

/// Images restored by one statement at most: a plan that still reaches
/// each row through the key, and fewer statements bought nothing more
/// (5,000 a statement was slower on PostgreSQL, 250 much slower).
const ROWS_PER_STATEMENT: usize = 1000;
/// Values bound to one statement at most: under every engine's limit
/// (65,535 on PostgreSQL and MySQL, 32,766 in SQLite's default build).
const VALUES_PER_STATEMENT: usize = 30_000;

/// The page in runs of images one statement can undo together: rows the
/// run updated, or rows it inserted, writing the same columns,
/// consecutive, [`ROWS_PER_STATEMENT`] at most and [`VALUES_PER_STATEMENT`]
/// bound values at most.
fn chunks(page: &[Image]) -> Vec<&[Image]> {
    let same = |a: &Image, b: &Image| {
        a.inserted == b.inserted
            && a.cols.len() == b.cols.len()
            && a.cols.iter().zip(&b.cols).all(|(x, y)| x.0.name == y.0.name)
    };
    let per_row = |img: &Image| img.key.len() + 2 * img.cols.len();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=page.len() {
        let most = ROWS_PER_STATEMENT
            .min(VALUES_PER_STATEMENT / per_row(&page[start]).max(1))
            .max(1);
        if i == page.len() || i - start == most || !same(&page[start], &page[i]) {
            out.push(&page[start..i]);
            start = i;
        }
    }
    out
}

/// Undoes every row of `chunk` in one statement (restores the rows the run
/// updated, deletes the rows it inserted), or none: true when each row
/// still held what the run wrote and was undone. Otherwise (a row changed
/// since, already undone, gone or named twice, or the database refused:
/// another row refers to an inserted one) the statement is rolled back to
/// a savepoint, and the caller undoes and classifies the rows one at a
/// time. A transient error (a lost connection, a deadlock) fails the page,
/// which is retried whole.
async fn write_all(c: &mut impl Exec, target: &Target, chunk: &[Image]) -> Result<bool> {
    let rows: Vec<RowImage<'_>> = chunk.iter().map(|i| (&i.key, i.cols.as_slice())).collect();
    let q = match chunk[0].inserted {
        true => target.delete_rows(&rows),
        false => target.restore_rows(&rows),
    };
    c.execute(&Query::new("SAVEPOINT infill_rows"))
        .await
        .map_err(Error::db("cannot set a savepoint"))?;
    let all = match c.execute(&q).await.map_err(Error::db("cannot undo rows")) {
        Ok(n) => n == chunk.len() as u64,
        Err(e) if e.is_transient() => return Err(e),
        Err(e) => {
            tracing::info!(error = %e, "undo: the database refused a statement of rows");
            false
        }
    };
    if !all {
        tracing::info!(
            rows = chunk.len(),
            "undo: not every row of these images still holds what the run wrote (changed since, already undone, gone, or referred to); undoing them one at a time"
        );
        c.execute(&Query::new("ROLLBACK TO SAVEPOINT infill_rows"))
            .await
            .map_err(Error::db("cannot roll back to a savepoint"))?;
    }
    c.execute(&Query::new("RELEASE SAVEPOINT infill_rows"))
        .await
        .map_err(Error::db("cannot release a savepoint"))?;
    Ok(all)
}

/// Restores one row (or, without `write`, only classifies it). An inserted
/// row is deleted instead, if it still holds what was inserted; a delete the
/// database refuses (a row refers to it) is a conflict, rolled back to a
/// savepoint so the batch goes on.
async fn restore_one(
    c: &mut impl Exec,
    target: &Target,
    img: &Image,
    out: &mut PageOutcome,
    write: bool,
) -> Result<()> {
    let conflict = |column: Option<String>, reason: Option<String>| Conflict {
        key: img.key_json.clone(),
        column,
        reason,
    };
    if write && img.inserted {
        c.execute(&Query::new("SAVEPOINT infill_row"))
            .await
            .map_err(Error::db("cannot set a savepoint"))?;
        let after: Vec<(Column, Value)> = img.cols.iter().map(|(c, _, a)| (c.clone(), a.clone())).collect();
        match c.execute(&target.delete_inserted(&img.key, &after)).await {
            Ok(n) => {
                c.execute(&Query::new("RELEASE SAVEPOINT infill_row"))
                    .await
                    .map_err(Error::db("cannot release a savepoint"))?;
                if n > 0 {
                    out.restored += 1;
                    return Ok(());
                }
            }
            Err(sqlx::Error::Database(e)) => {
                c.execute(&Query::new("ROLLBACK TO SAVEPOINT infill_row"))
                    .await
                    .map_err(Error::db("cannot roll back to a savepoint"))?;
                out.conflicts.push(conflict(None, Some(e.message().to_string())));
                return Ok(());
            }
            Err(e) => {
                return Err(Error::Database {
                    context: "cannot delete an inserted row".into(),
                    source: e,
                });
            }
        }
    } else if write {
        let n = c
            .execute(&target.restore(&img.key, &img.cols))
            .await
            .map_err(Error::db("cannot restore a row"))?;
        if n > 0 {
            out.restored += 1;
            return Ok(());
        }
    }
    // Not restored: already as before, or changed since (or gone).
    let cols: Vec<Column> = img.cols.iter().map(|(c, _, _)| c.clone()).collect();
    let rows = c
        .fetch(&target.current(&img.key, &cols))
        .await
        .map_err(Error::db("cannot read a row to undo"))?;
    let Some(now) = rows.first() else {
        if img.inserted {
            out.already += 1;
        } else {
            out.conflicts.push(conflict(None, None));
        }
        return Ok(());
    };
    let holds = |pick: fn(&(Column, Value, Value)) -> &Value| img.cols.iter().zip(now).all(|(c, v)| pick(c) == v);
    if !img.inserted && holds(|c| &c.1) {
        out.already += 1;
    } else if !write && holds(|c| &c.2) {
        out.restored += 1;
    } else {
        let column = img
            .cols
            .iter()
            .zip(now)
            .find(|((_, _, after), v)| after != *v)
            .map(|((c, _, _), _)| c.name.clone());
        out.conflicts.push(conflict(column, None));
    }
    Ok(())
}

/// Counts, read-only, what an undo would restore.
async fn dry_run(
    db: &Db,
    r: &ResolvedJob,
    target: &Target,
    original: &RunRecord,
    window: &Window,
) -> Result<UndoSummary> {
    let started = Instant::now();
    let mut conn = db.read_only_conn().await?;
    let mut tx = conn.begin_read_only(db.dialect).await?;
    let mut outcome = PageOutcome::default();
    let mut images = 0;
    let mut cursor = None;
    loop {
        let page = fetch_images(
            db,
            &mut tx,
            target,
            &original.id,
            cursor,
            window,
            r.settings.batch_size,
            false,
        )
        .await?;
        let Some(last) = page.last() else { break };
        cursor = Some((last.batch_no, last.seq));
        images += page.len() as u64;
        for img in &page {
            restore_one(&mut tx, target, img, &mut outcome, false).await?;
        }
    }
    tx.rollback()
        .await
        .map_err(Error::db("cannot end the read-only transaction"))?;
    let conflicts = outcome.conflicts.len() as u64;
    outcome.conflicts.truncate(CONFLICTS_SHOWN);
    Ok(UndoSummary {
        run_id: None,
        undo_of: original.id.clone(),
        job: r.job.name.clone(),
        status: None,
        dry_run: true,
        images,
        restored: outcome.restored,
        already: outcome.already,
        conflicts,
        conflict_rows: outcome.conflicts,
        duration_ms: started.elapsed().as_millis() as u64,
        audit_log: None,
    })
}

/// How many images a window holds: a batch keeps one image per row it
/// wrote (or inserted).
async fn count_images(db: &Db, c: &mut impl Exec, run_id: &str, w: &Window) -> Result<u64> {
    // Summed here: SUM's type differs per engine (NUMERIC on PostgreSQL).
    let (sql, args) = images_sql(run_id, None, w);
    let q = db.q(
        &format!(
            "SELECT b.rows_changed FROM infill_batches b WHERE b.batch_no IN (SELECT u.batch_no {sql}) AND b.run_id = ?"
        ),
        args.into_iter().chain([Value::Text(run_id.into())]).collect(),
    );
    let rows = c.fetch(&q).await.map_err(Error::db("cannot count the undo images"))?;
    Ok(rows.iter().map(|r| crate::plan::as_count(r.first())).sum())
}

/// `FROM ... WHERE ...` of a run's images after a cursor, in a window.
fn images_sql(run_id: &str, after: Option<(i64, i64)>, w: &Window) -> (String, Vec<Value>) {
    let mut sql = String::from(
        "FROM infill_undo u JOIN infill_batches b ON b.run_id = u.run_id AND b.batch_no = u.batch_no WHERE u.run_id = ?",
    );
    let mut args = vec![Value::Text(run_id.into())];
    if let Some((bn, seq)) = after {
        sql.push_str(" AND (u.batch_no > ? OR (u.batch_no = ? AND u.seq > ?))");
        args.extend([Value::Int(bn), Value::Int(bn), Value::Int(seq)]);
    }
    if let Some(s) = &w.since {
        sql.push_str(" AND b.committed_at >= ?");
        args.push(Value::Text(s.clone()));
    }
    if let Some(u) = &w.until {
        sql.push_str(" AND b.committed_at <= ?");
        args.push(Value::Text(u.clone()));
    }
    (sql, args)
}

/// The images after `after`, whole rows of `infill_undo` (each holds the
/// images of up to 1,000 rows as JSON arrays; an older single image per row
/// reads too) until at least `limit` images, or the last row with `last`.
#[allow(clippy::too_many_arguments)]
async fn fetch_images(
    db: &Db,
    c: &mut impl Exec,
    target: &Target,
    run_id: &str,
    mut after: Option<(i64, i64)>,
    w: &Window,
    limit: u64,
    last: bool,
) -> Result<Vec<Image>> {
    let mut out = Vec::new();
    loop {
        let (sql, args) = images_sql(run_id, after, w);
        let order = if last {
            "u.batch_no DESC, u.seq DESC"
        } else {
            "u.batch_no, u.seq"
        };
        let q = db.q(
            &format!(
                "SELECT u.batch_no, u.seq, u.row_key, u.before_image, u.after_image {sql} ORDER BY {order} LIMIT 1"
            ),
            args,
        );
        let rows = c.fetch(&q).await.map_err(Error::db("cannot read the undo images"))?;
        let Some(row) = rows.first() else { break };
        let images = read_images(db, target, run_id, row)?;
        let at = |v: &Value| match v {
            Value::Int(i) => *i,
            other => other.display().parse().unwrap_or(0),
        };
        after = Some((at(&row[0]), at(&row[1])));
        out.extend(images);
        if last || out.len() as u64 >= limit.max(1) {
            break;
        }
    }
    Ok(out)
}

/// Images stored in columns: `keys` the keys (scalars for a one-column
/// key), `after` maps each written column to its values in the same
/// order, `before` the same or `null` for a column that was NULL in every
/// row. Read column by column, so a batch of 50,000 images costs no more
/// than its values.
fn images_of_columns(
    db: &Db,
    target: &Target,
    run_id: &str,
    (batch_no, seq): (i64, i64),
    keys: &[serde_json::Value],
    before: &serde_json::Value,
    after: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<Image>> {
    let uneven = |name: &str| unreadable(run_id, format!("column `{name}` does not hold one value per key"));
    let mut columns = Vec::with_capacity(after.len());
    for (name, a) in after {
        let a = a
            .as_array()
            .filter(|a| a.len() == keys.len())
            .ok_or_else(|| uneven(name))?;
        let b = match before.get(name) {
            Some(serde_json::Value::Array(b)) if b.len() == keys.len() => Some(b),
            Some(serde_json::Value::Null) => None,
            _ => return Err(uneven(name)),
        };
        columns.push((image_column(db, target, run_id, name)?, b, a));
    }
    // Integer columns are stored as numbers; values compare as text.
    let value = |v: &serde_json::Value| match v {
        serde_json::Value::Number(n) => Value::Text(n.to_string()),
        other => Value::from_json(other).unwrap_or(Value::Null),
    };
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            // A key column's keys are stored flat; keys of several columns as arrays.
            let key_json = match k {
                serde_json::Value::Array(_) => k.clone(),
                scalar => serde_json::Value::Array(vec![scalar.clone()]),
            };
            let key = key_from_json(&key_json).ok_or_else(|| unreadable(run_id, "a key".into()))?;
            let cols = columns
                .iter()
                .map(|(c, b, a)| (c.clone(), b.map_or(Value::Null, |b| value(&b[i])), value(&a[i])))
                .collect();
            Ok(Image {
                inserted: false,
                batch_no,
                seq,
                key_json,
                key,
                cols,
            })
        })
        .collect()
}

fn unreadable(run_id: &str, what: String) -> Error {
    Error::CannotProceed(format!("an undo image of run {} is unreadable: {what}", short(run_id)))
}

/// The table's column an image names.
fn image_column(db: &Db, target: &Target, run_id: &str, name: &str) -> Result<Column> {
    target.column(db, name).ok_or_else(|| {
        Error::CannotProceed(format!(
            "column `{name}` of run {}'s undo images is no longer in table `{}`",
            short(run_id),
            target.table
        ))
    })
}

/// The images of one row of `infill_undo`.
fn read_images(db: &Db, target: &Target, run_id: &str, row: &[Value]) -> Result<Vec<Image>> {
    let int = |v: &Value| match v {
        Value::Int(i) => *i,
        other => other.display().parse().unwrap_or(0),
    };
    let json = |v: &Value| -> Result<serde_json::Value> {
        serde_json::from_str(&v.display()).map_err(|e| unreadable(run_id, e.to_string()))
    };
    let (keys, befores, afters) = (json(&row[2])?, json(&row[3])?, json(&row[4])?);
    let at = (int(&row[0]), int(&row[1]));
    // A row of images in columns (PostgreSQL), a row of images in arrays
    // (keys are arrays themselves), or a single image.
    let triples: Vec<(serde_json::Value, serde_json::Value, serde_json::Value)> =
        match (keys.as_array(), befores.as_array(), afters.as_object()) {
            (Some(k), None, Some(a)) if a.values().all(|v| v.is_array()) => {
                return images_of_columns(db, target, run_id, at, k, &befores, a);
            }
            (Some(k), Some(b), _) if k.first().is_some_and(|x| x.is_array()) => {
                let a = afters.as_array().filter(|a| a.len() == k.len() && b.len() == k.len());
                let a = a.ok_or_else(|| unreadable(run_id, "the arrays differ in length".into()))?;
                k.iter()
                    .cloned()
                    .zip(b.iter().cloned())
                    .zip(a.iter().cloned())
                    .map(|((k, b), a)| (k, b, a))
                    .collect()
            }
            _ => vec![(keys, befores, afters)],
        };
    triples
        .into_iter()
        .map(|(key_json, before, after)| {
            let key = key_from_json(&key_json).ok_or_else(|| unreadable(run_id, "a key".into()))?;
            let mut cols = Vec::new();
            for (name, a) in after.as_object().into_iter().flatten() {
                let v = |j: &serde_json::Value| Value::from_json(j).unwrap_or(Value::Null);
                cols.push((image_column(db, target, run_id, name)?, v(&before[name.as_str()]), v(a)));
            }
            Ok(Image {
                inserted: before.is_null(),
                batch_no: at.0,
                seq: at.1,
                key_json,
                key,
                cols,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(cols: &[&str], inserted: bool) -> Image {
        let col = |n: &&str| Column {
            name: n.to_string(),
            sql_type: "text".into(),
        };
        Image {
            batch_no: 1,
            seq: 0,
            key_json: json!([1]),
            key: vec![Value::Int(1)],
            cols: cols
                .iter()
                .map(|n| (col(n), Value::Null, Value::Text("x".into())))
                .collect(),
            inserted,
        }
    }

    fn sizes(page: &[Image]) -> Vec<usize> {
        chunks(page).iter().map(|c| c.len()).collect()
    }

    #[test]
    fn a_chunk_holds_at_most_a_statement_of_rows() {
        let page: Vec<Image> = (0..2500).map(|_| image(&["a"], false)).collect();
        assert_eq!(sizes(&page), vec![1000, 1000, 500]);
    }

    #[test]
    fn wide_rows_stay_under_the_bound_values_limit() {
        // 1 key + 2 x 40 columns = 81 values a row: 370 rows a statement.
        let cols: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
        let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
        let page: Vec<Image> = (0..1000).map(|_| image(&cols, false)).collect();
        let sizes = sizes(&page);
        assert_eq!(sizes, vec![370, 370, 260]);
        assert!(sizes.iter().all(|n| n * 81 <= VALUES_PER_STATEMENT));
    }

    #[test]
    fn inserted_rows_and_other_columns_go_in_chunks_of_their_own() {
        let page = vec![
            image(&["a"], false),
            image(&["a"], false),
            image(&["a"], true),
            image(&["a"], true),
            image(&["b"], false),
            image(&["a", "b"], false),
            image(&["a", "b"], false),
        ];
        assert_eq!(sizes(&page), vec![2, 2, 1, 2]);
        assert!(chunks(&[]).is_empty());
    }
}
