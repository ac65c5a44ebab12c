//! Batches are ranges of the key index, not of the candidates: a sparse
//! `where` never makes one batch scan (and lock) an unbounded range, and a
//! definition changed under an unfinished run is refused.

mod common;

use common::{TestDb, text};

async fn sparse_where_keeps_batches_bounded(db: TestDb) {
    const ROWS: u64 = 2_000_000;
    db.exec("CREATE TABLE events (id BIGINT NOT NULL PRIMARY KEY, kind INTEGER NOT NULL, fixed INTEGER)")
        .await;
    db.exec(&format!(
        "INSERT INTO events (id, kind, fixed) SELECT i, i % 100000, CASE WHEN i % 100000 = 0 THEN NULL ELSE 1 END FROM ({}) s",
        db.series(ROWS)
    ))
    .await;
    let spec = db.spec(
        r#"
[jobs.sparse]
source.table = "events"
source.key = ["id"]
source.where = "fixed IS NULL"
action.update.fixed = "kind + 2"
"#,
    );
    let out = db.run(&["run", spec.to_str().unwrap(), "--batch-size", "10000", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM events WHERE fixed IS NULL OR (id % 100000 = 0 AND fixed <> 2)")
            .await,
        0
    );

    let log = db.audit(None);
    let batches: Vec<&serde_json::Value> = log.iter().filter(|l| l["event"] == "batch").collect();
    // Every batch covers exactly the next 10,000 keys, whether or not they hold candidates.
    assert_eq!(batches.len() as u64, ROWS / 10_000);
    let key = |v: &serde_json::Value| {
        v[0].as_str()
            .map(|s| s.parse::<i64>().unwrap())
            .or(v[0].as_i64())
            .unwrap()
    };
    for (i, b) in batches.iter().enumerate() {
        let upper = key(&b["upper"]);
        assert_eq!(upper, (i as i64 + 1) * 10_000, "batch {} ends after 10,000 keys", i + 1);
        assert!(b["rows_read"].as_i64().unwrap() <= 1, "one candidate per 100k keys");
    }
    // No batch runs long: durations stay near the others (generous bounds for a busy 2-core CI machine).
    let mut durations: Vec<i64> = batches.iter().map(|b| b["duration_ms"].as_i64().unwrap()).collect();
    durations.sort();
    let median = durations[durations.len() / 2];
    let max = *durations.last().unwrap();
    assert!(max <= median * 20 + 1000, "a batch took {max} ms, median {median} ms");
}
on_all_backends!(sparse_where_keeps_batches_bounded, sparse_where_keeps_batches_bounded);

async fn changed_definition_refuses_to_continue(db: TestDb) {
    db.exec("CREATE TABLE t (id BIGINT NOT NULL PRIMARY KEY, v INTEGER)")
        .await;
    db.exec(&format!(
        "INSERT INTO t (id, v) SELECT i, NULL FROM ({}) s",
        db.series(1000)
    ))
    .await;
    let body = |expr: &str| {
        format!(
            "[jobs.fill]\nsource.table = \"t\"\nsource.key = \"id\"\nsource.where = \"v IS NULL\"\naction.update.v = \"{expr}\"\n"
        )
    };
    let spec = db.spec(&body("1"));
    let out = db.run(&["run", spec.to_str().unwrap(), "--limit", "100", "--batch-size", "50"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let id = db.texts("SELECT id FROM infill_runs").await[0][0].clone().unwrap();

    db.spec(&body("2"));
    let out = db.run(&["run", spec.to_str().unwrap(), "--batch-size", "50"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "run {} of job `fill` is unfinished and the job's definition changed",
            &id[..13]
        )),
        "{stderr}"
    );
    assert!(stderr.contains("infill cancel"), "names the way out: {stderr}");
    assert_eq!(db.int("SELECT COUNT(*) FROM t WHERE v = 2").await, 0, "nothing written");

    // Restoring the spec continues the run.
    db.spec(&body("1"));
    let out = db.run(&["run", spec.to_str().unwrap(), "--batch-size", "50", "--limit", "100"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(db.int("SELECT COUNT(*) FROM t WHERE v = 1").await, 200);
    assert_eq!(db.int("SELECT COUNT(*) FROM infill_runs").await, 1);

    // Or cancelling it lets the changed definition start a new run.
    let out = db.run(&["cancel", &id[..8], "--spec", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    db.spec(&body("2"));
    let out = db.run(&["run", spec.to_str().unwrap(), "--batch-size", "50"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM t WHERE v = 1").await,
        200,
        "written rows stay"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM t WHERE v = 2").await, 800);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs WHERE status = 'cancelled'")
            .await,
        1
    );
}
on_all_backends!(
    changed_definition_refuses_to_continue,
    changed_definition_refuses_to_continue
);
