//! The core story: holes are filled, everything else stays byte-for-byte as
//! it was, on every engine; composite keys, params in the `where`, and an
//! expression reading another table.

mod common;

use common::{TestDb, text};

const SPEC: &str = r#"
[jobs.link]
source.table = "runs"
source.key = ["tenant", "id"]
source.where = "activity_id IS NULL AND block_id = :block AND EXISTS (SELECT 1 FROM activities a WHERE a.run_id = runs.id)"
action.update.activity_id = "(SELECT a.id FROM activities a WHERE a.run_id = runs.id)"
action.update.note = "'linked'"
params.block = { type = "int" }
"#;

const COLS: &[&str] = &["tenant", "id", "block_id", "activity_id", "note"];

async fn schema(db: &TestDb, rows: u64) {
    db.exec(
        "CREATE TABLE activities (id BIGINT NOT NULL PRIMARY KEY, run_id BIGINT NOT NULL);
         CREATE TABLE runs (tenant INTEGER NOT NULL, id BIGINT NOT NULL, block_id INTEGER NOT NULL,
                            activity_id BIGINT, note VARCHAR(40), PRIMARY KEY (tenant, id));",
    )
    .await;
    db.exec(&format!(
        "INSERT INTO runs (tenant, id, block_id, activity_id, note)
         SELECT i % 3, i, i % 5, CASE WHEN i % 7 = 0 THEN 0 ELSE NULL END, CASE WHEN i % 11 = 0 THEN 'keep' ELSE NULL END
         FROM ({}) s",
        db.series(rows)
    ))
    .await;
    db.exec(&format!(
        "INSERT INTO activities (id, run_id) SELECT 100000 + i, i FROM ({}) s WHERE i % 2 = 0",
        db.series(rows)
    ))
    .await;
    db.exec("CREATE INDEX activities_run ON activities (run_id)").await;
}

/// The same table with the expected outcome applied by one plain UPDATE.
async fn expected(db: &TestDb, block: i64) -> String {
    db.exec("CREATE TABLE runs_expected AS SELECT * FROM runs").await;
    db.exec(&format!(
        "UPDATE runs_expected SET activity_id = (SELECT a.id FROM activities a WHERE a.run_id = runs_expected.id), note = 'linked'
         WHERE activity_id IS NULL AND block_id = {block} AND EXISTS (SELECT 1 FROM activities a WHERE a.run_id = runs_expected.id)"
    ))
    .await;
    let sum = db.checksum("runs_expected", COLS, "tenant, id").await;
    db.exec("DROP TABLE runs_expected").await;
    sum
}

