//! Sources other than a table (seed 004's "LEFT JOIN old vs new", a CSV of
//! corrections, a query): `source.file` (CSV, JSONL), `source.query` and
//! `source.diff`, read page by page, each page applied with its checkpoint
//! in one transaction. A malformed line stops the run naming the line,
//! with nothing of its page written; a kill -9 mid-run resumes with no row
//! written twice and none missed; a diff between two engines finds exactly
//! the missing keys; `--retry-failed` applies only the rows that failed.

mod common;

use std::os::unix::process::ExitStatusExt;

use common::{Backend, TestDb, text};

async fn accounts(db: &TestDb, n: u64) {
    db.exec("CREATE TABLE accounts (id BIGINT NOT NULL PRIMARY KEY, tier VARCHAR(20), score BIGINT, note VARCHAR(40))")
        .await;
    db.exec(&format!(
        "INSERT INTO accounts (id, tier, score, note) SELECT i, 'basic', NULL, 'n' FROM ({}) s",
        db.series(n)
    ))
    .await;
}

/// The job `fix`: scores.csv's `score` into `accounts` by `id`, with
/// further job lines.
fn scores_spec(db: &TestDb, extra: &str) -> std::path::PathBuf {
    db.spec(&format!(
        r#"
[jobs.fix]
source.file = "scores.csv"
source.key = "id"
action.table = "accounts"
action.update.score = ":score"
{extra}
"#
    ))
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

/// A CSV of corrections updates rows by key (typed by the server: `score`
/// is a BIGINT bound from text); an empty field is NULL; undo restores the
/// table exactly.
async fn csv_update_then_undo(db: TestDb) {
    accounts(&db, 600).await;
    let before = db.checksum("accounts", &["id", "tier", "score", "note"], "id").await;
    let mut csv = String::from("id,tier,score\n");
    for i in (1..=600).step_by(2) {
        let score = if i % 10 == 1 {
            String::new()
        } else {
            (i * 3).to_string()
        };
        csv.push_str(&format!("{i},\"gold, {i}\",{score}\n"));
    }
    std::fs::write(db.path().join("fixes.csv"), csv).unwrap();
    let spec = db.spec(
        r#"
[jobs.fix]
source.file = "fixes.csv"
source.key = "id"
action.table = "accounts"
action.update.tier = ":tier"
action.update.score = ":score"
"#,
    );
    let spec = spec.to_str().unwrap();
    let plan = db.run(&["plan", spec, "--json"]);
    assert!(plan.status.success(), "{}", text(&plan));
    let plan = json(&plan);
    assert_eq!(plan["jobs"][0]["candidates"], 300, "{plan}");
    assert_eq!(plan["jobs"][0]["sample"][0]["key"][0], "1", "{plan}");

    let out = db.run(&["run", spec, "--json", "--batch-size", "64"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = json(&out);
    assert_eq!(summary["rows_changed"], 300, "{summary}");
    assert_eq!(summary["batches"], 5, "{summary}");
    assert_eq!(
        db.int("SELECT COUNT(*) FROM accounts WHERE id % 2 = 1 AND tier LIKE 'gold, %'")
            .await,
        300
    );
    assert_eq!(
        db.texts("SELECT tier FROM accounts WHERE id = 477").await,
        [[Some("gold, 477".into())]]
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM accounts WHERE id % 2 = 1 AND id % 10 <> 1 AND score = id * 3")
            .await,
        240
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM accounts WHERE id % 10 = 1 AND score IS NULL")
            .await,
        60
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM accounts WHERE id % 2 = 0 AND tier = 'basic'")
            .await,
        300
    );
    assert_eq!(db.undo_images(Some(summary["run_id"].as_str().unwrap())).await, 300);

    let undo = db.run(&["undo", summary["run_id"].as_str().unwrap(), "--yes", "--json"]);
    assert!(undo.status.success(), "{}", text(&undo));
    assert_eq!(
        db.checksum("accounts", &["id", "tier", "score", "note"], "id").await,
        before,
        "undo restores the table exactly"
    );
}
on_all_backends!(csv_update_then_undo, csv_update_then_undo);

/// JSONL into an insert: a malformed line stops the run naming the line;
/// the pages before it are committed, nothing of its own page is written;
/// once fixed, running again continues after the last committed page.
async fn jsonl_malformed_line_then_continue(db: TestDb) {
    db.exec("CREATE TABLE events (id BIGINT NOT NULL PRIMARY KEY, kind VARCHAR(20) NOT NULL, n BIGINT)")
        .await;
    let line = |i: u64| format!("{{\"id\": {i}, \"kind\": \"k{}\", \"n\": {}}}\n", i % 3, i * 2);
    let mut good = String::new();
    for i in 1..=300 {
        good.push_str(&line(i));
    }
    // Line 251 (in the third page of 100) is broken.
    let broken = good.replacen(&line(251), "{\"id\": 251, \"kind\": \n", 1);
    std::fs::write(db.path().join("events.jsonl"), &broken).unwrap();
    let spec = db.spec(
        r#"
[jobs.load]
source.file = "events.jsonl"
source.key = "id"
action.table = "events"
action.insert.id = ":id"
action.insert.kind = ":kind"
action.insert.n = ":n"
"#,
    );
    let spec = spec.to_str().unwrap();
    let out = db.run(&["run", spec, "--batch-size", "100"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("events.jsonl:251:"), "{err}");
    assert!(err.contains("nothing from this batch was written"), "{err}");
    assert_eq!(db.int("SELECT COUNT(*) FROM events").await, 200, "two pages committed");
    assert_eq!(db.int("SELECT MAX(id) FROM events").await, 200);

    std::fs::write(db.path().join("events.jsonl"), &good).unwrap();
    let out = db.run(&["run", spec, "--json", "--batch-size", "100"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = json(&out);
    assert_eq!(summary["rows_changed"], 300, "the same run, continued: {summary}");
    assert_eq!(db.int("SELECT COUNT(*) FROM events").await, 300);
    assert_eq!(db.int("SELECT COUNT(*) FROM events WHERE n = id * 2").await, 300);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM events WHERE id % 3 = 2 AND kind = 'k2'")
            .await,
        100
    );
    // Pages 1-2 in the first session, 3 in the second: each written once.
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_batches WHERE rows_changed = 100")
            .await,
        3
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM infill_batches").await, 3);
}
on_all_backends!(jsonl_malformed_line_then_continue, jsonl_malformed_line_then_continue);

/// A CSV record with a field too many is named by its line.
async fn csv_wrong_field_count(db: TestDb) {
    accounts(&db, 10).await;
    std::fs::write(db.path().join("fixes.csv"), "id,tier\n1,gold\n2,silver,extra\n").unwrap();
    let spec = db.spec(
        r#"
[jobs.fix]
source.file = "fixes.csv"
source.key = "id"
action.table = "accounts"
action.update.tier = ":tier"
"#,
    );
    let out = db.run(&["run", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fixes.csv:3: 3 fields, but the header names 2"), "{err}");
    assert_eq!(db.int("SELECT COUNT(*) FROM accounts WHERE tier <> 'basic'").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_wrong_field_count_sqlite() {
    if let Some(db) = TestDb::new(Backend::Sqlite).await {
        csv_wrong_field_count(db).await;
    }
}

/// `--retry-failed` on a file source: rows whose write failed (a CHECK
/// refused their score) are applied again, once fixed in the file, and
/// only they: the file's other rows, changed meanwhile, are not written.
/// An interrupted retry continues (by the same command or `infill resume`)
/// without writing a row twice.
async fn csv_retry_failed_applies_only_the_failed_rows(db: TestDb) {
    db.exec("CREATE TABLE accounts (id BIGINT NOT NULL PRIMARY KEY, score BIGINT CHECK (score >= 0))")
        .await;
    db.exec(&format!(
        "INSERT INTO accounts (id, score) SELECT i, NULL FROM ({}) s",
        db.series(300)
    ))
    .await;
    let write = |shift: i64, bad: bool| {
        let mut csv = String::from("id,score\n");
        for i in 1..=300i64 {
            let score = if bad && i % 40 == 0 { -1 } else { i + shift };
            csv.push_str(&format!("{i},{score}\n"));
        }
        std::fs::write(db.path().join("scores.csv"), csv).unwrap();
    };
    write(0, true);
    let spec = scores_spec(&db, "batch_size = 50\nmax_failures = 10");
    let spec = spec.to_str().unwrap();
    let out = db.run(&["run", spec, "--json"]);
    assert_eq!(out.status.code(), Some(1), "rows failed: {}", text(&out));
    let first = json(&out);
    assert_eq!(
        (first["rows_changed"].as_u64(), first["rows_failed"].as_u64()),
        (Some(293), Some(7)),
        "{first}"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM accounts WHERE score IS NULL").await, 7);

    // The file fixed, and every other row changed too: only the 7 are
    // written. The retry is cut short after 3 of them (`--limit`), as a
    // kill would leave it, and continued twice, the file changing each
    // time: a row is written by the first attempt that reaches it, and
    // never again.
    let first_id = first["run_id"].as_str().unwrap();
    write(1000, false);
    let out = db.run(&["run", spec, "--retry-failed", first_id, "--limit", "3", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let retry = json(&out);
    assert_eq!(retry["status"], "interrupted", "{retry}");
    assert_eq!(retry["rows_changed"].as_u64(), Some(3), "{retry}");
    let retry_id = retry["run_id"].as_str().unwrap().to_string();

    // The same command continues it (and does not start another retry).
    write(2000, false);
    let out = db.run(&["run", spec, "--retry-failed", first_id, "--limit", "2", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let again = json(&out);
    assert_eq!(again["run_id"].as_str(), Some(retry_id.as_str()), "{again}");
    assert_eq!(again["rows_changed"].as_u64(), Some(5), "counted across both: {again}");

    // A file whose lines before the cursor changed length cannot be
    // continued from a byte offset: refused, nothing written.
    write(30000, false);
    let out = db.run(&["resume", &retry_id[..13], "--spec", spec, "--json"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("the file changed before the point where the run stopped"),
        "{}",
        text(&out)
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM accounts WHERE score > id + 10000").await,
        0
    );

    // `infill resume` finishes it, still only the failed rows.
    write(3000, false);
    let out = db.run(&["resume", &retry_id[..13], "--spec", spec, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let done = json(&out);
    assert_eq!(
        (
            done["status"].as_str(),
            done["rows_changed"].as_u64(),
            done["rows_failed"].as_u64()
        ),
        (Some("succeeded"), Some(7), Some(0)),
        "{done}"
    );
    // 3 rows from the first attempt, 2 from the second, 2 from the resume.
    for (shift, rows) in [(1000, 3), (2000, 2), (3000, 2)] {
        let sql = format!("SELECT COUNT(*) FROM accounts WHERE score = id + {shift}");
        assert_eq!(db.int(&sql).await, rows, "{sql}");
    }
    assert_eq!(db.int("SELECT COUNT(*) FROM accounts WHERE score = id").await, 293);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs").await,
        2,
        "the run and one retry"
    );
}
on_all_backends!(
    csv_retry_failed_applies_only_the_failed_rows,
    csv_retry_failed_applies_only_the_failed_rows
);

/// A CSV with CRLF line ends and no line end after its last record is
/// continued from where each run stopped (the saved offset may sit after a
/// `\r`, or at the very end of the file), and every row is written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_csv_continues_where_it_stopped() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    accounts(&db, 300).await;
    let lines: Vec<String> = std::iter::once("id,score".to_string())
        .chain((1..=300).map(|i| format!("{i},{}", i * 3)))
        .collect();
    std::fs::write(db.path().join("scores.csv"), lines.join("\r\n")).unwrap();
    let spec = scores_spec(&db, "batch_size = 40");
    let spec = spec.to_str().unwrap();
    let mut ids = Vec::new();
    for (limit, status) in [("100", "interrupted"), ("200", "interrupted")] {
        let out = db.run(&["run", spec, "--limit", limit, "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let v = json(&out);
        assert_eq!(v["status"], status, "{v}");
        ids.push(v["run_id"].clone());
    }
    // The second stopped at the last record, with the file's end as its
    // cursor: the third finds nothing more and succeeds.
    let out = db.run(&["run", spec, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let last = json(&out);
    assert_eq!(
        (last["status"].as_str(), last["rows_changed"].as_u64()),
        (Some("succeeded"), Some(300)),
        "{last}"
    );
    ids.push(last["run_id"].clone());
    assert!(ids.iter().all(|id| *id == ids[0]), "one run throughout: {ids:?}");
    assert_eq!(db.int("SELECT COUNT(*) FROM accounts WHERE score = id * 3").await, 300);
}

/// A query source with a call per row: a row whose call fails is rolled
/// back alone (savepoint) and recorded; the others commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_source_call_isolates_failing_rows() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    accounts(&db, 200).await;
    db.exec(
        "CREATE TABLE scores (id BIGINT PRIMARY KEY, score BIGINT NOT NULL);
         CREATE FUNCTION score_account(p_id BIGINT, version TEXT) RETURNS void AS $$
         BEGIN
           IF p_id % 50 = 0 THEN RAISE EXCEPTION 'cannot score account %', p_id; END IF;
           INSERT INTO scores (id, score) VALUES (p_id, p_id * 7);
         END $$ LANGUAGE plpgsql;",
    )
    .await;
    let spec = db.spec(
        r#"
[jobs.score]
source.query = "SELECT a.id FROM accounts a WHERE a.id > :after"
source.key = "id"
action.call = "SELECT score_account(:id, 'v1.2')"
params.after = { type = "int", default = 0 }
max_failures = 10
"#,
    );
    let out = db.run(&["run", spec.to_str().unwrap(), "--json", "--batch-size", "64"]);
    assert_eq!(out.status.code(), Some(1), "rows failed: {}", text(&out));
    let summary = json(&out);
    assert_eq!(summary["rows_changed"], 196, "{summary}");
    assert_eq!(db.int("SELECT COUNT(*) FROM scores").await, 196);
    assert_eq!(db.int("SELECT COUNT(*) FROM scores WHERE score <> id * 7").await, 0);
    let failures = db.run(&["failures", summary["run_id"].as_str().unwrap(), "--json"]);
    let failures = json(&failures);
    let keys: Vec<String> = failures
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["key"][0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["50", "100", "150", "200"], "{failures}");
    assert!(
        failures[0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot score account 50")
    );

    // Fixed: --retry-failed reads the query again and calls only the four.
    // (Calling any other row again would fail: its score exists.)
    db.exec(
        "CREATE OR REPLACE FUNCTION score_account(p_id BIGINT, version TEXT) RETURNS void AS $$
         BEGIN INSERT INTO scores (id, score) VALUES (p_id, p_id * 7); END $$ LANGUAGE plpgsql;",
    )
    .await;
    let run_id = summary["run_id"].as_str().unwrap();
    let out = db.run(&["run", spec.to_str().unwrap(), "--retry-failed", run_id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let retry = json(&out);
    assert_eq!(
        (
            retry["rows_read"].as_u64(),
            retry["rows_changed"].as_u64(),
            retry["rows_failed"].as_u64()
        ),
        (Some(4), Some(4), Some(0)),
        "{retry}"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM scores").await, 200);
    assert_eq!(db.int("SELECT COUNT(*) FROM scores WHERE score <> id * 7").await, 0);
}

/// Rows of a PostgreSQL query whose key is missing from a MariaDB table are
/// inserted there: exactly the missing ones, and again is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_postgres_to_mariadb_finds_exactly_the_missing() {
    let Some(old) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let Some(new) = TestDb::new(Backend::MySql).await else {
        return;
    };
    const N: u64 = 100_000;
    old.exec(&format!(
        "CREATE TABLE sessions (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL);
         INSERT INTO sessions SELECT i, i % 977, TIMESTAMPTZ '2025-01-01 00:00:00+00' + i * INTERVAL '1 minute' FROM ({}) s;",
        old.series(N)
    ))
    .await;
    new.exec("CREATE TABLE sessions (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL, created_at DATETIME(6) NOT NULL)")
        .await;
    // 1% missing: every id divisible by 100.
    new.exec(&format!(
        "INSERT INTO sessions SELECT i, i % 977, TIMESTAMP '2025-01-01 00:00:00' + INTERVAL i MINUTE FROM ({}) s WHERE i % 100 <> 0",
        new.series(N)
    ))
    .await;
    let spec = new.spec(&format!(
        r#"old = "{}"

[jobs.replay]
source.diff = {{ from = "old", query = "SELECT id, user_id, created_at AT TIME ZONE 'UTC' AS created_at FROM sessions WHERE created_at >= :since", key = "id", missing_in = "sessions" }}
action.table = "sessions"
action.insert.id = ":id"
action.insert.user_id = ":user_id"
action.insert.created_at = ":created_at"
params.since = {{ type = "timestamp", default = "2024-01-01 00:00:00" }}
"#,
        old.url
    ));
    let spec = spec.to_str().unwrap();
    let plan = new.run(&["plan", spec, "--json"]);
    assert!(plan.status.success(), "{}", text(&plan));
    assert_eq!(json(&plan)["jobs"][0]["candidates"], 1000);

    let out = new.run(&["run", spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = json(&out);
    assert_eq!(summary["rows_changed"], 1000, "{summary}");
    assert_eq!(new.int("SELECT COUNT(*) FROM sessions").await, N as i64);
    assert_eq!(
        new.int("SELECT COUNT(*) FROM sessions WHERE user_id <> id % 977 OR created_at <> TIMESTAMP '2025-01-01 00:00:00' + INTERVAL id MINUTE")
            .await,
        0,
        "every inserted row holds the source's values"
    );
    let again = new.run(&["run", spec, "--json"]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(json(&again)["rows_changed"], 0);
}

/// The other way round, MariaDB to SQLite, text keys: the lookup compares
/// keys byte for byte, so a key differing only in case is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_mariadb_to_sqlite_text_keys() {
    let Some(old) = TestDb::new(Backend::MySql).await else {
        return;
    };
    let Some(new) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    old.exec("CREATE TABLE codes (code VARCHAR(20) PRIMARY KEY, label VARCHAR(20) NOT NULL)")
        .await;
    old.exec(&format!(
        "INSERT INTO codes SELECT CONCAT('c', LPAD(i, 5, '0')), CONCAT('label ', i) FROM ({}) s",
        old.series(3000)
    ))
    .await;
    new.exec("CREATE TABLE codes (code TEXT PRIMARY KEY, label TEXT NOT NULL)")
        .await;
    new.exec(&format!(
        "INSERT INTO codes SELECT 'c' || substr('00000' || i, -5), 'label ' || i FROM ({}) s WHERE i % 30 <> 0",
        new.series(3000)
    ))
    .await;
    // Upper case in the target: not the same key.
    new.exec("UPDATE codes SET code = upper(code) WHERE code = 'c00001'")
        .await;
    let spec = new.spec(&format!(
        r#"old = "{}"

[jobs.copy]
source.diff = {{ from = "old", query = "SELECT code, label FROM codes", key = "code", missing_in = "codes" }}
action.table = "codes"
action.insert.code = ":code"
action.insert.label = ":label"
"#,
        old.url
    ));
    let out = new.run(&["run", spec.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(json(&out)["rows_changed"], 101);
    assert_eq!(new.int("SELECT COUNT(*) FROM codes").await, 3001);
    assert_eq!(
        new.int("SELECT COUNT(*) FROM codes WHERE code = 'c00030' AND label = 'label 30'")
            .await,
        1
    );
}

/// kill -9 in the middle of a diff-driven insert, then the same command:
/// every missing row inserted once, none missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_diff_insert_then_resume() {
    let Some(old) = TestDb::new(Backend::MySql).await else {
        return;
    };
    let Some(new) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    old.exec(&format!(
        "CREATE TABLE items (id BIGINT PRIMARY KEY, v BIGINT NOT NULL);
         INSERT INTO items SELECT i, i * 5 FROM ({}) s;",
        old.series(6000)
    ))
    .await;
    // Every write to the new table is counted by a trigger.
    new.exec(
        "CREATE TABLE items (id BIGINT PRIMARY KEY, v BIGINT NOT NULL);
         CREATE TABLE inserted (id BIGINT NOT NULL);
         CREATE FUNCTION count_insert() RETURNS trigger AS $$
         BEGIN INSERT INTO inserted VALUES (NEW.id); RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER items_count AFTER INSERT ON items FOR EACH ROW EXECUTE FUNCTION count_insert();",
    )
    .await;
    new.exec(&format!(
        "INSERT INTO items SELECT i, i * 5 FROM ({}) s WHERE i % 4 <> 0;
         TRUNCATE inserted;",
        new.series(6000)
    ))
    .await;
    let spec = new.spec(&format!(
        r#"old = "{}"

[jobs.copy]
source.diff = {{ from = "old", query = "SELECT id, v FROM items", key = "id", missing_in = "items" }}
action.table = "items"
action.insert.id = ":id"
action.insert.v = ":v"
rate = "600/s"
"#,
        old.url
    ));
    let spec = spec.to_str().unwrap();
    let mut child = new.spawn(&["run", spec, "--batch-size", "40"]);
    new.wait_for_batches(&mut child, 8).await;
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "killed mid-run");
    let partial = new.int("SELECT COUNT(*) FROM inserted").await;
    assert!(partial > 0 && partial < 1500, "killed part way: {partial}");

    let out = new.run(&["run", spec, "--json", "--rate", "1000000/s"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(new.int("SELECT COUNT(*) FROM items").await, 6000);
    assert_eq!(
        new.int("SELECT COUNT(*) FROM inserted").await,
        1500,
        "each missing row inserted once"
    );
    assert_eq!(new.int("SELECT COUNT(DISTINCT id) FROM inserted").await, 1500);
    assert_eq!(new.int("SELECT COUNT(*) FROM items WHERE v <> id * 5").await, 0);
}

/// Spec mistakes of the new sources are named by field before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_spec_errors_name_the_field() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    accounts(&db, 5).await;
    std::fs::write(db.path().join("fixes.csv"), "id,tier\n1,gold\n").unwrap();
    let cases = [
        (
            "source.table = \"accounts\"\nsource.query = \"SELECT id FROM accounts\"\nsource.key = \"id\"\naction.update.tier = \"'x'\"",
            "a job has one source",
        ),
        (
            "source.query = \"SELECT id FROM accounts\"\nsource.key = \"id\"\naction.update.tier = \"'x'\"",
            "jobs.j.action.table: missing",
        ),
        (
            "source.query = \"SELECT id FROM accounts\"\nsource.key = \"id\"\naction.table = \"accounts\"\naction.update.tier = \":tier\"",
            "the query returns no column `tier`",
        ),
        (
            "source.file = \"fixes.csv\"\nsource.key = \"id\"\naction.table = \"accounts\"\naction.update.tier = \":level\"",
            "has no column `level`",
        ),
        (
            "source.file = \"fixes.txt\"\nsource.key = \"id\"\naction.table = \"accounts\"\naction.update.tier = \":tier\"",
            "cannot tell the format",
        ),
        (
            "source.query = \"SELECT id FROM accounts\"\nsource.key = \"id\"\nsource.where = \"id > 1\"\naction.table = \"accounts\"\naction.update.tier = \"'x'\"",
            "source.where applies to source.table only",
        ),
        (
            "source.diff = { from = \"nowhere\", query = \"SELECT id FROM accounts\", key = \"id\", missing_in = \"accounts\" }\naction.table = \"accounts\"\naction.insert.id = \":id\"",
            "no database named `nowhere`",
        ),
    ];
    for (body, want) in cases {
        let spec = db.spec(&format!("[jobs.j]\n{body}\n"));
        let out = db.run(&["plan", spec.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{body}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{body}: want {want:?} in {err}");
        assert!(err.contains("infill.toml:"), "names the file and line: {err}");
    }
}

/// A diff whose source server is down, or whose `missing_in` table does not
/// exist, stops before anything is written, naming the database or field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_with_a_server_down_or_a_table_missing() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    accounts(&db, 5).await;
    let down = db.spec(
        r#"old = "postgres://postgres@127.0.0.1:1/nowhere"

[jobs.copy]
source.diff = { from = "old", query = "SELECT id FROM accounts", key = "id", missing_in = "accounts" }
action.table = "accounts"
action.insert.id = ":id"
action.insert.tier = "'x'"
"#,
    );
    let out = db.run(&["run", down.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to database `old`"), "{err}");
    assert!(err.contains("nothing was written"), "{err}");

    let missing = db.spec(&format!(
        r#"old = "{}"

[jobs.copy]
source.diff = {{ from = "old", query = "SELECT id FROM accounts", key = "id", missing_in = "acounts" }}
action.table = "accounts"
action.insert.id = ":id"
action.insert.tier = "'x'"
"#,
        db.url
    ));
    let out = db.run(&["plan", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jobs.copy.source.diff.missing_in"), "{err}");
    assert!(err.contains("table `acounts` does not exist"), "{err}");
    assert_eq!(db.int("SELECT COUNT(*) FROM accounts WHERE tier = 'x'").await, 0);
}
