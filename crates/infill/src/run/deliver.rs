//! The run loop of `action.http` and `action.exec`: records are sent (or
//! run) in source order with at most `concurrency` in flight and at the
//! job's `rate`, and the checkpoint is the cursor below which every record
//! is settled (a 2xx or a zero exit, or dead-lettered in `infill_failures`).
//!
//! A record is sent only while it lies within `concurrency` records of
//! the *committed* checkpoint. So after a kill -9, the records sent again
//! are at most `concurrency`: those in flight or settled since the last
//! commit, each with the same Idempotency-Key as before. The checkpoint is
//! committed whenever it moves, which groups the records settled since
//! into one transaction of the local state database.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::json;

use super::{BatchReport, End, Event, Looped, RunRequest};
use crate::dialect::Db;
use crate::error::{Error, Result};
use crate::http::{Delivery, Renderer};
use crate::lock::JobLock;
use crate::source::Reader;
use crate::state::{self, RunRecord};
use crate::value::{Key, Value, key_to_json};
use futures_util::future::BoxFuture;

/// The first retry's wait when the receiver names none.
const BACKOFF_BASE: Duration = Duration::from_millis(200);

/// A record sent and not yet below the checkpoint.
struct Slot {
    key: Key,
    /// The source's cursor just after this record.
    cursor: Key,
    outcome: Option<Delivery>,
}

/// What is done with each record.
enum Action<'a> {
    Http {
        renderer: Renderer,
        client: reqwest::Client,
        spec: &'a crate::spec::HttpSpec,
        target: &'a crate::spec::HttpTarget,
    },
    Exec {
        renderer: Renderer,
        spec: &'a crate::spec::ExecSpec,
    },
}

