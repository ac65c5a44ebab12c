//! `infill undo RUN` puts back what a run wrote: the table ends byte for
//! byte as before; a row changed since (even only in letter case, which a
//! case-insensitive collation would call equal) or deleted is kept and
//! listed as a conflict; undoing twice changes nothing; `--since/--until`
//! select batches by commit time; a job with `undo = false` cannot be undone.

mod common;

use common::{TestDb, text};

const SPEC: &str = r#"
[jobs.fill]
source.table = "items"
source.key = "id"
source.where = "note IS NULL"
action.update.note = "'filled'"
action.update.amount = "price * 2"
action.update.seen = "CAST('2024-02-29 12:34:56' AS TIMESTAMP)"
batch_size = 100
"#;

const COLS: &[&str] = &["id", "price", "amount", "seen", "note"];

async fn schema(db: &TestDb) {
    let ts = db.pick("TEXT", "TIMESTAMP", "DATETIME");
    db.exec(&format!(
        "CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, price DECIMAL(12,2) NOT NULL, amount DECIMAL(12,2),
                             seen {ts} NULL, note VARCHAR(40))"
    ))
    .await;
    db.exec(&format!(
        "INSERT INTO items (id, price, amount, seen, note)
         SELECT i, i * 1.25, CASE WHEN i % 4 = 0 THEN 7.5 ELSE NULL END,
                CASE WHEN i % 5 = 0 THEN CAST('2020-01-01 00:00:00' AS {ts}) ELSE NULL END,
                CASE WHEN i % 3 = 0 THEN 'kept' ELSE NULL END
         FROM ({}) s",
        db.series(1000)
    ))
    .await;
}

fn spec(db: &TestDb, body: &str) -> String {
    let spec = body.replace(
        "CAST('2024-02-29 12:34:56' AS TIMESTAMP)",
        db.pick(
            "'2024-02-29 12:34:56'",
            "CAST('2024-02-29 12:34:56' AS TIMESTAMP)",
            "CAST('2024-02-29 12:34:56' AS DATETIME)",
        ),
    );
    db.spec(&spec).to_str().unwrap().to_string()
}

