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
    let (code, v, _) = undo_logged(db, args);
    (code, v)
}

/// `undo`, also returning how many times it fell back from restoring a
/// statement's worth of rows at once to one row at a time (its info log).
fn undo_logged(db: &TestDb, args: &[&str]) -> (Option<i32>, serde_json::Value, usize) {
    let mut all = vec!["undo"];
    all.extend(args);
    all.push("--json");
    let out = db.infill().env("INFILL_LOG", "info").args(&all).output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let one_by_one = String::from_utf8_lossy(&out.stderr)
        .matches("undoing them one at a time")
        .count();
    (out.status.code(), v, one_by_one)
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

    // Every row still holds what the run wrote: each statement restores
    // all of its rows, none goes one at a time.
    let (code, out, one_by_one) = undo_logged(&db, &[&id[..13]]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out["restored"], 667);
    assert_eq!(out["conflicts"], 0);
    assert_eq!(one_by_one, 0);
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
    let (code, again, one_by_one) = undo_logged(&db, &[&id[..13]]);
    assert_eq!(code, Some(0), "{again}");
    assert_eq!(
        (again["restored"].as_u64(), again["already"].as_u64()),
        (Some(0), Some(667))
    );
    // Each page of images found its rows already restored.
    let pages = db
        .audit(again["run_id"].as_str())
        .iter()
        .filter(|e| e["event"] == "batch")
        .count();
    assert!(pages > 1, "{pages}");
    assert_eq!(one_by_one, pages);
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

/// A run writing 40 columns: 81 bound values a row, so an undo statement
/// takes fewer rows than its usual 1,000 to stay under each engine's limit
/// on bound values, and still restores every row with no fallback.
async fn wide_rows_restore_in_bounded_statements(db: TestDb) {
    let cols: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    let defs: Vec<String> = cols.iter().map(|c| format!("{c} VARCHAR(20)")).collect();
    db.exec(&format!(
        "CREATE TABLE wide (id BIGINT NOT NULL PRIMARY KEY, {})",
        defs.join(", ")
    ))
    .await;
    let values: Vec<String> = (0..40)
        .map(|i| format!("CASE WHEN i % {} = 0 THEN 'old' ELSE NULL END", i + 2))
        .collect();
    db.exec(&format!(
        "INSERT INTO wide SELECT i, {} FROM ({}) s",
        values.join(", "),
        db.series(1200)
    ))
    .await;
    let mut all: Vec<&str> = vec!["id"];
    all.extend(cols.iter().map(String::as_str));
    let before = db.checksum("wide", &all, "id").await;
    let sets: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("action.update.{c} = \"'new{i}'\""))
        .collect();
    let spec = db.spec(&format!(
        "[jobs.fill]\nsource.table = \"wide\"\nsource.key = \"id\"\nbatch_size = 1200\n{}\n",
        sets.join("\n")
    ));
    let id = run_id(&db, spec.to_str().unwrap());
    assert_eq!(db.int("SELECT COUNT(*) FROM wide WHERE c39 = 'new39'").await, 1200);
    let (code, out, one_by_one) = undo_logged(&db, &[&id[..13]]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!((out["restored"].as_u64(), one_by_one), (Some(1200), 0), "{out}");
    assert_eq!(db.checksum("wide", &all, "id").await, before);
}
on_all_backends!(
    wide_rows_restore_in_bounded_statements,
    wide_rows_restore_in_bounded_statements
);

async fn changed_rows_are_conflicts(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, SPEC);
    let id = run_id(&db, &spec);
    // Someone edits three rows after the run: a case change only, a new
    // amount, and a deletion.
    db.exec("UPDATE items SET note = 'FILLED' WHERE id = 1").await;
    db.exec("UPDATE items SET amount = 99 WHERE id = 2").await;
    db.exec("DELETE FROM items WHERE id = 4").await;
    let (code, out, one_by_one) = undo_logged(&db, &[&id[..13]]);
    assert_eq!(code, Some(1), "conflicts exit 1: {out}");
    assert_eq!(out["conflicts"], 3);
    assert_eq!(out["restored"], 667 - 3);
    // Only the first page (the first 100 rows written) goes one row at a
    // time; the other six are restored a statement each.
    assert_eq!(one_by_one, 1);
    let mut rows: Vec<String> = out["conflict_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} {}", c["key"], c["column"]))
        .collect();
    rows.sort();
    // Integer keys read back as numbers (images MySQL or MariaDB before
    // 10.6 take hold them as text).
    let key = |n: i64| format!("[{n}]");
    let rows: Vec<String> = rows
        .into_iter()
        .map(|r| r.replace("[\"", "[").replace("\"]", "]"))
        .collect();
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
/// amount IS NULL`): the before images are stored without reading them (a
/// `null` per column), and undo still restores exactly and still reports a
/// row changed since.
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
    // SQLite images DECIMAL columns through infill, reading them (its
    // JSON would not hold them exactly); sqlite_images_pair_each_key_with_its_values
    // covers its known-NULL images.
    if db.backend != common::Backend::Sqlite {
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

/// SQLite writes a batch and its images without a row coming back to
/// infill. A composite key, INTEGER and TEXT columns, and a REAL stored in
/// an INTEGER column (SQLite keeps it) are restored exactly, and a BLOB,
/// which a JSON image cannot hold, fails its row alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_images_taken_by_the_engine_restore_exactly() {
    let Some(db) = TestDb::new(common::Backend::Sqlite).await else {
        return;
    };
    db.exec("CREATE TABLE m (a INTEGER NOT NULL, b TEXT NOT NULL, n INTEGER, label TEXT, PRIMARY KEY (a, b))")
        .await;
    db.exec(&format!(
        "INSERT INTO m SELECT i % 7, 'k' || i, CASE WHEN i % 5 = 0 THEN i + 0.1 ELSE i END, CASE WHEN i % 3 = 0 THEN 'x' || i END FROM ({}) s",
        db.series(600)
    ))
    .await;
    db.exec("UPDATE m SET n = x'00ff' WHERE a = 3 AND b = 'k10'").await;
    let cols = &["a", "b", "n", "typeof(n)", "label", "typeof(label)"];
    let before = db.checksum("m", cols, "a, b").await;
    let spec = db.spec(
        r#"
[jobs.fill]
source.table = "m"
source.key = ["a", "b"]
source.where = "a <> 9"
action.update.n = "a * 1000"
action.update.label = "coalesce(label, 'none')"
batch_size = 100
max_failures = 5
"#,
    );
    let out = db.run(&["run", spec.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1), "the blob row fails: {}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows_changed"], 599, "{summary}");
    let id = summary["run_id"].as_str().unwrap().to_string();
    let f = db.run(&["failures", &id, "--json"]);
    let failures: serde_json::Value = serde_json::from_slice(&f.stdout).unwrap();
    assert_eq!(failures[0]["key"], serde_json::json!([3, "k10"]), "{failures}");
    assert!(failures[0]["message"].as_str().unwrap().contains("BLOB"), "{failures}");
    assert_eq!(db.int("SELECT COUNT(*) FROM m WHERE n = a * 1000").await, 599);

    let (code, out) = undo(&db, &[&id[..13]]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out["restored"], 599);
    assert_eq!(
        db.checksum("m", cols, "a, b").await,
        before,
        "values and storage classes as before"
    );
}

