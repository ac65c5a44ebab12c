//! `action.exec`: a real program per row. It reads the row as JSON on stdin
//! and its fields as `ROW_*` variables, in a cleared environment; a non-zero
//! exit or a timeout is a row failure listed by `infill failures`, and
//! `--retry-failed` runs only those rows again; a kill -9 mid-run repeats at
//! most `concurrency` rows; a program that does not exist fails at load,
//! naming the field.

mod common;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::{Backend, TestDb, text};

/// Writes one file per row it is given (`out/<id>.<n>`, n counting the
/// runs of that row): stdin, then some variables. Rows of kind `bad`
/// fail with exit 3 unless `fixed` exists; kind `slow` sleeps.
const SCRIPT: &str = r#"#!/bin/sh
set -eu
body=$(cat)
if [ "$ROW_KIND" = bad ] && [ ! -e fixed ]; then
  echo "refusing key $INFILL_KEY: bad kind" >&2
  exit 3
fi
if [ "$ROW_KIND" = slow ]; then sleep 30; fi
n=1
while [ -e "out/$ROW_ID.$n" ]; do n=$((n + 1)); done
printf '%s\n%s\n%s\n%s\n%s\n' "$body" "$ROW_USER_NAME" "$INFILL_IDEMPOTENCY_KEY" "${TEAM:-unset}" "${DATABASE_URL:-unset}" > "out/$ROW_ID.$n"
"#;

async fn setup(db: &TestDb, n: u64, extra: &str) -> String {
    db.exec(
        "CREATE TABLE sessions (id INTEGER PRIMARY KEY, user_name VARCHAR(40) NOT NULL, score INTEGER, kind VARCHAR(10) NOT NULL)",
    )
    .await;
    let concat = db.pick(
        "'user \"' || i || '\"'",
        "'user \"' || i || '\"'",
        "CONCAT('user \"', i, '\"')",
    );
    db.exec(&format!(
        "INSERT INTO sessions SELECT i, {concat}, i * 3, CASE WHEN i % 25 = 0 THEN 'bad' ELSE 'run' END FROM ({}) s",
        db.series(n)
    ))
    .await;
    let script = db.path().join("notify.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(db.path().join("out")).unwrap();
    db.spec(&format!(
        r#"
[jobs.notify]
source.table = "sessions"
source.key = "id"
action.exec.command = ["./notify.sh"]
action.exec.env = ["TEAM"]
action.exec.timeout = "2s"
concurrency = 4
max_failures = 20
{extra}
"#
    ))
    .to_str()
    .unwrap()
    .to_string()
}

/// Files written per row id.
fn outputs(db: &TestDb) -> HashMap<i64, Vec<String>> {
    let mut by_id: HashMap<i64, Vec<String>> = HashMap::new();
    for e in std::fs::read_dir(db.path().join("out")).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let id: i64 = name.split('.').next().unwrap().parse().unwrap();
        by_id
            .entry(id)
            .or_default()
            .push(std::fs::read_to_string(&path).unwrap());
    }
    by_id
}

