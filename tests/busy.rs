//! A run rests between batches while the application is at work on the
//! same database (`busy_sleep_coef`), on the real servers: a session of the
//! test's own sleeping in a statement is the application. infill's own
//! sessions (the batch's, the look-ahead's, the count's) are never counted,
//! even while a batch's statement runs. SQLite cannot see other processes'
//! statements, so it never rests for them: PostgreSQL and MariaDB only.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Holder, TestDb, text};

const ROWS: u64 = 500;
const BATCH: &str = "100";

/// 500 rows to fill in batches of 100; the statement of each batch sleeps
/// 0.2 s on one row, so the busy count runs while infill's own session is
/// at work.
async fn fixture(db: &TestDb, extra: &str) -> String {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, val BIGINT)")
        .await;
    db.exec(&format!(
        "INSERT INTO items (id, val) SELECT i, NULL FROM ({}) s",
        db.series(ROWS)
    ))
    .await;
    let slow = db.pick(
        "",
        "CASE WHEN id % 100 = 0 THEN length(pg_sleep(0.2)::text) ELSE 0 END",
        "IF(id % 100 = 0, SLEEP(0.2), 0)",
    );
    db.spec(&format!(
        r#"
[jobs.fill]
source.table = "items"
source.key = "id"
source.where = "val IS NULL"
action.update.val = "id * 2 + {slow}"
{extra}
"#
    ))
    .to_str()
    .unwrap()
    .to_string()
}

/// The busy counts of a run's (or an undo's) batches, from its audit log.
/// Each batch that counted any rested at least `busy_sleep_coef` (2) times
/// its duration before the next one (`rest_ms`, the pause the run took);
/// the others did not rest.
fn busy_counts(db: &TestDb, run: &str) -> Vec<u64> {
    let batches: Vec<(u64, u64, u64)> = db
        .audit(Some(run))
        .iter()
        .filter(|l| l["event"] == "batch")
        .map(|l| {
            let n = |k: &str| l[k].as_u64().unwrap_or(0);
            (n("busy_sessions"), n("duration_ms"), n("rest_ms"))
        })
        .collect();
    assert_eq!(batches.len(), 5, "five batches of 100");
    for &(busy, took, rest) in &batches {
        match busy {
            0 => assert_eq!(rest, 0, "a quiet batch does not rest: {batches:?}"),
            _ => assert!(rest > 0 && rest + 2 >= 2 * took, "a busy batch rests 2x: {batches:?}"),
        }
    }
    batches.iter().map(|b| b.0).collect()
}