/// SQLite reads a batch's images in key order without sorting, and takes
/// the after image over the range when every row of it was written, by
/// key lookups when not. Dense and sparse batches, a composite key whose
/// text part sorts unlike its numbers, and a guard an index can serve in
/// another order: in every image row the keys ascend and each after value
/// sits beside its own key, and undo puts the table back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_images_pair_each_key_with_its_values() {
    let Some(db) = TestDb::new(common::Backend::Sqlite).await else {
        return;
    };
    // Keys ((i - 1) / 500, 'k' || i): 'k10' sorts before 'k9'. Rows
    // 1..=1000 (a = 0 and 1) are all candidates; in 1001..=2000 one in
    // three is.
    db.exec("CREATE TABLE p (a INTEGER NOT NULL, b TEXT NOT NULL, g INTEGER NOT NULL, v INTEGER, PRIMARY KEY (a, b))")
        .await;
    db.exec("CREATE INDEX p_g ON p (g DESC, v)").await;
    db.exec(&format!(
        "INSERT INTO p SELECT (i - 1) / 500, 'k' || i, i % 11, CASE WHEN i > 1000 AND i % 3 <> 0 THEN -i END FROM ({}) s",
        db.series(2000)
    ))
    .await;
    let cols = &["a", "b", "g", "v", "typeof(v)"];
    let original = db.checksum("p", cols, "a, b").await;
    for guard in ["v IS NULL", "g >= 0 AND (v IS NULL OR v = 0)"] {
        let spec = db.spec(&format!(
            "[jobs.fill]\nsource.table = \"p\"\nsource.key = [\"a\", \"b\"]\nsource.where = \"{guard}\"\naction.update.v = \"g * 1000 + a\"\n"
        ));
        let out = db.run(&["run", spec.to_str().unwrap(), "--batch-size", "250", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["rows_changed"], 1333, "{guard}: {summary}");
        let id = summary["run_id"].as_str().unwrap().to_string();
        let rows = db
            .texts(&format!(
                "SELECT row_key, after_image, before_image FROM infill_undo WHERE run_id = '{id}' ORDER BY batch_no"
            ))
            .await;
        let mut imaged = 0;
        for row in &rows {
            // `v IS NULL` pins the written column: the before image is known.
            if guard == "v IS NULL" {
                assert_eq!(row[2].as_deref(), Some(r#"{"v":null}"#));
            }
            let keys: Vec<(i64, String)> = serde_json::from_str(row[0].as_deref().unwrap()).unwrap();
            let after: serde_json::Value = serde_json::from_str(row[1].as_deref().unwrap()).unwrap();
            let values = after["v"].as_array().unwrap();
            assert_eq!(values.len(), keys.len(), "{guard}");
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "{guard}: keys ascend: {keys:?}");
            for ((a, b), v) in keys.iter().zip(values) {
                let i: i64 = b[1..].parse().unwrap();
                assert_eq!(v.as_i64(), Some(i % 11 * 1000 + a), "{guard}: key ({a}, {b})");
            }
            imaged += keys.len();
        }
        assert_eq!(imaged, 1333, "{guard}");
        let (code, out) = undo(&db, &[&id[..13]]);
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(db.checksum("p", cols, "a, b").await, original, "{guard}");
    }
}

/// MariaDB takes a batch's images in the engine, and its UPDATE writes only
/// the rows its locking read imaged. A guard that changes its mind
/// (`RAND()`) refuses some locked rows and would admit others that were
/// never locked: those are not written, so undo restores the table exactly
/// (written without that restriction, the range fails this test in most runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_writes_only_the_rows_it_imaged() {
    let Some(db) = TestDb::new(common::Backend::MySql).await else {
        return;
    };
    schema(&db).await;
    let before = db.checksum("items", COLS, "id").await;
    let spec = spec(
        &db,
        &SPEC.replace("\"note IS NULL\"", "\"note IS NULL AND RAND() < 0.8\""),
    );
    let id = run_id(&db, &spec);
    let written = db.int("SELECT COUNT(*) FROM items WHERE note = 'filled'").await;
    assert!(written > 300 && written < 667, "{written}");
    // A locked row the guard then refuses keeps an image of the value it
    // still holds.
    assert!(db.undo_images(Some(&id)).await >= written);
    let (code, out) = undo(&db, &[&id[..13]]);
    assert_eq!(code, Some(0), "{out}");
    // A row written but never locked would have no image, and would stay
    // written.
    assert_eq!(db.checksum("items", COLS, "id").await, before);
}

