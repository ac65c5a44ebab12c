//! Whatever stops a run, nothing is lost and nothing is written twice: a
//! trigger counts the writes of every row, infill is killed with SIGKILL or
//! interrupted with SIGINT mid-run, and running again (or `resume`) finishes
//! with every candidate written exactly once. Also: one run per job at a
//! time, and a concurrent writer's values survive (the guard).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{Backend, TestDb, text};

const ROWS: u64 = 200_000;
const BATCH: &str = "2000";

/// `items`: even ids are candidates (val NULL), odd ids are not (val -1);
/// `writes` counts every UPDATE of a row, by trigger.
async fn schema(db: &TestDb) {
    schema_of(db, ROWS).await
}

async fn schema_of(db: &TestDb, rows: u64) {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, val BIGINT, writes INTEGER NOT NULL DEFAULT 0)")
        .await;
    db.exec(&format!(
        "INSERT INTO items (id, val, writes) SELECT i, CASE WHEN i % 2 = 0 THEN NULL ELSE -1 END, 0 FROM ({}) s",
        db.series(rows)
    ))
    .await;
    match db.backend {
        Backend::Postgres => {
            db.exec(
                "CREATE FUNCTION count_write() RETURNS trigger AS $$ BEGIN NEW.writes := OLD.writes + 1; RETURN NEW; END $$ LANGUAGE plpgsql;
                 CREATE TRIGGER items_count BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION count_write();",
            )
            .await
        }
        Backend::MySql => db.exec("CREATE TRIGGER items_count BEFORE UPDATE ON items FOR EACH ROW SET NEW.writes = OLD.writes + 1").await,
        Backend::Sqlite => {
            db.exec("CREATE TRIGGER items_count AFTER UPDATE OF val ON items BEGIN UPDATE items SET writes = writes + 1 WHERE id = NEW.id; END;").await
        }
    }
}

fn spec(db: &TestDb, pause: &str) -> String {
    db.spec(&format!(
        r#"
[jobs.fill]
source.table = "items"
source.key = ["id"]
source.where = "val IS NULL"
action.update.val = "id * 2"
pause_between = "{pause}"
"#
    ))
    .to_str()
    .unwrap()
    .to_string()
}

fn spawn(db: &TestDb, args: &[&str]) -> Child {
    db.spawn(args)
}

async fn wait_for_batches(db: &TestDb, child: &mut Child, n: i64) {
    db.wait_for_batches(child, n).await
}

/// Every candidate written exactly once with the right value; no other row touched.
async fn assert_exactly_once(db: &TestDb) {
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id % 2 = 0 AND (writes <> 1 OR val IS NULL OR val <> id * 2)")
            .await,
        0,
        "each candidate written once"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id % 2 = 1 AND (writes <> 0 OR val <> -1)")
            .await,
        0,
        "no other row touched"
    );
}

