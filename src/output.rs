//! What infill prints: human text on a terminal, stable JSON with `--json`.

use infill::approval::Approval;
use infill::plan::{Counted, JobPlan, Plan};
use infill::run::{RunSummary, short};
use infill::spec::Expect;
use infill::state::{RunRecord, RunStatus};
use infill::undo::UndoSummary;
use infill::value::key_display;

/// An error with its causes, one per line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(&format!("\n  caused by: {text}"));
        }
        source = s.source();
    }
    out
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The end of a run.
pub fn summary(s: &RunSummary, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).expect("serialisable"));
        return;
    }
    let mark = if s.status == RunStatus::Succeeded {
        "done"
    } else {
        s.status.as_str()
    };
    println!(
        "{mark}: job {} wrote {} rows in {} batches ({} skipped by the guard{}), {:.1}s; run {}",
        s.job,
        thousands(s.rows_changed),
        thousands(s.batches),
        thousands(s.rows_skipped),
        if s.rows_failed > 0 {
            format!(", {} failed", thousands(s.rows_failed))
        } else {
            String::new()
        },
        s.duration_ms as f64 / 1000.0,
        short(&s.run_id)
    );
    for c in &s.checks {
        println!("  {}", infill::verify::describe(c));
    }
    if let Some(m) = &s.message {
        println!("  {m}");
    }
    println!("  audit log: {}", s.audit_log);
}

/// `infill failures RUN`.
pub fn failures(run: &RunRecord, list: &[infill::state::Failure], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(list).expect("serialisable"));
        return;
    }
    if list.is_empty() {
        println!("run {} ({}) has no failed rows", short(&run.id), run.job);
        return;
    }
    println!("run {} ({}): {} failed rows", short(&run.id), run.job, list.len());
    for f in list {
        let code = f.error_code.as_deref().map(|c| format!(" [{c}]")).unwrap_or_default();
        println!("  key {}{code}: {}", f.key, f.message);
    }
}

/// Check results (`infill verify`).
pub fn checks(results: &[infill::verify::CheckResult], json: bool) {
    if json {
        let passed = results.iter().all(|c| c.passed);
        let v = serde_json::json!({ "passed": passed, "checks": results });
        println!("{}", serde_json::to_string_pretty(&v).expect("serialisable"));
        return;
    }
    if results.is_empty() {
        println!("no checks defined ([[jobs.NAME.checks]] in the spec)");
        return;
    }
    for c in results {
        println!("{}", infill::verify::describe(c));
    }
    let failed = results.iter().filter(|c| !c.passed).count();
    if failed == 0 {
        println!("all {} checks passed", results.len());
    } else {
        println!("{failed} of {} checks FAILED", results.len());
    }
}

/// A dry run's findings: the plan of one job.
pub fn dry_run(p: &JobPlan, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(p).expect("serialisable"));
        return;
    }
    println!("Dry run of job {} on {}: nothing was written.", p.job, p.target);
    job_plan(p);
}

/// `infill plan`.
pub fn plan(p: &Plan, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(p).expect("serialisable"));
        return;
    }
    let env = p.env.as_ref().map(|e| format!(", environment {e}")).unwrap_or_default();
    println!(
        "Plan of {}{env}: {} job{}, fingerprint {}",
        p.spec.display(),
        p.jobs.len(),
        if p.jobs.len() == 1 { "" } else { "s" },
        &p.fingerprint[..16]
    );
    println!("Read-only: nothing was written. Counted at {}.", p.created_at);
    for j in &p.jobs {
        println!("\njob {} on {}", j.job, j.target);
        job_plan(j);
    }
}