fn run_id(db: &TestDb, spec: &str) -> String {
    let out = db.run(&["run", spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["run_id"].as_str().unwrap().to_string()
}

fn undo(db: &TestDb, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = vec!["undo"];
    all.extend(args);
    all.push("--json");
    let out = db.run(&all);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    (out.status.code(), v)
}

async fn undo_restores_exactly(db: TestDb) {
    schema(&db).await;
    let before = db.checksum("items", COLS, "id").await;
    let spec = spec(&db, SPEC);
    let id = run_id(&db, &spec);
    let written = db.int("SELECT COUNT(*) FROM items WHERE note = 'filled'").await;
    assert_eq!(written, 667);
    assert_ne!(db.checksum("items", COLS, "id").await, before);

    // A dry run counts and writes nothing.
    let after_run = db.checksum("items", COLS, "id").await;
    let (code, dry) = undo(&db, &[&id[..13], "--dry-run"]);
    assert_eq!(code, Some(0), "{dry}");
    assert_eq!(
        (dry["restored"].as_u64(), dry["images"].as_u64()),
        (Some(667), Some(667))
    );
    assert_eq!(db.checksum("items", COLS, "id").await, after_run);

    let (code, out) = undo(&db, &[&id[..13]]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out["restored"], 667);
    assert_eq!(out["conflicts"], 0);
    assert_eq!(
        db.checksum("items", COLS, "id").await,
        before,
        "byte for byte as before"
    );
    let status = db
        .texts(&format!("SELECT status FROM infill_runs WHERE id = '{id}'"))
        .await;
    assert_eq!(status[0][0].as_deref(), Some("undone"));

    // Twice: nothing left to do.
    let (code, again) = undo(&db, &[&id[..13]]);
    assert_eq!(code, Some(0), "{again}");
    assert_eq!(
        (again["restored"].as_u64(), again["already"].as_u64()),
        (Some(0), Some(667))
    );
    assert_eq!(db.checksum("items", COLS, "id").await, before);
    // Each undo is a run of its own, pointing at the run it undid.
    assert_eq!(
        db.int(&format!(
            "SELECT COUNT(*) FROM infill_runs WHERE undo_of = '{id}' AND status = 'succeeded'"
        ))
        .await,
        2
    );
}
on_all_backends!(undo_restores_exactly, undo_restores_exactly);

async fn changed_rows_are_conflicts(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, SPEC);
    let id = run_id(&db, &spec);
    // Someone edits three rows after the run: a case change only, a new
    // amount, and a deletion.
    db.exec("UPDATE items SET note = 'FILLED' WHERE id = 1").await;
    db.exec("UPDATE items SET amount = 99 WHERE id = 2").await;
    db.exec("DELETE FROM items WHERE id = 4").await;
    let (code, out) = undo(&db, &[&id[..13]]);
    assert_eq!(code, Some(1), "conflicts exit 1: {out}");
    assert_eq!(out["conflicts"], 3);
    assert_eq!(out["restored"], 667 - 3);
    let mut rows: Vec<String> = out["conflict_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} {}", c["key"], c["column"]))
        .collect();
    rows.sort();
    // Integer keys read back as numbers, except where MySQL images hold text.
    let key = |n: i64| match db.backend {
        common::Backend::MySql => format!("[\"{n}\"]"),
        _ => format!("[{n}]"),
    };
    assert_eq!(
        rows,
        vec![
            format!("{} \"note\"", key(1)),
            format!("{} \"amount\"", key(2)),
            format!("{} null", key(4)),
        ]
    );
    // The edits stand; everything else is back.
    assert_eq!(
        db.texts("SELECT note FROM items WHERE id = 1").await[0][0].as_deref(),
        Some("FILLED")
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id = 2 AND amount = 99").await,
        1
    );
    // A conflicting row is kept whole: row 2 keeps the note the run wrote.
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE note = 'filled' AND id NOT IN (1, 2)")
            .await,
        0
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note IS NULL").await, 667 - 3);
    // The run is not marked undone: part of it stays.
    let status = db
        .texts(&format!("SELECT status FROM infill_runs WHERE id = '{id}'"))
        .await;
    assert_eq!(status[0][0].as_deref(), Some("succeeded"));
    // `infill failures UNDO_RUN` lists the conflicts.
    let undo_run = out["run_id"].as_str().unwrap();
    let f = db.run(&["failures", &undo_run[..13], "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&f.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "{}", text(&f));
}
on_all_backends!(changed_rows_are_conflicts, changed_rows_are_conflicts);

async fn undo_by_time_window(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, SPEC);
    let id = run_id(&db, &spec);
    // Pretend the first two batches committed long ago.
    db.exec(&format!(
        "UPDATE infill_batches SET committed_at = '2020-06-01T00:00:00.000000Z' WHERE run_id = '{id}' AND batch_no <= 2"
    ))
    .await;
    let sum = db.pick(
        "CAST(SUM(rows_changed) AS BIGINT)",
        "CAST(SUM(rows_changed) AS BIGINT)",
        "CAST(SUM(rows_changed) AS SIGNED)",
    );
    let in_window = db
        .int(&format!(
            "SELECT {sum} FROM infill_batches WHERE run_id = '{id}' AND batch_no <= 2"
        ))
        .await;
    assert!(in_window > 0);
    let (code, out) = undo(&db, &[&id[..13], "--until", "2021-01-01"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out["restored"].as_i64(), Some(in_window));
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note IS NULL").await, in_window);
    // The rest, by a window starting after those.
    let (code, out) = undo(&db, &[&id[..13], "--since", "2021-01-01T00:00:00Z"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out["restored"].as_i64(), Some(667 - in_window));
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note = 'filled'").await, 0);
}
on_all_backends!(undo_by_time_window, undo_by_time_window);

async fn no_images_no_undo(db: TestDb) {
    schema(&db).await;
    let spec = spec(
        &db,
        &SPEC.replace("batch_size = 100\n", "batch_size = 100\nundo = false\n"),
    );
    let id = run_id(&db, &spec);
    let out = db.run(&["undo", &id[..13]]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("undo = false"), "{}", text(&out));
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note = 'filled'").await, 667);
}
on_all_backends!(no_images_no_undo, no_images_no_undo);

/// A guard that pins every written column to NULL (`note IS NULL AND
/// amount IS NULL`): PostgreSQL stores the before images without reading
/// them (a `null` per column), and undo still restores exactly and still
/// reports a row changed since.
async fn known_null_before_images(db: TestDb) {
    schema(&db).await;
    let before = db.checksum("items", COLS, "id").await;
    let spec = spec(
        &db,
        &SPEC
            .replace("\"note IS NULL\"", "\"note IS NULL AND amount IS NULL\"")
            .replace(
                "action.update.seen = \"CAST('2024-02-29 12:34:56' AS TIMESTAMP)\"\n",
                "",
            ),
    );
    let id = run_id(&db, &spec);
    // Rows with neither a note (i % 3) nor an amount (i % 4): 1000 - 333 - 250 + 83.
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE note = 'filled'").await, 500);
    if db.backend == common::Backend::Postgres {
        let stored = db
            .texts(&format!(
                "SELECT before_image FROM infill_undo WHERE run_id = '{id}' LIMIT 1"
            ))
            .await;
        let stored: serde_json::Value = serde_json::from_str(stored[0][0].as_deref().unwrap()).unwrap();
        assert_eq!(stored, serde_json::json!({ "note": null, "amount": null }));
    }
    let (b, a) = db.first_image(&id).await;
    assert_eq!(
        (b["note"].clone(), a["note"].clone()),
        (serde_json::Value::Null, "filled".into())
    );
    db.exec("UPDATE items SET amount = 99 WHERE id = 1").await;
    let (code, out) = undo(&db, &[&id[..13]]);
    assert_eq!(code, Some(1), "one conflict: {out}");
    assert_eq!(
        (out["restored"].as_u64(), out["conflicts"].as_u64()),
        (Some(499), Some(1))
    );
    db.exec("UPDATE items SET amount = NULL, note = NULL WHERE id = 1")
        .await;
    assert_eq!(
        db.checksum("items", COLS, "id").await,
        before,
        "every other row as before"
    );
}
on_all_backends!(known_null_before_images, known_null_before_images);