async fn kill_9_then_run_again(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, "15ms");
    let mut child = spawn(&db, &["run", &spec, "--batch-size", BATCH]);
    wait_for_batches(&db, &mut child, 5).await;
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "infill was killed mid-run");
    let committed = db.int("SELECT COUNT(*) FROM infill_batches").await;
    let written = db.int("SELECT COUNT(*) FROM items WHERE writes > 0").await;
    assert_eq!(
        written,
        committed * 1000,
        "exactly the committed batches' rows are written"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE writes > 1").await, 0);
    let status: Vec<_> = db.texts("SELECT status FROM infill_runs").await;
    assert_eq!(
        status[0][0].as_deref(),
        Some("running"),
        "a killed run stays unfinished"
    );
    // A kill between a commit and its log line loses the line: simulate it.
    let log_dir = db.path().join("infill_logs");
    let log_file = std::fs::read_dir(&log_dir).unwrap().next().unwrap().unwrap().path();
    let mut lines: Vec<String> = std::fs::read_to_string(&log_file)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let last_batch = lines.iter().rposition(|l| l.contains("\"event\":\"batch\"")).unwrap();
    lines.remove(last_batch);
    std::fs::write(&log_file, lines.join("\n") + "\n").unwrap();

    let out = db.run(&["run", &spec, "--batch-size", BATCH, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("continuing run"), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "succeeded");
    assert_eq!(
        summary["rows_changed"],
        (ROWS / 2) as i64,
        "counters cover the whole run"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs").await,
        1,
        "one run, continued"
    );
    assert_exactly_once(&db).await;
    assert_eq!(db.undo_images(None).await, (ROWS / 2) as i64, "one undo image per row");
    // The audit log holds both processes' lines, in one file.
    let log = db.audit(None);
    let starts = log.iter().filter(|l| l["event"] == "run_start").count();
    assert_eq!(starts, 2);
    assert_eq!(
        log.iter().filter(|l| l["event"] == "batch").count() as u64,
        ROWS / 2000,
        "every committed batch is in the log"
    );
    assert!(
        log.iter().any(|l| l["event"] == "batch" && l["recovered"] == true),
        "the lost line is restored"
    );
}
on_all_backends!(kill_9_then_run_again, kill_9_then_run_again);

async fn sigint_finishes_the_batch_then_resume(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, "15ms");
    let mut child = spawn(&db, &["run", &spec, "--batch-size", BATCH]);
    wait_for_batches(&db, &mut child, 3).await;
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let rows = db.texts("SELECT id, status FROM infill_runs").await;
    assert_eq!(rows[0][1].as_deref(), Some("interrupted"));
    let committed = db.int("SELECT COUNT(*) FROM infill_batches").await;
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE writes > 0").await,
        committed * 1000,
        "the batch in flight committed whole"
    );

    let id = rows[0][0].clone().unwrap();
    let out = db.run(&["resume", &id[..8], "--spec", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_exactly_once(&db).await;
    let status = db.texts("SELECT status FROM infill_runs").await;
    assert_eq!(status[0][0].as_deref(), Some("succeeded"));
}
on_all_backends!(
    sigint_finishes_the_batch_then_resume,
    sigint_finishes_the_batch_then_resume
);

async fn two_signals_roll_back_the_batch(db: TestDb) {
    schema(&db).await;
    // No pause: the second signal lands inside a batch most of the time.
    let spec = spec(&db, "0ms");
    let mut child = spawn(&db, &["run", &spec, "--batch-size", "20000"]);
    wait_for_batches(&db, &mut child, 1).await;
    for _ in 0..2 {
        std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let committed = db.int("SELECT COUNT(*) FROM infill_batches").await;
    let rows_changed = db
        .int(db.pick(
            "SELECT COALESCE(SUM(rows_changed), 0) FROM infill_batches",
            "SELECT COALESCE(SUM(rows_changed), 0)::bigint FROM infill_batches",
            "SELECT CAST(COALESCE(SUM(rows_changed), 0) AS SIGNED) FROM infill_batches",
        ))
        .await;
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE writes > 0").await,
        rows_changed,
        "only committed batches wrote ({committed} batches)"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE writes > 1").await, 0);
    let out = db.run(&["run", &spec, "--batch-size", "20000"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_exactly_once(&db).await;
}
on_all_backends!(two_signals_roll_back_the_batch, two_signals_roll_back_the_batch);

async fn second_run_refuses_while_first_is_alive(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, "20ms");
    let mut first = spawn(&db, &["run", &spec, "--batch-size", BATCH]);
    wait_for_batches(&db, &mut first, 2).await;
    let second = db.run(&["run", &spec, "--batch-size", BATCH]);
    assert_eq!(second.status.code(), Some(4), "{}", text(&second));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("job `fill` is held by another live run"), "{stderr}");
    assert!(first.try_wait().unwrap().is_none(), "the first run goes on");
    first.kill().unwrap();
    first.wait().unwrap();
    let out = db.run(&["run", &spec, "--batch-size", BATCH]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_exactly_once(&db).await;
}
on_all_backends!(
    second_run_refuses_while_first_is_alive,
    second_run_refuses_while_first_is_alive
);

async fn a_concurrent_writer_keeps_its_values(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, "15ms");
    let mut child = spawn(&db, &["run", &spec, "--batch-size", BATCH]);
    wait_for_batches(&db, &mut child, 3).await;
    // The application fills some candidates ahead of the cursor itself.
    db.exec("UPDATE items SET val = 777 WHERE id > 150000 AND id % 10 = 0 AND val IS NULL")
        .await;
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id > 150000 AND id % 10 = 0 AND (val <> 777 OR writes <> 1)")
            .await,
        0,
        "the application's values stay"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE id % 2 = 0 AND NOT (id > 150000 AND id % 10 = 0) AND (writes <> 1 OR val <> id * 2)").await, 0);
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id % 2 = 1 AND (writes <> 0 OR val <> -1)")
            .await,
        0
    );
}
on_all_backends!(
    a_concurrent_writer_keeps_its_values,
    a_concurrent_writer_keeps_its_values
);

/// A kill -9 in the middle of an undo: the batches it committed are
/// restored once, and `infill undo RUN` again continues that undo run, so
/// every row ends written exactly twice (the run, the undo) and as before.
async fn kill_9_during_undo(db: TestDb) {
    schema_of(&db, 20_000).await;
    let spec = db.spec(
        r#"
[jobs.fill]
source.table = "items"
source.key = ["id"]
source.where = "val IS NULL"
action.update.val = "id * 2"
batch_size = 500
pause_between = "30ms"
"#,
    );
    let spec = spec.to_str().unwrap();
    let out = db.run(&["run", spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = run["run_id"].as_str().unwrap()[..13].to_string();

    let undo_batches =
        "SELECT COUNT(*) FROM infill_batches b JOIN infill_runs r ON r.id = b.run_id WHERE r.undo_of IS NOT NULL";
    let mut child = spawn(&db, &["undo", &id]);
    let start = Instant::now();
    while db.try_int(undo_batches).await.unwrap_or(0) < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the undo ended before 3 batches");
        assert!(start.elapsed() < Duration::from_secs(60), "no undo progress in 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    let restored = db
        .int("SELECT rows_changed FROM infill_runs WHERE undo_of IS NOT NULL")
        .await;
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE writes = 2").await,
        restored,
        "exactly the committed undo batches' rows are restored"
    );

    let out = db.run(&["undo", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("continuing undo run"), "{}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id % 2 = 0 AND (writes <> 2 OR val IS NOT NULL)")
            .await,
        0,
        "every candidate written by the run, then restored once"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE id % 2 = 1 AND writes <> 0")
            .await,
        0
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs WHERE undo_of IS NOT NULL")
            .await,
        1,
        "one undo run, continued"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs WHERE undo_of IS NULL AND status = 'undone'")
            .await,
        1
    );
}
on_all_backends!(kill_9_during_undo, kill_9_during_undo);

/// `--batch-size`, `--rate` and `--concurrency` are kept with the run:
/// `infill resume` goes on with them (an operator's throttle is not
/// dropped), `infill status` shows them, and `infill run` continuing the
/// run replaces them with what its own command line gives.
async fn command_line_settings_survive_resume(db: TestDb) {
    schema_of(&db, 1000).await;
    let spec = spec(&db, "0ms");
    let out = db.run(&["run", &spec, "--batch-size", "7", "--rate", "100000/s", "--limit", "20"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let id = db.texts("SELECT id FROM infill_runs").await[0][0].clone().unwrap();
    let status =
        |db: &TestDb| String::from_utf8_lossy(&db.run(&["status", &id[..8], "--spec", &spec]).stdout).to_string();
    let shown = status(&db);
    assert!(shown.contains("settings  batch_size=7 rate=100000/s (kept"), "{shown}");
    let sevens = db.int("SELECT COUNT(*) FROM infill_batches").await;
    assert!(sevens >= 3, "{sevens} batches");
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_batches WHERE batch_size <> 7")
            .await,
        0
    );

    // `infill run` again: its own command line replaces the kept one.
    let out = db.run(&["run", &spec, "--batch-size", "9", "--limit", "30"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let nines = db.int("SELECT COUNT(*) FROM infill_batches").await;
    assert!(nines > sevens);
    let shown = status(&db);
    assert!(shown.contains("settings  batch_size=9 (kept"), "{shown}");

    // `infill resume` keeps it, to the end.
    let out = db.run(&["resume", &id[..8], "--spec", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("settings kept from before (`infill set` or the command line): batch_size=9"),
        "{stderr}"
    );
    assert_eq!(
        db.int(&format!(
            "SELECT COUNT(*) FROM infill_batches WHERE batch_no > {sevens} AND batch_size <> 9"
        ))
        .await,
        0,
        "every batch from the second command on has 9 keys"
    );
    assert!(db.int("SELECT COUNT(*) FROM infill_batches").await > 100);
    assert_exactly_once(&db).await;
    let starts: Vec<_> = db
        .audit(None)
        .into_iter()
        .filter(|l| l["event"] == "run_start")
        .collect();
    assert_eq!(
        starts[0]["command_line"],
        serde_json::json!({ "batch_size": "7", "rate": "100000/s" })
    );
    assert_eq!(starts[2]["command_line"], serde_json::json!({}));
}
on_all_backends!(
    command_line_settings_survive_resume,
    command_line_settings_survive_resume
);

/// A run group stopped before its last job: `infill resume GROUP` runs
/// the jobs it had not started with the group's command line too.
async fn a_group_keeps_its_command_line(db: TestDb) {
    schema_of(&db, 1000).await;
    let spec = db
        .spec(
            r#"
[jobs.low]
source.table = "items"
source.key = ["id"]
source.where = "val IS NULL AND id <= 500"
action.update.val = "id * 2"

[jobs.high]
depends_on = ["low"]
source.table = "items"
source.key = ["id"]
source.where = "val IS NULL AND id > 500"
action.update.val = "id * 2"
"#,
        )
        .to_str()
        .unwrap()
        .to_string();
    let out = db.run(&["run", &spec, "--batch-size", "7", "--limit", "20"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let group = db.texts("SELECT group_id FROM infill_runs").await[0][0]
        .clone()
        .unwrap();
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs").await,
        1,
        "stopped in the first job"
    );
    let out = db.run(&["resume", &group[..13], "--spec", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_runs WHERE status = 'succeeded'")
            .await,
        2
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_batches WHERE batch_size <> 7")
            .await,
        0,
        "both jobs wrote batches of 7 keys"
    );
    assert!(db.int("SELECT COUNT(*) FROM infill_batches").await > 100);
    assert_exactly_once(&db).await;
}
on_all_backends!(a_group_keeps_its_command_line, a_group_keeps_its_command_line);
