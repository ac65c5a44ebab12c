//! The run loop for sources read page by page (query, diff, file; see
//! `source`). Each page is applied in one transaction with its checkpoint,
//! so a page is written entirely or not at all, and the cursor saved is
//! the cursor after that page: a run killed at any point continues after
//! the last committed page, repeating nothing and losing nothing.
//!
//! A page whose write fails on a row's data is applied again row by row,
//! each row under a savepoint: the rows that fail are rolled back alone
//! and recorded in `infill_failures` in the same transaction, and the
//! others commit with the checkpoint. (A table source bisects key ranges
//! instead; a page has no range to split, and one pass suffices.)

use std::time::{Duration, Instant};

use serde_json::json;

use super::{
    BatchOutcome, BatchReport, CONTROL_EVERY, End, Event, LOCK_CHECK_EVERY, Live, Looped, MAX_RETRIES, PROBE_EVERY,
    RunRequest, backoff, checkpoint_and_commit, error_code, error_text, insert_rows, is_row_error, prepare_probes,
    throttle, too_many_failures,
};
use crate::dialect::{Db, Exec, Tx};
use crate::error::{Error, Result};
use crate::lock::JobLock;
use crate::source::{Page, Reader};
use crate::state::{self, Checkpoint, RunRecord, UndoImage};
use crate::target::Target;
use crate::value::{Key, Value, key_to_json};

/// Keys per statement when a page's before- and after-images are read.
const KEYS_PER_READ: usize = 5_000;

#[allow(clippy::too_many_arguments)]
pub(super) async fn batches(
    db: &Db,
    req: &RunRequest,
    obs: &dyn super::Observer,
    stop: &super::Stop,
    target: &Target,
    lock: &mut JobLock,
    run: &RunRecord,
    mut batch_size: u64,
    audit: &mut crate::audit::AuditLog,
    looped: &mut Looped,
    reader: &mut Reader,
) -> Result<End> {
    let r = &req.job;
    let mut settings = r.settings.clone();
    let mut applied = std::collections::BTreeMap::new();
    reader.set_upper(run.upper.clone());
    let mut cursor = run.cursor.clone();
    let session_start = Instant::now();
    let mut last_lock_check = Instant::now();
    let mut live = Live {
        db,
        run_id: &run.id,
        base: &r.settings,
        obs,
        stop,
        probes: prepare_probes(db, &r.settings)?,
        last_control: Instant::now() - CONTROL_EVERY,
        last_probe: Instant::now() - PROBE_EVERY,
    };
    let mut adaptive = crate::pace::Adaptive::default();
    loop {
        if stop.requested() {
            return Ok(End::Stopped);
        }
        if let Some(end) = live.checkpoint(&mut settings, &mut applied, lock, audit).await? {
            return Ok(end);
        }
        let s = &settings;
        if s.fixed_batch {
            batch_size = s.batch_size;
        }
        if last_lock_check.elapsed() >= LOCK_CHECK_EVERY {
            lock.check().await?;
            last_lock_check = Instant::now();
        }
        let stop_after = match (req.limit, req.canary) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let remaining = stop_after.map(|l| l.saturating_sub(looped.session_read));
        if remaining == Some(0) {
            return Ok(End::Limit);
        }
        let n = remaining.map_or(batch_size, |rem| rem.min(batch_size)).max(1);
        let batch_no = looped.batches + 1;
        let t0 = Instant::now();
        // Reading is retried like a write; a bad record fails the run
        // before anything of its page is written.
        let mut attempt = 0;
        let page = loop {
            match reader.page(cursor.as_ref(), n).await {
                Ok(p) => break p,
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
        };
        let Some(next) = page.cursor.clone() else {
            return Ok(End::Done);
        };
        let write = Write {
            db,
            target,
            run_id: &run.id,
            undo: r.job.undo,
            batch_size,
            redactor: &r.redactor,
        };
        let settled = {
            let fut = write.settle(batch_no, cursor.as_ref(), next.clone(), &page, t0);
            tokio::pin!(fut);
            tokio::select! {
                res = &mut fut => Some(res),
                _ = stop.until(2) => None,
            }
        };
        let Some(settled) = settled else {
            return Ok(End::Aborted);
        };
        let (o, events) = settled?;
        for (kind, detail) in events {
            audit.write(kind, detail)?;
        }
        let report = BatchReport {
            batch: o.checkpoint.clone(),
            retries: o.retries,
        };
        audit.write("batch", serde_json::to_value(&report).expect("serialisable"))?;
        let b = &report.batch;
        looped.batches = b.batch_no;
        looped.rows_read += b.rows_read;
        looped.rows_changed += b.rows_changed;
        looped.rows_skipped += b.rows_skipped;
        looped.rows_failed += b.rows_failed;
        looped.session_read += b.rows_read;
        looped.session_changed += b.rows_changed;
        obs.on_event(&Event::Batch(&report));
        if too_many_failures(s.max_failures, looped.rows_failed, looped.rows_read) {
            return Err(Error::RowsFailed(format!(
                "{} rows failed, more than max_failures allows; the run stopped. `infill failures {}` lists them",
                looped.rows_failed,
                super::short(&run.id)
            )));
        }
        cursor = Some(next);
        if page.end {
            return Ok(End::Done);
        }
        batch_size = adaptive.next(batch_size, o.duration, s);
        throttle(s, o.duration, looped.session_changed, session_start, stop).await;
    }
}

/// Writes pages.
struct Write<'a> {
    db: &'a Db,
    target: &'a Target,
    run_id: &'a str,
    undo: bool,
    batch_size: u64,
    redactor: &'a crate::secret::Redactor,
}

