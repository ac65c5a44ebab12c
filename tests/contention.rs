//! Transient errors are retried, on the real servers: a deadlock provoked by
//! a transaction locking in the opposite order, a row lock held past the
//! lock timeout, and connections cut mid-run by a TCP proxy between infill
//! and the server. Every row ends written exactly once (a trigger counts
//! the writes). SQLite has neither row locks nor a network: PostgreSQL and
//! MariaDB only.

mod common;

use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Backend, Holder, TestDb, text};
use sqlx::AssertSqlSafe;

async fn schema(db: &TestDb, rows: u64) {
    db.exec("CREATE TABLE items (id BIGINT NOT NULL PRIMARY KEY, val BIGINT, writes INTEGER NOT NULL DEFAULT 0)")
        .await;
    db.exec(&format!(
        "INSERT INTO items (id, val, writes) SELECT i, NULL, 0 FROM ({}) s",
        db.series(rows)
    ))
    .await;
    match db.backend {
        Backend::Postgres => {
            db.exec(
                "CREATE FUNCTION count_write() RETURNS trigger AS $$ BEGIN NEW.writes := OLD.writes + 1; RETURN NEW; END $$ LANGUAGE plpgsql;
                 CREATE TRIGGER items_count BEFORE UPDATE ON items FOR EACH ROW WHEN (NEW.val IS DISTINCT FROM OLD.val AND NEW.val > 0) EXECUTE FUNCTION count_write();",
            )
            .await
        }
        _ => {
            db.exec(
                "CREATE TRIGGER items_count BEFORE UPDATE ON items FOR EACH ROW
                 SET NEW.writes = OLD.writes + IF(NEW.val > 0 AND NOT (NEW.val <=> OLD.val), 1, 0)",
            )
            .await
        }
    }
}

fn spec(db: &TestDb, url: &str, extra: &str) -> String {
    db.spec_with_url(
        url,
        &format!(
            r#"
[jobs.fill]
source.table = "items"
source.key = "id"
source.where = "val IS NULL"
action.update.val = "id * 2"
{extra}
"#
        ),
    )
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

async fn assert_exactly_once(db: &TestDb) {
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE writes <> 1 OR val IS NULL OR val <> id * 2")
            .await,
        0,
        "every row written once"
    );
}