/// With integer keys, MariaDB's images are taken by the engine: the keys
/// are stored as JSON numbers, the values as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_images_are_taken_by_the_engine() {
    let Some(db) = TestDb::new(common::Backend::MySql).await else {
        return;
    };
    let version = db.texts("SELECT VERSION()").await[0][0].clone().unwrap();
    if !version.contains("MariaDB") {
        return;
    }
    schema(&db).await;
    let id = run_id(&db, &spec(&db, SPEC));
    let stored = db
        .texts(&format!(
            "SELECT row_key, after_image FROM infill_undo WHERE run_id = '{id}' ORDER BY batch_no LIMIT 1"
        ))
        .await;
    let keys: serde_json::Value = serde_json::from_str(stored[0][0].as_deref().unwrap()).unwrap();
    assert_eq!(keys[0], 1, "{keys}");
    let after: serde_json::Value = serde_json::from_str(stored[0][1].as_deref().unwrap()).unwrap();
    assert_eq!(after["note"][0], "filled", "{after}");
}

/// MariaDB writes a batch whose keys are all candidates over its range,
/// and a batch with other rows in it through the locked keys; either way
/// its check passes (no batch is written again by key list) and undo puts
/// the table back. Both guards: one that pins the column to NULL (before
/// values known) and one that does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_dense_and_sparse_batches_pass_their_check() {
    let Some(db) = TestDb::new(common::Backend::MySql).await else {
        return;
    };
    let version = db.texts("SELECT VERSION()").await[0][0].clone().unwrap();
    if !version.contains("MariaDB") {
        return;
    }
    // Rows 1..=1000 all candidates; 1001..=2000 every third one a candidate.
    db.exec("CREATE TABLE d (id BIGINT NOT NULL PRIMARY KEY, a INT NOT NULL, v BIGINT, w VARCHAR(20))")
        .await;
    db.exec(&format!(
        "INSERT INTO d SELECT i, i % 7, CASE WHEN i > 1000 AND i % 3 <> 0 THEN -i END, CASE WHEN i % 2 = 0 THEN 'w' END FROM ({}) s",
        db.series(2000)
    ))
    .await;
    let cols = &["id", "a", "v", "w"];
    let original = db.checksum("d", cols, "id").await;
    for guard in ["v IS NULL", "a >= 0 AND (v IS NULL OR v = 0)"] {
        let spec = db.spec(&format!(
            "[jobs.fill]\nsource.table = \"d\"\nsource.key = \"id\"\nsource.where = \"{guard}\"\naction.update.v = \"id * 5\"\naction.update.w = \"concat('x', a)\"\n"
        ));
        let out = db
            .infill()
            .env("INFILL_LOG", "info")
            .args(["run", spec.to_str().unwrap(), "--batch-size", "250", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("by key list"),
            "{guard}: {}",
            text(&out)
        );
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["rows_changed"], 1333, "{guard}: {summary}");
        assert_eq!(db.int("SELECT COUNT(*) FROM d WHERE v = id * 5").await, 1333);
        let id = summary["run_id"].as_str().unwrap().to_string();
        assert_eq!(db.undo_images(Some(&id)).await, 1333);
        let (code, out) = undo(&db, &[&id[..13]]);
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(db.checksum("d", cols, "id").await, original, "{guard}");
    }
}

