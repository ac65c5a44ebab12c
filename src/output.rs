//! What infill prints: human text on a terminal, stable JSON with `--json`.

use infill::run::{DryRunReport, RunSummary, short};
use infill::state::{RunRecord, RunStatus};
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
        "{mark}: job {} wrote {} rows in {} batches ({} skipped by the guard), {:.1}s; run {}",
        s.job,
        thousands(s.rows_changed),
        thousands(s.batches),
        thousands(s.rows_skipped),
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

/// A dry run's findings.
pub fn dry_run(r: &DryRunReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("serialisable"));
        return;
    }
    println!("Dry run of job {} on {}: nothing was written.", r.job, r.target);
    println!("  candidates:    {}", thousands(r.candidates));
    println!(
        "  keys in range: {} -> {} batches of {} keys (first batch; later ones adapt)",
        thousands(r.keys_in_range),
        thousands(r.batches),
        thousands(r.batch_size)
    );
    if r.sample.is_empty() {
        println!("  no candidate rows: nothing to do.");
        return;
    }
    println!("  sample ({} rows, before -> after):", r.sample.len());
    for row in &r.sample {
        let changes: Vec<String> = row
            .before
            .iter()
            .zip(&row.after)
            .map(|((col, b), (_, a))| format!("{col}: {} -> {}", b.display(), a.display()))
            .collect();
        println!("    key {}  {}", key_display(&row.key), changes.join(", "));
    }
}

/// `infill status`.
pub fn status(runs: &[RunRecord], one: bool, json: bool) {
    if json {
        let v = if one && runs.len() == 1 {
            serde_json::to_value(&runs[0])
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
        println!("status    {}", state(r));
        println!("params    {}", r.params);
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
            r.job,
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
