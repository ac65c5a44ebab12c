//! `concurrency` above 1 for a table source's batches: on PostgreSQL the
//! next batches write their ranges while the one in front commits, each
//! committing only after the batch before it. The tests prove the writes
//! overlapped (a log of each row's write, by transaction), that batches and
//! checkpoints stay one chain in key order, and that a kill -9, a row that
//! fails and a pause lose and repeat nothing. MySQL/MariaDB and SQLite run
//! one batch at a time whatever the setting: the same job must still finish
//! exactly once there.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::{Backend, TestDb, text};

/// `items`: even ids are candidates (val NULL), odd ids are not. On
/// PostgreSQL a trigger logs every write with its transaction and time, and
/// `slow_double` sleeps a little per row so that batches take long enough
/// to overlap (and to be killed mid-way).
async fn schema(db: &TestDb, rows: u64, sleep_ms: f64) {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, val BIGINT, writes INTEGER NOT NULL DEFAULT 0)")
        .await;
    db.exec(&format!(
        "INSERT INTO items (id, val, writes) SELECT i, CASE WHEN i % 2 = 0 THEN NULL ELSE -1 END, 0 FROM ({}) s",
        db.series(rows)
    ))
    .await;
    match db.backend {
        Backend::Postgres => {
            db.exec(&format!(
                "CREATE TABLE write_log (id BIGINT NOT NULL, xid BIGINT NOT NULL, at TIMESTAMPTZ NOT NULL);
                 CREATE FUNCTION count_write() RETURNS trigger AS $$ BEGIN
                   NEW.writes := OLD.writes + 1;
                   INSERT INTO write_log VALUES (NEW.id, txid_current(), clock_timestamp());
                   RETURN NEW; END $$ LANGUAGE plpgsql;
                 CREATE TRIGGER items_count BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION count_write();
                 CREATE FUNCTION slow_double(n BIGINT) RETURNS BIGINT AS $$ BEGIN
                   PERFORM pg_sleep({});
                   RETURN n * 2; END $$ LANGUAGE plpgsql VOLATILE;",
                sleep_ms / 1000.0
            ))
            .await
        }
        Backend::MySql => {
            db.exec("CREATE TRIGGER items_count BEFORE UPDATE ON items FOR EACH ROW SET NEW.writes = OLD.writes + 1")
                .await
        }
        Backend::Sqlite => {
            db.exec("CREATE TRIGGER items_count AFTER UPDATE OF val ON items BEGIN UPDATE items SET writes = writes + 1 WHERE id = NEW.id; END;").await
        }
    }
}

fn spec(db: &TestDb, concurrency: u64) -> String {
    spec_with(db, concurrency, "")
}

fn spec_with(db: &TestDb, concurrency: u64, more: &str) -> String {
    let value = db.pick("id * 2", "slow_double(id)", "id * 2");
    db.spec(&format!(
        r#"
[jobs.fill]
source.table = "items"
source.key = ["id"]
source.where = "val IS NULL"
action.update.val = "{value}"
concurrency = {concurrency}
busy_sleep_coef = 0
{more}
"#
    ))
    .to_str()
    .unwrap()
    .to_string()
}

/// Every candidate written exactly once with the right value; no other row
/// touched.
async fn assert_exactly_once(db: &TestDb, candidates: i64) {
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id % 2 = 0 AND writes = 1 AND val = id * 2")
            .await,
        candidates,
        "each candidate written once"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE (id % 2 = 0 AND writes <> 1) OR (id % 2 = 1 AND (writes <> 0 OR val <> -1))")
            .await,
        0,
        "no row written twice, no other row touched"
    );
}

/// The committed batches are one chain: numbered 1, 2, 3, ... and each
/// starting where the one before it ended (the audit log says the same).
async fn assert_chained(db: &TestDb) -> Vec<Vec<Option<String>>> {
    let rows = db
        .texts("SELECT lower_key, upper_key FROM infill_batches ORDER BY batch_no")
        .await;
    assert!(!rows.is_empty());
    assert_eq!(db.int("SELECT MIN(batch_no) FROM infill_batches").await, 1);
    assert_eq!(
        db.int("SELECT MAX(batch_no) FROM infill_batches").await,
        rows.len() as i64,
        "batches numbered without a gap"
    );
    for (i, row) in rows.iter().enumerate().skip(1) {
        assert_eq!(
            row[0],
            rows[i - 1][1],
            "batch {} starts where {} ended: {rows:?}",
            i + 1,
            i
        );
    }
    let logged: Vec<i64> = db
        .audit(None)
        .iter()
        .filter(|l| l["event"] == "batch")
        .map(|l| l["batch_no"].as_i64().unwrap())
        .collect();
    let mut sorted = logged.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(logged, sorted, "the audit log lists each batch once, in order");
    rows
}

