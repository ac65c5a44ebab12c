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
    BatchOutcome, BatchReport, Between, End, Event, Looped, MAX_RETRIES, RunRequest, backoff, checkpoint_and_commit,
    committed_since, insert_rows, is_row_error, read_retrying, row_failure, split_batches, too_many_failures,
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
    only: Option<&[Key]>,
) -> Result<End> {
    let r = &req.job;
    // `--retry-failed`: the source is read again and only the rows of
    // these keys (as JSON) are applied; a row the source no longer yields
    // (fixed since, or no longer a candidate) is not retried.
    let only: Option<std::collections::HashSet<String>> =
        only.map(|keys| keys.iter().map(|k| key_to_json(k).to_string()).collect());
    reader.set_upper(run.upper.clone());
    let mut cursor = run.cursor.clone();
    let session_start = Instant::now();
    let mut between = Between::new(db, req, run, obs, stop)?;
    let mut adaptive = crate::pace::Adaptive::default();
    loop {
        if let Some(end) = between.check(lock, audit).await? {
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
        let n = remaining.map_or(batch_size, |rem| rem.min(batch_size)).max(1);
        let batch_no = looped.batches + 1;
        let t0 = Instant::now();
        // Reading is retried like a write; a bad record fails the run
        // before anything of its page is written.
        let mut page = read_retrying(audit, r, batch_no, async || reader.page(cursor.as_ref(), n).await).await?;
        let Some(next) = page.cursor.clone() else {
            return Ok(End::Done);
        };
        if let Some(only) = &only {
            keep_only(&mut page, r.job.key.len(), only);
            if page.rows.is_empty() {
                // Nothing of this page to retry: no batch, read on.
                if page.end {
                    return Ok(End::Done);
                }
                cursor = Some(next);
                continue;
            }
        }
        let write = Write {
            db,
            target,
            run_id: &run.id,
            undo: r.job.undo,
            batch_size,
            redactor: &r.redactor,
        };
        let busy = super::BusySample::start(db, s);
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
        let (outcomes, events) = settled?;
        let busy = busy.count().await;
        for (kind, detail) in events {
            audit.write(kind, detail)?;
        }
        let duration: Duration = outcomes.iter().map(|o| o.duration).sum();
        let (last, mut rest) = (outcomes.len(), Duration::ZERO);
        for (i, o) in outcomes.into_iter().enumerate() {
            let mut report = BatchReport {
                batch: o.checkpoint.clone(),
                retries: o.retries,
                busy_sessions: busy,
                rest_ms: 0,
            };
            looped.add(&report.batch);
            if i + 1 == last {
                rest =
                    crate::pace::pause_after_batch(s, duration, busy, looped.session_changed, session_start.elapsed());
                report.rest_ms = rest.as_millis() as u64;
            }
            audit.write("batch", serde_json::to_value(&report).expect("serialisable"))?;
            obs.on_event(&Event::Batch(&report));
        }
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
        batch_size = adaptive.next(batch_size, duration, s);
        super::rest_for(rest, stop).await;
    }
}

/// Keeps the rows of a page whose key (its first `nk` values, as JSON) is
/// in `only`, with their lines and cursors.
fn keep_only(page: &mut Page, nk: usize, only: &std::collections::HashSet<String>) {
    let keep: Vec<bool> = page
        .rows
        .iter()
        .map(|row| only.contains(&key_to_json(&row[..nk]).to_string()))
        .collect();
    fn retain<T>(v: &mut Vec<T>, keep: &[bool]) {
        let mut flags = keep.iter();
        v.retain(|_| flags.next().copied().unwrap_or(false));
    }
    retain(&mut page.rows, &keep);
    retain(&mut page.cursors, &keep);
    retain(&mut page.lines, &keep);
    // A retry reads the rows it retries, not the whole source.
    page.scanned = page.rows.len() as u64;
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

/// What became of one row when a page is applied row by row.
enum RowResult {
    Done { changed: u64, images: Vec<UndoImage> },
    Failed(Error),
}

const SAVEPOINT: &str = "SAVEPOINT infill_row";
const RELEASE: &str = "RELEASE SAVEPOINT infill_row";
const ROLLBACK_TO: &str = "ROLLBACK TO SAVEPOINT infill_row";

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
    ) -> Result<(Vec<BatchOutcome>, Events)> {
        let mut events = Vec::new();
        let mut retries = 0;
        let mut isolate = false;
        loop {
            let applied = if isolate {
                self.apply_rows(batch_no, lo, upper.clone(), page, t0, &mut events)
                    .await
            } else {
                self.apply(batch_no, lo, upper.clone(), page, t0).await.map(|o| vec![o])
            };
            match applied {
                Ok(mut outcomes) => {
                    for o in &mut outcomes {
                        o.retries = retries;
                    }
                    return Ok((outcomes, events));
                }
                Err(e) if e.is_transient() && retries < MAX_RETRIES => {
                    retries += 1;
                    let wait = backoff(retries);
                    events.push((
                        "retry",
                        json!({ "batch_no": batch_no, "attempt": retries, "error": self.redactor.mask(&e.to_string()), "wait_ms": wait.as_millis() as u64 }),
                    ));
                    tokio::time::sleep(wait).await;
                    // A connection lost during COMMIT: the checkpoints say
                    // whether the page went through.
                    if let Some(o) = committed_since(self.db, self.run_id, batch_no, retries).await {
                        return Ok((o, events));
                    }
                }
                Err(e) if !isolate && is_row_error(&e) => {
                    isolate = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The whole page in one go: one batch.
    async fn apply(
        &self,
        batch_no: u64,
        lo: Option<&Key>,
        upper: Key,
        page: &Page,
        t0: Instant,
    ) -> Result<BatchOutcome> {
        let t = self.target;
        let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
        let nk = t.keys.len();
        let mut conn = self.db.conn().await?;
        let mut tx = conn
            .begin_with(self.db.dialect.begin_write())
            .await
            .map_err(fail("cannot begin"))?;
        let mut changed = 0u64;
        let mut images = Vec::new();
        if t.call.is_some() {
            for row in &page.rows {
                tx.execute(&t.call_statement(&row[nk..]))
                    .await
                    .map_err(fail("cannot call"))?;
                changed += 1;
            }
        } else if t.insert.is_some() {
            images = insert_rows(self.db, &mut tx, t, &page.rows, nk, batch_no).await?;
            changed = images.len() as u64;
        } else {
            let keys: Vec<Key> = page.rows.iter().map(|r| r[..nk].to_vec()).collect();
            let before = self.before(&mut tx, &keys, batch_no).await?;
            let mut written = Vec::new();
            for (row, key) in page.rows.iter().zip(&keys) {
                let n = tx
                    .execute(&t.update_row(key, &row[nk..]))
                    .await
                    .map_err(fail("cannot write"))?;
                if n > 0 {
                    changed += 1;
                    written.push(key.clone());
                }
            }
            images = self.images_after(&mut tx, &before, &written, batch_no).await?;
        }
        self.store_images(&mut tx, batch_no, &images).await?;
        let cp = Checkpoint::new(
            0,
            batch_no,
            lo,
            upper,
            page.rows.len() as u64,
            changed,
            0,
            self.batch_size,
        );
        checkpoint_and_commit(self.db, tx, self.run_id, cp, t0, Vec::new()).await
    }

    /// The page row by row, each under a savepoint, in one transaction: a
    /// failing row is rolled back alone and becomes a batch of its own with
    /// its failure recorded; the rows between failures are batches too.
    async fn apply_rows(
        &self,
        batch_no: u64,
        lo: Option<&Key>,
        upper: Key,
        page: &Page,
        t0: Instant,
        events: &mut Events,
    ) -> Result<Vec<BatchOutcome>> {
        let t = self.target;
        let fail = |what: &str| Error::db(format!("batch {batch_no}: {what}"));
        let nk = t.keys.len();
        let mut conn = self.db.conn().await?;
        let mut tx = conn
            .begin_with(self.db.dialect.begin_write())
            .await
            .map_err(fail("cannot begin"))?;
        let keys: Vec<Key> = page.rows.iter().map(|r| r[..nk].to_vec()).collect();
        let before = if t.sets.is_empty() {
            Vec::new()
        } else {
            self.before(&mut tx, &keys, batch_no).await?
        };
        let mut results = Vec::with_capacity(page.rows.len());
        for (row, key) in page.rows.iter().zip(&keys) {
            tx.execute(&crate::sql::Query::new(SAVEPOINT))
                .await
                .map_err(fail("cannot set a savepoint"))?;
            let done = async {
                if t.call.is_some() {
                    tx.execute(&t.call_statement(&row[nk..]))
                        .await
                        .map_err(fail("cannot call"))?;
                    Ok((1, Vec::new()))
                } else if t.insert.is_some() {
                    let images = insert_rows(self.db, &mut tx, t, std::slice::from_ref(row), nk, batch_no).await?;
                    Ok((images.len() as u64, images))
                } else {
                    let n = tx
                        .execute(&t.update_row(key, &row[nk..]))
                        .await
                        .map_err(fail("cannot write"))?;
                    let images = if n > 0 {
                        self.images_after(&mut tx, &before, std::slice::from_ref(key), batch_no)
                            .await?
                    } else {
                        Vec::new()
                    };
                    Ok((n.min(1), images))
                }
            }
            .await;
            match done {
                Ok((changed, images)) => {
                    tx.execute(&crate::sql::Query::new(RELEASE))
                        .await
                        .map_err(fail("cannot release the savepoint"))?;
                    results.push(RowResult::Done { changed, images });
                }
                Err(e) if is_row_error(&e) => {
                    tx.execute(&crate::sql::Query::new(ROLLBACK_TO))
                        .await
                        .map_err(fail("cannot roll back to the savepoint"))?;
                    results.push(RowResult::Failed(e));
                }
                Err(e) => return Err(e),
            }
        }
        // Batches: each run of good rows, and each failed row alone.
        let settled: Vec<(Key, Option<u64>)> = results
            .iter()
            .zip(&page.cursors)
            .map(|(res, cursor)| match res {
                RowResult::Done { changed, .. } => (cursor.clone(), Some(*changed)),
                RowResult::Failed(_) => (cursor.clone(), None),
            })
            .collect();
        let (checkpoints, batch_of) = split_batches(batch_no, lo, &settled, &upper, self.batch_size);
        let mut images: std::collections::BTreeMap<u64, Vec<UndoImage>> = Default::default();
        for ((res, no), key) in results.into_iter().zip(&batch_of).zip(&keys) {
            match res {
                RowResult::Done { images: im, .. } => images.entry(*no).or_default().extend(im),
                RowResult::Failed(e) => self.record(&mut tx, *no, key, &e, events).await?,
            }
        }
        for (no, im) in &images {
            self.store_images(&mut tx, *no, im).await?;
        }
        let mut outcomes = Vec::with_capacity(checkpoints.len());
        for cp in checkpoints {
            outcomes.push(self.checkpoint(&mut tx, cp).await?);
        }
        tx.commit().await.map_err(fail("cannot commit"))?;
        if let Some(last) = outcomes.last_mut() {
            last.duration = t0.elapsed();
            last.checkpoint.duration_ms = last.duration.as_millis() as u64;
        }
        Ok(outcomes)
    }

    async fn checkpoint(&self, tx: &mut Tx<'_>, cp: Checkpoint) -> Result<BatchOutcome> {
        state::checkpoint(self.db, tx, self.run_id, &cp)
            .await
            .map_err(Error::db(format!("batch {}: cannot write the checkpoint", cp.batch_no)))?;
        Ok(BatchOutcome {
            checkpoint: cp,
            retries: 0,
            duration: Duration::ZERO,
            written: Vec::new(),
        })
    }

    /// The rows' written columns before the write, locked (undo only).
    async fn before(&self, tx: &mut Tx<'_>, keys: &[Key], batch_no: u64) -> Result<Vec<Vec<Value>>> {
        if !self.undo {
            return Ok(Vec::new());
        }
        read_values(tx, keys, |k| self.target.before_values(k), batch_no).await
    }

    /// Undo images of the rows written, from their values before and now.
    async fn images_after(
        &self,
        tx: &mut Tx<'_>,
        before: &[Vec<Value>],
        written: &[Key],
        batch_no: u64,
    ) -> Result<Vec<UndoImage>> {
        if !self.undo || written.is_empty() {
            return Ok(Vec::new());
        }
        let after = read_values(tx, written, |k| self.target.after_values(k), batch_no).await?;
        Ok(images(self.target, before, &after, self.target.keys.len()))
    }

    async fn store_images(&self, tx: &mut Tx<'_>, batch_no: u64, images: &[UndoImage]) -> Result<()> {
        if !self.undo || images.is_empty() {
            return Ok(());
        }
        state::insert_undo(self.db, tx, self.run_id, batch_no, images)
            .await
            .map_err(Error::db(format!("batch {batch_no}: cannot store the undo images")))
    }

    async fn record(
        &self,
        tx: &mut Tx<'_>,
        batch_no: u64,
        key: &[Value],
        err: &Error,
        events: &mut Events,
    ) -> Result<()> {
        let failure = row_failure(self.run_id, batch_no, key, err, self.redactor);
        state::insert_failure(self.db, tx, &failure)
            .await
            .map_err(Error::db(format!("batch {batch_no}: cannot record the failed row")))?;
        events.push((
            "row_failed",
            json!({ "batch_no": batch_no, "key": key_to_json(key), "error": failure.message, "code": failure.error_code }),
        ));
        Ok(())
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
