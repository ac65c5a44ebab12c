//! Control from another process: `infill pause`, `resume`, `set` and
//! `cancel` reach a live run through its `control` column and take effect
//! at its next batch boundary; a `pause_file` holds a run while it exists.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{TestDb, text};

async fn schema(db: &TestDb) {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, val BIGINT)")
        .await;
    db.exec(&format!(
        "INSERT INTO items (id, val) SELECT i, NULL FROM ({}) s",
        db.series(20_000)
    ))
    .await;
}

fn spec(db: &TestDb, extra: &str) -> String {
    db.spec(&format!(
        r#"
[jobs.fill]
source.table = "items"
source.key = "id"
source.where = "val IS NULL"
action.update.val = "id * 2"
pause_between = "20ms"
{extra}
"#
    ))
    .to_str()
    .unwrap()
    .to_string()
}

fn spawn(db: &TestDb, args: &[&str]) -> Child {
    db.infill()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the COUNT(*) query `sql` reaches `at_least`.
async fn wait_until(db: &TestDb, child: &mut Child, what: &str, sql: &str, at_least: i64) -> i64 {
    let start = Instant::now();
    loop {
        if let Some(n) = db.try_int(sql).await.filter(|n| *n >= at_least) {
            return n;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("infill ended ({status:?}) before {what}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "waited 60 s for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run_id(db: &TestDb) -> String {
    db.texts("SELECT id FROM infill_runs").await[0][0].clone().unwrap()[..13].to_string()
}

fn ok(db: &TestDb, args: &[&str]) -> String {
    let out = db.run(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn pause_set_resume(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, "");
    let mut child = spawn(&db, &["run", &spec, "--batch-size", "200"]);
    wait_until(&db, &mut child, "3 batches", "SELECT COUNT(*) FROM infill_batches", 3).await;
    let id = run_id(&db).await;

    ok(&db, &["pause", &id, "--spec", &spec]);
    wait_until(
        &db,
        &mut child,
        "the pause",
        "SELECT COUNT(*) FROM infill_runs WHERE status = 'paused'",
        1,
    )
    .await;
    let held = db.int("SELECT COUNT(*) FROM infill_batches").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_batches").await,
        held,
        "no batch while paused"
    );
    assert!(child.try_wait().unwrap().is_none(), "a paused run stays alive");
    // Status of the held run: its reason, and how far it has to go.
    let status: serde_json::Value =
        serde_json::from_str(&ok(&db, &["status", &id, "--spec", &spec, "--json"])).unwrap();
    assert_eq!(status["status"], "paused");
    assert!(status["message"].as_str().unwrap().contains("infill pause"), "{status}");
    let p = &status["progress"];
    let (done, left) = (p["keys_done"].as_u64().unwrap(), p["keys_left"].as_u64().unwrap());
    assert!(done >= 600 && left > 0, "{p}");
    if p["estimated"] == false {
        // Counted: walked and left make the table, and the walk ends at the
        // checkpoint of the last committed batch.
        assert_eq!(done + left, 20_000, "{p}");
        assert_eq!(done, 200 * held as u64, "{p}");
    } else {
        assert!(
            (done + left).abs_diff(20_000) <= 4_000,
            "walked plus left is about the table: {p}"
        );
    }
    assert!(p["eta_seconds"].as_f64().is_some(), "{p}");

    ok(
        &db,
        &["set", &id, "batch_size=1000", "pause_between=1ms", "--spec", &spec],
    );
    let released = ok(&db, &["resume", &id, "--spec", &spec]);
    assert!(released.contains("released run"), "{released}");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE val IS NULL OR val <> id * 2")
            .await,
        0
    );
    assert!(
        db.int("SELECT COUNT(*) FROM infill_batches WHERE batch_size = 1000")
            .await
            > 0,
        "batches after the set use its size"
    );
    let lines = db.audit(None);
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap_or("")).collect();
    for e in ["paused", "set", "resumed"] {
        assert!(events.contains(&e), "{e} in the audit log: {events:?}");
    }
    // Control requests need a live run.
    let out = db.run(&["pause", &id, "--spec", &spec]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let out = db.run(&["set", &id, "colour=red", "--spec", &spec]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}
on_all_backends!(pause_set_resume, pause_set_resume);

async fn cancel_a_live_run(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, "");
    let mut child = spawn(&db, &["run", &spec, "--batch-size", "200"]);
    wait_until(&db, &mut child, "3 batches", "SELECT COUNT(*) FROM infill_batches", 3).await;
    let id = run_id(&db).await;
    let said = ok(&db, &["cancel", &id, "--spec", &spec]);
    assert!(said.contains("to stop after the batch in flight"), "{said}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let status = db.texts("SELECT status FROM infill_runs").await;
    assert_eq!(status[0][0].as_deref(), Some("cancelled"));
    let batches = db.int("SELECT COUNT(*) FROM infill_batches").await;
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE val IS NOT NULL").await,
        batches * 200,
        "exactly the committed batches stay written"
    );
    let status = ok(&db, &["status", &id, "--spec", &spec]);
    assert!(status.contains("status    cancelled"), "{status}");
    assert!(status.contains("rows/s written"), "{status}");
    // The next run starts afresh and finishes.
    ok(&db, &["run", &spec]);
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE val IS NULL").await, 0);
}
on_all_backends!(cancel_a_live_run, cancel_a_live_run);

async fn pause_file_holds(db: TestDb) {
    schema(&db).await;
    let spec = spec(&db, "pause_file = \"hold.flag\"");
    std::fs::write(db.path().join("hold.flag"), "").unwrap();
    let mut child = spawn(&db, &["run", &spec, "--batch-size", "2000"]);
    wait_until(
        &db,
        &mut child,
        "the hold",
        "SELECT COUNT(*) FROM infill_runs WHERE status = 'paused'",
        1,
    )
    .await;
    let message = db.texts("SELECT message FROM infill_runs").await;
    assert!(
        message[0][0].as_deref().unwrap_or("").contains("hold.flag"),
        "{message:?}"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM infill_batches").await, 0);
    std::fs::remove_file(db.path().join("hold.flag")).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE val IS NULL").await, 0);
}
on_all_backends!(pause_file_holds, pause_file_holds);

/// A probe above its pause level holds the run, below it lets it go, and
/// above its abort level stops it (exit 4, resumable).
async fn health_probes(db: TestDb) {
    schema(&db).await;
    db.exec("CREATE TABLE knob (v INTEGER NOT NULL)").await;
    db.exec("INSERT INTO knob (v) VALUES (50)").await;
    let spec = spec(
        &db,
        "probes.load = { sql = \"SELECT v FROM knob\", pause_above = 10, abort_above = 100 }",
    );
    let mut child = spawn(&db, &["run", &spec, "--batch-size", "200"]);
    wait_until(
        &db,
        &mut child,
        "the hold",
        "SELECT COUNT(*) FROM infill_runs WHERE status = 'paused'",
        1,
    )
    .await;
    let message = db.texts("SELECT message FROM infill_runs").await;
    assert!(
        message[0][0]
            .as_deref()
            .unwrap_or("")
            .contains("probe `load`: 50 is above its pause level 10"),
        "{message:?}"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM infill_batches").await,
        0,
        "held before the first batch"
    );
    db.exec("UPDATE knob SET v = 0").await;
    wait_until(&db, &mut child, "3 batches", "SELECT COUNT(*) FROM infill_batches", 3).await;
    db.exec("UPDATE knob SET v = 500").await;
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("aborted by the health probe `load`: 500"),
        "{}",
        text(&out)
    );
    let status = db.texts("SELECT status FROM infill_runs").await;
    assert_eq!(status[0][0].as_deref(), Some("interrupted"));
    // When the database is well again, the same command finishes the run.
    db.exec("UPDATE knob SET v = 0").await;
    ok(&db, &["run", &spec]);
    assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE val IS NULL").await, 0);
}
on_all_backends!(health_probes, health_probes);

/// Built-in probes run where the engine has them; elsewhere, and for a
/// probe with neither `sql` nor a built-in name, the error says what to do.
async fn builtin_probes(db: TestDb) {
    schema(&db).await;
    let bad = spec(&db, "probes.mine = { pause_above = 1 }");
    let out = db.run(&["run", &bad]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("probes.mine"), "{}", text(&out));

    // A probe may run on another database of the spec, named; an unknown
    // name is a spec error.
    let bad = spec(
        &db,
        "probes.elsewhere = { sql = \"SELECT 0\", database = \"nope\", pause_above = 1 }",
    );
    let out = db.run(&["run", &bad]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("probes.elsewhere.database: no database `nope`"),
        "{}",
        text(&out)
    );

    let builtin = match db.backend {
        common::Backend::Postgres => "oldest_transaction",
        common::Backend::MySql => "threads_running",
        common::Backend::Sqlite => "replica_lag",
    };
    let spec = spec(
        &db,
        &format!(
            "probes.{builtin} = {{ pause_above = 100000 }}\nprobes.elsewhere = {{ sql = \"SELECT 0\", database = \"target\", pause_above = 1 }}"
        ),
    );
    let out = db.run(&["run", &spec]);
    if db.backend == common::Backend::Sqlite {
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains("not available"), "{}", text(&out));
    } else {
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(db.int("SELECT COUNT(*) FROM items WHERE val IS NULL").await, 0);
    }
}
on_all_backends!(builtin_probes, builtin_probes);
