//! `action.insert` (seed 002's missing parents): one row into `action.table`
//! per candidate, skipping rows whose unique key is taken (ON CONFLICT DO
//! NOTHING; on MySQL a NOT EXISTS guard, never INSERT IGNORE). Undo deletes
//! exactly the inserted rows still as inserted; one changed since, or one
//! another row now refers to, is kept as a conflict.

mod common;

use common::{TestDb, text};

async fn schema(db: &TestDb) {
    db.exec(
        "CREATE TABLE parties (id BIGINT NOT NULL PRIMARY KEY, name VARCHAR(40) NOT NULL);
         CREATE TABLE waitlist_entries (id BIGINT NOT NULL PRIMARY KEY, party_id BIGINT);",
    )
    .await;
    // Parties 1..=100 exist; entries point at parties 1..=130 (31..=130 of
    // them twice), so parties 101..=130 are missing; every 10th entry has none.
    db.exec(&format!(
        "INSERT INTO parties (id, name) SELECT i, 'party' FROM ({}) s",
        db.series(100)
    ))
    .await;
    db.exec(&format!(
        "INSERT INTO waitlist_entries (id, party_id)
         SELECT i, CASE WHEN i % 10 = 0 THEN NULL ELSE 1 + i % 130 END FROM ({}) s",
        db.series(400)
    ))
    .await;
}

fn spec(db: &TestDb, filter: &str) -> String {
    db.spec(&format!(
        r#"
[jobs.parents]
source.table = "waitlist_entries"
source.key = "id"
source.where = "{filter}"
action.table = "parties"
action.insert.id = ":party_id"
action.insert.name = "'restored'"
batch_size = 50
"#
    ))
    .to_str()
    .unwrap()
    .to_string()
}

const ORPHANS: &str =
    "party_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM parties p WHERE p.id = waitlist_entries.party_id)";

async fn missing(db: &TestDb) -> i64 {
    db.int(&format!(
        "SELECT COUNT(DISTINCT party_id) FROM waitlist_entries WHERE {ORPHANS}"
    ))
    .await
}