type Events = Vec<(&'static str, serde_json::Value)>;

impl Write<'_> {
    /// Applies a page with retries on transient errors; on a row's error,
    /// again row by row.
    async fn settle(
        &self,
        batch_no: u64,
        lo: Option<&Key>,
        upper: Key,
        page: &Page,
        t0: Instant,
    ) -> Result<(BatchOutcome, Events)> {
        let mut events = Vec::new();
        let mut retries = 0;
        let mut isolate = false;
        loop {
            match self.apply(batch_no, lo, upper.clone(), page, isolate, t0, &mut events).await {
                Ok(mut o) => {
                    o.retries = retries;
                    return Ok((o, events));
                }
                Err(e) if e.is_transient() && retries < MAX_RETRIES => {
                    retries += 1;
                    let wait = backoff(retries);
                    events.push((
                        "retry",
                        json!({ "batch_no": batch_no, "attempt": retries, "error": self.redactor.mask(&e.to_string()), "wait_ms": wait.as_millis() as u64 }),
                    ));
                    tokio::time::sleep(wait).await;
                    // A connection lost during COMMIT: the checkpoint says
                    // whether the page went through.
                    if let Some(o) = self.committed(batch_no, retries).await {
                        return Ok((o, events));
                    }
                }
                Err(e) if !isolate && is_row_error(&e) => {
                    isolate = true;
                    events.clear();
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn committed(&self, batch_no: u64, retries: u32) -> Option<BatchOutcome> {
        let mut c = self.db.conn().await.ok()?;
        let found = state::batches_after(self.db, &mut c, self.run_id, batch_no - 1).await.ok()?;
        found.into_iter().find(|cp| cp.batch_no == batch_no).map(|cp| BatchOutcome {
            duration: Duration::from_millis(cp.duration_ms),
            checkpoint: cp,
            retries,
            written: Vec::new(),
        })
    }

    /// One statement, under a savepoint when rows are isolated: a failing
    /// row is rolled back alone and recorded.
    async fn one(
        &self,
        tx: &mut Tx<'_>,
        isolate: bool,
        batch_no: u64,
        key: &[Value],
        q: &crate::sql::Query,
        events: &mut Events,
        failed: &mut u64,
    ) -> Result<Option<u64>> {
        let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
        if !isolate {
            return Ok(Some(tx.execute(q).await.map_err(fail("cannot write"))?));
        }
        let sp = crate::sql::Query::new("SAVEPOINT infill_row");
        tx.execute(&sp).await.map_err(fail("cannot set a savepoint"))?;
        match tx.execute(q).await.map_err(fail("cannot write")) {
            Ok(n) => {
                tx.execute(&crate::sql::Query::new("RELEASE SAVEPOINT infill_row"))
                    .await
                    .map_err(fail("cannot release the savepoint"))?;
                Ok(Some(n))
            }
            Err(e) if is_row_error(&e) => {
                tx.execute(&crate::sql::Query::new("ROLLBACK TO SAVEPOINT infill_row"))
                    .await
                    .map_err(fail("cannot roll back to the savepoint"))?;
                self.record(tx, batch_no, key, &e, events).await?;
                *failed += 1;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn record(
        &self,
        tx: &mut Tx<'_>,
        batch_no: u64,
        key: &[Value],
        err: &Error,
        events: &mut Events,
    ) -> Result<()> {
        let failure = state::Failure {
            run_id: self.run_id.to_string(),
            batch_no,
            key: key_to_json(key),
            error_code: error_code(err),
            message: self.redactor.mask(&error_text(err)),
            failed_at: state::now(),
        };
        state::insert_failure(self.db, tx, &failure)
            .await
            .map_err(Error::db(format!("batch {batch_no}: cannot record the failed row")))?;
        events.push((
            "row_failed",
            json!({ "batch_no": batch_no, "key": key_to_json(key), "error": failure.message, "code": failure.error_code }),
        ));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        batch_no: u64,
        lo: Option<&Key>,
        upper: Key,
        page: &Page,
        isolate: bool,
        t0: Instant,
        events: &mut Events,
    ) -> Result<BatchOutcome> {
        let t = self.target;
        let d = self.db.dialect;
        let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
        let nk = t.keys.len();
        let mut conn = self.db.conn().await?;
        let mut tx = conn.begin_with(d.begin_write()).await.map_err(fail("cannot begin"))?;
        let mut changed = 0u64;
        let mut failed = 0u64;
        if t.call.is_some() {
            for row in &page.rows {
                let q = t.call_statement(&row[nk..]);
                if self
                    .one(&mut tx, isolate, batch_no, &row[..nk], &q, events, &mut failed)
                    .await?
                    .is_some()
                {
                    changed += 1;
                }
            }
        } else if t.insert.is_some() {
            let mut images = Vec::new();
            if isolate {
                for row in &page.rows {
                    tx.execute(&crate::sql::Query::new("SAVEPOINT infill_row"))
                        .await
                        .map_err(fail("cannot set a savepoint"))?;
                    match insert_rows(self.db, &mut tx, t, std::slice::from_ref(row), nk, batch_no).await {
                        Ok(mut i) => {
                            tx.execute(&crate::sql::Query::new("RELEASE SAVEPOINT infill_row"))
                                .await
                                .map_err(fail("cannot release the savepoint"))?;
                            images.append(&mut i);
                        }
                        Err(e) if is_row_error(&e) => {
                            tx.execute(&crate::sql::Query::new("ROLLBACK TO SAVEPOINT infill_row"))
                                .await
                                .map_err(fail("cannot roll back to the savepoint"))?;
                            self.record(&mut tx, batch_no, &row[..nk], &e, events).await?;
                            failed += 1;
                        }
                        Err(e) => return Err(e),
                    }
                }
            } else {
                images = insert_rows(self.db, &mut tx, t, &page.rows, nk, batch_no).await?;
            }
            changed = images.len() as u64;
            if self.undo && !images.is_empty() {
                state::insert_undo(self.db, &mut tx, self.run_id, batch_no, &images)
                    .await
                    .map_err(fail("cannot store the undo images"))?;
            }
        } else {
            let keys: Vec<Key> = page.rows.iter().map(|r| r[..nk].to_vec()).collect();
            let before = if self.undo {
                read_values(&mut tx, &keys, |k| t.before_values(k), batch_no).await?
            } else {
                Vec::new()
            };
            let mut written = Vec::new();
            for row in &page.rows {
                let q = t.update_row(&row[..nk].to_vec(), &row[nk..]);
                if let Some(n) = self
                    .one(&mut tx, isolate, batch_no, &row[..nk], &q, events, &mut failed)
                    .await?
                    && n > 0
                {
                    changed += n.min(1);
                    written.push(row[..nk].to_vec());
                }
            }
            if self.undo && !written.is_empty() {
                let after = read_values(&mut tx, &written, |k| t.after_values(k), batch_no).await?;
                let images = images(t, &before, &after, nk);
                state::insert_undo(self.db, &mut tx, self.run_id, batch_no, &images)
                    .await
                    .map_err(fail("cannot store the undo images"))?;
            }
        }
        let cp = Checkpoint::new(
            0,
            batch_no,
            lo,
            upper,
            page.rows.len() as u64,
            changed,
            failed,
            self.batch_size,
        );
        checkpoint_and_commit(self.db, tx, self.run_id, cp, t0, Vec::new()).await
    }
}

/// Rows of `q(keys)`, a chunk of keys at a time.
async fn read_values(
    tx: &mut Tx<'_>,
    keys: &[Key],
    q: impl Fn(&[Key]) -> crate::sql::Query,
    batch_no: u64,
) -> Result<Vec<Vec<Value>>> {
    let mut out = Vec::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let nk = keys[0].len().max(1);
    for chunk in keys.chunks((KEYS_PER_READ / nk).max(1)) {
        out.extend(
            tx.fetch(&q(chunk))
                .await
                .map_err(Error::db(format!("batch {batch_no}: cannot read the images")))?,
        );
    }
    Ok(out)
}

/// Undo images from rows read before and after the write (key, then the
/// written columns), matched by key.
pub(super) fn images(t: &Target, before: &[Vec<Value>], after: &[Vec<Value>], nk: usize) -> Vec<UndoImage> {
    let names: Vec<String> = t.sets.iter().map(|(c, _)| c.name.clone()).collect();
    let image = |vals: &[Value]| {
        serde_json::Value::Object(names.iter().cloned().zip(vals.iter().map(Value::to_json)).collect())
    };
    let by_key: std::collections::HashMap<String, &Vec<Value>> =
        before.iter().map(|r| (key_to_json(&r[..nk]).to_string(), r)).collect();
    after
        .iter()
        .filter_map(|a| {
            let key = key_to_json(&a[..nk]);
            let b = by_key.get(&key.to_string())?;
            Some(UndoImage {
                key,
                before: image(&b[nk..]),
                after: image(&a[nk..]),
            })
        })
        .collect()
}