/// Pairs of transactions whose logged writes (of the rows `rows` picks)
/// overlap in time: at least one pair when batches were written ahead.
async fn overlapping_batches(db: &TestDb, rows: &str) -> i64 {
    db.int(&format!(
        "WITH t AS (SELECT xid, min(at) AS first, max(at) AS last FROM write_log WHERE {rows} GROUP BY xid)
         SELECT count(*) FROM t a JOIN t b ON a.xid < b.xid AND a.first < b.last AND b.first < a.last"
    ))
    .await
}

async fn batches_write_ahead_in_key_order(db: TestDb) {
    // 6,000 candidates in 24 batches of 500 keys; 0.2 ms per row on
    // PostgreSQL.
    schema(&db, 12_000, 0.2).await;
    let spec = spec(&db, 2);
    let out = db.run(&["run", &spec, "--batch-size", "500", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_exactly_once(&db, 6_000).await;
    let batches = assert_chained(&db).await;
    assert_eq!(batches.len(), 24, "{batches:?}");
    assert_eq!(db.undo_images(None).await, 6_000, "one undo image per row");
    if db.backend == Backend::Postgres {
        let overlaps = overlapping_batches(&db, "TRUE").await;
        assert!(
            overlaps >= 10,
            "batches wrote at the same time: {overlaps} overlapping pairs of 24"
        );
        assert_eq!(
            db.int("SELECT COUNT(DISTINCT xid) FROM write_log").await,
            24,
            "the committed writes came from one transaction per batch"
        );
    }
    // Undo restores every row, whichever transaction wrote it.
    let run = db.texts("SELECT id FROM infill_runs").await[0][0].clone().unwrap();
    let out = db.run(&["undo", &run]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id % 2 = 0 AND val IS NOT NULL")
            .await,
        0
    );
}
on_all_backends!(batches_write_ahead_in_key_order, batches_write_ahead_in_key_order);

/// Adaptive batches (no `--batch-size`) are written ahead too, also while
/// their size is below its bound: here `batch_time` holds them near 1,000
/// keys, far under `max_batch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_batches_write_ahead() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    schema(&db, 20_000, 0.2).await;
    let spec = spec_with(&db, 2, "batch_time = \"100ms\"");
    let out = db.run(&["run", &spec, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_exactly_once(&db, 10_000).await;
    assert_chained(&db).await;
    let sizes: Vec<u64> = db
        .audit(None)
        .iter()
        .filter(|l| l["event"] == "batch")
        .map(|l| l["batch_size"].as_u64().unwrap())
        .collect();
    assert!(sizes.iter().all(|&n| n < 20_000), "below max_batch: {sizes:?}");
    assert!(
        overlapping_batches(&db, "TRUE").await > 0,
        "batches wrote at the same time: {sizes:?}"
    );
}

/// `--concurrency N` on the command line overrides the job's value; 0 is
/// refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_sets_it() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    schema(&db, 4_000, 0.2).await;
    let spec = spec(&db, 1);
    let out = db.run(&["run", &spec, "--batch-size", "500", "--concurrency", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--concurrency"), "{}", text(&out));
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE writes > 0").await, 0);
    let out = db.run(&["run", &spec, "--batch-size", "500", "--concurrency", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_exactly_once(&db, 2_000).await;
    assert_chained(&db).await;
    assert!(
        overlapping_batches(&db, "TRUE").await > 0,
        "batches wrote at the same time"
    );
}

/// With `concurrency = 1` nothing is written ahead: no two batches overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_at_a_time_by_default() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    schema(&db, 4_000, 0.2).await;
    let spec = spec(&db, 1);
    let out = db.run(&["run", &spec, "--batch-size", "500"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_exactly_once(&db, 2_000).await;
    assert_chained(&db).await;
    assert_eq!(overlapping_batches(&db, "TRUE").await, 0, "one batch at a time");
}

/// A kill -9 while three batches write: the ones that had not committed
/// are rolled back whole by the server, and running again writes each of
/// their rows once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_batches_in_flight() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    // 20,000 candidates, batches of 1,000 keys (500 candidates) taking
    // about 0.25 s each.
    schema(&db, 40_000, 0.5).await;
    let spec = spec(&db, 3);
    let mut child = db.spawn(&["run", &spec, "--batch-size", "1000"]);
    db.wait_for_batches(&mut child, 4).await;
    // Batches in flight: their rows are locked, not yet committed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let in_flight = db
        .int("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'infill:%' AND state <> 'idle'")
        .await;
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    assert!(
        in_flight >= 2,
        "batches were writing side by side when killed: {in_flight}"
    );
    // The server ends the killed sessions' transactions; wait for it.
    let mut ended = false;
    for _ in 0..200 {
        let open = db
            .int("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'infill:%'")
            .await;
        if open == 0 {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ended, "the killed run's sessions ended");
    let committed = db.int("SELECT COUNT(*) FROM infill_batches").await;
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE writes > 0").await,
        committed * 500,
        "exactly the committed batches' rows are written"
    );
    assert_chained(&db).await;

    let out = db.run(&["run", &spec, "--batch-size", "1000", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_exactly_once(&db, 20_000).await;
    let batches = assert_chained(&db).await;
    assert_eq!(batches.len(), 40);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM write_log").await,
        20_000,
        "the rows were written once each, by committed batches"
    );
    assert!(
        overlapping_batches(&db, "TRUE").await > 0,
        "batches wrote at the same time"
    );
}

/// A row that fails in a batch written ahead: the batch is written again in
/// turn, the row is isolated and recorded once, and every other row is
/// written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_row_ahead_is_isolated() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    schema(&db, 8_000, 0.1).await;
    // Id 2,600 is in the sixth batch of 500 keys.
    db.exec("ALTER TABLE items ADD CONSTRAINT no_5200 CHECK (val IS DISTINCT FROM 5200)")
        .await;
    let spec = spec_with(&db, 2, "max_failures = 10");
    let out = db.run(&["run", &spec, "--batch-size", "500", "--json"]);
    assert_eq!(out.status.code(), Some(1), "rows failed: {}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_failures").await,
        1,
        "the row is recorded once"
    );
    let failed = db.texts("SELECT row_key FROM infill_failures").await;
    assert_eq!(failed[0][0].as_deref(), Some("[\"2600\"]"));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id % 2 = 0 AND writes = 1 AND val = id * 2")
            .await,
        3_999
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE writes > 1").await,
        0,
        "no row written twice"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id = 2600 AND val IS NULL")
            .await,
        1
    );
    assert_chained(&db).await;
    // The failing batch had been written ahead, then written again in turn.
    let redone: Vec<_> = db
        .audit(None)
        .into_iter()
        .filter(|l| l["event"] == "retry" && l["ahead"] == true)
        .collect();
    assert_eq!(redone.len(), 1, "{redone:?}");
    assert_eq!(redone[0]["batch_no"], 6);
    assert!(redone[0]["error"].as_str().unwrap().contains("no_5200"), "{redone:?}");
}

/// `infill pause` while batches are written ahead: within a moment the
/// rows of the uncommitted ones are free again (rolled back), and `resume`
/// finishes the run with each row written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_rolls_back_the_batches_ahead() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    schema(&db, 20_000, 0.5).await;
    let spec = spec(&db, 3);
    let mut child = db.spawn(&["run", &spec, "--batch-size", "1000"]);
    db.wait_for_batches(&mut child, 2).await;
    let run = db.texts("SELECT id FROM infill_runs").await[0][0].clone().unwrap();
    let out = db.run(&["pause", &run, "--spec", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Held: no transaction of the run stays open beyond a moment.
    let mut settled = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let open = db
            .int("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'infill:%' AND state <> 'idle'")
            .await;
        let written = db.int("SELECT COUNT(*) FROM items WHERE writes > 0").await;
        let committed = db.int("SELECT COUNT(*) FROM infill_batches").await;
        if open == 0 && written == committed * 500 {
            settled = true;
            break;
        }
    }
    assert!(settled, "the paused run holds no batch open");
    let rows = db.int("SELECT COUNT(*) FROM items WHERE writes > 0").await;
    assert!(rows < 10_000, "the run is held before its end");
    let out = db.run(&["resume", &run, "--spec", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_exactly_once(&db, 10_000).await;
    assert_chained(&db).await;
}

/// `infill set RUN concurrency=1` during a run: from then on one batch at
/// a time (the batches ahead beyond it roll back), and the run still
/// writes each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_concurrency_1_live() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    schema(&db, 40_000, 0.5).await;
    let spec = spec(&db, 3);
    let mut child = db.spawn(&["run", &spec, "--batch-size", "1000"]);
    db.wait_for_batches(&mut child, 3).await;
    let run = db.texts("SELECT id FROM infill_runs").await[0][0].clone().unwrap();
    let out = db.run(&["set", &run, "concurrency=1", "--spec", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let set_at = db.texts("SELECT clock_timestamp()::text").await[0][0].clone().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_exactly_once(&db, 20_000).await;
    assert_chained(&db).await;
    assert!(
        db.audit(None).iter().any(|l| l["event"] == "set"),
        "the change reached the run"
    );
    // Transactions that began writing well after the change never overlap.
    let later = db
        .int(&format!(
            "WITH t AS (SELECT xid, min(at) AS first, max(at) AS last FROM write_log GROUP BY xid
                        HAVING min(at) > '{set_at}'::timestamptz + interval '1.5 seconds')
             SELECT count(*) FROM t a JOIN t b ON a.xid < b.xid AND a.first < b.last AND b.first < a.last"
        ))
        .await;
    assert_eq!(later, 0, "one batch at a time after the change");
    let after = db
        .int(&format!(
            "SELECT COUNT(DISTINCT xid) FROM write_log WHERE at > '{set_at}'::timestamptz + interval '1.5 seconds'"
        ))
        .await;
    assert!(
        after >= 5,
        "the run went on for a while after the change: {after} batches"
    );
}

/// A batch written ahead that fails on a transient error (here a lock
/// wait ended by `lock_timeout`: a session of the test holds one of its
/// rows) is written again in turn, and the rest of the run writes one batch
/// at a time: such a wait may come from a cycle through the batches ahead
/// that the server cannot see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_wait_ahead_goes_one_batch_at_a_time() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    schema(&db, 16_000, 0.2).await;
    // Id 3,000 is in the sixth batch of 500 keys: written ahead.
    let mut holder = common::Holder::open(&db).await;
    holder.exec("BEGIN").await.unwrap();
    holder
        .exec("SELECT 1 FROM items WHERE id = 3000 FOR UPDATE")
        .await
        .unwrap();
    let spec = spec_with(&db, 2, "lock_timeout = \"200ms\"");
    let mut child = db.spawn(&["run", &spec, "--batch-size", "500"]);
    // The lock is let go once the batch ahead has failed on it (infill
    // warns at once), while the batch written again in turn retries.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line.unwrap();
            if line.contains("writing one batch at a time from now on") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let failed_ahead = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)).is_ok())
        .await
        .unwrap();
    holder.exec("ROLLBACK").await.unwrap();
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert!(failed_ahead, "a batch written ahead failed on the lock: {stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
    let redone: Vec<_> = db
        .audit(None)
        .into_iter()
        .filter(|l| l["event"] == "retry" && l["ahead"] == true)
        .collect();
    assert_eq!(redone.len(), 1, "{redone:?}");
    assert_eq!(redone[0]["batch_no"], 6);
    assert_exactly_once(&db, 8_000).await;
    assert_chained(&db).await;
    // Batches overlapped before the failure, and never after it (a batch
    // rolled back leaves no line in the write log: its lines roll back).
    assert!(
        overlapping_batches(&db, "id <= 2500").await >= 1,
        "written ahead before"
    );
    assert_eq!(overlapping_batches(&db, "id > 2500").await, 0, "one at a time after");
    assert!(
        db.int("SELECT COUNT(DISTINCT xid) FROM write_log WHERE id > 3000")
            .await
            >= 20,
        "the run went on for many batches after the failure"
    );
}