async fn inserts_missing_parents_once(db: TestDb) {
    schema(&db).await;
    let want = missing(&db).await;
    assert!(want > 0);
    // Every entry with a party is a candidate, so most inserts meet an
    // existing key: they are skipped, not errors.
    let spec = spec(&db, "party_id IS NOT NULL");
    let out = db.run(&["run", &spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows_changed"].as_i64(), Some(want), "{summary}");
    assert_eq!(missing(&db).await, 0);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM parties WHERE name = 'restored'").await,
        want
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM parties").await, 100 + want);
    // Again: nothing new.
    let out = db.run(&["run", &spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["rows_changed"], 0);
    assert_eq!(db.int("SELECT COUNT(*) FROM parties").await, 100 + want);
}
on_all_backends!(inserts_missing_parents_once, inserts_missing_parents_once);

async fn undo_deletes_exactly_the_inserted_rows(db: TestDb) {
    schema(&db).await;
    let before = db.checksum("parties", &["id", "name"], "id").await;
    let want = missing(&db).await;
    let spec = spec(&db, ORPHANS);
    let out = db.run(&["run", &spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = run["run_id"].as_str().unwrap()[..13].to_string();
    let inserted = run["rows_changed"].as_i64().unwrap();
    assert_eq!(inserted, want);

    // After the run: one inserted party renamed, one now referenced.
    let ids = db
        .texts("SELECT CAST(id AS CHAR(20)) FROM parties WHERE id > 100 ORDER BY id")
        .await;
    let (a, b) = (ids[0][0].clone().unwrap(), ids[1][0].clone().unwrap());
    db.exec(&format!("UPDATE parties SET name = 'renamed' WHERE id = {a}"))
        .await;
    db.exec("CREATE TABLE bookings (id BIGINT NOT NULL PRIMARY KEY, party_id BIGINT NOT NULL REFERENCES parties (id))")
        .await;
    db.exec(&format!("INSERT INTO bookings (id, party_id) VALUES (1, {b})"))
        .await;

    let out = db.run(&["undo", &id, "--json"]);
    assert_eq!(out.status.code(), Some(1), "two conflicts: {}", text(&out));
    let undo: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(undo["restored"].as_i64(), Some(inserted - 2), "{undo}");
    assert_eq!(undo["conflicts"], 2);
    let rows = undo["conflict_rows"].as_array().unwrap();
    assert!(rows.iter().any(|c| c["column"] == "name"), "{undo}");
    assert!(
        rows.iter().any(|c| c["reason"].is_string()),
        "the reference is the reason: {undo}"
    );
    // The two kept, the pre-existing parties untouched, the rest gone.
    assert_eq!(db.int("SELECT COUNT(*) FROM parties WHERE id > 100").await, 2);
    db.exec("DELETE FROM bookings").await;
    db.exec("DELETE FROM parties WHERE id > 100").await;
    assert_eq!(db.checksum("parties", &["id", "name"], "id").await, before);

    // Twice: the deleted rows count as already undone.
    let out = db.run(&["undo", &id, "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["restored"], 0, "{again}");
    assert_eq!(again["already"].as_i64(), Some(inserted), "{again}");
}
on_all_backends!(
    undo_deletes_exactly_the_inserted_rows,
    undo_deletes_exactly_the_inserted_rows
);

/// Undo of inserts nobody touched since: each page's rows are deleted by one
/// statement (its info log names no fallback to one row at a time), and
/// the table is as before.
async fn untouched_inserts_are_deleted_a_statement_at_a_time(db: TestDb) {
    schema(&db).await;
    let before = db.checksum("parties", &["id", "name"], "id").await;
    let out = db.run(&["run", &spec(&db, ORPHANS), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let inserted = run["rows_changed"].as_i64().unwrap();
    assert!(inserted > 1, "{run}");
    let id = &run["run_id"].as_str().unwrap()[..13];
    let out = db
        .infill()
        .env("INFILL_LOG", "info")
        .args(["undo", id, "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let undo: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(undo["restored"].as_i64(), Some(inserted), "{undo}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("one at a time"),
        "{}",
        text(&out)
    );
    assert_eq!(db.checksum("parties", &["id", "name"], "id").await, before);
}
on_all_backends!(
    untouched_inserts_are_deleted_a_statement_at_a_time,
    untouched_inserts_are_deleted_a_statement_at_a_time
);

/// One inserted row changed since, nothing referring to any: the rows of
/// its statement are deleted one at a time, so the changed one is kept as a
/// conflict and every other one is deleted.
async fn a_changed_insert_is_kept(db: TestDb) {
    schema(&db).await;
    let out = db.run(&["run", &spec(&db, ORPHANS), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let inserted = run["rows_changed"].as_i64().unwrap();
    db.exec("UPDATE parties SET name = 'renamed' WHERE id = 120").await;
    let out = db.run(&["undo", &run["run_id"].as_str().unwrap()[..13], "--json"]);
    assert_eq!(out.status.code(), Some(1), "one conflict: {}", text(&out));
    let undo: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (undo["restored"].as_i64(), undo["conflicts"].as_i64()),
        (Some(inserted - 1), Some(1)),
        "{undo}"
    );
    assert_eq!(undo["conflict_rows"][0]["column"], "name", "{undo}");
    let left = db.texts("SELECT name FROM parties WHERE id > 100").await;
    assert_eq!(left, vec![vec![Some("renamed".to_string())]]);
}
on_all_backends!(a_changed_insert_is_kept, a_changed_insert_is_kept);

/// Another session inserts the same missing parents while the run goes:
/// whoever comes first inserts a party, the other skips it; no error, no
/// duplicate, none missed.
async fn concurrent_inserter(db: TestDb) {
    schema(&db).await;
    let want = missing(&db).await;
    let spec = db.spec(
        r#"
[jobs.parents]
source.table = "waitlist_entries"
source.key = "id"
source.where = "party_id IS NOT NULL"
action.table = "parties"
action.insert.id = ":party_id"
action.insert.name = "'restored'"
batch_size = 20
pause_between = "5ms"
"#,
    );
    let child = db
        .infill()
        .args(["run", spec.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Insert the missing parties from the other end, one by one.
    let insert = db.pick(
        "INSERT OR IGNORE INTO parties (id, name) VALUES ({id}, 'other')",
        "INSERT INTO parties (id, name) VALUES ({id}, 'other') ON CONFLICT DO NOTHING",
        "INSERT IGNORE INTO parties (id, name) VALUES ({id}, 'other')",
    );
    for id in (101..=130).rev() {
        db.exec(&insert.replace("{id}", &id.to_string())).await;
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mine = db.int("SELECT COUNT(*) FROM parties WHERE name = 'restored'").await;
    assert_eq!(summary["rows_changed"].as_i64(), Some(mine), "{summary}");
    assert_eq!(missing(&db).await, 0, "none missed");
    assert_eq!(
        db.int("SELECT COUNT(*) FROM parties WHERE id > 100 AND name IN ('restored', 'other')")
            .await,
        30,
        "each missing id once (the unique key guarantees it; the counts agree)"
    );
    assert!(mine <= want);
    // Undo removes only what the run inserted.
    let runs = db.texts("SELECT id FROM infill_runs").await;
    let out = db.run(&["undo", &runs[0][0].as_deref().unwrap()[..13], "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(db.int("SELECT COUNT(*) FROM parties WHERE name = 'restored'").await, 0);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM parties WHERE name = 'other'").await,
        30 - mine,
        "the other session's rows stay"
    );
}
on_all_backends!(concurrent_inserter, concurrent_inserter);