async fn fills_holes_and_nothing_else(db: TestDb) {
    schema(&db, 6000).await;
    let before = db.checksum("runs", COLS, "tenant, id").await;
    let want = expected(&db, 2).await;
    assert_ne!(before, want, "the fixture must have holes to fill");
    let candidates = db
        .int("SELECT COUNT(*) FROM runs WHERE activity_id IS NULL AND block_id = 2 AND EXISTS (SELECT 1 FROM activities a WHERE a.run_id = runs.id)")
        .await;
    assert!(candidates > 300, "{candidates}");

    let spec = db.spec(SPEC);
    let out = db.run(&[
        "run",
        spec.to_str().unwrap(),
        "--param",
        "block=2",
        "--batch-size",
        "250",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "succeeded");
    assert_eq!(summary["rows_changed"], candidates);
    assert_eq!(summary["rows_skipped"], 0);
    assert_eq!(summary["batches"], 6000 / 250);

    assert_eq!(
        db.checksum("runs", COLS, "tenant, id").await,
        want,
        "every hole filled, every other row unchanged"
    );
    let run_id = summary["run_id"].as_str().unwrap();
    assert_eq!(
        db.undo_images(Some(run_id)).await,
        candidates,
        "one undo image per written row"
    );
    assert_eq!(
        db.int(&format!(
            "SELECT COUNT(*) FROM infill_batches WHERE run_id = '{run_id}'"
        ))
        .await,
        6000 / 250
    );
    let (before_img, after_img) = db.first_image(run_id).await;
    assert_eq!(before_img["activity_id"], serde_json::Value::Null);
    assert_eq!(after_img["note"], "linked");

    // Running again finds nothing to do: the guard makes it idempotent.
    let again = db.run(&["run", spec.to_str().unwrap(), "--param", "block=2", "--json"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    let summary2: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(summary2["rows_changed"], 0);
    assert_ne!(summary2["run_id"], summary["run_id"], "a finished run is not continued");
    assert_eq!(db.checksum("runs", COLS, "tenant, id").await, want);
}
on_all_backends!(fills_holes_and_nothing_else, fills_holes_and_nothing_else);

async fn dry_run_writes_nothing(db: TestDb) {
    schema(&db, 2000).await;
    let before = db.checksum("runs", COLS, "tenant, id").await;
    let spec = db.spec(SPEC);
    let out = db.run(&[
        "run",
        spec.to_str().unwrap(),
        "--param",
        "block=2",
        "--dry-run",
        "--batch-size",
        "500",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let candidates = db
        .int("SELECT COUNT(*) FROM runs WHERE activity_id IS NULL AND block_id = 2 AND EXISTS (SELECT 1 FROM activities a WHERE a.run_id = runs.id)")
        .await;
    assert_eq!(report["candidates"], candidates);
    assert_eq!(report["keys_in_range"], 2000);
    assert_eq!(report["batches"], 4);
    let sample = report["sample"].as_array().unwrap();
    assert_eq!(sample.len(), 10);
    // The sample shows the computed values: activity id = 100000 + run id.
    let first = &sample[0];
    let id: i64 = first["key"][1]
        .as_str()
        .map(|s| s.parse().unwrap())
        .or(first["key"][1].as_i64())
        .unwrap();
    let after = &first["after"][0][1];
    let after: i64 = after.as_str().map(|s| s.parse().unwrap()).or(after.as_i64()).unwrap();
    assert_eq!(after, 100000 + id);
    assert_eq!(first["before"][0][1], serde_json::Value::Null);

    assert_eq!(
        db.checksum("runs", COLS, "tenant, id").await,
        before,
        "a dry run writes nothing"
    );
    for t in ["infill_runs", "infill_batches", "infill_undo", "infill_schema"] {
        assert!(!db.table_exists(t).await, "a dry run creates no state table ({t})");
    }
    assert!(!db.path().join("infill_logs").exists(), "a dry run writes no audit log");
}
on_all_backends!(dry_run_writes_nothing, dry_run_writes_nothing);

async fn single_key_with_text_param_and_limit(db: TestDb) {
    db.exec("CREATE TABLE users (id BIGINT NOT NULL PRIMARY KEY, country VARCHAR(8), region VARCHAR(16))")
        .await;
    db.exec(&format!(
        "INSERT INTO users (id, country, region) SELECT i, CASE WHEN i % 2 = 0 THEN 'ES' ELSE 'PT' END, NULL FROM ({}) s",
        db.series(1000)
    ))
    .await;
    let spec = db.spec(
        r#"
[jobs.regions]
source.table = "users"
source.key = "id"
source.where = "region IS NULL AND country = :country"
action.update.region = ":label"
params.country = { type = "text" }
params.label = { type = "text", default = "iberia-east" }
"#,
    );
    let spec = spec.to_str().unwrap();
    // --limit stops early, leaving the run resumable; running again continues it.
    let out = db.run(&[
        "run",
        spec,
        "--param",
        "country=ES",
        "--limit",
        "120",
        "--batch-size",
        "100",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(first["rows_changed"], 120);
    assert_eq!(first["status"], "interrupted");
    assert_eq!(
        db.int("SELECT COUNT(*) FROM users WHERE region = 'iberia-east'").await,
        120
    );

    let out = db.run(&["run", spec, "--param", "country=ES", "--batch-size", "100", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(second["run_id"], first["run_id"], "the same run continues");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("continuing run"),
        "{}",
        text(&out)
    );
    assert_eq!(second["status"], "succeeded");
    assert_eq!(
        db.int("SELECT COUNT(*) FROM users WHERE region = 'iberia-east'").await,
        500
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM users WHERE country = 'PT' AND region IS NULL")
            .await,
        500
    );
}
on_all_backends!(
    single_key_with_text_param_and_limit,
    single_key_with_text_param_and_limit
);

async fn verbose_prints_each_written_row(db: TestDb) {
    db.exec("CREATE TABLE users (id BIGINT NOT NULL PRIMARY KEY, region VARCHAR(16))")
        .await;
    db.exec(&format!(
        "INSERT INTO users (id, region) SELECT i, CASE WHEN i % 3 = 0 THEN NULL ELSE 'x' END FROM ({}) s",
        db.series(30)
    ))
    .await;
    let spec = db.spec(
        "[jobs.regions]\nsource.table = \"users\"\nsource.key = \"id\"\nsource.where = \"region IS NULL\"\naction.update.region = \"'south'\"\n",
    );
    let out = db.run(&["run", spec.to_str().unwrap(), "--verbose", "--batch-size", "7"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rows: Vec<&str> = stderr.lines().filter(|l| l.contains("region=south")).collect();
    assert_eq!(rows.len(), 10, "one line per written row: {stderr}");
    assert!(rows[0].contains("✓ 3 → region=south"), "{}", rows[0]);
    assert!(rows[9].contains("✓ 30 → region=south"), "{}", rows[9]);
}
on_all_backends!(verbose_prints_each_written_row, verbose_prints_each_written_row);

/// State tables written by an earlier infill (schema version 1, without
/// run groups and undo runs, and MySQL's undo keys in a TEXT) are migrated
/// in place by the next run.
async fn migrates_version_1_state(db: TestDb) {
    schema(&db, 300).await;
    let spec = db.spec(SPEC);
    let spec = spec.to_str().unwrap();
    let out = db.run(&["run", spec, "--param", "block=1"]);
    assert!(out.status.success(), "{}", text(&out));
    db.exec("ALTER TABLE infill_runs DROP COLUMN group_id").await;
    db.exec("ALTER TABLE infill_runs DROP COLUMN undo_of").await;
    db.exec("UPDATE infill_schema SET version = 1").await;
    let undo_keys_type = "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'infill_undo' AND column_name = 'row_key' AND data_type = 'longtext'";
    if db.backend == common::Backend::MySql {
        db.exec("ALTER TABLE infill_undo MODIFY row_key TEXT NOT NULL").await;
        assert_eq!(db.int(undo_keys_type).await, 0);
    }

    let out = db.run(&["run", spec, "--param", "block=2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(db.int("SELECT COUNT(*) FROM infill_schema WHERE version = 3").await, 1);
    if db.backend == common::Backend::MySql {
        assert_eq!(db.int(undo_keys_type).await, 1, "the undo keys widened");
    }
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs WHERE group_id IS NULL").await,
        2,
        "both runs are there, the column is back"
    );
}
on_all_backends!(migrates_version_1_state, migrates_version_1_state);
