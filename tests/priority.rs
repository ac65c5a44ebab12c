//! Priority segments run first, in order, then the rest; every candidate
//! falls in exactly one segment, so none is written twice, even when the
//! write leaves it a candidate (here the job writes `note`, not the column
//! its `where` tests). A stop in the middle of a segment resumes there.

mod common;

use common::{TestDb, text};

const ROWS: i64 = 3000;

/// grp is 1 for multiples of 7, NULL for other multiples of 5, else 2.
fn grp(i: i64) -> Option<i64> {
    if i % 7 == 0 {
        Some(1)
    } else if i % 5 == 0 {
        None
    } else {
        Some(2)
    }
}

async fn priority_segments_first_and_once(db: TestDb) {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, grp INTEGER, val BIGINT, note VARCHAR(16))")
        .await;
    db.exec(&format!(
        "INSERT INTO items (id, grp, val, note) SELECT i, CASE WHEN i % 7 = 0 THEN 1 WHEN i % 5 = 0 THEN NULL ELSE 2 END, NULL, NULL FROM ({}) s",
        db.series(ROWS as u64)
    ))
    .await;
    let spec = db.spec(
        r#"
[jobs.touch]
source.table = "items"
source.key = "id"
source.where = "val IS NULL"
action.update.note = "'seen'"
priority = ["grp = 1", "id > 2500"]
"#,
    );
    let spec = spec.to_str().unwrap();
    // Stop part-way through the second segment, then run again to finish.
    let first_segment = (1..=ROWS).filter(|i| grp(*i) == Some(1)).count() as i64;
    let limit = (first_segment + 100).to_string();
    let out = db.run(&["run", spec, "--batch-size", "400", "--limit", &limit]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = db.run(&["run", spec, "--batch-size", "400", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows_changed"], ROWS, "every row written exactly once in all");
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note = 'seen'").await, ROWS);
    assert_eq!(db.undo_images(None).await, ROWS);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs").await,
        1,
        "one run, continued"
    );

    // The audit log shows the segments in order: grp = 1, then id > 2500, then the rest.
    let log = db.audit(None);
    let batches: Vec<&serde_json::Value> = log.iter().filter(|l| l["event"] == "batch").collect();
    let segments: Vec<i64> = batches.iter().map(|b| b["segment"].as_i64().unwrap()).collect();
    assert!(
        segments.windows(2).all(|w| w[0] <= w[1]),
        "segments in order: {segments:?}"
    );
    let per = |s: i64| {
        batches
            .iter()
            .filter(|b| b["segment"] == s)
            .map(|b| b["rows_changed"].as_i64().unwrap())
            .sum::<i64>()
    };
    let second = (1..=ROWS).filter(|i| grp(*i) != Some(1) && *i > 2500).count() as i64;
    assert_eq!(per(0), first_segment);
    assert_eq!(per(1), second);
    assert_eq!(per(2), ROWS - first_segment - second, "the rest, NULL grp included");
}
on_all_backends!(priority_segments_first_and_once, priority_segments_first_and_once);
