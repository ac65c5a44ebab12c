//! A row that fails is isolated and recorded, and the run goes on: a CHECK
//! constraint rejects 37 chosen rows; bisection finds exactly those, every
//! other candidate is written once, and `max_failures` decides whether the
//! run stops.

mod common;

use common::{TestDb, text};

const ROWS: u64 = 20_000;

/// Rows whose id is a multiple of 537 are poison: the constraint rejects a value for them.
async fn schema(db: &TestDb) -> i64 {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, poison INTEGER NOT NULL, val BIGINT, CHECK (poison = 0 OR val IS NULL))").await;
    db.exec(&format!(
        "INSERT INTO items (id, poison, val) SELECT i, CASE WHEN i % 537 = 0 THEN 1 ELSE 0 END, NULL FROM ({}) s",
        db.series(ROWS)
    ))
    .await;
    db.int("SELECT COUNT(*) FROM items WHERE poison = 1").await
}

fn spec(db: &TestDb, max_failures: &str) -> String {
    db.spec(&format!(
        "[jobs.fill]\nsource.table = \"items\"\nsource.key = \"id\"\nsource.where = \"val IS NULL\"\naction.update.val = \"id * 3\"\nmax_failures = {max_failures}\n"
    ))
    .to_str()
    .unwrap()
    .to_string()
}

async fn poison_rows_are_isolated(db: TestDb) {
    let poison = schema(&db).await;
    assert_eq!(poison, 37, "fixture");
    let spec = spec(&db, "100");
    let out = db.run(&["run", &spec, "--batch-size", "1000", "--json"]);
    assert_eq!(out.status.code(), Some(1), "rows failed: exit 1\n{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("37 rows failed (within max_failures)"), "{stderr}");
    // The JSON summary says the job finished, and how many rows failed.
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "succeeded", "{summary}");
    assert_eq!(summary["rows_failed"], 37, "{summary}");

    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE poison = 0 AND (val IS NULL OR val <> id * 3)")
            .await,
        0,
        "every good row written"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE poison = 1 AND val IS NOT NULL")
            .await,
        0
    );
    let failed: Vec<i64> = db
        .texts("SELECT row_key FROM infill_failures ORDER BY batch_no")
        .await
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(r[0].as_deref().unwrap()).unwrap();
            v[0].as_i64()
                .or_else(|| v[0].as_str().map(|s| s.parse().unwrap()))
                .unwrap()
        })
        .collect();
    let expected: Vec<i64> = (1..=ROWS as i64).filter(|i| i % 537 == 0).collect();
    assert_eq!(failed, expected, "exactly the poison rows, in key order");
    assert_eq!(db.int("SELECT rows_failed FROM infill_runs").await, 37);
    assert_eq!(db.int("SELECT rows_changed FROM infill_runs").await, ROWS as i64 - 37);

    let id = db.texts("SELECT id FROM infill_runs").await[0][0].clone().unwrap();
    let out = db.run(&["failures", &id[..8], "--spec", &spec, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 37);
    let message = list[0]["message"].as_str().unwrap().to_lowercase();
    assert!(
        message.contains("check") || message.contains("constraint"),
        "names the constraint: {message}"
    );
    let log = db.audit(None);
    assert_eq!(log.iter().filter(|l| l["event"] == "row_failed").count(), 37);

    // Fixed data: a retry writes exactly the rows that failed, as a new run.
    db.exec("UPDATE items SET poison = 0 WHERE id IN (537, 1074)").await;
    let out = db.run(&["run", "--spec", &spec, "--retry-failed", &id[..13], "--json"]);
    assert_eq!(out.status.code(), Some(1), "35 still fail: {}", text(&out));
    let retry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(retry["rows_changed"], 2, "{retry}");
    assert_eq!(retry["rows_read"], 37, "only the failed rows are read: {retry}");
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE val IS NULL").await,
        35,
        "the two fixed rows are written"
    );
    let retry_id = retry["run_id"].as_str().unwrap().to_string();
    assert_eq!(
        db.int(&format!(
            "SELECT COUNT(*) FROM infill_failures WHERE run_id = '{retry_id}'"
        ))
        .await,
        35
    );

    // The retry as a kill after its last checkpoint would leave it: resumed,
    // it tries no key again (no failure recorded twice), and a retry of
    // the retry tries each of its 35 once.
    db.exec(&format!(
        "UPDATE infill_runs SET status = 'interrupted' WHERE id = '{retry_id}'"
    ))
    .await;
    let out = db.run(&["resume", &retry_id[..13], "--spec", &spec, "--json"]);
    assert_eq!(out.status.code(), Some(1), "its rows failed: {}", text(&out));
    let resumed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resumed["run_id"], retry["run_id"]);
    assert_eq!(resumed["rows_failed"], 35, "{resumed}");
    assert_eq!(
        db.int(&format!(
            "SELECT COUNT(*) FROM infill_failures WHERE run_id = '{retry_id}'"
        ))
        .await,
        35
    );
    let out = db.run(&["run", "--spec", &spec, "--retry-failed", &retry_id[..13], "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["rows_read"], 35, "{again}");
}
on_all_backends!(poison_rows_are_isolated, poison_rows_are_isolated);

async fn max_failures_stops_the_run(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, "5");
    let out = db.run(&["run", &spec, "--batch-size", "1000"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("more than max_failures allows; the run stopped"),
        "{stderr}"
    );
    let failed = db.int("SELECT COUNT(*) FROM infill_failures").await;
    assert!((6..=7).contains(&failed), "stops once past 5 ({failed})");
    let status = db.texts("SELECT status FROM infill_runs").await;
    assert_eq!(status[0][0].as_deref(), Some("failed"));
    // Rows after the stop are untouched; rows before it are written.
    assert!(
        db.int("SELECT COUNT(*) FROM items WHERE val IS NULL AND poison = 0")
            .await
            > 0
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE poison = 1 AND val IS NOT NULL")
            .await,
        0
    );
}
on_all_backends!(max_failures_stops_the_run, max_failures_stops_the_run);