/// The body of a job's plan, shared by `plan` and `run --dry-run`.
fn job_plan(p: &JobPlan) {
    let row = |label: &str, text: String| println!("  {label:<12}{text}");
    if let Some(d) = &p.description {
        row("about", d.clone());
    }
    row("table", format!("{} (key {})", p.table, p.key.join(", ")));
    if p.params.as_object().is_some_and(|m| !m.is_empty()) {
        row("params", infill::plan::params_text(&p.params));
    }
    if !p.depends_on.is_empty() {
        row(
            "after",
            format!(
                "{} (its counts are as of now, before those run)",
                p.depends_on.join(", ")
            ),
        );
    }
    let approx = if p.counted == Counted::Estimate { "~" } else { "" };
    row(
        "candidates",
        format!(
            "{approx}{}{}",
            thousands(p.candidates),
            if p.counted == Counted::Estimate {
                " (the planner's estimate)"
            } else {
                ""
            }
        ),
    );
    if !p.categories.is_empty() {
        let width = p.categories.iter().map(|c| c.name.len()).max().unwrap_or(0).max(15);
        println!("  categories  (they may overlap)");
        for c in &p.categories {
            println!(
                "    {:<width$} {:>12}   {}",
                c.name,
                format!("{approx}{}", thousands(c.rows)),
                c.predicate
            );
        }
        if let Some(n) = p.uncategorised {
            println!("    {:<width$} {:>12}", "(in none)", thousands(n));
        }
    }
    if !p.priority.is_empty() {
        println!("  priority    (these first, in order; then the rest)");
        let mut rest = p.candidates;
        for (i, s) in p.priority.iter().enumerate() {
            println!("    {}. {:>12}   {}", i + 1, thousands(s.rows), s.predicate);
            rest = rest.saturating_sub(s.rows);
        }
        println!("    -> {:>12}   the rest", thousands(rest));
    }
    if p.sample.is_empty() {
        row("sample", "no candidate rows: nothing to do".into());
    } else {
        // A query, diff or file source shows the fields its rows bind.
        let fields_only = p.sample.iter().all(|s| s.before.is_empty());
        let heading = if fields_only {
            "fields the action binds"
        } else {
            "before -> after"
        };
        println!("  sample      ({} rows, {heading})", p.sample.len());
        for s in &p.sample {
            let changes: Vec<String> = if fields_only {
                s.after.iter().map(|(f, v)| format!("{f} = {}", v.display())).collect()
            } else {
                s.before
                    .iter()
                    .zip(&s.after)
                    .map(|((col, b), (_, a))| format!("{col}: {} -> {}", b.display(), a.display()))
                    .collect()
            };
            println!("    key {}  {}", key_display(&s.key), changes.join(", "));
        }
    }
    for (i, req) in p.requests.iter().enumerate() {
        if i == 0 {
            println!("  requests    (the first {}, not sent)", p.requests.len());
        }
        println!("    {} {}", req.method, req.url);
        for (k, v) in &req.headers {
            println!("      {k}: {v}");
        }
        for line in req.body.lines() {
            println!("      | {line}");
        }
    }
    println!("  writes");
    for w in &p.writes {
        println!(
            "    {:<24} {:>12}   {}",
            w.table,
            format!("{approx}{}", thousands(w.rows)),
            w.what
        );
    }
    row(
        "batches",
        format!(
            "{approx}{} over {approx}{} keys in range, {} keys per batch at first (later ones adapt unless fixed)",
            thousands(p.batches),
            thousands(p.keys_in_range),
            thousands(p.batch_size)
        ),
    );
    let pace = match (p.estimated_seconds, p.rate_per_second) {
        (Some(s), Some(r)) => format!("at least {} under the rate limit of {r}/s and pauses", seconds(s)),
        (Some(s), None) => format!("at least {} of pauses between batches", seconds(s)),
        _ => "unthrottled: the server sets the pace (set rate = \"N/s\" to bound it)".into(),
    };
    let rest = match p.busy_rest {
        Some(c) => format!(
            "; after a batch during which the application was at work, a rest of {c}x its duration (busy_sleep_coef)"
        ),
        None => String::new(),
    };
    row("duration", format!("{pace}{rest}"));
    for c in &p.checks {
        row("check", format!("{} must be {}", c.name, expect_text(&c.expect)));
    }
    row("fingerprint", p.fingerprint.sha256.clone());
}

/// Seconds between two state timestamps.
fn elapsed(from: &str, to: &str) -> Option<f64> {
    let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
    Some((t(to)? - t(from)?).num_milliseconds() as f64 / 1000.0)
}

fn seconds(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

fn expect_text(e: &Expect) -> String {
    match e {
        Expect::Equal(v) => format!("{v}"),
        Expect::Range { min, max } => match (min, max) {
            (Some(a), Some(b)) => format!("between {a} and {b}"),
            (Some(a), None) => format!("at least {a}"),
            (None, Some(b)) => format!("at most {b}"),
            (None, None) => "anything".into(),
        },
    }
}

/// `infill undo`.
pub fn undone(u: &UndoSummary, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(u).expect("serialisable"));
        return;
    }
    let (head, verb) = if u.dry_run {
        ("dry run (nothing written)", "would restore")
    } else {
        match u.status {
            Some(RunStatus::Succeeded) if u.conflicts == 0 => ("undone", "restored"),
            Some(RunStatus::Succeeded) => ("undone, with conflicts", "restored"),
            Some(s) => (s.as_str(), "restored"),
            None => ("", "restored"),
        }
    };
    println!(
        "{head}: run {} of job {}: {verb} {} of {} rows, {} already as before, {} changed since (kept){}; {:.1}s",
        short(&u.undo_of),
        u.job,
        thousands(u.restored),
        thousands(u.images),
        thousands(u.already),
        thousands(u.conflicts),
        u.run_id
            .as_deref()
            .map(|id| format!("; undo run {}", short(id)))
            .unwrap_or_default(),
        u.duration_ms as f64 / 1000.0
    );
    if u.conflicts > 0 {
        println!("  rows changed since the run wrote them, left as they are:");
        for c in &u.conflict_rows {
            match (&c.column, &c.reason) {
                (_, Some(why)) => println!("    key {}  (inserted row kept: {why})", c.key),
                (Some(col), None) => println!("    key {}  ({col} changed)", c.key),
                (None, None) => println!("    key {}  (the row is gone)", c.key),
            }
        }
        if u.conflicts as usize > u.conflict_rows.len() {
            println!("    ... {} more", u.conflicts as usize - u.conflict_rows.len());
        }
    }
    if let Some(log) = &u.audit_log {
        println!("  audit log: {log}");
    }
}