impl<'a> Action<'a> {
    fn of(r: &'a crate::spec::ResolvedJob) -> Result<Action<'a>> {
        let renderer = Renderer::of_job(&r.job)?;
        match (&r.job.http, &r.http, &r.job.exec, renderer) {
            (Some(spec), Some(target), _, Some(renderer)) => {
                let client = reqwest::Client::builder()
                    .timeout(spec.timeout)
                    .build()
                    .map_err(|e| Error::CannotProceed(format!("cannot set up the HTTP client: {e}")))?;
                Ok(Action::Http {
                    renderer,
                    client,
                    spec,
                    target,
                })
            }
            (_, _, Some(spec), Some(renderer)) => Ok(Action::Exec { renderer, spec }),
            _ => Err(Error::Usage("not an http or exec job".into())),
        }
    }

    /// The record's request or command, started when polled.
    fn start(
        &self,
        r: &crate::spec::ResolvedJob,
        run_id: &str,
        fields: &[crate::dialect::Column],
        row: &[Value],
    ) -> Result<BoxFuture<'static, Delivery>> {
        Ok(match self {
            Action::Http {
                renderer,
                client,
                spec,
                target,
            } => {
                let request = crate::http::render_request(renderer, r, spec, target, fields, row, false)?;
                let (client, attempts) = (client.clone(), spec.max_attempts);
                async move { crate::http::send(&client, &request, attempts, BACKOFF_BASE, tokio::time::sleep).await }
                    .boxed()
            }
            Action::Exec { renderer, spec } => {
                crate::exec::run(crate::exec::prepare(spec, renderer, r, run_id, fields, row, false)?).boxed()
            }
        })
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn deliver(
    db: &Db,
    req: &RunRequest,
    obs: &dyn super::Observer,
    stop: &super::Stop,
    lock: &mut JobLock,
    run: &RunRecord,
    batch_size: u64,
    audit: &mut crate::audit::AuditLog,
    looped: &mut Looped,
    reader: &mut Reader,
    only: Option<&[Key]>,
) -> Result<End> {
    let r = &req.job;
    let action = Action::of(r)?;
    // `--retry-failed`: only these records (keys as JSON) are sent again.
    let only: Option<std::collections::HashSet<String>> =
        only.map(|keys| keys.iter().map(|k| key_to_json(k).to_string()).collect());
    let mut between = super::Between::new(db, req, run, obs, stop)?;
    let limiter = |s: &crate::spec::Settings| s.rate.map(|rate| governor::RateLimiter::direct(rate_quota(rate)));
    let mut limit = limiter(&between.settings);
    let mut limit_rate = between.settings.rate;
    reader.set_upper(run.upper.clone());
    // The committed checkpoint, and where the reader stands.
    let mut committed = run.cursor.clone();
    let mut read_at = run.cursor.clone();
    let mut source_done = false;
    let mut buffer: VecDeque<(Vec<Value>, Key)> = VecDeque::new();
    let mut window: VecDeque<Slot> = VecDeque::new();
    // Sequence number of window[0].
    let mut base_seq = 0u64;
    let mut next_seq = 0u64;
    let mut inflight = FuturesUnordered::new();
    let mut sent_this_session = 0u64;
    let mut stopping: Option<End> = None;
    loop {
        if stopping.is_none() {
            stopping = between.check(lock, audit).await?;
            // `infill set rate=...`: a new bucket at the new rate.
            if between.settings.rate != limit_rate {
                limit = limiter(&between.settings);
                limit_rate = between.settings.rate;
            }
        }
        let concurrency = between.settings.concurrency.max(1) as usize;
        // Send while the window allows.
        while stopping.is_none() && window.len() < concurrency {
            if between.stop_after.is_some_and(|l| sent_this_session >= l) {
                stopping = Some(End::Limit);
                break;
            }
            if buffer.is_empty() && !source_done {
                let n = batch_size.max(concurrency as u64);
                let page = super::read_retrying(audit, r, looped.batches + 1, async || {
                    reader.page(read_at.as_ref(), n).await
                })
                .await?;
                source_done = page.end || page.cursor.is_none();
                if page.cursor.is_some() {
                    read_at = page.cursor.clone();
                }
                buffer.extend(page.rows.into_iter().zip(page.cursors));
            }
            let Some((row, cursor)) = buffer.pop_front() else { break };
            let nk = r.job.key.len();
            if only
                .as_ref()
                .is_some_and(|o| !o.contains(&key_to_json(&row[..nk]).to_string()))
            {
                continue;
            }
            if let Some(l) = &limit {
                l.until_ready().await;
            }
            let started = action.start(r, &run.id, &reader.fields, &row)?;
            window.push_back(Slot {
                key: row[..nk].to_vec(),
                cursor,
                outcome: None,
            });
            let seq = next_seq;
            next_seq += 1;
            sent_this_session += 1;
            inflight.push(started.map(move |d| (seq, d)));
        }
        if inflight.is_empty() {
            // Nothing in flight: the window is settled (or empty).
            let upto = if stopping.is_none() && source_done && buffer.is_empty() {
                read_at.clone()
            } else {
                window.back().map(|s| s.cursor.clone()).or(committed.clone())
            };
            settle(
                db,
                r,
                run,
                audit,
                looped,
                obs,
                &mut window,
                &mut committed,
                upto,
                batch_size,
            )
            .await?;
            if let Some(end) = stopping {
                return Ok(end);
            }
            if source_done && buffer.is_empty() {
                return Ok(End::Done);
            }
            continue;
        }
        let first = tokio::select! {
            d = inflight.next() => d,
            _ = stop.until(2) => return Ok(End::Aborted),
        };
        let mut done = Vec::from_iter(first);
        while let Some(Some(d)) = inflight.next().now_or_never() {
            done.push(d);
        }
        for (seq, d) in done {
            window[(seq - base_seq) as usize].outcome = Some(d);
        }
        // Move the checkpoint over the settled records at the front.
        let settled = window.iter().take_while(|s| s.outcome.is_some()).count();
        if settled > 0 {
            let upto = window[settled - 1].cursor.clone();
            let passed: VecDeque<Slot> = window.drain(..settled).collect();
            base_seq += settled as u64;
            let mut passed = passed;
            settle(
                db,
                r,
                run,
                audit,
                looped,
                obs,
                &mut passed,
                &mut committed,
                Some(upto),
                batch_size,
            )
            .await?;
            if super::too_many_failures(between.settings.max_failures, looped.rows_failed, looped.rows_read) {
                return Err(Error::RowsFailed(format!(
                    "{} records failed, more than max_failures allows; the run stopped. `infill failures {}` lists them",
                    looped.rows_failed,
                    super::short(&run.id)
                )));
            }
        }
    }
}

/// Commits the settled records at the front of `slots` (all of them) and
/// the checkpoint `upto`: a batch per run of delivered records, a batch
/// per failed one with its dead letter.
#[allow(clippy::too_many_arguments)]
async fn settle(
    db: &Db,
    r: &crate::spec::ResolvedJob,
    run: &RunRecord,
    audit: &mut crate::audit::AuditLog,
    looped: &mut Looped,
    obs: &dyn super::Observer,
    slots: &mut VecDeque<Slot>,
    committed: &mut Option<Key>,
    upto: Option<Key>,
    batch_size: u64,
) -> Result<()> {
    let Some(upto) = upto else { return Ok(()) };
    if slots.is_empty() && committed.as_ref() == Some(&upto) {
        return Ok(());
    }
    let t0 = Instant::now();
    let fail = |what: &str| Error::db(format!("cannot record the deliveries: {what}"));
    let mut conn = db.conn().await?;
    let mut tx = conn.begin_with(db.dialect.begin_write()).await.map_err(fail("begin"))?;
    let settled: Vec<(Key, Option<u64>)> = slots
        .iter()
        .map(|slot| match slot.outcome {
            Some(Delivery::Delivered) => (slot.cursor.clone(), Some(1)),
            Some(Delivery::Failed { .. }) => (slot.cursor.clone(), None),
            None => unreachable!("only settled records are committed"),
        })
        .collect();
    let (mut checkpoints, batch_of) =
        super::split_batches(looped.batches + 1, committed.as_ref(), &settled, &upto, batch_size);
    let mut lines = Vec::new();
    for (slot, no) in slots.drain(..).zip(batch_of) {
        let Some(Delivery::Failed { code, message }) = slot.outcome else {
            continue;
        };
        let message = r.redactor.mask(&message);
        let failure = state::Failure {
            run_id: run.id.clone(),
            batch_no: no,
            key: key_to_json(&slot.key),
            error_code: code,
            message: message.clone(),
            failed_at: state::now(),
        };
        state::insert_failure(db, &mut tx, &failure)
            .await
            .map_err(fail("the dead letter"))?;
        lines.push(json!({ "batch_no": no, "key": failure.key, "error": message, "code": failure.error_code }));
    }
    for cp in &mut checkpoints {
        cp.duration_ms = t0.elapsed().as_millis() as u64;
        state::checkpoint(db, &mut tx, &run.id, cp)
            .await
            .map_err(fail("the checkpoint"))?;
    }
    tx.commit().await.map_err(fail("commit"))?;
    *committed = Some(upto);
    for line in lines {
        audit.write("row_failed", line)?;
    }
    for cp in checkpoints {
        let report = BatchReport {
            batch: cp,
            retries: 0,
            busy_sessions: 0,
            rest_ms: 0,
        };
        audit.write("batch", serde_json::to_value(&report).expect("serialisable"))?;
        looped.add(&report.batch);
        obs.on_event(&Event::Batch(&report));
    }
    Ok(())
}

/// How late a request may start without pushing every later one back. With
/// room for one request only, each late wakeup is lost for good: 0.1 ms
/// per request is 2% at 200/s. It is also the burst allowed at the start.
const RATE_SLACK: Duration = Duration::from_millis(50);

/// The request limiter's quota for `rate`: that rate in the long run, with
/// [`RATE_SLACK`] of room.
fn rate_quota(rate: crate::spec::Rate) -> governor::Quota {
    let period = Duration::from_secs_f64(1.0 / rate.per_second.max(1e-6));
    let room = (RATE_SLACK.as_secs_f64() * rate.per_second)
        .floor()
        .clamp(1.0, u32::MAX as f64) as u32;
    governor::Quota::with_period(period)
        .expect("a positive period")
        .allow_burst(std::num::NonZeroU32::new(room).expect("at least 1"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    /// Requests a sender gets through in `secs` (on a fake clock) when each
    /// of its waits ends `late`.
    fn sent(quota: governor::Quota, secs: u64, late: Duration) -> u64 {
        let clock = FakeRelativeClock::default();
        let limiter = governor::RateLimiter::direct_with_clock(quota, clock.clone());
        let (mut elapsed, mut n) = (Duration::ZERO, 0);
        while elapsed < Duration::from_secs(secs) {
            match limiter.check() {
                Ok(()) => n += 1,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(&clock)) + late;
                    clock.advance(wait);
                    elapsed += wait;
                }
            }
        }
        n
    }

    #[test]
    fn late_wakeups_do_not_slow_the_rate() {
        let rate = crate::spec::Rate::parse("200/s").unwrap();
        let late = Duration::from_micros(100);
        // 6,000 requests in 30 s, plus the 10 of the start's room.
        let n = sent(rate_quota(rate), 30, late);
        assert!((6_000..=6_011).contains(&n), "{n}");
        // A bucket of one loses every late wakeup: 2% short.
        let one = governor::Quota::with_period(Duration::from_millis(5)).unwrap();
        let n = sent(one, 30, late);
        assert!(n < 5_900, "{n}");
        // A slow rate keeps a room of one request, and its pace.
        let n = sent(rate_quota(crate::spec::Rate::parse("2/s").unwrap()), 30, Duration::ZERO);
        assert!((60..=61).contains(&n), "{n}");
    }
}
