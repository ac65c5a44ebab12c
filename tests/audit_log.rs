//! The audit log is a contract: one JSONL file per run, `run_start`, one
//! `batch` line per committed batch with its key range and counters, then
//! `run_end`. The SQLite run is snapshotted with the per-run values masked;
//! every engine must tell the same story with the same counts.

mod common;

use serde_json::{Value, json};

use common::{Backend, TestDb, text};

const ROWS: i64 = 1000;
const BATCH: i64 = 250;

const SPEC: &str = r#"
[jobs.label]
source.table = "items"
source.key = "id"
source.where = "note IS NULL AND grp <> :skip"
action.update.note = ":label"
params.skip = { type = "int" }
params.label = { type = "text", default = "filled" }
"#;

/// Fields whose values change from run to run; masked in the snapshot.
const PER_RUN: &[&str] = &[
    "ts",
    "run_id",
    "duration_ms",
    "pid",
    "host",
    "user",
    "spec_sha256",
    "definition_sha256",
    "infill_version",
];

/// The fields of every batch line, exactly.
const BATCH_FIELDS: &[&str] = &[
    "batch_no",
    "batch_size",
    "duration_ms",
    "event",
    "lower",
    "retries",
    "rows_changed",
    "rows_failed",
    "rows_read",
    "rows_skipped",
    "run_id",
    "segment",
    "ts",
    "upper",
];

async fn fixture(db: &TestDb) {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, grp INTEGER NOT NULL, note VARCHAR(40))")
        .await;
    db.exec(&format!(
        "INSERT INTO items (id, grp, note) SELECT i, i % 4, CASE WHEN i % 10 = 0 THEN 'kept' ELSE NULL END FROM ({}) s",
        db.series(ROWS as u64)
    ))
    .await;
}

/// Candidates with keys in `(lo, hi]`, counted by the test itself.
async fn candidates(db: &TestDb, lo: i64, hi: i64) -> i64 {
    db.int(&format!(
        "SELECT COUNT(*) FROM items WHERE note IS NULL AND grp <> 3 AND id > {lo} AND id <= {hi}"
    ))
    .await
}

/// A one-column key as an integer: SQLite keys are JSON numbers, PostgreSQL
/// and MariaDB keys are carried as text.
fn key_int(key: &Value) -> i64 {
    let parts = key.as_array().unwrap_or_else(|| panic!("a key is an array: {key}"));
    assert_eq!(parts.len(), 1, "{key}");
    match &parts[0] {
        Value::Number(n) => n.as_i64().unwrap(),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("{key}")),
        other => panic!("key part {other}"),
    }
}