/// `infill approve`.
pub fn approved(list: &[Approval], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(list).expect("serialisable"));
        return;
    }
    for a in list {
        let jobs: Vec<String> = a
            .jobs
            .iter()
            .map(|j| format!("{} ({} candidates)", j.job, thousands(j.candidates)))
            .collect();
        println!(
            "approved by {} at {}: {} (plan {}, approval {} in database `{}`)",
            a.approved_by,
            a.approved_at,
            jobs.join(", "),
            &a.fingerprint[..16],
            short(&a.id),
            a.database
        );
    }
}

/// `infill status`.
pub fn status(
    runs: &[RunRecord],
    one: bool,
    json: bool,
    progress: Option<&infill::ops::Progress>,
    kept: &std::collections::BTreeMap<String, String>,
) {
    if json {
        let v = if one && runs.len() == 1 {
            let mut v = serde_json::to_value(&runs[0]).expect("serialisable");
            v["progress"] = serde_json::to_value(progress).expect("serialisable");
            v["settings"] = serde_json::to_value(kept).expect("serialisable");
            Ok(v)
        } else {
            serde_json::to_value(runs)
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&v.expect("serialisable")).expect("serialisable")
        );
        return;
    }
    if runs.is_empty() {
        println!("no runs yet");
        return;
    }
    let state = |r: &RunRecord| {
        if r.status == RunStatus::Running && r.process_gone() {
            "interrupted (process gone)".to_string()
        } else {
            r.status.as_str().to_string()
        }
    };
    if one {
        let r = &runs[0];
        println!("run       {}", r.id);
        println!("job       {}", r.job);
        if let Some(of) = &r.undo_of {
            println!("undo of   {of}");
        }
        println!("status    {}", state(r));
        println!("params    {}", infill::plan::params_text(&r.params));
        if let Some(g) = &r.group_id {
            println!("group     {g}");
        }
        if let Some(env) = &r.env {
            println!("env       {env}");
        }
        println!(
            "progress  {} batches, {} rows read, {} written, {} skipped by the guard",
            thousands(r.batches),
            thousands(r.rows_read),
            thousands(r.rows_changed),
            thousands(r.rows_skipped)
        );
        println!(
            "cursor    {} of {}",
            r.cursor
                .as_ref()
                .map(|k| key_display(k))
                .unwrap_or_else(|| "(start)".into()),
            r.upper
                .as_ref()
                .map(|k| key_display(k))
                .unwrap_or_else(|| "(empty table)".into())
        );
        println!("batch     {} keys", thousands(r.batch_size));
        if let Some(secs) = elapsed(&r.started_at, &r.updated_at).filter(|s| *s > 0.0) {
            println!(
                "speed     {:.0} rows/s written, {:.0} read (over {})",
                r.rows_changed as f64 / secs,
                r.rows_read as f64 / secs,
                seconds(secs)
            );
        }
        if let Some(p) = progress {
            let approx = if p.estimated { "~" } else { "" };
            let eta = p
                .eta_seconds
                .map(|s| format!(", done in about {}", seconds(s)))
                .unwrap_or_default();
            println!(
                "left      {approx}{} keys of the range ({} walked){eta}",
                thousands(p.keys_left),
                thousands(p.keys_done)
            );
        }
        if !kept.is_empty() {
            let list: Vec<String> = kept.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "settings  {} (kept with the run: `infill set` or the command line)",
                list.join(" ")
            );
        }
        if r.rows_failed > 0 {
            println!(
                "failed    {} rows (`infill failures {}` lists them)",
                thousands(r.rows_failed),
                short(&r.id)
            );
        }
        println!(
            "undo      {}",
            if r.undo_enabled {
                "images kept"
            } else {
                "off (undo = false)"
            }
        );
        println!("by        {} on {} (pid {})", r.os_user, r.host, r.pid);
        println!("started   {}", r.started_at);
        println!("updated   {}", r.updated_at);
        if let Some(f) = &r.finished_at {
            println!("finished  {f}");
        }
        if let Some(m) = &r.message {
            println!("message   {m}");
        }
        return;
    }
    println!(
        "{:<10} {:<24} {:<27} {:>9} {:>12}  UPDATED",
        "RUN", "JOB", "STATUS", "BATCHES", "WRITTEN"
    );
    for r in runs {
        println!(
            "{:<10} {:<24} {:<27} {:>9} {:>12}  {}",
            short(&r.id),
            match &r.undo_of {
                Some(_) => format!("undo {}", r.job),
                None => r.job.clone(),
            },
            state(r),
            thousands(r.batches),
            thousands(r.rows_changed),
            r.updated_at
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_groups_digits() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(1234567), "1,234,567");
        assert_eq!(super::thousands(100), "100");
    }
}