/// On MariaDB an expression that reads another written column sees its new
/// value (a single-table UPDATE assigns left to right), in every batch:
/// dense ones written over their range and sparse ones, which would
/// otherwise go through a multi-table UPDATE that reads old values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_cross_column_expressions_agree_in_every_batch() {
    let Some(db) = TestDb::new(common::Backend::MySql).await else {
        return;
    };
    db.exec("CREATE TABLE x (id BIGINT NOT NULL PRIMARY KEY, a BIGINT NOT NULL, b BIGINT)")
        .await;
    // 1..=500 all candidates; 501..=1000 every fourth one.
    db.exec(&format!(
        "INSERT INTO x SELECT i, i, CASE WHEN i > 500 AND i % 4 <> 0 THEN 0 END FROM ({}) s",
        db.series(1000)
    ))
    .await;
    let spec = db.spec(
        "[jobs.fill]\nsource.table = \"x\"\nsource.key = \"id\"\nsource.where = \"b IS NULL\"\naction.update.a = \"a + 1\"\naction.update.b = \"a * 10\"\n",
    );
    let out = db.run(&["run", spec.to_str().unwrap(), "--batch-size", "100", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM x WHERE b IS NOT NULL AND b <> 0").await,
        625
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM x WHERE b <> 0 AND b <> a * 10").await,
        0,
        "b read the new a in every batch"
    );
}