/// Waits until an infill session waits for a row lock.
async fn wait_for_lock_wait(db: &TestDb, child: &mut Child) {
    use sqlx::Row;
    if db.backend == Backend::MySql {
        // MariaDB's INNODB_TRX does not show infill's wait (its statement is
        // prepared): give infill the time to connect and start waiting. The
        // wait lasts up to its lock timeout (1 s at least on MySQL).
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(child.try_wait().unwrap().is_none(), "infill ended before it waited");
        return;
    }
    let mut probe = Holder::open(db).await;
    let start = Instant::now();
    loop {
        let waiting: i64 = match &mut probe {
            Holder::Pg(c) => sqlx::raw_sql(AssertSqlSafe(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name LIKE 'infill:%' AND wait_event_type = 'Lock'"
                    .to_string(),
            ))
            .fetch_one(c)
            .await
            .unwrap()
            .get(0),
            Holder::My(_) => unreachable!("handled above"),
        };
        if waiting > 0 {
            return;
        }
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output_ref();
            panic!("infill ended before it waited for the lock: {out}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "infill never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

trait ChildOutput {
    fn wait_with_output_ref(&mut self) -> String;
}

impl ChildOutput for Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let mut out = String::new();
        if let Some(s) = self.stdout.as_mut() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(s) = self.stderr.as_mut() {
            let _ = s.read_to_string(&mut out);
        }
        out
    }
}

fn retries(db: &TestDb) -> Vec<String> {
    db.audit(None)
        .iter()
        .filter(|l| l["event"] == "retry")
        .map(|l| l["error"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The test's transaction locks row 5, infill locks rows 1..4 and waits for
/// row 5, then the test's transaction asks for row 1: a deadlock. The
/// server aborts infill's transaction (PostgreSQL: the test's session checks
/// for deadlocks only after 10 s, infill's after 1 s; InnoDB: infill has
/// written nothing, so it is the cheaper victim), and infill retries it.
async fn deadlock(db: TestDb) {
    schema(&db, 50).await;
    let spec = spec(&db, &db.url, "");
    let mut holder = Holder::open(&db).await;
    holder.exec("BEGIN").await.unwrap();
    if db.backend == Backend::Postgres {
        holder.exec("SET LOCAL deadlock_timeout = '10s'").await.unwrap();
    }
    holder.exec("UPDATE items SET val = -5 WHERE id = 5").await.unwrap();
    let mut child = spawn(&db, &["run", &spec, "--batch-size", "100"]);
    wait_for_lock_wait(&db, &mut child).await;
    // Closes the cycle; returns once the server has aborted infill's side.
    holder.exec("UPDATE items SET val = -1 WHERE id = 1").await.unwrap();
    holder.exec("ROLLBACK").await.unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_exactly_once(&db).await;
    let retried = retries(&db);
    assert!(
        retried.iter().any(|e| e.contains("deadlock") || e.contains("Deadlock")),
        "the deadlock was retried: {retried:?}"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM infill_failures").await, 0);
}

/// A row lock held past infill's lock timeout: infill's statement gives up
/// (PostgreSQL 55P03, MySQL 1205), and the batch is retried until the lock
/// is gone.
async fn lock_timeout(db: TestDb) {
    schema(&db, 50).await;
    let spec = spec(&db, &db.url, "lock_timeout = \"300ms\"");
    let mut holder = Holder::open(&db).await;
    holder.exec("BEGIN").await.unwrap();
    holder
        .exec("UPDATE items SET writes = writes WHERE id = 7")
        .await
        .unwrap();
    let mut child = spawn(&db, &["run", &spec, "--batch-size", "100"]);
    wait_for_lock_wait(&db, &mut child).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    holder.exec("ROLLBACK").await.unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_exactly_once(&db).await;
    let retried = retries(&db);
    assert!(!retried.is_empty(), "the lock timeout was retried");
    assert!(
        retried.iter().all(|e| e.contains("lock") || e.contains("Lock")),
        "{retried:?}"
    );
}

/// A TCP proxy between infill and the server that can cut every
/// connection at once (new ones still go through).
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let list = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { port, conns }
    }
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

/// Connections cut mid-run: batches in flight fail with a connection error
/// and are retried on new connections. The job lock's own connection is cut
/// too; a lost lock (or retries exhausted) stops the run (exit 4, as
/// DESIGN.md settles), and running again finishes it. Either way each row is written exactly once.
async fn connections_cut(db: TestDb) {
    schema(&db, 30_000).await;
    let (host_port, rest) = {
        let after = db.url.split_once("://").unwrap().1;
        let at = after.rfind('@').map(|i| i + 1).unwrap_or(0);
        let slash = after[at..].find('/').unwrap() + at;
        (after[at..slash].to_string(), after[..at].to_string())
    };
    let proxy = Proxy::start(host_port).await;
    let scheme = db.url.split_once("://").unwrap().0;
    let database = db.url.rsplit('/').next().unwrap();
    let url = format!("{scheme}://{rest}127.0.0.1:{}/{database}", proxy.port);
    let spec = spec(&db, &url, "pause_between = \"10ms\"");
    let mut child = spawn(&db, &["run", &spec, "--batch-size", "500"]);
    let start = Instant::now();
    for cuts in 0..3 {
        let want = 5 * (cuts + 1);
        while db.try_int("SELECT COUNT(*) FROM infill_batches").await.unwrap_or(0) < want {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no progress");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        proxy.cut();
    }
    let out = child.wait_with_output().unwrap();
    let code = out.status.code();
    assert!(matches!(code, Some(0) | Some(4)), "{}", text(&out));
    if code == Some(4) {
        // A lost lock, or connections still failing after the retries (on a
        // busy machine): either way the run stopped resumable.
        let again = db.run(&["run", &spec]);
        assert!(again.status.success(), "{}", text(&again));
    }
    assert_exactly_once(&db).await;
}

/// An undo that meets a row lock held past its lock timeout retries its
/// page and finishes: every row restored once.
async fn undo_waits_out_a_lock(db: TestDb) {
    schema(&db, 50).await;
    let spec = spec(&db, &db.url, "");
    let out = db.run(&["run", &spec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = run["run_id"].as_str().unwrap()[..13].to_string();
    let mut holder = Holder::open(&db).await;
    holder.exec("BEGIN").await.unwrap();
    holder
        .exec("UPDATE items SET writes = writes WHERE id = 7")
        .await
        .unwrap();
    let mut child = spawn(&db, &["undo", &id, "--spec", &spec]);
    // Longer than the undo's lock timeout (2 s by default).
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(child.try_wait().unwrap().is_none(), "the undo waits, then retries");
    holder.exec("ROLLBACK").await.unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        db.int("SELECT COUNT(*) FROM items WHERE val IS NOT NULL").await,
        0,
        "all restored"
    );
    let logs: Vec<serde_json::Value> = std::fs::read_dir(db.path().join("infill_logs"))
        .unwrap()
        .flat_map(|f| {
            std::fs::read_to_string(f.unwrap().path())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        logs.iter()
            .any(|l| l["event"] == "retry" && l["run_id"] != run["run_id"]),
        "the undo retried its page"
    );
}

on_servers!(deadlock);
on_servers!(lock_timeout);
on_servers!(connections_cut);
on_servers!(undo_waits_out_a_lock);