/// A key column as JSON: a number, or its text (engines that bind keys as text).
fn key_int(v: &serde_json::Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a key: {v}"))
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

async fn runs_each_row_and_records_failures(db: TestDb) {
    let spec = setup(&db, 100, "").await;
    let out = db
        .infill()
        .env("TEAM", "data")
        .env("DATABASE_URL", "postgres://app:hunter2@db/prod")
        .args(["run", &spec, "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "four rows failed: {}", text(&out));
    let summary = json(&out);
    assert_eq!(summary["rows_changed"], 96, "{summary}");
    let by_id = outputs(&db);
    assert_eq!(by_id.len(), 96);
    let seven = &by_id[&7];
    assert_eq!(seven.len(), 1, "run once");
    let lines: Vec<&str> = seven[0].lines().collect();
    let body: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(body["user_name"], "user \"7\"", "the row as JSON on stdin: {body}");
    assert_eq!(body["score"], 21);
    assert_eq!(lines[1], "user \"7\"", "fields as ROW_* variables");
    assert!(lines[2].starts_with("infill-"), "{}", lines[2]);
    assert_eq!(lines[3], "data", "a listed variable is passed on");
    assert_eq!(lines[4], "unset", "anything else is not");

    let run_id = summary["run_id"].as_str().unwrap().to_string();
    let failures = json(&db.run(&["failures", &run_id, "--json"]));
    let failed: Vec<i64> = failures
        .as_array()
        .unwrap()
        .iter()
        .map(|f| key_int(&f["key"][0]))
        .collect();
    assert_eq!(failed, [25, 50, 75, 100], "{failures}");
    assert_eq!(failures[0]["error_code"], "exit 3");
    let message = failures[0]["message"].as_str().unwrap();
    assert!(
        message.contains("exited with status 3: refusing key [25]: bad kind")
            || message.contains("exited with status 3: refusing key [\"25\"]: bad kind"),
        "{message}"
    );

    // Fixed: --retry-failed runs exactly the four again.
    std::fs::write(db.path().join("fixed"), "").unwrap();
    let out = db.run(&["run", &spec, "--retry-failed", &run_id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["rows_changed"], 4);
    let by_id = outputs(&db);
    assert_eq!(by_id.len(), 100);
    assert!(by_id.values().all(|v| v.len() == 1), "no row ran twice");
}
on_all_backends!(runs_each_row_and_records_failures, runs_each_row_and_records_failures);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_outlives_its_timeout_is_killed_and_recorded() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let spec = setup(&db, 10, "").await;
    db.exec("UPDATE sessions SET kind = 'slow' WHERE id = 3").await;
    let started = std::time::Instant::now();
    let out = db.run(&["run", &spec, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(20), "the sleep was cut short");
    let failures = json(&db.run(&["failures", json(&out)["run_id"].as_str().unwrap(), "--json"]));
    assert_eq!(failures.as_array().unwrap().len(), 1, "{failures}");
    assert_eq!(failures[0]["key"][0], 3);
    assert_eq!(failures[0]["error_code"], "timeout");
    assert_eq!(outputs(&db).len(), 9, "the other rows ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_repeats_at_most_the_running() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let spec = setup(&db, 400, "").await;
    db.exec("UPDATE sessions SET kind = 'run'").await;
    let mut child = db.spawn(&["run", &spec]);
    let start = std::time::Instant::now();
    while std::fs::read_dir(db.path().join("out")).unwrap().count() < 60 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        assert!(child.try_wait().unwrap().is_none(), "ended before it was killed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    let out = db.run(&["run", &spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let by_id = outputs(&db);
    assert_eq!(by_id.len(), 400, "every row ran");
    let twice: Vec<_> = by_id.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.len() <= 4, "at most `concurrency` ran again, got {}", twice.len());
    for (id, runs) in twice {
        let key = |s: &String| s.lines().nth(2).unwrap().to_string();
        assert!(runs.iter().all(|r| key(r) == key(&runs[0])), "row {id} kept its key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_or_a_bad_template_fails_at_load() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let spec = setup(&db, 10, "").await;
    let body = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, body.replace("./notify.sh", "./nope.sh")).unwrap();
    let out = db.run(&["plan", &spec]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = text(&out);
    assert!(
        err.contains("jobs.notify.action.exec.command") && err.contains("nope.sh"),
        "{err}"
    );

    std::fs::write(
        &spec,
        body.replace(
            "action.exec.timeout",
            "action.exec.stdin = '{\"who\": {{ row.nobody }}}'\naction.exec.timeout",
        ),
    )
    .unwrap();
    let out = db.run(&["run", &spec, "--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("jobs.notify.action.exec.stdin"), "{}", text(&out));
    assert_eq!(outputs(&db).len(), 0, "nothing ran");
}