fn run(db: &TestDb, spec: &str) -> String {
    let out = db.run(&["run", spec, "--batch-size", BATCH, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["run_id"].as_str().unwrap().to_string()
}

async fn assert_filled(db: &TestDb) {
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE val IS NULL OR val <> id * 2")
            .await,
        0
    );
}

/// A session of the test's own sleeping in a statement for a minute, seen
/// by the server before this returns. Ended by [`wake`].
async fn sleeper(db: &TestDb) -> tokio::task::JoinHandle<()> {
    let mut holder = Holder::open(db).await;
    let sql = db.pick("", "SELECT pg_sleep(60)", "SELECT SLEEP(60)").to_string();
    let task = tokio::spawn(async move {
        // Cancelled by `wake`: the error is expected.
        let _ = holder.exec(&sql).await;
    });
    let seen = db.pick(
        "",
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' AND query = 'SELECT pg_sleep(60)'",
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND INFO = 'SELECT SLEEP(60)'",
    );
    let start = Instant::now();
    while db.int(seen).await == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the sleeper never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task
}

async fn wake(db: &TestDb, task: tokio::task::JoinHandle<()>) {
    let ids = db
        .texts(db.pick(
            "",
            "SELECT pid::text FROM pg_stat_activity WHERE datname = current_database() AND query = 'SELECT pg_sleep(60)'",
            "SELECT CAST(ID AS CHAR) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND INFO = 'SELECT SLEEP(60)'",
        ))
        .await;
    for id in ids.into_iter().flatten().flatten() {
        match db.backend {
            Backend::Postgres => db.exec(&format!("SELECT pg_cancel_backend({id})")).await,
            _ => db.exec(&format!("KILL QUERY {id}")).await,
        }
    }
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the sleeper woke")
        .unwrap();
}

/// On a database where only infill works, no batch finds anyone busy: its
/// own batch statement (sleeping 0.2 s while the count runs), the next
/// batch's boundary look-ahead and the count itself are infill's.
async fn own_sessions_are_not_busy(db: TestDb) {
    own_sessions_are_not_busy_with(db, "").await
}

/// The same with batches written ahead (`concurrency = 2`, PostgreSQL; on
/// MariaDB one batch at a time): their sessions are infill's too.
async fn own_batches_ahead_are_not_busy(db: TestDb) {
    own_sessions_are_not_busy_with(db, "concurrency = 2").await
}

async fn own_sessions_are_not_busy_with(db: TestDb, extra: &str) {
    let spec = fixture(&db, extra).await;
    let id = run(&db, &spec);
    assert_filled(&db).await;
    assert_eq!(busy_counts(&db, &id), vec![0; 5]);
}

/// With the application's session at work, every batch of the run counts
/// exactly that one session (and rests), and so does every page of its
/// undo.
async fn a_busy_application_is_counted(db: TestDb) {
    a_busy_application_is_counted_with(db, "").await
}

/// With `concurrency = 2` and the application at work, nothing is written
/// ahead: every batch counts the session and rests before the next one.
async fn a_busy_application_stops_batches_ahead(db: TestDb) {
    a_busy_application_is_counted_with(db, "concurrency = 2").await
}

async fn a_busy_application_is_counted_with(db: TestDb, extra: &str) {
    let spec = fixture(&db, extra).await;
    let task = sleeper(&db).await;
    let id = run(&db, &spec);
    assert_filled(&db).await;
    assert_eq!(busy_counts(&db, &id), vec![1; 5], "the run counted the sleeper");

    let out = db.run(&["undo", &id, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    wake(&db, task).await;
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE val IS NOT NULL").await, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pages: Vec<(u64, u64)> = db
        .audit(Some(v["run_id"].as_str().unwrap()))
        .iter()
        .filter(|l| l["event"] == "batch")
        .map(|l| {
            (
                l["busy_sessions"].as_u64().unwrap_or(0),
                l["rest_ms"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        !pages.is_empty() && pages.iter().all(|&(n, rest)| n == 1 && rest > 0),
        "every page of the undo counted the sleeper and rested: {pages:?}"
    );
}

/// A file source's batches (written from the rows read, not over a key
/// range) count and rest the same way.
async fn a_file_source_is_counted(db: TestDb) {
    fixture(&db, "").await;
    let csv: String = std::iter::once("id,val\n".to_string())
        .chain((1..=ROWS).map(|i| format!("{i},{}\n", i * 2)))
        .collect();
    std::fs::write(db.path().join("vals.csv"), csv).unwrap();
    let spec = db
        .spec(
            r#"
[jobs.fill]
source.file = "vals.csv"
source.key = "id"
action.table = "items"
action.update.val = ":val"
"#,
        )
        .to_str()
        .unwrap()
        .to_string();
    let task = sleeper(&db).await;
    let id = run(&db, &spec);
    wake(&db, task).await;
    assert_filled(&db).await;
    assert_eq!(busy_counts(&db, &id), vec![1; 5]);
}

/// `busy_sleep_coef = 0` turns the count (and the rest) off.
async fn busy_sleep_coef_zero_turns_it_off(db: TestDb) {
    let spec = fixture(&db, "busy_sleep_coef = 0").await;
    let task = sleeper(&db).await;
    let id = run(&db, &spec);
    wake(&db, task).await;
    assert_filled(&db).await;
    assert_eq!(busy_counts(&db, &id), vec![0; 5]);
}

on_servers!(own_sessions_are_not_busy);
on_servers!(own_batches_ahead_are_not_busy);
on_servers!(a_busy_application_stops_batches_ahead);
on_servers!(a_busy_application_is_counted);
on_servers!(busy_sleep_coef_zero_turns_it_off);
on_servers!(a_file_source_is_counted);