/// MySQL's `IS NULL` matches a NOT NULL date column's zero date, so a
/// guard `d IS NULL` does not prove the before values NULL there: the
/// images hold the zero dates, and undo puts them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_zero_dates_are_imaged_as_they_are() {
    let Some(db) = TestDb::new(common::Backend::MySql).await else {
        return;
    };
    db.exec("SET SESSION sql_mode = ''").await;
    db.exec("CREATE TABLE z (id BIGINT NOT NULL PRIMARY KEY, d DATETIME NOT NULL)")
        .await;
    db.exec(&format!(
        "INSERT INTO z SELECT i, CASE WHEN i % 3 = 0 THEN '2001-02-03 04:05:06' ELSE '0000-00-00 00:00:00' END FROM ({}) s",
        db.series(300)
    ))
    .await;
    let original = db.checksum("z", &["id", "d"], "id").await;
    let spec = db.spec(
        "[jobs.fill]\nsource.table = \"z\"\nsource.key = \"id\"\nsource.where = \"d IS NULL\"\naction.update.d = \"'2020-01-01 00:00:00'\"\n",
    );
    let out = db.run(&["run", spec.to_str().unwrap(), "--batch-size", "100", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows_changed"], 200, "the zero dates: {summary}");
    let id = summary["run_id"].as_str().unwrap().to_string();
    let (code, out) = undo(&db, &[&id[..13]]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out["restored"], 200, "{out}");
    assert_eq!(db.checksum("z", &["id", "d"], "id").await, original);
}

/// A batch of 15,000 rows keeps its images in one row of `infill_undo` on
/// every engine (its keys alone outgrow a 64 kB TEXT): it commits whole,
/// not split, and undo puts it back.
async fn a_large_batch_is_imaged_whole(db: TestDb) {
    db.exec("CREATE TABLE big (id BIGINT NOT NULL PRIMARY KEY, v BIGINT)")
        .await;
    db.exec(&format!(
        "INSERT INTO big (id, v) SELECT i, NULL FROM ({}) s",
        db.series(15_000)
    ))
    .await;
    let spec = db.spec(
        "[jobs.fill]\nsource.table = \"big\"\nsource.key = \"id\"\nsource.where = \"v IS NULL\"\naction.update.v = \"id * 3\"\n",
    );
    let out = db.run(&["run", spec.to_str().unwrap(), "--batch-size", "15000", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (summary["batches"].as_u64(), summary["rows_changed"].as_u64()),
        (Some(1), Some(15_000)),
        "{summary}"
    );
    let id = summary["run_id"].as_str().unwrap().to_string();
    assert_eq!(db.undo_images(Some(&id)).await, 15_000);
    let (code, out) = undo(&db, &[&id[..13]]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(db.int("SELECT COUNT(*) FROM big WHERE v IS NULL").await, 15_000);
}
on_all_backends!(a_large_batch_is_imaged_whole, a_large_batch_is_imaged_whole);