fn is_sha256(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Runs the job (1000 rows, fixed batches of 250) and checks the whole log
/// against the database; returns the log's lines.
async fn run_and_check(db: &TestDb) -> Vec<Value> {
    fixture(db).await;
    let mut want = Vec::new();
    for b in 0..ROWS / BATCH {
        want.push(candidates(db, b * BATCH, (b + 1) * BATCH).await);
    }
    let total: i64 = want.iter().sum();
    assert!(want.iter().all(|&n| n > 100), "{want:?}");

    let spec = db.spec(SPEC);
    let out = db.run(&[
        "run",
        spec.to_str().unwrap(),
        "--param",
        "skip=3",
        "--batch-size",
        "250",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "succeeded");
    assert_eq!(summary["rows_changed"], total);
    let run_id = summary["run_id"].as_str().unwrap().to_string();
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note = 'filled'").await, total);

    // One file, named after the run, the path the summary reports.
    let file = db.path().join("infill_logs").join(format!("{run_id}.jsonl"));
    assert!(file.exists(), "{}", file.display());
    assert_eq!(summary["audit_log"], file.display().to_string());
    let raw = std::fs::read_to_string(&file).unwrap();
    assert!(raw.ends_with('\n'), "every line is terminated");
    let lines = db.audit(None);
    assert_eq!(lines.len(), raw.lines().count());

    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["run_start", "batch", "batch", "batch", "batch", "run_end"]);

    // Every line: the run's id, a UTC timestamp, in order.
    let mut last_ts = String::new();
    for l in &lines {
        assert_eq!(l["run_id"], run_id.as_str(), "{l}");
        let ts = l["ts"].as_str().unwrap_or_else(|| panic!("ts in {l}"));
        assert!(chrono_like(ts), "{ts}");
        assert!(
            ts >= last_ts.as_str(),
            "timestamps do not go back: {ts} after {last_ts}"
        );
        last_ts = ts.to_string();
    }

    // run_start: who, where, what.
    let start = &lines[0];
    assert_eq!(start["job"], "label");
    assert_eq!(start["env"], Value::Null);
    assert_eq!(start["target"], db.url.as_str(), "the target URL (no password here)");
    assert_eq!(start["params"], json!({ "skip": 3, "label": "filled" }));
    assert_eq!(start["resumed"], false);
    assert_eq!(start["cursor"], Value::Null);
    assert_eq!(key_int(&start["upper"]), ROWS, "the frozen upper bound");
    assert_eq!(start["undo"], true);
    assert_eq!(start["limit"], Value::Null);
    assert_eq!(start["infill_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        start["pid"]
            .as_u64()
            .is_some_and(|p| p > 0 && p != u64::from(std::process::id())),
        "the infill process: {start}"
    );
    assert!(start["host"].as_str().is_some_and(|h| !h.is_empty()), "{start}");
    assert!(start["user"].as_str().is_some_and(|u| !u.is_empty()), "{start}");
    assert!(
        is_sha256(&start["spec_sha256"]) && is_sha256(&start["definition_sha256"]),
        "{start}"
    );
    let state = db
        .texts(&format!(
            "SELECT spec_sha256, definition_sha256, job, status FROM infill_runs WHERE id = '{run_id}'"
        ))
        .await;
    assert_eq!(state.len(), 1);
    assert_eq!(
        start["spec_sha256"].as_str(),
        state[0][0].as_deref(),
        "the same spec digest as the state row"
    );
    assert_eq!(start["definition_sha256"].as_str(), state[0][1].as_deref());
    assert_eq!(state[0][3].as_deref(), Some("succeeded"));

    // Batches: consecutive key ranges, counts as the test computed them,
    // and the same numbers as infill_batches.
    let stored = db
        .texts(&format!(
            "SELECT {}, {}, {} FROM infill_batches WHERE run_id = '{run_id}' ORDER BY batch_no",
            text_of(db, "batch_no"),
            text_of(db, "rows_read"),
            text_of(db, "rows_changed")
        ))
        .await;
    assert_eq!(stored.len(), 4);
    let mut lower = Value::Null;
    for (i, b) in lines[1..5].iter().enumerate() {
        let mut fields: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, BATCH_FIELDS, "{b}");
        let n = i as i64 + 1;
        assert_eq!(b["batch_no"], n);
        if lower.is_null() {
            assert_eq!(b["lower"], Value::Null, "the first batch starts at the beginning");
        } else {
            assert_eq!(
                key_int(&b["lower"]),
                key_int(&lower),
                "each batch starts where the last ended"
            );
        }
        assert_eq!(key_int(&b["upper"]), n * BATCH);
        assert_eq!(b["rows_read"], want[i], "batch {n}");
        assert_eq!(b["rows_changed"], want[i], "batch {n}");
        assert_eq!(b["rows_skipped"], 0);
        assert_eq!(b["batch_size"], BATCH);
        assert!(b["duration_ms"].is_u64(), "{b}");
        assert_eq!(b["retries"], 0);
        let row = &stored[i];
        assert_eq!(row[0].as_deref(), Some(n.to_string().as_str()));
        assert_eq!(
            row[1].as_deref(),
            Some(want[i].to_string().as_str()),
            "infill_batches agrees"
        );
        assert_eq!(
            row[2].as_deref(),
            Some(want[i].to_string().as_str()),
            "infill_batches agrees"
        );
        lower = b["upper"].clone();
    }

    // run_end: the totals.
    let end = &lines[5];
    assert_eq!(end["status"], "succeeded");
    assert_eq!(end["batches"], 4);
    assert_eq!(end["rows_read"], total);
    assert_eq!(end["rows_changed"], total);
    assert_eq!(end["rows_skipped"], 0);
    assert_eq!(end["message"], Value::Null);
    assert!(end["duration_ms"].is_u64(), "{end}");
    lines
}

/// `2026-01-02T03:04:05.123456Z`.
fn chrono_like(ts: &str) -> bool {
    let b = ts.as_bytes();
    ts.len() == 27 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && ts.ends_with('Z')
}

/// A column as text, for [`TestDb::texts`].
fn text_of(db: &TestDb, col: &str) -> String {
    match db.backend {
        Backend::MySql => format!("CAST({col} AS CHAR)"),
        _ => format!("CAST({col} AS TEXT)"),
    }
}

/// The line with per-run values replaced by placeholders and the temp folder by `[DIR]`.
fn masked(db: &TestDb, line: &Value) -> Value {
    let mut m = line.as_object().unwrap().clone();
    for k in PER_RUN {
        if let Some(v) = m.get_mut(*k) {
            *v = Value::String(format!("[{k}]"));
        }
    }
    if let Some(Value::String(t)) = m.get_mut("target") {
        *t = t.replace(&db.path().display().to_string(), "[DIR]");
    }
    Value::Object(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_snapshot_sqlite() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let lines = run_and_check(&db).await;
    let masked: Vec<Value> = lines.iter().map(|l| masked(&db, l)).collect();
    insta::assert_json_snapshot!("sqlite_run", masked);
}

async fn same_story_on_every_engine(db: TestDb) {
    run_and_check(&db).await;
}
on_all_backends!(same_story_on_every_engine, same_story_on_every_engine);

/// A run stopped by `--limit` and continued by a second process appends to
/// the same file: two run_start/run_end pairs, the second resumed from the
/// cursor, and totals that add up.
async fn continued_run_appends_to_the_same_log(db: TestDb) {
    fixture(&db).await;
    let total = candidates(&db, 0, ROWS).await;
    let spec = db.spec(SPEC);
    let spec = spec.to_str().unwrap();
    let first = db.run(&[
        "run",
        spec,
        "--param",
        "skip=3",
        "--batch-size",
        "250",
        "--limit",
        "300",
        "--json",
    ]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let first: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(first["status"], "interrupted");
    assert_eq!(first["rows_changed"], 300);
    let second = db.run(&["run", spec, "--param", "skip=3", "--batch-size", "250", "--json"]);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    let second: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(second["run_id"], first["run_id"]);
    assert_eq!(second["status"], "succeeded");
    assert_eq!(second["rows_changed"], total);

    let lines = db.audit(None);
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    let ends: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == "run_end")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(ends.len(), 2, "{events:?}");
    let (one, two) = lines.split_at(ends[0] + 1);
    assert_eq!(one[0]["event"], "run_start");
    assert_eq!(one[0]["resumed"], false);
    assert_eq!(one[0]["limit"], 300);
    let end1 = one.last().unwrap();
    assert_eq!(end1["status"], "interrupted");
    assert_eq!(end1["rows_changed"], 300);
    assert!(
        end1["message"].as_str().is_some_and(|m| m.contains("--limit 300")),
        "{end1}"
    );
    assert_eq!(two[0]["event"], "run_start");
    assert_eq!(two[0]["resumed"], true);
    // The second process starts from the last committed batch's upper key.
    let last_batch = one.iter().rev().find(|l| l["event"] == "batch").unwrap();
    assert_eq!(key_int(&two[0]["cursor"]), key_int(&last_batch["upper"]));
    assert_eq!(key_int(&two[0]["upper"]), ROWS, "the same frozen upper bound");
    assert_eq!(two.last().unwrap()["status"], "succeeded");
    assert_eq!(
        two.last().unwrap()["rows_changed"],
        total,
        "run_end counts the whole run"
    );
    // Batch numbers continue; the batch lines add up to the total.
    let batches: Vec<&Value> = lines.iter().filter(|l| l["event"] == "batch").collect();
    for (i, b) in batches.iter().enumerate() {
        assert_eq!(b["batch_no"], i as i64 + 1, "{b}");
    }
    assert_eq!(
        batches.iter().map(|b| b["rows_changed"].as_i64().unwrap()).sum::<i64>(),
        total
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note = 'filled'").await, total);
}
on_all_backends!(
    continued_run_appends_to_the_same_log,
    continued_run_appends_to_the_same_log
);
