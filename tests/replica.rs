//! The `replica_lag` health probe on MySQL/MariaDB, against a real
//! replica: the test starts a primary with a binary log and a replica of it
//! that applies each event six seconds late (`MASTER_DELAY`), each a
//! `mariadbd` of its own on a free port with a fresh data directory. A run
//! on the primary holds while the replica is behind and goes on when it
//! has caught up; a probe pointed at a server that is no replica stops the
//! run before it writes; a replica whose replication is stopped holds the
//! run until it runs again.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::text;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};

/// One `mariadbd` of the test's own, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn binary(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

impl Server {
    /// A fresh server, or None (skip) where MariaDB is not installed and
    /// servers are not required.
    async fn start(server_id: u32, binlog: bool) -> Option<Server> {
        let (Some(mariadbd), Some(install)) = (
            binary(&["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]),
            binary(&["/usr/bin/mariadb-install-db", "/usr/bin/mysql_install_db"]),
        ) else {
            let required = std::env::var("INFILL_TEST_REQUIRE_SERVERS").is_ok_and(|v| v == "1" || v == "true");
            assert!(!required, "mariadbd is not installed and INFILL_TEST_REQUIRE_SERVERS=1");
            eprintln!("SKIPPED: mariadbd is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let out = Command::new(&install)
            .args([
                "--no-defaults",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .arg(format!("--datadir={}", data.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let port = free_port();
        let p = |name: &str| dir.path().join(name).display().to_string();
        let mut cmd = Command::new(&mariadbd);
        cmd.args([
            "--no-defaults",
            "--user=root",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
        ])
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--port={port}"))
        .arg(format!("--socket={}", p("sock")))
        .arg(format!("--pid-file={}", p("pid")))
        .arg(format!("--log-error={}", p("error.log")))
        .arg(format!("--server-id={server_id}"))
        .arg("--innodb-buffer-pool-size=16M")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if binlog {
            cmd.arg(format!("--log-bin={}", p("binlog")));
        }
        let child = cmd.spawn().unwrap();
        let error_log = dir.path().join("error.log");
        let server = Server { child, port, _dir: dir };
        let start = Instant::now();
        while MySqlConnection::connect(&server.url("mysql")).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mariadbd on port {port} did not start: {}",
                std::fs::read_to_string(&error_log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(server)
    }

    fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    async fn exec(&self, sql: &str) {
        let mut c = MySqlConnection::connect(&self.url("mysql")).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        c.close().await.unwrap();
    }

    async fn int(&self, sql: &str) -> i64 {
        let mut c = MySqlConnection::connect(&self.url("mysql")).await.unwrap();
        let v: i64 = sqlx::query_scalar(AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        c.close().await.unwrap();
        v
    }
}

const ROWS: i64 = 1500;

/// A primary holding `app.items` (ROWS rows to fill), and a replica six
/// seconds behind it that has the table.
async fn pair() -> Option<(Server, Server)> {
    let primary = Server::start(1, true).await?;
    let replica = Server::start(2, false).await?;
    replica
        .exec(&format!(
            "CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = 'root', \
             MASTER_PASSWORD = '', MASTER_DELAY = 6; START SLAVE",
            primary.port
        ))
        .await;
    primary
        .exec(&format!(
            "CREATE DATABASE app; CREATE TABLE app.items (id BIGINT NOT NULL PRIMARY KEY, val BIGINT); \
             INSERT INTO app.items (id, val) SELECT seq, NULL FROM seq_1_to_{ROWS}"
        ))
        .await;
    let start = Instant::now();
    while replica
        .int("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'app' AND TABLE_NAME = 'items'")
        .await
        == 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the replica never got app.items"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some((primary, replica))
}

/// The job on the primary, probing `probe_db`'s replication.
fn spec(dir: &Path, primary: &Server, probe_url: &str) -> PathBuf {
    let path = dir.join("infill.toml");
    std::fs::write(
        &path,
        format!(
            r#"[databases]
target = "{}"
replica = "{probe_url}"

[jobs.fill]
source.table = "items"
source.key = "id"
source.where = "val IS NULL"
action.update.val = "id * 2"
probes.replica_lag = {{ database = "replica", pause_above = 0 }}
"#,
            primary.url("app")
        ),
    )
    .unwrap();
    path
}

/// An `infill` process, killed if the test ends before it does.
struct Running(Option<Child>);

impl Running {
    fn start(mut cmd: Command) -> Running {
        Running(Some(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()))
    }

    fn ended(&mut self) -> bool {
        self.0.as_mut().unwrap().try_wait().unwrap().is_some()
    }

    /// Its output once it ends (two minutes at most).
    async fn finish(mut self) -> std::process::Output {
        let start = Instant::now();
        while !self.ended() {
            assert!(start.elapsed() < Duration::from_secs(120), "infill did not end");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn infill(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_infill"));
    c.current_dir(dir).stdin(Stdio::null());
    c
}

fn audit(dir: &Path) -> Vec<serde_json::Value> {
    let logs = dir.join("infill_logs");
    let mut lines = Vec::new();
    for f in std::fs::read_dir(logs).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        lines.extend(
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()),
        );
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_lag_holds_a_run_on_mariadb() {
    let Some((primary, replica)) = pair().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    // A server that is no replica: the run stops before its first batch.
    let spec_path = spec(dir.path(), &primary, &primary.url("mysql"));
    let mut cmd = infill(dir.path());
    cmd.args(["run", spec_path.to_str().unwrap(), "--batch-size", "500"]);
    let out = Running::start(cmd).finish().await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("is not a replica"), "{}", text(&out));
    assert_eq!(
        primary
            .int("SELECT COUNT(*) FROM app.items WHERE val IS NOT NULL")
            .await,
        0
    );
    std::fs::remove_dir_all(dir.path().join("infill_logs")).unwrap();

    // A write on the primary reaches the replica six seconds late: a run
    // started a second and a half after it finds the replica behind (the
    // lag is counted in whole seconds, so the first second shows 0) and
    // holds until it has caught up.
    primary.exec("CREATE TABLE app.tick (id INT)").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spec_path = spec(dir.path(), &primary, &replica.url("mysql"));
    let mut cmd = infill(dir.path());
    cmd.args(["run", spec_path.to_str().unwrap(), "--batch-size", "500", "--json"]);
    let out = Running::start(cmd).finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        primary
            .int("SELECT COUNT(*) FROM app.items WHERE val IS NULL OR val <> id * 2")
            .await,
        0
    );
    let log = audit(dir.path());
    let held: Vec<&str> = log
        .iter()
        .filter(|l| l["event"] == "paused")
        .filter_map(|l| l["reason"].as_str())
        .collect();
    assert!(
        held.iter()
            .any(|r| r.contains("held by the health probe `replica_lag`")),
        "the run held for the replica: {held:?}"
    );
    assert!(log.iter().any(|l| l["event"] == "resumed"), "and went on");

    // Replication stopped: the lag is unknown, and the run holds, saying
    // why, until the replica applies again.
    primary.exec("UPDATE app.items SET val = NULL").await;
    replica.exec("STOP SLAVE SQL_THREAD").await;
    let mut cmd = infill(dir.path());
    cmd.args(["run", spec_path.to_str().unwrap(), "--batch-size", "500", "--json"]);
    let mut child = Running::start(cmd);
    let start = Instant::now();
    loop {
        let held = primary
            .int(
                "SELECT COUNT(*) FROM app.infill_runs WHERE status = 'paused' \
                 AND message LIKE '%unknown (replication is stopped or broken)%'",
            )
            .await;
        if held > 0 {
            break;
        }
        assert!(!child.ended(), "the run ended instead of holding");
        assert!(start.elapsed() < Duration::from_secs(60), "the run never held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replica.exec("START SLAVE SQL_THREAD").await;
    let out = child.finish().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        primary
            .int("SELECT COUNT(*) FROM app.items WHERE val IS NULL OR val <> id * 2")
            .await,
        0
    );
}
